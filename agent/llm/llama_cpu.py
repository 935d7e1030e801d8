"""How llama.cpp runs on this CPU: weight repacking ("extra buffer types") on or off.

At load, llama.cpp's CPU backend copies quantized weights into "extra buffer types": the AMX
tile layout on Intel CPUs with AMX (Sapphire Rapids, Granite Rapids), the interleaved
``CPU_REPACK`` layouts for AVX2/AVX512/NEON elsewhere. Repacked weights make prompt evaluation
faster, but the AMX path crashes the process (SIGSEGV in ``ggml_backend_amx_mul_mat``,
llama.cpp #20824) on the first prompt of more than one token, and a source build turns AMX on
by itself whenever the build machine has it (``GGML_NATIVE``), whatever ``GGML_AMX_*`` says.

So csm-chat decides per CPU, at load time (``CSM_LLAMA_REPACK``: auto | on | off):
  auto  repacking off on CPUs with AMX (``amx_tile``/``amx_int8``/``amx_bf16`` in
        /proc/cpuinfo), on everywhere else (arm64, macOS, AVX2/AVX512 without AMX)
  on    always repack (llama.cpp's default); off: never (``use_extra_bufts = False``)

llama-cpp-python's ``Llama`` has no argument for it: it builds ``llama_model_params`` from
``llama_model_default_params()`` and loads the model in its constructor, so the setting is put
in force by handing the constructor defaults with ``use_extra_bufts`` set (``repack_setting``).
The process-wide form (``install_repack_setting``) serves ``agent.llm.llama_server``.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError

log = logging.getLogger(__name__)

REPACK_ENV = "CSM_LLAMA_REPACK"
REPACK_MODES = ("auto", "on", "off")
AMX_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
_X86 = {"x86_64", "amd64", "i386", "i686"}


@dataclass(frozen=True)
class RepackDecision:
    """Whether llama.cpp may repack weights into extra buffer types, and why (one line)."""

    enabled: bool
    reason: str


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` text (``flags`` on x86, ``Features`` on arm)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def read_cpuinfo(path: str | os.PathLike = "/proc/cpuinfo") -> str:
    """``/proc/cpuinfo``'s text, or "" where there is none (macOS, Windows)."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def decide_repack(
    mode: str | None = None, *, cpuinfo: str | None = None, machine: str | None = None
) -> RepackDecision:
    """The repacking decision for ``mode`` (default: ``$CSM_LLAMA_REPACK``, else "auto") on this CPU.

    ``cpuinfo`` and ``machine`` default to this machine's (``/proc/cpuinfo``, ``platform.machine()``).
    """
    source = "argument"
    if mode is None:
        mode, source = os.environ.get(REPACK_ENV, "").strip() or "auto", REPACK_ENV
    mode = mode.strip().lower()
    if mode not in REPACK_MODES:
        where = f"{REPACK_ENV}={mode!r}" if source == REPACK_ENV else f"repack={mode!r}"
        raise AgentError(f"unknown llama.cpp repack mode {where}: use one of {', '.join(REPACK_MODES)}")
    if mode == "on":
        return RepackDecision(True, f"on ({source} says on)")
    if mode == "off":
        return RepackDecision(False, f"off ({source} says off)")
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine not in _X86:
        return RepackDecision(True, f"on (auto: {machine or 'this'} CPU has no AMX)")
    amx = sorted(cpu_flags(read_cpuinfo() if cpuinfo is None else cpuinfo) & AMX_FLAGS)
    if amx:
        return RepackDecision(False, f"off (auto: the CPU has {'/'.join(amx)}; llama.cpp's AMX kernels crash, "
                                     f"#20824; {REPACK_ENV}=on forces it)")
    return RepackDecision(True, "on (auto: no AMX on this CPU)")


# One construction at a time sees the replaced defaults (the swap is module-global).
_swap_lock = threading.RLock()


def _supports_extra_bufts(module) -> bool:
    fields = getattr(module.llama_model_params, "_fields_", ())
    return any(name == "use_extra_bufts" for name, *_ in fields)


def _defaults_with(original, enabled: bool):
    def llama_model_default_params():
        params = original()
        params.use_extra_bufts = enabled
        return params

    return llama_model_default_params


@contextmanager
def repack_setting(enabled: bool) -> Iterator[None]:
    """Within the block, every ``llama_cpp.Llama(...)`` built loads with ``use_extra_bufts = enabled``."""
    import llama_cpp.llama_cpp as low

    if not _supports_extra_bufts(low):  # an older llama-cpp-python: nothing to set, llama.cpp repacks
        log.warning("this llama-cpp-python has no use_extra_bufts; llama.cpp repacks weights as it likes")
        yield
        return
    with _swap_lock:
        original = low.llama_model_default_params
        low.llama_model_default_params = _defaults_with(original, enabled)
        try:
            yield
        finally:
            low.llama_model_default_params = original


def install_repack_setting(decision: RepackDecision) -> None:
    """For the rest of this process, every ``llama_cpp.Llama`` loads with ``decision`` (servers)."""
    import llama_cpp.llama_cpp as low

    if not _supports_extra_bufts(low):
        log.warning("this llama-cpp-python has no use_extra_bufts; llama.cpp repacks weights as it likes")
        return
    original = low.llama_model_default_params
    original = getattr(original, "csm_chat_original", original)  # installed twice: wrap the real one
    wrapped = _defaults_with(original, decision.enabled)
    wrapped.csm_chat_original = original
    low.llama_model_default_params = wrapped
    # What every Llama built from now on starts from, read back from the defaults themselves.
    in_force = low.llama_model_default_params().use_extra_bufts
    log.info("llama.cpp weight repacking: %s (use_extra_bufts=%s)", decision.reason, in_force)


@contextmanager
def llama_log() -> Iterator[list[str]]:
    """Within the block, llama.cpp's log lines go to the yielded list instead of stderr (what it
    repacked at load, why a quantization failed); its default logger is back afterwards."""
    import ctypes

    import llama_cpp
    import llama_cpp._logger as default

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(default.llama_log_callback, ctypes.c_void_p(0))
