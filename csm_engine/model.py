"""CSM: a Llama-style backbone over token frames plus a small audio decoder over codebooks.

Parameter names are those of the original Sesame checkpoint (``backbone.layers.0.attn.q_proj``,
``...sa_norm.scale``, ``audio_head``) so a ``model.safetensors`` loads with ``strict=True``.
q/k projections are in the interleaved-pair RoPE convention of that checkpoint.

One generated frame (``generate_frame``): a backbone step over the new rows gives the last
hidden state ``h``; ``codebook0_head(h)`` gives codebook 0; the decoder then runs over
``[projection(h), projection(embed(c0))]`` and one new codebook per step, each read out by its
own ``audio_head[i - 1]``. The decoder's cache is reused from position 0 every frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from csm_engine.config import CSMConfig, RopeScaling, TransformerConfig
from csm_engine.sampling import sample_topk

# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.scale.dtype:
            # x * rsqrt(mean(x^2) + eps) * scale in one fused op (one dispatch instead of six;
            # reduced precisions are accumulated in float32 inside it)
            return F.rms_norm(x, self.scale.shape, self.scale, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.scale.float()).type_as(x)


def llama3_inv_freq(head_dim: int, base: float, scaling: RopeScaling | None) -> Tensor:
    """Inverse frequencies of rotary embeddings with Llama-3's long-context scaling."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64)[: head_dim // 2] / head_dim))
    if scaling is None:
        return inv_freq.float()
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    mid = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, mid)
    out = torch.where(wavelen < high_wavelen, inv_freq, scaled)
    return out.float()


def rope_cache(cfg: TransformerConfig) -> Tensor:
    """(max_seq_len, 2, head_dim) table per position: [cos, signed sin], each repeated per interleaved pair.

    Row 0 is (c0, c0, c1, c1, ...), row 1 is (-s0, s0, -s1, s1, ...), so that rotating the pairs
    (x[2i], x[2i+1]) is ``x * cos + swap_pairs(x) * sin``: the same products and sums as the
    textbook ``(x0 c - x1 s, x1 c + x0 s)``, bit for bit, in three elementwise ops.
    """
    inv_freq = llama3_inv_freq(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    cos2 = torch.stack([cos, cos], dim=-1).flatten(-2)
    sin2 = torch.stack([-sin, sin], dim=-1).flatten(-2)
    return torch.stack([cos2, sin2], dim=1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, D) by tables cos, sin broadcastable to it."""
    xf = x if x.dtype == torch.float32 else x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    out = xf * cos + swapped * sin
    return out if x.dtype == torch.float32 else out.type_as(x)


class KVCache(nn.Module):
    """Preallocated keys/values (B, n_kv_heads, max_seq_len, head_dim), written in place."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: Tensor | int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H, T, D) at positions ``pos`` and return the keys/values to attend over.

        ``pos`` a tensor (T,) of positions: the whole cache is returned (the mask hides the rest).
        ``pos`` an int: the rows are contiguous from there and only ``[:pos + T]`` is returned, so
        a step attends over the filled part of the cache, not over all of it.
        """
        if isinstance(pos, int):
            t = k.shape[2]
            self.k.narrow(2, pos, t).copy_(k)
            self.v.narrow(2, pos, t).copy_(v)
            return self.k.narrow(2, 0, pos + t), self.v.narrow(2, 0, pos + t)
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.output_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None
        # Optional one-pass projection returning [q | k | v] along the last dim (a fused kernel
        # set by csm_engine.quantize; it computes exactly what the three projections would).
        self.qkv_fused: nn.Module | None = None
        self._qkv_sizes = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
        # Optional kernel doing rope, the cache write and attention for rows at an int position
        # from the fused [q | k | v]: fn(qkv, cos, sin, k_cache, v_cache, pos, n_heads) -> (B, T, H * D).
        self.attend_fused = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, pos: Tensor | int | None) -> Tensor:
        b, t, _ = x.shape
        if self.attend_fused is not None and isinstance(pos, int):
            y = self.attend_fused(self.qkv_fused(x), cos, sin, self.kv_cache.k, self.kv_cache.v, pos, self.n_heads)
            return self.output_proj(y)
        if self.qkv_fused is not None:
            # q and k side by side are rotated in one go (same table for every head).
            qk, v = self.qkv_fused(x).split((self._qkv_sizes[0] + self._qkv_sizes[1], self._qkv_sizes[2]), dim=-1)
            qk = apply_rope(qk.view(b, t, self.n_heads + self.n_kv_heads, self.head_dim), cos, sin)
            q, k = qk.split((self.n_heads, self.n_kv_heads), dim=2)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            q = apply_rope(self.q_proj(x).view(b, t, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
            k = apply_rope(self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
            v = self.v_proj(x)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if pos is None:  # a whole sequence from position 0 without the cache (training)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
            return self.output_proj(y.transpose(1, 2).reshape(b, t, -1))
        if self.kv_cache is None:
            raise RuntimeError("call setup_caches() before running the model")
        k, v = self.kv_cache.update(pos, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.output_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_dim, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_dim, bias=False)
        # Optional one-pass projection returning [w1(x) | w3(x)] (a fused kernel, as in Attention).
        self.w13_fused: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.w13_fused is not None:
            gate, up = self.w13_fused(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.sa_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        # Optional kernel computing this whole layer for rows at an int position in one call:
        # fn(x, cos, sin, k_cache, v_cache, pos) -> (B, T, dim); set by csm_engine.quantize, it
        # computes exactly what the modules below would.
        self.step_fused = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, pos: Tensor | int | None) -> Tensor:
        if self.step_fused is not None and isinstance(pos, int):
            return self.step_fused(x, cos, sin, self.attn.kv_cache.k, self.attn.kv_cache.v, pos)
        h = x + self.attn(self.sa_norm(x), cos, sin, mask, pos)
        return h + self.mlp(self.mlp_norm(h))


class Transformer(nn.Module):
    """A stack of Llama layers over embeddings (no token embedding, no output layer)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # (S, 1, head_dim) each: the singleton broadcasts over heads once sliced by position.
        rope = rope_cache(cfg).unsqueeze(1)
        self.register_buffer("rope_cos", rope[:, :, 0].contiguous(), persistent=False)
        self.register_buffer("rope_sin", rope[:, :, 1].contiguous(), persistent=False)
        self.register_buffer(
            "causal_mask", torch.tril(torch.ones(cfg.max_seq_len, cfg.max_seq_len, dtype=torch.bool)), persistent=False
        )
        # Recompute each layer's activations in backward instead of keeping them (training only).
        self.gradient_checkpointing = False

    def setup_caches(self, batch_size: int, dtype: torch.dtype, max_seq_len: int | None = None) -> None:
        seq = max_seq_len or self.cfg.max_seq_len
        device = self.norm.scale.device
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch_size, self.cfg.n_kv_heads, seq, self.cfg.head_dim, dtype, device)
        self.causal_mask = self.causal_mask[:seq, :seq]

    def caches_are_setup(self) -> bool:
        return all(layer.attn.kv_cache is not None for layer in self.layers)

    def reset_caches(self) -> None:
        for layer in self.layers:
            if layer.attn.kv_cache is not None:
                layer.attn.kv_cache.reset()

    def forward(self, x: Tensor, pos: Tensor | int | None) -> Tensor:
        """x (B, T, dim) at positions ``pos`` -> normed hidden states (B, T, dim).

        ``pos`` is a tensor (T,) of positions, or an int: the first of T contiguous positions.
        The int form is the generation fast path: rope and mask are views of the precomputed
        tables, attention covers only the filled cache, and a single new row needs no mask.
        ``pos`` None: the whole sequence at positions 0..T-1, causal, the KV caches neither
        read nor written (the differentiable path training uses).
        """
        if pos is None:
            t = x.shape[1]
            cos, sin = self.rope_cos[:t], self.rope_sin[:t]
            for layer in self.layers:
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(layer, x, cos, sin, None, None, use_reentrant=False)
                else:
                    x = layer(x, cos, sin, None, None)
            return self.norm(x)
        if isinstance(pos, int):
            t = x.shape[1]
            cos, sin = self.rope_cos[pos:pos + t], self.rope_sin[pos:pos + t]
            mask = None if t == 1 else self.causal_mask[pos:pos + t, :pos + t]
        else:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]
            mask = self.causal_mask[pos].unsqueeze(0).unsqueeze(0)  # (1, 1, T, S)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, pos)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class CSMModel(nn.Module):
    def __init__(self, config: CSMConfig):
        super().__init__()
        self.config = config
        bb, dec = config.backbone, config.decoder
        self.backbone = Transformer(bb)
        # The decoder sees at most 1 + num_codebooks positions per frame; its cache is tiny.
        self.decoder = Transformer(dec)
        self.text_embeddings = nn.Embedding(config.text_vocab_size, bb.dim)
        self.audio_embeddings = nn.Embedding(config.audio_vocab_size * config.audio_num_codebooks, bb.dim)
        self.projection = nn.Linear(bb.dim, dec.dim, bias=False)
        self.codebook0_head = nn.Linear(bb.dim, config.audio_vocab_size, bias=False)
        self.audio_head = nn.Parameter(torch.empty(config.audio_num_codebooks - 1, dec.dim, config.audio_vocab_size))
        nn.init.normal_(self.audio_head, std=0.02)
        # A module that computes ``audio_logits`` from its own copy of the head (a quantized
        # one, set by csm_engine.quantize); None reads ``audio_head`` itself.
        self.audio_head_kernel: nn.Module | None = None
        self.precision = None  # the csm_engine.precision.Precision csm_engine.quantize applied, if any
        self.register_buffer(
            "codebook_offsets", torch.arange(config.audio_num_codebooks) * config.audio_vocab_size, persistent=False
        )

    # -- caches ------------------------------------------------------------------------------

    def setup_caches(self, max_batch_size: int = 1) -> None:
        """Allocate the backbone and decoder KV caches once (in the model's dtype and device)."""
        dtype = self.text_embeddings.weight.dtype
        self.backbone.setup_caches(max_batch_size, dtype)
        self.decoder.setup_caches(max_batch_size, dtype, max_seq_len=self.config.audio_num_codebooks)

    def caches_are_setup(self) -> bool:
        return self.backbone.caches_are_setup()

    def reset_caches(self) -> None:
        """Zero the KV caches (they stay allocated)."""
        self.backbone.reset_caches()
        self.decoder.reset_caches()

    # -- embeddings ---------------------------------------------------------------------------

    def embed_frames(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Token frames (B, T, 33) with mask -> (B, T, dim): the sum of the masked columns' embeddings."""
        audio = self.audio_embeddings(tokens[..., :-1] + self.codebook_offsets)  # (B, T, 32, D)
        text = self.text_embeddings(tokens[..., -1:])  # (B, T, 1, D)
        emb = torch.cat([audio, text], dim=-2)
        return (emb * mask.unsqueeze(-1).to(emb.dtype)).sum(dim=-2)

    def embed_audio(self, codebook: int, token: Tensor) -> Tensor:
        v = self.config.audio_vocab_size
        # A view of this codebook's rows instead of an offset add: one op less per decoder step.
        return F.embedding(token, self.audio_embeddings.weight[codebook * v:(codebook + 1) * v])

    # -- forward pieces (public for parity tests and benchmarks) -----------------------------

    def backbone_hidden(self, tokens: Tensor, mask: Tensor, input_pos: Tensor | int) -> Tensor:
        """Normed backbone hidden states (B, T, dim) for token frames at positions input_pos.

        ``input_pos``: (T,) or (B, T) positions, or an int, the first of T contiguous positions
        (the generation fast path: attention over the filled cache only), or None: positions
        0..T-1 without the cache (training).
        """
        pos = input_pos[0] if isinstance(input_pos, Tensor) and input_pos.dim() == 2 else input_pos
        return self.backbone(self.embed_frames(tokens, mask), pos)

    def audio_logits(self, dh: Tensor, i: int) -> Tensor:
        """Logits (B, vocab) of codebook i (1..31) from decoder hidden states dh (B, dec_dim)."""
        if self.audio_head_kernel is not None:
            return self.audio_head_kernel(dh, i)
        # The head may be kept at a higher precision than the decoder (see quantize.py).
        return dh.to(self.audio_head.dtype) @ self.audio_head[i - 1]

    def decoder_hidden(self, x: Tensor, input_pos: Tensor | int) -> Tensor:
        """Decoder hidden states for projected inputs x (B, t, dec_dim) at positions input_pos (t,) or from an int."""
        return self.decoder(x, input_pos)

    # -- generation ---------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_frame(
        self,
        tokens: Tensor,
        tokens_mask: Tensor,
        input_pos: Tensor | int,
        temperature: float = 0.9,
        topk: int = 50,
        generator: torch.Generator | None = None,
        *,
        n_codes: int | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Prefill/extend the backbone with new token frames and sample the next audio frame (B, 32).

        ``n_codes``: sample only ids below it (the codec's codebook size; the audio vocabulary
        has 3 ids more than Mimi can decode). None samples the whole vocabulary. ``noise``
        (B, 32, vocab): the sampling draws of each codebook (see ``sample_topk``); None draws
        them from ``generator``, all at once.

        ``input_pos`` as an int (the position of the first new row) is the fast path the
        Generator uses. The 31 decoder steps do nothing but the model's own ops: positions,
        rope and masks are views of precomputed tables, codes go into a preallocated row, and
        nothing waits on the device (sampling draws without a host sync).
        """
        h = self.backbone_hidden(tokens, tokens_mask, input_pos)[:, -1]  # (B, D)
        if noise is None and temperature > 0 and topk != 1:
            # All 32 codebooks' draws at once: one op per frame instead of one per step, and the
            # same draws a CUDA graph's step makes from the same generator (cuda_graphs.py).
            vocab = n_codes or self.config.audio_vocab_size
            noise = torch.empty(h.shape[0], self.config.audio_num_codebooks, vocab,
                                device=h.device).exponential_(1, generator=generator)

        def choose(logits: Tensor, i: int) -> Tensor:
            codebook_noise = None if noise is None else noise[:, i]
            return sample_topk(logits[..., :n_codes], topk, temperature, generator, codebook_noise)

        return self.sample_codebooks(h, choose)

    def sample_codebooks(self, h: Tensor, choose: Callable[[Tensor, int], Tensor]) -> Tensor:
        """The frame (B, 32) that follows backbone hidden states h (B, D): codebook 0, then the decoder's 31.

        ``choose(logits, i)`` picks codebook i's tokens (B, 1) from its logits (B, vocab): one
        sampling setting for the whole batch (``generate_frame``) or one per row (the batch engine).
        """
        n_cb = self.config.audio_num_codebooks
        codes = torch.empty(h.shape[0], n_cb, dtype=torch.long, device=h.device)
        c0 = choose(self.codebook0_head(h), 0)  # (B, 1)
        codes[:, :1] = c0
        # Decoder positions 0, 1 = [h, c0]; then codebook i enters at position i.
        dec_in = self.projection(torch.stack([h, self.embed_audio(0, c0[:, 0])], dim=1))  # (B, 2, Dd)
        for i in range(1, n_cb):
            dh = self.decoder(dec_in, 0 if i == 1 else i)[:, -1]
            ci = choose(self.audio_logits(dh, i), i)
            codes[:, i:i + 1] = ci
            dec_in = self.projection(self.embed_audio(i, ci))  # (B, 1, Dd)
        return codes
