"""What the pipeline reports while it runs: plain frozen dataclasses, no UI imports.

The pipeline calls ``emit(event)`` from its own threads; a consumer (the TUI, headless
mode, a test) must hand events over to its own thread before touching UI state.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class AgentState(StrEnum):
    """What the agent is doing right now (shown to the user; ``str(state)`` is the shown text)."""

    LOADING = "loading"
    LISTENING = "listening"
    HEARING = "hearing you"
    WAITING = "waiting for you to finish"  # a pause, but the user seems not finished
    TRANSCRIBING = "transcribing"
    THINKING = "thinking"
    SPEAKING = "speaking"
    STOPPED = "stopped"


@dataclass(frozen=True)
class StateChanged:
    state: AgentState


@dataclass(frozen=True)
class MicLevel:
    """Input level of the latest mic block, about 20 per second."""

    rms_dbfs: float


@dataclass(frozen=True)
class PartialTranscript:
    """What the user has said so far in the turn in progress."""

    text: str


@dataclass(frozen=True)
class UserTurn:
    """A finished user turn (transcribed speech or a typed message)."""

    turn_id: int
    text: str


@dataclass(frozen=True)
class AgentText:
    """One agent sentence as it starts being spoken (or shown, when text-only)."""

    turn_id: int
    text: str


@dataclass(frozen=True)
class AgentTurnDone:
    """The agent's turn is over; ``text`` is what was actually said (all of it unless interrupted)."""

    turn_id: int
    text: str
    interrupted: bool


@dataclass(frozen=True)
class TurnLatency:
    """Milliseconds from the end of the user's speech (or the typed message) to each milestone,
    and the gaps playback had inside the reply's sentences.

    ``None`` when the milestone did not happen (typed message: no transcript; text-only: no audio).
    """

    turn_id: int
    transcript_ms: float | None
    first_token_ms: float | None
    first_audio_ms: float | None
    turn_end_ms: float | None = None  # when the turn was judged over
    underruns: int = 0  # times the speaker ran dry inside a sentence
    underrun_s: float = 0.0  # silence it had to insert there

    def as_record(self) -> dict[str, float | int]:
        """The milestones that happened and the underruns, for ``conversation.json``."""
        record: dict[str, float | int] = {"underruns": self.underruns, "underrun_s": round(self.underrun_s, 3)}
        for name in ("turn_end_ms", "transcript_ms", "first_token_ms", "first_audio_ms"):
            value = getattr(self, name)
            if value is not None:
                record[name] = round(value, 1)
        return record


@dataclass(frozen=True)
class LoadProgress:
    """A model started (done=False) or finished (done=True) loading; stage is "vad", "whisper", "llm", "csm", ..."""

    stage: str
    done: bool


@dataclass(frozen=True)
class AudioSetup:
    """How the microphone is heard: echo cancellation on or off, and the simulated room if any."""

    echo_cancellation: bool
    room: str | None = None


@dataclass(frozen=True)
class Notice:
    """A one-line message for the user with the fix; level is "info", "warning" or "error"."""

    level: str
    message: str


@dataclass(frozen=True)
class ToolUse:
    """A tool the agent called in reply ``turn_id``: ``call`` is ``name(arguments)``; ``output`` is
    None while it runs, then what it returned (or its error, with ``ok`` False)."""

    turn_id: int
    call: str
    output: str | None = None
    ok: bool = True


Event = (
    StateChanged
    | MicLevel
    | PartialTranscript
    | UserTurn
    | AgentText
    | AgentTurnDone
    | TurnLatency
    | LoadProgress
    | AudioSetup
    | Notice
    | ToolUse
)
