"""Audio files in and out of the engine: any readable file -> 24 kHz mono; 24 kHz mono -> PCM16 WAV."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from csm_engine.config import SAMPLE_RATE
from csm_engine.errors import CSMError


def resample(samples: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling of float samples (..., n) between integer rates."""
    if from_rate == to_rate:
        return samples
    from scipy.signal import resample_poly

    g = math.gcd(int(from_rate), int(to_rate))
    return resample_poly(samples, int(to_rate) // g, int(from_rate) // g, axis=-1).astype(np.float32)


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """Read an audio file (WAV/FLAC/OGG...) as float32 mono (samples,) at ``sample_rate`` (24 kHz).

    Channels are averaged; other rates are resampled. Missing, unreadable or empty files raise
    CSMError naming the file.
    """
    import soundfile

    path = Path(path).expanduser()
    if not path.is_file():
        raise CSMError(f"audio file not found: {path} (check the path)")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports every unreadable file with its own error type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CSMError(f"cannot read {path} as audio ({first}); pass a WAV, FLAC or OGG file") from None
    if data.shape[0] == 0:
        raise CSMError(f"{path} holds no audio samples; pass a non-empty recording")
    mono = data.mean(axis=1)
    if not np.all(np.isfinite(mono)):
        raise CSMError(f"{path} contains NaN or infinite samples; re-export the recording")
    return torch.from_numpy(np.ascontiguousarray(resample(mono, int(rate), sample_rate), dtype=np.float32))


def write_wav(path: str | os.PathLike, wav: Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write mono float samples in [-1, 1] as a PCM16 WAV, atomically (temp file + rename)."""
    import soundfile

    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise CSMError(f"cannot write {path}: directory {path.parent} does not exist (create it or choose "
                       "another --output)")
    samples = wav.detach().to("cpu", torch.float32).numpy() if isinstance(wav, Tensor) else np.asarray(wav, np.float32)
    if samples.ndim != 1:
        raise CSMError(f"expected mono audio (samples,), got shape {samples.shape}")
    samples = np.clip(np.nan_to_num(samples), -1.0, 1.0)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.wav")
    try:
        soundfile.write(str(tmp), samples, sample_rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except OSError as e:
        raise CSMError(f"cannot write {path}: {e.strerror or e}") from None
    except soundfile.LibsndfileError as e:
        raise CSMError(f"cannot write {path}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
