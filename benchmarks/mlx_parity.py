"""Greedy frames of the MLX engine against the torch engine's, on CSM-1B shapes with random weights.

    python benchmarks/mlx_parity.py                           # 1B shapes (~7 GB peak, minutes on 2 cores)
    python benchmarks/mlx_parity.py --flavor tiny             # what tests/test_mlx_engine.py runs

A multi-turn conversation with audio context (``engine_speed.Conversation``: random Mimi codes
registered as each clip's, never encoded): each turn adds a user turn, the agent answers
``--frames`` greedy frames, and its answer joins the context as the agent keeps it. Torch runs
the conversation with its conversation cache; MLX runs it twice, with the cache (each turn
prefills only its new rows) and without (every turn prefills everything). float32 on both sides.
To fit one 1B model in memory at a time, the torch side runs first and keeps only its frames;
its weights are then moved into MLX one tensor at a time.

Exit status 1 when any MLX frame differs from torch's; the JSON says where, with the prefilled
rows of each turn and the provenance.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import random_csm_model  # noqa: E402
from engine_speed import PeakRSS, text_of  # noqa: E402
from provenance import provenance  # noqa: E402
from report import emit  # noqa: E402

from csm_engine.codec import MimiCodec  # noqa: E402
from csm_engine.config import FRAME_MS  # noqa: E402
from csm_engine.generator import Generator  # noqa: E402
from csm_engine.tokens import Segment, TextTokenizer  # noqa: E402

GREEDY = dict(temperature=0.0, topk=1)


class Turns:
    """The same conversation on any engine: user turns of random codes, the agent's own answers."""

    def __init__(self, n_turns: int, user_frames: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.users = [(text_of(8, i), torch.randint(1, 2048, (32, user_frames + i), generator=g))
                      for i in range(n_turns)]

    def run(self, gen, frames: int, cached: bool) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Greedy frames (n, 32) of each agent turn, and (prefilled, prompt) rows of each."""
        context: list[Segment] = []
        replies, rows = [], []
        gen.forget_cache()
        for i, (text, codes) in enumerate(self.users):
            context.append(Segment(0, text, _clip(gen, codes, float(i + 1))))
            if not cached:
                gen.forget_cache()
            prompt = gen.build_prompt(text_of(6, 50 + i), 1, context, FRAME_MS * frames, runaway_guard=False)
            said = torch.stack([f.clone() for f in gen.frames(prompt, **GREEDY)])
            replies.append(said)
            rows.append((gen.last_prefill_rows, int(prompt.tokens.shape[0])))
            spoken = said[said.any(dim=1)]  # the end frame, if any, is not part of the clip
            context.append(Segment(1, text_of(6, 50 + i) + ".", _clip(gen, spoken.T.contiguous(), -float(i + 1))))
            print(f"#   turn {i + 1}: {rows[-1][0]} of {rows[-1][1]} rows prefilled", file=sys.stderr, flush=True)
        return replies, rows


def _clip(gen, codes: torch.Tensor, tag: float) -> torch.Tensor:
    """A stand-in waveform the engine knows as the decoding of ``codes`` (never Mimi-encoded)."""
    audio = torch.full((codes.shape[1] * 1920,), tag)
    gen.remember_codes(audio, codes)
    return audio


def mlx_weights_from(model) -> dict:
    """The torch model's weights as MLX float32 arrays, freeing each torch tensor as it is copied."""
    from csm_engine.mlx.convert import state_dict_to_mlx

    state = model.state_dict()
    config = model.config
    del model
    out = {}
    for name in list(state):
        out.update(state_dict_to_mlx({name: state.pop(name)}, config, "float32"))
    return out


def compare(want: list[torch.Tensor], got: list[torch.Tensor]) -> list[dict]:
    return [{"turn": i + 1, "frames": int(w.shape[0]), "equal": bool(w.shape == g.shape and torch.equal(w, g)),
             "first_difference": None if w.shape == g.shape and torch.equal(w, g) else
             int(next((k for k in range(min(len(w), len(g))) if not torch.equal(w[k], g[k])), min(len(w), len(g))))}
            for i, (w, g) in enumerate(zip(want, got))]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavor", default="1B")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--frames", type=int, default=3, help="greedy frames per agent turn")
    p.add_argument("--user-frames", type=int, default=12, help="frames of the first user turn's audio")
    p.add_argument("--block", type=int, default=None, help="prefill block (default: each engine's own, 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args(argv)
    import mlx.core as mx

    from csm_engine.mlx.convert import build_model
    from csm_engine.mlx.generator import MLXGenerator
    from csm_engine.testing.checkpoints import build_text_tokenizer

    tokenizer = TextTokenizer(build_text_tokenizer())
    codec = MimiCodec.load(None, device="cpu")  # frames never pass through Mimi here
    turns = Turns(args.turns, args.user_frames, args.seed)
    result: dict = {"provenance": {**provenance(), "load_average": list(os.getloadavg()),
                                   "mlx_device": str(mx.default_device())},
                    "flavor": args.flavor, "turns": args.turns, "frames_per_turn": args.frames, "dtype": "float32"}
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        model = random_csm_model(args.flavor, seed=args.seed)
        config = model.config
        gen = Generator(model, codec, tokenizer, cuda_graphs=False, dtype="float32")
        if args.block:
            gen.prefill_block = args.block
        print("# torch, cached", file=sys.stderr, flush=True)
        with torch.inference_mode():
            want, torch_rows = turns.run(gen, args.frames, cached=True)
        result["torch"] = {"prefill_rows": torch_rows, "seconds": round(time.perf_counter() - t0, 1)}
        del gen
        weights = mlx_weights_from(model)
        del model
        gc.collect()
        t1 = time.perf_counter()
        mgen = MLXGenerator(build_model(config, weights), codec, tokenizer, precision="float32")
        del weights
        if args.block:
            mgen.prefill_block = args.block
        runs = {}
        for cached in (True, False):
            print(f"# mlx, {'cached' if cached else 'no cache'}", file=sys.stderr, flush=True)
            got, rows = turns.run(mgen, args.frames, cached=cached)
            runs["cached" if cached else "uncached"] = {"prefill_rows": rows, "turns": compare(want, got)}
        result["mlx"] = {**runs, "seconds": round(time.perf_counter() - t1, 1)}
        del mgen
        gc.collect()
    result["peak_rss_mb"] = rss.peak
    distinct = len({tuple(f) for f in torch.cat(want).tolist()})
    result["distinct_torch_frames"] = distinct
    result["equal"] = all(t["equal"] for run in runs.values() for t in run["turns"])
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(0 if main()["equal"] else 1)
