"""One frame for many utterances at once: the compute of frame-level continuous batching.

Each row of a batch is one utterance at its own backbone position. The model's own layers run
the rows unchanged; what differs from ``CSMModel.generate_frame`` is only where rows read and
write (``SlotCaches``): every utterance owns a slot of preallocated backbone keys/values, row b
writes its new row at its own position ``pos[b]`` and attends, under its own causal mask row, to
its own slot. The audio decoder needs nothing special: every row is at the same decoder position
in every step (0-1, then 2..31), so the 31 decoder steps run once for the whole batch. Sampling
has per-row temperature and top-k (``csm_engine.sampling.sample_rows``), the exponential draws of ``sample_topk``
made beforehand, so a row samples exactly what ``sample_topk`` samples from the same draws.

``BatchStep`` is that frame from static buffers for one batch size: on CUDA it is captured as a
CUDA graph (one graph per batch-size bucket) and replayed; on CPU it runs directly. A joining
utterance's prompt is prefilled into its slot by the model's own batch-1 path (``slot``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from csm_engine.cuda_graphs import capture_graph
from csm_engine.model import CSMModel, KVCache
from csm_engine.sampling import sample_rows


class CacheView(nn.Module):
    """One layer's keys/values as views of a larger cache, with ``KVCache``'s semantics (one slot, or rows 0..B-1).

    A module only because a layer's ``kv_cache`` must be one; the views are plain attributes.
    """

    def __init__(self, k: Tensor, v: Tensor):
        super().__init__()
        self.k, self.v = k, v

    update = KVCache.update  # the same writes and returned views as a model's own cache


class RowCache(CacheView):
    """The batched step's cache: row b writes its one new row at its own position ``pos[b]`` (pos (B, 1))."""

    def __init__(self, k: Tensor, v: Tensor):
        super().__init__(k, v)
        self.rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # k, v (B, H, T, D) at positions pos (B, T): rows of slot b go to that slot's positions.
        self.k[self.rows, :, pos] = k.transpose(1, 2)
        self.v[self.rows, :, pos] = v.transpose(1, 2)
        return self.k, self.v  # attention covers the whole slot; each row's mask hides the rest


class SlotCaches:
    """Backbone keys/values of ``n_slots`` utterances, plus the audio decoder's for as many rows.

    Per layer (n_slots, kv_heads, max_seq_len, head_dim), in the model's dtype and device. Slot
    s holds one utterance (or an idle conversation kept for reuse); rows 0..B-1 of a batch are
    slots 0..B-1. The last position is never used by an utterance (a prompt and its frame budget
    fit the window and the last frame is never fed back), so rows that pad a batch write there.
    """

    def __init__(self, model: CSMModel, n_slots: int):
        bb, dec = model.config.backbone, model.config.decoder
        dtype, device = model.text_embeddings.weight.dtype, model.text_embeddings.weight.device
        self.n_slots, self.max_seq_len = n_slots, bb.max_seq_len

        def zeros(cfg, seq: int) -> Tensor:
            return torch.zeros(n_slots, cfg.n_kv_heads, seq, cfg.head_dim, dtype=dtype, device=device)

        self.k = [zeros(bb, bb.max_seq_len) for _ in range(bb.n_layers)]
        self.v = [zeros(bb, bb.max_seq_len) for _ in range(bb.n_layers)]
        n_cb = model.config.audio_num_codebooks
        self.dec_k = [zeros(dec, n_cb) for _ in range(dec.n_layers)]
        self.dec_v = [zeros(dec, n_cb) for _ in range(dec.n_layers)]

    @property
    def pad_position(self) -> int:
        return self.max_seq_len - 1

    def slot(self, s: int) -> list[CacheView]:
        """Slot s's backbone layers as batch-1 caches (prefill of one utterance at int positions)."""
        return [CacheView(k[s:s + 1], v[s:s + 1]) for k, v in zip(self.k, self.v)]

    def rows(self, batch: int) -> list[RowCache]:
        """Slots 0..batch-1 as the backbone caches of a batch (one position per row)."""
        return [RowCache(k[:batch], v[:batch]) for k, v in zip(self.k, self.v)]

    def decoder_rows(self, batch: int) -> list[CacheView]:
        return [CacheView(k[:batch], v[:batch]) for k, v in zip(self.dec_k, self.dec_v)]

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange the first ``length`` positions of slots a and b (the rest of both is never read)."""
        if a == b or length <= 0:
            return
        for t in self.k + self.v:
            tmp = t[a, :, :length].clone()
            t[a, :, :length] = t[b, :, :length]
            t[b, :, :length] = tmp


@contextlib.contextmanager
def model_caches(model: CSMModel, backbone: Sequence, decoder: Sequence) -> Iterator[None]:
    """Run the model's layers on these caches, then give the model its own back."""
    layers = list(model.backbone.layers) + list(model.decoder.layers)
    own = [layer.attn.kv_cache for layer in layers]
    for layer, cache in zip(layers, list(backbone) + list(decoder)):
        layer.attn.kv_cache = cache
    try:
        yield
    finally:
        for layer, cache in zip(layers, own):
            layer.attn.kv_cache = cache


def backbone_rows(model: CSMModel, tokens: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
    """Normed backbone hidden states (B, T, dim) of token frames (B, T, 33) at per-row positions pos (B, T)."""
    bb = model.backbone
    cos, sin = bb.rope_cos[pos], bb.rope_sin[pos]  # (B, T, 1, head_dim): each row its own positions
    attn_mask = bb.causal_mask[pos].unsqueeze(1)  # (B, 1, T, S): each row sees its own slot's past
    x = model.embed_frames(tokens, mask)
    for layer in bb.layers:
        x = layer(x, cos, sin, attn_mask, pos)
    return bb.norm(x)


class BatchStep:
    """Feed one row per utterance and sample each one's next frame, from static buffers, for a batch of B.

    Write the inputs into ``tokens``/``mask`` (B, 1, 33), ``pos`` (B, 1), ``temperature``,
    ``topk``, ``greedy`` (B,) and ``noise`` (B, 32, n_codes), then call: the frames (B, 32). With
    ``graph`` the step is captured once as a CUDA graph and replayed (``pool``: a graph memory
    pool shared between the batch sizes of one engine).
    """

    def __init__(self, model: CSMModel, caches: SlotCaches, batch: int, n_codes: int, max_topk: int, *,
                 graph: bool = False, pool=None):
        self.model, self.batch, self.n_codes, self.max_topk = model, batch, n_codes, max_topk
        cfg = model.config
        device = model.text_embeddings.weight.device
        self.tokens = torch.zeros(batch, 1, cfg.frame_width, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, 1, cfg.frame_width, dtype=torch.bool, device=device)
        self.pos = torch.full((batch, 1), caches.pad_position, dtype=torch.long, device=device)
        self.temperature = torch.ones(batch, dtype=torch.float32, device=device)
        self.topk = torch.ones(batch, dtype=torch.long, device=device)
        self.greedy = torch.ones(batch, dtype=torch.bool, device=device)
        self.noise = torch.ones(batch, cfg.audio_num_codebooks, n_codes, dtype=torch.float32, device=device)
        self._backbone, self._decoder = caches.rows(batch), caches.decoder_rows(batch)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.codes: Tensor | None = None
        if graph:
            self._capture(pool)

    @torch.inference_mode()
    def _run(self) -> Tensor:
        def choose(logits: Tensor, i: int) -> Tensor:
            return sample_rows(logits[..., :self.n_codes], self.temperature, self.topk, self.greedy,
                               self.noise[:, i], self.max_topk)

        with model_caches(self.model, self._backbone, self._decoder):
            h = backbone_rows(self.model, self.tokens, self.mask, self.pos)[:, -1]
            return self.model.sample_codebooks(h, choose)

    def _capture(self, pool) -> None:
        # The warm-up writes padding rows (position pad_position) only: every row starts padded.
        self.graph, self.codes = capture_graph(self._run, pool)

    def __call__(self) -> Tensor:
        """The sampled frames (B, 32) on the model's device (a buffer the next call overwrites, with a graph)."""
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.codes


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes that get their own step: powers of two up to ``max_batch``, and ``max_batch`` itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return tuple(sizes + [max_batch])


__all__ = ["BatchStep", "CacheView", "RowCache", "SlotCaches", "backbone_rows", "batch_buckets", "model_caches"]
