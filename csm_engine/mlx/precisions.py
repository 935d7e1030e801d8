"""MLX precisions, the memory bandwidth of Apple chips, and the precision each needs for real time.

No MLX import: ``csm-chat --help`` and the benchmark's table need none.

A frame of CSM reads every backbone weight once (one step) and every decoder weight 31 times
(one step per codebook after the first), plus one audio head per step. On Apple Silicon a
frame at batch 1 is bound by memory bandwidth, so the frames/s a chip can reach is at most
``bandwidth / bytes read per frame``. Real time is 12.5 frames/s (80 ms frames).
``default_precision`` picks the widest weights whose bound clears real time with ``MARGIN``
to spare (measured decoders reach well under the peak bandwidth, and Mimi and the rest of
the agent share the chip).
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass

from csm_engine.config import FRAME_MS, CSMConfig
from csm_engine.precision import LinearQuant, Precision, lookup, precisions, register

BACKEND = "mlx"
GROUP_SIZE = 64  # mlx.nn.quantize's default group: one scale and one bias per 64 weights along the input

MLX_PRECISIONS = tuple(register(p) for p in (
    Precision("float32", "float32", "float32 weights and activations (the torch engine's numbers)",
              devices=("cpu", "gpu"), aliases=("fp32", "float"), backend=BACKEND),
    Precision("bfloat16", "bfloat16", "bf16 weights, activations and caches", devices=("cpu", "gpu"),
              aliases=("bf16",), backend=BACKEND),
    Precision("int8", "bfloat16", "8-bit weights in groups of 64 (mlx.nn.quantize, affine), bf16 activations",
              linears=(LinearQuant(bits=8, group_size=GROUP_SIZE),), devices=("cpu", "gpu"),
              aliases=("8bit", "8-bit", "q8"), backend=BACKEND),
    Precision("int4", "bfloat16", "4-bit weights in groups of 64 (mlx.nn.quantize, affine), bf16 activations",
              linears=(LinearQuant(bits=4, group_size=GROUP_SIZE),), devices=("cpu", "gpu"),
              aliases=("4bit", "4-bit", "q4"), backend=BACKEND),
))
MLX_PRECISION_NAMES = tuple(p.name for p in MLX_PRECISIONS)
REALTIME_FPS = 1000 / FRAME_MS  # 12.5
MARGIN = 1.5  # the bound must clear real time by this factor


def resolve(name: str | None) -> Precision:
    """An MLX precision by name or alias; None / "auto" is this machine's default."""
    if name in (None, "auto"):
        return lookup(default_precision(), BACKEND)
    return lookup(name, BACKEND)


def quant_bits(precision: Precision) -> int | None:
    return precision.linears[0].bits if precision.linears else None


# ---------------------------------------------------------------------------------------------
# Bytes read per frame
# ---------------------------------------------------------------------------------------------


def _layer_weights(dim: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden: int) -> int:
    attn = dim * n_heads * head_dim * 2 + dim * n_kv_heads * head_dim * 2  # q, output / k, v
    return attn + 3 * dim * hidden


def weights_read_per_frame(config: CSMConfig) -> int:
    """Weights (count, not bytes) one frame reads: 1 backbone step, 31 decoder steps, their heads."""
    bb, dec = config.backbone, config.decoder
    backbone = bb.n_layers * _layer_weights(bb.dim, bb.n_heads, bb.n_kv_heads, bb.head_dim, bb.intermediate_dim)
    decoder = dec.n_layers * _layer_weights(dec.dim, dec.n_heads, dec.n_kv_heads, dec.head_dim, dec.intermediate_dim)
    steps = config.audio_num_codebooks - 1
    heads = bb.dim * config.audio_vocab_size + steps * dec.dim * config.audio_vocab_size
    projection = bb.dim * dec.dim * steps  # read at every decoder step
    return backbone + steps * decoder + heads + projection


def bytes_per_weight(precision: Precision) -> float:
    """Storage of one weight: its bits, plus a bf16 scale and bias per group when quantized."""
    bits = quant_bits(precision)
    if bits is None:
        return 4.0 if precision.dtype == "float32" else 2.0
    group = precision.linears[0].group_size or GROUP_SIZE
    return bits / 8 + 4 / group


def bound_fps(bandwidth_gbs: float, config: CSMConfig, precision: Precision) -> float:
    """Upper bound on frames/s at ``bandwidth_gbs`` GB/s (every weight read once per use)."""
    return bandwidth_gbs * 1e9 / (weights_read_per_frame(config) * bytes_per_weight(precision))


# ---------------------------------------------------------------------------------------------
# Apple chips
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chip:
    name: str
    bandwidth_gbs: float  # Apple's stated unified-memory bandwidth


# Apple's published figures (GB/s); where a chip comes in two memory configurations, the lower.
APPLE_CHIPS = (
    Chip("M1", 68.25), Chip("M1 Pro", 200), Chip("M1 Max", 400), Chip("M1 Ultra", 800),
    Chip("M2", 100), Chip("M2 Pro", 200), Chip("M2 Max", 400), Chip("M2 Ultra", 800),
    Chip("M3", 100), Chip("M3 Pro", 150), Chip("M3 Max", 300),
    Chip("M4", 120), Chip("M4 Pro", 273), Chip("M4 Max", 410),
)


def chip_named(brand: str) -> Chip | None:
    """The chip in a CPU brand string such as 'Apple M2 Pro' (longest name first: 'M2 Pro' before 'M2')."""
    brand = " ".join(brand.split())
    for chip in sorted(APPLE_CHIPS, key=lambda c: -len(c.name)):
        if brand == f"Apple {chip.name}" or brand.startswith(f"Apple {chip.name} "):
            return chip
    return None


def this_chip() -> Chip | None:
    """The Apple chip this process runs on; None elsewhere (or when sysctl cannot say)."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return None
    try:
        brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return chip_named(brand)


def needed_precision(chip: Chip, config: CSMConfig | None = None) -> str | None:
    """The widest precision whose bandwidth bound clears real time by ``MARGIN``; None if none does."""
    config = config or _one_b()
    for precision in precisions(BACKEND)[1:]:  # float32 is the reference, never the fast choice
        if bound_fps(chip.bandwidth_gbs, config, precision) >= REALTIME_FPS * MARGIN:
            return precision.name
    return None


def default_precision(chip: Chip | None = None) -> str:
    """bfloat16/int8/int4 by the chip's bandwidth on a Mac; float32 (the torch numbers) elsewhere."""
    chip = chip or this_chip()
    if chip is None:
        return "float32"
    return needed_precision(chip) or "int4"


def _one_b() -> CSMConfig:
    from csm_engine.config import get_flavor

    return get_flavor("1B")


__all__ = ["APPLE_CHIPS", "BACKEND", "Chip", "MLX_PRECISIONS", "MLX_PRECISION_NAMES", "REALTIME_FPS", "bound_fps",
           "bytes_per_weight", "chip_named", "default_precision", "needed_precision", "quant_bits", "resolve",
           "this_chip", "weights_read_per_frame"]
