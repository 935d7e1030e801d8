"""Transcribe: speech segments -> user inputs (Whisper), and partial transcripts for the screen.

A ``SpeechSegment`` becomes a ``UserInput`` with the time it took (``transcript_ms``, from the
end of the turn); an empty transcript (a noise, a cough) ends that input without a reply. A
``PartialAudio`` is transcribed only when nothing newer waits, and shown as a
``PartialTranscript`` event.
"""

from __future__ import annotations

import time

from agent.events import PartialTranscript
from agent.frames import Frame, PartialAudio, SpeechSegment, UserInput
from agent.stages.base import FrameSink, Stage, StageContext
from agent.stages.loading import Models

MIN_PARTIAL_SAMPLES = 16_000 // 2  # half a second of audio before a partial is worth showing


class TranscribeStage(Stage):
    """See the module docstring. Without a transcriber (none loaded) speech is dropped."""

    name = "transcribe"

    def __init__(self, ctx: StageContext, downstream: FrameSink, models: Models) -> None:
        super().__init__(ctx, downstream)
        self.models = models

    def process(self, frame: Frame) -> None:
        self.models.wait("asr")
        match frame:
            case PartialAudio(audio=audio):
                transcriber = self.models.transcriber
                if transcriber is not None and self.inbox.empty() and len(audio) >= MIN_PARTIAL_SAMPLES:
                    text = transcriber.transcribe(audio).text
                    if text:
                        self.ctx.emit(PartialTranscript(text))
            case SpeechSegment() as speech:
                self._transcribe(speech)
            case _:
                raise TypeError(f"the transcribe stage does not take {type(frame).__name__}")

    def _transcribe(self, speech: SpeechSegment) -> None:
        transcriber = self.models.transcriber
        if transcriber is None:
            self.ctx.progress.end_input()
            return
        transcript = transcriber.transcribe(speech.audio)
        transcript_ms = (time.monotonic() - speech.t0) * 1000
        if transcript.is_empty:
            self.ctx.progress.end_input()
            self.ctx.set_state(self.ctx.listening_or_current())
            return
        self.push(UserInput(transcript.text, speech.audio, speech.t0, speech.started_at, speech.ended_at,
                            transcript_ms))
