"""CSM on MLX (Apple Silicon; ``mlx[cpu]`` on Linux for tests).

Importing this package never needs MLX: ``is_available()`` says whether it can run, and every
entry point raises ``CSMError`` with the install command when it cannot.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import TYPE_CHECKING, Any

from csm_engine.errors import CSMError

if TYPE_CHECKING:
    from csm_engine.mlx.generator import MLXGenerator

NOT_AVAILABLE = "MLX backend not available: pip install 'mlx[cpu]' (Linux) or mlx (macOS)"

_LAZY = {
    "MLXGenerator": "csm_engine.mlx.generator",
    "MLXCSMModel": "csm_engine.mlx.model",
    "load_mlx_model": "csm_engine.mlx.convert",
    "state_dict_to_mlx": "csm_engine.mlx.convert",
    "build_model": "csm_engine.mlx.convert",
    "bench_mlx": "csm_engine.mlx.bench",
}

_available: bool | None = None


def is_available() -> bool:
    """True when ``mlx.core`` imports (it can be installed yet unusable, e.g. plain ``mlx`` on Linux)."""
    global _available
    if _available is None:
        if importlib.util.find_spec("mlx") is None:
            _available = False
        else:
            try:
                importlib.import_module("mlx.core")
                _available = True
            except Exception:
                _available = False
    return _available


def require_mlx() -> None:
    """Raise the one-line CSMError naming the install command when MLX cannot run here."""
    if not is_available():
        raise CSMError(NOT_AVAILABLE)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        require_mlx()
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_generator(model_path: str | os.PathLike | None = None, *, mimi_path: str | None = None,
                   tokenizer_path: str | None = None, precision: str | None = None,
                   quantize_bits: int | None = None, dtype: str | None = None, device: str = "cpu",
                   adapter: str | os.PathLike | None = None, mimi: str | None = None) -> MLXGenerator:
    """An ``MLXGenerator`` from a checkpoint dir or hub id, as ``csm_engine.generator.load_generator``.

    ``precision``: an MLX precision (``csm_engine.mlx.precisions``: float32, bfloat16, int8, int4);
    None or "auto" is this machine's default (by the Apple chip's bandwidth; float32 elsewhere).
    ``quantize_bits`` (4 or 8) and ``dtype`` (float32, bfloat16, float16) are csm-generate-mlx's
    older spelling and win when given. ``device`` is where the torch Mimi codec runs.
    ``adapter``: a csm-finetune output merged into the weights before conversion. ``mimi``:
    where frames are decoded while streaming, "mlx" (moshi_mlx's Mimi) or "torch"; None is
    ``$CSM_MLX_MIMI``, else MLX where moshi_mlx is installed (clips are encoded by torch's Mimi).
    """
    require_mlx()
    if quantize_bits is not None and quantize_bits not in (4, 8):
        raise CSMError(f"unsupported quantization: {quantize_bits} bits (use --quantize 4 or --quantize 8)")
    from csm_engine import weights
    from csm_engine.mlx.convert import load_mlx_model
    from csm_engine.mlx.generator import MLXGenerator
    from csm_engine.mlx.precisions import quant_bits, resolve

    if quantize_bits is None and dtype is None:
        chosen = resolve(precision)
        name, dtype, quantize_bits = chosen.name, chosen.dtype, quant_bits(chosen)
    else:
        name = f"{dtype or 'float32'}" + (f"+{quantize_bits}-bit" if quantize_bits else "")
    model = load_mlx_model(model_path, dtype=dtype, quantize_bits=quantize_bits, adapter=adapter)
    codec = weights.load_mimi(mimi_path, model_path=model_path, device=device)
    from csm_engine.mlx import mimi as mlx_mimi

    mimi = mimi or os.environ.get("CSM_MLX_MIMI") or ("mlx" if mlx_mimi.available() else "torch")
    if mimi not in mlx_mimi.MIMI_ENGINES:
        raise CSMError(f"unknown Mimi engine {mimi!r}: use mlx or torch")
    if mimi == "mlx":
        codec = mlx_mimi.MLXMimiCodec(codec)
    tokenizer = weights.load_text_tokenizer(tokenizer_path, model_path=model_path)
    return MLXGenerator(model, codec, tokenizer, precision=name)


__all__ = ["NOT_AVAILABLE", "is_available", "load_generator", "require_mlx", *_LAZY]
