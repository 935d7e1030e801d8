"""`csm-chat --headless` as a user runs it: the real console script, espeak-ng speech as the
microphone, embedded Whisper and SmolLM2, a make-checkpoint tiny CSM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent.audio import load_audio, read_wav
from agent.conversation.conversation import Conversation

pytestmark = pytest.mark.e2e


def _csm_chat() -> str:
    exe = Path(sys.executable).with_name("csm-chat")
    assert exe.is_file(), "the csm-chat console script is not installed: pip install -e ."
    return str(exe)


def _base_args(tiny_checkpoint, chat_persona, tmp_path) -> list[str]:
    return [_csm_chat(), "--headless", "--csm-model", str(tiny_checkpoint), "--persona", str(chat_persona),
            "--speaker-file", str(tmp_path / "agent.wav"), "--save", str(tmp_path / "saved"), "--no-watermark",
            "--seed", "5", "--device", "cpu", "--turn", "silence"]


def _env(tmp_path) -> dict:
    # A clean config dir, so a developer's own config.toml does not change the run.
    return {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data")}


def test_headless_conversation_from_a_stereo_48k_wav(tmp_path, spoken_turns_wav, tiny_checkpoint, chat_persona):
    mono = spoken_turns_wav(["what is the capital of france", "tell me about the weather today"], gap_s=1.5)
    audio = load_audio(mono, 48_000)
    stereo = np.stack([audio, audio * 0.8], axis=1)  # a 48 kHz stereo recording, as a phone would make
    mic = tmp_path / "mic-48k-stereo.wav"
    import soundfile as sf

    sf.write(mic, stereo, 48_000)
    result = subprocess.run(_base_args(tiny_checkpoint, chat_persona, tmp_path) + ["--mic-file", str(mic), "--fast"],
                            capture_output=True, text=True, timeout=400, env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    you = [line[len("you: "):].lower() for line in lines if line.startswith("you: ")]
    agent = [line[len("agent: "):] for line in lines if line.startswith("agent: ")]
    assert len(you) == 2 and "capital" in you[0] and "weather" in you[1], result.stdout
    assert len(agent) == 2 and all(agent), result.stdout
    assert sum("latency: transcript" in line for line in lines) == 2
    spoken, rate = read_wav(tmp_path / "agent.wav")
    assert rate == 24_000 and len(spoken) > 0.1 * rate and np.abs(spoken).max() > 0
    saved = Conversation.load(tmp_path / "saved")
    assert [t.role for t in saved.turns] == ["user", "agent", "user", "agent"]
    assert all(t.audio is not None and len(t.audio) for t in saved.turns)
    assert saved.turns[0].sample_rate == 16_000 and saved.turns[1].sample_rate == 24_000


def test_ctrl_c_mid_turn_leaves_a_valid_transcript(tmp_path, spoken_turns_wav, tiny_checkpoint, chat_persona):
    mic = spoken_turns_wav(["what is the capital of france", "tell me about the weather today",
                            "thank you very much"], gap_s=1.5)
    args = _base_args(tiny_checkpoint, chat_persona, tmp_path) + ["--mic-file", str(mic), "--realtime",
                                                                  "--max-audio-ms", "3000"]
    # As in a terminal, Ctrl-C must reach the agent even when this test runs as a background job
    # (a shell without job control starts those with SIGINT ignored, which children inherit).
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # Wait until the first user turn is in: the agent is now answering it (a turn in flight).
        deadline = time.monotonic() + 300
        line = ""
        while not line.startswith("you: "):
            assert time.monotonic() < deadline, "no user turn within the time limit"
            line = process.stdout.readline()
            assert line or process.poll() is None, process.stderr.read()
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    data = json.loads((tmp_path / "saved" / "conversation.json").read_text())
    assert data["turns"] and data["turns"][0]["role"] == "user"
    saved = Conversation.load(tmp_path / "saved")  # every WAV it names is there
    assert saved.turns[0].text
    # The reply in flight was cut and recorded as such, with only what had been played.
    last = saved.turns[-1]
    assert last.role == "agent" and last.interrupted
