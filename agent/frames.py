"""Typed items that move between the agent's stages.

Frames come in three tiers (pipecat's model, written for our stages):

- ``SystemFrame``: never cancelled; ``Stop`` ends a stage's loop.
- ``ControlFrame``: delivered even when its reply was cancelled, because it closes something
  (``EndOfReply`` makes the voice stage record what was said, interrupted or not).
- ``DataFrame``: work to do. A ``ReplyFrame`` belongs to one agent reply; once that reply is
  cancelled (barge-in, the interrupt key) every stage drops it unprocessed. This is done once,
  in ``agent.stages.base.Stage``, not by checks in each loop.

A ``Reply`` is the handle of one agent reply in flight: its cancel signal, its timing milestones
and what has been said. The think stage makes it; the voice stage fills in what was spoken and
marks it done. Frames are frozen; the Reply they point to is the reply's shared record.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the synthesis module pulls in torch types only for annotations
    from agent.listen.asr import Transcript
    from agent.speak.synthesis import SpokenSentence


class Frame:
    """Anything that moves between stages."""


class SystemFrame(Frame):
    """Never cancelled by an interruption."""


class ControlFrame(Frame):
    """Delivered even when the reply it belongs to was cancelled."""


class DataFrame(Frame):
    """Work to do; dropped unprocessed when the reply it belongs to is cancelled."""


@dataclass
class Reply:
    """One agent reply in flight: its cancel signal, its milestones, the sentences started."""

    turn_id: int
    t0: float  # monotonic time the user's turn ended (latencies count from here)
    transcript_ms: float | None = None
    turn_end_ms: float | None = None  # end of speech -> the turn judged over
    replay: bool = False  # replaying the last turn's audio: nothing new is recorded
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    started_at: float = field(default_factory=time.time)
    first_token_ms: float | None = None
    first_audio_ms: float | None = None
    shown: list[str] = field(default_factory=list)  # the LLM's sentences, as written
    spoken: list[SpokenSentence] = field(default_factory=list)  # one per started sentence
    sink_start: int = 0  # sink.played_samples when the reply's first chunk was queued
    wrote_audio: bool = False
    underruns_at_start: tuple[int, float] | None = None  # the sink's (underruns, underrun_s) then
    tools: list[dict] = field(default_factory=list)  # tool calls made for this reply and their results

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def since_start_ms(self) -> float:
        """Milliseconds since the user's turn ended."""
        return (time.monotonic() - self.t0) * 1000


# ---- system ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stop(SystemFrame):
    """The pipeline is stopping: finish what must be finished and end the loop."""


# ---- capture -> turn -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioBlock(DataFrame):
    """One 16 kHz microphone block, echo-cancelled, and what the capture stage knew about it."""

    audio: np.ndarray = field(repr=False, compare=False)
    captured_at: float  # monotonic time the block was read (its last sample had just been heard)
    user_over_echo: bool = False  # the double-talk detector heard a person (over the agent's voice or not)
    agent_audible: bool = False  # the agent's voice was in the mic: only that detector can tell a person


@dataclass(frozen=True)
class EndOfAudio(ControlFrame):
    """The source has ended (end of the mic file, or the microphone was stopped)."""


# ---- turn -> transcribe ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechSegment(DataFrame):
    """A finished user turn: 16 kHz float32 audio and when it happened."""

    audio: np.ndarray = field(repr=False, compare=False)
    t0: float  # monotonic time the speech ended (latencies count from here)
    started_at: float  # wall-clock times of the speech
    ended_at: float
    turn_end_ms: float | None = None  # end of speech -> the turn judged over
    span: tuple[int, int] | None = None  # the stream samples ``audio`` covers
    over_reply: bool = False  # spoken while a reply played: backchannel or barge-in, by its words
    # The turn began over the agent's voice (its audio has the echo under it): the capture-stream
    # sample from which the user may be heard, before ``span`` where the double-talk detector heard
    # the voice ahead of the VAD (which hears the echo-cancelled audio). None: not over the agent.
    over_agent_from: int | None = None


@dataclass(frozen=True)
class TentativeSpeech(DataFrame):
    """The turn as it would end now (a pause has begun): transcribe it ahead, in case it does.
    ``transcript``: already made (by the end-of-turn judge); ``early``: start the reply on it."""

    audio: np.ndarray = field(repr=False, compare=False)
    span: tuple[int, int]
    transcript: Transcript | None = None
    early: bool = False


@dataclass(frozen=True)
class PartialAudio(DataFrame):
    """The turn in progress so far (16 kHz), for a partial transcript on screen."""

    audio: np.ndarray = field(repr=False, compare=False)


# ---- transcribe / typed -> think ------------------------------------------------------------------


@dataclass(frozen=True)
class UserInput(DataFrame):
    """A finished user turn on its way to the LLM (transcribed speech or a typed message)."""

    text: str
    audio: np.ndarray | None = field(repr=False, compare=False)  # 16 kHz; None when typed
    t0: float  # monotonic time the turn ended (speech end detected, or message submitted)
    started_at: float
    ended_at: float
    transcript_ms: float | None = None
    typed: bool = False
    turn_end_ms: float | None = None


@dataclass(frozen=True)
class EarlyInput(DataFrame):
    """The user's words at a pause that may not end the turn: the LLM may start on them early."""

    text: str


@dataclass(frozen=True)
class Announcement(DataFrame):
    """Something the agent says unasked (a timer that is due): spoken as a reply of its own."""

    text: str


@dataclass(frozen=True)
class ReplayRequest(DataFrame):
    """Play the last agent turn again (not recorded as a new turn)."""


# ---- think -> voice ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplyFrame(DataFrame):
    """A data frame that belongs to one agent reply (dropped once that reply is cancelled)."""

    reply: Reply


@dataclass(frozen=True)
class AgentSentence(ReplyFrame):
    """One sentence of the reply: as the LLM wrote it (shown) and as it is to be spoken."""

    shown: str
    spoken: str


@dataclass(frozen=True)
class ReplayAudio(ReplyFrame):
    """Audio of an earlier turn to play again under ``reply`` (a replay: nothing is recorded)."""

    audio: np.ndarray = field(repr=False, compare=False)
    sample_rate: int


@dataclass(frozen=True)
class EndOfReply(ControlFrame):
    """No more sentences for ``reply``: wait for playback, record the turn (even if cut off)."""

    reply: Reply
