"""Logit error of bf16 / int8 / int8-dynamic against float32, on the tiny and 1B shapes; one JSON object.

    python benchmarks/quant_error.py                  # tiny and 1B (1B needs ~12 GB and a few minutes)
    python benchmarks/quant_error.py --flavors tiny

For each flavor: one random-weight float32 model (std 0.02, unit norms), a prompt of text rows
then audio rows, and one frame of codes fed to the decoder. Reported per precision
(``csm_engine.quantize.logit_error``): relative RMS and max error of the codebook-0 logits of
every prompt row and of the 31 teacher-forced decoder logits (divided by the float32 logits'
std), and how often the top-1 token agrees. Random weights have no trained outliers, so this
bounds the arithmetic error of each precision, not the audible effect on a trained model.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import random_csm_model, share_weights  # noqa: E402

from csm_engine.quantize import PRECISIONS, apply_precision, fbgemm_available, logit_error, probe_logits  # noqa: E402


def probe_inputs(cfg, n_text: int = 24, n_audio: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = n_text + n_audio
    tokens = torch.zeros(1, n, 33, dtype=torch.long)
    tokens[0, :n_text, -1] = torch.randint(0, cfg.text_vocab_size, (n_text,), generator=g)
    tokens[0, n_text:, :32] = torch.randint(0, 2048, (n_audio, 32), generator=g)
    mask = torch.zeros(1, n, 33, dtype=torch.bool)
    mask[0, :n_text, -1] = True
    mask[0, n_text:, :32] = True
    return tokens, mask, torch.randint(0, 2048, (1, 32), generator=g)


def report(flavor: str, precisions: list[str], seed: int = 0, block: int = 32) -> dict:
    ref = random_csm_model(flavor, seed=seed)
    ref.setup_caches(1)
    inputs = probe_inputs(ref.config, seed=seed)
    reference = probe_logits(ref, *inputs, block=block)
    out = {}
    for precision in precisions:
        model = share_weights(ref)
        apply_precision(model, precision)
        model.setup_caches(1)
        out[precision] = {k: round(v, 5) for k, v in logit_error(reference, probe_logits(model, *inputs, block=block)).items()}
        del model
        gc.collect()
        print(f"# {flavor} {precision}: {out[precision]}", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavors", default="tiny,1B")
    p.add_argument("--dtype", default=",".join(x for x in PRECISIONS if x != "float32"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--block", type=int, default=32, help="prompt rows per prefill call (the Generator uses 32)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = [d for d in args.dtype.split(",") if d and (d != "int8-dynamic" or fbgemm_available())]
    result = {"metric": "logit error vs float32 (rel = divided by the float32 logits' std)",
              "block": args.block, "flavors": {f: report(f, precisions, block=args.block) for f in args.flavors.split(",") if f}}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
