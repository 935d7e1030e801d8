"""Resumable training state in ``OUT/checkpoint/``: trainable weights, optimizer moments, step.

Files (no pickles): ``weights-STEP.safetensors`` (the trainable parameters under their model
names), ``optimizer-STEP.safetensors`` (AdamW's ``step``/``exp_avg``/``exp_avg_sq`` per
parameter, as ``NAME::exp_avg``) and ``state.json`` naming them, with the step and a
fingerprint of everything that shapes the run (data, options). ``state.json`` is replaced last
and atomically, so a checkpoint is always whole: the previous one until the new one is complete.
Data order, the decoder's frame subsets and dropout are functions of (seed, step), so no random
generator state needs saving: a resumed run continues exactly where the unbroken one would be.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from csm_engine.adapters import write_json_atomic
from csm_engine.errors import CSMError, first_line
from csm_engine.weights.checkpoint import save_safetensors

CHECKPOINT_DIR = "checkpoint"
STATE_JSON = "state.json"


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    fingerprint: dict[str, Any], metrics: dict[str, Any] | None = None) -> Path:
    """Write the state after ``step`` optimizer steps (and the run's ``metrics`` so far); older files go after."""
    directory = Path(out_dir) / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    weights_file, optim_file = f"weights-{step:07d}.safetensors", f"optimizer-{step:07d}.safetensors"
    save_safetensors(directory / weights_file, params)
    moments = {}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                moments[f"{name}::{key}"] = value
    save_safetensors(directory / optim_file, moments)
    write_json_atomic(directory / STATE_JSON, {"step": step, "weights": weights_file, "optimizer": optim_file,
                                               "fingerprint": fingerprint, "metrics": metrics or {}})
    for old in directory.glob("*.safetensors"):
        if old.name not in (weights_file, optim_file):
            old.unlink(missing_ok=True)
    return directory


def read_state(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / CHECKPOINT_DIR / STATE_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CSMError(f"{path} is not valid JSON ({e}); start a new run with another --out") from None


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Keys whose values differ, one level into nested tables (``options.lr``)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(f"{key}.{k}" for k in _differences(a, b))
        elif a != b:
            out.append(key)
    return out


@torch.no_grad()
def load_checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    fingerprint: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Restore trainable weights and optimizer state; returns (the step to continue from, the saved metrics).

    CSMError when there is no checkpoint or it was made with other data or options.
    """
    from safetensors.torch import load_file

    state = read_state(out_dir)
    directory = Path(out_dir) / CHECKPOINT_DIR
    if state is None:
        raise CSMError(f"--resume: no checkpoint in {directory}; run without --resume to start training")
    changed = _differences(state.get("fingerprint", {}), fingerprint)
    if changed:
        raise CSMError(f"--resume: {directory} was made with other settings ({', '.join(changed)} differ); "
                       "pass the same data and options as the interrupted run, or a new --out")
    try:
        weights = load_file(str(directory / state["weights"]))
        moments = load_file(str(directory / state["optimizer"]))
    except Exception as e:  # a missing or foreign file: the checkpoint cannot be used
        raise CSMError(f"--resume: cannot read the checkpoint in {directory} ({first_line(e)}); "
                       "start a new run with another --out") from None
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        raise CSMError(f"--resume: {directory} holds other trainable tensors than this run; pass the same options")
    for name, p in params.items():
        p.copy_(weights[name])
    for name, p in params.items():
        slot = {key.split("::", 1)[1]: value for key, value in moments.items() if key.split("::", 1)[0] == name}
        if slot:
            optimizer.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in slot.items()}
    return int(state["step"]), dict(state.get("metrics") or {})
