"""``csm-serve``: load CSM once, batch every request's frames, answer OpenAI-style on HTTP.

    csm-serve                                    sesame/csm-1b on 127.0.0.1:8000, no API key
    csm-serve --host 0.0.0.0 --api-key KEY       reachable from other machines (a key is then required)
    csm-serve --csm-model DIR --voices voices.toml --max-streams 256 --device cuda
    csm-serve --engine mlx --dtype int8         on MLX (Apple Silicon): one utterance at a time

``--engine``: torch batches every request's frames (``csm_engine.batch``); mlx has no batched
step, so its requests queue and run one after another through the MLX generator's own frame
loop (``csm_engine.serve.serial``), its conversation cache serving whichever request continues
the last one; auto is MLX on macOS arm64, torch elsewhere. The batching options apply to torch.

``--model-name`` is the API's ``model`` (what clients send); ``--csm-model`` the checkpoint.

Auth: with ``--api-key`` (or ``CSM_SERVE_API_KEY``) every request but ``/health`` needs
``Authorization: Bearer KEY``. Without one the server only listens on loopback addresses;
``--no-auth`` allows any address without a key (behind a proxy that authenticates).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence

from csm_engine.console import DTYPES, add_csm_model_option, run_cli
from csm_engine.device import DEVICES, resolve_device
from csm_engine.errors import CSMError
from csm_engine.mlx.precisions import MLX_PRECISION_NAMES
from csm_engine.serve.wire import API_KEY_ENV
from csm_engine.speech import ENGINES, resolve_engine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csm-serve", description="Serve CSM as a streaming, OpenAI-compatible speech API.")
    m = p.add_argument_group("model")
    add_csm_model_option(m, old_names=("--model",))
    m.add_argument("--mimi-path", metavar="PATH", help="Mimi codec weights (default: next to the model, or the hub)")
    m.add_argument("--tokenizer-path", metavar="PATH",
                   help="text tokenizer.json (default: next to the model, or the hub)")
    m.add_argument("--device", choices=DEVICES, default="auto", help="default: cuda when available")
    m.add_argument("--engine", choices=ENGINES, default="auto",
                   help="what runs the model: torch (batched), mlx (Apple Silicon; mlx[cpu] on Linux; one utterance "
                        "at a time) or auto (default: MLX on Apple Silicon, torch elsewhere)")
    m.add_argument("--dtype", choices=tuple(dict.fromkeys((*DTYPES, *MLX_PRECISION_NAMES))), default="auto",
                   help="precision (default: the fastest for the device; on MLX by the chip's bandwidth)")
    m.add_argument("--model-name", default="csm-1b", help="the `model` name clients send (default csm-1b)")
    m.add_argument("--voices", metavar="FILE.toml", help="named voices (default: csm-chat's voices tables)")
    h = p.add_argument_group("http")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    h.add_argument("--port", type=int, default=8000)
    h.add_argument("--api-key", help=f"bearer token clients must send (or set {API_KEY_ENV})")
    h.add_argument("--no-auth", action="store_true", help="listen beyond loopback without an API key")
    h.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    b = p.add_argument_group("batching and limits")
    b.add_argument("--max-streams", type=int, help="utterances generated at once (default: 64 on CUDA, 4 on CPU)")
    b.add_argument("--cache-slots", type=int, help="backbone caches kept, idle sessions included (default 2x streams)")
    b.add_argument("--max-queue", type=int, default=256, help="requests waiting for a stream before 429 (default 256)")
    b.add_argument("--max-sessions", type=int, help="sessions that keep a cache (default: every spare slot)")
    b.add_argument("--session-ttl", type=float, default=3600.0, metavar="S", help="idle session lifetime (default 1 h)")
    b.add_argument("--prefill-rows", type=int,
                   help="prompt rows prefilled between two frames (default 1024 CUDA, 32 CPU)")
    b.add_argument("--no-cuda-graphs", action="store_true", help="run the frame step eagerly on CUDA")
    b.add_argument("--max-input-chars", type=int, default=4096)
    b.add_argument("--max-audio-ms", type=int, default=60_000, help="cap on one utterance (default 60000)")
    return p


def check_auth(host: str, api_key: str | None, no_auth: bool) -> None:
    """Refuse to listen beyond loopback without a key (unless --no-auth)."""
    if api_key or no_auth:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise CSMError(f"--host {host} listens beyond this machine: pass --api-key KEY (or set {API_KEY_ENV}), "
                       "or --no-auth if a proxy in front authenticates")


def build_engine(args: argparse.Namespace):
    """The engine --engine names, loaded and prepared (not started): batched on torch, serial on MLX."""
    from csm_engine.speech import load_speech_generator

    engine = resolve_engine(args.engine)
    device = resolve_device(args.device)
    generator = load_speech_generator(engine, args.csm_model, mimi_path=args.mimi_path,
                                      tokenizer_path=args.tokenizer_path, device=device,
                                      dtype=None if args.dtype == "auto" else args.dtype)
    if engine == "mlx":
        from csm_engine.serve.serial import SerialEngine, SerialOptions

        serial = SerialEngine(generator, SerialOptions(max_queue=args.max_queue))
        serial.prepare()
        return serial
    from csm_engine.batch.engine import BatchEngine, EngineOptions

    options = EngineOptions.for_device(device, max_streams=args.max_streams, cache_slots=args.cache_slots,
                                       max_queue=args.max_queue, prefill_rows_per_tick=args.prefill_rows,
                                       max_sessions=args.max_sessions, session_ttl_s=args.session_ttl,
                                       cuda_graphs=False if args.no_cuda_graphs else None)
    batch = BatchEngine(generator, options)
    batch.prepare()
    return batch


def build_service(args: argparse.Namespace):
    """Load the model and start the engine; returns the SpeechService (for tests too)."""
    from csm_engine.serve.config import Limits, ServerConfig
    from csm_engine.serve.speech import SpeechService, VoiceTable
    from csm_engine.voices import list_voices, load_voice_table

    engine = build_engine(args)
    voices = VoiceTable(load_voice_table(args.voices) if args.voices else list_voices())
    if args.voices and not voices.voices:
        raise CSMError(f"--voices {args.voices}: no [voices.NAME] tables found; check the path and the file")
    limits = Limits(max_input_chars=args.max_input_chars, max_audio_ms=args.max_audio_ms,
                    default_audio_ms=min(Limits().default_audio_ms, args.max_audio_ms))
    config = ServerConfig(model_id=args.model_name, api_key=args.api_key, limits=limits)
    return SpeechService(engine.start(), voices, config)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from csm_engine.serve.app import create_app

    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_auth(args.host, args.api_key, args.no_auth)
    if args.max_streams is not None and args.max_streams < 1:
        raise CSMError(f"--max-streams must be at least 1, got {args.max_streams}")
    service = build_service(args)
    engine = service.engine
    print(f"csm-serve: {args.model_name} on http://{args.host}:{args.port} ({engine.options.max_streams} streams, "
          f"{engine.options.slots} cache slots, {engine.device}{', CUDA graphs' if engine.cuda_graphs else ''}"
          f"{', API key required' if args.api_key else ''})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("csm-serve", lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
