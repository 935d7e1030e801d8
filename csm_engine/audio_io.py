"""Audio files in and out: any readable file -> float32 mono; float mono -> PCM16 WAV, written atomically.

``read_audio`` is the one place that reads an audio file (a path, or a file's bytes as a server
receives them): read, refuse empty files, average the channels, refuse NaN or infinite samples.
The engine (``load_audio``, 24 kHz tensors), csm-serve (base64 context clips) and the agent
(16 kHz arrays) build on it. numpy and soundfile only: the agent imports this without torch.
"""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from csm_engine.config import SAMPLE_RATE
from csm_engine.errors import CSMError, first_line
from csm_engine.files import atomic_path

if TYPE_CHECKING:
    from torch import Tensor


class AudioFileError(CSMError):
    """An audio file that cannot be used; ``reason`` is one of missing, unreadable, empty, non_finite."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def resample(samples: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling of float samples (..., n) between integer rates; always a new float32 array."""
    samples = np.asarray(samples, dtype=np.float32)
    if int(from_rate) == int(to_rate) or samples.size == 0:
        return samples.copy()
    from scipy.signal import resample_poly  # scipy.signal takes seconds to import: only when resampling

    g = math.gcd(int(from_rate), int(to_rate))
    return resample_poly(samples, int(to_rate) // g, int(from_rate) // g, axis=-1).astype(np.float32)


def read_audio(source: str | os.PathLike | bytes, *, label: str | None = None) -> tuple[np.ndarray, int]:
    """An audio file (WAV/FLAC/OGG...) as float32 mono samples at its own rate: ``(samples, rate)``.

    ``source`` is a path or a whole file's bytes; ``label`` names it in errors (default
    ``audio file PATH``). Channels are averaged. Raises ``AudioFileError`` (one line) for a
    missing, unreadable, empty or non-finite file.
    """
    import soundfile

    if isinstance(source, (bytes, bytearray)):
        label = label or "audio data"
        handle: object = io.BytesIO(source)
        if not source:
            raise AudioFileError(f"{label} is empty: it holds no audio samples; pass a non-empty recording", "empty")
    else:
        path = Path(source).expanduser()
        label = label or f"audio file {path}"
        if not path.is_file():
            raise AudioFileError(f"audio file not found: {path} (check the path)", "missing")
        if path.stat().st_size == 0:
            raise AudioFileError(f"{label} is empty (0 bytes): it holds no audio samples; pass a non-empty "
                                 "recording", "empty")
        handle = str(path)
    try:
        data, rate = soundfile.read(handle, dtype="float32", always_2d=True)
    except Exception as error:  # libsndfile reports each unreadable file with its own error type
        reason = re.sub(r"^Error opening .*?: ", "", first_line(error))  # libsndfile repeats the path
        raise AudioFileError(f"cannot read {label}: {reason} (pass a WAV, FLAC or OGG file)", "unreadable") from None
    if data.shape[0] == 0:
        raise AudioFileError(f"{label} is empty: it holds no audio samples; pass a non-empty recording", "empty")
    mono = np.ascontiguousarray(data.mean(axis=1, dtype=np.float32))
    if not np.all(np.isfinite(mono)):
        raise AudioFileError(f"{label} holds NaN or infinite samples; re-export the recording", "non_finite")
    return mono, int(rate)


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """An audio file as a float32 mono tensor (samples,) at ``sample_rate`` (24 kHz); see ``read_audio``."""
    import torch

    samples, rate = read_audio(path)
    return torch.from_numpy(resample(samples, rate, sample_rate))


def write_wav(path: str | os.PathLike, wav: Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write mono float samples in [-1, 1] as a PCM16 WAV, atomically and durably (``csm_engine.files``)."""
    import soundfile

    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise CSMError(f"cannot write {path}: directory {path.parent} does not exist (create it or choose "
                       "another --output)")
    if hasattr(wav, "detach"):  # a torch tensor
        wav = wav.detach().float().cpu().numpy()
    samples = np.asarray(wav, dtype=np.float32)
    if samples.ndim != 1:
        raise CSMError(f"expected mono audio (samples,), got shape {samples.shape}")
    samples = np.clip(np.nan_to_num(samples), -1.0, 1.0)
    try:
        with atomic_path(path) as tmp:
            soundfile.write(str(tmp), samples, int(sample_rate), subtype="PCM_16", format="WAV")
    except OSError as e:
        raise CSMError(f"cannot write {path}: {e.strerror or e}") from None
    except soundfile.LibsndfileError as e:
        raise CSMError(f"cannot write {path}: {first_line(e)}") from None
    return path


__all__ = ["AudioFileError", "load_audio", "read_audio", "resample", "write_wav"]
