"""Sampling a token per row from logits: pure functions, the randomness passed in explicitly.

Both draw from top-k after temperature as ``argmax(p / E)`` with ``E ~ Exp(1)``: the same
distribution as ``torch.multinomial`` without a host sync, and with the draws made beforehand
a CUDA graph can replay it. ``sample_rows`` is ``sample_topk`` with each row's own settings (the
batch engine), so a row samples exactly what ``sample_topk`` samples from the same draws.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_topk(logits: Tensor, topk: int, temperature: float, generator: torch.Generator | None = None,
                noise: Tensor | None = None) -> Tensor:
    """Sample one token per row of logits (B, V) from the top-k after temperature; (B, 1) long.

    ``temperature <= 0`` or ``topk == 1`` is greedy (argmax). ``noise`` (B, V): Exp(1) draws
    made beforehand (a CUDA graph replays fixed buffers); None draws them from ``generator``.
    """
    if temperature <= 0 or topk == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if 0 < topk < logits.size(-1):
        kth = torch.topk(logits, topk, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # argmax(p / E) with E ~ Exp(1) draws from p without a host sync (unlike torch.multinomial).
    if noise is None:
        noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1, keepdim=True)


def sample_rows(logits: Tensor, temperature: Tensor, topk: Tensor, greedy: Tensor, noise: Tensor,
                max_topk: int) -> Tensor:
    """One token per row (B, 1) with the row's own settings: what ``sample_topk`` gives that row.

    temperature (B,) float32 (1 on greedy rows), topk (B,) long in 1..max_topk, greedy (B,) bool
    (argmax), noise (B, V) the row's Exp(1) draws.
    """
    top = logits.argmax(dim=-1, keepdim=True)
    scaled = logits.float() / temperature[:, None]
    kth = torch.topk(scaled, max_topk, dim=-1).values.gather(1, topk[:, None] - 1)  # each row's k-th largest
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    drawn = (torch.softmax(scaled, dim=-1) / noise).argmax(dim=-1, keepdim=True)
    return torch.where(greedy[:, None], top, drawn)


__all__ = ["sample_rows", "sample_topk"]
