"""CSM's training loss, as the model is built: codebook 0 from the backbone, 1..31 from the decoder.

For a batch of token frames with labels (``IGNORE`` outside the target's audio rows):

- backbone: the hidden state of row t-1 predicts codebook 0 of row t through ``codebook0_head``;
  mean cross-entropy over every labelled row;
- decoder: for a chosen subset of the labelled rows (CSM's compute amortization: a random
  1/16 of the frames), the decoder runs over ``[projection(h[t-1]), projection(embed(c0)), ...,
  projection(embed(c30))]`` and position i predicts codebook i through ``audio_head[i - 1]``;
  mean cross-entropy over those frames' 31 codebooks;
- total = backbone + decoder (transformers' ``CsmForConditionalGeneration`` with labels computes
  the same sum, which a test checks to 1e-5 together with the gradients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from csm_engine.model import CSMModel
from csm_engine.train.samples import IGNORE

DEFAULT_DECODER_FRACTION = 1 / 16


@dataclass(frozen=True)
class LossParts:
    """The loss and its two terms (scalar tensors), and how many frames each term covered."""

    total: Tensor
    backbone: Tensor
    decoder: Tensor
    frames: int
    decoder_frames: int


def labelled_frames(labels: Tensor) -> Tensor:
    """(B, T) bool: rows whose codebook-0 label counts (never row 0: nothing precedes it)."""
    rows = labels[..., 0] != IGNORE
    rows[:, 0] = False
    return rows


def choose_decoder_frames(labels: Tensor, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """(B, T) bool: a random ``fraction`` of the labelled frames (at least one) that train the decoder.

    ``fraction`` >= 1 trains it on every labelled frame (amortization off).
    """
    rows = labelled_frames(labels)
    if fraction >= 1:
        return rows
    where = rows.flatten().nonzero().squeeze(1)
    n = max(1, math.ceil(fraction * where.numel())) if where.numel() else 0
    chosen = torch.zeros_like(rows).flatten()
    chosen[where[torch.randperm(where.numel(), generator=generator)[:n]]] = True
    return chosen.view_as(rows)


def forward_logits(model: CSMModel, tokens: Tensor, mask: Tensor, labels: Tensor, decoder_frames: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(backbone logits (B, T-1, V) for rows 1..T-1, decoder logits (N, 31, V), the N frames' codes (N, 32)).

    ``decoder_frames`` (B, T) bool: the rows whose codebooks 1..31 the decoder predicts.
    """
    n_cb = model.config.audio_num_codebooks
    h = model.backbone(model.embed_frames(tokens, mask), None)  # (B, T, D)
    logits0 = model.codebook0_head(h[:, :-1])  # row t-1 predicts codebook 0 of row t
    # Each chosen frame is a decoder sequence [h[t-1], c0, ..., c30] of length 32.
    b, t = decoder_frames.nonzero(as_tuple=True)
    codes = labels[b, t]
    emb = model.audio_embeddings(codes[:, :n_cb - 1] + model.codebook_offsets[:n_cb - 1])  # (N, 31, D)
    x = model.projection(torch.cat([h[b, t - 1].unsqueeze(1), emb], dim=1))  # (N, 32, Dd)
    dh = model.decoder(x, None)[:, 1:]  # (N, 31, Dd): position i reads codebook i
    logits = torch.einsum("nkd,kdv->nkv", dh.to(model.audio_head.dtype), model.audio_head)
    return logits0, logits, codes


def csm_loss(model: CSMModel, tokens: Tensor, mask: Tensor, labels: Tensor,
             decoder_frames: Tensor | None = None) -> LossParts:
    """The CSM loss of token frames (B, T, 33) with labels (B, T, 32); ``decoder_frames`` (B, T) bool
    picks the rows the decoder trains on (None: every labelled row)."""
    rows = labelled_frames(labels)
    decoder_frames = rows if decoder_frames is None else decoder_frames & rows
    logits0, logits, codes = forward_logits(model, tokens, mask, labels, decoder_frames)
    backbone = F.cross_entropy(logits0.float().flatten(0, 1), labels[:, 1:, 0].flatten(), ignore_index=IGNORE)
    decoder = F.cross_entropy(logits.float().flatten(0, 1), codes[:, 1:].flatten(), ignore_index=IGNORE)
    return LossParts(total=backbone + decoder, backbone=backbone, decoder=decoder,
                     frames=int(rows.sum()), decoder_frames=codes.shape[0])
