"""``csm-finetune --merge``: base checkpoint + adapter -> a checkpoint directory in the original layout.

The merged directory is what ``make-checkpoint`` and Sesame's release look like
(``config.json`` + ``model.safetensors``, with the base's ``tokenizer.json`` and Mimi weights
copied next to them when it had them), so every loader takes it: ``csm-generate --csm-model``,
``csm-chat --csm-model``, the MLX backend. Tensors keep the base's dtypes and are merged and
written one at a time (peak memory: one tensor, not a second model). The directory is built
under a temporary name and renamed into place whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from csm_engine import weights
from csm_engine.adapters import ADAPTER_JSON, Adapter, check_adapter_fits, lora_delta
from csm_engine.errors import CSMError
from csm_engine.files import atomic_path, write_text_atomic


def _merged_tensors(ckpt: weights.Checkpoint, adapter: Adapter):
    lora = set(adapter.lora_modules())
    replaced = set(adapter.replaced())
    for name, tensor in ckpt.tensors():
        module = name.removesuffix(".weight")
        if name in replaced:
            tensor = adapter.tensors[name].to(tensor.dtype)
        elif module in lora and name.endswith(".weight"):
            tensor = (tensor.float() + lora_delta(adapter, module)).to(tensor.dtype)
        yield name, tensor


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_merged_checkpoint(adapter: Adapter, out_dir: str | os.PathLike, model_path: str | None = None) -> Path:
    """Merge ``adapter`` into its base (``model_path``, default the one it was trained on) and write ``out_dir``."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CSMError(f"--out {out} already exists; pass a new directory for the merged checkpoint")
    if not out.parent.is_dir():
        raise CSMError(f"--out {out}: directory {out.parent} does not exist (create it first)")
    base = model_path or adapter.info.get("base_model")
    ckpt = weights.open_checkpoint(base)
    shapes = weights.expected_shapes(ckpt.config)
    check_adapter_fits(adapter, ckpt.config, shapes)
    specs = [(name, shapes[name], ckpt.dtype(name)) for name in ckpt.names()]
    with atomic_path(out, directory=True) as tmp:
        weights.write_safetensors(tmp / weights.MODEL_FILE, specs, _merged_tensors(ckpt, adapter))
        write_text_atomic(tmp / weights.CONFIG_FILE, json.dumps(ckpt.config.to_json_dict(), indent=2) + "\n")
        for name in (weights.TOKENIZER_FILE, weights.MIMI_FILE):
            if (ckpt.dir / name).is_file():
                _link_or_copy(ckpt.dir / name, tmp / name)
        shutil.copy2(adapter.path / ADAPTER_JSON, tmp / f"merged-{ADAPTER_JSON}")  # provenance
    return out
