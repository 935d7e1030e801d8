"""Audio in and out: microphones and speakers through sounddevice, and the same interfaces on files.

Sources hand out float32 mono blocks at the pipeline rate (16 kHz, what the VAD and Whisper
want). Sinks take float32 chunks at any rate (CSM speaks at 24 kHz), queue them, and play them
block by block so that ``stop()`` silences playback within one block (barge-in). Every audio
path works without a sound card through ``WavFileSource``, ``WavFileSink`` and ``MemorySink``.
"""

from __future__ import annotations

import math
import queue
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from agent.errors import AgentError
from agent.files import write_atomic

PIPELINE_RATE = 16_000  # Hz: what the VAD and Whisper consume
BLOCK_MS = 32  # 512 samples at 16 kHz: one Silero VAD window
PLAYBACK_BLOCK_MS = 20  # how finely sinks hand audio to the speaker; bounds the barge-in delay

NO_MIC_FIX = "use --mic-file IN.wav or plug one in"
NO_SPEAKER_FIX = "use --speaker-file OUT.wav or plug one in"


# ----------------------------------------------------------------------------- samples and files


def _as_mono_float32(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:  # (samples, channels), as soundfile and sounddevice give it
        audio = audio.mean(axis=1, dtype=np.float32)
    elif audio.ndim != 1:
        raise ValueError(f"audio must be 1-D or (samples, channels), got shape {audio.shape}")
    return np.ascontiguousarray(audio)


def resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample a whole 1-D float32 signal from ``src_rate`` to ``dst_rate`` Hz (polyphase)."""
    audio = np.asarray(audio, dtype=np.float32)
    if src_rate == dst_rate or audio.size == 0:
        return audio.copy()
    from scipy.signal import resample_poly

    g = math.gcd(int(src_rate), int(dst_rate))
    return resample_poly(audio, dst_rate // g, src_rate // g).astype(np.float32)


class StreamResampler:
    """Resamples a signal that arrives in chunks, without clicks at chunk boundaries.

    Each chunk is resampled together with a little audio on both sides of it, so the output is
    delayed by a few milliseconds; ``flush()`` returns that held-back tail at the end.
    """

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        g = math.gcd(int(src_rate), int(dst_rate))
        self.src_rate, self.dst_rate = int(src_rate), int(dst_rate)
        self._up, self._down = self.dst_rate // g, self.src_rate // g
        # resample_poly's filter reaches 10 * max(up, down) upsampled samples each way; in
        # input samples that is under 10 * max(up, down) / up + 1. Round up to whole `down` steps.
        reach = 10 * max(self._up, self._down) // self._up + 2
        self._context = self._down * math.ceil(reach / self._down)
        self.reset()

    def reset(self) -> None:
        """Forget buffered audio (after a stop or a rate change)."""
        self._left = np.zeros(self._context, np.float32)
        self._pending = np.zeros(0, np.float32)

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Resample the next chunk; returns what is ready (possibly a few samples less)."""
        chunk = np.asarray(chunk, dtype=np.float32)
        if self._up == self._down:
            return chunk.copy()
        self._pending = np.concatenate([self._pending, chunk])
        # Keep `context` samples of look-ahead; emit whole `down` steps so output counts are exact.
        ready = (len(self._pending) - self._context) // self._down * self._down
        if ready <= 0:
            return np.zeros(0, np.float32)
        return self._emit(ready)

    def flush(self) -> np.ndarray:
        """Return the held-back tail (zero-padded look-ahead) and reset."""
        if self._up == self._down or len(self._pending) == 0:
            self.reset()
            return np.zeros(0, np.float32)
        n = len(self._pending)
        steps = math.ceil(n / self._down) * self._down
        self._pending = np.concatenate([self._pending, np.zeros(steps - n + self._context, np.float32)])
        out = self._emit(steps)
        self.reset()
        return out[: int(round(n * self._up / self._down))]

    def _emit(self, ready: int) -> np.ndarray:
        from scipy.signal import resample_poly

        c = self._context
        window = np.concatenate([self._left, self._pending[: ready + c]])
        out = resample_poly(window, self._up, self._down).astype(np.float32)
        start = c * self._up // self._down
        out = out[start : start + ready * self._up // self._down]
        self._left = window[ready : ready + c].copy()
        self._pending = self._pending[ready:]
        return out


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 mono (channels averaged) at its own rate: ``(samples, rate)``."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AgentError(f"audio file not found: {path} (check the path)")
    if path.stat().st_size == 0:
        raise AgentError(f"audio file {path} is empty (0 bytes): pass a WAV that holds speech")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises LibsndfileError/RuntimeError/ValueError by version
        reason = _one_line(error)
        reason = re.sub(r"^Error opening .*?: ", "", reason)  # libsndfile repeats the path
        raise AgentError(f"cannot read audio file {path}: {reason} (pass a PCM WAV file)") from None
    if audio.shape[0] == 0:
        raise AgentError(f"audio file {path} is empty (no samples): pass a WAV that holds speech")
    audio = _as_mono_float32(audio)
    if not np.all(np.isfinite(audio)):
        raise AgentError(f"audio file {path} holds NaN or infinite samples: re-export it as PCM WAV")
    return audio, int(rate)


def load_audio(path: str | Path, sample_rate: int = PIPELINE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono resampled to ``sample_rate`` Hz."""
    audio, rate = read_wav(path)
    return resample(audio, rate, sample_rate)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write float32 mono audio as 16-bit PCM WAV, atomically and durably (see agent.files)."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = np.clip(_as_mono_float32(audio), -1.0, 1.0)
    write_atomic(path, lambda handle: sf.write(handle, audio, int(sample_rate), format="WAV", subtype="PCM_16"))
    return path


def rms_dbfs(block: np.ndarray) -> float:
    """Loudness of a block in dB relative to full scale (-120 for silence)."""
    if len(block) == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(block, dtype=np.float64))))
    return max(-120.0, 20.0 * math.log10(rms)) if rms > 0 else -120.0


class _Rebuffer:
    """Cuts a stream of arbitrary-length arrays into fixed-size blocks."""

    def __init__(self, block_samples: int) -> None:
        self.block_samples = block_samples
        self._buffer = np.zeros(0, np.float32)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        self._buffer = np.concatenate([self._buffer, samples])
        n = len(self._buffer) // self.block_samples
        blocks = [self._buffer[i * self.block_samples : (i + 1) * self.block_samples] for i in range(n)]
        self._buffer = self._buffer[n * self.block_samples :]
        return blocks

    def tail(self) -> np.ndarray | None:
        """The last partial block, zero-padded, or None."""
        if len(self._buffer) == 0:
            return None
        block = np.zeros(self.block_samples, np.float32)
        block[: len(self._buffer)] = self._buffer
        self._buffer = np.zeros(0, np.float32)
        return block


# ----------------------------------------------------------------------------- sources


class AudioSource(ABC):
    """A microphone-like stream of float32 mono blocks at ``sample_rate`` (16 kHz).

    ``start()`` begins capture; ``read()`` returns the next block or ``None`` once the source
    has ended (end of file) or was stopped; iterating yields blocks until then.
    """

    sample_rate: int = PIPELINE_RATE
    block_samples: int = PIPELINE_RATE * BLOCK_MS // 1000
    input_latency_s: float = 0.0  # device-reported delay from sound reaching the mic to read()

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

    def __enter__(self) -> "AudioSource":
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


class MicrophoneSource(QueueSource):
    """Live capture through sounddevice; resampled to 16 kHz mono blocks.

    Opens at 16 kHz when the device allows it, else at the device's own rate and resamples.
    Use ``open_microphone()`` to build one; errors become one-line ``AgentError``s.
    """

    def __init__(self, device: int | str | None = None, *, block_ms: int = BLOCK_MS) -> None:
        sd = _sounddevice(NO_MIC_FIX)
        self.device = resolve_device(device, "input")
        self.overflows = 0
        self._stream = None
        try:
            rate = PIPELINE_RATE
            try:
                sd.check_input_settings(device=self.device, channels=1, samplerate=rate, dtype="float32")
            except Exception:
                rate = int(sd.query_devices(self.device, "input")["default_samplerate"])
            super().__init__(rate, block_ms=block_ms)
            self._stream = sd.InputStream(
                device=self.device,
                channels=1,
                samplerate=rate,
                dtype="float32",
                blocksize=rate * block_ms // 1000,
                callback=self._callback,
            )
        except (sd.PortAudioError, ValueError) as error:
            raise AgentError(f"no microphone found: {_one_line(error)}; {NO_MIC_FIX}") from None
        self.input_latency_s = float(self._stream.latency)

    def _callback(self, indata: np.ndarray, frames: int, time_info: object, status: object) -> None:
        # PortAudio thread: copy and hand over, nothing else.
        if status:
            self.overflows += 1
        self.push(indata[:, 0].copy())

    def start(self) -> None:
        if self._stream is not None and not self._stream.active and not self._stopped.is_set():
            self._stream.start()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        super().stop()
        if self._stream is not None:
            try:
                self._stream.stop()
                self._stream.close()
            except Exception:  # closing a dead stream must not mask the reason we stop
                pass


# ----------------------------------------------------------------------------- sinks


@dataclass(frozen=True)
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

    ``write()`` never blocks for playback. ``played_samples`` (at ``sample_rate``) and
    ``played_s`` count audio actually handed to the speaker since the sink was made, so a
    caller can tell how much of an interrupted reply was heard.

    The far-end tap: ``add_listener(fn)`` calls ``fn(samples, sample_rate, play_time)`` with
    every block handed to the device, in order, on the playback thread (the echo canceller's
    reference). ``SpeakerSink`` hands blocks continuously (zeros when idle); ``MemorySink`` only
    while audio is queued, so listeners must treat a jump in ``play_time`` as silence.
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

    # -- producer side

    def start(self) -> None:
        """Open the speaker (idempotent)."""

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

    def add_listener(self, listener: FarEndListener) -> Callable[[], None]:
        """Receive every block handed to the device (see the class docstring); returns a remover.

        Listeners run on the playback thread (an audio callback for a real speaker): they must
        be quick and never block. One that raises is removed, so playback goes on.
        """
        with self._write_lock:
            self._listeners = (*self._listeners, listener)
        return lambda: self.remove_listener(listener)

    def remove_listener(self, listener: FarEndListener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        with self._write_lock:
            self._listeners = tuple(fn for fn in self._listeners if fn is not listener)

    @property
    def pending_samples(self) -> int:
        """Queued samples (at ``sample_rate``) not yet played."""
        return self._queue.pending

    @property
    def is_playing(self) -> bool:
        return self._queue.pending > 0

    @property
    def played_samples(self) -> int:
        """Samples (at ``sample_rate``) handed to the speaker so far."""
        return self._played

    @property
    def played_s(self) -> float:
        """Seconds of audio handed to the speaker so far."""
        return self._played / self.sample_rate

    def __enter__(self) -> "AudioSink":
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

    def _consume(self, n: int) -> np.ndarray:
        """Pull the next n samples for the speaker (zeros when idle) and account for them."""
        with self._consume_lock:  # wait_idle() must not return between the pull and the count
            block, filled, starts = self._queue.pull(n)
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
        next_due: float | None = None
        while not self._closed.is_set():
            with self._queue.changed:
                self._queue.changed.wait_for(lambda: self._queue.pending > 0 or self._closed.is_set(), 0.1)
            if self._queue.pending == 0:
                next_due = None  # idle: the next chunk starts a new real-time schedule
                continue
            if self.speed is None:
                self._consume(self._queue.pending)
                continue
            block = min(self.block_samples, self._queue.pending)
            now = time.monotonic()
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


class SpeakerSink(AudioSink):
    """Live playback through sounddevice at the device's rate (CSM's 24 kHz when allowed).

    Use ``open_speaker()`` to build one; errors become one-line ``AgentError``s.
    """

    def __init__(self, device: int | str | None = None, *, block_ms: int = PLAYBACK_BLOCK_MS) -> None:
        sd = _sounddevice(NO_SPEAKER_FIX)
        index = resolve_device(device, "output")
        try:
            rate = 24_000
            try:
                sd.check_output_settings(device=index, channels=1, samplerate=rate, dtype="float32")
            except Exception:
                rate = int(sd.query_devices(index, "output")["default_samplerate"])
            super().__init__(rate, block_ms=block_ms)
            self.device = index
            self._stream = sd.OutputStream(
                device=index,
                channels=1,
                samplerate=rate,
                dtype="float32",
                blocksize=self.block_samples,
                callback=self._callback,
            )
        except (sd.PortAudioError, ValueError) as error:
            raise AgentError(f"no speaker found: {_one_line(error)}; {NO_SPEAKER_FIX}") from None
        self.underflows = 0
        self.output_latency_s = float(self._stream.latency)

    def _callback(self, outdata: np.ndarray, frames: int, time_info: object, status: object) -> None:
        if status:
            self.underflows += 1
        outdata[:, 0] = self._consume(frames)

    def start(self) -> None:
        if not self._stream.active and not self._stream.closed:
            self._stream.start()

    def write(self, chunk: np.ndarray, sample_rate: int) -> None:
        self.start()
        super().write(chunk, sample_rate)

    def close(self) -> None:
        if not self._stream.closed:
            if self._stream.active:
                self.wait_idle(timeout=60.0)
            self._stream.stop()
            self._stream.close()


# ----------------------------------------------------------------------------- devices


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _sounddevice(fix: str):
    """Import sounddevice, turning a missing PortAudio library into an AgentError."""
    try:
        import sounddevice
    except OSError as error:  # raised at import when libportaudio is not installed
        raise AgentError(
            f"PortAudio is not installed ({_one_line(error)}): install libportaudio2, or {fix}"
        ) from None
    return sounddevice


def _device_table() -> list[dict]:
    sd = _sounddevice(NO_MIC_FIX)
    try:
        return [dict(d) for d in sd.query_devices()]
    except sd.PortAudioError:
        return []


def resolve_device(spec: int | str | None, kind: str) -> int | None:
    """Device index for ``spec``: None/"" (system default), an index, "3: name" or a name substring."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    channels = "max_input_channels" if kind == "input" else "max_output_channels"
    fix = NO_MIC_FIX if kind == "input" else NO_SPEAKER_FIX
    devices = _device_table()
    text = str(spec).strip()
    head = text.split(":", 1)[0].strip()
    if isinstance(spec, int) or head.isdigit():
        index = int(spec) if isinstance(spec, int) else int(head)
        if 0 <= index < len(devices) and devices[index][channels] > 0:
            return index
        raise AgentError(f"no {kind} device with index {index}: see csm-chat --list-devices, or {fix}")
    matches = [i for i, d in enumerate(devices) if d[channels] > 0 and text.lower() in d["name"].lower()]
    if not matches:
        raise AgentError(f"no {kind} device matches {text!r}: see csm-chat --list-devices, or {fix}")
    exact = [i for i in matches if devices[i]["name"].lower() == text.lower()]
    return (exact or matches)[0]


def list_devices() -> tuple[list[str], list[str]]:
    """Input and output devices as ``"INDEX: NAME"`` labels (both empty with no sound card)."""
    try:
        devices = _device_table()
    except AgentError:
        return [], []
    inputs = [f"{i}: {d['name']}" for i, d in enumerate(devices) if d["max_input_channels"] > 0]
    outputs = [f"{i}: {d['name']}" for i, d in enumerate(devices) if d["max_output_channels"] > 0]
    return inputs, outputs


def describe_devices() -> str:
    """A printable table of audio devices for ``csm-chat --list-devices``."""
    try:
        devices = _device_table()
    except AgentError as error:
        return str(error)
    if not devices:
        return f"no audio devices found: {NO_MIC_FIX}; and --speaker-file OUT.wav for output"
    lines = ["index  in  out  rate    name"]
    for i, d in enumerate(devices):
        lines.append(
            f"{i:>5}  {d['max_input_channels']:>2}  {d['max_output_channels']:>3}  "
            f"{int(d['default_samplerate']):>6}  {d['name']}"
        )
    lines.append("pick one with --input-device/--output-device INDEX or a part of its name")
    return "\n".join(lines)


def open_microphone(device: int | str | None = None, *, block_ms: int = BLOCK_MS) -> MicrophoneSource:
    """Open a live microphone (not started); AgentError naming --mic-file if there is none."""
    return MicrophoneSource(device, block_ms=block_ms)


def open_speaker(device: int | str | None = None) -> SpeakerSink:
    """Open a live speaker (not started); AgentError naming --speaker-file if there is none."""
    return SpeakerSink(device)
