"""Measuring an echo: its delay (GCC-PHAT), levels, and how much a canceller removed (ERLE)."""

from __future__ import annotations

import math

import numpy as np


def echo_delay_samples(reference: np.ndarray, mic: np.ndarray, max_lag: int) -> tuple[int, float]:
    """Lag (samples) at which ``mic`` best matches ``reference``, by GCC-PHAT, and the peak's
    prominence (peak over the median of the correlation: >10 is a clear echo)."""
    n = 1 << math.ceil(math.log2(len(reference) + len(mic)))
    cross = np.fft.rfft(mic, n) * np.conj(np.fft.rfft(reference, n))
    cross /= np.maximum(np.abs(cross), 1e-12)
    correlation = np.abs(np.fft.irfft(cross, n)[: max_lag + 1])
    lag = int(np.argmax(correlation))
    return lag, float(correlation[lag] / max(np.median(correlation), 1e-12))


def rms_db(x: np.ndarray) -> float:
    """RMS level in dB (-120 for silence)."""
    power = float(np.mean(np.square(x, dtype=np.float64))) if len(x) else 0.0
    return 10 * math.log10(power) if power > 1e-12 else -120.0


def erle_db(mic: np.ndarray, cleaned: np.ndarray) -> float:
    """Echo return loss enhancement: energy in over energy out of the canceller, in dB."""
    return rms_db(mic) - rms_db(cleaned)
