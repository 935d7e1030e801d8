"""Mimi (from ``moshi``): 24 kHz mono audio <-> 32 codebooks at 12.5 frames/s.

``MimiCodec.streaming()`` turns one frame of codes into its 1920 PCM samples as soon as the
frame exists, which is what lets playback start while later frames are still being sampled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from csm_engine.config import SAMPLE_RATE, SAMPLES_PER_FRAME
from csm_engine.errors import CSMError, first_line

NUM_CODEBOOKS = 32


class StreamingDecoder:
    """Decodes one frame at a time, carrying Mimi's convolution and attention state between calls."""

    def __init__(self, codec: MimiCodec):
        self._codec = codec
        self.frames_decoded = 0

    @torch.inference_mode()
    def decode_frame(self, codes: Tensor) -> Tensor:
        """Codes (num_codebooks,) or (num_codebooks, k) -> PCM (k * 1920,) float32."""
        if codes.dim() == 1:
            codes = codes[:, None]
        pcm = self._codec.mimi.decode(codes.to(self._codec.device)[None])
        self.frames_decoded += codes.shape[-1]
        return pcm[0, 0].float()


class MimiCodec:
    sample_rate = SAMPLE_RATE
    samples_per_frame = SAMPLES_PER_FRAME
    num_codebooks = NUM_CODEBOOKS

    def __init__(self, mimi):  # moshi.models.compression.MimiModel
        self.mimi = mimi
        self.mimi.set_num_codebooks(NUM_CODEBOOKS)
        self.mimi.eval()

    @classmethod
    def load(cls, path: str | Path | None, device: str | torch.device = "cpu") -> MimiCodec:
        """Mimi from a moshi-layout safetensors file; ``None`` builds a random-init model (tests)."""
        from moshi.models import loaders

        if path is not None and not Path(path).is_file():
            raise CSMError(f"Mimi weights not found: {path} (pass --mimi-path to {loaders.MIMI_NAME})")
        try:
            mimi = loaders.get_mimi(None if path is None else str(path), device=device, num_codebooks=NUM_CODEBOOKS)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CSMError(f"cannot load Mimi weights {path}: {first_line(e)}") from None
        return cls(mimi)

    @property
    def device(self) -> torch.device:
        return next(self.mimi.parameters()).device

    @torch.inference_mode()
    def encode(self, wav: Tensor) -> Tensor:
        """PCM (samples,) float at 24 kHz -> codes (num_codebooks, frames) long."""
        if wav.dim() != 1:
            raise CSMError(f"expected mono audio (samples,), got shape {tuple(wav.shape)}")
        if wav.numel() == 0:
            raise CSMError("cannot encode empty audio")
        return self.mimi.encode(wav.float().to(self.device)[None, None])[0].cpu()

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes (num_codebooks, frames) -> PCM (frames * 1920,) float32 at 24 kHz."""
        return self.mimi.decode(codes.to(self.device)[None])[0, 0].float().cpu()

    @contextlib.contextmanager
    def streaming(self) -> Iterator[StreamingDecoder]:
        """Frame-by-frame decoding; Mimi's streaming state is reset on entry and exit."""
        with self.mimi.streaming(1):
            yield StreamingDecoder(self)
