"""Request fields -> audio and codes (400 for bad ones), and the WAV header of a stream of unknown length."""

from __future__ import annotations

import struct

import torch

from csm_engine.audio_io import AudioFileError, read_audio, resample
from csm_engine.config import SAMPLE_RATE
from csm_engine.serve import wire
from csm_engine.serve.errors import APIError

UNKNOWN_SIZE = 0xFFFFFFFF  # RIFF/data size of a stream whose length is not known yet


def wav_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono 16-bit PCM WAV header whose sizes say "until the end of the stream"."""
    return (b"RIFF" + struct.pack("<I", UNKNOWN_SIZE) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", UNKNOWN_SIZE))


def request_audio(text: str, param: str, max_seconds: float) -> torch.Tensor:
    """Base64 of an audio file (WAV, FLAC or OGG; any rate, channels averaged) -> (samples,) float32 at 24 kHz."""
    try:
        samples, rate = read_audio(wire.b64decode(text, param), label=param)
    except wire.WireError as error:
        raise APIError(400, str(error), param=param, code=error.code) from None
    except AudioFileError as error:
        raise APIError(400, str(error), param=param, code="invalid_audio") from None
    if len(samples) > max_seconds * rate:
        raise APIError(400, f"{param} is {len(samples) / rate:.1f} s long; context clips may be at most "
                       f"{max_seconds:.0f} s", param=param, code="audio_too_long")
    return torch.from_numpy(resample(samples, rate, SAMPLE_RATE))


def request_codes(text: str, param: str, num_codebooks: int = 32) -> torch.Tensor:
    """Base64 of int16 Mimi codes (``wire.encode_codes``) -> (32, frames) long, checked."""
    try:
        return wire.decode_codes(text, num_codebooks, name=param)
    except wire.WireError as error:
        raise APIError(400, str(error), param=param, code=error.code) from None
