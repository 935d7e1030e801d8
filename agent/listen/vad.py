"""Turn-taking: when the user starts speaking and when their turn is over.

Two detectors with one stream interface: ``feed(block) -> list[VadEvent]``.
``VoiceActivityDetector`` runs Silero VAD (the model packaged in ``silero-vad``, on ONNX
Runtime or TorchScript) on 32 ms windows and ends a turn after a pause (a fixed one, or as an
``EndOfTurnJudge`` from ``agent.listen.end_of_turn`` decides); a pause counts from where the level
fell (``agent.listen.pause_start``), which Silero hears a window or more later; ``PushToTalk`` starts
and ends turns on key press and release. A ``speech_end`` event carries the turn's audio, ready for ASR.
Times are seconds of stream audio fed since the detector was made or reset (not wall-clock time).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from agent.audio import PIPELINE_RATE
from agent.errors import AgentError
from agent.listen.end_of_turn import EndOfTurnJudge, TurnVerdict
from agent.listen.pause_start import LevelHistory
from agent.listen.silero import WINDOW, SileroModel, load_silero_model

__all__ = ["PushToTalk", "SileroModel", "VadEvent", "VadSettings", "VoiceActivityDetector",
           "WINDOW", "load_silero_model"]


@dataclass(frozen=True)
class VadEvent:
    """``speech_start`` or ``speech_end`` at ``t`` seconds of stream time.

    ``speech_end`` carries ``audio``: the whole turn (float32, 16 kHz, with a little lead-in
    and tail around the speech) and ``forced`` when it was cut by ``max_speech_s`` or flush.
    For ``speech_end``, ``t`` is where the speech stopped, before the end-of-turn pause, and
    ``ended_t`` where the turn was judged over (``t`` plus the pause that ended it).
    """

    kind: Literal["speech_start", "speech_end"]
    t: float
    audio: np.ndarray | None = field(default=None, repr=False, compare=False)
    forced: bool = False
    ended_t: float | None = None
    span: tuple[int, int] | None = None  # speech_end: the stream samples ``audio`` covers


    @property
    def duration_s(self) -> float:
        return 0.0 if self.audio is None else len(self.audio) / PIPELINE_RATE


@dataclass(frozen=True)
class VadSettings:
    """Tuning for ``VoiceActivityDetector`` (milliseconds unless named otherwise)."""

    threshold: float = 0.5  # speech probability that starts/continues speech
    end_silence_ms: int = 600  # pause that ends a turn (the hangover)
    min_speech_ms: int = 200  # shorter bursts (clicks, coughs) are not a turn
    lead_in_ms: int = 200  # audio kept before the detected start (soft onsets)
    tail_ms: int = 150  # audio kept after the detected end
    max_speech_s: float = 30.0  # a turn longer than this is cut (and a new one begins)
    # A pause counts from where the level fell, up to this far before the window the model first
    # called silence (agent.listen.pause_start); 0 = from that window, as the model hears it.
    pause_lookback_ms: int = 192

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise AgentError(f"VAD threshold must be between 0 and 1, got {self.threshold}")
        if self.end_silence_ms < 32 or self.min_speech_ms < 0 or self.max_speech_s <= 0 or self.pause_lookback_ms < 0:
            raise AgentError("VAD timings must be positive (end-of-turn pause at least 32 ms)")


class _TurnBuffer:
    """The current turn's audio, plus recent history so a turn can start a little in the past."""

    def __init__(self, lead_in: int, history: int) -> None:
        self.lead_in, self.history = lead_in, history
        self.clear()

    def clear(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._start = 0  # stream sample of the first sample held
        self._len = 0
        self._recording = False

    @property
    def start(self) -> int:
        """Stream sample of the first sample held."""
        return self._start

    def push(self, samples: np.ndarray) -> None:
        self._chunks.append(samples)
        self._len += len(samples)
        if not self._recording:  # idle: keep only enough history for a late-confirmed start
            while self._chunks and self._len - len(self._chunks[0]) >= self.history:
                n = len(self._chunks.pop(0))
                self._len -= n
                self._start += n

    def begin(self, start_sample: int) -> None:
        """Record a turn from stream sample ``start_sample`` minus the lead-in."""
        keep_from = max(self._start, start_sample - self.lead_in)
        audio = self.audio()[keep_from - self._start :]
        self._chunks, self._len, self._start = [audio], len(audio), keep_from
        self._recording = True

    def end(self, end_sample: int) -> np.ndarray:
        """Stop recording at stream sample ``end_sample``; returns the turn's audio."""
        audio = self.audio()
        cut = max(0, min(len(audio), end_sample - self._start))
        rest = audio[cut:]  # stays as history for the next turn's lead-in
        self._chunks, self._len, self._start = [rest], len(rest), self._start + cut
        self._recording = False
        return audio[:cut]

    def audio(self) -> np.ndarray:
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)


class VoiceActivityDetector:
    """Silero VAD over a 16 kHz stream: speech_start once speech lasts ``min_speech_ms``,
    speech_end (with the turn's audio) after ``end_silence_ms`` of pause.

    With ``end_of_turn`` (an ``EndOfTurnJudge``) the judge decides which pause ends a turn
    instead of ``end_silence_ms``: it is asked on every window of a turn with the current pause
    length, and its latest verdict is ``last_verdict`` (``waiting`` = judged unfinished).

    Not thread-safe: feed it from one thread (the capture loop). The detector owns its
    ``SileroModel`` (recurrent state included) and its judge: give each detector its own.
    """

    sample_rate = PIPELINE_RATE

    def __init__(self, settings: VadSettings | None = None, *, model: SileroModel | None = None,
                 end_of_turn: EndOfTurnJudge | None = None) -> None:
        self.settings = settings or VadSettings()
        self._model = model if model is not None else load_silero_model()
        self.end_of_turn = end_of_turn
        s = self.settings
        self._end_silence = s.end_silence_ms * PIPELINE_RATE // 1000
        self._min_speech = s.min_speech_ms * PIPELINE_RATE // 1000
        self._tail = s.tail_ms * PIPELINE_RATE // 1000
        self._max_speech = int(s.max_speech_s * PIPELINE_RATE)
        lead_in = s.lead_in_ms * PIPELINE_RATE // 1000
        self._buffer = _TurnBuffer(lead_in, lead_in + self._min_speech + 2 * WINDOW)
        lookback = s.pause_lookback_ms * PIPELINE_RATE // 1000
        self._levels = LevelHistory(lookback) if lookback else None
        self.reset()

    def reset(self) -> None:
        """Forget the model state, any turn in progress, and restart the clock at 0 s."""
        self._model.reset()
        self._pending = np.zeros(0, np.float32)
        self._pos = 0  # stream samples run through the model
        self._buffer.clear()
        if self._levels is not None:
            self._levels.reset()
        self._candidate: int | None = None  # stream sample where unconfirmed speech began
        self._speaking = False
        self._start = 0
        self._silence_from: int | None = None  # first sample of the current pause
        self.last_probability = 0.0
        self.last_verdict: TurnVerdict | None = None
        if self.end_of_turn is not None:
            self.end_of_turn.reset()

    @property
    def speaking(self) -> bool:
        """True between a speech_start and its speech_end."""
        return self._speaking

    @property
    def time_s(self) -> float:
        """Stream time reached so far, in seconds."""
        return self._pos / PIPELINE_RATE

    @property
    def pause_ms(self) -> float:
        """Length of the current pause inside a turn (0 while speaking or between turns), ms."""
        if not self._speaking or self._silence_from is None:
            return 0.0
        return (self._pos - self._silence_from) * 1000 / PIPELINE_RATE

    def current_audio(self) -> np.ndarray:
        """Audio of the turn in progress (for a partial transcript); empty when not speaking."""
        return self._buffer.audio() if self._speaking else np.zeros(0, np.float32)

    def feed(self, block: np.ndarray) -> list[VadEvent]:
        """Run the detector over a block of float32 16 kHz samples (any length)."""
        self._pending = np.concatenate([self._pending, np.asarray(block, dtype=np.float32).reshape(-1)])
        events: list[VadEvent] = []
        n = len(self._pending) // WINDOW
        if n == 0:
            return events
        windows = self._pending[: n * WINDOW].reshape(n, WINDOW)
        self._pending = self._pending[n * WINDOW :]
        for window in windows:
            probability = self._model.probability(window)
            self._buffer.push(window)
            self._pos += WINDOW
            if self._levels is not None:
                self._levels.push(window, self._pos)
            events.extend(self._step(probability))
        return events

    def flush(self) -> list[VadEvent]:
        """End the stream: a turn still in progress ends now (``forced``)."""
        if not self._speaking:
            self._candidate = None
            return []
        end = self._silence_from if self._silence_from is not None else self._pos
        return [self._end_turn(end, forced=True)]

    def _step(self, probability: float) -> list[VadEvent]:
        self.last_probability = probability
        s = self.settings
        window_start = self._pos - WINDOW
        is_speech = probability >= s.threshold
        is_silence = probability < s.threshold - 0.15  # hysteresis: in between keeps the state
        if not self._speaking:
            if is_speech and self._candidate is None:
                self._candidate = window_start
            elif is_silence:
                self._candidate = None
            if self._candidate is not None and self._pos - self._candidate >= max(self._min_speech, WINDOW):
                self._speaking, self._start, self._silence_from = True, self._candidate, None
                self._candidate = None
                self._buffer.begin(self._start)
                self._new_turn()
                return [VadEvent("speech_start", self._start / PIPELINE_RATE)]
            return []
        if is_speech:
            self._silence_from = None
        elif is_silence and self._silence_from is None:
            fell = self._levels.pause_start(window_start) if self._levels is not None else window_start
            self._silence_from = max(self._start, fell)
        if self._pause_ends_turn():
            return [self._end_turn(self._silence_from)]
        if self._pos - self._start >= self._max_speech:
            event = self._end_turn(self._pos, forced=True)
            # The user is still talking: what follows is a new turn.
            self._speaking, self._start, self._silence_from = True, self._pos, None
            self._buffer.begin(self._pos)
            self._new_turn()
            return [event, VadEvent("speech_start", self._pos / PIPELINE_RATE)]
        return []

    def _pause_ends_turn(self) -> bool:
        """Whether the current pause (if any) ends the turn: the judge's call, or end_silence_ms."""
        if self.end_of_turn is None:
            return self._silence_from is not None and self._pos - self._silence_from >= self._end_silence
        self.last_verdict = self.end_of_turn.update(self.pause_ms, self._buffer.audio, self.audio_if_ended_now)
        return self.last_verdict.ended

    def _new_turn(self) -> None:
        self.last_verdict = None
        if self.end_of_turn is not None:
            self.end_of_turn.reset()

    @property
    def speech_s(self) -> float:
        """Seconds from the start of the turn in progress to the end of its speech so far (a pause
        going on now is not counted); 0 between turns."""
        if not self._speaking:
            return 0.0
        end = self._silence_from if self._silence_from is not None else self._pos
        return (end - self._start) / PIPELINE_RATE

    def audio_if_ended_now(self) -> tuple[tuple[int, int], np.ndarray] | None:
        """In a pause longer than the tail: the span and audio a ``speech_end`` now would carry.

        Lets the turn's transcription start during the pause; the ``span`` of the real
        ``speech_end`` says whether it covers the same audio. None while speaking or between turns.
        """
        if not self._speaking or self._silence_from is None or self._pos < self._silence_from + self._tail:
            return None
        start, end = self._buffer.start, self._silence_from + self._tail
        return (start, end), self._buffer.audio()[: end - start].copy()

    def _end_turn(self, speech_end: int, *, forced: bool = False) -> VadEvent:
        """End the turn whose speech stopped at stream sample ``speech_end`` (audio gets the tail)."""
        start, end = self._buffer.start, min(self._pos, speech_end + self._tail)
        audio = self._buffer.end(end)
        self._speaking, self._silence_from = False, None
        return VadEvent("speech_end", speech_end / PIPELINE_RATE, audio, forced, self._pos / PIPELINE_RATE,
                        (start, end))


class PushToTalk:
    """Turns by key: press starts a turn, release ends it; same stream interface as the VAD.

    ``press()`` and ``release()`` may be called from any thread (the UI); the events come out
    of the next ``feed()``, in stream time, so one thread consumes all events.
    """

    sample_rate = PIPELINE_RATE

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pressed = False
        self.reset()

    def press(self) -> None:
        with self._lock:
            self._pressed = True

    def release(self) -> None:
        with self._lock:
            self._pressed = False

    def reset(self) -> None:
        """Forget any turn in progress and restart the clock at 0 s (the key state is kept)."""
        self._pos = 0
        self._speaking = False
        self._turn: list[np.ndarray] = []
        self._start = 0

    @property
    def speaking(self) -> bool:
        return self._speaking

    @property
    def time_s(self) -> float:
        return self._pos / PIPELINE_RATE

    def current_audio(self) -> np.ndarray:
        return np.concatenate(self._turn) if self._speaking and self._turn else np.zeros(0, np.float32)

    def feed(self, block: np.ndarray) -> list[VadEvent]:
        """Record the block into the turn while the key is held; report press/release edges."""
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        with self._lock:
            pressed = self._pressed
        events: list[VadEvent] = []
        if pressed and not self._speaking:
            self._speaking, self._start, self._turn = True, self._pos, []
            events.append(VadEvent("speech_start", self._pos / PIPELINE_RATE))
        elif not pressed and self._speaking:
            events.append(self._end(forced=False))
        if self._speaking:
            self._turn.append(block)
        self._pos += len(block)
        return events

    def flush(self) -> list[VadEvent]:
        """End the stream: a turn still held ends now (``forced``)."""
        return [self._end(forced=True)] if self._speaking else []

    def _end(self, *, forced: bool) -> VadEvent:
        audio = np.concatenate(self._turn) if self._turn else np.zeros(0, np.float32)
        self._speaking, self._turn = False, []
        t = self._pos / PIPELINE_RATE
        return VadEvent("speech_end", t, audio, forced, t)

