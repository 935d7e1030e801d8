"""Where the agent's speech goes: a queue of chunks played block by block, so that ``stop()``
silences it within one block, ``pause()`` holds it, and what was actually played is known."""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.audio.samples import PLAYBACK_BLOCK_MS, StreamResampler, _as_mono_float32, write_wav
from agent.errors import AgentError

log = logging.getLogger(__name__)


@dataclass
class PlayedChunk:
    """When a written chunk started playing (``time.monotonic()`` seconds) and where it sits."""

    started_at: float
    offset: int  # position in the sink's played audio, in samples at the sink rate


class _PlaybackQueue:
    """Thread-safe FIFO of samples; consumers pull fixed-size blocks, ``clear()`` drops it all."""

    def __init__(self) -> None:
        self._chunks: deque[tuple[np.ndarray, int]] = deque()  # (samples, chunk id)
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)
        self.pending = 0

    def push(self, samples: np.ndarray, chunk_id: int) -> None:
        with self._lock:
            self._chunks.append((samples, chunk_id))
            self.pending += len(samples)
            self.changed.notify_all()

    def pull(self, n: int) -> tuple[np.ndarray, int, list[tuple[int, int]]]:
        """Up to n samples: (block zero-padded to n, real samples, [(chunk id, offset in block)])."""
        block = np.zeros(n, np.float32)
        filled = 0
        starts: list[tuple[int, int]] = []
        with self._lock:
            while filled < n and self._chunks:
                samples, chunk_id = self._chunks[0]
                if chunk_id >= 0:
                    starts.append((chunk_id, filled))
                take = min(n - filled, len(samples))
                block[filled : filled + take] = samples[:take]
                filled += take
                if take == len(samples):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = (samples[take:], -1)  # the rest of a chunk already started
            self.pending -= filled
            if self.pending == 0:
                self.changed.notify_all()
        return block, filled, starts

    def clear(self) -> int:
        with self._lock:
            dropped = self.pending
            self._chunks.clear()
            self.pending = 0
            self.changed.notify_all()
            return dropped

    def wait_empty(self, timeout: float | None) -> bool:
        with self._lock:
            return self.changed.wait_for(lambda: self.pending == 0, timeout)


FarEndListener = Callable[[np.ndarray, int, float], None]
"""``listener(samples, sample_rate, play_time)``: one block as handed to the device (read-only
float32), its rate in Hz, and when its first sample plays (``time.monotonic()`` seconds)."""


class AudioSink(ABC):
    """A speaker fed chunk by chunk; plays in order, ``stop()`` cuts it within one block.

    ``write()`` never blocks for playback. Between ``begin_utterance()`` and ``end_utterance()``
    (one sentence) the speaker must never run dry: silence it has to insert there is counted in
    ``underruns`` (times) and ``underrun_s`` (seconds). ``pause()`` holds playback without
    dropping anything (``resume()`` goes on); paused silence is not an underrun.
    ``played_samples`` (at ``sample_rate``) and
    ``played_s`` count audio actually handed to the speaker since the sink was made, so a
    caller can tell how much of an interrupted reply was heard.
    """

    output_latency_s: float = 0.0  # device-reported delay from handing a block over to hearing it

    def __init__(self, sample_rate: int, *, block_ms: int = PLAYBACK_BLOCK_MS) -> None:
        self.sample_rate = int(sample_rate)
        self.block_samples = max(1, self.sample_rate * block_ms // 1000)
        self._queue = _PlaybackQueue()
        self._resampler: StreamResampler | None = None
        self._write_lock = threading.Lock()
        self._consume_lock = threading.Lock()
        self._chunk_ids = 0
        self._played = 0
        self._played_audio: list[np.ndarray] = []
        self._keep_audio = False
        self._listeners: tuple[FarEndListener, ...] = ()
        self.chunks: list[PlayedChunk] = []
        self._in_utterance = False
        self._starving = False
        self._paused = threading.Event()
        self.underruns = 0
        self.underrun_s = 0.0

    # -- producer side

    @abstractmethod
    def start(self) -> None:
        """Open the speaker and start whatever drains the queue (idempotent); without it nothing plays."""

    def write(self, chunk: np.ndarray, sample_rate: int) -> None:
        """Queue a float32 mono chunk recorded at ``sample_rate`` Hz for playback."""
        chunk = _as_mono_float32(chunk)
        with self._write_lock:
            if sample_rate != self.sample_rate:
                if self._resampler is None or self._resampler.src_rate != sample_rate:
                    self._flush_resampler()
                    self._resampler = StreamResampler(sample_rate, self.sample_rate)
                chunk = self._resampler.process(chunk)
            else:
                self._flush_resampler()
            self._push(chunk)

    def flush(self) -> None:
        """Queue the few milliseconds the resampler holds back; call after a reply's last chunk."""
        with self._write_lock:
            self._flush_resampler()

    def stop(self) -> None:
        """Discard everything queued (barge-in); playback goes silent within one block."""
        with self._write_lock:
            if self._resampler is not None:
                self._resampler.reset()
            self._queue.clear()
            self._in_utterance = self._starving = False
            self._paused.clear()

    def add_listener(self, listener: FarEndListener) -> Callable[[], None]:
        """Receive every block handed to the device (the far-end tap); returns a remover.

        Listeners run on the playback thread (an audio callback for a real speaker): they must
        be quick and never block. One that raises is removed, so playback goes on.
        ``SpeakerSink`` hands blocks continuously (zeros when idle or paused); ``MemorySink``
        only while audio is queued, so listeners must treat a jump in ``play_time`` as silence.
        """
        with self._write_lock:
            self._listeners = (*self._listeners, listener)
        return lambda: self.remove_listener(listener)

    def remove_listener(self, listener: FarEndListener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        with self._write_lock:
            self._listeners = tuple(fn for fn in self._listeners if fn is not listener)

    def begin_utterance(self) -> None:
        """Audio written from now on is one utterance: running dry before its end is an underrun."""
        self._in_utterance = True

    def end_utterance(self) -> None:
        """The utterance's last chunk has been written."""
        self.flush()
        self._in_utterance = self._starving = False

    def pause(self) -> None:
        """Hold playback (within one block), keeping the queue; ``resume()`` goes on from there."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    @property
    def pending_s(self) -> float:
        """Seconds of queued audio not yet played."""
        return self._queue.pending / self.sample_rate

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Flush, then block until all queued audio has been played; False on timeout."""
        self.flush()
        if not self._queue.wait_empty(timeout):
            return False
        with self._consume_lock:
            return True

    def close(self) -> None:
        """Play what is queued, then release the speaker."""
        self.wait_idle()

    @property
    def played_samples(self) -> int:
        """Samples (at ``sample_rate``) handed to the speaker so far."""
        return self._played

    @property
    def played_s(self) -> float:
        """Seconds of audio handed to the speaker so far."""
        return self._played / self.sample_rate

    def __enter__(self) -> AudioSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals

    def _flush_resampler(self) -> None:
        if self._resampler is not None:
            self._push(self._resampler.flush())

    def _push(self, samples: np.ndarray) -> None:
        if len(samples):
            self._queue.push(samples, self._chunk_ids)
            self._chunk_ids += 1

    def _count_gap(self, missing_s: float) -> None:
        """The speaker played ``missing_s`` of silence it was not meant to (inside an utterance)."""
        if missing_s <= 0 or not self._in_utterance:
            self._starving = False
            return
        if not self._starving:
            self.underruns += 1
        self._starving = True
        self.underrun_s += missing_s

    def _consume(self, n: int) -> np.ndarray:
        """Pull the next n samples for the speaker (zeros when idle or paused) and account for them."""
        if self._paused.is_set():
            silence = np.zeros(n, np.float32)
            if self._listeners:
                self._tell_listeners(silence, time.monotonic() + self.output_latency_s)
            return silence
        with self._consume_lock:  # wait_idle() must not return between the pull and the count
            block, filled, starts = self._queue.pull(n)
            if filled:
                self._starving = False
            if filled < n:  # a speaker pulls whole blocks: the rest of this one is silence
                self._count_gap((n - filled) / self.sample_rate)
            now = time.monotonic()
            for _, offset in starts:
                self.chunks.append(PlayedChunk(now + offset / self.sample_rate, self._played + offset))
            if filled and self._keep_audio:
                self._played_audio.append(block[:filled].copy())
            self._played += filled
            if self._listeners:
                self._tell_listeners(block, now + self.output_latency_s)
        return block

    def _tell_listeners(self, block: np.ndarray, play_time: float) -> None:
        view = block.view()
        view.flags.writeable = False
        for listener in self._listeners:
            try:
                listener(view, self.sample_rate, play_time)
            except Exception:  # a broken listener must not silence the speaker
                log.warning("an audio listener failed and was removed", exc_info=True)
                self.remove_listener(listener)


class MemorySink(AudioSink):
    """A speaker that keeps what it plays; ``audio()`` returns it (float32 at ``sample_rate``).

    A background thread plays the queue block by block at ``speed`` times real time (``None``:
    as fast as it is written), so ``stop()`` and ``played_samples`` behave as with a speaker.
    """

    def __init__(
        self, sample_rate: int = 24_000, *, speed: float | None = 1.0, block_ms: int = PLAYBACK_BLOCK_MS
    ) -> None:
        super().__init__(sample_rate, block_ms=block_ms)
        if speed is not None and speed <= 0:
            raise AgentError(f"playback speed must be positive, got {speed} (use 1.0 for real time)")
        self.speed = speed
        self._keep_audio = True
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._play, name=f"{type(self).__name__}-player", daemon=True)
            self._thread.start()

    def write(self, chunk: np.ndarray, sample_rate: int) -> None:
        self.start()
        super().write(chunk, sample_rate)

    def _play(self) -> None:
        next_due: float | None = None  # when the next block is due at the speaker
        starved_from: float | None = None  # inside an utterance: when the queue ran dry
        while not self._closed.is_set():
            with self._queue.changed:
                self._queue.changed.wait_for(lambda: self._queue.pending > 0 or self._closed.is_set(), 0.1)
            if self._paused.is_set():
                next_due = starved_from = None
                self._closed.wait(0.005)
                continue
            if self._queue.pending == 0:
                if self._in_utterance and self.speed is not None and next_due is not None:
                    starved_from = starved_from or next_due  # the speaker plays silence from then on
                else:
                    next_due = starved_from = None  # idle: the next chunk starts a new schedule
                continue
            if self.speed is None:
                self._consume(self._queue.pending)
                continue
            block = min(self.block_samples, self._queue.pending)
            now = time.monotonic()
            if starved_from is not None:
                self._count_gap((now - starved_from) * self.speed)
                next_due, starved_from = now, None
            if next_due is None or next_due < now - 0.25:
                next_due = now
            self._consume(block)
            next_due += block / self.sample_rate / self.speed
            delay = next_due - time.monotonic()
            if delay > 0:
                self._closed.wait(delay)

    def audio(self) -> np.ndarray:
        """Everything played so far, concatenated (float32 at ``sample_rate``)."""
        parts = list(self._played_audio)
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def close(self) -> None:
        if self._thread is not None and not self._closed.is_set():
            self.wait_idle()
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)


class WavFileSink(MemorySink):
    """A speaker that writes everything it played to a WAV file (atomically) when closed."""

    def __init__(
        self,
        path: str | Path,
        sample_rate: int = 24_000,
        *,
        speed: float | None = 1.0,
        block_ms: int = PLAYBACK_BLOCK_MS,
    ) -> None:
        super().__init__(sample_rate, speed=speed, block_ms=block_ms)
        self.path = Path(path)
        self._written = False

    def close(self) -> None:
        super().close()
        if not self._written:
            self._written = True
            write_wav(self.path, self.audio(), self.sample_rate)
