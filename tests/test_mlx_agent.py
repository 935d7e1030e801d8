"""csm-chat speaking through the MLX engine: the real console script headless and --replay, and
barge-in through the voice stage (tiny checkpoint, ``mlx[cpu]``).

The runs use ``--csm-dtype int4``, a precision only the MLX engine has: the torch engine would
refuse it and the agent would go text-only (a warning, no audio), so audio proves MLX spoke.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


def test_barge_in_cancels_an_mlx_reply_and_keeps_only_what_played(tiny_checkpoint, tiny_generator, chat_persona):
    """The voice stage's own barge-in test, with the MLX engine speaking."""
    from _stage_helpers import RecordingGenerator, context, run_stage

    from agent.audio import MemorySink
    from agent.config.personas import load_persona
    from agent.events import AgentTurnDone
    from agent.frames import AgentSentence, EndOfReply, Reply
    from agent.stages.loading import Models
    from agent.stages.voice import VoiceStage
    from csm_engine.mlx.convert import load_mlx_model
    from csm_engine.mlx.generator import MLXGenerator

    ctx, log = context()
    sink = MemorySink(24_000, speed=1.0)  # a real-time speaker: playback lags generation
    generator = RecordingGenerator(MLXGenerator(load_mlx_model(str(tiny_checkpoint)), tiny_generator.codec,
                                                tiny_generator.tokenizer))
    conversation = Conversation("tester", 0)
    conversation.add_user_turn("Tell me three things.", None)
    models = Models(generator=generator, sink=sink).mark_ready()
    stage = VoiceStage(ctx, models, conversation, load_persona(str(chat_persona)), max_audio_ms=2000, seed=3)
    reply = Reply(2, time.monotonic())
    ctx.replies.begin(reply)
    texts = ["The first thing.", "The second thing.", "The third thing."]
    stage.start()
    stage.put(AgentSentence(reply, texts[0], texts[0]))
    deadline = time.monotonic() + 60
    while sink.played_samples < 0.3 * 24_000:
        assert time.monotonic() < deadline, "the reply never played"
        time.sleep(0.01)
    for text in texts[1:]:
        stage.put(AgentSentence(reply, text, text))
    ctx.replies.cancel_current()  # what Pipeline.interrupt does: cancel, then silence the sink
    sink.stop()
    played = sink.played_samples
    stage.put(EndOfReply(reply))
    assert reply.done.wait(30)
    run_stage(stage, [])
    assert texts[2] not in generator.texts
    (done,) = log.of(AgentTurnDone)
    assert done.interrupted
    turn = conversation.turns[-1]
    assert turn.role == "agent" and turn.interrupted and turn.text.startswith(texts[0])
    assert 0 < len(turn.audio) <= played + sink.block_samples
    sink.close()


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
