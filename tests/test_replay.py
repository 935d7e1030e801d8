"""`csm-chat --replay`: a saved conversation said again with CSM, in its running context."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agent.audio import load_audio, read_wav
from agent.speak.replay import replay_conversation


def test_replay_resynthesizes_agent_turns_in_running_context(tmp_path, saved_conversation, tiny_generator):
    calls = []
    original_stream = tiny_generator.stream

    class Recording:
        def __getattr__(self, name):
            return getattr(tiny_generator, name)

        def stream(self, text, speaker, context=(), **kwargs):
            calls.append((text, speaker, [(s.speaker, s.text, s.audio is not None) for s in context]))
            return original_stream(text, speaker, context, **kwargs)

    result = replay_conversation(saved_conversation, tmp_path / "out", Recording(), seed=1, max_audio_ms=320)
    assert sorted(p.name for p in result.turn_files) == ["turn-0002-agent.wav", "turn-0004-agent.wav",
                                                         "turn-0006-agent.wav"]
    # Agent turns are said sentence by sentence; the reply that was never spoken is said from its text.
    texts = [c[0] for c in calls]
    assert texts == ["It is sunny today.", "Do you want to go for a walk?", "Great, let us go after lunch.",
                     "It will rain tomorrow."]
    # The second agent turn hears the user's original audio and the first reply as re-synthesized.
    assert calls[2][2] == [(1, "Hi, what is the weather like?", True), (0, "It is sunny today.", True),
                           (0, "Do you want to go for a walk?", True), (1, "Yes, that sounds lovely.", False)]
    joined, rate = read_wav(result.joined)
    assert rate == 24_000
    parts = sum(len(read_wav(p)[0]) for p in result.turn_files)
    user = len(load_audio(Path(saved_conversation) / "turn-0001-user.wav", 24_000))
    assert len(joined) >= parts + user


def test_replay_all_turns_resynthesizes_the_user_too(tmp_path, saved_conversation, tiny_generator):
    result = replay_conversation(saved_conversation, tmp_path / "out", tiny_generator, all_turns=True, seed=1,
                                 max_audio_ms=240)
    assert len(result.turn_files) == 6
    for path in result.turn_files:
        audio, rate = read_wav(path)
        assert rate == 24_000 and len(audio) > 0


def test_replay_command_line_writes_the_wavs(tmp_path, saved_conversation, tiny_checkpoint, chat_persona):
    exe = str(Path(sys.executable).with_name("csm-chat"))
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    result = subprocess.run(
        [exe, "--replay", str(Path(saved_conversation) / "conversation.json"), "--out", str(tmp_path / "out"),
         "--csm-model", str(tiny_checkpoint), "--persona", str(chat_persona), "--max-audio-ms", "240", "--no-watermark",
         "--seed", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["conversation.wav", "turn-0002-agent.wav", "turn-0004-agent.wav", "turn-0006-agent.wav"]
    assert "wrote 3 turn WAVs" in result.stdout
