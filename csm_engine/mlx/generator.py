"""MLXGenerator: the torch ``Generator`` with its backbone and frames on the MLX model.

Everything that is not model math is the torch engine's own code: prompt building and context
trimming, the conversation cache's bookkeeping (``ConversationCache``: a new turn prefills only
the rows the KV cache does not hold, in the same position-aligned blocks either way; rows of a
cancelled or cut turn are overwritten by the next prompt), the frame loop, streaming decode,
silence guard, chunking, and Mimi through ``MimiCodec.streaming()``. So for the same frames the
PCM is the torch path's PCM. Only three hooks differ: the random stream (an MLX PRNG key split
once per sampled frame, so a seed gives the same frames with or without the cache), feeding
rows to the model, and what identifies the KV cache buffers.
"""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
import torch
from torch import Tensor

from csm_engine.codec import MimiCodec
from csm_engine.generator import Generator
from csm_engine.mlx.model import MLXCSMModel
from csm_engine.tokens import TextTokenizer


class FrameKeys:
    """The PRNG keys of one utterance: each sampled frame takes the next (prefill blocks take none)."""

    def __init__(self, seed: int):
        self.key = mx.random.key(seed)

    def next(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub


class MLXGenerator(Generator):
    """``frames`` / ``stream`` / ``generate`` with the options of ``csm_engine.generator.Generator``."""

    # Prompt rows per prefill call. On the CPU 32 rows already run the matmuls near their per-row
    # best; on a GPU a call costs its launches, so bigger blocks.
    prefill_block = 32
    gpu_prefill_block = 256
    engine = "mlx"

    def __init__(self, model: MLXCSMModel, codec: MimiCodec, tokenizer: TextTokenizer, *,
                 precision: str | None = None):
        # The base class only needs config / eval() / caches_are_setup() / setup_caches() of the model.
        super().__init__(model, codec, tokenizer, cuda_graphs=False)  # type: ignore[arg-type]
        self.precision = precision or "float32"
        if mx.default_device() == mx.gpu:
            self.prefill_block = self.gpu_prefill_block

    @property
    def device(self) -> torch.device:
        # Codes and PCM cross into torch on the CPU; the model itself lives on MLX's default device.
        return torch.device("cpu")

    def _backbone_caches(self) -> tuple:
        return tuple(layer.attn.kv_cache for layer in self.model.backbone.layers)

    def _random(self, seed: int | None) -> FrameKeys:  # type: ignore[override]
        return FrameKeys(seed if seed is not None else random.getrandbits(62))

    def _feed(self, tokens: Tensor, mask: Tensor, start: int, temperature: float, topk: int,
              gen: FrameKeys | None, sample: bool = True) -> Tensor | None:
        """Run rows at ``start`` through the MLX backbone (and sample a frame); keep the cache record true."""
        self.conversation_cache.truncate(start)
        model: MLXCSMModel = self.model  # type: ignore[assignment]
        t = mx.array(tokens.numpy().astype(np.int32))[None]
        m = mx.array(mask.numpy())[None]
        frame = None
        if sample:
            out = model.generate_frame(t, m, start, temperature, topk, gen.next() if gen is not None else None)
            mx.eval(out)
            frame = torch.from_numpy(np.array(out[0], dtype=np.int64))
        else:
            model.backbone_hidden(t, m, start)
            mx.eval([(layer.attn.kv_cache.k, layer.attn.kv_cache.v) for layer in model.backbone.layers])
        self.conversation_cache.record(start, tokens, mask)
        return frame


__all__ = ["FrameKeys", "MLXGenerator"]
