"""``csm-chat``: the voice agent in the terminal (TUI), headless on WAV files, or replaying a transcript.

    csm-chat                                   the Textual app (microphone + speaker)
    csm-chat --headless --mic-file IN.wav --speaker-file OUT.wav --save DIR
    csm-chat --replay DIR_OR_JSON --out OUT_DIR [--persona NAME] [--all-turns]
    csm-chat --list-devices

Defaults come from ``config.toml`` in the user's config dir (``--config PATH`` for another
file); flags win. User errors print one line on stderr and exit 2; Ctrl-C exits 130 after
saving the conversation.

Watermarking: agent audio written to disk (saved turns, --speaker-file, replay output) carries
CSM's audio watermark when the silentcipher model can be loaded. If it cannot (no internet and
no local copy), csm-chat says so in one line and goes on unmarked, because a conversation
should not fail for it; ``--no-watermark`` turns marking off (and the warning with it).
Live playback is never marked (it would delay speech).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from agent.audio import describe_devices
from agent.config.file import load_settings
from agent.config.personas import list_personas, load_persona
from agent.config.settings import AgentSettings
from agent.conversation.conversation import Conversation
from agent.errors import AgentError
from agent.events import AgentTurnDone, Event, Notice, ToolUse, TurnLatency, UserTurn
from agent.logs import default_log_path, setup_logging
from agent.pipeline import Pipeline
from agent.speak.replay import replay_conversation
from csm_engine.errors import CSMError
from csm_engine.mlx.precisions import MLX_PRECISION_NAMES
from csm_engine.precision import PRECISIONS
from csm_engine.speech import ENGINES

log = logging.getLogger(__name__)

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csm-chat",
        description="Talk with a local voice agent that speaks through Sesame's CSM.",
        epilog="Defaults for every option can be set in config.toml in the user's config directory "
               f"(see --config). Warnings and errors, with tracebacks, are logged to {default_log_path()} "
               "(--log-file for another file): attach it to a bug report.",
    )
    run = p.add_argument_group("what to run")
    run.add_argument("--headless", action="store_true", default=None,
                     help="no TUI: play --mic-file into the agent, write its speech to --speaker-file, print the turns")
    run.add_argument("--replay", metavar="DIR_OR_JSON", help="re-synthesize a saved conversation (with --out)")
    run.add_argument("--out", metavar="OUT_DIR", help="where --replay writes its WAVs")
    run.add_argument("--all-turns", action="store_true", help="--replay the user's turns too, not only the agent's")
    run.add_argument("--list-devices", action="store_true", help="list audio input/output devices and exit")
    run.add_argument("--list-personas", action="store_true", help="list installed personas and exit")
    run.add_argument("--check-audio", action="store_true",
                     help="play a test sound, measure the echo and what echo cancellation removes, and say "
                          "whether hands-free will work (with --room: in the simulated room)")
    run.add_argument("--config", metavar="PATH", help="config file with defaults (default: the user's config.toml)")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="debug lines in the log file, and on stderr outside the app")
    run.add_argument("--log-file", metavar="PATH", help=f"where the log goes (default {default_log_path()})")

    audio = p.add_argument_group("audio")
    audio.add_argument("--mic-file", metavar="IN.wav",
                       help="use a WAV file as the microphone (any rate, mono or stereo)")
    audio.add_argument("--speaker-file", metavar="OUT.wav", help="write everything the agent says to this WAV")
    audio.add_argument("--input-device", metavar="INDEX|NAME", help="microphone (see --list-devices)")
    audio.add_argument("--output-device", metavar="INDEX|NAME", help="speaker (see --list-devices)")
    audio.add_argument("--mode", choices=("vad", "ptt"), help="hands-free turn detection (vad) or push-to-talk (ptt)")
    audio.add_argument("--room", metavar="PRESET|ROOM.toml",
                       help="a simulated room instead of the mic: the agent's speech comes back through it "
                            "(office, living-room, office-loud, living-room-loud, or a room file)")
    audio.add_argument("--aec", choices=("on", "off", "auto"),
                       help="echo cancellation (default auto: on where WebRTC's canceller loads)")
    audio.add_argument("--turn", choices=("smart", "audio", "silence"),
                       help="hands-free end of turn: the transcript's and the audio's end-of-turn models (smart, "
                            "default), the audio model alone (audio), or a fixed pause (silence)")
    audio.add_argument("--turn-threshold", type=float, metavar="P",
                       help="end-of-turn model probability that ends a turn (default 0.5)")
    pace = audio.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=None,
                      help="play --mic-file in real time (default); the user may talk over the agent")
    pace.add_argument("--fast", dest="realtime", action="store_false",
                      help="play --mic-file as fast as the agent takes it: each turn waits for the previous reply")

    models = p.add_argument_group("models")
    models.add_argument("--csm-model", metavar="DIR|REPO",
                        help="CSM checkpoint dir or hub repo (default sesame/csm-1b)")
    models.add_argument("--mimi-path", metavar="PATH",
                        help="Mimi codec weights (default: next to the model, or the hub)")
    models.add_argument("--tokenizer-path", metavar="PATH",
                        help="text tokenizer.json (default: next to the model, or the hub)")
    models.add_argument("--csm-dtype", choices=("auto", *dict.fromkeys((*PRECISIONS, *MLX_PRECISION_NAMES))),
                        help="CSM precision (default: the fastest for the device; on MLX: float32, bfloat16, "
                             "int8, int4, by default chosen by the Apple chip's memory bandwidth)")
    models.add_argument("--engine", choices=ENGINES,
                        help="what runs CSM: torch, mlx (Apple Silicon; mlx[cpu] on Linux) or auto (default: "
                             "MLX on Apple Silicon, torch elsewhere)")
    models.add_argument("--adapter", metavar="DIR", help="CSM adapter from csm-finetune (default: the persona's)")
    models.add_argument("--llm-model", metavar="PATH.gguf|REPO:QUANT",
                        help="GGUF chat model: a file, or a hub repo and quant such as "
                             "bartowski/Qwen2.5-3B-Instruct-GGUF:Q4_K_M (default: embedded SmolLM2-135M)")
    models.add_argument("--llm-url", metavar="URL", help="OpenAI-compatible server instead of the in-process LLM")
    models.add_argument("--tts-url", metavar="URL",
                        help="a csm-serve that speaks for the agent (CSM_SERVE_API_KEY holds its key, if any)")
    models.add_argument("--asr", choices=("faster-whisper", "openai-whisper"), help="speech recognizer")
    models.add_argument("--asr-model", metavar="NAME|PATH", help="Whisper model (default: embedded tiny.en)")
    models.add_argument("--device", metavar="cpu|cuda|auto", help="device for CSM (default: auto)")

    agent = p.add_argument_group("conversation")
    agent.add_argument("--persona", metavar="NAME|PATH", help="persona file (see --list-personas)")
    agent.add_argument("--save", dest="save_dir", metavar="DIR", help="save the conversation here (after every turn)")
    agent.add_argument("--max-turns", type=int, metavar="N", help="stop after N agent replies")
    agent.add_argument("--max-audio-ms", type=int, metavar="MS", help="cap one spoken sentence at MS milliseconds")
    agent.add_argument("--seed", type=int, help="seed for reproducible replies and speech")
    agent.add_argument("--no-watermark", dest="watermark", action="store_false", default=None,
                       help="do not watermark agent audio written to disk")
    tools = p.add_argument_group("tools and memory")
    tools.add_argument("--tools", action="store_true", default=None,
                       help="turn on the built-in tools (clock, calculator, timers, memory) for personas that do not "
                            "choose; MCP servers are set in config.toml and enabled per persona")
    tools.add_argument("--tool-mode", choices=("auto", "native", "constrained"),
                       help="how the LLM calls tools: its own format (native) or grammar-constrained choices "
                            "(constrained, for small models); auto decides from the model")
    tools.add_argument("--memory", choices=("on", "off"),
                       help="remember facts and conversation summaries across conversations (default on)")
    tools.add_argument("--forget", nargs="?", const="", metavar="TEXT",
                       help="forget everything remembered, or only what matches TEXT, and exit")
    return p


SETTING_FLAGS = (
    "headless", "mic_file", "speaker_file", "input_device", "output_device", "mode", "turn", "turn_threshold",
    "realtime", "csm_model", "mimi_path", "tokenizer_path", "csm_dtype", "adapter", "llm_model", "llm_url", "tts_url",
    "asr", "asr_model", "device", "engine", "persona", "save_dir", "max_turns", "max_audio_ms", "seed", "watermark",
    "room", "aec", "tools", "tool_mode", "memory",
)


def settings_from_args(args: argparse.Namespace) -> AgentSettings:
    """AgentSettings from the config file, then the flags that were given."""
    overrides = {name: getattr(args, name) for name in SETTING_FLAGS}
    for name in ("input_device", "output_device"):
        value = overrides[name]
        if isinstance(value, str) and value.strip().isdigit():
            overrides[name] = int(value)
    return load_settings(args.config, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        one_shot = args.list_devices or args.list_personas or args.check_audio or args.forget is not None
        setup_logging(verbose=args.verbose, log_file=args.log_file,
                      console=bool(args.headless or args.replay or one_shot))  # the app owns the terminal
        log.debug("csm-chat %s", " ".join(sys.argv[1:] if argv is None else argv))
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except AgentError as error:
        log.debug("exiting on an error", exc_info=True)
        print(f"csm-chat: {error}", file=sys.stderr)
        return EXIT_ERROR
    except CSMError as error:
        log.debug("exiting on an error", exc_info=True)
        print(f"csm-chat: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_ERROR


def _run(args: argparse.Namespace) -> int:
    if args.list_devices:
        print(describe_devices())
        return 0
    if args.list_personas:
        for name in list_personas():
            try:
                persona = load_persona(name)
                print(f"{name:16} {persona.name}: {persona.description}")
            except AgentError as error:
                print(f"{name:16} (broken: {error})")
        return 0
    settings = settings_from_args(args)
    if settings.headless and not args.headless:  # headless from config.toml: warnings on stderr after all
        setup_logging(verbose=args.verbose, log_file=args.log_file, console=True)
    if args.forget is not None:
        return run_forget(args.forget)
    if args.check_audio:
        from agent.echo.check_audio import format_report, run_check_audio

        check = run_check_audio(settings, notice=lambda line: print(f"warning: {line}", file=sys.stderr))
        print(format_report(check))
        return 0
    if args.replay:
        return run_replay(args, settings)
    if args.out or args.all_turns:
        raise AgentError("--out and --all-turns go with --replay DIR_OR_JSON")
    if settings.headless:
        return run_headless(settings)
    from agent.tui.app import run_app  # Textual is only imported for the app

    run_app(settings)
    return 0


# ---- headless ---------------------------------------------------------------------------------


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


class TurnPrinter:
    """Prints each turn (``you: ...`` / ``agent: ...``) and its latencies; notices go to stderr."""

    def __init__(self, out=None, err=None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, UserTurn):
                print(f"you: {event.text}", file=self.out, flush=True)
            elif isinstance(event, AgentTurnDone):
                suffix = " [interrupted]" if event.interrupted else ""
                print(f"agent: {event.text}{suffix}", file=self.out, flush=True)
            elif isinstance(event, TurnLatency):
                print(f"  latency: transcript {_fmt_ms(event.transcript_ms)}, first token "
                      f"{_fmt_ms(event.first_token_ms)}, first audio {_fmt_ms(event.first_audio_ms)} "
                      f"(after the end of speech; turn ended {_fmt_ms(event.turn_end_ms)}); "
                      f"playback gaps {event.underruns}", file=self.out, flush=True)
            elif isinstance(event, Notice):
                print(f"{event.level}: {event.message}", file=self.err, flush=True)
            elif isinstance(event, ToolUse) and event.output is not None:
                mark = "->" if event.ok else "-> error:"
                print(f"tool: {event.call} {mark} {' '.join(event.output.split())[:200]}", file=self.out, flush=True)


def run_headless(settings: AgentSettings) -> int:
    """Play --mic-file into the agent until it is over and the last reply is spoken."""
    pipeline = Pipeline(settings, TurnPrinter())
    interrupted = False
    try:
        pipeline.start()
        while not pipeline.finished.wait(0.1):
            pass
        if pipeline.fatal is not None:
            raise pipeline.fatal
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # Ctrl-C lands here too: cancel the reply in flight, write the files, save the transcript.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            pipeline.stop()
        finally:
            signal.signal(signal.SIGINT, previous)
        log.debug("stopped; the conversation is saved in %s", pipeline.save_dir)
    if pipeline.fatal is not None:
        raise pipeline.fatal
    if pipeline.conversation.turns:
        print(f"saved: {pipeline.save_dir}", file=sys.stderr)
    return EXIT_INTERRUPTED if interrupted else 0


def run_forget(text: str) -> int:
    """``--forget [TEXT]``: delete memories (all, or those matching TEXT) and say how many."""
    from agent.memory.store import MemoryStore

    store = MemoryStore(notice=lambda level, message: print(f"{level}: {message}", file=sys.stderr))
    try:
        count = store.forget(text or None)
    finally:
        store.close()
    what = f"matching {text!r}" if text else "in all"
    print(f"forgot {count} memor{'y' if count == 1 else 'ies'} ({what}) from {store.path}")
    return 0


# ---- replay -----------------------------------------------------------------------------------


def run_replay(args: argparse.Namespace, settings: AgentSettings) -> int:
    if not args.out:
        raise AgentError("--replay needs --out OUT_DIR for the WAVs it writes")
    saved = Conversation.load(args.replay, with_audio=False)  # validate before loading CSM
    persona = load_persona(args.persona or saved.persona or None) if (args.persona or saved.persona) else None
    from csm_engine.device import resolve_device  # torch-heavy: loaded only to replay
    from csm_engine.speech import load_speech_generator

    device = resolve_device(settings.device)
    started = time.monotonic()
    adapter = settings.adapter or (persona.adapter_path() if persona is not None else None)
    generator = load_speech_generator(settings.engine, settings.csm_model, mimi_path=settings.mimi_path,
                                      tokenizer_path=settings.tokenizer_path, device=device, dtype=settings.csm_dtype,
                                      adapter=adapter)
    voice = None
    if persona is not None and persona.voice is not None:
        from csm_engine.voices import load_voice_segment  # imports torch

        try:
            voice = load_voice_segment(persona.voice.resolve(persona.speaker_id))
        except CSMError as error:
            print(f"warning: persona {persona.name}: no voice clip, the voice may drift: "
                  f"{' '.join(str(error).split())}", file=sys.stderr)
    watermark = _replay_watermarker(settings, device)
    result = replay_conversation(
        args.replay, args.out, generator, persona=persona, voice=voice, all_turns=args.all_turns,
        seed=settings.seed, max_audio_ms=settings.max_audio_ms, watermark=watermark,
        progress=lambda line: print(line, flush=True),
    )
    print(f"wrote {result.turns} turn WAVs and {result.joined} in {time.monotonic() - started:.1f} s")
    return 0


def _replay_watermarker(settings: AgentSettings, device: str):
    if not settings.watermark:
        return None
    try:
        from csm_engine.watermark import load_watermarker  # imports torch and silentcipher

        marker = load_watermarker(device=device if device == "cuda" else "cpu")
    except (ImportError, CSMError) as error:
        print(f"warning: replay audio is NOT watermarked ({' '.join(str(error).split())}); "
              "pass --no-watermark to silence this", file=sys.stderr)
        return None
    return marker.apply_numpy


def entry() -> None:
    """The ``csm-chat`` command: ``main``, then exit at once. By the time ``main`` returns the
    conversation is saved, the app has given the terminal back and the log is flushed below;
    what the interpreter would do after that is tear down torch, ONNX Runtime, llama.cpp and
    any stage thread still inside a model call (1-3 s on two busy cores, more for a thread
    stuck in a long call), which a user waiting for the prompt after an error should not see."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        logging.shutdown()
        os._exit(code)


if __name__ == "__main__":
    entry()
