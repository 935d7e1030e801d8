"""Engine speed on real CSM-1B shapes with random weights; prints one JSON object.

    python benchmarks/engine_speed.py                      # default precision + float32/bf16 + transformers
    python benchmarks/engine_speed.py --frames 8 --dtype auto --no-transformers   # quick look

Rows (one per configuration, all in this process, same weights, same frame count):
- ``frames_per_s``: steady frames per second of the model's frame loop (backbone step + 31
  decoder steps + sampling), after the first frame, the best of ``--repeats`` passes (the
  bound below is a best sample too; ``frames_per_s_median`` and the passes are there);
  ``rtf``: seconds per frame streamed through Mimi after the first chunk / 80 ms (below 1
  keeps up with playback);
  ``rtf_utterance``: the same over the whole call, prefill included;
- ``first_chunk_ms``: from ``Generator.stream`` to its first PCM chunk (2 frames), in the
  second turn of a short conversation (``--short-context-tokens``) with the conversation
  cache warm; the default configuration also reports it after a long conversation
  (``--context-tokens``), with and without the cache;
- ``peak_rss_mb``: peak resident memory while the row ran (the process holds the float32
  reference weights too); ``bound_frames_per_s``: read bandwidth measured in this run with
  the same thread count (the best of samples taken before each row and at the end: a shared
  machine's bandwidth drifts) / weight bytes one frame reads at that precision.
transformers' ``CsmForConditionalGeneration`` runs with the same weights (converted by
``csm_engine.weights.original_to_transformers``) and frame count.

Speed does not depend on the weight values when the frame count is fixed (no early stop:
``runaway_guard=False``, no silence trimming).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import current_rss_mb, n_params, random_csm_model, share_weights  # noqa: E402
from provenance import provenance  # noqa: E402

from csm_engine.codec import MimiCodec  # noqa: E402
from csm_engine.config import FRAME_MS, get_flavor  # noqa: E402
from csm_engine.generator import Generator  # noqa: E402
from csm_engine.precision import PRECISIONS  # noqa: E402
from csm_engine.prompt import prepare_text  # noqa: E402
from csm_engine.quantize import (  # noqa: E402
    apply_precision,
    cpu_has_avx512_bf16,
    resolve_precision,
    weight_bytes_per_frame,
)
from csm_engine.tokens import Segment, TextTokenizer  # noqa: E402

WORDS = ("so what do you think about the weather today it looks like rain but maybe the sun comes out "
         "later and we can go for a walk by the river").split()


# ---------------------------------------------------------------------------------------------
# Measuring helpers
# ---------------------------------------------------------------------------------------------


class PeakRSS:
    """Samples this process's resident memory every 20 ms while active (MB)."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_mb())
            self._stop.wait(0.02)

    def __enter__(self):
        self.peak = current_rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mb())


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def read_bandwidth_gbps(device: str = "cpu", n_bytes: int | None = None, repeats: int = 5) -> float:
    """Best-of-N read bandwidth of summing a large float32 tensor (GB/s): CPU at the current
    thread count, or the GPU's memory (4 GiB there, far beyond its L2)."""
    n_bytes = n_bytes or (1 << 32 if torch.device(device).type == "cuda" else 1 << 30)
    x = torch.ones(n_bytes // 4, device=device)
    x.sum()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    del x
    return n_bytes / best / 1e9


def text_of(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words)) + "."


class Conversation:
    """Synthetic turns: text plus random Mimi codes registered with the generator (never encoded)."""

    def __init__(self, gen: Generator, seed: int = 0):
        self.gen = gen
        self.rng = torch.Generator().manual_seed(seed)
        self.n = 0

    def turn(self, speaker: int, n_words: int, n_frames: int) -> Segment:
        self.n += 1
        codes = torch.randint(1, 2048, (32, n_frames), generator=self.rng)
        audio = torch.full((n_frames * 1920,), float(self.n))  # stands in for the decoded waveform
        self.gen.remember_codes(audio, codes)
        return Segment(speaker, text_of(n_words, self.n), audio)

    def history(self, n_rows: int) -> list[Segment]:
        """Turns whose token rows add up to about ``n_rows`` (each ~12 text rows + up to 40 audio rows)."""
        segs: list[Segment] = []
        rows = 0
        while rows < n_rows:
            seg = self.turn(len(segs) % 2, 10, min(40, max(1, n_rows - rows - 14)))
            rows += self.gen.segment_frames(seg)[0].shape[0]
            segs.append(seg)
        return segs


def fixed(n_frames: int, seed: int = 0) -> dict:
    return dict(max_audio_length_ms=FRAME_MS * n_frames, runaway_guard=False, silence=None, seed=seed)


def frame_loop_speed(gen: Generator, conv: Conversation, frames: int, context_rows: int, repeats: int = 1) -> dict:
    """Frames/s of the model's frame loop alone (no Mimi), steady state after the first frame.

    Timed ``repeats`` times (cold prompt each time): ``frames_per_s`` is the best pass, as the
    bandwidth bound is the best bandwidth sample; the median and every pass are reported too.
    """
    prompt = gen.build_prompt(text_of(8), 1, conv.history(context_rows), FRAME_MS * frames, runaway_guard=False)
    list(gen.frames(prompt, seed=1))  # warm-up (and fills the cache)
    passes, prefill_ms = [], []
    for r in range(repeats):
        gen.forget_cache()
        stamps = []
        t0 = time.perf_counter()
        for frame in gen.frames(prompt, seed=2 + r):
            frame.cpu()  # the frame exists (a GPU computes it asynchronously); the agent needs it here anyway
            stamps.append(time.perf_counter() - t0)
        passes.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        prefill_ms.append(stamps[0] * 1000)
    return {"frames_per_s": max(passes), "frames_per_s_median": float(np.median(passes)), "frames_per_s_passes": passes,
            "prefill_ms": min(prefill_ms), "prompt_rows": int(prompt.tokens.shape[0])}


def first_chunk_ms(gen: Generator, conv: Conversation, context_rows: int, warm: bool, chunk_frames: int = 2,
                   reply_frames: int = 24) -> dict:
    """ms to the first PCM chunk of a second turn after ``context_rows`` of conversation.

    Turn 1: the agent answers the history (that fills the conversation cache); turn 2 adds that
    answer (its codes, as the agent keeps them) and a new user turn, then speaks again.
    ``warm=False`` drops the cache first, as every public CSM implementation does each turn.
    """
    history = conv.history(context_rows - 110)
    reply = text_of(9, 3)
    codes: list[torch.Tensor] = []
    list(gen.stream(reply, 1, history, on_frame=lambda i, f: codes.append(f.clone()), **fixed(reply_frames)))
    agent = Segment(1, prepare_text(reply), torch.full((len(codes) * 1920,), -float(conv.n + 1)))
    gen.remember_codes(agent.audio, torch.stack(codes, dim=1))
    context = history + [agent, conv.turn(0, 10, 19)]
    if not warm:
        gen.forget_cache()
    t0, c0 = time.perf_counter(), time.process_time()
    chunks = gen.stream(text_of(8, 5), 1, context, chunk_frames=chunk_frames, **fixed(8))
    next(chunks)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    chunks.close()
    prompt_rows = gen.build_prompt(text_of(8, 5), 1, context, FRAME_MS * 8, runaway_guard=False).tokens.shape[0]
    # CPU time of the whole process (every thread): the work, whatever else the machine runs.
    return {"first_chunk_ms": elapsed * 1000, "first_chunk_cpu_ms": cpu * 1000, "prefill_rows": gen.last_prefill_rows,
            "prompt_rows": int(prompt_rows)}


def streamed_rtf(gen: Generator, conv: Conversation, frames: int, context_rows: int) -> dict:
    """Real-time factors of stream() (model + Mimi decode), cache warm; below 1 keeps up with playback.

    ``rtf``: steady state, seconds per frame after the first chunk / 80 ms (what decides
    whether playback keeps up); ``rtf_utterance``: the whole call including its prefill.
    """
    context = conv.history(context_rows)
    list(gen.stream(text_of(8), 1, context, **fixed(2)))
    stamps = []
    t0 = time.perf_counter()
    for _chunk in gen.stream(text_of(8), 1, context, chunk_frames=1, **fixed(frames)):
        stamps.append(time.perf_counter() - t0)
    audio_s = len(stamps) * FRAME_MS / 1000
    steady = (stamps[-1] - stamps[0]) / ((len(stamps) - 1) * FRAME_MS / 1000) if len(stamps) > 1 else float("nan")
    return {"rtf": steady, "rtf_utterance": stamps[-1] / audio_s}


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def torch_row(ref, precision: str, codec, tokenizer, args, long_context: bool, cuda_graphs: bool | None = None) -> dict:
    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        model = share_weights(ref)
        apply_precision(model, precision)
        gen = Generator(model, codec, tokenizer, cuda_graphs=cuda_graphs)
        conv = Conversation(gen, seed=1)
        row: dict = {"backend": "torch", "device": args.device, "dtype": precision, "threads": args.threads,
                     "frames": args.frames}
        if on_gpu:
            row["cuda_graphs"] = gen.uses_cuda_graphs
        loop = frame_loop_speed(gen, conv, args.frames, args.short_context_tokens, args.repeats)
        row.update(loop)
        row.update(streamed_rtf(gen, conv, args.frames, args.short_context_tokens))
        rf = args.reply_frames
        short = first_chunk_ms(gen, conv, args.short_context_tokens, warm=True, reply_frames=rf)
        row["first_chunk_ms"] = short["first_chunk_ms"]
        row["first_chunk_prefill_rows"] = short["prefill_rows"]
        if long_context:
            warm = first_chunk_ms(gen, conv, args.context_tokens, warm=True, reply_frames=rf)
            cold = first_chunk_ms(gen, conv, args.context_tokens, warm=False, reply_frames=rf)
            short_cold = first_chunk_ms(gen, conv, args.short_context_tokens, warm=False, reply_frames=rf)
            row["first_chunk_long_ms"] = warm["first_chunk_ms"]
            row["first_chunk_long_prefill_rows"] = warm["prefill_rows"]
            row["first_chunk_long_prompt_rows"] = warm["prompt_rows"]
            row["first_chunk_long_no_cache_ms"] = cold["first_chunk_ms"]
            row["first_chunk_short_no_cache_ms"] = short_cold["first_chunk_ms"]
        row["weight_bytes_per_frame"] = weight_bytes_per_frame(model)  # the bound is set once bandwidth is known
        del gen, model, conv
        gc.collect()
    row["peak_rss_mb"] = rss.peak
    if on_gpu:
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20  # the float32 reference included
    return row


class FrameStamps:
    """A generate() streamer that notes when each generated frame reaches the host."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:  # transformers calls put(prompt) once, then put(frame) per frame
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def transformers_rows(ref, dtypes: list[str], args, static: bool = False) -> list[dict]:
    """transformers' CsmForConditionalGeneration.generate with the same weights and frame count.

    Frames are timed as they reach the host (a streamer), so the steady frames/s excludes the
    prompt, as for our rows. ``static``: transformers' static caches, with which its generate
    compiles the model's forward (GPUs; the first call compiles and is not timed).
    """
    from transformers import CsmConfig, CsmForConditionalGeneration

    from csm_engine import weights

    cfg = ref.config
    hf_sd = weights.original_to_transformers(ref.state_dict(), cfg)
    hf_sd["depth_decoder.model.embed_tokens.weight"] = ref.audio_embeddings.weight
    rows = []
    for dtype in dtypes:
        with PeakRSS() as rss:
            with torch.device("meta"):
                hf = CsmForConditionalGeneration(CsmConfig(**weights.transformers_config_dict(cfg)))
            hf.load_state_dict(hf_sd, strict=False, assign=True)
            hf.codec_model.to_empty(device=args.device)  # the codec is not used (output_audio=False)
            # Non-persistent buffers were made on meta: rebuild them as transformers' init does.
            hf_cfg = hf.config
            hf.backbone_model.embed_tokens.audio_tokens_offsets = (
                torch.arange(hf_cfg.num_codebooks) * hf_cfg.vocab_size)
            for owner in (hf.backbone_model, hf.depth_decoder.model):
                owner.rotary_emb = type(owner.rotary_emb)(config=owner.rotary_emb.config)
            still_meta = [n for n, b in hf.named_buffers() if b.is_meta]
            if still_meta:
                raise RuntimeError(f"transformers buffers left unbuilt: {still_meta}")
            hf = hf.to(args.device, getattr(torch, dtype)).eval()
            if static:
                hf.generation_config.cache_implementation = "static"
                hf.depth_decoder.generation_config.cache_implementation = "static"
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, cfg.text_vocab_size - 256, (1, args.short_context_tokens), generator=g)
            ids = ids.to(args.device)
            opts = dict(do_sample=True, top_k=50, temperature=0.9, depth_decoder_do_sample=True,
                        depth_decoder_top_k=50, depth_decoder_temperature=0.9, output_audio=False,
                        max_new_tokens=args.frames)
            passes, first_ms = [], []
            with torch.inference_mode():
                t0 = time.perf_counter()
                hf.generate(input_ids=ids, **opts)  # warm-up (compiles, with static caches)
                sync(args.device)
                warmup_s = time.perf_counter() - t0
                for _ in range(args.repeats):  # timed as ours: best pass, median and passes reported
                    stamps = FrameStamps()
                    t0 = time.perf_counter()
                    out = hf.generate(input_ids=ids, streamer=stamps, **opts)
                    out = out if isinstance(out, torch.Tensor) else out.sequences
                    produced = min(int(out.shape[1]) if out.dim() == 3 else args.frames, args.frames)
                    frames_at = stamps.stamps[-produced:]
                    passes.append((produced - 1) / (frames_at[-1] - frames_at[0]))
                    first_ms.append((frames_at[0] - t0) * 1000)
            del hf
            gc.collect()
        rows.append({
            "backend": "transformers", "device": args.device, "dtype": dtype, "threads": args.threads,
            "static_cache_compiled": static, "frames": produced, "first_frame_ms": min(first_ms),
            "frames_per_s": max(passes), "frames_per_s_median": float(np.median(passes)),
            "frames_per_s_passes": passes, "warmup_s": warmup_s, "peak_rss_mb": rss.peak,
        })
        print(f"# transformers {dtype}{' static' if static else ''}: {rows[-1]['frames_per_s']:.2f} frames/s",
              file=sys.stderr, flush=True)
    return rows


def mlx_rows(args) -> list[dict]:
    """The MLX engine's rows (csm_engine.mlx.bench), same frames and context."""
    from csm_engine.mlx.bench import bench_mlx

    rows = []
    for dtype in args.dtype:
        bits = 8 if dtype.startswith("int8") else None
        mdtype = "bfloat16" if dtype in ("bfloat16", "int8") else "float32"
        row = bench_mlx(get_flavor(args.flavor), args.frames, args.short_context_tokens, dtype=mdtype,
                        quantize_bits=bits)
        row["threads"] = args.threads
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=24, help="frames per timed utterance (80 ms each)")
    p.add_argument("--context-tokens", type=int, default=1500, help="long conversation for the first-chunk figure")
    p.add_argument("--short-context-tokens", type=int, default=100, help="short conversation (rows) for the other rows")
    p.add_argument("--dtype", default="auto,int8,int8-dynamic,bfloat16,float32",
                   help=f"comma list of {', '.join(PRECISIONS)}, auto (device default) or all; the first is 'default'")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--cuda-graphs", choices=("on", "off", "both"), default="both",
                   help="CUDA only: replay frames as CUDA graphs (on), run them eagerly (off), or a row of each")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reply-frames", type=int, default=24,
                   help="length of the agent's first reply (kept in the cache) before the timed second turn")
    p.add_argument("--backend", choices=("torch", "mlx"), default="torch")
    p.add_argument("--flavor", default="1B", help="model shapes (tiny for a smoke run)")
    p.add_argument("--transformers-dtype", default="bfloat16,float32",
                   help="comma list; the summary compares against the fastest (on AVX2 without AVX512-BF16, "
                        "float32 may beat bf16); --no-transformers skips")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--transformers-static", action="store_true",
                   help="also transformers with static caches (its generate then compiles the forward; GPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes of each frame loop (ours and transformers'); frames/s is the best pass, "
                        "as the bound uses the best bandwidth sample (medians are reported too)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    names = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if names == ["all"]:
        names = ["auto"] + list(PRECISIONS)
    args.dtype = list(dict.fromkeys(resolve_precision(n, args.device) for n in names))
    args.transformers_dtype = [] if args.no_transformers else [d for d in args.transformers_dtype.split(",") if d]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    result: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "avx512_bf16": cpu_has_avx512_bf16(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "flavor": args.flavor, "frames": args.frames, "context_tokens": args.context_tokens,
        "short_context_tokens": args.short_context_tokens, "default_dtype": args.dtype[0],
    }
    if args.backend == "mlx":
        result["rows"] = mlx_rows(args)
        result["provenance"] = provenance(args.device)
        print(json.dumps(result, indent=1))
        return result
    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        result["machine"]["gpu"] = torch.cuda.get_device_name()
    elif args.device != "cpu":
        raise SystemExit(f"--device {args.device}: engine_speed.py measures cpu and cuda")
    # (precision, cuda_graphs) per row: on a GPU, graphs on and/or off; None = the device default.
    graph_modes = {"on": [True], "off": [False], "both": [True, False]}[args.cuda_graphs] if on_gpu else [None]
    configs = [(precision, graphs) for precision in args.dtype for graphs in graph_modes]

    # The read bandwidth of a shared VM drifts; it is sampled before every row and at the end,
    # and the bound uses the best sample (the most the machine delivered in this run).
    samples = [read_bandwidth_gbps(args.device)]
    ref = random_csm_model(args.flavor, seed=args.seed, device=args.device)
    result["params"] = n_params(ref)
    from csm_engine.testing.checkpoints import build_text_tokenizer

    tokenizer = TextTokenizer(build_text_tokenizer())
    codec = MimiCodec.load(None, device=args.device)
    rows = []
    for i, (precision, graphs) in enumerate(configs):
        if i:
            samples.append(read_bandwidth_gbps(args.device))
        rows.append(torch_row(ref, precision, codec, tokenizer, args, long_context=i == 0, cuda_graphs=graphs))
        label = precision if graphs is None else f"{precision} cuda_graphs={graphs}"
        print(f"# {label}: {rows[-1]['frames_per_s']:.2f} frames/s", file=sys.stderr, flush=True)
    del codec
    gc.collect()
    if args.transformers_dtype:
        rows += transformers_rows(ref, args.transformers_dtype, args)
        if args.transformers_static:
            rows += transformers_rows(ref, args.transformers_dtype, args, static=True)
    samples.append(read_bandwidth_gbps(args.device))
    bandwidth = max(samples)
    result["read_bandwidth_gbps"] = bandwidth
    result["read_bandwidth_samples_gbps"] = samples
    for row in rows:
        if "weight_bytes_per_frame" in row:
            row["bound_frames_per_s"] = bandwidth * 1e9 / row["weight_bytes_per_frame"]
            row["fraction_of_bandwidth_bound"] = row["frames_per_s"] / row["bound_frames_per_s"]
    result["rows"] = rows

    default = rows[0]
    hf = [r for r in rows if r["backend"] == "transformers"]
    best_hf = max(hf, key=lambda r: r["frames_per_s"]) if hf else None
    result["summary"] = {
        "default_dtype": default["dtype"],
        "speedup_vs_transformers": default["frames_per_s"] / best_hf["frames_per_s"] if best_hf else None,
        "transformers_dtype_compared": best_hf["dtype"] if best_hf else None,
        "fraction_of_bandwidth_bound": default["fraction_of_bandwidth_bound"],
        "speedup_vs_transformers_medians": (default["frames_per_s_median"] / best_hf["frames_per_s_median"]
                                            if best_hf else None),
        "fraction_of_bandwidth_bound_median": default["frames_per_s_median"] / default["bound_frames_per_s"],
        "first_chunk_long_over_short": default["first_chunk_long_ms"] / default["first_chunk_ms"],
        "first_chunk_long_over_short_without_cache":
            default["first_chunk_long_no_cache_ms"] / default["first_chunk_short_no_cache_ms"],
    }
    ours = [r for r in rows if r["backend"] == "torch"]
    fastest = max(ours, key=lambda r: r["frames_per_s"])
    result["summary"]["fastest_dtype"] = fastest["dtype"]
    result["summary"]["fastest_speedup_vs_transformers"] = (
        fastest["frames_per_s"] / best_hf["frames_per_s"] if best_hf else None)
    result["summary"]["fastest_fraction_of_bandwidth_bound"] = fastest["fraction_of_bandwidth_bound"]
    result["wall_s"] = time.perf_counter() - t_start
    result["provenance"] = provenance(args.device)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
