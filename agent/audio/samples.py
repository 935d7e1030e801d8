"""Samples and files: the pipeline's rates, resampling (whole or streamed), WAV files, levels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from agent.errors import AgentError
from csm_engine import audio_io
from csm_engine.audio_io import resample
from csm_engine.errors import CSMError

PIPELINE_RATE = 16_000  # Hz: what the VAD and Whisper consume
BLOCK_MS = 32  # 512 samples at 16 kHz: one Silero VAD window
PLAYBACK_BLOCK_MS = 20  # how finely sinks hand audio to the speaker; bounds the barge-in delay


def _as_mono_float32(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:  # (samples, channels), as soundfile and sounddevice give it
        audio = audio.mean(axis=1, dtype=np.float32)
    elif audio.ndim != 1:
        raise ValueError(f"audio must be 1-D or (samples, channels), got shape {audio.shape}")
    return np.ascontiguousarray(audio)


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
        from scipy.signal import resample_poly  # scipy.signal takes seconds to import: only when resampling
        c = self._context
        window = np.concatenate([self._left, self._pending[: ready + c]])
        out = resample_poly(window, self._up, self._down).astype(np.float32)
        start = c * self._up // self._down
        out = out[start : start + ready * self._up // self._down]
        self._left = window[ready : ready + c].copy()
        self._pending = self._pending[ready:]
        return out


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 mono (channels averaged) at its own rate: ``(samples, rate)``.

    ``csm_engine.audio_io.read_audio``, with its one-line errors as AgentErrors.
    """
    try:
        return audio_io.read_audio(path)
    except CSMError as error:
        raise AgentError(str(error)) from None


def load_audio(path: str | Path, sample_rate: int = PIPELINE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono resampled to ``sample_rate`` Hz (the pipeline's 16 kHz by default)."""
    audio, rate = read_wav(path)
    return resample(audio, rate, sample_rate)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write float32 mono audio as 16-bit PCM WAV, atomically and durably, creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return audio_io.write_wav(path, _as_mono_float32(audio), int(sample_rate))
    except CSMError as error:
        raise AgentError(str(error)) from None


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
