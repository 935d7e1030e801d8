"""Turn-taking: echo-cancelled microphone blocks -> the user's turns, and what their voice means.

Runs the active detector on each ``AudioBlock``: hands-free, Silero VAD with the end-of-turn
judge (``agent.listen.end_of_turn``: the Smart Turn model at a short pause, or a fixed pause), or
push-to-talk. It sends downstream:

- ``SpeechSegment`` when a turn is over, with when the speech really ended (``t0``, from the
  blocks' capture times) and how long the turn took to be judged over (``turn_end_ms``);
- ``TentativeSpeech`` as soon as a pause could end the turn, so transcription starts while the
  judge still listens (the transcript is ready when the turn ends); in smart mode the judge
  transcribes the pause itself (its text evidence) and the frame carries that transcript, and
  the think stage may start the reply on it early — discarded (``TextTurn.went_on``) as soon as
  the user speaks again;
- ``PartialAudio`` about once a second while the user speaks (for the screen).

The user's voice during a reply goes to ``BargeIn`` (``agent.listen.barge_in``): heard -> playback
pauses; long enough, or words that are not a backchannel -> the reply is interrupted. While the
agent's voice is in the microphone (``AudioBlock.agent_audible``) the capture stage's
double-talk detector decides whether a person is there (``AudioBlock.user_over_echo``): it hears
a voice the echo canceller half-swallowed before the VAD does, and the VAD alone is not believed
(what it hears may be echo the canceller left); a VAD turn nobody confirmed is dropped.

State shown: hearing you, waiting (the judge thinks the user is not finished), transcribing.
Paced mic files (``--fast``) are processed only while no reply is pending.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from agent.audio import PIPELINE_RATE
from agent.events import AgentState
from agent.frames import AudioBlock, EndOfAudio, Frame, PartialAudio, SpeechSegment, TentativeSpeech
from agent.listen.barge_in import BargeIn
from agent.listen.vad import PushToTalk, VadEvent, VoiceActivityDetector
from agent.stages.base import FrameSink, Stage, StageContext

if TYPE_CHECKING:
    from agent.listen.end_of_turn import TurnVerdict
    from agent.listen.text_turn import TextTurn

PARTIAL_INTERVAL_S = 1.0  # partial transcripts while the user speaks (TUI only)
MIN_TURN_S = 0.25  # shorter "turns" (clicks) are not sent to Whisper
CLOCK_S = 30.0  # how far back stream positions can be mapped to the time they were heard
UNCONFIRMED_S = 0.5  # heard over the echo but no turn found by the VAD this long after: let go
OVER_ECHO_LEAD_IN_S = 0.4  # a voice heard over the echo began up to ~0.25 s before it was detected


class TurnStage(Stage):
    """See the module docstring. ``vad`` and ``barge_in`` are set before the stage starts."""

    name = "turn"

    def __init__(self, ctx: StageContext, downstream: FrameSink, *, mode: str = "vad", partials: bool = True,
                 paced: bool = False, barge_in: BargeIn | None = None) -> None:
        super().__init__(ctx, downstream)
        self._mode = mode
        self.partials = partials  # headless runs have no screen to show partials on
        self.paced = paced
        self.barge_in = barge_in
        self.vad: VoiceActivityDetector | None = None
        self.ptt = PushToTalk()
        self._detector: VoiceActivityDetector | PushToTalk | None = None
        self._clock: deque[tuple[int, float]] = deque()  # (stream sample after a block, monotonic time heard)
        self._pos = 0  # samples the active detector has run over
        self._heard = 0  # samples received: spans sent on are counted on this (the capture stream)
        self._origin = 0  # ``_heard`` when the active detector started
        self._speech_started_at = time.time()
        self._last_partial = -PARTIAL_INTERVAL_S
        self._tentative: tuple[int, int] | None = None
        self._person = False  # a person is heard in the current utterance (the barge-in rule was told)
        self._unconfirmed_s = 0.0  # since the double-talk detector last heard the user, no VAD turn
        self.echo_turns = 0  # VAD turns dropped: only the agent's voice was in the mic, no one confirmed
        self._over_agent_from: int | None = None  # this turn began over a reply: see SpeechSegment
        # Per turn: end of speech -> turn judged over, in stream time (what the judge waited for)
        # and in wall-clock time (that plus the model's compute and any backlog), ms.
        self.turn_end_ms: list[tuple[float, float]] = []

    def set_mode(self, mode: str) -> None:
        """Hand-over from the UI thread: the next block uses the new detector."""
        self._mode = mode

    # ---- frames ------------------------------------------------------------------------------

    def process(self, frame: Frame) -> None:
        match frame:
            case AudioBlock() as block:
                if self.paced and not self.ctx.progress.wait_idle(self.ctx.stopping):
                    return
                self._on_block(block)
            case EndOfAudio():
                self._end_of_audio()
            case _:
                raise TypeError(f"the turn stage does not take {type(frame).__name__}")

    def _on_block(self, block: AudioBlock) -> None:
        detector = self._active_detector()
        n = len(block.audio)
        self._heard += n
        if detector is None:
            return
        self._pos += n
        self._clock.append((self._pos, block.captured_at))
        while self._clock and self._clock[0][0] < self._pos - CLOCK_S * PIPELINE_RATE:
            self._clock.popleft()
        if block.user_over_echo and not self._person:  # the double-talk detector heard a person
            self._hear_person(max(0, self._heard - n - int(OVER_ECHO_LEAD_IN_S * PIPELINE_RATE)))
        for event in detector.feed(block.audio):
            self._on_event(event, block)
        if detector.speaking:
            if not self._person and self._believe_vad(block):
                self._hear_person(self._heard)
            if self._person:
                self._while_speaking(detector)
        elif self._person:
            self._unconfirmed_s = 0.0 if block.user_over_echo else self._unconfirmed_s + n / PIPELINE_RATE
            if self._unconfirmed_s >= UNCONFIRMED_S:
                self._person, self._over_agent_from = False, None
                if self.barge_in is not None:
                    self.barge_in.release()  # heard for a moment, but the VAD never found a turn in it

    def _believe_vad(self, block: AudioBlock | None) -> bool:
        """Whether the detector's speech counts as a person without the double-talk detector:
        push-to-talk always; the VAD where none of the agent's voice is in the mic to mistake."""
        return self._mode == "ptt" or block is None or not block.agent_audible

    def _active_detector(self) -> VoiceActivityDetector | PushToTalk | None:
        wanted = self.ptt if self._mode == "ptt" else self.vad
        if wanted is not self._detector and wanted is not None:
            if self._detector is not None:
                self._detector.reset()  # mode switched: start the new detector clean
            wanted.reset()
            self._detector = wanted
            self._pos = 0
            self._origin = self._heard
            self._clock.clear()
        return self._detector

    def _while_speaking(self, detector: VoiceActivityDetector | PushToTalk) -> None:
        if isinstance(detector, VoiceActivityDetector):
            if self.barge_in is not None:
                self.barge_in.speech_ongoing(detector.speech_s)
            verdict = detector.last_verdict
            waiting = verdict is not None and verdict.waiting
            self.ctx.set_state(AgentState.WAITING if waiting else AgentState.HEARING)
            self._tentative_speech(detector, verdict)
        now = self._pos / PIPELINE_RATE
        if self.partials and now - self._last_partial >= PARTIAL_INTERVAL_S:
            self._last_partial = now
            self.push(PartialAudio(detector.current_audio()))

    def _tentative_speech(self, detector: VoiceActivityDetector, verdict: TurnVerdict | None) -> None:
        """Send the turn as it would end at this pause, once per pause: with the judge's transcript
        when it made one (and then the reply may start early on it), else for Whisper to do ahead."""
        text = self._text_turn()
        pending = detector.audio_if_ended_now()
        if pending is None:
            if self._tentative is not None and detector.pause_ms == 0:  # the user went on after the pause
                self._tentative = None
                if text is not None:
                    text.went_on()
            return
        if pending[0] == self._tentative:
            return
        heard = text.transcript_for(pending[0]) if text is not None else None
        if heard is None and text is not None and (verdict is None or verdict.reason == "pause"):
            return  # the judge transcribes this pause at its first check: wait for its transcript
        self._tentative = pending[0]
        self.push(TentativeSpeech(pending[1], self._stream_span(pending[0]), heard, early=heard is not None))

    def _text_turn(self) -> TextTurn | None:
        judge = self.vad.end_of_turn if self.vad is not None else None
        return judge.text if judge is not None and self._mode != "ptt" else None

    def _end_of_audio(self) -> None:
        if self._detector is not None:
            for event in self._detector.flush():
                self._on_event(event, None)
        self.ctx.progress.end_of_input()

    # ---- turns -----------------------------------------------------------------------------------

    def _on_event(self, event: VadEvent, block: AudioBlock | None) -> None:
        if event.kind == "speech_start":
            if not self._person and self._believe_vad(block):
                self._hear_person(self._heard)
            if self._person:
                self.ctx.set_state(AgentState.HEARING)
            return
        over_agent_from, self._over_agent_from = self._over_agent_from, None
        person, self._person = self._person, False
        text = self._text_turn()
        heard = text.transcript_for(event.span) if text is not None and event.span != self._tentative else None
        self._tentative = None
        if not person:  # the agent's voice, left by the echo canceller: no one to answer
            self.echo_turns += 1
            return
        audio = event.audio if event.audio is not None else np.zeros(0, np.float32)
        over_reply = self.barge_in is not None and self.barge_in.holding
        if len(audio) < MIN_TURN_S * PIPELINE_RATE or self.ctx.progress.turns_reached():
            if over_reply:
                self.barge_in.release()
            self.ctx.set_state(self.ctx.listening_or_current())
            return
        # Judged over now, or (blocks handed in faster than real time) when the deciding block was heard.
        now = max(time.monotonic(), self._clock[-1][1] if self._clock else 0.0)
        speech_end = self._heard_at(int(event.t * PIPELINE_RATE)) or now
        turn_end_ms = max(0.0, (now - speech_end) * 1000)
        self.turn_end_ms.append(((event.ended_t - event.t) * 1000 if event.ended_t is not None else turn_end_ms,
                                 turn_end_ms))
        self.ctx.progress.begin_input()
        self.ctx.set_state(AgentState.TRANSCRIBING)
        if heard is not None:  # the judge's transcript of exactly this turn: Whisper need not run again
            self.push(TentativeSpeech(audio, self._stream_span(event.span), heard))
        self.push(SpeechSegment(audio, speech_end, self._speech_started_at, time.time(), turn_end_ms,
                                self._stream_span(event.span), over_reply, over_agent_from))

    def _hear_person(self, from_sample: int) -> None:
        """The user is heard, from about capture sample ``from_sample``."""
        self._person = True
        self._speech_started_at = time.time()
        self._over_agent_from = None
        if self.barge_in is not None:
            self.barge_in.speech_started(push_to_talk=self._mode == "ptt")
            if self.barge_in.holding:  # a reply was paused for this voice
                self._over_agent_from = from_sample

    def _stream_span(self, span: tuple[int, int] | None) -> tuple[int, int] | None:
        """A detector's span as samples of the capture stream (what ``EchoRemover.recover`` counts)."""
        return None if span is None else (span[0] + self._origin, span[1] + self._origin)

    def _heard_at(self, sample: int) -> float | None:
        """When stream sample ``sample`` was heard (monotonic), from the capture times of the blocks."""
        for end, heard in self._clock:
            if end >= sample:
                return heard - (end - sample) / PIPELINE_RATE
        return None
