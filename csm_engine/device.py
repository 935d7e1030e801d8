"""Which torch device to run on: ``auto`` picks the best one here; an explicit one that is absent is a CSMError."""

from __future__ import annotations

from csm_engine.errors import CSMError

DEVICES = ("auto", "cpu", "cuda", "mps")  # what --device accepts


def resolve_device(name: str | None) -> str:
    """``auto`` (or None) -> cuda, then mps, then cpu; an explicit device that is absent -> CSMError."""
    import torch

    name = (name or "auto").lower()
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if name.startswith("cuda") and not cuda:
        raise CSMError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    if name == "mps" and not mps:
        raise CSMError("--device mps: Apple's Metal backend is not available here; use --device cpu or auto")
    return name


__all__ = ["DEVICES", "resolve_device"]
