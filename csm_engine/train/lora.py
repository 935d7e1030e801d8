"""What is trained: LoRA through ``peft`` on the model's own ``nn.Linear`` layers, or every weight.

LoRA layers are injected by module name (``peft.inject_adapter_in_model``): a target such as
``q_proj`` matches every module whose name ends in ``.q_proj`` (the backbone's and the
decoder's). After injection a layer computes ``W x + (alpha / rank) * B A x``; only A, B (and
any ``--train-also`` tensors) take gradients. The adapter's tensors are named in the
original checkpoint layout (``backbone.layers.0.attn.q_proj.lora_A``, see ``csm_engine.adapters``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from csm_engine.adapters import LORA_A, LORA_B, Adapter
from csm_engine.errors import CSMError

ADAPTER_NAME = "default"
# Attention and MLP projections of both transformers (what csm-streaming and csm-mlx adapt too).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def add_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Inject LoRA layers into ``model`` in place; returns the adapted module names. CSMError for bad targets."""
    if settings.rank < 1:
        raise CSMError(f"--lora-rank must be >= 1, got {settings.rank}")
    if not 0 <= settings.dropout < 1:
        raise CSMError(f"--lora-dropout must be in [0, 1), got {settings.dropout}")
    linears = _linear_names(model)
    for target in settings.targets:
        if not any(n == target or n.endswith(f".{target}") for n in linears):
            known = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise CSMError(f"--lora-targets: no linear layer is named {target!r} (known: {', '.join(known)})")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    return list(lora_layers(model))


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Adapted module name (original layout) -> its peft LoRA layer."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def resolve_train_also(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """Parameter names (original layout) of the modules or parameters ``names`` trains whole."""
    params = dict(model.named_parameters())
    out: list[str] = []
    for name in names:
        found = [p for p in params if p == name or p.startswith(f"{name}.")]
        if not found or any(".base_layer." in p or ".lora_" in p for p in found):
            raise CSMError(f"--train-also {name!r}: no such parameter or module outside the LoRA layers "
                           "(e.g. codebook0_head, audio_head, projection)")
        out.extend(found)
    return out


def mark_trainable(model: nn.Module, full: bool, train_also: list[str]) -> list[str]:
    """Set requires_grad (every parameter for full fine-tuning, else LoRA + ``train_also``); kept float32.

    Returns the trainable parameter names.
    """
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(full or ".lora_" in name or name in train_also)
        if p.requires_grad:
            if p.dtype != torch.float32:
                p.data = p.data.float()  # master copies stay float32; compute may autocast
            names.append(name)
    if not names:
        raise CSMError("nothing to train: give --lora-targets or --train-also, or use --full")
    return names


def adapter_tensors(model: nn.Module, replaced: list[str]) -> dict[str, Tensor]:
    """The adapter's tensors: ``M.lora_A`` / ``M.lora_B`` per LoRA layer and each replaced parameter."""
    params = dict(model.named_parameters())
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.{LORA_A}"] = layer.lora_A[ADAPTER_NAME].weight.detach().float().cpu().clone()
        out[f"{name}.{LORA_B}"] = layer.lora_B[ADAPTER_NAME].weight.detach().float().cpu().clone()
    for name in replaced:
        out[name] = params[name].detach().float().cpu().clone()
    return out


@torch.no_grad()
def load_lora(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Inject the adapter's LoRA layers into a base model and load its tensors (unmerged, as trained).

    Logits are then computed exactly as by the model that was trained; ``csm_engine.adapters``
    merges instead (the inference path).
    """
    lora = adapter.info.get("lora") or {}
    if lora:
        add_lora(model, LoraSettings(rank=int(lora["rank"]), alpha=float(lora["alpha"]),
                                     dropout=float(lora.get("dropout", 0.0)), targets=tuple(lora["targets"])))
    params = dict(model.named_parameters())
    for name, layer in lora_layers(model).items():
        layer.lora_A[ADAPTER_NAME].weight.copy_(adapter.tensors[f"{name}.{LORA_A}"])
        layer.lora_B[ADAPTER_NAME].weight.copy_(adapter.tensors[f"{name}.{LORA_B}"])
    for name in adapter.replaced():
        params[name].copy_(adapter.tensors[name])
    return model
