"""Applying a precision (``csm_engine.precision``) to a CSMModel: kernel checks, the int8 handler, one function.

``resolve_precision`` turns a ``--dtype`` value into a precision this machine can run (or a
one-line CSMError); ``apply_precision`` converts a float model in place as the precision's
description says. The int8 modules themselves are in ``csm_engine.linears``.

At batch 1 a frame is bound by reading weights, so bytes per weight decide speed. The
``audio_head`` (a raw (31, D, 2051) parameter read one slice per decoder step, ~7% of an int8
step's bytes) stays float32, laid out for the fast kernel, unless the precision reads it through
the block kernel; the embeddings (gathered row by row, never read whole) take the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from csm_engine.errors import CSMError
from csm_engine.linears import (
    INT8_MODULES,
    BlockInt8AudioHead,
    DynamicInt8Linear,
    FoldedRMSNorm,
    Int8Linear,
    fuse_block_linears,
    quantize_per_channel,
)
from csm_engine.precision import DEFAULT_ORDER, SMALL_MODEL_BYTES, Precision, lookup

# ---------------------------------------------------------------------------------------------
# Kernels a precision may need, and the device's default
# ---------------------------------------------------------------------------------------------


def cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def int8pack_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def block_kernel_available() -> bool:
    """Whether csm_engine.kernels' int8 kernel builds and loads here (x86-64 AVX2, a C++ compiler)."""
    from csm_engine import kernels

    return kernels.available()


def _block_kernel_missing() -> str:
    from csm_engine import kernels

    return f"csm-chat's AVX2 kernel, which is unavailable here ({kernels.unavailable_reason()}); use --dtype int8"


# need -> (is it here?, what is missing and what to use instead)
KERNELS: dict[str, tuple[Callable[[], bool], Callable[[], str]]] = {
    "int8pack": (int8pack_available, lambda: "torch's _weight_int8pack_mm (torch >= 2.4); use --dtype bfloat16"),
    "fbgemm": (fbgemm_available, lambda: "torch's fbgemm backend (x86 CPU); use --dtype int8 or bfloat16"),
    "block-kernel": (block_kernel_available, _block_kernel_missing),
}


def runs_here(precision: Precision) -> bool:
    return all(KERNELS[need][0]() for need in precision.needs)


def default_precision(device: str | torch.device, n_params: int | None = None) -> str:
    """The default precision for a device and model size: the first of ``DEFAULT_ORDER`` that runs here.

    CPU: ``int8-block`` where this project's AVX2 kernel builds, else ``int8-hybrid``, ``int8``
    (this CPU has no AVX512-BF16, so bf16 is converted in software and is no default here).
    CUDA: bfloat16 (measured on an H100 with CUDA graphs: 81.7 frames/s vs 56.5 for float32).
    Small test models: float32 (overhead-bound, fastest there).
    """
    kind = torch.device(device).type
    if n_params is not None and n_params * 4 < SMALL_MODEL_BYTES:
        return "float32"
    return next((name for name in DEFAULT_ORDER.get(kind, ()) if runs_here(lookup(name))), "float32")


def resolve_precision(dtype: str | torch.dtype | None, device: str | torch.device = "cpu",
                      n_params: int | None = None) -> str:
    """A precision name from a ``--dtype`` value (``None`` / auto = the default for the device and model size).

    Raises a one-line CSMError for an unknown name, a device it does not run on, or a kernel
    that does not load here.
    """
    if dtype is None or dtype == "auto":
        return default_precision(device, n_params)
    return check_precision(lookup(str(dtype)), device).name


def check_precision(precision: Precision, device: str | torch.device) -> Precision:
    """``precision`` if it runs on ``device`` here; a one-line CSMError saying what is missing otherwise."""
    if precision.backend != "torch":
        raise CSMError(f"--dtype {precision.name} is a {precision.backend} precision, not one of the torch engine's")
    if torch.device(device).type not in precision.devices:
        where = "x86 CPUs" if precision.devices == ("cpu",) else " and ".join(precision.devices)
        raise CSMError(f"--dtype {precision.name} runs on {where} only, not on {device}; use --dtype bfloat16")
    for need in precision.needs:
        present, missing = KERNELS[need]
        if not present():
            raise CSMError(f"--dtype {precision.name} needs {missing()}")
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of activations, KV caches and unquantized parameters for a precision."""
    return getattr(torch, lookup(precision).dtype)


def model_precision(model: nn.Module) -> str:
    """The precision a model currently runs at."""
    applied = model.precision
    if applied is not None and applied.quantized:
        return applied.name
    dtype = model.backbone.norm.scale.dtype  # the transformers' dtype (audio_head may stay float32)
    return "bfloat16" if dtype == torch.bfloat16 else "float32"


# ---------------------------------------------------------------------------------------------
# The handler: which Linears, state dict conversion, module swap
# ---------------------------------------------------------------------------------------------

Chooser = Callable[[str, nn.Module], "type[nn.Module] | None"]


def linear_plan(precision: Precision) -> Chooser:
    """``choose(name, module)`` -> the int8 module class for that Linear under ``precision``, or None."""

    def choose(name: str, module: nn.Module) -> type[nn.Module] | None:
        if not (isinstance(module, nn.Linear) and module.bias is None):
            return None
        rule = precision.rule_for(name)
        if rule is None:
            return None
        cls = INT8_MODULES[rule.activations]
        return cls if cls.fits(module) else None

    return choose


class Int8QuantHandler:
    """Converts a float CSMModel's chosen Linears to int8 (gpt-fast's quantize handler, for CSM)."""

    def __init__(self, model: nn.Module, choose: Chooser | None = None):
        """``choose(name, module)`` -> the int8 class for that Linear or None (default: weight-only int8 everywhere)."""
        self.model = model
        choose = choose or linear_plan(lookup("int8"))
        self.plan = {name: c for name, m in model.named_modules() if (c := choose(name, m)) is not None}
        self.names = list(self.plan)

    @torch.no_grad()
    def create_quantized_state_dict(self) -> dict[str, Tensor]:
        """The model's state dict with each chosen Linear as ``weight`` int8 + ``scales``."""
        sd = dict(self.model.state_dict())
        for name in self.names:
            q, scales = quantize_per_channel(sd[f"{name}.weight"])
            sd[f"{name}.weight"] = q
            sd[f"{name}.scales"] = scales.to(self.plan[name].scales_dtype)
        return sd

    def convert_for_runtime(self) -> nn.Module:
        """Swap the chosen Linears for int8 modules (weights still to be loaded)."""
        for name in self.names:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            old = getattr(parent, child)
            cls = self.plan[name]
            setattr(parent, child, cls(old.in_features, old.out_features, dtype=cls.scales_dtype,
                                       device=old.weight.device))
        return self.model


# ---------------------------------------------------------------------------------------------
# Applying a precision
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def apply_precision(model: nn.Module, precision: Precision | str | torch.dtype | None) -> nn.Module:
    """Convert a float model in place to a precision (a ``Precision``, or a registered name, alias or auto).

    Quantize from the float32 weights when you have them (scales are computed before any
    rounding to bf16). The KV caches are rebuilt in the new compute dtype, so any conversation
    cache kept outside the model is stale afterwards.
    """
    device = next(model.parameters()).device
    if isinstance(precision, Precision):
        spec = check_precision(precision, device)
    else:
        spec = lookup(resolve_precision(precision, device, sum(p.numel() for p in model.parameters())))
    current = model_precision(model)
    if current == spec.name:
        return model
    if model.precision is not None and model.precision.quantized:
        raise CSMError(f"model is already quantized ({current}); load the float checkpoint again for {spec.name}")
    dtype = getattr(torch, spec.dtype)
    # audio_head (31, D, 2051) is read one (D, 2051) slice per decoder step. Kept float32 and
    # stored column-major (each slice a transposed contiguous (2051, D) matrix) it is read by
    # the fast x @ W.T kernel: measured 0.45 ms per step vs 6.7 ms for bf16 row-major (AVX2).
    head = model.audio_head.detach().float().transpose(1, 2).contiguous().transpose(1, 2)
    if spec.quantized:
        handler = Int8QuantHandler(model, linear_plan(spec))
        sd = handler.create_quantized_state_dict()
        handler.convert_for_runtime()
        for k, v in sd.items():
            if v.is_floating_point() and not k.endswith(".scales"):
                sd[k] = v.to(dtype)
        model.load_state_dict(sd, strict=True, assign=True)
        for m in model.modules():
            if isinstance(m, DynamicInt8Linear):
                m.pack()
    else:
        model.to(dtype)
    if spec.fused:
        fuse_block_linears(model)
    model.audio_head = nn.Parameter(head, requires_grad=False)
    model.audio_head_kernel = None
    if spec.audio_head == "int8-block":  # 2.1 MB a step instead of 8.4 MB float32
        model.audio_head_kernel = BlockInt8AudioHead(head, norm=model.decoder.norm)
        model.decoder.norm = FoldedRMSNorm(model.decoder.norm)
    # Non-persistent float buffers (rope tables) stay float32: rope is computed in float32.
    for tf in (model.backbone, model.decoder):
        tf.rope_cos.data = tf.rope_cos.float()
        tf.rope_sin.data = tf.rope_sin.float()
    model.precision = spec
    if model.caches_are_setup():
        batch = model.backbone.layers[0].attn.kv_cache.k.shape[0]
        model.setup_caches(batch)
    return model


def weight_bytes_per_frame(model: nn.Module) -> int:
    """Bytes of weights one generated frame reads at batch 1: 1 backbone step + 31 decoder steps.

    Counts what the kernels stream from memory: every Linear of the backbone and codebook0_head
    once; the decoder's Linears, the projection and one audio_head slice once per decoder step.
    Embedding rows (a few KB) are not counted.
    """
    def nbytes(module: nn.Module) -> int:
        total = 0
        for m in module.modules():
            if isinstance(m, (nn.Linear, Int8Linear)):
                total += m.weight.numel() * m.weight.element_size()
        return total

    n_steps = model.config.audio_num_codebooks - 1
    kernel = getattr(model, "audio_head_kernel", None)
    head = kernel.weight if kernel is not None else model.audio_head
    head_slice = head[0].numel() * head.element_size()
    backbone = nbytes(model.backbone) + nbytes(model.codebook0_head)
    decoder_step = nbytes(model.decoder) + nbytes(model.projection) + head_slice
    return backbone + n_steps * decoder_step


__all__ = ["KERNELS", "Int8QuantHandler", "apply_precision", "block_kernel_available", "check_precision",
           "compute_dtype", "cpu_has_avx512_bf16", "default_precision", "fbgemm_available", "int8pack_available",
           "linear_plan", "model_precision", "resolve_precision", "weight_bytes_per_frame"]
