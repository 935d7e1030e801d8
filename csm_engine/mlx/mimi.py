"""Mimi's streaming decoder on MLX (``moshi_mlx``), beside the torch codec that still encodes clips.

``MLXMimiCodec`` wraps a loaded ``MimiCodec``: ``encode`` / ``decode`` of whole clips stay the
torch ones (context clips are encoded once and remembered), ``streaming()`` decodes frame by
frame with moshi_mlx's Mimi holding the same weights, so the generator's streaming path is
MLX end to end. The weights come from the torch model itself (its state dict in moshi's
layout, which ``moshi_mlx``'s ``load_pytorch_weights`` maps), so a random-init test codec and a
downloaded one are handled alike. moshi_mlx is optional: ``available()`` says whether it imports.
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from torch import Tensor

from csm_engine.codec import NUM_CODEBOOKS, MimiCodec
from csm_engine.errors import CSMError

MIMI_ENGINES = ("torch", "mlx")
INSTALL = "pip install --no-deps moshi-mlx==0.3.0 rustymimi==0.4.1 sphn==0.2.1"


def available() -> bool:
    return importlib.util.find_spec("moshi_mlx") is not None


def _released_name(name: str) -> str:
    """A torch moshi parameter name as in the released Mimi file (moshi >= 0.2.5 keeps attention
    projections in lists: ``in_projs.0.weight``), which ``load_pytorch_weights`` expects."""
    return name.replace(".self_attn.in_projs.0.weight", ".self_attn.in_proj_weight").replace(
        ".self_attn.out_projs.0.weight", ".self_attn.out_proj.weight")


def _mlx_mimi_from(codec: MimiCodec):
    """moshi_mlx's Mimi with the torch codec's weights (through a temporary safetensors file)."""
    from moshi_mlx.models.mimi import Mimi, mimi_202407
    from safetensors.torch import save_file

    model = Mimi(mimi_202407(NUM_CODEBOOKS))
    state = {_released_name(k): v.detach().float().cpu().contiguous() for k, v in codec.mimi.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mimi.safetensors"
        save_file(state, str(path))
        model.load_pytorch_weights(str(path), strict=True)
    materialize(model)
    return model


def _arrays(obj, seen: set[int]) -> list[mx.array]:
    """Every MLX array reachable from ``obj`` (modules, caches, lists, dicts, plain objects)."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, mx.array):
        return [obj]
    if isinstance(obj, (list, tuple)):
        items = list(obj)
    else:
        items = list(obj.values()) if isinstance(obj, dict) else []  # an mlx.nn.Module is a dict too
        if hasattr(obj, "__dict__") and type(obj).__module__.startswith(("moshi_mlx", "mlx")):
            items += list(vars(obj).values())
    return [a for item in items for a in _arrays(item, seen)]


def materialize(model) -> None:
    """Evaluate all of Mimi's state now: a lazy array can only be evaluated on the thread that
    made it, and the agent loads on one thread and speaks on another."""
    mx.eval(_arrays(model, set()))


class MLXStreamingDecoder:
    """``StreamingDecoder``'s contract (codes in, 1920 float32 samples per frame out) on MLX."""

    def __init__(self, model):
        self._model = model
        self.frames_decoded = 0

    def decode_frame(self, codes: Tensor) -> Tensor:
        if codes.dim() == 1:
            codes = codes[:, None]
        pcm = self._model.decode_step(mx.array(codes.numpy().astype(np.int32))[None])
        mx.eval(pcm)
        self.frames_decoded += codes.shape[-1]
        return torch.from_numpy(np.array(pcm[0, 0], dtype=np.float32))


class MLXMimiCodec:
    """The torch ``MimiCodec`` for whole clips, MLX for streaming decode (see the module docstring)."""

    def __init__(self, codec: MimiCodec):
        if not available():
            raise CSMError(f"Mimi on MLX needs moshi_mlx: {INSTALL}")
        self.torch_codec = codec
        self.sample_rate, self.samples_per_frame = codec.sample_rate, codec.samples_per_frame
        self.num_codebooks = codec.num_codebooks
        self.mimi = _mlx_mimi_from(codec)

    @property
    def device(self) -> torch.device:
        return self.torch_codec.device

    def encode(self, wav: Tensor) -> Tensor:
        return self.torch_codec.encode(wav)

    def decode(self, codes: Tensor) -> Tensor:
        return self.torch_codec.decode(codes)

    @contextlib.contextmanager
    def streaming(self) -> Iterator[MLXStreamingDecoder]:
        """Frame-by-frame decoding on MLX; the streaming state is reset on entry and exit."""
        self.mimi.reset_all()
        try:
            yield MLXStreamingDecoder(self.mimi)
        finally:
            self.mimi.reset_all()
            materialize(self.mimi)


__all__ = ["INSTALL", "MIMI_ENGINES", "MLXMimiCodec", "MLXStreamingDecoder", "available"]
