"""Transcribe: speech segments -> user inputs (Whisper), and partial transcripts for the screen.

A ``SpeechSegment`` becomes a ``UserInput`` with its milestones: ``turn_end_ms`` (end of speech
-> turn judged over) and ``transcript_ms`` (end of speech -> transcript). A ``TentativeSpeech``
(the turn as it would end at the current pause) is transcribed ahead of time; when the segment
that ends the turn covers the same audio, that transcript is used and the turn costs no
Whisper time after it ends. An empty transcript (a noise, a cough) ends the input without a
reply. A segment spoken over a reply goes to ``BargeIn.verdict``: a backchannel lets the reply
resume and is not answered. The audio of a turn begun over a reply is first taken again from under the agent's echo
(``recover``: the double-talk detector's, where there is one), since the echo canceller's
suppressor swallows much of a voice that talks over the agent; that audio is what Whisper hears
and what the conversation keeps. ``PartialAudio`` is transcribed only when nothing newer waits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from agent.events import PartialTranscript
from agent.frames import EarlyInput, Frame, PartialAudio, SpeechSegment, TentativeSpeech, UserInput
from agent.listen.asr import Transcript
from agent.listen.barge_in import BargeIn
from agent.stages.base import FrameSink, Stage, StageContext
from agent.stages.loading import Models

MIN_PARTIAL_SAMPLES = 16_000 // 2  # half a second of audio before a partial is worth showing


class TranscribeStage(Stage):
    """See the module docstring. Without a transcriber (none loaded) speech is dropped."""

    name = "transcribe"

    def __init__(self, ctx: StageContext, downstream: FrameSink, models: Models,
                 barge_in: BargeIn | None = None) -> None:
        super().__init__(ctx, downstream)
        self.models = models
        self.barge_in = barge_in
        self._ahead: tuple[tuple[int, int], Transcript] | None = None  # a tentative span and its transcript
        self.reused = 0  # turns whose transcript was made during the pause
        # The user's voice over capture-stream samples [start, end) from under the agent's echo
        # (``EchoRemover.recover``), or None; set before the stage starts.
        self.recover: Callable[[int, int], np.ndarray | None] | None = None
        self.recovered = 0  # turns over a reply whose audio came from ``recover``

    def process(self, frame: Frame) -> None:
        self.models.wait("asr")
        transcriber = self.models.transcriber
        match frame:
            case PartialAudio(audio=audio):
                if transcriber is not None and self.inbox.empty() and len(audio) >= MIN_PARTIAL_SAMPLES:
                    text = transcriber.transcribe(audio).text
                    if text:
                        self.ctx.emit(PartialTranscript(text))
            case TentativeSpeech(audio=audio, span=span, transcript=heard, early=early):
                if heard is not None:  # the end-of-turn judge has transcribed it already
                    self._ahead = (span, heard)
                    if early and not heard.is_empty:
                        self.push(EarlyInput(heard.text))
                elif transcriber is not None and self.inbox.empty():
                    self._ahead = (span, transcriber.transcribe(audio))
            case SpeechSegment() as speech:
                self._transcribe(speech)
            case _:
                raise TypeError(f"the transcribe stage does not take {type(frame).__name__}")

    def after_failure(self, frame: Frame) -> None:
        """After a failure: a turn that was not transcribed is not answered."""
        self._ahead = None
        if isinstance(frame, SpeechSegment):
            self._drop(frame)

    def _transcribe(self, speech: SpeechSegment) -> None:
        transcriber = self.models.transcriber
        if transcriber is None:
            self._drop(speech)
            return
        speech = self._from_under_the_echo(speech)
        if self._ahead is not None and speech.span is not None and self._ahead[0] == speech.span:
            transcript = self._ahead[1]
            self.reused += 1
        else:
            transcript = transcriber.transcribe(speech.audio)
        self._ahead = None
        transcript_ms = (time.monotonic() - speech.t0) * 1000
        if speech.over_reply and self.barge_in is not None and not self.barge_in.verdict(transcript.text):
            self._drop(speech)  # a backchannel over the reply: it goes on, and this is not answered
            return
        if transcript.is_empty:
            self._drop(speech)
            return
        self.push(UserInput(transcript.text, speech.audio, speech.t0, speech.started_at, speech.ended_at,
                            transcript_ms, turn_end_ms=speech.turn_end_ms))

    def _from_under_the_echo(self, speech: SpeechSegment) -> SpeechSegment:
        """A turn over a reply with its audio recovered from under the echo (its tentative
        transcript, made from the echo-cancelled audio, is not reused)."""
        if speech.over_agent_from is None or self.recover is None or speech.span is None:
            return speech
        start, end = speech.span
        start = min(start, speech.over_agent_from)  # the detector may have heard the voice before the VAD
        audio = self.recover(start, end)
        if audio is None or len(audio) != end - start:
            return speech
        self.recovered += 1
        return replace(speech, audio=np.asarray(audio, np.float32), span=None)

    def _drop(self, speech: SpeechSegment) -> None:
        self.ctx.progress.end_input()
        self.ctx.set_state(self.ctx.listening_or_current())
