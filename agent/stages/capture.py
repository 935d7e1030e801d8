"""Capture: microphone blocks -> turn detection -> speech segments, and the barge-in signal.

Reads 16 kHz blocks from the ``AudioSource`` on its own thread, reports the mic level (about
20 times a second), runs the active detector (Silero VAD hands-free, or push-to-talk) and
sends each finished utterance downstream as a ``SpeechSegment`` (and, while the user speaks,
``PartialAudio`` for an on-screen partial transcript). When the user starts speaking while a
reply is in flight, ``on_barge_in`` is called.

Mode and mute are handed over by ``set_mode`` / ``set_muted`` (the thread reads the new value
at its next block); the detector is reset when the mode changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from agent.audio import AudioSource, rms_dbfs
from agent.events import AgentState, MicLevel
from agent.frames import Frame, PartialAudio, SpeechSegment
from agent.stages.base import FrameSink, Stage, StageContext
from agent.vad import PushToTalk, VadEvent, VoiceActivityDetector

MIC_LEVEL_INTERVAL_S = 0.05  # ~20 level events per second
PARTIAL_INTERVAL_S = 1.0  # partial transcripts while the user speaks (TUI only)
MIN_TURN_S = 0.25  # shorter "turns" (clicks) are not sent to Whisper


class CaptureStage(Stage):
    """See the module docstring. ``source`` is read from this stage's thread only."""

    name = "capture"

    def __init__(self, ctx: StageContext, downstream: FrameSink, *, mode: str = "vad", partials: bool = True,
                 paced: bool = False, on_barge_in: Callable[[], None] | None = None) -> None:
        super().__init__(ctx, downstream)
        self._mode = mode
        self._muted = False
        self.partials = partials  # headless runs have no screen to show partials on
        self.paced = paced  # --fast mic file: each turn waits until the previous one is answered
        self.on_barge_in = on_barge_in
        self.source: AudioSource | None = None
        self.vad: VoiceActivityDetector | None = None
        self.ptt = PushToTalk()
        self._speech_started_at = time.time()

    # ---- hand-overs from other threads -------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        self._mode = mode

    def set_muted(self, muted: bool) -> None:
        self._muted = bool(muted)

    # ---- the loop ------------------------------------------------------------------------------

    def process(self, frame: Frame) -> None:  # capture has no inbox traffic: it reads its source
        raise TypeError(f"the capture stage takes no frames, got {frame!r}")

    def run(self) -> None:
        if self.source is None or self.vad is None:
            return  # no microphone: typed messages only
        self.source.start()
        last_level = last_partial = 0.0
        detector = self._detector()
        while not self.ctx.stopping.is_set():
            if self.paced and not self.ctx.progress.wait_idle(self.ctx.stopping):
                break
            try:
                block = self.source.read(timeout=0.2)
            except TimeoutError:
                continue
            if block is None:
                break
            now = time.monotonic()
            if now - last_level >= MIC_LEVEL_INTERVAL_S:
                self.ctx.emit(MicLevel(rms_dbfs(block)))
                last_level = now
            if self._muted:
                block = np.zeros_like(block)
            if self._detector() is not detector:  # mode switched: start the new detector clean
                detector.reset()
                detector = self._detector()
                detector.reset()
            for event in detector.feed(block):
                self._on_event(event)
            if detector.speaking and self.partials and now - last_partial >= PARTIAL_INTERVAL_S:
                last_partial = now  # (the transcribe stage skips a partial when newer audio waits)
                self.push(PartialAudio(detector.current_audio()))
        for event in detector.flush():
            self._on_event(event)
        self.ctx.progress.end_of_input()

    def _detector(self) -> VoiceActivityDetector | PushToTalk:
        return self.ptt if self._mode == "ptt" else self.vad

    def _on_event(self, event: VadEvent) -> None:
        if event.kind == "speech_start":
            self._speech_started_at = time.time()
            if self.ctx.replies.current is not None and self.on_barge_in is not None:
                self.on_barge_in()  # the user talks over the agent
            self.ctx.set_state(AgentState.HEARING)
            return
        audio = event.audio if event.audio is not None else np.zeros(0, np.float32)
        if len(audio) < MIN_TURN_S * 16_000 or self.ctx.progress.turns_reached():
            self.ctx.set_state(self.ctx.listening_or_current())
            return
        self.ctx.progress.begin_input()
        self.ctx.set_state(AgentState.TRANSCRIBING)
        self.push(SpeechSegment(audio, time.monotonic(), self._speech_started_at, time.time()))
