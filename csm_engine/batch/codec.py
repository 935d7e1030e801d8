"""Mimi's frame-by-frame decoding for many utterances at once.

One streaming Mimi at batch ``rows``; each utterance holds a row for its lifetime (its
convolution and attention state), independent of where its backbone cache sits. Rows without a
frame this time are left untouched (moshi's exec mask), and a row given to a new utterance is
reset first. The codec's own Mimi stays free for encoding context audio meanwhile: this is a
copy of it.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from csm_engine.codec import MimiCodec


class BatchDecoder:
    """Decodes one frame (32 codes) per busy row into its 1920 PCM samples (24 kHz), all rows in one call."""

    def __init__(self, codec: MimiCodec, rows: int):
        self.rows = rows
        self.mimi = copy.deepcopy(codec.mimi).eval()
        self.device = next(self.mimi.parameters()).device
        self.mimi.streaming_forever(rows)
        self._free = list(range(rows))
        self._reset = torch.zeros(rows, dtype=torch.bool)
        self._codes = torch.zeros(rows, codec.num_codebooks, 1, dtype=torch.long)

    def open(self) -> int:
        """A row for a new utterance (its state is reset before its first frame)."""
        row = self._free.pop(0)
        self._reset[row] = True
        return row

    def close(self, row: int) -> None:
        self._free.append(row)

    def warm_up(self) -> None:
        """Decode twice with every row idle: on CUDA moshi captures its decoder graphs now, not in a request."""
        for _ in range(2):
            self.decode({})

    @torch.inference_mode()
    def decode(self, frames: dict[int, Tensor]) -> tuple[dict[int, Tensor], dict[int, float]]:
        """{row: codes (32,)} -> {row: PCM (1920,) float32 on the CPU}, {row: its RMS} (for the silence guard)."""
        active = torch.zeros(self.rows, dtype=torch.bool)
        self._codes.zero_()
        for row, codes in frames.items():
            self._codes[row, :, 0] = codes
            active[row] = True
        if self._reset.any():
            self.mimi.reset_streaming(self._reset.clone())
            self._reset.zero_()
        self.mimi.set_exec_mask(active.to(self.device))
        pcm = self.mimi.decode(self._codes.to(self.device))[:, 0].float()
        rms = pcm.pow(2).mean(dim=-1).sqrt().tolist()  # every row in one op, as SilenceGuard.is_silent computes it
        pcm = pcm.cpu()
        return {row: pcm[row] for row in frames}, {row: rms[row] for row in frames}


__all__ = ["BatchDecoder"]
