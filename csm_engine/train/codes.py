"""Audio -> Mimi codes, once: each clip is read at 24 kHz, trimmed of silent ends, encoded, cached.

The cache is keyed by content: a hash of the Mimi weights file and of the trimmed 24 kHz
samples, so a renamed clip is not encoded again and a changed one is. Each entry is one small
safetensors file written temp-then-rename (an interrupted run leaves no torn entry).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from csm_engine.config import SAMPLE_RATE, SAMPLES_PER_FRAME
from csm_engine.errors import CSMError
from csm_engine.files import cache_dir
from csm_engine.train.data import AudioRef, Utterance

SILENCE_DBFS = -45.0  # below this (RMS over 20 ms) counts as silence at a clip's ends
KEEP_SILENCE_S = 0.12  # silence kept before and after speech when trimming


@dataclass(frozen=True)
class EncodedUtterance:
    """An utterance with its Mimi codes (num_codebooks, frames); codes None for text-only context."""

    utterance: Utterance
    codes: Tensor | None


def default_cache_dir() -> Path:
    """``$CSM_CODES_CACHE_DIR`` or the user cache dir (``~/.cache/csm-chat/codes`` on Linux)."""
    return cache_dir("codes", "CSM_CODES_CACHE_DIR")


def file_key(path: Path) -> str:
    """A quick content key of a (large) file: its size and first and last MiB."""
    h = hashlib.blake2b(digest_size=12)
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()


def load_utterance_audio(ref: AudioRef) -> Tensor:
    """The referenced audio as float32 (samples,) at 24 kHz; CSMError for missing/corrupt/empty files."""
    from csm_engine.audio_io import load_audio

    if ref.voice is not None:
        from csm_engine.voices import load_voice_audio

        audio = load_voice_audio(ref.voice)
    else:
        audio = load_audio(ref.path, sample_rate=SAMPLE_RATE)
        if ref.start or ref.stop is not None:
            audio = audio[ref.start:ref.stop]
    return audio


def trim_silence(audio: Tensor, threshold_dbfs: float = SILENCE_DBFS, keep_s: float = KEEP_SILENCE_S) -> Tensor:
    """``audio`` (24 kHz) without the silence at its ends beyond ``keep_s``; all-silent audio -> empty.

    Long silent tails are a known weak spot of CSM (it sometimes never stops): training on
    clips that end in seconds of silence would teach exactly that.
    """
    hop = SAMPLE_RATE // 50
    n = audio.numel() // hop
    if n == 0:
        return audio
    rms = audio[: n * hop].float().view(n, hop).pow(2).mean(dim=1).sqrt()
    loud = (rms > 10 ** (threshold_dbfs / 20)).nonzero()
    if loud.numel() == 0:
        return audio[:0]
    keep = int(keep_s * SAMPLE_RATE)
    start = max(0, int(loud[0]) * hop - keep)
    stop = min(audio.numel(), (int(loud[-1]) + 1) * hop + keep)
    return audio[start:stop]


class CodesCache:
    """Mimi codes on disk, keyed by (codec weights, samples)."""

    def __init__(self, directory: Path, codec_key: str):
        self.directory = Path(directory) / codec_key
        self.codec_key = codec_key

    def _path(self, audio: Tensor) -> Path:
        digest = hashlib.blake2b(audio.detach().float().cpu().numpy().tobytes(), digest_size=16).hexdigest()
        return self.directory / digest[:2] / f"{digest}.safetensors"

    def get(self, audio: Tensor) -> Tensor | None:
        from safetensors.torch import load_file

        path = self._path(audio)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["codes"].long()
        except Exception:  # a foreign or damaged entry: encode again and overwrite it
            return None

    def put(self, audio: Tensor, codes: Tensor) -> None:
        from csm_engine.weights.checkpoint import save_safetensors

        path = self._path(audio)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors(path, {"codes": codes.to(torch.int16)})
        except OSError:
            pass  # a read-only cache only costs the next run an encoding


def encode_utterances(utterances: list[Utterance], codec, cache: CodesCache | None, *, trim: bool = True,
                      progress: bool = True) -> list[EncodedUtterance]:
    """Read, trim and encode every utterance with audio (cached); text-only ones pass through.

    A missing, unreadable, empty or all-silent clip is a CSMError naming it and the fix.
    """
    from tqdm import tqdm

    out = []
    with_audio = sum(u.audio is not None for u in utterances)
    bar = tqdm(total=with_audio, desc="encoding audio with Mimi", unit="clip", disable=not progress or not with_audio)
    hits = 0
    try:
        for u in utterances:
            if u.audio is None:
                out.append(EncodedUtterance(u, None))
                continue
            try:
                audio = load_utterance_audio(u.audio)
            except CSMError as e:
                raise CSMError(f"{u.source}: {e}") from None
            if trim:
                audio = trim_silence(audio)
            if audio.numel() < SAMPLES_PER_FRAME:
                problem = "is empty" if audio.numel() == 0 else "is silent or shorter than one 80 ms frame"
                raise CSMError(f"{u.source}: the clip {u.audio.describe()} {problem}; re-record it or remove it "
                               "(and its transcript)")
            codes = cache.get(audio) if cache is not None else None
            if codes is None:
                codes = codec.encode(audio).long()
                if cache is not None:
                    cache.put(audio, codes)
            else:
                hits += 1
            out.append(EncodedUtterance(u, codes))
            bar.set_postfix(cached=hits, refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return out
