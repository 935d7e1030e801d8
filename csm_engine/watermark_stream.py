"""Watermarking PCM chunks as they are generated, for playback that starts before a reply ends."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from csm_engine.errors import CSMError
from csm_engine.watermark import (
    MESSAGE_PERIOD_S,
    STFT_WINDOW,
    WATERMARK_SAMPLE_RATE,
    Watermarker,
    check_rate,
    mono_samples,
)


class StreamingWatermarker:
    """Watermarks PCM chunks as they are produced, for playback that starts before a reply ends.

    Each chunk of at least ``min_samples`` samples is watermarked on its own and returned at
    once, so the only added latency is the embedding time. Shorter chunks are held back and
    joined with the next ones until there are ``min_samples`` (every sample still gets marked;
    nothing is passed through unmarked); ``flush`` marks whatever is left at the end.

    The trade-off: silentcipher spreads one message over ~0.98 s (21 STFT frames of 2048
    samples at 44.1 kHz), starting afresh in every call. A 160 ms chunk carries only part of
    a message, so a recording of chunk-by-chunk marked audio is not reliably verifiable.
    ``min_samples`` of at least one message period (``message_period_samples``) makes every
    block carry whole messages, at the cost of that much delay before the first audio. Files
    (csm-generate output, saved turns) should be marked whole with ``apply_watermark``.
    The default, one STFT window (~93 ms), keeps the engine's 2-frame (160 ms) chunks unbuffered.
    """

    def __init__(self, watermarker: Watermarker, *, sample_rate: int = 24000,
                 min_samples: int | None = None) -> None:
        check_rate(sample_rate)
        self.watermarker = watermarker
        self.sample_rate = int(sample_rate)
        default_min = math.ceil(STFT_WINDOW * self.sample_rate / WATERMARK_SAMPLE_RATE)
        self.min_samples = int(min_samples) if min_samples is not None else default_min
        if self.min_samples < 1:
            raise CSMError(f"min_samples must be >= 1, got {min_samples}")
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self.compute_s: list[float] = []  # embedding time per marked block, seconds

    @property
    def message_period_samples(self) -> int:
        """Samples (at this stream's rate) that hold one whole watermark message."""
        return math.ceil(MESSAGE_PERIOD_S * self.sample_rate)

    @property
    def buffered_samples(self) -> int:
        """Samples held back, waiting for enough audio to mark."""
        return self._pending_samples

    def push(self, chunk: np.ndarray | torch.Tensor) -> np.ndarray:
        """Take one PCM chunk; return the watermarked audio ready now (possibly empty)."""
        samples = mono_samples(chunk, "streamed audio chunk")
        if samples.size == 0:
            return np.zeros(0, dtype=np.float32)
        self._pending.append(samples)
        self._pending_samples += samples.size
        if self._pending_samples < self.min_samples:
            return np.zeros(0, dtype=np.float32)
        return self._mark_pending()

    def flush(self) -> np.ndarray:
        """Watermark and return whatever is still held back (call once the stream ends)."""
        if not self._pending:
            return np.zeros(0, dtype=np.float32)
        return self._mark_pending()

    def wrap(self, chunks: Iterable[np.ndarray | torch.Tensor]) -> Iterator[np.ndarray]:
        """Watermark a chunk stream (e.g. ``Generator.stream(...)``), yielding non-empty chunks."""
        for chunk in chunks:
            out = self.push(chunk)
            if out.size:
                yield out
        out = self.flush()
        if out.size:
            yield out

    def _mark_pending(self) -> np.ndarray:
        block = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        self._pending, self._pending_samples = [], 0
        start = time.perf_counter()
        marked = self.watermarker.apply_numpy(block, self.sample_rate)
        self.compute_s.append(time.perf_counter() - start)
        return marked


__all__ = ["StreamingWatermarker"]
