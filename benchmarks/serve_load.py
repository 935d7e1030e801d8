"""Load on a real csm-serve: N concurrent streaming clients; prints one JSON object.

    python benchmarks/serve_load.py --flavor tiny --clients 1,2,4
    python benchmarks/serve_load.py --flavor 1B --clients 1,2 --seconds 30      # CPU: ~8 GB peak, one deliberate run
    python benchmarks/serve_load.py --device cuda --clients 1,64,128,256,320 --seconds 20

The server is this script in a child process (``--serve``): random weights of the flavor's real
shapes (speed does not depend on their values), a random-init Mimi, the real app on uvicorn at
127.0.0.1, the batch engine with ``--max-streams`` (default: the largest N). The clients run in
``--client-procs`` processes of asyncio httpx streams; each client is a closed loop of requests
(a sentence of random words after a voice context of ``--context-frames`` codes shared by all,
``--frames`` frames each, 16-bit PCM in chunks of ``--chunk-frames``), the N clients starting
evenly over ``--ramp-s`` seconds, for ``--seconds`` seconds.

Per request: ``first_chunk_ms`` (request sent -> first audio byte), ``rtf`` (whole request time /
audio seconds; below 1 keeps ahead of playback from the first byte on), ``rtf_stream`` (time after
the first chunk / audio after it). Per N: their p50/p95, the share of requests faster than real
time, and the aggregate frames/s the server's counter gained while all N clients ran, against N=1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import provenance

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FRAME_S = 0.08
SAMPLE_RATE = 24_000
WORDS = ("so what do you think about the weather today it looks like rain but maybe the sun comes out "
         "later and we can go for a walk by the river").split()


# ---- the server (child process) ----------------------------------------------------------------


def serve(args: argparse.Namespace) -> None:
    import torch
    import uvicorn
    from _common import random_csm_model

    from csm_engine.batch.engine import BatchEngine, EngineOptions
    from csm_engine.codec import MimiCodec
    from csm_engine.generator import Generator
    from csm_engine.quantize import apply_precision
    from csm_engine.serve.app import create_app
    from csm_engine.serve.config import Limits, ServerConfig
    from csm_engine.serve.speech import SpeechService, VoiceTable
    from csm_engine.testing.checkpoints import build_text_tokenizer
    from csm_engine.tokens import TextTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = random_csm_model(args.flavor, device=args.device)
    apply_precision(model, args.dtype)
    generator = Generator(model, MimiCodec.load(None, device=args.device), TextTokenizer(build_text_tokenizer()))
    options = EngineOptions.for_device(args.device, max_streams=args.max_streams, cache_slots=args.max_streams + 8,
                                       max_queue=4 * args.max_streams)
    engine = BatchEngine(generator, options)
    started = time.perf_counter()
    engine.prepare()
    print(json.dumps({"prepare_s": round(time.perf_counter() - started, 2), "cuda_graphs": engine.cuda_graphs,
                      "precision": str(next(model.parameters()).dtype)}), file=sys.stderr, flush=True)
    limits = Limits(max_audio_ms=120_000)
    service = SpeechService(engine.start(), VoiceTable({}), ServerConfig(model_id="csm-1b", limits=limits))
    uvicorn.run(create_app(service), host="127.0.0.1", port=args.port, log_level="warning")


# ---- the clients (worker processes) --------------------------------------------------------------


def _body(rng: random.Random, context: list, frames: int, chunk_frames: int) -> dict:
    text = " ".join(rng.choices(WORDS, k=12)) + "."
    return {"model": "csm-1b", "input": text, "response_format": "pcm", "max_audio_ms": int(frames * FRAME_S * 1000),
            "chunk_frames": chunk_frames, "context": context}


async def _request(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first = None
    size = 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"error": f"HTTP {response.status_code}: {response.text[:200]}"}
        async for part in response.aiter_raw():
            if first is None and part:
                first = time.perf_counter()
            size += len(part)
    end = time.perf_counter()
    audio_s = size / 2 / SAMPLE_RATE
    first_audio_s = min(audio_s, body["chunk_frames"] * FRAME_S)
    return {"start": t0, "end": end, "first_chunk_ms": (first - t0) * 1000, "audio_s": audio_s,
            "rtf": (end - t0) / max(audio_s, 1e-9),
            "rtf_stream": (end - first) / max(audio_s - first_audio_s, 1e-9), "frames": round(audio_s / FRAME_S)}


async def _clients(url: str, first_client: int, n_clients: int, total: int, args: dict, context: list) -> list[dict]:
    import httpx

    deadline = args["t0"] + args["ramp_s"] + args["seconds"]
    results: list[dict] = []

    async def client_loop(index: int):
        rng = random.Random(index)
        await asyncio.sleep(max(0.0, args["t0"] + args["ramp_s"] * index / total - time.perf_counter()))
        async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30)) as client:
            while time.perf_counter() < deadline:
                result = await _request(client, url, _body(rng, context, args["frames"], args["chunk_frames"]))
                result["client"] = index
                results.append(result)
                if "error" in result:
                    await asyncio.sleep(0.5)

    await asyncio.gather(*(client_loop(first_client + i) for i in range(n_clients)))
    return results


def client_worker(url: str, first_client: int, n_clients: int, total: int, args: dict, context: list, out) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out.put(asyncio.run(_clients(url, first_client, n_clients, total, args, context)))


# ---- the driver --------------------------------------------------------------------------------------


def _health(url: str) -> dict:
    import httpx

    return httpx.get(url + "/health", timeout=30).json()


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": round(float(np.percentile(values, 50)), 3), "p95": round(float(np.percentile(values, 95)), 3)}


def run_load(url: str, n: int, args: argparse.Namespace, context: list) -> dict:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs_n = max(1, min(args.client_procs, n))
    shares = [n // procs_n + (i < n % procs_n) for i in range(procs_n)]
    t0 = time.perf_counter() + 2.0  # time for the workers to start
    shared = {"t0": t0, "ramp_s": args.ramp_s, "seconds": args.seconds, "frames": args.frames,
              "chunk_frames": args.chunk_frames}
    before = _health(url)
    procs, first = [], 0
    for share in shares:
        p = ctx.Process(target=client_worker, args=(url + "/v1/audio/speech", first, share, n, shared, context, out))
        p.start()
        procs.append(p)
        first += share
    # The window in which all N clients are running: after the ramp, until the deadline.
    time.sleep(max(0.0, t0 + args.ramp_s - time.perf_counter()))
    window_start, frames_start = time.perf_counter(), _health(url)["frames"]
    time.sleep(max(0.0, t0 + args.ramp_s + args.seconds - time.perf_counter()))
    window_s, frames_end = time.perf_counter() - window_start, _health(url)["frames"]
    results = [r for _ in procs for r in out.get()]
    for p in procs:
        p.join()
    after = _health(url)
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    return {
        "clients": n, "requests": len(results), "errors": len(errors), "first_errors": errors[:3],
        "first_chunk_ms": _percentiles([r["first_chunk_ms"] for r in ok]),
        "rtf": _percentiles([r["rtf"] for r in ok]), "rtf_stream": _percentiles([r["rtf_stream"] for r in ok]),
        "realtime_share": round(sum(r["rtf"] < 1 for r in ok) / max(1, len(ok)), 3),
        "frames_per_request": _percentiles([r["frames"] for r in ok])["p50"],
        "aggregate_frames_per_s": round((frames_end - frames_start) / window_s, 1),
        "per_stream_frames_per_s": round((frames_end - frames_start) / window_s / n, 2),
        "server_frames": after["frames"] - before["frames"], "engine_failures": after["engine_failures"],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavor", default=None, help="model shapes: tiny | 1B (default: 1B on CUDA, tiny on CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="precision (auto: bf16 on CUDA, the CPU default otherwise)")
    p.add_argument("--clients", default="1,2,4", help="comma-separated numbers of concurrent clients")
    p.add_argument("--max-streams", type=int, help="server batch capacity (default: the largest --clients)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per N, after the ramp")
    p.add_argument("--ramp-s", type=float, default=None,
                   help="clients start evenly over this (default 3 s CUDA, 8 s CPU)")
    p.add_argument("--frames", type=int, default=40, help="frames per request (80 ms each)")
    p.add_argument("--chunk-frames", type=int, default=1, help="frames per streamed chunk")
    p.add_argument("--context-frames", type=int, default=63, help="frames of the shared voice context (0: none)")
    p.add_argument("--client-procs", type=int, default=None, help="client processes (default: min(8, cores - 2))")
    p.add_argument("--threads", type=int, default=None, help="server torch threads (default: torch's)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.flavor = args.flavor or ("1B" if cuda else "tiny")
    counts = [int(c) for c in args.clients.split(",")]
    args.max_streams = args.max_streams or max(counts)
    if args.serve:
        serve(args)
        return None
    args.ramp_s = args.ramp_s if args.ramp_s is not None else (3.0 if cuda else 8.0)
    args.client_procs = args.client_procs or max(1, min(8, (os.cpu_count() or 2) - 2))
    if not args.port:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    url = f"http://127.0.0.1:{args.port}"
    command = [sys.executable, __file__, "--serve", "--flavor", args.flavor, "--device", args.device, "--dtype",
               args.dtype, "--max-streams", str(args.max_streams), "--port", str(args.port), "--clients", args.clients]
    if args.threads:
        command += ["--threads", str(args.threads)]
    started = time.perf_counter()
    log = tempfile.NamedTemporaryFile("w+", prefix="serve_load-", suffix=".log", delete=False)
    server = subprocess.Popen(command, stderr=log, stdout=log, text=True)
    try:
        _wait_ready(url, server, Path(log.name))
        ready_s = time.perf_counter() - started
        rng = np.random.default_rng(0)
        context = []
        if args.context_frames:
            codes = rng.integers(0, 2048, size=(args.context_frames, 32)).astype("<i2")
            encoded = base64.b64encode(codes.tobytes()).decode()
            context = [{"speaker": 0, "text": " ".join(WORDS[:10]), "codes": encoded}]
        rows = [run_load(url, n, args, context) for n in counts]
        health = _health(url)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server_err = Path(log.name).read_text()
        log.close()
        os.unlink(log.name)
    prepare = next((json.loads(line) for line in server_err.splitlines() if line.startswith('{"prepare_s"')), {})
    base = rows[0]["aggregate_frames_per_s"] if rows and rows[0]["clients"] == 1 else None
    realtime = [r for r in rows if r["errors"] == 0 and r["rtf"]["p95"] is not None and r["rtf"]["p95"] < 1]
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": args.device,
                    "gpu": _gpu_name() if cuda else None},
        "setup": {"flavor": args.flavor, "dtype": args.dtype, "max_streams": args.max_streams, "frames": args.frames,
                  "chunk_frames": args.chunk_frames, "context_frames": args.context_frames, "seconds": args.seconds,
                  "ramp_s": args.ramp_s, "client_procs": args.client_procs, "server_ready_s": round(ready_s, 1),
                  **prepare},
        "rows": rows,
        "summary": {
            "max_clients_p95_realtime": max((r["clients"] for r in realtime), default=0),
            "p95_first_chunk_ms_at_that_load": next((r["first_chunk_ms"]["p95"] for r in reversed(realtime)), None),
            "aggregate_vs_batch1": {r["clients"]: round(r["aggregate_frames_per_s"] / base, 2) for r in rows}
            if base else None,
            "engine_failures": health["engine_failures"],
        },
    }
    result["provenance"] = provenance(args.device)
    print(json.dumps(result, indent=1))
    return result


def _wait_ready(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 900) -> None:
    import httpx

    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer within {timeout_s} s")


def _gpu_name() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    main()
