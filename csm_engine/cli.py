"""Console scripts: ``csm-generate``, ``csm-generate-mlx`` and ``csm-verify``.

Every user error is a ``CSMError`` printed as one line (``csm-generate: error: ...``) with exit
status 2; Ctrl-C exits with 130 and no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from csm_engine.console import DTYPES, EXIT_USAGE, add_csm_model_option, optional_module, run_cli
from csm_engine.device import DEVICES, resolve_device
from csm_engine.errors import CSMError
from csm_engine.mlx.precisions import MLX_PRECISION_NAMES
from csm_engine.speech import ENGINES

# ---------------------------------------------------------------------------------------------
# csm-generate
# ---------------------------------------------------------------------------------------------


def build_generate_parser(prog: str = "csm-generate") -> argparse.ArgumentParser:
    """The options of ``csm-generate`` (the MLX CLI reuses them and adds its own)."""
    p = argparse.ArgumentParser(prog=prog, description="Speak a line of text with CSM and write a 24 kHz mono WAV.")
    p.add_argument("--text", required=True, help="the words to speak")
    p.add_argument("--speaker", type=int, default=None,
                   help="speaker id of the new line (default 0, or the --voice's speaker)")
    p.add_argument("--voice", metavar="NAME|CLIP",
                   help="a named voice, or a clip of the voice to continue (its audio + transcript become context)")
    p.add_argument("--voice-text", metavar="TEXT", help="transcript of a --voice CLIP (default: the clip's .txt file)")
    ctx = p.add_argument_group("context (repeat each option once per earlier utterance, oldest first)")
    ctx.add_argument("--context-audio", action="append", default=[], metavar="WAV",
                     help="recording of an earlier utterance (any rate; stereo is downmixed)")
    ctx.add_argument("--context-text", action="append", default=[], metavar="TEXT",
                     help="transcript of the matching --context-audio")
    ctx.add_argument("--context-speaker", action="append", default=[], type=int, metavar="ID",
                     help="speaker id of the matching --context-audio (default: --speaker)")
    p.add_argument("--output", "-o", default="audio.wav", help="WAV file to write (default audio.wav)")
    p.add_argument("--max-audio-length-ms", type=int, default=90_000,
                   help="upper bound on the generated audio in ms (default 90000)")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature; 0 = greedy (default 0.9)")
    p.add_argument("--topk", type=int, default=50, help="sample among the k most likely codes (default 50)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible audio")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to run (default auto)")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="what runs the model: torch, mlx (Apple Silicon; mlx[cpu] on Linux) or auto "
                        "(default: MLX on Apple Silicon, torch elsewhere)")
    p.add_argument("--dtype", default="auto", choices=tuple(dict.fromkeys((*DTYPES, *MLX_PRECISION_NAMES))),
                   help="weight precision (default auto: the device's fastest; on MLX by the chip's bandwidth); "
                        "int4 is MLX only, the int8-* kernels torch only")
    add_csm_model_option(p, old_names=("--model-path",))
    p.add_argument("--mimi-path", default=None, help="Mimi codec safetensors (default: from the model dir or hub)")
    p.add_argument("--tokenizer-path", default=None,
                   help="text tokenizer.json (default: from the model dir, else unsloth/Llama-3.2-1B)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a csm-finetune output (adapter.json + adapter.safetensors) merged into the model")
    p.add_argument("--no-watermark", action="store_true", help="do not watermark the output (it is by default)")
    p.add_argument("--watermark-dir", default=None,
                   help="local silentcipher model folder (default $CSM_WATERMARK_DIR or the hub)")
    return p


def check_generate_args(args: argparse.Namespace) -> None:
    """Reject bad option values with one-line CSMErrors before anything is loaded."""
    if not args.text or not args.text.strip():
        raise CSMError("--text is empty: pass the words to speak, e.g. --text 'Hello there.'")
    n_audio, n_text, n_speaker = len(args.context_audio), len(args.context_text), len(args.context_speaker)
    if n_audio != n_text:
        raise CSMError(f"got {n_audio} --context-audio but {n_text} --context-text: give one transcript per "
                       "context recording, in the same order")
    if n_speaker not in (0, n_audio):
        raise CSMError(f"got {n_speaker} --context-speaker for {n_audio} --context-audio: give one speaker id "
                       "per context recording, or none")
    if args.max_audio_length_ms <= 0:
        raise CSMError(f"--max-audio-length-ms must be positive, got {args.max_audio_length_ms}")
    if args.temperature < 0:
        raise CSMError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.topk < 1:
        raise CSMError(f"--topk must be >= 1, got {args.topk}")
    if args.speaker is not None and args.speaker < 0:
        raise CSMError(f"--speaker must be >= 0, got {args.speaker}")
    if args.voice_text is not None and not args.voice:
        raise CSMError("--voice-text is the transcript of a --voice CLIP: pass --voice too")
    adapter = getattr(args, "adapter", None)
    if adapter is not None and not (Path(adapter).expanduser() / "adapter.json").is_file():
        raise CSMError(f"--adapter {adapter}: no adapter.json there; pass the --out directory of csm-finetune")
    out = Path(args.output).expanduser()
    if out.is_dir():
        raise CSMError(f"--output {out} is a directory; pass a file name such as {out / 'audio.wav'}")
    if not out.parent.is_dir():
        raise CSMError(f"--output {out}: directory {out.parent} does not exist (create it first)")


def build_context(args: argparse.Namespace, speaker: int, voice=None) -> list:
    """Context segments, oldest first: the --voice prompt (if any), then each --context-audio."""
    from csm_engine.audio_io import load_audio
    from csm_engine.tokens import Segment

    segments = []
    if voice is not None:
        segments.append(importlib.import_module("csm_engine.voices").load_voice_segment(voice))
    speakers = args.context_speaker or [speaker] * len(args.context_audio)
    for audio_path, text, who in zip(args.context_audio, args.context_text, speakers):
        if not text.strip():
            raise CSMError(f"--context-text for {audio_path} is empty: give the transcript of that recording")
        segments.append(Segment(speaker=who, text=text, audio=load_audio(audio_path)))
    return segments


def resolve_voice(args: argparse.Namespace):
    """The ``VoicePrompt`` of --voice (a name or a clip + --voice-text), with --speaker applied."""
    voices = optional_module("csm_engine.voices")
    if voices is None:
        raise CSMError("--voice needs csm_engine.voices, which this install lacks; pass the prompt with "
                       "--context-audio/--context-text instead")
    return voices.resolve_voice(args.voice, text=args.voice_text, speaker=args.speaker)


def load_watermarker(args: argparse.Namespace, device: str):
    """The loaded watermark model, or None with --no-watermark; loaded before generating so a
    missing model fails fast instead of after minutes of generation."""
    if args.no_watermark:
        return None
    watermark = optional_module("csm_engine.watermark")
    if watermark is None:
        raise CSMError("cannot watermark the output: csm_engine.watermark is not installed; "
                       "pass --no-watermark to write unmarked audio")
    try:
        return watermark.load_watermarker(args.watermark_dir, device=device if device == "cuda" else "cpu")
    except ImportError as e:
        raise CSMError(f"cannot watermark the output: {e} (install silentcipher, or pass --no-watermark)") from None


def run_generate(args: argparse.Namespace, generator_or_loader) -> int:
    """``csm-generate`` once the options are parsed.

    ``generator_or_loader``: a loaded generator (anything with ``generate`` and ``sample_rate``),
    or preferably ``load(args, device) -> generator``, called with the resolved device only after
    the options, context audio and watermark model have been checked.
    """
    import torch

    check_generate_args(args)
    voice = resolve_voice(args) if args.voice else None
    speaker = args.speaker if args.speaker is not None else (int(voice.speaker) if voice is not None else 0)
    device = resolve_device(args.device)
    context = build_context(args, speaker, voice)  # read context audio before loading any model
    watermarker = load_watermarker(args, device)
    if hasattr(generator_or_loader, "generate"):
        generator = generator_or_loader
    else:
        generator = generator_or_loader(args, device)
    wav = generator.generate(args.text, speaker, context, max_audio_length_ms=args.max_audio_length_ms,
                             temperature=args.temperature, topk=args.topk, seed=args.seed)
    sample_rate = generator.sample_rate
    if watermarker is not None:
        from csm_engine.watermark import apply_watermark

        wav = apply_watermark(torch.as_tensor(wav), sample_rate, watermarker)
    from csm_engine.audio_io import write_wav

    out = write_wav(args.output, torch.as_tensor(wav), sample_rate)
    marked = "watermarked" if watermarker is not None else "not watermarked"
    print(f"wrote {out} ({len(wav) / sample_rate:.2f} s, {sample_rate // 1000} kHz mono, {marked})")
    return 0


def load_generator_for(args: argparse.Namespace, device: str):
    """The engine --engine names (csm_engine.speech's one factory), with --dtype as its precision."""
    from csm_engine.speech import load_speech_generator

    return load_speech_generator(args.engine, args.csm_model, mimi_path=args.mimi_path,
                                 tokenizer_path=args.tokenizer_path, device=device,
                                 dtype=None if args.dtype == "auto" else args.dtype, adapter=args.adapter)


def generate_main(argv: Sequence[str] | None = None) -> int:
    """``csm-generate``: text (+ context) -> a 24 kHz mono WAV."""
    args = build_generate_parser().parse_args(argv)
    return run_cli("csm-generate", lambda: run_generate(args, load_generator_for))


# ---------------------------------------------------------------------------------------------
# csm-generate-mlx and csm-verify
# ---------------------------------------------------------------------------------------------

def generate_mlx_main(argv: Sequence[str] | None = None) -> int:
    """``csm-generate-mlx``: ``csm-generate`` on the MLX backend (Apple Silicon; mlx[cpu] on Linux)."""
    from csm_engine import mlx as mlx_backend  # imports no MLX

    if not mlx_backend.is_available():
        print(f"csm-generate-mlx: error: {mlx_backend.NOT_AVAILABLE}", file=sys.stderr)
        return EXIT_USAGE
    from csm_engine.mlx.cli import generate_main

    return generate_main(None if argv is None else list(argv))


def build_verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csm-verify", description="Check whether an audio file carries CSM's watermark.")
    p.add_argument("--audio-path", required=True, help="audio file to check (WAV, FLAC or OGG)")
    p.add_argument("--watermark-dir", default=None,
                   help="local silentcipher model folder (default $CSM_WATERMARK_DIR or the hub)")
    return p


def verify_main(argv: Sequence[str] | None = None) -> int:
    """``csm-verify``: one-line verdict; exit 0 if CSM's watermark is present, 1 if not, 2 on error."""
    args = build_verify_parser().parse_args(argv)

    def body() -> int:
        watermark = optional_module("csm_engine.watermark")
        if watermark is None:
            raise CSMError("csm-verify needs csm_engine.watermark, which this install lacks")
        if not Path(args.audio_path).expanduser().is_file():
            raise CSMError(f"audio file not found: {args.audio_path} (check the path)")
        watermarker = watermark.load_watermarker(args.watermark_dir)
        result = watermark.verify_file(args.audio_path, watermarker)
        print(f"{args.audio_path}: {result.describe()}")
        return 0 if result.present else 1

    return run_cli("csm-verify", body)


if __name__ == "__main__":
    sys.exit(generate_main())
