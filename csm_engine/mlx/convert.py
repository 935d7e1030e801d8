"""Torch state dict (original Sesame layout) -> MLX model, with converted weights cached on disk.

The conversion is a rename-free copy except for ``audio_head`` (31, dec_dim, vocab), which
becomes 31 ``Linear`` weights ``audio_head.N.weight`` (vocab, dec_dim). Converted weights of a
checkpoint directory are kept in ``<cache dir>/<key>.safetensors`` (with the model config in
the file's metadata), where the key hashes the checkpoint files' names, sizes, mtimes and their
first and last MiB plus the target dtype, so a second load never touches torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from csm_engine.config import CSMConfig
from csm_engine.errors import CSMError, first_line
from csm_engine.files import atomic_path, cache_dir
from csm_engine.mlx.model import MLXCSMModel

CONVERTER_VERSION = 1
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_QUANT_BITS = (4, 8)


def mlx_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    """``None`` -> float32 (the torch engine's semantics); also accepts the names float32/bfloat16/float16."""
    if dtype is None:
        return mx.float32
    if isinstance(dtype, mx.Dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise CSMError(f"unsupported MLX dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _dtype_name(dtype: mx.Dtype) -> str:
    return next(k for k, v in _DTYPES.items() if v == dtype)


def state_dict_to_mlx(state_dict: Mapping[str, object], config: CSMConfig,
                      dtype: str | mx.Dtype | None = None) -> dict[str, mx.array]:
    """Torch tensors of the original layout -> MLX arrays named as ``MLXCSMModel`` parameters."""
    import torch

    target = mlx_dtype(dtype)

    def to_mx(t: torch.Tensor) -> mx.array:
        # numpy has no bfloat16: go through float32 (one tensor at a time keeps the peak small).
        return mx.array(t.detach().to("cpu", torch.float32).contiguous().numpy()).astype(target)

    out: dict[str, mx.array] = {}
    for name, tensor in state_dict.items():
        if name == "audio_head":
            expected = (config.audio_num_codebooks - 1, config.decoder.dim, config.audio_vocab_size)
            if tuple(tensor.shape) != expected:
                raise CSMError(f"audio_head has shape {tuple(tensor.shape)}, expected {expected}: "
                               "the checkpoint does not match its config.json")
            for i in range(tensor.shape[0]):
                out[f"audio_head.{i}.weight"] = to_mx(tensor[i].T)
        else:
            out[name] = to_mx(tensor)
    return out


def build_model(config: CSMConfig, weights: Mapping[str, mx.array], *, quantize_bits: int | None = None,
                group_size: int = 64) -> MLXCSMModel:
    """An ``MLXCSMModel`` holding ``weights`` (strict), optionally quantized, with caches set up."""
    model = MLXCSMModel(config)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CSMError(f"checkpoint does not fit the MLX model: {first_line(e)}") from None
    dtypes = {w.dtype for w in weights.values()}
    model.cache_dtype = mx.float32 if mx.float32 in dtypes or not dtypes else next(iter(dtypes))
    if quantize_bits is not None:
        quantize_model(model, quantize_bits, group_size)
    mx.eval(model.parameters())
    model.setup_caches(1)
    return model


def quantize_model(model: MLXCSMModel, bits: int, group_size: int = 64) -> MLXCSMModel:
    """Weight-only affine quantization of every Linear and Embedding (in place).

    A layer whose input width is not a multiple of ``group_size`` uses groups of 32, and is left
    in full precision when even that does not divide it (only happens for toy sizes).
    """
    if bits not in _QUANT_BITS:
        raise CSMError(f"unsupported quantization: {bits} bits (use --quantize 4 or --quantize 8)")

    def predicate(_path: str, module: nn.Module):
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        width = module.weight.shape[-1]
        for gs in (group_size, 32):
            if width % gs == 0:
                return {"group_size": gs, "bits": bits, "mode": "affine"}
        return False

    nn.quantize(model, class_predicate=predicate)
    model.__dict__.pop("_compiled", None)  # compiled frame functions captured the float layers
    return model


# ---------------------------------------------------------------------------------------------
# On-disk cache of converted weights
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$CSM_MLX_CACHE_DIR`` or the user cache dir (``~/.cache/csm-chat/mlx`` on Linux)."""
    return cache_dir("mlx", "CSM_MLX_CACHE_DIR")


def _checkpoint_files(model_dir: Path) -> list[Path]:
    files = sorted(p for p in model_dir.glob("model*.safetensors") if p.is_file())
    files += [p for p in (model_dir / "config.json",) if p.is_file()]
    return files


def checkpoint_key(model_dir: Path, dtype: mx.Dtype) -> str | None:
    """Cache key of a checkpoint dir's weights, or None when it holds no ``model*.safetensors``."""
    files = _checkpoint_files(model_dir)
    if not any(p.suffix == ".safetensors" for p in files):
        return None
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{CONVERTER_VERSION}:{_dtype_name(dtype)}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with p.open("rb") as f:
            h.update(f.read(1 << 20))
            if st.st_size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read(1 << 20))
    return h.hexdigest()


def _read_cached(path: Path) -> tuple[CSMConfig, dict[str, mx.array]] | None:
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
        config = CSMConfig.from_json_dict(json.loads(metadata["csm_config"]))
    except Exception:  # a torn or foreign file: convert again and overwrite it
        return None
    return config, weights


def _write_cached(path: Path, config: CSMConfig, weights: Mapping[str, mx.array]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # keeps the .safetensors suffix, which mx.save_safetensors wants
        mx.save_safetensors(str(tmp), dict(weights), metadata={"csm_config": json.dumps(config.to_json_dict())})


def load_mlx_weights(model_path: str | os.PathLike | None, *, dtype: str | mx.Dtype | None = None,
                     cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                     adapter: str | os.PathLike | None = None) -> tuple[CSMConfig, dict[str, mx.array]]:
    """(config, MLX weights) of a checkpoint dir or hub id, from the conversion cache when possible.

    ``adapter`` (a csm-finetune output) is merged into the torch weights before conversion; such
    weights are not cached (the cache key covers the checkpoint only).
    """
    target = mlx_dtype(dtype)
    key = None
    if use_cache and adapter is None and model_path is not None and Path(model_path).is_dir():
        key = checkpoint_key(Path(model_path), target)
    cached_file = Path(cache_dir or default_cache_dir()) / f"{key}.safetensors" if key else None
    if cached_file is not None and cached_file.is_file():
        hit = _read_cached(cached_file)
        if hit is not None:
            return hit

    from csm_engine import weights as torch_weights

    config, state_dict = torch_weights.load_state_dict(model_path)
    if adapter is not None:
        from csm_engine.adapters import merge_into_state_dict, read_adapter

        state_dict = merge_into_state_dict(state_dict, read_adapter(adapter), config)
    converted = state_dict_to_mlx(state_dict, config, target)
    del state_dict
    if cached_file is not None:
        try:
            _write_cached(cached_file, config, converted)
        except OSError:
            pass  # a read-only cache dir only costs the next load a conversion
    return config, converted


def load_mlx_model(model_path: str | os.PathLike | None = None, *, dtype: str | mx.Dtype | None = None,
                   quantize_bits: int | None = None, cache_dir: str | os.PathLike | None = None,
                   adapter: str | os.PathLike | None = None) -> MLXCSMModel:
    """An ``MLXCSMModel`` from a checkpoint dir or hub id (see ``csm_engine.weights``), optionally with an adapter."""
    config, converted = load_mlx_weights(model_path, dtype=dtype, cache_dir=cache_dir, adapter=adapter)
    return build_model(config, converted, quantize_bits=quantize_bits)
