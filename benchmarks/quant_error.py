"""Logit error of bf16 / int8 / int8-dynamic against float32, on the tiny and 1B shapes; one JSON object.

    python benchmarks/quant_error.py                  # tiny and 1B (1B needs ~12 GB and a few minutes)
    python benchmarks/quant_error.py --flavors tiny

For each flavor: one random-weight float32 model (std 0.02, unit norms), a prompt of text rows
then audio rows, and one frame of codes fed to the decoder. Reported per precision
(``logit_error`` below): relative RMS and max error of the codebook-0 logits of
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
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import random_csm_model, share_weights  # noqa: E402
from provenance import provenance  # noqa: E402

from csm_engine.precision import PRECISIONS  # noqa: E402
from csm_engine.quantize import apply_precision, fbgemm_available  # noqa: E402


@torch.inference_mode()
def probe_logits(model, tokens: Tensor, mask: Tensor, codes: Tensor, block: int = 32) -> tuple[Tensor, Tensor]:
    """Logits to compare precisions on, computed the way generation batches rows.

    tokens, mask (1, T, 33) a prompt, prefilled in position-aligned blocks of ``block`` rows
    (as ``Generator`` does); codes (1, 32) the frame teacher-forced through the decoder one
    step at a time (positions 0-1, then one per codebook, as ``generate_frame``). Returns
    float32 (T, 2051) codebook-0 logits of every prompt row and (31, 2051) decoder logits.
    """
    model.reset_caches()
    n = tokens.shape[1]
    h = torch.cat([model.backbone_hidden(tokens[:, a:a + block], mask[:, a:a + block], a)
                   for a in range(0, n, block)], dim=1)
    logits0 = model.codebook0_head(h)[0].float()
    n_cb = model.config.audio_num_codebooks
    dec_in = model.projection(torch.cat([h[:, -1:], model.embed_audio(0, codes[:, :1]).to(h.dtype)], dim=1))
    logits = []
    for i in range(1, n_cb):
        dh = model.decoder_hidden(dec_in, 0 if i == 1 else i)[0, -1]
        logits.append(model.audio_logits(dh, i).float())
        dec_in = model.projection(model.embed_audio(i, codes[:, i:i + 1]).to(h.dtype))
    return logits0, torch.stack(logits)


def logit_error(reference: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor]) -> dict[str, float]:
    """How far ``other``'s probe logits are from the reference: relative RMS and max error, top-1 agreement."""
    out: dict[str, float] = {}
    for name, a, b in (("codebook0", reference[0], other[0]), ("decoder", reference[1], other[1])):
        scale = float(a.std())
        out[f"{name}_rel_rms"] = float((a - b).pow(2).mean().sqrt()) / scale
        out[f"{name}_rel_max"] = float((a - b).abs().max()) / scale
        out[f"{name}_top1_agree"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return out


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
        errors = logit_error(reference, probe_logits(model, *inputs, block=block))
        out[precision] = {k: round(v, 5) for k, v in errors.items()}
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
    flavors = {f: report(f, precisions, block=args.block) for f in args.flavors.split(",") if f}
    result = {"metric": "logit error vs float32 (rel = divided by the float32 logits' std)",
              "block": args.block, "flavors": flavors}
    result["provenance"] = provenance()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
