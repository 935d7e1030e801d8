"""Generator: text + conversation context -> speech, whole or streamed.

There is one frame loop (``Generator.frames``); ``stream`` decodes its frames into PCM chunks as
they come and ``generate`` joins the chunks of ``stream``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from csm_engine.adapters import merge_into_model, read_adapter
from csm_engine.chunking import DEFAULT_SILENCE_GUARD, ChunkAssembler, SilenceGuard
from csm_engine.codec import MimiCodec
from csm_engine.config import SAMPLES_PER_FRAME
from csm_engine.cuda_graphs import FrameStep, FrameSteps, cuda_graphs_available
from csm_engine.errors import CSMError
from csm_engine.model import CSMModel
from csm_engine.prompt import ClipCodes, Prompt, PromptBuilder
from csm_engine.tokens import Segment, TextTokenizer

FrameCallback = Callable[[int, Tensor], None]

# Mimi decodes codes 0..2047; CSM's audio vocabulary (2051) has 3 more ids it must never be fed.
MIMI_CODEBOOK_SIZE = 2048


@dataclass
class ConversationCache:
    """Which token rows the backbone's KV cache holds at positions ``0..length-1``.

    The cache holds the rows fed to the backbone so far (the last prompt, then each sampled frame
    fed back); a new prompt that starts with the same rows reuses their keys/values instead of
    prefilling them again. ``owner`` identifies the cache buffers the record describes: when
    ``setup_caches`` allocates new ones, nothing in them is ours.
    """

    tokens: Tensor  # (max_seq_len, frame_width) long
    mask: Tensor  # (max_seq_len, frame_width) bool
    length: int = 0
    owner: tuple | None = None

    @classmethod
    def empty(cls, max_seq_len: int, width: int) -> ConversationCache:
        return cls(torch.zeros(max_seq_len, width, dtype=torch.long), torch.zeros(max_seq_len, width, dtype=torch.bool))

    def reset(self) -> None:
        """Forget every row: the next utterance prefills its whole prompt."""
        self.length = 0

    def truncate(self, rows: int) -> None:
        """Rows from ``rows`` on are about to be overwritten."""
        self.length = min(self.length, rows)

    def record(self, start: int, tokens: Tensor, mask: Tensor) -> None:
        """Rows ``tokens`` now sit at positions ``start..``; later rows are no longer valid."""
        end = start + tokens.shape[0]
        self.tokens[start:end] = tokens
        self.mask[start:end] = mask
        self.length = end

    def reusable_prefix(self, tokens: Tensor, mask: Tensor, owner: tuple) -> int:
        """Rows at the start of a prompt whose keys/values are already cached (longest common prefix).

        At least the last prompt row is always recomputed: its hidden state starts the first frame.
        A context trimmed from the front (window full) shares nothing and is prefilled whole.
        """
        if self.owner != owner:
            self.owner, self.length = owner, 0
        n = min(self.length, tokens.shape[0] - 1)
        if n <= 0:
            return 0
        same = (self.tokens[:n] == tokens[:n]).all(dim=1) & (self.mask[:n] == mask[:n]).all(dim=1)
        differs = (~same).nonzero()
        return n if differs.numel() == 0 else int(differs[0, 0])


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------


class Generator(PromptBuilder):
    sample_rate = 24_000
    engine = "torch"  # which backend runs the model (csm_engine.speech.ENGINES)
    # Prompt rows are prefilled in blocks of this many positions (see _prefill). 32 rows per
    # call already run fbgemm's int8 matmul at its per-row efficiency (measured: 0.50 ms/row at
    # 32 and 0.43 at 256 for an 8192x2048 weight), and a warm turn redoes at most 31 rows.
    prefill_block = 32
    # On a GPU a block of rows costs its kernel launches, not its arithmetic: bigger blocks.
    gpu_prefill_block = 256

    def __init__(self, model: CSMModel, codec: MimiCodec, tokenizer: TextTokenizer, *,
                 dtype: str | torch.dtype | None = None, cuda_graphs: bool | None = None):
        """``dtype`` (a ``csm_engine.precision`` name or auto) converts the model; None keeps it as is.

        ``cuda_graphs``: replay each frame as a CUDA graph (``csm_engine.cuda_graphs``); None
        turns it on when the model is on a CUDA device (``CSM_NO_CUDA_GRAPHS=1`` turns it off).
        """
        if dtype is not None:
            from csm_engine.quantize import apply_precision

            apply_precision(model, dtype)
        self.model = model.eval()
        self.codec = codec
        self.tokenizer = tokenizer
        self.config = model.config
        if not model.caches_are_setup():
            model.setup_caches(1)
        self._lock = threading.Lock()
        self.clip_codes = ClipCodes()
        self.conversation_cache = ConversationCache.empty(self.config.max_seq_len, self.config.frame_width)
        self.last_prefill_rows = 0  # prompt rows the last utterance actually ran through the backbone
        if cuda_graphs is None:
            cuda_graphs = cuda_graphs_available(self.device) and os.environ.get("CSM_NO_CUDA_GRAPHS", "0") == "0"
        elif cuda_graphs and not cuda_graphs_available(self.device):
            raise CSMError(f"CUDA graphs need the model on a CUDA device (it is on {self.device})")
        self._frame_steps = None
        if cuda_graphs:
            from csm_engine.linears import fuse_linears

            fuse_linears(model)  # fewer launches per step: q|k|v and w1|w3 as one matmul each
            self._frame_steps = FrameSteps(model)
        if self.device.type == "cuda":
            self.prefill_block = self.gpu_prefill_block

    @property
    def uses_cuda_graphs(self) -> bool:
        return self._frame_steps is not None and self._frame_steps.graph

    @property
    def device(self) -> torch.device:
        return self.model.text_embeddings.weight.device

    # -- prompt building ------------------------------------------------------------------

    def segment_codes(self, segment: Segment) -> Tensor | None:
        """Mimi codes (32, frames) of a segment's audio, encoded once and remembered by content."""
        if segment.audio is None:
            return None
        audio = segment.audio
        if audio.dim() != 1:
            raise CSMError(f"context audio for {segment.text[:30]!r} must be mono (samples,), got {tuple(audio.shape)}")
        if audio.numel() == 0:
            return None
        return self.clip_codes.get_or_encode(audio, self.codec.encode)

    def remember_codes(self, audio: Tensor, codes: Tensor) -> None:
        """Record that ``audio`` is the decoding of ``codes`` so it is never re-encoded as context."""
        self.clip_codes.put(audio, codes)

    # -- the frame loop -------------------------------------------------------------------

    def _backbone_caches(self) -> tuple:
        return tuple(layer.attn.kv_cache for layer in self.model.backbone.layers)

    def forget_cache(self) -> None:
        """Drop the conversation cache: the next utterance prefills its whole prompt."""
        self.conversation_cache.reset()

    def _frame_step(self, temperature: float, topk: int) -> FrameStep:
        step, built = self._frame_steps.get(temperature, topk, MIMI_CODEBOOK_SIZE)
        if built:  # building it overwrote one cache row
            self.conversation_cache.truncate(FrameStep.warmup_position(self.model))
        return step

    def prepare(self, temperature: float = 0.9, topk: int = 50) -> None:
        """Build now what the first frame at these settings needs (its CUDA graph), not in the first reply.

        Without CUDA graphs there is nothing to build.
        """
        if self._frame_steps is not None:
            with self._lock:
                self._frame_step(temperature, topk)

    def _feed(self, tokens: Tensor, mask: Tensor, start: int, temperature: float, topk: int,
              gen: torch.Generator | None, sample: bool = True) -> Tensor | None:
        """Run rows ``tokens`` at ``start`` through the backbone (and sample a frame), keeping the cache record true."""
        self.conversation_cache.truncate(start)  # rows from ``start`` on are being overwritten
        if sample and self._frame_steps is not None:
            frame = self._frame_step(temperature, topk)(tokens, mask, start, gen)
        else:
            t, m = tokens[None].to(self.device), mask[None].to(self.device)
            with prompt_attention(self.device, tokens.shape[0]):
                if sample:
                    frame = self.model.generate_frame(t, m, start, temperature, topk, gen,
                                                      n_codes=MIMI_CODEBOOK_SIZE)[0]
                else:
                    self.model.backbone_hidden(t, m, start)
                    frame = None
        self.conversation_cache.record(start, tokens, mask)
        return frame

    def _prefill(self, prompt: Prompt, temperature: float, topk: int, gen: torch.Generator) -> Tensor:
        """Prefill the prompt rows the cache lacks, in blocks aligned to ``prefill_block``; sample the first frame.

        Rows are always computed in the same blocks (same positions, same neighbours), whether
        or not the cache held part of the prompt: kernels whose numerics depend on the batch of
        rows (int8-dynamic quantizes activations per call) then give the same result both ways.
        With CUDA graphs the last row alone starts the first frame (the graphed step takes one row).
        """
        n = prompt.tokens.shape[0]
        block = self.prefill_block
        reusable = self.conversation_cache.reusable_prefix(prompt.tokens, prompt.mask, self._backbone_caches())
        start = reusable // block * block
        self.last_prefill_rows = n - start
        # Rows [start, head) are prefilled in whole blocks; rows [head, n) start the first frame.
        head = n - 1 if self._frame_steps is not None else (n - 1) // block * block
        tokens, mask = prompt.tokens, prompt.mask
        for a in range(start, head, block):
            b = min(a + block, head)
            self._feed(tokens[a:b], mask[a:b], a, temperature, topk, None, sample=False)
        return self._feed(tokens[head:], mask[head:], head, temperature, topk, gen)

    def _random(self, seed: int | None) -> torch.Generator:
        """The random stream of one utterance (what ``_feed`` samples with); another backend has its own."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        return gen

    @torch.inference_mode()
    def frames(self, prompt: Prompt, *, temperature: float = 0.9, topk: int = 50, seed: int | None = None,
               cancel: threading.Event | None = None) -> Iterator[Tensor]:
        """Yield sampled audio frames (32,) until the all-zero end frame, the budget or ``cancel``.

        The end frame itself is yielded last (it is part of what the model said, and decoding it
        flushes the codec's tail; see ``stream``) when the model emits one. Only the prompt rows
        the backbone cache does not already hold are prefilled (the conversation cache).
        """
        gen = self._random(seed)
        n_cb = self.config.audio_num_codebooks
        if cancel is not None and cancel.is_set():
            return
        frame = self._prefill(prompt, temperature, topk, gen)
        start = prompt.tokens.shape[0]
        # One row reused for every generated frame: codes in columns 0..31, text column masked out.
        step_tokens = torch.zeros(1, n_cb + 1, dtype=torch.long)
        step_mask = torch.zeros(1, n_cb + 1, dtype=torch.bool)
        step_mask[:, :n_cb] = True
        for n in range(1, prompt.max_frames + 1):
            yield frame
            if not frame.any() or n == prompt.max_frames or (cancel is not None and cancel.is_set()):
                return
            step_tokens[0, :n_cb] = frame
            frame = self._feed(step_tokens, step_mask, start, temperature, topk, gen)
            start += 1

    # -- public API -------------------------------------------------------------------------

    def stream(
        self,
        text: str,
        speaker: int,
        context: Sequence[Segment] = (),
        *,
        max_audio_length_ms: int = 90_000,
        temperature: float = 0.9,
        topk: int = 50,
        seed: int | None = None,
        chunk_frames: int = 2,
        cancel: threading.Event | None = None,
        on_frame: FrameCallback | None = None,
        runaway_guard: bool = True,
        silence: SilenceGuard | None = DEFAULT_SILENCE_GUARD,
    ) -> Iterator[np.ndarray]:
        """Yield float32 PCM chunks (24 kHz) of ``chunk_frames`` frames each as they are decoded.

        ``on_frame(index, codes)`` is called with every sampled frame (the end frame excluded)
        before its audio is yielded. ``cancel`` stops generation between frames.
        """
        if chunk_frames < 1:
            raise CSMError("chunk_frames must be >= 1")
        prompt = self.build_prompt(text, speaker, context, max_audio_length_ms, runaway_guard)
        chunks = ChunkAssembler(chunk_frames, silence if runaway_guard else None)
        with self._lock, self.codec.streaming() as decoder:
            for index, frame in enumerate(self.frames(prompt, temperature=temperature, topk=topk, seed=seed,
                                                      cancel=cancel)):
                is_end = not frame.any()
                pcm = decoder.decode_frame(frame).cpu()
                if on_frame is not None and not is_end:
                    on_frame(index, frame)
                if not chunks.add(pcm, end=is_end):
                    break
                chunk = chunks.take()
                if chunk is not None:
                    yield chunk
            rest = chunks.take(final=True)
            if rest is not None and not (cancel is not None and cancel.is_set()):
                yield rest

    def generate(self, text: str, speaker: int, context: Sequence[Segment] = (), **kwargs) -> Tensor:
        """The whole utterance as PCM (samples,) float32 at 24 kHz; options as ``stream``."""
        kwargs.setdefault("chunk_frames", 8)
        chunks = list(self.stream(text, speaker, context, **kwargs))
        if not chunks:
            return torch.zeros(0)
        return torch.from_numpy(np.concatenate(chunks))


def prompt_attention(device: torch.device, rows: int) -> contextlib.AbstractContextManager:
    """The attention kernels for a block of prompt rows: on CUDA, any but cuDNN's.

    cuDNN's attention builds an execution plan for every new query length (about 80 ms each,
    measured on an H100), and the last prompt block of a turn has a new length nearly every
    turn; the other kernels start at once.
    """
    if device.type != "cuda" or rows == 1:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def load_generator(model_path: str | None = None, *, mimi_path: str | None = None, tokenizer_path: str | None = None,
                   device: str = "cpu", dtype: torch.dtype | str | None = None,
                   cuda_graphs: bool | None = None, adapter: str | os.PathLike | None = None) -> Generator:
    """Build a Generator from a checkpoint dir or hub repo id (default: the released CSM-1B).

    ``dtype``: a ``csm_engine.precision`` name; None / "auto" picks the fastest for the
    device and model size (``csm_engine.quantize.default_precision``). Int8 scales are computed
    from float32 weights. ``cuda_graphs``: see ``Generator`` (None: on for CUDA devices).
    ``adapter``: a ``csm-finetune`` output directory, merged into the float32 weights before
    any conversion (``csm_engine.adapters``); CSMError if it was trained for another model.
    """
    from csm_engine import weights
    from csm_engine.quantize import apply_precision, resolve_precision

    # Read first: a broken adapter fails before seconds of model loading.
    trained = read_adapter(adapter) if adapter is not None else None
    chosen = None if dtype in (None, "auto") else resolve_precision(dtype, device)
    load_dtype = torch.bfloat16 if chosen == "bfloat16" and trained is None else torch.float32
    model = weights.load_csm_model(model_path, device=device, dtype=load_dtype)
    if trained is not None:
        merge_into_model(model, trained)
    apply_precision(model, chosen or "auto")
    codec = weights.load_mimi(mimi_path, model_path=model_path, device=device)
    tokenizer = weights.load_text_tokenizer(tokenizer_path, model_path=model_path)
    return Generator(model, codec, tokenizer, cuda_graphs=cuda_graphs)


__all__ = ["ConversationCache", "Generator", "MIMI_CODEBOOK_SIZE", "SilenceGuard", "load_generator",
           "SAMPLES_PER_FRAME"]
