"""Fine-tuned adapters: the files ``csm-finetune`` writes and how a model takes them on.

An adapter is a directory with two files:

- ``adapter.safetensors``: for each LoRA-adapted ``nn.Linear`` named ``M`` (original-layout
  module names, e.g. ``backbone.layers.0.attn.q_proj``) the tensors ``M.lora_A`` (rank, in)
  and ``M.lora_B`` (out, rank); and for each parameter trained whole (full fine-tuning, or
  LoRA with ``--train-also``) the parameter itself under its own name (``audio_head``).
- ``adapter.json``: ``{"format": "csm-adapter", "version": 1, "kind": "lora" | "full",
  "config": <the base model's config.json>, "lora": {"rank", "alpha", "targets", "modules"},
  "replaced": [names], "base_model": ..., "training": {...}, "data": {...}}``.

Applying an adapter merges it into the weights: ``W <- W + (alpha / rank) * B @ A`` for LoRA
modules, ``P <- tensor`` for replaced parameters, in float32. Generation then runs exactly as for
any checkpoint (every precision, CUDA graphs, MLX), at no cost per frame. Reading needs only
safetensors; training (``csm_engine.train``) is what needs ``peft``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from csm_engine.config import CSMConfig
from csm_engine.errors import CSMError, first_line
from csm_engine.files import write_text_atomic
from csm_engine.weights.checkpoint import save_safetensors

ADAPTER_FORMAT = "csm-adapter"
ADAPTER_VERSION = 1
ADAPTER_JSON = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
LORA_A, LORA_B = "lora_A", "lora_B"


@dataclass(frozen=True)
class Adapter:
    """A read adapter: its settings (``info``, the JSON) and tensors (names as in ``adapter.safetensors``)."""

    path: Path
    info: dict[str, Any]
    tensors: dict[str, Tensor]

    @property
    def config(self) -> CSMConfig:
        return CSMConfig.from_json_dict(self.info["config"])

    @property
    def scaling(self) -> float:
        lora = self.info.get("lora") or {}
        return float(lora["alpha"]) / float(lora["rank"]) if lora else 0.0

    def lora_modules(self) -> list[str]:
        return list((self.info.get("lora") or {}).get("modules", []))

    def replaced(self) -> list[str]:
        return list(self.info.get("replaced", []))

    def describe(self) -> str:
        lora = self.info.get("lora") or {}
        if self.info.get("kind") == "lora":
            extra = f" + {len(self.replaced())} whole tensors" if self.replaced() else ""
            return f"LoRA rank {lora.get('rank')} on {len(self.lora_modules())} layers{extra}"
        return f"full fine-tune ({len(self.replaced())} tensors)"



def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def save_adapter(directory: str | os.PathLike, info: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> Path:
    """Write ``adapter.safetensors`` then ``adapter.json`` (each atomically; the JSON last, so a
    directory whose JSON exists always has its weights)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / ADAPTER_WEIGHTS, tensors)
    full = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, **info}
    write_json_atomic(directory / ADAPTER_JSON, full)
    return directory


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read an adapter directory (or its ``adapter.json``); CSMError naming the fix when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    directory = path.parent if path.name == ADAPTER_JSON else path
    json_path = directory / ADAPTER_JSON
    if not json_path.is_file():
        raise CSMError(f"no adapter at {path}: pass the directory csm-finetune wrote (it holds {ADAPTER_JSON} "
                       f"and {ADAPTER_WEIGHTS})")
    try:
        info = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CSMError(f"{json_path} is not valid JSON ({e}); train the adapter again") from None
    if not isinstance(info, dict) or info.get("format") != ADAPTER_FORMAT:
        raise CSMError(f"{json_path} is not a csm-finetune adapter (no \"format\": \"{ADAPTER_FORMAT}\")")
    if not isinstance(info.get("version"), int) or info["version"] > ADAPTER_VERSION:
        raise CSMError(f"{json_path} has adapter version {info.get('version')!r}; this engine reads up to "
                       f"{ADAPTER_VERSION}: upgrade csm-chat")
    if info.get("kind") not in ("lora", "full") or not isinstance(info.get("config"), dict):
        raise CSMError(f"{json_path} lacks 'kind' (lora|full) or the base model's 'config'; train the adapter again")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CSMError(f"{weights} is missing next to {json_path.name}; copy the whole adapter directory")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CSMError(f"{weights} is not a readable safetensors file ({first_line(e)}); "
                       "copy it again or train the adapter again") from None
    adapter = Adapter(directory, info, tensors)
    missing = [f"{m}.{ab}" for m in adapter.lora_modules() for ab in (LORA_A, LORA_B) if f"{m}.{ab}" not in tensors]
    missing += [name for name in adapter.replaced() if name not in tensors]
    if missing:
        raise CSMError(f"{weights} lacks {missing[0]!r} that {ADAPTER_JSON} lists; copy the whole adapter directory")
    return adapter


def _model_description(config: CSMConfig) -> str:
    return f"backbone {config.backbone_flavor} ({config.backbone.dim}-dim) + decoder {config.decoder_flavor}"


def check_adapter_fits(adapter: Adapter, config: CSMConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """CSMError unless ``adapter`` was trained for a model of ``config`` whose parameters have ``shapes``."""
    try:
        trained_for = adapter.config
    except (ValueError, TypeError, KeyError) as e:
        raise CSMError(f"{adapter.path / ADAPTER_JSON}: unreadable base model config ({e}); train it again") from None
    base = adapter.info.get("base_model") or "its base model"
    if trained_for != config:
        raise CSMError(f"adapter {adapter.path} was trained for another model size "
                       f"({_model_description(trained_for)}), "
                       f"not this one ({_model_description(config)}): load it with {base}")
    for module in adapter.lora_modules():
        weight = shapes.get(f"{module}.weight")
        a, b = adapter.tensors[f"{module}.{LORA_A}"], adapter.tensors[f"{module}.{LORA_B}"]
        if weight is None or len(weight) != 2 or (b.shape[0], a.shape[1]) != tuple(weight) or a.shape[0] != b.shape[1]:
            raise CSMError(f"adapter {adapter.path}: LoRA layer {module!r} does not fit this model "
                           f"(a checkpoint of another model?): load it with {base}")
    for name in adapter.replaced():
        if tuple(shapes.get(name, ())) != tuple(adapter.tensors[name].shape):
            raise CSMError(f"adapter {adapter.path}: tensor {name!r} does not fit this model: load it with {base}")


def lora_delta(adapter: Adapter, module: str) -> Tensor:
    """The float32 weight change (out, in) LoRA makes to ``module``: scaling * B @ A."""
    a = adapter.tensors[f"{module}.{LORA_A}"].float()
    b = adapter.tensors[f"{module}.{LORA_B}"].float()
    return (b @ a) * adapter.scaling


def merge_into_state_dict(state_dict: dict[str, Tensor], adapter: Adapter, config: CSMConfig) -> dict[str, Tensor]:
    """Original-layout ``state_dict`` with ``adapter`` merged in (changed tensors replaced; dtypes kept)."""
    check_adapter_fits(adapter, config, {k: tuple(v.shape) for k, v in state_dict.items()})
    for module in adapter.lora_modules():
        name = f"{module}.weight"
        w = state_dict[name]
        state_dict[name] = (w.float() + lora_delta(adapter, module).to(w.device)).to(w.dtype)
    for name in adapter.replaced():
        state_dict[name] = adapter.tensors[name].to(dtype=state_dict[name].dtype)
    return state_dict


@torch.no_grad()
def merge_into_model(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Merge ``adapter`` into a float ``CSMModel`` in place (before any quantization)."""
    params = dict(model.named_parameters())
    check_adapter_fits(adapter, model.config, {k: tuple(v.shape) for k, v in params.items()})
    for module in adapter.lora_modules():
        w = params[f"{module}.weight"]
        w.copy_((w.float() + lora_delta(adapter, module).to(w.device)).to(w.dtype))
    for name in adapter.replaced():
        params[name].copy_(adapter.tensors[name].to(device=params[name].device, dtype=params[name].dtype))
    return model


__all__ = ["Adapter", "ADAPTER_JSON", "ADAPTER_WEIGHTS", "check_adapter_fits", "lora_delta", "merge_into_model",
           "merge_into_state_dict", "read_adapter", "save_adapter"]
