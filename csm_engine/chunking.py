"""Decoded frames -> the PCM chunks a listener hears, for one utterance.

One place decides what of an utterance is played: silent frames after speech are held back
until speech resumes, a reply that stays silent too long is cut (the model sometimes never
emits its end frame), and the end frame's audio (the codec's overlap tail) is faded out.
``Generator.stream`` (one utterance) and the batch engine (many) both feed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class SilenceGuard:
    """Stops a reply that has fallen silent: the model sometimes never emits its end frame."""

    rms_threshold: float = 0.01
    max_silent_frames: int = 19  # ~1.5 s of 80 ms frames after speech
    keep_silent_frames: int = 3  # silence kept at the end of a stopped reply (240 ms)

    def is_silent(self, pcm: Tensor) -> bool:
        return float(pcm.float().pow(2).mean().sqrt()) < self.rms_threshold


DEFAULT_SILENCE_GUARD = SilenceGuard()  # frozen: one shared default


class ChunkAssembler:
    """Collects each frame's PCM (1920 samples at 24 kHz) and hands out chunks of ``chunk_frames`` frames.

    ``add`` returns False once the utterance is over (its end frame came, or the silence guard
    cut it); ``take`` gives a chunk when enough frames are pending, and everything left with
    ``final=True``.
    """

    def __init__(self, chunk_frames: int = 2, silence: SilenceGuard | None = DEFAULT_SILENCE_GUARD):
        self.chunk_frames = chunk_frames
        self.silence = silence
        self._pending: list[Tensor] = []  # decoded, not yet handed out
        self._held: list[Tensor] = []  # silent frames held back until speech resumes
        self._heard_speech = False

    def add(self, pcm: Tensor, *, end: bool = False, rms: float | None = None) -> bool:
        """Take one frame's PCM (``end``: the all-zero end frame's); False when nothing more should follow.

        ``rms``: the frame's RMS if the caller computed it already (a batch computes all at once).
        """
        if end:
            self._pending.extend(self._held)
            self._pending.append(pcm * torch.linspace(1.0, 0.0, pcm.numel()))
            return False
        silent = self.silence is not None and (
            rms < self.silence.rms_threshold if rms is not None else self.silence.is_silent(pcm))
        if silent:
            if self._heard_speech:
                self._held.append(pcm)
                if len(self._held) > self.silence.max_silent_frames:
                    self._pending.extend(self._held[: self.silence.keep_silent_frames])
                    self._held.clear()
                    return False
                return True
        else:
            self._heard_speech = True
            self._pending.extend(self._held)
            self._held.clear()
        self._pending.append(pcm)
        return True

    def take(self, final: bool = False) -> np.ndarray | None:
        """A float32 chunk when ``chunk_frames`` frames are pending (any pending frames if ``final``), else None."""
        if not self._pending or (not final and len(self._pending) < self.chunk_frames):
            return None
        chunk = torch.cat(self._pending).numpy()
        self._pending.clear()
        return chunk


__all__ = ["DEFAULT_SILENCE_GUARD", "ChunkAssembler", "SilenceGuard"]
