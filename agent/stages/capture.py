"""Capture: the microphone (or a file, or a simulated room) -> echo cancellation -> audio blocks.

Reads 16 kHz blocks from the ``AudioSource`` on its own thread, as soon as they are there (the
echo canceller places each block against what the speaker played at the same moment, so it
must not lag), takes the agent's own voice out of them, reports the level of what is left
(about 20 times a second), and sends each block to the turn stage stamped with the time it
was read. Muted, it sends silence. At the end of the source it sends ``EndOfAudio``.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from agent.audio import AudioSource, rms_dbfs
from agent.echo.canceller import EchoCanceller, PassThrough
from agent.events import MicLevel
from agent.frames import AudioBlock, EndOfAudio, Frame
from agent.stages.base import FrameSink, Stage, StageContext

MIC_LEVEL_INTERVAL_S = 0.05  # ~20 level events per second


class EchoRemover(Protocol):
    """What capture needs from echo cancellation (``agent.echo.double_talk.DoubleTalk`` or a pass-through)."""

    user_speaking: bool
    far_end_active: bool  # the agent's voice is in the microphone (and the remover can tell a person from it)

    def process(self, block: np.ndarray) -> np.ndarray: ...

    def recover(self, start: int, end: int) -> np.ndarray | None:
        """The user's own voice over samples ``[start, end)`` of the processed stream, where the
        agent's voice was in the room (None: the processed audio is the best there is)."""

    def close(self) -> None: ...


class NoEchoRemoval:
    """Capture without echo cancellation (headphones, push-to-talk, --aec off)."""

    user_speaking = far_end_active = False

    def process(self, block: np.ndarray) -> np.ndarray:
        return block

    def recover(self, start: int, end: int) -> None:
        return None

    def close(self) -> None:
        pass


class CancelledEcho:
    """Echo cancellation alone, without double-talk detection (the canceller's library is missing)."""

    user_speaking = far_end_active = False

    def __init__(self, canceller: EchoCanceller | PassThrough) -> None:
        self.canceller = canceller

    def process(self, block: np.ndarray) -> np.ndarray:
        return self.canceller.process(block)

    def recover(self, start: int, end: int) -> None:
        return None

    def close(self) -> None:
        self.canceller.close()


class CaptureStage(Stage):
    """See the module docstring. ``source`` and ``echo`` are set before the stage starts."""

    name = "capture"

    def __init__(self, ctx: StageContext, downstream: FrameSink, *, paced: bool = False) -> None:
        super().__init__(ctx, downstream)
        self.paced = paced  # --fast mic file: read only while no reply is pending
        self.source: AudioSource | None = None
        self.echo: EchoRemover = NoEchoRemoval()
        self._muted = False

    def set_muted(self, muted: bool) -> None:
        """Hand-over from the UI thread: the next block is silenced (or not)."""
        self._muted = bool(muted)

    def process(self, frame: Frame) -> None:  # capture has no inbox traffic: it reads its source
        raise TypeError(f"the capture stage takes no frames, got {frame!r}")

    def run(self) -> None:
        if self.source is None:
            return  # no microphone: typed messages only
        self.source.start()
        last_level = 0.0
        while not self.ctx.stopping.is_set():
            if self.paced and not self.ctx.progress.wait_idle(self.ctx.stopping):
                break
            try:
                block = self.source.read(timeout=0.2)
            except TimeoutError:
                continue
            if block is None:
                break
            heard = time.monotonic()
            clean = self.echo.process(block)
            if heard - last_level >= MIC_LEVEL_INTERVAL_S:
                self.ctx.emit(MicLevel(rms_dbfs(clean)))
                last_level = heard
            if self._muted:
                self.push(AudioBlock(np.zeros_like(clean), heard))
            else:
                self.push(AudioBlock(clean, heard, self.echo.user_speaking, self.echo.far_end_active))
        self.push(EndOfAudio())
