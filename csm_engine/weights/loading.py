"""Building models from checkpoints: CSM (filled one tensor at a time), Mimi and the text tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from csm_engine.errors import CSMError
from csm_engine.weights.checkpoint import Checkpoint, open_checkpoint
from csm_engine.weights.hub import (
    MIMI_FILE,
    MIMI_REPO,
    TOKENIZER_FILE,
    TOKENIZER_REPO,
    download_file,
    looks_like_repo_id,
    resolve_model_dir,
)


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(name, name)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise CSMError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return value


class _WeightsOnMeta(TorchFunctionMode):
    """While active (in this thread only), ``torch.empty`` allocates on the meta device.

    ``nn.Linear``/``nn.Embedding`` create their weights with ``torch.empty`` and then
    random-initialise them; on meta both cost nothing. Buffers computed from the config (rope
    tables, masks) are made by other ops and stay real. This halves peak memory and skips
    seconds of initialisation for weights the checkpoint replaces anyway.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _has_meta_tensors(module: torch.nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def load_csm_model(path_or_repo: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype | str | None = None):
    """A ``CSMModel`` in eval mode with the checkpoint's weights (``dtype`` None = float32).

    Parameters are created empty and filled one checkpoint tensor at a time, so peak memory is
    one model in ``dtype`` plus one tensor, never a random-init copy next to the loaded one.
    """
    from csm_engine.model import CSMModel

    target = as_dtype(dtype) or torch.float32
    ckpt = open_checkpoint(path_or_repo)
    with _WeightsOnMeta():
        model = CSMModel(ckpt.config)
    _fill_parameters(model, ckpt, device, target)
    if _has_meta_tensors(model):  # model.py made something else with torch.empty: build it the plain way
        model = CSMModel(ckpt.config)
        _fill_parameters(model, ckpt, device, target)
    return model.to(device).eval()


def _fill_parameters(model: torch.nn.Module, ckpt: Checkpoint, device: str | torch.device,
                     dtype: torch.dtype) -> None:
    """Replace every parameter of ``model`` by the checkpoint's tensor (names were validated on open)."""
    modules = dict(model.named_modules())
    for name, tensor in ckpt.tensors():
        owner, _, leaf = name.rpartition(".")
        module = modules[owner]
        requires_grad = getattr(module, leaf).requires_grad
        setattr(module, leaf, torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=requires_grad))
        del tensor



def _model_dir_or_none(model_path: str | os.PathLike | None) -> Path | None:
    """The checkpoint dir for a model path/repo (downloading a repo); None if there is none."""
    try:
        return resolve_model_dir(model_path)
    except CSMError:
        return None


def _find_file(explicit: str | os.PathLike | None, model_path: str | os.PathLike | None, filename: str,
               default_repo: str, what: str, fix: str) -> Path:
    """``explicit`` (file, dir or repo id), else the model dir's ``filename``, else ``default_repo``'s."""
    if explicit is not None:
        local = Path(explicit).expanduser()
        if local.is_dir():
            local = local / filename
        elif not local.exists() and looks_like_repo_id(os.fspath(explicit)):
            return download_file(os.fspath(explicit), filename, what)
        if not local.is_file():
            raise CSMError(f"{what} not found: {local} ({fix})")
        return local
    model_dir = _model_dir_or_none(model_path)
    if model_dir is not None and (model_dir / filename).is_file():
        return model_dir / filename
    return download_file(default_repo, filename, what)


def find_mimi_file(mimi_path: str | os.PathLike | None = None, *,
                   model_path: str | os.PathLike | None = None) -> Path:
    """Mimi's safetensors: ``mimi_path`` (file, dir or repo id), else the model dir's copy, else the hub."""
    return _find_file(mimi_path, model_path, MIMI_FILE, MIMI_REPO, "Mimi codec",
                      f"pass --mimi-path to {MIMI_FILE}, from the hub repo {MIMI_REPO}")


def load_mimi(mimi_path: str | os.PathLike | None = None, *, model_path: str | os.PathLike | None = None,
              device: str | torch.device = "cpu"):
    """A ``MimiCodec`` (32 codebooks) from a moshi-layout safetensors file, found as ``find_mimi_file`` says."""
    from csm_engine.codec import MimiCodec

    path = find_mimi_file(mimi_path, model_path=model_path)
    if path.suffix != ".safetensors":
        # moshi would torch.load (unpickle) anything else.
        raise CSMError(f"Mimi weights must be a .safetensors file, got {path.name} (use {MIMI_FILE} from {MIMI_REPO})")
    return MimiCodec.load(path, device=device)


def find_tokenizer_file(tokenizer_path: str | os.PathLike | None = None, *,
                        model_path: str | os.PathLike | None = None) -> Path:
    """``tokenizer.json``: ``tokenizer_path`` (file, dir or repo id), else the model dir's, else Llama-3.2's."""
    return _find_file(tokenizer_path, model_path, TOKENIZER_FILE, TOKENIZER_REPO, "text tokenizer",
                      f"pass --tokenizer-path to a tokenizer.json, e.g. from {TOKENIZER_REPO}")


def load_text_tokenizer(tokenizer_path: str | os.PathLike | None = None, *,
                        model_path: str | os.PathLike | None = None):
    """The Llama-3 style ``TextTokenizer`` (adds BOS/EOS), found as ``find_tokenizer_file`` says."""
    from csm_engine.tokens import TextTokenizer

    return TextTokenizer.from_file(find_tokenizer_file(tokenizer_path, model_path=model_path))


