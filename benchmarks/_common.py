"""Helpers shared by the benchmarks: random-weight CSM models of real shapes, memory figures."""

from __future__ import annotations

import resource

import torch
from torch import nn

from csm_engine.config import get_flavor
from csm_engine.model import CSMModel, rope_cache


@torch.no_grad()
def random_csm_model(flavor: str = "1B", seed: int = 0, device: str = "cpu") -> CSMModel:
    """A float32 CSMModel with random weights, built without a second copy in memory.

    Speed does not depend on the weight values; the scale (std 0.02, unit norms) keeps
    activations in a realistic range for the quantization error report.
    """
    cfg = get_flavor(flavor)
    with torch.device("meta"):
        model = CSMModel(cfg)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(".scale"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    # Buffers were created on meta: rebuild them (rope tables, masks, offsets).
    for tf_name in ("backbone", "decoder"):
        tf_cfg = getattr(cfg, tf_name)
        rope = rope_cache(tf_cfg).unsqueeze(1)
        tf = getattr(model, tf_name)
        tf.rope_cos = rope[:, :, 0].contiguous().to(device)
        tf.rope_sin = rope[:, :, 1].contiguous().to(device)
        tf.causal_mask = torch.tril(torch.ones(tf_cfg.max_seq_len, tf_cfg.max_seq_len, dtype=torch.bool, device=device))
    model.codebook_offsets = torch.arange(cfg.audio_num_codebooks, device=device) * cfg.audio_vocab_size
    return model.eval()


def share_weights(model: CSMModel) -> CSMModel:
    """A second CSMModel whose parameters are the same tensors (no copy) — to convert independently."""
    with torch.device("meta"):
        twin = CSMModel(model.config)
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    for tf_name in ("backbone", "decoder"):
        src, dst = getattr(model, tf_name), getattr(twin, tf_name)
        dst.rope_cos, dst.rope_sin, dst.causal_mask = src.rope_cos, src.rope_sin, src.causal_mask
    twin.codebook_offsets = model.codebook_offsets
    return twin.eval()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
