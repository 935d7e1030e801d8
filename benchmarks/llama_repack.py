"""llama.cpp's weight repacking on this CPU: prompt and generation tokens/s with extra buffer types on and off.

    python benchmarks/llama_repack.py [--repeats 5] [--threads 1] [--prompt-tokens 128] [--gen-tokens 32]
                                      [--out FILE.json]

What the AMX fallback costs (``use_extra_bufts = False``: auto on AMX CPUs, or
``CSM_LLAMA_REPACK=off``; see agent/llm/llama_cpu.py). Models: the embedded
SmolLM2-135M-Instruct as shipped (Q4_1) and the same weights requantized to Q4_0, a type that
llama.cpp's CPU_REPACK buffer does repack on AVX2, AVX512 and NEON. Each is loaded twice,
through the agent's own switch (``repack_setting``), extra buffer types on and off. For each
load: what llama.cpp's load log says went into a repack buffer (MiB), prompt evaluation tok/s
(one batch of ``--prompt-tokens``), generation tok/s (one token per decode, as a reply runs).
The four loads take turns on every repeat, so a change in the machine's load hits them alike.
Prints a table and one JSON object (with provenance); ``--out`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import provenance  # noqa: E402

from agent.embedded import smollm2_gguf  # noqa: E402
from agent.llm.llama_cpu import decide_repack, llama_log, repack_setting  # noqa: E402

TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening to light the lamp, counting the steps "
        "and listening to the waves below, while ships passed far out at sea and the gulls settled on the rocks. ")
_BUFFER = re.compile(r"(\S+) model buffer size =\s*([\d.]+) MiB")


def requantize(source: Path, target: Path, ftype: int) -> Path:
    """``source`` GGUF requantized to llama.cpp's ``ftype`` (e.g. Q4_0) at ``target``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = ftype, True, 1
    with llama_log() as lines:
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if failed:
        raise SystemExit(f"llama.cpp could not requantize {source}: {''.join(lines[-1:]).strip()}")
    return target


def load(path: Path, repack: bool, threads: int, n_ctx: int):
    """A Llama of ``path`` with extra buffer types on/off, and llama.cpp's buffer sizes (MiB) at load."""
    import llama_cpp

    with llama_log() as lines, repack_setting(repack):
        llama = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                                seed=1, verbose=False)
    buffers: dict[str, float] = {}
    for name, mib in _BUFFER.findall("".join(lines)):
        buffers[name] = buffers.get(name, 0.0) + float(mib)
    return llama, buffers


def time_once(llama, prompt: list[int], gen: list[int]) -> tuple[float, float]:
    """Seconds for the prompt as one batch from an empty cache, then for ``gen`` one token at a time."""
    llama.reset()
    started = time.perf_counter()
    llama.eval(prompt)
    prompt_s = time.perf_counter() - started
    started = time.perf_counter()
    for token in gen:
        llama.eval([token])
    return prompt_s, time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    import llama_cpp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per load (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1, the agent's on 2 cores)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    parser.add_argument("--gen-tokens", type=int, default=32, help="tokens decoded one by one (default 32)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        shipped = smollm2_gguf()
        q4_0 = requantize(shipped, Path(scratch) / "SmolLM2-135M-Instruct-Q4_0.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)
        n_ctx = args.prompt_tokens + args.gen_tokens + 16
        loads = {}
        for model, path in (("Q4_1 (shipped)", shipped), ("Q4_0 (requantized)", q4_0)):
            for repack in (True, False):
                loads[(model, repack)] = load(path, repack, args.threads, n_ctx)
        first = next(iter(loads.values()))[0]
        tokens = first.tokenize(TEXT.encode() * (1 + args.prompt_tokens // 30), add_bos=True)
        prompt, gen = tokens[: args.prompt_tokens], tokens[args.prompt_tokens : args.prompt_tokens + args.gen_tokens]
        if len(prompt) < args.prompt_tokens or len(gen) < args.gen_tokens:
            raise SystemExit("the benchmark text is too short for these token counts")
        for llama, _ in loads.values():  # the first decode builds llama.cpp's graph: not timed
            time_once(llama, prompt[:8], gen[:2])
        load_before = os.getloadavg()[0]
        times: dict[tuple, list[tuple[float, float]]] = {key: [] for key in loads}
        for _ in range(args.repeats):
            for key, (llama, _) in loads.items():
                times[key].append(time_once(llama, prompt, gen))
        load_after = os.getloadavg()[0]

    rows = []
    for (model, repack), (_, buffers) in loads.items():
        prompt_s = statistics.median(t[0] for t in times[(model, repack)])
        gen_s = statistics.median(t[1] for t in times[(model, repack)])
        rows.append({"model": model, "extra_bufts": repack,
                     "repacked_mib": round(sum(v for k, v in buffers.items() if k in ("CPU_REPACK", "AMX")), 2),
                     "buffers_mib": buffers, "prompt_tok_s": round(len(prompt) / prompt_s, 1),
                     "gen_tok_s": round(len(gen) / gen_s, 1)})
    cost = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        on, off = (next(r for r in rows if r["model"] == model and r["extra_bufts"] is b) for b in (True, False))
        cost[model] = {"prompt_off_over_on": round(off["prompt_tok_s"] / on["prompt_tok_s"], 3),
                       "gen_off_over_on": round(off["gen_tok_s"] / on["gen_tok_s"], 3)}
    result = {"llama_cpp_python": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode(),
              "this_cpu_decision": decide_repack().reason, "threads": args.threads, "repeats": args.repeats,
              "prompt_tokens": len(prompt), "gen_tokens": len(gen), "rows": rows, "off_over_on": cost,
              "load_average_1min": {"before": round(load_before, 2), "after": round(load_after, 2)},
              "provenance": provenance()}
    print(f"{'model':<20} {'extra bufts':<12} {'repacked MiB':>12} {'prompt tok/s':>13} {'gen tok/s':>10}")
    for r in rows:
        print(f"{r['model']:<20} {'on' if r['extra_bufts'] else 'off':<12} {r['repacked_mib']:>12.1f} "
              f"{r['prompt_tok_s']:>13.1f} {r['gen_tok_s']:>10.1f}")
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
