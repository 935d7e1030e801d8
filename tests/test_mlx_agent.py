"""csm-chat speaking through the MLX engine: the real console script headless and --replay, and
the engine from the config file (tiny checkpoint, ``mlx[cpu]``); barge-in on MLX is tests/test_stages.py's voice test,
parametrized by engine.

The runs use ``--csm-dtype int4``, a precision only the MLX engine has: the torch engine would
refuse it and the agent would go text-only (a warning, no audio), so audio proves MLX spoke.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.audio import read_wav
from agent.conversation.conversation import Conversation

pytest.importorskip("mlx.core", reason="MLX is not importable here: pip install 'mlx[cpu]' (Linux) or mlx (macOS)")


def _csm_chat() -> str:
    exe = Path(sys.executable).with_name("csm-chat")
    assert exe.is_file(), "the csm-chat console script is not installed: pip install -e ."
    return str(exe)


def _env(tmp_path) -> dict:
    return {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data")}


@pytest.mark.e2e
def test_headless_conversation_and_replay_on_mlx(tmp_path, spoken_turns_wav, tiny_checkpoint, chat_persona):
    mic = spoken_turns_wav(["what is the capital of france"])
    mlx = ["--engine", "mlx", "--csm-dtype", "int4", "--csm-model", str(tiny_checkpoint), "--no-watermark",
           "--seed", "5"]
    result = subprocess.run(
        [_csm_chat(), "--headless", *mlx, "--persona", str(chat_persona), "--mic-file", str(mic), "--fast",
         "--speaker-file", str(tmp_path / "agent.wav"), "--save", str(tmp_path / "saved"), "--turn", "silence"],
        capture_output=True, text=True, timeout=400, env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "speech is off" not in result.stderr and "could not speak" not in result.stderr, result.stderr
    you = [line for line in result.stdout.splitlines() if line.startswith("you: ")]
    agent = [line for line in result.stdout.splitlines() if line.startswith("agent: ")]
    assert len(you) == 1 and "capital" in you[0].lower() and len(agent) == 1, result.stdout
    spoken, rate = read_wav(tmp_path / "agent.wav")
    assert rate == 24_000 and len(spoken) >= 2 * 1920 and np.abs(spoken).max() > 0  # streamed agent audio
    saved = Conversation.load(tmp_path / "saved")
    assert [t.role for t in saved.turns] == ["user", "agent"]
    assert saved.turns[1].audio is not None and len(saved.turns[1].audio) > 0

    replay = subprocess.run([_csm_chat(), "--replay", str(tmp_path / "saved"), "--out", str(tmp_path / "replay"),
                             *mlx], capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    assert replay.returncode == 0, replay.stderr
    wavs = sorted((tmp_path / "replay").glob("*.wav"))
    assert wavs, replay.stdout
    audio, rate = read_wav(wavs[0])
    assert rate == 24_000 and len(audio) > 0


def test_an_unknown_engine_is_one_line(tmp_path):
    result = subprocess.run([_csm_chat(), "--headless", "--engine", "tpu"], capture_output=True, text=True,
                            timeout=120, env=_env(tmp_path))
    assert result.returncode == 2 and "invalid choice: 'tpu'" in result.stderr


def test_the_engine_comes_from_the_config_file_and_the_flag_wins(tmp_path):
    from agent.cli import build_parser, settings_from_args
    from agent.errors import AgentError

    config = tmp_path / "config.toml"
    config.write_text('engine = "mlx"\ncsm-dtype = "int4"\n')
    assert settings_from_args(build_parser().parse_args(["--config", str(config)])).engine == "mlx"
    flag = settings_from_args(build_parser().parse_args(["--config", str(config), "--engine", "torch"]))
    assert flag.engine == "torch" and flag.csm_dtype == "int4"
    config.write_text('engine = "tpu"\n')
    with pytest.raises(AgentError, match="unknown engine 'tpu': use torch, mlx or auto"):
        settings_from_args(build_parser().parse_args(["--config", str(config)]))
