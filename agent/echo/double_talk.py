"""Double talk: is a person talking over the agent, and what did they say?

AEC3 (``agent.echo.canceller``) removes the agent's voice from the microphone well, but while the agent is
audible it also suppresses much of the user's: Silero VAD on its output misses a user who talks
over a loud reply, and Whisper loses the first words. ``DoubleTalk`` wraps the canceller and
keeps a second, linear model of the echo on the side:

- the echo path: a 0.4 s FIR from the far-end reference (what AEC3 was handed, in step with the
  microphone) to the RAW microphone, fitted by least squares (conjugate gradients with FFT
  products) over the last seconds of echo-only audio, on a worker thread, refitted as the agent
  goes on talking. Rooms are nearly linear and time-invariant, so this model removes 30+ dB of
  echo without touching the user's voice (AEC3's suppressor is what eats the user).
- detection: while the agent's voice is in the mic (``far_end_active``: the predicted echo is
  above the noise floor), the user is talking when the mic minus the predicted echo stands
  ``margin_db`` above what is left of the echo in echo-only audio (the noise floor plus the
  model's leak, at least ``leak_floor_db``, times the predicted echo) for ``onset_blocks`` blocks
  in a row, unless the residual is the predicted echo turned over (echo that did not arrive: a
  glitch), and Silero VAD on that residual says speech (``residual_vad_threshold``): what the
  model leaves of a loud broadband or tonal agent voice (the tiny CSM's babble, noise, chords)
  can stand 20 dB over the expected leak at 1x for a block or two, but it is not shaped like a
  voice; it ends after ``hangover_blocks`` blocks below. Elsewhere Silero VAD on the cleaned
  signal decides. Before the first fit (the first ~2.3 s the agent ever speaks) a voice over the
  agent is not detected.
- ``recover(start, end)``: refits the echo path on the echo-only seconds before ``start`` and
  returns the raw microphone minus its prediction: the user's words as spoken, for Whisper.

Samples are counted on the cleaned stream that ``process`` returns (the one the VAD and the turn
logic see); the raw microphone is ``canceller.latency_ms`` ahead of it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from agent.audio import PIPELINE_RATE
from agent.echo.echo_path import EchoPath, fit_echo_path
from agent.errors import AgentError
from agent.listen.silero import SileroStream
from agent.listen.vad import SileroModel, load_silero_model

USER, FAR = 1, 2  # per-sample flags in the history: the user was heard / the agent's voice was in the mic


@dataclass(frozen=True)
class DoubleTalkSettings:
    """Tuning for ``DoubleTalk`` (seconds unless named otherwise)."""

    history_s: float = 30.0  # raw and cleaned mic, reference and flags kept for recover() (6.2 MB)
    echo_path_s: float = 0.4  # FIR length: the reverberation modelled after the direct sound
    max_delay_s: float = 0.5  # the longest reference -> mic delay searched for
    first_fit_s: float = 2.0  # far-end audio heard before the first fit
    refit_s: float = 2.0  # more echo-only far-end audio before the next fit
    fit_window_s: float = 5.0  # audio a fit looks at (ending now, or at recover's start)
    fit_iterations: int = 40  # conjugate-gradient steps of the first fit (~4 ms each on 5 s)
    refit_iterations: int = 15  # of later fits and recover(), which start from the last fit
    install_blocks: int = 8  # a fit started at block k is used from block k + this (deterministic)
    margin_db: float = 9.0  # linear residual above the expected residual echo: a person
    leak_floor_db: float = -25.0  # expect at least this much of the echo left (fits on 2-3 s look better
    # on their own audio than on the next seconds: up to 16 dB better, measured)
    onset_blocks: int = 3  # blocks over the margin in a row that start speech
    hangover_blocks: int = 8  # blocks under it in a row that end it
    vad_threshold: float = 0.5  # Silero probability (outside playback)
    residual_vad_threshold: float = 0.3  # Silero probability on the linear residual (during playback)

    def __post_init__(self) -> None:
        if self.history_s < self.fit_window_s + 1 or self.first_fit_s <= self.echo_path_s:
            raise AgentError("DoubleTalkSettings: history_s must exceed fit_window_s by 1 s and first_fit_s "
                             "must exceed echo_path_s")


class _History:
    """A ring buffer on an absolute sample index: ``write`` appends, ``read`` copies a span (zeros
    outside what it still holds)."""

    def __init__(self, capacity: int, dtype) -> None:
        self.capacity = capacity
        self._data = np.zeros(capacity, dtype)
        self.end = 0  # absolute index one past the newest sample

    def write(self, samples: np.ndarray) -> None:
        samples = samples[-self.capacity :]
        at = self.end % self.capacity
        head = min(len(samples), self.capacity - at)
        self._data[at : at + head] = samples[:head]
        self._data[: len(samples) - head] = samples[head:]
        self.end += len(samples)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.zeros(max(0, stop - start), self._data.dtype)
        a, hi = max(start, self.end - self.capacity, 0), min(stop, self.end)
        while a < hi:  # at most two pieces
            b = min(hi, a + self.capacity - a % self.capacity)
            out[a - start : b - start] = self._data[a % self.capacity : a % self.capacity + b - a]
            a = b
        return out


class DoubleTalk:
    """The echo canceller plus a linear echo model: who is talking, and the user's audio back
    (see the module doc). Feed 16 kHz blocks through ``process``; read ``user_speaking`` and
    ``far_end_active`` after each."""

    def __init__(self, canceller, sample_rate: int = PIPELINE_RATE, *, settings: DoubleTalkSettings | None = None,
                 vad: SileroModel | None = None) -> None:
        if sample_rate != PIPELINE_RATE:
            raise AgentError(f"DoubleTalk takes {PIPELINE_RATE} Hz microphone blocks, got {sample_rate} Hz: "
                             "resample the microphone first")
        self.canceller = canceller
        self.settings = s = settings or DoubleTalkSettings()
        self.vad = vad or load_silero_model()
        self._voice = SileroStream(self.vad)  # on the canceller's output
        self._residual_voice = SileroStream(load_silero_model())  # its own recurrent state: mic minus predicted echo
        capacity = int(s.history_s * PIPELINE_RATE)
        self._raw, self._reference = _History(capacity, np.float32), _History(capacity, np.float32)
        self._cleaned, self._flags = _History(capacity, np.float32), _History(capacity, np.uint8)
        self._taps = int(s.echo_path_s * PIPELINE_RATE)
        self._lock = threading.Lock()  # the histories: written by process(), read by recover()
        self._detach = canceller.add_reference_listener(self._add_reference) if canceller.enabled else None
        self._path: EchoPath | None = None
        self._fit: tuple[int, Future] | None = None  # (block at which to install, the running fit)
        self._workers = ThreadPoolExecutor(1, thread_name_prefix="echo-path-fit")
        self._closed = False
        self._blocks = 0
        self._far_heard = 0  # echo-only far-end samples since the last fit
        self._noise: list[float] = []  # recent residual block powers (the noise floor is their low end)
        self._noise_power = 1e-10  # their 20th percentile
        self._over = self._under = 0
        self.user_speaking = self.far_end_active = False
        self.residual_db: float | None = None  # last block: mic minus predicted echo over the residual expected

    @property
    def latency_samples(self) -> int:
        """How far the cleaned stream lags the raw microphone (samples)."""
        return int(round(self.canceller.latency_ms * PIPELINE_RATE / 1000))

    @property
    def echo_path(self) -> EchoPath | None:
        """The echo model in use (None before the first fit or without a canceller)."""
        return self._path

    def process(self, block: np.ndarray) -> np.ndarray:
        """Clean one 16 kHz block with the canceller and update ``user_speaking`` / ``far_end_active``."""
        block = np.asarray(block, np.float32).reshape(-1)
        cleaned = self.canceller.process(block)
        with self._lock:
            start = self._raw.end
            self._raw.write(block)
            self._install_fit()
            residual, echo = self._residual(start, len(block))
            reference_heard = self._reference_heard(start)
        if not self.user_speaking and (echo is not None or not reference_heard):  # the noise floor, or near it
            self._noise = (self._noise + [float(np.mean(residual**2))])[-100:]
            self._noise_power = float(np.percentile(self._noise, 20))
        if echo is not None:  # the model says how long the echo lasts
            self.far_end_active = float(np.mean(echo**2)) > self._noise_power
        else:  # without a model, for as long as it could
            self.far_end_active = reference_heard
        settings = self.settings
        voice = self._voice.feed(cleaned) >= settings.vad_threshold  # fed every block: Silero is recurrent
        residual_speech = echo is not None and self._residual_voice.feed(residual) >= settings.residual_vad_threshold
        self.residual_db = None
        if self.far_end_active:  # with no model yet, a voice over the agent cannot be told from its echo
            voice = echo is not None and self._louder_than_echo(residual, echo) and residual_speech
        self._decide(voice)
        flags = (USER if self.user_speaking else 0) | (FAR if self.far_end_active else 0)
        with self._lock:
            self._flags.write(np.full(len(block), flags, np.uint8))
            self._cleaned.write(cleaned)
            if self.far_end_active and not self.user_speaking:
                self._far_heard += len(block)
            self._maybe_fit()
        self._blocks += 1
        return cleaned

    def recover(self, start_sample: int, end_sample: int) -> np.ndarray:
        """The user's speech over ``[start_sample, end_sample)`` of the cleaned stream (16 kHz float32):
        the raw microphone minus the echo predicted by an echo path fitted just before it; the raw
        microphone where nothing was played; the cleaned signal itself where the agent has not yet
        spoken long enough (``first_fit_s``) for an echo path."""
        lag = self.latency_samples
        start, end = start_sample - lag, end_sample - lag
        with self._lock:
            raw = self._raw.read(start, end)
            if not self._reference.read(start - self._span(), end).any():
                return raw  # no far end to take out
            job = self._fit_job(start - int(self.settings.fit_window_s * PIPELINE_RATE), start, self._path)
            reference = self._reference.read(start - self._span(), end)
            if job is None and self._path is None:
                return self._cleaned.read(start_sample, end_sample)
        path = fit_echo_path(*job[0], **job[1]) if job is not None else self._path
        return raw - path.predict(reference[self._span() - path.history :])

    def close(self) -> None:
        """Stop listening to the canceller's reference, stop the fitting thread, close the canceller.
        A block processed after this is still cleaned, with the last echo path (no new fits)."""
        with self._lock:
            self._closed = True
        if self._detach is not None:
            self._detach()
            self._detach = None
        self._workers.shutdown(wait=True)
        self.canceller.close()

    # -- detection

    def _add_reference(self, frame: np.ndarray) -> None:
        with self._lock:  # called by the canceller inside process(), outside the lock
            self._reference.write(frame)

    def _residual(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        raw = self._raw.read(start, start + n)
        if self._path is None:
            return raw, None
        echo = self._path.predict(self._reference.read(start - self._path.history, start + n))
        return raw - echo, echo

    def _louder_than_echo(self, residual: np.ndarray, echo: np.ndarray) -> bool:
        leak = max(self._path.leak, 10 ** (self.settings.leak_floor_db / 10))
        power, echo_power = float(np.mean(residual**2)), float(np.mean(echo**2))
        self.residual_db = 10 * np.log10(max(power, 1e-20) / (self._noise_power + leak * echo_power))
        # A residual that is the predicted echo turned over is echo that did not come (a glitch), not a voice.
        missing = float(residual @ echo) < -0.5 * np.sqrt(power * echo_power) * len(echo)
        return self.residual_db > self.settings.margin_db and not missing

    def _decide(self, person: bool) -> None:
        self._over, self._under = (self._over + 1, 0) if person else (0, self._under + 1)
        if not self.user_speaking and self._over >= self.settings.onset_blocks:
            self.user_speaking = True
        elif self.user_speaking and self._under >= self.settings.hangover_blocks:
            self.user_speaking = False

    def _reference_heard(self, start: int) -> bool:
        # Something played within the longest delay plus the modelled reverberation: it may be in the mic.
        return bool(self._reference.read(start - self._span(), self._raw.end).any())

    def _span(self) -> int:
        return int(self.settings.max_delay_s * PIPELINE_RATE) + self._taps

    # -- fitting the echo path

    def _maybe_fit(self) -> None:
        s = self.settings
        due = s.first_fit_s if self._path is None else s.refit_s
        if self._fit is None and not self._closed and self._far_heard >= due * PIPELINE_RATE:
            end = self._raw.end
            job = self._fit_job(end - int(s.fit_window_s * PIPELINE_RATE), end, self._path)
            if job is not None:
                self._fit = (self._blocks + s.install_blocks, self._workers.submit(fit_echo_path, *job[0], **job[1]))
                self._far_heard = 0

    def _install_fit(self) -> None:
        if self._fit is not None and self._blocks >= self._fit[0]:
            self._path, self._fit = self._fit[1].result(), None

    def _fit_job(self, start: int, end: int, previous: EchoPath | None) -> tuple[tuple, dict] | None:
        """What fitting the echo path on ``[start, end)`` of the raw mic needs (copies: it may run on
        a thread), or None where it holds less than ``first_fit_s`` of echo-only audio."""
        span = self._span()
        start = max(start, self._raw.end - self._raw.capacity + span, span)
        flags = self._flags.read(start - span, end)
        # Rows where a person was heard (and 0.25 s before: onsets are detected late) teach the wrong thing.
        count = np.concatenate([[0], np.cumsum((flags & USER) > 0)])  # user samples before each index
        ahead = np.minimum(np.arange(len(flags)) + PIPELINE_RATE // 4, len(flags))
        weights = ((count[ahead] == count[:-1]) & (flags & FAR > 0)).astype(np.float32)
        weights[:span] = 0.0
        if weights.sum() < self.settings.first_fit_s * PIPELINE_RATE:
            return None
        reference, mic = self._reference.read(start - span, end), self._raw.read(start - span, end)
        s = self.settings
        return (reference, mic, weights), dict(taps=self._taps, max_delay=int(s.max_delay_s * PIPELINE_RATE),
                                                iterations=s.fit_iterations, previous=previous,
                                                warm_iterations=s.refit_iterations, noise_power=self._noise_power)
