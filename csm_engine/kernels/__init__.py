"""Native CPU kernels for batch-1 inference, compiled on first use and cached.

``int8_linear(x, w, w_scale)``: float32 activations x int8 weights (per output channel scales),
with each activation row quantized to int8 in blocks of 32 (one scale per block) inside the
kernel; AVX2 + FMA (x86-64). ``attend_rows``: rope, cache writes and attention of a few new
rows in one call (the audio decoder's steps); ``block_layer``: a whole int8 layer for a few rows
in one call. See ``int8_matmul.cpp``.

The kernel is built with torch's C++ extension builder (a C++ compiler and ninja) into the
user cache, once per torch version and source: ``python -m csm_engine.kernels`` builds it ahead
of time (``make install`` does). Where it cannot be built (no compiler, not x86 with AVX2, or
``CSM_NO_KERNELS=1``), ``available()`` is False and callers fall back to torch's own kernels.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("int8_matmul.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}


def cpu_supported() -> bool:
    """x86-64 with AVX2 and FMA (what the kernel's intrinsics need)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return {"avx2", "fma"} <= set(flags)


def build_dir() -> Path:
    """Where the compiled kernel lives: the user cache, keyed by torch version and source hash."""
    from platformdirs import user_cache_dir

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    tag = f"torch{torch.__version__}".replace("+", "_")
    return Path(os.environ.get("CSM_KERNELS_DIR") or user_cache_dir("csm-chat")) / "kernels" / f"{tag}-{digest}"


def load(verbose: bool = False) -> bool:
    """Build (first time) and load the kernels; True when ``torch.ops.csm_kernels`` is usable."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        _state["ok"] = False
        if os.environ.get("CSM_NO_KERNELS", "") not in ("", "0"):
            _state["error"] = "disabled by CSM_NO_KERNELS"
            return False
        if not cpu_supported():
            _state["error"] = "this CPU is not x86-64 with AVX2 and FMA"
            return False
        try:
            from torch.utils.cpp_extension import load as build

            directory = build_dir()
            directory.mkdir(parents=True, exist_ok=True)
            build(name="csm_kernels", sources=[str(SOURCE)], build_directory=str(directory),
                  extra_cflags=["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"], extra_ldflags=["-fopenmp"],
                  is_python_module=False, verbose=verbose)
            _state["ok"] = hasattr(torch.ops.csm_kernels, "int8_linear")
        except Exception as e:  # no compiler / ninja, a failed build: fall back, say why once
            _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return bool(_state["ok"])


def available() -> bool:
    """Whether the kernels load on this machine (builds them on first call)."""
    return load()


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None when it is True or was not asked yet)."""
    return None if _state.get("ok") else _state.get("error")  # type: ignore[return-value]


TILE, BLOCK = 4, 32


def pack_int8(w: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) weights -> the kernel's layout (ceil(N / 4), K / 32, 4, 32); missing rows are zeros."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"in_features must be a multiple of {BLOCK}, got {k}")
    n_pad = -n % TILE
    if n_pad:
        w = torch.cat([w, w.new_zeros(n_pad, k)])
    return w.reshape(-1, TILE, k // BLOCK, BLOCK).transpose(1, 2).contiguous()


def unpack_int8(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of ``pack_int8``: (N, K) int8."""
    tiles, blocks = packed.shape[:2]
    return packed.transpose(1, 2).reshape(tiles * TILE, blocks * BLOCK)[:n]


def attend_rows(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, pos: int, n_heads: int) -> torch.Tensor:
    """Rope + KV-cache write + causal attention for T new rows at ``pos`` from fused [q | k | v]:
    (B, T, W) -> (B, T, H * D)."""
    return torch.ops.csm_kernels.attend_rows(qkv, cos, sin, k_cache, v_cache, pos, n_heads)


def block_layer(x: torch.Tensor, weights: tuple, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, n_heads: int) -> torch.Tensor:
    """One int8-block transformer layer for a few rows at ``pos`` in one call (see ``int8_matmul.cpp``).

    ``weights``: (qkv_w, qkv_s, sa_norm, o_w, o_s, w13_w, w13_s, mlp_norm, w2_w, w2_s), packed
    int8 weights with their scales and the two RMSNorm weights folded into their calls.
    """
    (qkv_w, qkv_s, sa_norm, o_w, o_s, w13_w, w13_s, mlp_norm, w2_w, w2_s) = weights
    return torch.ops.csm_kernels.block_layer(x, qkv_w, qkv_s, sa_norm, o_w, o_s, w13_w, w13_s, mlp_norm, w2_w, w2_s,
                                             eps, cos, sin, k_cache, v_cache, pos, n_heads)


def int8_linear(x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """y = x @ (w * w_scale[:, None]).T; x float32 (..., K), w int8 (N, K) in [-127, 127] packed by
    ``pack_int8``, w_scale float32 (N,)."""
    return torch.ops.csm_kernels.int8_linear(x, packed, w_scale)


__all__ = [
    "attend_rows", "available", "block_layer", "build_dir", "cpu_supported", "int8_linear", "load", "pack_int8",
    "unavailable_reason", "unpack_int8",
]
