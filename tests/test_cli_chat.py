"""csm-chat's command line: config file defaults, and one-line errors for bad inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.cli import build_parser, settings_from_args
from agent.errors import AgentError


def _csm_chat() -> str:
    return str(Path(sys.executable).with_name("csm-chat"))


def test_flags_win_over_the_config_file(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('persona = "concise"\nllm-model = "/models/a.gguf"\nmax-turns = 3\nrealtime = false\n')
    args = build_parser().parse_args(["--config", str(config), "--persona", "storyteller", "--input-device", "2"])
    settings = settings_from_args(args)
    assert settings.persona == "storyteller"  # flag
    assert settings.llm_model == "/models/a.gguf" and settings.max_turns == 3 and settings.realtime is False  # file
    assert settings.input_device == 2 and settings.watermark is True and settings.csm_model == "sesame/csm-1b"


def test_user_config_dir_is_read_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "csm-chat").mkdir()
    (tmp_path / "csm-chat" / "config.toml").write_text('asr = "openai-whisper"\n')
    assert settings_from_args(build_parser().parse_args([])).asr == "openai-whisper"


@pytest.mark.parametrize("content, message", [("persona = [", "not valid TOML"), ("voice = 1", "unknown key 'voice'"),
                                              ("max-turns = true", "'max-turns' must be int")])
def test_bad_config_files_are_one_line_errors(tmp_path, content, message):
    config = tmp_path / "config.toml"
    config.write_text(content)
    with pytest.raises(AgentError, match=message):
        settings_from_args(build_parser().parse_args(["--config", str(config)]))


def _bad_runs(tmp_path, tiny_checkpoint, chat_persona, espeak_wav) -> dict[str, tuple[list[str], str]]:
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" + os.urandom(200))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    broken_persona = tmp_path / "broken.toml"
    broken_persona.write_text('name = "x"\nsystem_prompt = "y"\ntopk = "many"\n')
    speech = str(espeak_wav("hello there"))
    common = ["--headless", "--csm-model", str(tiny_checkpoint), "--no-watermark", "--speaker-file",
              str(tmp_path / "out.wav"), "--save", str(tmp_path / "saved"), "--device", "cpu"]
    return {
        "corrupt wav": (common + ["--mic-file", str(corrupt), "--persona", str(chat_persona)], "corrupt.wav"),
        "empty wav": (common + ["--mic-file", str(empty), "--persona", str(chat_persona)], "is empty"),
        "missing gguf": (common + ["--mic-file", speech, "--persona", str(chat_persona), "--llm-model",
                                   str(tmp_path / "nope.gguf")], "nope.gguf"),
        "broken persona": (common + ["--mic-file", speech, "--persona", str(broken_persona)], "'topk'"),
        "no microphone": (common + ["--persona", str(chat_persona)], "--mic-file"),
        "replay without out": (["--replay", str(tmp_path)], "--out"),
        "replay of nothing": (["--replay", str(tmp_path / "none"), "--out", str(tmp_path / "o")], "no saved"),
    }


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_checkpoint, chat_persona, espeak_wav):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data")}
    runs = _bad_runs(tmp_path, tiny_checkpoint, chat_persona, espeak_wav)
    # Start them all at once: each pays the interpreter's start-up, none needs the others.
    processes = {name: subprocess.Popen([_csm_chat(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env) for name, (args, _) in runs.items()}
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert process.returncode == 2, f"{name}: rc {process.returncode}, stderr {err!r}"
        errors = [line for line in lines if line.startswith("csm-chat: ")]
        assert len(errors) == 1 and "Traceback" not in err, f"{name}: {err!r}"
        assert runs[name][1] in errors[0], f"{name}: {errors[0]!r}"


def test_list_devices_without_a_sound_card_says_so():
    result = subprocess.run([_csm_chat(), "--list-devices"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() and "Traceback" not in result.stderr


def test_write_speaker_file_of_stereo_48k_is_read(tmp_path):
    import soundfile as sf

    from agent.audio import WavFileSource

    t = np.arange(48_000) / 48_000
    sf.write(tmp_path / "s.wav", np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1) * 0.5, 48_000)
    source = WavFileSource(tmp_path / "s.wav", speed=None)
    assert source.sample_rate == 16_000 and abs(source.duration_s - 1.0) < 0.01
