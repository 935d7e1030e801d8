"""CSM on MLX: frames/s, first chunk and logit error per precision, the Apple-chip table; one JSON object.

    python benchmarks/mlx_speed.py                          # 1B shapes, float32/bf16/int8/int4 + torch
    python benchmarks/mlx_speed.py --flavor tiny --frames 8 --no-torch   # a quick look

On a Mac (Apple Silicon; ``make install`` puts MLX in the venv), the real rows of the table:

    .venv/bin/python benchmarks/mlx_speed.py --no-torch --out mlx-$(sysctl -n machdep.cpu.brand_string | tr ' ' -).json

Rows, one per MLX precision (``csm_engine.mlx.precisions``), then the torch engine's default
precision, all on random weights of the same shapes and the same synthetic conversation:
``frames_per_s`` (the frame loop, after the first frame), ``rtf`` (streamed through Mimi, seconds
per frame / 80 ms; below 1 keeps up), ``first_chunk_ms`` (the second turn of a short
conversation, cache warm). For ``--long-precision`` also the first chunk after a
``--context-tokens`` conversation with and without the conversation cache, and the short one
again after it; ``*_cpu_ms`` is the process's CPU time for the same span (the work, nearly
whatever else the machine runs: on a shared machine compare those). ``--first-chunk-only``
runs just the first chunks (with the cache): the conversation cache's check at 1B shapes.
``logit_error``: against the MLX float32 model with the same weights, the method of
``quant_error.py`` (codebook-0 logits of every prompt row, 31 teacher-forced decoder logits).
``apple_chips``: the bandwidth bound (frames/s) of each chip at each precision and the widest
precision that clears real time with ``MARGIN`` (what ``--csm-dtype auto`` picks there); a bound,
not a measurement. Speed does not depend on weight values once the frame count is fixed.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
from engine_speed import Conversation, PeakRSS, first_chunk_ms, frame_loop_speed, streamed_rtf  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from provenance import provenance  # noqa: E402
from quant_error import logit_error, probe_inputs  # noqa: E402
from report import emit  # noqa: E402

from csm_engine.codec import MimiCodec  # noqa: E402
from csm_engine.config import CSMConfig, get_flavor  # noqa: E402
from csm_engine.mlx.convert import build_model  # noqa: E402
from csm_engine.mlx.generator import MLXGenerator  # noqa: E402
from csm_engine.mlx.model import MLXCSMModel  # noqa: E402
from csm_engine.mlx.precisions import (  # noqa: E402
    APPLE_CHIPS,
    MARGIN,
    MLX_PRECISION_NAMES,
    REALTIME_FPS,
    bound_fps,
    needed_precision,
    quant_bits,
    resolve,
    weights_read_per_frame,
)
from csm_engine.precision import lookup  # noqa: E402
from csm_engine.tokens import TextTokenizer  # noqa: E402


def random_weights(config: CSMConfig, seed: int = 0) -> dict[str, mx.array]:
    """float32 weights of ``MLXCSMModel``'s names: N(0, 0.02), unit norm scales (as _common.random_csm_model)."""
    shapes = {name: p.shape for name, p in tree_flatten(MLXCSMModel(config).parameters())}
    key = mx.random.key(seed)
    out = {}
    for name, shape in shapes.items():
        key, sub = mx.random.split(key)
        out[name] = mx.ones(shape) if name.endswith(".scale") else mx.random.normal(shape, key=sub) * 0.02
        mx.eval(out[name])
    return out


def mlx_model(config: CSMConfig, weights: dict[str, mx.array], precision: str,
              activations: str | None = None) -> MLXCSMModel:
    """The model at ``precision``; ``activations`` "float32" keeps quantized layers' scales and
    activations float32 (MLX's CPU backend runs bf16 quantized matmuls ~9x slower than float32)."""
    p = lookup(precision, "mlx")
    target = mx.float32 if (activations or p.dtype) == "float32" else mx.bfloat16
    cast = weights if target == mx.float32 else {k: v.astype(target) for k, v in weights.items()}
    return build_model(config, cast, quantize_bits=quant_bits(p))


# ---------------------------------------------------------------------------------------------
# Logit error (quant_error.py's probe on the MLX model)
# ---------------------------------------------------------------------------------------------


def probe_logits(model: MLXCSMModel, tokens: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor,
                 block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """quant_error.probe_logits on MLX: prompt prefilled in blocks, the frame teacher-forced through the decoder."""
    model.setup_caches(1)
    t, m, c = (mx.array(x.numpy()) for x in (tokens, mask, codes))
    n = tokens.shape[1]
    h = mx.concatenate([model.backbone_hidden(t[:, a:a + block], m[:, a:a + block], a) for a in range(0, n, block)],
                       axis=1)
    logits0 = model.codebook0_head(h)[0].astype(mx.float32)
    dec_in = model.projection(mx.concatenate([h[:, -1:], model.embed_audio(0, c[:, :1]).astype(h.dtype)], axis=1))
    logits = []
    for i in range(1, model.config.audio_num_codebooks):
        dh = model.decoder_hidden(dec_in, 0 if i == 1 else i)[0, -1]
        logits.append(model.audio_head[i - 1](dh).astype(mx.float32))
        dec_in = model.projection(model.embed_audio(i, c[:, i:i + 1]).astype(h.dtype))
    out = mx.stack(logits)
    mx.eval(logits0, out)
    return torch.from_numpy(np.array(logits0)), torch.from_numpy(np.array(out))


def error_rows(config: CSMConfig, weights: dict[str, mx.array], precisions: list[str],
               activations: str | None = None) -> dict:
    inputs = probe_inputs(config)
    reference = probe_logits(mlx_model(config, weights, "float32"), *inputs)
    out = {}
    for name in precisions:
        if name == "float32":
            continue
        model = mlx_model(config, weights, name, activations if lookup(name, "mlx").quantized else None)
        out[name] = {k: round(v, 5) for k, v in logit_error(reference, probe_logits(model, *inputs)).items()}
        del model
        gc.collect()
        print(f"# logit error {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# Speed rows (engine_speed.py's measurements, on an MLXGenerator)
# ---------------------------------------------------------------------------------------------


def speed_row(gen, args, long_context: bool) -> dict:
    conv = Conversation(gen, seed=1)
    row: dict = {}
    if not args.first_chunk_only:
        row.update(frame_loop_speed(gen, conv, args.frames, args.short_context_tokens, repeats=1))
        row.update(streamed_rtf(gen, conv, args.frames, args.short_context_tokens))
    short = first_chunk_ms(gen, conv, args.short_context_tokens, warm=True, reply_frames=args.reply_frames)
    row.update(first_chunk_ms=short["first_chunk_ms"], first_chunk_cpu_ms=short["first_chunk_cpu_ms"],
               first_chunk_prefill_rows=short["prefill_rows"])
    if long_context:
        warm = first_chunk_ms(gen, conv, args.context_tokens, warm=True, reply_frames=args.reply_frames)
        row.update(first_chunk_long_ms=warm["first_chunk_ms"], first_chunk_long_cpu_ms=warm["first_chunk_cpu_ms"],
                   first_chunk_long_prefill_rows=warm["prefill_rows"],
                   first_chunk_long_prompt_rows=warm["prompt_rows"])
        if not args.first_chunk_only:
            cold = first_chunk_ms(gen, conv, args.context_tokens, warm=False, reply_frames=args.reply_frames)
            row["first_chunk_long_no_cache_ms"] = cold["first_chunk_ms"]
        # The short conversation again after the long one: both sides of the long turn, so load
        # that changed during the run shows as two different short figures.
        again = first_chunk_ms(gen, conv, args.short_context_tokens, warm=True, reply_frames=args.reply_frames)
        row.update(first_chunk_short_again_ms=again["first_chunk_ms"],
                   first_chunk_short_again_cpu_ms=again["first_chunk_cpu_ms"])
        shorts = (short["first_chunk_ms"] + again["first_chunk_ms"]) / 2
        shorts_cpu = (short["first_chunk_cpu_ms"] + again["first_chunk_cpu_ms"]) / 2
        row["long_over_short"] = warm["first_chunk_ms"] / shorts
        row["long_over_short_cpu"] = warm["first_chunk_cpu_ms"] / shorts_cpu
    return row


def mlx_speed_row(config, weights, precision: str, codec, tokenizer, args) -> dict:
    with PeakRSS() as rss:
        model = mlx_model(config, weights, precision)
        gen = MLXGenerator(model, codec, tokenizer, precision=precision)
        row = {"engine": "mlx", "device": str(mx.default_device()), "dtype": precision}
        row.update(speed_row(gen, args, long_context=precision == args.long_precision))
        del gen, model
        gc.collect()
    row["peak_rss_mb"] = rss.peak
    print(f"# mlx {precision}: {row.get('frames_per_s', float('nan')):.2f} frames/s, first chunk "
          f"{row['first_chunk_ms']:.0f} ms",
          file=sys.stderr, flush=True)
    return row


def torch_speed_row(config, precision: str, codec, tokenizer, args) -> dict:
    from _common import random_csm_model

    from csm_engine.generator import Generator
    from csm_engine.quantize import apply_precision, resolve_precision

    name = resolve_precision(None if precision == "auto" else precision, "cpu")
    with PeakRSS() as rss:
        model = random_csm_model(args.flavor, seed=args.seed)
        apply_precision(model, name)
        gen = Generator(model, codec, tokenizer, cuda_graphs=False)
        row = {"engine": "torch", "device": "cpu", "dtype": name}
        row.update(speed_row(gen, args, long_context=False))
        del gen, model
        gc.collect()
    row["peak_rss_mb"] = rss.peak
    print(f"# torch {name}: {row.get('frames_per_s', float('nan')):.2f} frames/s", file=sys.stderr, flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# The chip table and provenance
# ---------------------------------------------------------------------------------------------


def chip_table(config: CSMConfig) -> list[dict]:
    rows = []
    for chip in APPLE_CHIPS:
        bounds = {p: round(bound_fps(chip.bandwidth_gbs, config, lookup(p, "mlx")), 1) for p in MLX_PRECISION_NAMES}
        rows.append({"chip": chip.name, "bandwidth_gbs": chip.bandwidth_gbs, "bound_frames_per_s": bounds,
                     "precision_for_real_time": needed_precision(chip, config)})
    return rows


def versions() -> dict:
    import importlib.metadata as md

    return {"mlx": md.version("mlx"), "torch": torch.__version__, "mlx_device": str(mx.default_device()),
            "load_average": list(os.getloadavg())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavor", default="1B", help="model shapes (tiny for a smoke run)")
    p.add_argument("--precisions", default=",".join(MLX_PRECISION_NAMES), help="comma list of MLX precisions")
    p.add_argument("--frames", type=int, default=8, help="frames per timed utterance (80 ms each)")
    p.add_argument("--context-tokens", type=int, default=1500, help="the long conversation (rows)")
    p.add_argument("--short-context-tokens", type=int, default=150, help="the short conversation (rows)")
    p.add_argument("--reply-frames", type=int, default=8, help="the agent's reply kept in the cache before turn 2")
    p.add_argument("--long-precision", default="auto",
                   help="the precision also timed after the long conversation (auto: this machine's default)")
    p.add_argument("--torch-dtype", default="auto", help="the torch row's precision (auto: the CPU default)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-error", action="store_true", help="skip the logit error")
    p.add_argument("--no-speed", action="store_true", help="only the logit error and the chip table")
    p.add_argument("--first-chunk-only", action="store_true",
                   help="speed rows: only the first chunk (short, long with the cache, short again), wall and CPU time")
    p.add_argument("--error-activations", choices=("float32",), default=None,
                   help="quantized rows of the logit error with float32 scales and activations (weights' error only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    precisions = [lookup(x.strip(), "mlx").name for x in args.precisions.split(",") if x.strip()]
    args.long_precision = resolve(args.long_precision).name
    config = get_flavor(args.flavor)
    result: dict = {"provenance": {**provenance(), **versions()}, "flavor": args.flavor, "frames": args.frames,
                    "context_tokens": args.context_tokens, "short_context_tokens": args.short_context_tokens,
                    "weights_read_per_frame": weights_read_per_frame(config), "realtime_frames_per_s": REALTIME_FPS,
                    "margin": MARGIN}
    from csm_engine.testing.checkpoints import build_text_tokenizer

    tokenizer = TextTokenizer(build_text_tokenizer())
    codec = MimiCodec.load(None, device="cpu")
    t0 = time.perf_counter()
    weights = random_weights(config, args.seed)
    if not args.no_error:
        result["logit_error"] = {"metric": "vs the MLX float32 model, quant_error.py's method",
                                 "quantized_activations": args.error_activations or "bfloat16",
                                 "rows": error_rows(config, weights, precisions, args.error_activations)}
    result["rows"] = [] if args.no_speed else [mlx_speed_row(config, weights, name, codec, tokenizer, args)
                                               for name in precisions]
    del weights
    gc.collect()
    if not args.no_torch and not args.no_speed:
        result["rows"].append(torch_speed_row(config, args.torch_dtype, codec, tokenizer, args))
    result["apple_chips"] = chip_table(get_flavor("1B"))
    result["seconds"] = time.perf_counter() - t0
    return emit(result, args.out)


if __name__ == "__main__":
    main()
