"""Checkpoint directories on disk: reading their tensors lazily, writing safetensors files whole or streamed.

Tensors are read with ``safetensors`` only: nothing here ever unpickles a file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from csm_engine.config import CSMConfig
from csm_engine.errors import CSMError, first_line
from csm_engine.files import atomic_path, write_bytes_atomic
from csm_engine.weights.config_json import read_config, read_json
from csm_engine.weights.hub import (
    DEFAULT_CSM_REPO,
    MAKE_CHECKPOINT_HINT,
    MODEL_FILE,
    MODEL_INDEX_FILE,
    resolve_model_dir,
)
from csm_engine.weights.layouts import (
    ORIGINAL,
    TRANSFORMERS,
    detect_layout,
    from_transformers,
    transformers_names,
    validate_shapes,
)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint dir: ``model.safetensors`` or the shards of its index."""
    single = model_dir / MODEL_FILE
    if single.is_file():
        return [single]
    index = model_dir / MODEL_INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, "weight index").get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise CSMError(f"{absent[0]} (listed in {index.name}) is missing: re-download the checkpoint")
        if files:
            return files
    if (model_dir / "ckpt.pt").is_file():
        raise CSMError(f"{model_dir} holds only ckpt.pt, a pickle this engine never loads; use a directory "
                       f"with {MODEL_FILE} (the hub repo {DEFAULT_CSM_REPO} has one)")
    raise CSMError(f"model weights not found: {single} (write a checkpoint with {MAKE_CHECKPOINT_HINT} "
                   f"or pass a hub repo id such as {DEFAULT_CSM_REPO})")


class Checkpoint:
    """An opened checkpoint directory: config, layout and lazily read tensors (original names)."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self.dir = model_dir
        self.config = read_config(model_dir)
        self._handles = {}
        self._where: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for path in weight_files(model_dir):
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
                for key in handle.keys():
                    self._where[key] = path
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
            except CSMError:
                raise
            except Exception as e:  # safetensors raises its own error types on torn/foreign files
                raise CSMError(f"{path} is not a readable safetensors file ({first_line(e)}); "
                               "re-download it or rewrite it with make-checkpoint") from None
            self._handles[path] = handle
        self.layout = detect_layout(list(shapes))
        if self.layout == ORIGINAL:
            self._names = {k: k for k in shapes}  # original name -> stored name
        else:
            self._names = transformers_names(list(shapes), self.config, str(model_dir))
        validate_shapes({o: shapes[s] for o, s in self._names.items()}, self.config, model_dir)

    def names(self) -> list[str]:
        return list(self._names)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of one tensor (original name), read from the file header only."""
        stored = self._names[name]
        code = self._handles[self._where[stored]].get_slice(stored).get_dtype()
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(code, torch.float32)

    def tensor(self, name: str) -> Tensor:
        """One tensor in original layout (q/k rows back in interleaved order), read from disk now."""
        stored = self._names[name]
        tensor = self._handles[self._where[stored]].get_tensor(stored)
        return from_transformers(name, tensor, self.config) if self.layout == TRANSFORMERS else tensor

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        for name in self._names:
            yield name, self.tensor(name)


def open_checkpoint(path_or_repo: str | os.PathLike | None = None) -> Checkpoint:
    """Open (downloading if needed) a checkpoint; config and every tensor's name and shape are validated."""
    return Checkpoint(resolve_model_dir(path_or_repo))


def load_state_dict(path_or_repo: str | os.PathLike | None = None) -> tuple[CSMConfig, dict[str, Tensor]]:
    """(config, original-layout state dict) of a checkpoint dir or hub repo id, either layout."""
    ckpt = open_checkpoint(path_or_repo)
    return ckpt.config, dict(ckpt.tensors())


def save_safetensors(path: Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """``tensors`` (contiguous CPU copies are made) as one safetensors file, written atomically."""
    from safetensors.torch import save

    write_bytes_atomic(path, save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                                  metadata=metadata))


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                       torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                      tensors: Iterable[tuple[str, Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor (the header is built from ``specs`` first).

    ``tensors`` must yield exactly ``specs``' names, shapes and dtypes in the same order, so a
    whole model never needs a second copy in memory. Written atomically (``csm_engine.files``):
    a crash leaves no torn file.
    """
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        expected = iter(specs)
        for name, tensor in tensors:
            want = next(expected, None)
            if want is None or want[0] != name or tuple(tensor.shape) != tuple(want[1]) or tensor.dtype != want[2]:
                raise ValueError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not match spec {want}")
            f.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().data)
        if next(expected, None) is not None:
            raise ValueError("fewer tensors than specs")
