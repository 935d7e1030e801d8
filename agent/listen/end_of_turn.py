"""When is the user's turn over? The end-of-turn rule, fed pause lengths by the VAD.

``EndOfTurnJudge.update(pause_ms, audio)`` is called for every VAD window of a turn in
progress with the length of the current pause (0 while the user speaks) and a way to get the
turn's audio so far. Two modes behind that one call:

- ``smart``: at a short pause (``first_check_ms``) ask the end-of-turn model (Smart Turn,
  ``agent.listen.turn_model``). "Done" ends the turn at once; "not done" keeps listening — the verdict
  says ``waiting`` so the UI can show that the agent is waiting for the rest — and the model
  is asked again every ``recheck_ms`` while the pause grows; a pause of ``max_silence_ms``
  ends the turn whatever the model says. Speech that resumes continues the same turn.
- ``silence``: a pause of ``end_silence_ms`` ends the turn (the fixed rule; also the fallback
  when the model cannot be loaded).

Pure and thread-free: no clocks but the pause lengths it is given (stream time), no threads.
The model runs inside ``update`` on the caller's thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import numpy as np

from agent.errors import AgentError

TURN_MODES = ("smart", "silence")

Reason = Literal["speech", "pause", "unfinished", "model", "max_silence", "silence"]


class TurnModel(Protocol):
    def probability(self, audio: np.ndarray) -> float:
        """P(turn complete), 0..1, for 16 kHz float audio of the turn so far."""


@dataclass(frozen=True)
class TurnSettings:
    """End-of-turn rule (milliseconds of pause, i.e. of stream time since the speech stopped)."""

    mode: str = "smart"  # "smart" (end-of-turn model) | "silence" (fixed pause)
    threshold: float = 0.5  # P(done) at or above which the model's answer ends the turn
    first_check_ms: int = 192  # pause before the model is first asked (6 VAD windows of 32 ms)
    recheck_ms: int = 300  # then asked again each time the pause has grown by this much
    max_silence_ms: int = 2000  # a pause this long ends the turn whatever the model says
    end_silence_ms: int = 600  # silence mode (and the fallback without a model): the fixed pause

    def __post_init__(self) -> None:
        if self.mode not in TURN_MODES:
            raise AgentError(f"unknown turn mode {self.mode!r}: use 'smart' (end-of-turn model) or 'silence'")
        if not 0.0 < self.threshold < 1.0:
            raise AgentError(f"turn threshold must be between 0 and 1, got {self.threshold}")
        if self.end_silence_ms < 32:
            raise AgentError(f"end_silence_ms must be at least 32, got {self.end_silence_ms}")
        if not 0 < self.first_check_ms <= self.max_silence_ms or self.recheck_ms < 32:
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
    probability: float | None = None  # the model's latest P(done) in this pause
    model_ms: float | None = None  # wall time of the model call made by this update, if any


class EndOfTurnJudge:
    """Decides, pause by pause, whether the user's turn is over (see the module docstring).

    ``model`` is the end-of-turn model (``SmartTurnModel``) or None; with None, or in
    ``silence`` mode, the fixed-pause rule applies. Call ``reset()`` when a turn starts.
    """

    def __init__(self, settings: TurnSettings | None = None, model: TurnModel | None = None) -> None:
        self.settings = settings or TurnSettings()
        self.model = model if self.settings.mode == "smart" else None
        self.reset()

    @property
    def mode(self) -> str:
        """The rule in force: "smart", or "silence" (chosen, or no model)."""
        return "smart" if self.model is not None else "silence"

    @property
    def waiting(self) -> bool:
        """True while a pause goes on after the model judged the user unfinished."""
        return self._waiting

    def reset(self) -> None:
        """A new turn (or a new pause): forget the model's answers and re-check schedule."""
        self._next_check_ms = float(self.settings.first_check_ms)
        self._probability: float | None = None
        self._waiting = False

    def update(self, pause_ms: float, audio: Callable[[], np.ndarray]) -> TurnVerdict:
        """Verdict for a turn whose current pause is ``pause_ms`` long (0 = speaking).

        ``audio()`` returns the turn's 16 kHz audio so far; it is only called when the model
        is asked.
        """
        s = self.settings
        if pause_ms <= 0:
            if self._probability is not None:  # speech resumed: the next pause is judged afresh
                self.reset()
            return TurnVerdict(False, "speech")
        if self.model is None:
            ended = pause_ms >= s.end_silence_ms
            return TurnVerdict(ended, "silence" if ended else "pause")
        if pause_ms >= s.max_silence_ms:
            return TurnVerdict(True, "max_silence", probability=self._probability)
        if pause_ms < self._next_check_ms:
            return TurnVerdict(False, "unfinished" if self._waiting else "pause", self._waiting, self._probability)
        while self._next_check_ms <= pause_ms:  # the schedule, not the call time, sets the next check
            self._next_check_ms += s.recheck_ms
        started = time.perf_counter()
        self._probability = self.model.probability(audio())
        model_ms = (time.perf_counter() - started) * 1000
        if self._probability >= s.threshold:
            self._waiting = False
            return TurnVerdict(True, "model", False, self._probability, model_ms)
        self._waiting = True
        return TurnVerdict(False, "unfinished", True, self._probability, model_ms)


def build_turn_judge(settings: TurnSettings | None = None, model_path: str | None = None) -> tuple[EndOfTurnJudge, str | None]:
    """A judge for ``settings``; in smart mode it loads the model, and when that fails returns a
    silence-rule judge and the one-line notice to show (``None`` when all is well)."""
    from agent.listen.turn_model import try_load_turn_model

    settings = settings or TurnSettings()
    if settings.mode != "smart":
        return EndOfTurnJudge(settings), None
    model, notice = try_load_turn_model(model_path)
    return EndOfTurnJudge(settings, model), notice
