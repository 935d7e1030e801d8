"""Precisions as data: one frozen ``Precision`` per name says what it does to a model.

A precision names the dtype of activations, caches and the weights left in floating point;
which ``Linear`` layers go int8 and how their matmuls run (``LinearQuant`` rules); what else
is fused; which kernels it needs and which devices it runs on. ``lookup`` finds one by name or
alias; ``csm_engine.quantize.apply_precision`` applies a torch one to a ``CSMModel``.

The objects are backend-neutral: another backend registers its own under its name
(``register``), e.g. MLX's bfloat16 and its group-quantized 8- and 4-bit weights as
``LinearQuant(bits=4, group_size=64)``. No torch here: a CLI lists the names without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

from csm_engine.errors import CSMError

# How a rule's int8 matmul treats the activations (the torch backend's three int8 modules).
WEIGHT_ONLY = "weight-only"  # activations stay float; the kernel dequantizes the weights on the fly
DYNAMIC = "dynamic"  # activations quantized per call, one 7-bit scale per tensor (fbgemm, x86)
BLOCK = "block"  # activations quantized per row in blocks of 32 values, one scale each (csm_engine.kernels)


@dataclass(frozen=True)
class LinearQuant:
    """How the bias-free ``Linear`` layers a rule covers store and multiply their weights."""

    bits: int = 8
    group_size: int | None = None  # weights per scale along the input; None: one scale per output row
    activations: str = WEIGHT_ONLY  # WEIGHT_ONLY, DYNAMIC or BLOCK
    layers: tuple[str, ...] = ()  # module-name prefixes this rule covers (e.g. "decoder."); () = every Linear
    skip: tuple[str, ...] = ()  # module names left in floating point

    def covers(self, name: str) -> bool:
        return name not in self.skip and (not self.layers or name.startswith(self.layers))


@dataclass(frozen=True)
class Precision:
    """What one precision does to a model; see the module docstring."""

    name: str
    dtype: str  # activations, KV caches and weights left in floating point ("float32", "bfloat16")
    summary: str  # one line for --help and docs
    linears: tuple[LinearQuant, ...] = ()  # first rule that covers a Linear decides; none: it stays float
    fused: bool = False  # int8 block kernels: norm folded into q|k|v and w1|w3, a decoder layer step one call
    audio_head: str = "float32"  # "float32" (laid out for the x @ W.T kernel) or "int8-block"
    needs: tuple[str, ...] = ()  # kernels that must load here (see csm_engine.quantize.KERNELS)
    devices: tuple[str, ...] = ("cpu", "cuda", "mps")  # device types it runs on
    aliases: tuple[str, ...] = ()
    backend: str = "torch"

    @property
    def quantized(self) -> bool:
        return bool(self.linears)

    def rule_for(self, name: str) -> LinearQuant | None:
        """The rule that decides Linear ``name``; None leaves it in floating point."""
        return next((rule for rule in self.linears if rule.covers(name)), None)


# The projection's first call of a frame takes the backbone's normed state and a raw embedding
# in one tensor: one per-tensor activation scale for both rows rounds the (much smaller)
# embedding row away (measured: decoder logit error 0.42 vs 0.03 relative RMS, tiny flavor).
_KEEP_PROJECTION = ("projection",)

TORCH_PRECISIONS = (
    Precision("float32", "float32", "the reference: every weight and activation float32",
              aliases=("fp32", "float")),
    Precision("bfloat16", "bfloat16", "bf16 weights, activations and caches (GPUs; CPUs with AVX512-BF16)",
              aliases=("bf16",)),
    Precision("int8", "bfloat16", "int8 weights of every Linear, bf16 activations (torch's int8pack kernel)",
              linears=(LinearQuant(activations=WEIGHT_ONLY),), needs=("int8pack",), devices=("cpu", "cuda"),
              aliases=("int8-weight-only",)),
    Precision("int8-block", "float32",
              "every Linear and the audio head int8 x int8 with per-row activation blocks (this project's "
              "AVX2 kernel), norms and q|k|v, w1|w3 fused", linears=(LinearQuant(activations=BLOCK),),
              fused=True, audio_head="int8-block", needs=("block-kernel",), devices=("cpu",), aliases=("q8",)),
    # Backbone (22% of a frame's bytes, and every prompt row): weight-only int8, close to
    # float32. Decoder (78%, always 2 rows then 1 per step): fbgemm's faster int8 x int8.
    Precision("int8-hybrid", "float32", "weight-only int8 backbone, fbgemm int8 x int8 decoder",
              linears=(LinearQuant(activations=DYNAMIC, layers=("decoder.",), skip=_KEEP_PROJECTION),
                       LinearQuant(activations=WEIGHT_ONLY, skip=_KEEP_PROJECTION)),
              needs=("fbgemm", "int8pack"), devices=("cpu",)),
    Precision("int8-dynamic", "float32", "every Linear int8 x int8 through fbgemm, activations quantized per call",
              linears=(LinearQuant(activations=DYNAMIC, skip=_KEEP_PROJECTION),), needs=("fbgemm",),
              devices=("cpu",), aliases=("int8-dyn", "w8a8")),
)

# Best first, per device type: the first whose kernels load is the default (benchmarks/README.md).
# Models under SMALL_MODEL_BYTES of float32 weights are overhead-bound and run float32 everywhere
# (measured: tiny flavor 24 frames/s float32 vs 13 int8-dynamic).
DEFAULT_ORDER = {"cpu": ("int8-block", "int8-hybrid", "int8", "bfloat16"), "cuda": ("bfloat16",),
                 "mps": ("bfloat16",)}
SMALL_MODEL_BYTES = 256 * 2**20

_REGISTRY: dict[str, dict[str, Precision]] = {}


def register(precision: Precision) -> Precision:
    """Add a precision to its backend's table (names and aliases must be new there)."""
    table = _REGISTRY.setdefault(precision.backend, {})
    for name in (precision.name, *precision.aliases):
        if name in table:
            raise ValueError(f"precision name {name!r} is taken on backend {precision.backend!r}")
        table[name] = precision
    return precision


for _precision in TORCH_PRECISIONS:
    register(_precision)


def precisions(backend: str = "torch") -> tuple[Precision, ...]:
    """A backend's precisions, in registration order, each once."""
    return tuple(dict.fromkeys(_REGISTRY.get(backend, {}).values()))


def lookup(name: str, backend: str = "torch") -> Precision:
    """The precision called ``name`` (or an alias of it); CSMError naming the choices for anything else."""
    key = str(name).lower().removeprefix("torch.")
    found = _REGISTRY.get(backend, {}).get(key)
    if found is None:
        choices = ", ".join(p.name for p in precisions(backend))
        raise CSMError(f"unknown dtype {name!r}: choose one of {choices} (or auto)")
    return found


PRECISIONS = tuple(p.name for p in TORCH_PRECISIONS)  # the torch engine's names, for --dtype choices

__all__ = ["BLOCK", "DEFAULT_ORDER", "DYNAMIC", "LinearQuant", "PRECISIONS", "Precision", "SMALL_MODEL_BYTES",
           "TORCH_PRECISIONS", "WEIGHT_ONLY", "lookup", "precisions", "register"]
