"""Bytes on the wire: 16-bit PCM, a WAV header for a stream of unknown length, base64 audio and codes."""

from __future__ import annotations

import base64
import binascii
import io
import struct

import numpy as np
import torch

from csm_engine.config import SAMPLE_RATE
from csm_engine.serve.errors import APIError

MAX_CODE = 2047  # Mimi decodes codes 0..2047
UNKNOWN_SIZE = 0xFFFFFFFF  # RIFF/data size of a stream whose length is not known yet


def wav_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono 16-bit PCM WAV header whose sizes say "until the end of the stream"."""
    return (b"RIFF" + struct.pack("<I", UNKNOWN_SIZE) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", UNKNOWN_SIZE))


def pcm16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] -> little-endian 16-bit PCM."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def as_heard(data: bytes) -> np.ndarray:
    """The float32 samples a client reads back from 16-bit PCM bytes (int16 / 32768, as libsndfile does)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def _b64(text: str, param: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param} is not valid base64", param=param, code="invalid_base64") from None


def decode_audio(text: str, param: str, max_seconds: float) -> torch.Tensor:
    """Base64 of an audio file (WAV, FLAC or OGG; any rate, channels averaged) -> (samples,) float32 at 24 kHz."""
    import soundfile

    from csm_engine.audio_io import resample

    raw = _b64(text, param)
    try:
        data, rate = soundfile.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except Exception as error:  # libsndfile has its own error type per failure
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise APIError(400, f"{param} is not a readable audio file ({first}); send base64 of a WAV, FLAC or OGG file",
                       param=param, code="invalid_audio") from None
    if data.shape[0] == 0:
        raise APIError(400, f"{param} holds no samples; send a non-empty recording", param=param, code="invalid_audio")
    if data.shape[0] > max_seconds * rate:
        raise APIError(400, f"{param} is {data.shape[0] / rate:.1f} s long; context clips may be at most "
                       f"{max_seconds:.0f} s", param=param, code="audio_too_long")
    mono = data.mean(axis=1)
    if not np.all(np.isfinite(mono)):
        raise APIError(400, f"{param} contains NaN or infinite samples", param=param, code="invalid_audio")
    return torch.from_numpy(np.ascontiguousarray(resample(mono, int(rate), SAMPLE_RATE), dtype=np.float32))


def encode_codes(codes: torch.Tensor) -> str:
    """Mimi codes (32, frames) -> base64 of little-endian int16, frame by frame (frames, 32)."""
    return base64.b64encode(codes.T.contiguous().numpy().astype("<i2").tobytes()).decode("ascii")


def decode_codes(text: str, param: str, num_codebooks: int = 32) -> torch.Tensor:
    """The inverse of ``encode_codes``, checked: (32, frames) long."""
    raw = _b64(text, param)
    if not raw or len(raw) % (2 * num_codebooks):
        raise APIError(400, f"{param} must be base64 of int16 codes, {num_codebooks} per frame "
                       f"({len(raw)} bytes is not a whole number of frames)", param=param, code="invalid_codes")
    codes = np.frombuffer(raw, dtype="<i2").reshape(-1, num_codebooks)
    if codes.min() < 0 or codes.max() > MAX_CODE:
        raise APIError(400, f"{param}: codes must lie in 0..{MAX_CODE}", param=param, code="invalid_codes")
    return torch.from_numpy(codes.astype(np.int64)).T.contiguous()
