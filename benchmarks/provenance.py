"""Where a benchmark's figures came from: machine, CPU (and GPU) model, date and commit.

Every benchmark puts ``provenance()`` in its JSON as ``"provenance"``; nothing else explains a
row (not who ran it or when in a project's history). No torch import: the lightest benchmarks use it too.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if platform.system() == "Darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return []
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in FLAGS_THAT_MATTER if flag in present]
    return []


def git_commit() -> str:
    """The commit the code ran at, with ``-dirty`` when the tree had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO)
    except OSError:
        return "unknown"
    commit = head.stdout.strip() or "unknown"
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def gpu_model() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def provenance(device: str = "cpu") -> dict:
    """machine, CPU model and flags, core count, GPU (when the run used one), UTC date, commit."""
    return {
        "machine": f"{platform.system()} {platform.machine()}",
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_model() if device.startswith("cuda") else None,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
    }
