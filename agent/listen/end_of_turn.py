"""When is the user's turn over? The end-of-turn rule, fed pause lengths by the VAD.

``EndOfTurnJudge.update(pause_ms, audio, tentative)`` is called for every VAD window of a turn
in progress with the length of the current pause (0 while the user speaks), a way to get the
turn's audio so far, and a way to get the turn as it would end now (its span and audio). Three
modes behind that one call:

- ``smart``: at a short pause (``first_check_ms``) the transcript's own evidence is asked first
  (``agent.listen.text_turn``: Whisper on the turn as it would end now, then the chat LLM's
  P(end of message)); P(end) >= ``text_done`` ends the turn at once. Otherwise the end-of-turn
  audio model (Smart Turn, ``agent.listen.turn_model``) is asked: "done" ends the turn;
  "not done" keeps listening — the verdict says ``waiting`` so the UI can show that the agent is
  waiting for the rest — and the model is asked again every ``recheck_ms`` while the pause
  grows. Where the words are an unlikely end (P(end) < ``text_likely``: "... because") the audio
  model's "done" does not end the turn: the models disagree, so the turn ends at a pause of
  ``disputed_max_silence_ms`` (a mid-sentence pause is rarely that long). A pause of
  ``max_silence_ms`` ends the turn whatever the models say, or already ``text_max_silence_ms``
  when the text is a likely end (P(end) >= ``text_likely``). Speech
  that resumes continues the same turn. Without text evidence (no transcriber or no local LLM
  yet, a server LLM) it is the audio model alone.
- ``audio``: the audio model alone (as above without the text).
- ``silence``: a pause of ``end_silence_ms`` ends the turn (the fixed rule; also the fallback
  when the model cannot be loaded).

Stream time decides: no clocks but the pause lengths it is given, so a verdict depends only on
the stream, never on how fast the models ran. Where they run is ``start``'s business
(``agent.listen.turn_jobs``): by default each model call runs inside ``update`` on the caller's
thread when its answer is needed (in turn: text evidence, then Smart Turn only if the text did not
decide). With ``run_in_thread`` the same calls only run earlier and side by side: Whisper starts on
the tentative turn as soon as the pause is as long as the VAD's tail (150 ms, before the check),
and at the check Smart Turn runs while the text evidence finishes, so the check costs the slower of
the two, not their sum. Speech that resumes drops the work of the pause (not yet started:
cancelled; running: its answer is ignored).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from agent.errors import AgentError
from agent.listen.turn_jobs import Job, Start, run_when_asked

if TYPE_CHECKING:
    from agent.listen.text_turn import TextEvidence

TURN_MODES = ("smart", "audio", "silence")

Reason = Literal["speech", "pause", "unfinished", "model", "text", "max_silence", "silence"]
Tentative = Callable[[], "tuple[tuple[int, int], np.ndarray] | None"]


class TurnModel(Protocol):
    def probability(self, audio: np.ndarray) -> float:
        """P(turn complete), 0..1, for 16 kHz float audio of the turn so far."""


class TextJudge(Protocol):
    def evidence(self, span: tuple[int, int], audio: np.ndarray) -> TextEvidence | None:
        """The transcript of the turn as it would end at ``span`` and its P(end of message)."""

    def evidence_later(self, span: tuple[int, int], audio: np.ndarray) -> Callable[[], TextEvidence | None]:
        """``evidence`` as a call to make later (in a worker), for the pause current now."""

    def forget(self) -> None:
        """A new turn or a new pause: spans seen so far are of no use any more."""


@dataclass(frozen=True)
class TurnSettings:
    """End-of-turn rule (milliseconds of pause, i.e. of stream time since the speech stopped)."""

    mode: str = "smart"  # "smart" (text + audio models) | "audio" (audio model alone) | "silence" (fixed pause)
    threshold: float = 0.5  # P(done) at or above which the audio model's answer ends the turn
    text_done: float = 0.2  # P(end of message) from the transcript at or above which the turn ends
    text_likely: float = 0.05  # ... at or above which a pause of text_max_silence_ms ends it
    text_max_silence_ms: int = 1200
    disputed_max_silence_ms: int = 1500  # the audio model said "done", the words an unlikely end
    # Pause before the models are first asked (7 VAD windows of 32 ms). It counts from where the level fell
    # (the VAD's pause_start), which Silero hears ~45 ms later on clean speech and ~90 ms later on the
    # canceller's output in a loud room; 224 ms from the fall checks clean speech where 192 ms from Silero's
    # letting go did. 192 ms from the fall split a paused sentence of benchmarks/turn_end.py's tuning set
    # with no room (19 of 20 whole).
    first_check_ms: int = 224
    recheck_ms: int = 300  # then asked again each time the pause has grown by this much
    max_silence_ms: int = 2000  # a pause this long ends the turn whatever the model says
    end_silence_ms: int = 600  # silence mode (and the fallback without a model): the fixed pause

    def __post_init__(self) -> None:
        if self.mode not in TURN_MODES:
            raise AgentError(f"unknown turn mode {self.mode!r}: use 'smart' (text and audio end-of-turn models), "
                             "'audio' (the audio model alone) or 'silence'")
        if not 0.0 < self.threshold < 1.0:
            raise AgentError(f"turn threshold must be between 0 and 1, got {self.threshold}")
        if self.end_silence_ms < 32:
            raise AgentError(f"end_silence_ms must be at least 32, got {self.end_silence_ms}")
        if not 0.0 < self.text_likely <= self.text_done <= 1.0:
            raise AgentError(f"text end-of-turn thresholds need 0 < likely <= done <= 1 (got {self.text_likely}, "
                             f"{self.text_done})")
        shortest = min(self.max_silence_ms, self.text_max_silence_ms, self.disputed_max_silence_ms)
        if not 0 < self.first_check_ms <= shortest or self.recheck_ms < 32:
            raise AgentError(
                "turn timings: need 0 < first check <= max silence and a re-check of at least 32 ms "
                f"(got {self.first_check_ms}, {self.max_silence_ms}, {self.recheck_ms})"
            )


@dataclass(frozen=True)
class TurnVerdict:
    """What ``update`` decided. ``waiting``: the model judged the user unfinished and we listen on."""

    ended: bool
    reason: Reason
    waiting: bool = False
    probability: float | None = None  # the audio model's latest P(done) in this pause
    model_ms: float | None = None  # wall time of the audio model call made by this update, if any
    text_probability: float | None = None  # the transcript's P(end of message) in this pause
    text_ms: float | None = None  # wall time of the text evidence made by this update (Whisper + LLM), if any


class EndOfTurnJudge:
    """Decides, pause by pause, whether the user's turn is over (see the module docstring).

    ``model`` is the end-of-turn audio model (``SmartTurnModel``) or None; with None, or in
    ``silence`` mode, the fixed-pause rule applies. ``text`` (``TextTurn``, smart mode only; also
    set later with ``use_text``) gives the transcript's evidence. ``start`` runs the model calls
    (``agent.listen.turn_jobs``: ``run_when_asked``, the default, or ``run_in_thread``); the
    verdicts are the same either way. Call ``reset()`` when a turn starts.
    """

    def __init__(self, settings: TurnSettings | None = None, model: TurnModel | None = None,
                 text: TextJudge | None = None, start: Start = run_when_asked) -> None:
        self.settings = settings or TurnSettings()
        self.model = model if self.settings.mode != "silence" else None
        self.start = start
        self._text_job: tuple[tuple[int, int], Job[TextEvidence | None]] | None = None  # (span, its evidence)
        self.text: TextJudge | None = None
        self.use_text(text)
        self.reset()

    def use_text(self, text: TextJudge | None) -> None:
        """Judge with the transcript's evidence from ``text`` too (smart mode with an audio model)."""
        self.text = text if self.settings.mode == "smart" and self.model is not None else None

    @property
    def mode(self) -> str:
        """The rule in force: "smart" (text + audio), "audio", or "silence" (chosen, or no model)."""
        if self.model is None:
            return "silence"
        return "smart" if self.text is not None else "audio"

    @property
    def waiting(self) -> bool:
        """True while a pause goes on after the model judged the user unfinished."""
        return self._waiting

    def reset(self) -> None:
        """A new turn (or a new pause): forget the model's answers and re-check schedule."""
        self._next_check_ms = float(self.settings.first_check_ms)
        self._probability: float | None = None
        self._text: float | None = None  # the transcript's P(end of message) in this pause
        self._asked = False  # a model was asked in this pause
        self._text_asked = False  # the text evidence was had in this pause (the tentative turn existed)
        self._audio_done = False  # the audio model said "done" in this pause, the words did not
        self._waiting = False
        if self._text_job is not None:
            self._text_job[1].cancel()  # started for a pause that is over
        self._text_job = None
        if self.text is not None:
            self.text.forget()

    def update(self, pause_ms: float, audio: Callable[[], np.ndarray],
               tentative: Tentative | None = None) -> TurnVerdict:
        """Verdict for a turn whose current pause is ``pause_ms`` long (0 = speaking).

        ``audio()`` returns the turn's 16 kHz audio so far; it is only called at a check (for the
        audio model). ``tentative()`` returns (span, audio) of the turn as it would end now
        (what a ``speech_end`` would carry), or None; it is only called for the text evidence, which
        starts on its first answer in a pause and is used at the check if the span is still the same.
        """
        s = self.settings
        if pause_ms <= 0:
            if self._asked or self._text_job is not None:  # speech resumed: the next pause is judged afresh
                self.reset()
            return TurnVerdict(False, "speech")
        if self.model is None:
            ended = pause_ms >= s.end_silence_ms
            return TurnVerdict(ended, "silence" if ended else "pause")
        if pause_ms >= self._limit_ms():
            return TurnVerdict(True, "max_silence", probability=self._probability, text_probability=self._text)
        if pause_ms < self._next_check_ms:
            if self._text_job is None and not self._text_asked:
                self._start_text(tentative)
            return TurnVerdict(False, "unfinished" if self._waiting else "pause", self._waiting, self._probability,
                               text_probability=self._text)
        while self._next_check_ms <= pause_ms:  # the schedule, not the call time, sets the next check
            self._next_check_ms += s.recheck_ms
        model, heard = self.model, audio()  # the turn's audio now, on this thread (the buffer moves on)
        audio_job = self.start(lambda: model.probability(heard))  # side by side with the text, if threaded
        text_ms = self._ask_text(tentative) if not self._text_asked else None
        self._asked = True
        if self._text is not None and self._text >= s.text_done:
            self._waiting = False
            audio_job.cancel()  # not needed: its answer (if it was computed) is not used
            return TurnVerdict(True, "text", False, self._probability, None, self._text, text_ms)
        started = time.perf_counter()
        self._probability = audio_job.result()
        model_ms = (time.perf_counter() - started) * 1000
        if self._probability >= s.threshold and (self._text is None or self._text >= s.text_likely):
            self._waiting = False
            return TurnVerdict(True, "model", False, self._probability, model_ms, self._text, text_ms)
        self._audio_done = self._audio_done or self._probability >= s.threshold
        self._waiting = True
        return TurnVerdict(False, "unfinished", True, self._probability, model_ms, self._text, text_ms)

    def _limit_ms(self) -> float:
        """The pause that ends the turn whatever the models say now: shorter where the text is a
        likely end, or where the audio model said "done" but the words did not (they disagree)."""
        s = self.settings
        if self._text is not None and self._text >= s.text_likely:
            return s.text_max_silence_ms
        return s.disputed_max_silence_ms if self._audio_done else s.max_silence_ms

    def _start_text(self, tentative: Tentative | None) -> None:
        """Start the text evidence on the turn as it would end now, as soon as that is known (the
        pause is as long as the VAD's tail); the check then uses it if the turn would still end there."""
        text = self.text
        pending = tentative() if text is not None and tentative is not None else None
        if pending is not None:
            self._text_job = pending[0], self.start(text.evidence_later(*pending))

    def _ask_text(self, tentative: Tentative | None) -> float | None:
        """The transcript's P(end) for this pause into ``_text``; returns the ms this thread waited for
        it (all its compute when it runs here; None: not asked)."""
        pending = tentative() if self.text is not None and tentative is not None else None
        if pending is None:  # no tentative turn yet (a check before the VAD's tail): at the next check
            return None
        text, self._text_asked = self.text, True
        started = time.perf_counter()
        job, self._text_job = self._text_job, None
        if job is None or job[0] != pending[0]:  # none started, or for another span: ask now
            if job is not None:
                job[1].cancel()
            job = pending[0], run_when_asked(text.evidence_later(*pending))
        evidence = job[1].result()
        self._text = evidence.probability if evidence is not None else None
        return (time.perf_counter() - started) * 1000


def build_turn_judge(settings: TurnSettings | None = None, model_path: str | None = None,
                     start: Start | None = None) -> tuple[EndOfTurnJudge, str | None]:
    """A judge for ``settings``; in smart and audio modes it loads the audio model, and when that
    fails returns a silence-rule judge and the one-line notice to show (``None`` when all is well).
    The text evidence is attached later (``use_text``), once the transcriber and the LLM exist.
    Its model calls run in threads (``run_in_thread``) unless ``start`` says otherwise."""
    from agent.listen.turn_jobs import run_in_thread
    from agent.listen.turn_model import try_load_turn_model

    settings = settings or TurnSettings()
    if settings.mode == "silence":
        return EndOfTurnJudge(settings), None
    model, notice = try_load_turn_model(model_path)
    return EndOfTurnJudge(settings, model, start=start or run_in_thread), notice
