"""Which MLX precisions are usable on this machine: one CSM-1B MLP matmul per weight format, timed.

    python benchmarks/mlx_matmul.py            # 8192x2048 (w1 of a backbone layer), 1 and 32 rows

A frame of CSM is ~4.5 G weights read at one row each (the decoder's steps) and a prompt block is
32 rows; a format whose one-row matmul runs far below the float32 one's bandwidth makes that
precision unusable on this backend, whatever its bits say. Rows: float32 and bfloat16 weights
(``x @ W.T``), and MLX's affine group quantization (``mx.quantized_matmul``, groups of 64) at 8
and 4 bits with float32 or bfloat16 activations and scales. ``ms`` is the median of
``--repeats`` evaluated calls; ``weight_gb_per_s`` the weight bytes read per second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
from provenance import provenance  # noqa: E402
from report import emit  # noqa: E402

GROUP = 64


def timed(fn, repeats: int) -> float:
    mx.eval(fn())  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def rows(out_dim: int, in_dim: int, n_rows: int, repeats: int) -> list[dict]:
    key = mx.random.key(0)
    w32 = mx.random.normal((out_dim, in_dim), key=key) * 0.02
    x32 = mx.random.normal((n_rows, in_dim), key=mx.random.key(1))
    result = []
    for dtype, name in ((mx.float32, "float32"), (mx.bfloat16, "bfloat16")):
        w, x = w32.astype(dtype), x32.astype(dtype)
        mx.eval(w, x)
        ms = timed(lambda w=w, x=x: x @ w.T, repeats)
        result.append({"format": name, "activations": name, "rows": n_rows, "ms": round(ms, 3),
                       "weight_gb_per_s": round(w.nbytes / ms / 1e6, 2)})
    for bits in (8, 4):
        for act, act_name in ((mx.float32, "float32"), (mx.bfloat16, "bfloat16")):
            wq, scales, biases = mx.quantize(w32.astype(act), group_size=GROUP, bits=bits)
            x = x32.astype(act)
            mx.eval(wq, scales, biases, x)
            ms = timed(lambda wq=wq, s=scales, b=biases, x=x, bits=bits: mx.quantized_matmul(
                x, wq, s, b, transpose=True, group_size=GROUP, bits=bits), repeats)
            nbytes = wq.nbytes + scales.nbytes + biases.nbytes
            result.append({"format": f"int{bits}", "activations": act_name, "rows": n_rows, "ms": round(ms, 3),
                           "weight_gb_per_s": round(nbytes / ms / 1e6, 2)})
            print(f"# int{bits} {act_name} x{n_rows}: {ms:.2f} ms", file=sys.stderr, flush=True)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dim", type=int, default=8192)
    p.add_argument("--in-dim", type=int, default=2048)
    p.add_argument("--rows", default="1,32", help="comma list of activation rows")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = {"provenance": {**provenance(), "load_average": list(os.getloadavg()),
                             "mlx_device": str(mx.default_device())},
              "shape": [args.out_dim, args.in_dim], "group_size": GROUP,
              "rows": [r for n in args.rows.split(",") for r in rows(args.out_dim, args.in_dim, int(n), args.repeats)]}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
