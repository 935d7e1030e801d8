"""csm-generate / csm-verify / csm-generate-mlx and the audio file helpers, on the tiny checkpoint.

The round trip runs the installed console script in a subprocess; the other cases call the
same entry points in-process (faster), some with one tiny generator shared by the module.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from csm_engine.audio_io import load_audio, write_wav
from csm_engine.cli import build_generate_parser, generate_main, run_generate, verify_main
from csm_engine.config import SAMPLE_RATE, SAMPLES_PER_FRAME
from csm_engine.console import run_cli


def _console_script(name: str) -> list[str]:
    """The installed entry point next to this interpreter (``make test`` installs the project)."""
    script = Path(sys.executable).with_name(name)
    if script.is_file():
        return [str(script)]
    pytest.fail(f"{name} is not installed in {script.parent}; run `make test` (pip install -e .)")


def _one_error_line(stderr: str, prog: str = "csm-generate") -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_generator(tiny_checkpoint):
    from csm_engine.generator import load_generator

    return load_generator(str(tiny_checkpoint), dtype="float32")


def _run(argv: list[str], generator) -> int:
    """``csm-generate`` in-process with an already loaded generator (everything else as the CLI does)."""
    args = build_generate_parser().parse_args(argv)
    return run_cli("csm-generate", lambda: run_generate(args, lambda _args, _device: generator))


def _wav(path: Path, seconds: float, rate: int, channels: int = 1) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    data = np.stack([tone, -tone * 0.5], axis=1)[:, :channels] if channels > 1 else tone
    sf.write(str(path), data, rate, subtype="PCM_16")
    return path


# ---------------------------------------------------------------------------------------------
# The round trip through the real console script
# ---------------------------------------------------------------------------------------------


def test_csm_generate_writes_a_24khz_mono_wav_of_whole_frames(tiny_checkpoint, tmp_path):
    out = tmp_path / "hello.wav"
    max_ms = 800
    result = subprocess.run(
        [*_console_script("csm-generate"), "--text", "Hello there, how are you?", "--csm-model", str(tiny_checkpoint),
         "--output", str(out), "--max-audio-length-ms", str(max_ms), "--seed", "1", "--dtype", "float32",
         "--device", "cpu", "--no-watermark"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    assert 0 < info.frames <= max_ms * SAMPLE_RATE // 1000
    assert info.frames % SAMPLES_PER_FRAME == 0
    assert f"wrote {out}" in result.stdout and "not watermarked" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["hello.wav"]  # no temp file left behind


def test_csm_generate_error_is_one_line_from_the_console_script(tmp_path):
    result = subprocess.run(
        [*_console_script("csm-generate"), "--text", "Hi.", "--csm-model", str(tmp_path / "missing" / "dir"),
         "--output", str(tmp_path / "a.wav"), "--no-watermark"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert "model directory not found" in line and "make-checkpoint" in line
    assert not (tmp_path / "a.wav").exists()


# ---------------------------------------------------------------------------------------------
# Context audio, seeds, options
# ---------------------------------------------------------------------------------------------


def test_stereo_48khz_and_16khz_context_audio_is_accepted(tiny_generator, tmp_path, capsys):
    a = _wav(tmp_path / "a.wav", 0.5, 48_000, channels=2)
    b = _wav(tmp_path / "b.wav", 0.4, 16_000)
    out = tmp_path / "out.wav"
    code = _run(["--text", "Sure, see you then.", "--context-audio", str(a), "--context-text", "Shall we meet?",
                 "--context-speaker", "1", "--context-audio", str(b), "--context-text", "At noon.",
                 "--context-speaker", "0", "--output", str(out), "--max-audio-length-ms", "400", "--seed", "2",
                 "--no-watermark"], tiny_generator)
    assert code == 0, capsys.readouterr().err
    assert sf.info(str(out)).samplerate == SAMPLE_RATE


def test_same_seed_same_audio_other_seed_other_audio(tiny_generator, tmp_path):
    paths = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        paths.append(tmp_path / f"{name}.wav")
        assert _run(["--text", "Same seed.", "--output", str(paths[-1]), "--max-audio-length-ms", "160",
                     "--seed", str(seed), "--no-watermark"], tiny_generator) == 0
    a, b, c = (sf.read(str(p))[0] for p in paths)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_run_generate_also_takes_a_loaded_generator(tiny_generator, tmp_path):
    # The MLX CLI hands over its own generator object instead of a loader.
    args = build_generate_parser().parse_args(["--text", "Hi.", "--output", str(tmp_path / "g.wav"),
                                               "--max-audio-length-ms", "160", "--seed", "1", "--no-watermark"])
    assert run_generate(args, tiny_generator) == 0
    assert sf.info(str(tmp_path / "g.wav")).frames % SAMPLES_PER_FRAME == 0


def test_load_audio_downmixes_and_resamples_to_24khz(tmp_path):
    stereo = _wav(tmp_path / "s.wav", 0.5, 48_000, channels=2)
    wav = load_audio(stereo)
    assert wav.dtype == torch.float32 and wav.shape == (12_000,)
    # The channels were (x, -x/2): their mean is x/4, a 0.075-peak tone.
    assert 0.06 < float(wav.abs().max()) < 0.09


def test_write_wav_is_pcm16_mono_and_clips(tmp_path):
    path = write_wav(tmp_path / "x.wav", torch.tensor([0.0, 0.5, 2.0, -3.0]))
    data, rate = sf.read(str(path), dtype="int16")
    assert rate == SAMPLE_RATE and data.tolist() == [0, 16384, 32767, -32768]
    assert [p.name for p in tmp_path.iterdir()] == ["x.wav"]


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, no output file
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["--text", "   "], "--text is empty"),
    (["--text", "Hi.", "--context-audio", "a.wav"], "1 --context-audio but 0 --context-text"),
    (["--text", "Hi.", "--context-audio", "a.wav", "--context-text", "x", "--context-speaker", "0",
      "--context-speaker", "1"], "2 --context-speaker for 1 --context-audio"),
    (["--text", "Hi.", "--max-audio-length-ms", "0"], "--max-audio-length-ms must be positive"),
    (["--text", "Hi.", "--topk", "0"], "--topk must be >= 1"),
    (["--text", "Hi.", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--text", "Hi.", "--voice-text", "words"], "pass --voice too"),
    (["--text", "Hi.", "--output", "/no/such/dir/a.wav"], "directory /no/such/dir does not exist"),
])
def test_bad_options_are_one_line_errors(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert generate_main([*argv, "--no-watermark"]) == 2
    assert fragment in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "audio.wav").exists()


def test_corrupt_context_wav_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    assert generate_main(["--text", "Hi.", "--context-audio", str(bad), "--context-text", "x",
                          "--output", str(tmp_path / "o.wav"), "--no-watermark"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "WAV, FLAC or OGG" in line


def test_empty_context_wav_is_named(tmp_path, capsys):
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), 24_000)
    assert generate_main(["--text", "Hi.", "--context-audio", str(empty), "--context-text", "x",
                          "--output", str(tmp_path / "o.wav"), "--no-watermark"]) == 2
    assert "holds no audio samples" in _one_error_line(capsys.readouterr().err)


def test_missing_context_wav_is_named(tmp_path, capsys):
    assert generate_main(["--text", "Hi.", "--context-audio", str(tmp_path / "nope.wav"), "--context-text", "x",
                          "--output", str(tmp_path / "o.wav"), "--no-watermark"]) == 2
    assert "audio file not found" in _one_error_line(capsys.readouterr().err)


def test_unknown_voice_is_one_line(tmp_path, capsys):
    assert generate_main(["--text", "Hi.", "--voice", "no-such-voice-anywhere", "--output", str(tmp_path / "o.wav"),
                          "--no-watermark"]) == 2
    assert "voice" in _one_error_line(capsys.readouterr().err)


def test_absent_cuda_device_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert generate_main(["--text", "Hi.", "--device", "cuda", "--output", str(tmp_path / "o.wav"),
                          "--no-watermark"]) == 2
    assert "no CUDA device" in _one_error_line(capsys.readouterr().err)


def test_ctrl_c_exits_130_without_a_traceback(capsys):
    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_cli("csm-generate", interrupted) == 130
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Watermark on by default
# ---------------------------------------------------------------------------------------------


def test_watermark_that_cannot_load_stops_before_generating(tmp_path, capsys):
    out = tmp_path / "o.wav"
    code = generate_main(["--text", "Hi.", "--watermark-dir", str(tmp_path / "no-model"), "--output", str(out),
                          "--csm-model", str(tmp_path / "not-even-loaded")])
    assert code == 2
    assert "--no-watermark" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_output_is_watermarked_by_default(tiny_generator, random_watermark_dir, tmp_path, capsys):
    plain, marked = tmp_path / "plain.wav", tmp_path / "marked.wav"
    common = ["--text", "Mark me.", "--max-audio-length-ms", "320", "--seed", "3"]
    assert _run([*common, "--output", str(plain), "--no-watermark"], tiny_generator) == 0
    assert _run([*common, "--output", str(marked), "--watermark-dir", str(random_watermark_dir)], tiny_generator) == 0
    assert "wrote" in capsys.readouterr().out
    a, b = sf.read(str(plain))[0], sf.read(str(marked))[0]
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_csm_verify_gives_a_one_line_verdict(random_watermark_dir, tmp_path, capsys):
    clip = _wav(tmp_path / "clip.wav", 1.5, 24_000)
    code = verify_main(["--audio-path", str(clip), "--watermark-dir", str(random_watermark_dir)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code in (0, 1) and len(out) == 1 and out[0].startswith(f"{clip}: ")
    assert ("present" in out[0]) == (code == 0)


def test_csm_verify_missing_file(tmp_path, capsys):
    assert verify_main(["--audio-path", str(tmp_path / "none.wav")]) == 2
    assert "not found" in _one_error_line(capsys.readouterr().err, "csm-verify")


# ---------------------------------------------------------------------------------------------
# csm-generate-mlx
# ---------------------------------------------------------------------------------------------


def test_generate_mlx_without_mlx_names_the_install_command():
    code = textwrap.dedent("""
        import sys
        sys.modules["mlx"] = None  # `import mlx` now fails, as on a machine without it
        from csm_engine.cli import generate_mlx_main
        sys.exit(generate_mlx_main(["--text", "Hi."]))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    line = _one_error_line(result.stderr, "csm-generate-mlx")
    assert "MLX backend not available: pip install 'mlx[cpu]' (Linux)" in line


@pytest.mark.parametrize("command,old_name", [("csm-generate", "--model-path"), ("csm-generate-mlx", "--model-path"),
                                              ("csm-finetune", "--model-path"), ("csm-serve", "--model"),
                                              ("csm-chat", None)])
def test_every_command_names_the_checkpoint_csm_model_and_still_takes_its_old_name(command, old_name):
    from agent.cli import build_parser as chat_parser
    from csm_engine.mlx.cli import build_parser as mlx_parser
    from csm_engine.serve.cli import build_parser as serve_parser
    from csm_engine.train.cli import build_parser as finetune_parser

    parser = {"csm-generate": build_generate_parser, "csm-generate-mlx": mlx_parser, "csm-finetune": finetune_parser,
              "csm-serve": serve_parser, "csm-chat": chat_parser}[command]()
    required = {"csm-generate": ["--text", "Hi."], "csm-generate-mlx": ["--text", "Hi."],
                "csm-finetune": ["--out", "o"]}.get(command, [])
    help_text = parser.format_help()
    assert "--csm-model" in help_text and "--model-path" not in help_text
    assert parser.parse_args([*required, "--csm-model", "a/b"]).csm_model == "a/b"
    if old_name is not None:
        assert f"{old_name} " not in help_text  # still accepted, no longer shown
        assert parser.parse_args([*required, old_name, "c/d"]).csm_model == "c/d"
    if command == "csm-serve":  # --model-name stays the API's `model`, apart from the checkpoint
        args = parser.parse_args(["--model", "ckpt", "--model-name", "voice-1"])
        assert (args.csm_model, args.model_name) == ("ckpt", "voice-1")


def test_generate_parser_is_reusable_by_other_backends():
    parser = build_generate_parser("csm-generate-mlx")
    parser.add_argument("--quantize", type=int, choices=[4, 8])
    args = parser.parse_args(["--text", "Hi.", "--quantize", "8"])
    assert isinstance(args, argparse.Namespace) and args.quantize == 8 and args.output == "audio.wav"
