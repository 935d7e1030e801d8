"""Where the pipeline's audio comes from: a WAV file played as if spoken live, or a queue fed by
another thread (the microphone's callback, a simulated room, a test). Blocks are float32 mono at
16 kHz."""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from agent.audio.samples import BLOCK_MS, PIPELINE_RATE, StreamResampler, _as_mono_float32, _Rebuffer, load_audio
from agent.errors import AgentError


class AudioSource(ABC):
    """A microphone-like stream of float32 mono blocks at ``sample_rate`` (16 kHz).

    ``start()`` begins capture; ``read()`` returns the next block or ``None`` once the source
    has ended (end of file) or was stopped; iterating yields blocks until then.
    """

    sample_rate: int = PIPELINE_RATE
    block_samples: int = PIPELINE_RATE * BLOCK_MS // 1000
    input_latency_s: float = 0.0  # device-reported delay from sound reaching the mic to read()
    hears_speaker: bool = False  # sound from the agent's speaker can reach it (a mic in a room)

    @abstractmethod
    def start(self) -> None:
        """Begin capturing (idempotent)."""

    @abstractmethod
    def read(self, timeout: float | None = None) -> np.ndarray | None:
        """Next block (``block_samples`` long), or None at the end; TimeoutError if none in time."""

    @abstractmethod
    def stop(self) -> None:
        """Stop capturing; a blocked ``read()`` returns None. Safe from any thread, idempotent."""

    def __iter__(self) -> Iterator[np.ndarray]:
        while (block := self.read()) is not None:
            yield block

    def __enter__(self) -> AudioSource:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WavFileSource(AudioSource):
    """Plays a WAV file into the pipeline as if spoken live (any rate/channels -> 16 kHz mono).

    ``speed`` paces the blocks: 1.0 is real time, 4.0 four times faster, ``None`` as fast as
    they are read. ``trailing_silence_s`` appends silence after the file so a turn that runs to
    the end of the file still reaches its end-of-turn pause.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        speed: float | None = 1.0,
        block_ms: int = BLOCK_MS,
        trailing_silence_s: float = 0.0,
    ) -> None:
        if speed is not None and speed <= 0:
            raise AgentError(f"playback speed must be positive, got {speed} (use 1.0 for real time)")
        self.path = Path(path)
        self.speed = speed
        self.block_samples = PIPELINE_RATE * block_ms // 1000
        audio = load_audio(self.path, PIPELINE_RATE)
        audio = np.concatenate([audio, np.zeros(int(trailing_silence_s * PIPELINE_RATE), np.float32)])
        pad = (-len(audio)) % self.block_samples
        self.audio = np.concatenate([audio, np.zeros(pad, np.float32)])
        self.duration_s = len(audio) / PIPELINE_RATE
        self._next = 0
        self._started_at: float | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    @property
    def position_s(self) -> float:
        """How far into the file the blocks handed out so far reach, in seconds."""
        return self._next * self.block_samples / PIPELINE_RATE

    def start(self) -> None:
        with self._lock:
            if self._started_at is None:
                self._started_at = time.monotonic()

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        self.start()
        with self._lock:
            index = self._next
            if self._stopped.is_set() or index * self.block_samples >= len(self.audio):
                return None
            self._next += 1
        if self.speed is not None:
            # Block i is "captured" once its last sample has been spoken.
            due = self._started_at + (index + 1) * self.block_samples / PIPELINE_RATE / self.speed
            delay = due - time.monotonic()
            if timeout is not None and delay > timeout:
                with self._lock:
                    self._next = min(self._next, index)  # hand this block out next time
                if self._stopped.wait(timeout):
                    return None
                raise TimeoutError("no audio block within the timeout")
            if delay > 0 and self._stopped.wait(delay):
                return None
        return self.audio[index * self.block_samples : (index + 1) * self.block_samples].copy()

    def stop(self) -> None:
        self._stopped.set()


class QueueSource(AudioSource):
    """A source fed from another thread: ``push(samples, sample_rate)`` any-length float32 audio,
    ``end()`` when there is no more; ``read()`` hands it out as 16 kHz blocks.

    The microphone is one (its PortAudio callback pushes); tests and tools can push audio live.
    """

    def __init__(self, input_rate: int = PIPELINE_RATE, *, block_ms: int = BLOCK_MS) -> None:
        self.input_rate = int(input_rate)
        self.block_samples = PIPELINE_RATE * block_ms // 1000
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue()
        self._ready: deque[np.ndarray] = deque()
        self._rebuffer = _Rebuffer(self.block_samples)
        self._resampler = StreamResampler(self.input_rate, PIPELINE_RATE)
        self._ended = False
        self._stopped = threading.Event()

    def push(self, samples: np.ndarray) -> None:
        """Add float32 mono samples at ``input_rate`` (cheap: safe inside an audio callback)."""
        self._queue.put(samples)

    def end(self) -> None:
        """No more audio: ``read()`` returns what is left (last block zero-padded), then None."""
        self._queue.put(None)

    def start(self) -> None:
        pass

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            if self._stopped.is_set() or self._ended:
                return None
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                raw = self._queue.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError("no audio block within the timeout") from None
            if raw is None:
                self._ended = True
                if not self._stopped.is_set():
                    self._ready.extend(self._rebuffer.push(self._resampler.flush()))
                    if (tail := self._rebuffer.tail()) is not None:
                        self._ready.append(tail)
                continue
            self._ready.extend(self._rebuffer.push(self._resampler.process(_as_mono_float32(raw))))
        return None if self._stopped.is_set() else self._ready.popleft()

    def stop(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            self._queue.put(None)  # wakes a blocked read()
