"""CSM in MLX: the same backbone, audio decoder, embeddings, heads and sampling as ``csm_engine.model``.

Parameter names follow the original Sesame checkpoint so a converted torch state dict loads
with ``strict=True``; the one difference is ``audio_head``, which is a list of 31 ``Linear``
layers (``audio_head.N.weight`` = the torch ``audio_head[N].T``) so that ``nn.quantize`` can
quantize it like every other projection.

RoPE is ``mx.fast.rope`` with ``traditional=True`` (rotation of interleaved pairs, the
checkpoint's convention) and Llama-3 scaled frequencies passed as ``freqs`` (= 1 / inv_freq).
Positions are contiguous, so a step is described by its start position alone.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from csm_engine.config import CSMConfig, TransformerConfig
from csm_engine.generator import MIMI_CODEBOOK_SIZE
from csm_engine.model import llama3_inv_freq


class KVCache:
    """Preallocated keys/values (B, n_kv_heads, max_seq_len, head_dim), updated by slice assignment.

    A plain object (not an ``nn.Module``) so the cache never shows up among the parameters.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: mx.Dtype):
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = mx.zeros(shape, dtype=dtype)
        self.v = mx.zeros(shape, dtype=dtype)
        # Evaluated now: a lazy array can only be evaluated on the thread that made it, and the
        # agent loads the model on one thread and speaks on another.
        mx.eval(self.k, self.v)
        self.max_seq_len = max_seq_len

    def update(self, start: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store k, v (B, H, T, D) at positions start..start+T-1; return keys/values up to there."""
        end = start + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"position {end - 1} is past the cache length {self.max_seq_len}")
        self.k[:, :, start:end, :] = k
        self.v[:, :, start:end, :] = v
        return self.k[:, :, :end, :], self.v[:, :, :end, :]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.scale, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, rope_freqs: np.ndarray):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.output_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # Stored outside the module's parameter dict: a constant, never loaded, saved or quantized.
        object.__setattr__(self, "_rope_freqs", mx.array(rope_freqs))
        self.kv_cache: KVCache | None = None

    def _rope(self, x: mx.array, start: int) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=True, base=None, scale=1.0, offset=start,
                            freqs=self._rope_freqs)

    def __call__(self, x: mx.array, start: int, cache: KVCache | None = None) -> mx.array:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        q, k = self._rope(q, start), self._rope(k, start)
        cache = cache or self.kv_cache
        if cache is None:
            raise RuntimeError("call setup_caches() before running the model")
        k, v = cache.update(start, k, v)
        # "causal" is aligned to the last key, which is exactly "query start+i sees keys 0..start+i".
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal" if t > 1 else None)
        return self.output_proj(y.transpose(0, 2, 1, 3).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_dim, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, rope_freqs: np.ndarray):
        super().__init__()
        self.sa_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, rope_freqs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def __call__(self, x: mx.array, start: int, cache: KVCache | None = None) -> mx.array:
        h = x + self.attn(self.sa_norm(x), start, cache)
        return h + self.mlp(self.mlp_norm(h))


class Transformer(nn.Module):
    """A stack of Llama layers over embeddings (no token embedding, no output layer)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        inv_freq = llama3_inv_freq(cfg.head_dim, cfg.rope_base, cfg.rope_scaling).numpy()
        rope_freqs = (1.0 / inv_freq).astype(np.float32)  # fast.rope rotates position p by p / freqs[i]
        self.layers = [TransformerLayer(cfg, rope_freqs) for _ in range(cfg.n_layers)]
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def setup_caches(self, batch_size: int, dtype: mx.Dtype, max_seq_len: int | None = None) -> None:
        seq = max_seq_len or self.cfg.max_seq_len
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch_size, self.cfg.n_kv_heads, seq, self.cfg.head_dim, dtype)

    def caches_are_setup(self) -> bool:
        return all(layer.attn.kv_cache is not None for layer in self.layers)

    def new_caches(self, batch_size: int, dtype: mx.Dtype, max_seq_len: int) -> list[KVCache]:
        """Fresh caches for one pass, not stored on the layers (the decoder's per-frame caches)."""
        return [KVCache(batch_size, self.cfg.n_kv_heads, max_seq_len, self.cfg.head_dim, dtype) for _ in self.layers]

    def __call__(self, x: mx.array, start: int, caches: list[KVCache] | None = None) -> mx.array:
        """x (B, T, dim) at positions start..start+T-1 -> normed hidden states (B, T, dim).

        ``caches`` (one per layer) replaces the layers' own caches for this call.
        """
        for i, layer in enumerate(self.layers):
            x = layer(x, start, None if caches is None else caches[i])
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# Sampling: pure functions with an explicit PRNG key
# ---------------------------------------------------------------------------------------------


def sample_topk(logits: mx.array, topk: int, temperature: float, key: mx.array | None) -> mx.array:
    """One token per row of logits (B, V) from the top-k after temperature; (B, 1) int32.

    ``temperature <= 0`` or ``topk == 1`` is greedy (argmax), as in the torch engine.
    """
    if temperature <= 0 or topk == 1:
        return mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32)
    logits = logits.astype(mx.float32) / temperature
    if 0 < topk < logits.shape[-1]:
        kth = mx.min(mx.topk(logits, topk, axis=-1), axis=-1, keepdims=True)
        logits = mx.where(logits < kth, -mx.inf, logits)
    return mx.random.categorical(logits, axis=-1, key=key)[:, None].astype(mx.int32)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class MLXCSMModel(nn.Module):
    def __init__(self, config: CSMConfig):
        super().__init__()
        self.config = config
        bb, dec = config.backbone, config.decoder
        self.backbone = Transformer(bb)
        self.decoder = Transformer(dec)
        self.text_embeddings = nn.Embedding(config.text_vocab_size, bb.dim)
        self.audio_embeddings = nn.Embedding(config.audio_vocab_size * config.audio_num_codebooks, bb.dim)
        self.projection = nn.Linear(bb.dim, dec.dim, bias=False)
        self.codebook0_head = nn.Linear(bb.dim, config.audio_vocab_size, bias=False)
        self.audio_head = [nn.Linear(dec.dim, config.audio_vocab_size, bias=False)
                           for _ in range(config.audio_num_codebooks - 1)]
        self.cache_dtype: mx.Dtype = mx.float32

    # -- caches ------------------------------------------------------------------------------

    def setup_caches(self, max_batch_size: int = 1) -> None:
        """Allocate the backbone and decoder KV caches once (in ``cache_dtype``)."""
        self.backbone.setup_caches(max_batch_size, self.cache_dtype)
        self.decoder.setup_caches(max_batch_size, self.cache_dtype, max_seq_len=self.config.audio_num_codebooks)

    def reset_caches(self) -> None:
        """Zero the caches (positions are overwritten anyway; this only frees stale state)."""
        self.setup_caches(self.backbone.layers[0].attn.kv_cache.k.shape[0] if self.caches_are_setup() else 1)

    def caches_are_setup(self) -> bool:
        return self.backbone.caches_are_setup()

    # -- embeddings ---------------------------------------------------------------------------

    def embed_frames(self, tokens: mx.array, mask: mx.array) -> mx.array:
        """Token frames (B, T, 33) with mask -> (B, T, dim): the sum of the masked columns' embeddings."""
        n_cb = self.config.audio_num_codebooks
        offsets = mx.arange(n_cb, dtype=mx.int32) * self.config.audio_vocab_size
        audio = self.audio_embeddings(tokens[..., :n_cb].astype(mx.int32) + offsets)  # (B, T, 32, D)
        text = self.text_embeddings(tokens[..., n_cb:].astype(mx.int32))  # (B, T, 1, D)
        emb = mx.concatenate([audio, text], axis=-2)
        return (emb * mask[..., None].astype(emb.dtype)).sum(axis=-2)

    def embed_audio(self, codebook: int, token: mx.array) -> mx.array:
        return self.audio_embeddings(token.astype(mx.int32) + codebook * self.config.audio_vocab_size)

    # -- forward pieces (public for parity tests and benchmarks) -----------------------------

    def backbone_hidden(self, tokens: mx.array, mask: mx.array, start: int) -> mx.array:
        """Normed backbone hidden states (B, T, dim) for token frames at positions start..start+T-1."""
        return self.backbone(self.embed_frames(tokens, mask), start)

    def decoder_hidden(self, x: mx.array, start: int) -> mx.array:
        """Decoder hidden states for projected inputs x (B, t, dec_dim) at positions start..start+t-1."""
        return self.decoder(x, start)

    # -- generation ---------------------------------------------------------------------------

    def generate_frame(self, tokens: mx.array, tokens_mask: mx.array, start: int, temperature: float = 0.9,
                       topk: int = 50, key: mx.array | None = None) -> mx.array:
        """Extend the backbone with new token frames at ``start`` and sample the next audio frame (B, 32).

        The frame is returned lazily (not evaluated): the whole frame is one MLX graph, so
        there is no host round trip between codebooks.
        """
        n_cb = self.config.audio_num_codebooks
        keys = mx.random.split(key, n_cb) if key is not None else None
        h = self.backbone_hidden(tokens, tokens_mask, start)[:, -1]  # (B, D)
        return self._frame_from_hidden(temperature, topk)(h, keys)

    def _frame_from_hidden(self, temperature: float, topk: int):
        """The per-frame work after the backbone, compiled once per sampling setting.

        It is a pure function of (h, keys): the decoder caches are created inside it (they are
        reset every frame anyway), so ``mx.compile`` can fuse all 31 decoder steps into one graph.
        """
        fns = self.__dict__.setdefault("_compiled", {})
        fn = fns.get((temperature, topk))
        if fn is None:
            fn = mx.compile(lambda h, keys: self._sample_codebooks(h, keys, temperature, topk), inputs=self)
            fns[(temperature, topk)] = fn
        return fn

    def _sample_codebooks(self, h: mx.array, keys: mx.array | None, temperature: float, topk: int) -> mx.array:
        n_cb = self.config.audio_num_codebooks
        if keys is None:
            keys = [None] * n_cb
        # Only ids Mimi can decode (its codebooks hold 2048 entries of the 2051-token audio vocab).
        c0 = sample_topk(self.codebook0_head(h)[..., :MIMI_CODEBOOK_SIZE], topk, temperature, keys[0])  # (B, 1)
        frame = [c0]
        caches = self.decoder.new_caches(h.shape[0], self.cache_dtype, n_cb)
        dec_in = self.projection(mx.stack([h, self.embed_audio(0, c0[:, 0])], axis=1))  # (B, 2, Dd)
        pos = 0
        for i in range(1, n_cb):
            dh = self.decoder(dec_in, pos, caches)[:, -1]
            ci = sample_topk(self.audio_head[i - 1](dh)[..., :MIMI_CODEBOOK_SIZE], topk, temperature, keys[i])
            frame.append(ci)
            pos += dec_in.shape[1]
            dec_in = self.projection(self.embed_audio(i, ci))  # (B, 1, Dd)
        return mx.concatenate(frame, axis=1)
