"""A linear model of the echo path: how the agent's voice, as handed to the speaker, reaches the RAW
microphone (sound card delay + room impulse response + gain), fitted by least squares.

A room is nearly linear and time-invariant, so a FIR of ~0.4 s fitted over a few seconds of
echo-only audio predicts the echo to 30-40 dB (the noise floor limits it), and the microphone
minus that prediction still holds a user's voice untouched; AEC3's suppressor, which is what
takes the user out along with the echo, is not involved. ``agent.echo.double_talk`` uses it to tell a
person from residual echo and to recover a barge-in's words.

The fit: conjugate gradients on the normal equations of ``mic ~ taps * reference`` (FFT products,
preconditioned by the reference's power spectrum), ~3-4 ms a step on 5 s at 16 kHz; speech
needs ~40 steps from nothing or ~15 from the previous fit, and at least ~3 s of audio for the
full 0.4 s (fewer seconds leave bands the reference barely excited unfitted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import fft

from agent.echo.measure import echo_delay_samples

BLOCK = 512  # samples per block when measuring the leak (the pipeline's block)


@dataclass(frozen=True)
class EchoPath:
    """mic[n] ~ sum_k taps[k] * reference[n - delay - k] (samples at 16 kHz); ``leak``: what is left
    of the echo after subtracting the prediction, as a fraction of the predicted echo's power
    (90th percentile over the fit's 32 ms blocks, noise taken out)."""

    delay: int
    taps: np.ndarray
    leak: float
    _spectra: dict = field(default_factory=dict, compare=False, repr=False)  # FFT size -> spectrum of the taps

    @property
    def history(self) -> int:
        """Reference samples needed before the first predicted one."""
        return self.delay + len(self.taps) - 1

    def predict(self, reference: np.ndarray) -> np.ndarray:
        """The echo over ``reference[history:]`` (float32)."""
        n = fft.next_fast_len(len(reference) + len(self.taps))
        if n not in self._spectra:  # the live path predicts the same length every block
            self._spectra[n] = fft.rfft(self.taps, n)
        full = fft.irfft(fft.rfft(reference, n) * self._spectra[n], n)
        return full[len(self.taps) - 1 : len(reference) - self.delay].astype(np.float32)


def fit_echo_path(reference: np.ndarray, mic: np.ndarray, weights: np.ndarray, *, taps: int, max_delay: int,
                  iterations: int, previous: EchoPath | None = None, warm_iterations: int | None = None,
                  noise_power: float = 0.0) -> EchoPath:
    """Fit an echo path from ``reference`` to ``mic`` (the same span of the stream; 16 kHz). The
    first ``max_delay + taps`` samples are history only; rows with ``weights`` 0 (a person talking,
    no far end) are left out. The bulk delay is found by GCC-PHAT (10 ms early, for the rise of
    the direct sound); a ``previous`` fit whose span still holds that peak is where this one
    starts (its delay and taps), so that what the reference hardly excites now is kept from before;
    one that no longer does (the sound card's delay changed) is dropped. ``iterations``: CG steps
    from nothing; ``warm_iterations`` from ``previous`` (default: the same)."""
    lag, prominence = echo_delay_samples(reference * weights, mic * weights, max_delay)
    delay = max(0, lag - 160) if prominence > 10 else 0
    if previous is not None and (prominence <= 10 or previous.delay <= lag < previous.delay + taps // 4):
        delay = previous.delay
    else:
        previous = None
    skip = max_delay - delay  # keep exactly the history this delay needs
    if previous is None:
        return fit_taps(reference[skip:], mic[skip:], weights[skip:], taps, delay, iterations, None, noise_power)
    steps = iterations if warm_iterations is None else warm_iterations
    return fit_taps(reference[skip:], mic[skip:], weights[skip:], taps, delay, steps, previous.taps, noise_power)


def fit_taps(reference: np.ndarray, mic: np.ndarray, weights: np.ndarray, taps: int, delay: int,
             iterations: int, start: np.ndarray | None = None, noise_power: float = 0.0) -> EchoPath:
    """Weighted least-squares FIR after a known ``delay`` (the first ``delay + taps - 1`` samples of
    both signals are history only), by preconditioned conjugate gradients from ``start``."""
    # float32 FFTs: twice as fast as float64, and far more precise than the 40 dB the fit reaches
    x = reference[: len(reference) - delay].astype(np.float32)
    y, w = mic[delay + taps - 1 :].astype(np.float32), weights[delay + taps - 1 :].astype(np.float32)
    rows, n = len(y), fft.next_fast_len(len(x) + taps)
    spectrum = fft.rfft(x, n)

    def forward(h: np.ndarray) -> np.ndarray:
        return fft.irfft(spectrum * fft.rfft(h, n), n)[taps - 1 : taps - 1 + rows]

    def normal(r: np.ndarray) -> np.ndarray:  # X^T W r
        padded = np.zeros(n, np.float32)
        padded[taps - 1 : taps - 1 + rows] = r * w
        return fft.irfft(np.conj(spectrum) * fft.rfft(padded), n)[:taps]

    m = 2 * taps  # preconditioner: 1 / the reference's power spectrum at the filter's resolution
    segments = x[: len(x) // m * m].reshape(-1, m) if len(x) >= m else x[None, :]
    power = np.mean(np.abs(fft.rfft(segments, m, axis=1)) ** 2, axis=0)
    power += 1e-3 * power.mean() + 1e-20
    precondition = lambda v: fft.irfft(fft.rfft(v, m) / power, m)[:taps]  # noqa: E731
    h = np.zeros(taps, np.float32) if start is None else start.astype(np.float32)
    r = normal(y - forward(h))
    z = precondition(r)
    p, rz = z, r @ z
    for _ in range(iterations):
        ap = normal(forward(p))
        step = rz / max(p @ ap, 1e-30)
        h, r = h + step * p, r - step * ap
        z = precondition(r)
        rz, previous = r @ z, rz
        p = z + (rz / max(previous, 1e-30)) * p
    echo = forward(h)
    return EchoPath(delay, h.astype(np.float32), _leak(y - echo, echo, w, noise_power))


def _leak(residual: np.ndarray, echo: np.ndarray, weights: np.ndarray, noise_power: float) -> float:
    count = len(echo) // BLOCK
    blocks = lambda x: x[: count * BLOCK].reshape(count, BLOCK)  # noqa: E731
    e, p = np.mean(blocks(residual) ** 2, axis=1), np.mean(blocks(echo) ** 2, axis=1)
    used = (blocks(weights).min(axis=1) > 0) & (p > noise_power)
    return float(np.percentile(np.maximum(e[used] - noise_power, 0.0) / p[used], 90)) if used.any() else 1.0
