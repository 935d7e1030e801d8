"""A reply longer than CSM's window speaks to its end (issue #23.1): in-process and through csm-serve.

The reply's own earlier sentences are context for the next one; once they pass the window they
are trimmed like the rest of the context, oldest first and by whole sentences. The synthesizer
tests hand it earlier sentences with known codes (no Mimi encoding, so they are cheap) whose rows
exceed the window several times over; the end-to-end tests run the issue's reproduction (a
long story asked by espeak-ng, ``--max-audio-ms 8000 --fast``) on a copy of the tiny checkpoint
whose window is short enough that three sentences pass it, so the run stays short.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _serve_helpers import ServerProcess

from agent.audio import load_audio
from agent.conversation.conversation import Conversation
from agent.speak.remote_voice import RemoteSynthesizer
from agent.speak.synthesis import SAMPLES_PER_FRAME, ReplySynthesizer, SynthesisOptions
from csm_engine.tokens import Segment

KEY = "long-reply-key"
SHORT_WINDOW = 256  # rows: a voice clip, one 8 s sentence and the one being said
STORY = "Tell me a long story about a dragon who lives in the mountains."


@pytest.fixture(scope="module")
def short_window_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with a SHORT_WINDOW-row window (its files linked, its config.json rewritten)."""
    from csm_engine.weights import CONFIG_FILE
    from csm_engine.weights.config_json import read_config

    out = tmp_path_factory.mktemp("short_window")
    for item in Path(tiny_checkpoint).iterdir():
        if item.name != CONFIG_FILE:
            (out / item.name).symlink_to(item)
    config = json.loads((Path(tiny_checkpoint) / CONFIG_FILE).read_text())
    backbone = dataclasses.replace(read_config(Path(tiny_checkpoint)).backbone, max_seq_len=SHORT_WINDOW)
    config["backbone"] = dataclasses.asdict(backbone)
    (out / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    assert read_config(out).max_seq_len == SHORT_WINDOW
    return out


@pytest.fixture(scope="module")
def short_generator(short_window_checkpoint):
    """A Generator on the short-window copy: prompts of a few hundred rows keep these tests quick."""
    from csm_engine.generator import load_generator

    return load_generator(str(short_window_checkpoint), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(short_window_checkpoint, tmp_path_factory):
    directory = tmp_path_factory.mktemp("long_reply_server")
    with ServerProcess("--csm-model", str(short_window_checkpoint), "--max-streams", "1", "--dtype", "float32",
                       api_key=KEY, log=directory / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def voice(espeak_speech_wav) -> Segment:
    return Segment(0, "hello there, this is a short test of my voice",
                   torch.from_numpy(load_audio(espeak_speech_wav, 24_000)))


def _conversation() -> Conversation:
    conversation = Conversation(agent_speaker=0)
    conversation.add_user_turn(STORY, None, typed=True)
    return conversation


def _earlier_sentences(synth: ReplySynthesizer, count: int, frames: int = 20) -> list[Segment]:
    """``count`` sentences of a reply already said: 1.6 s of audio each, their codes known to the engine."""
    rng = np.random.default_rng(7)
    sentences = []
    for i in range(count):
        audio = (rng.standard_normal(frames * SAMPLES_PER_FRAME) * 0.05).astype(np.float32)
        codes = torch.from_numpy(rng.integers(0, 2048, (32, frames), dtype=np.int64))
        text = f"Then the dragon flew over mountain number {i} and sang a song."
        sentences.append(Segment(0, text, synth.remember(audio, codes)))
    return sentences


def _says_to_the_end(synth: ReplySynthesizer, conversation: Conversation, voice: Segment) -> None:
    earlier = _earlier_sentences(synth, 60)
    assert sum(synth.measure(s) for s in earlier) > 5 * synth.window  # the reply alone, several windows over
    prompts, result = [], []
    synth.on_prompt = lambda context, prompt: prompts.append((context, prompt))
    chunks = list(synth.stream("And so the dragon slept at last.", 0, earlier, result=result))
    assert chunks and result[0].codes is not None and len(result[0].audio) > 0
    context, prompt = prompts[0]
    assert prompt.context_kept == len(context)  # the engine kept every segment it was given
    assert prompt.tokens.shape[0] + prompt.max_frames <= synth.window
    assert context[0] is voice  # the voice clip stays pinned first
    assert any(s.text == STORY for s in context)  # the question is not pushed out by the long answer
    kept = [s for s in context if any(s is e for e in earlier)]
    assert 2 <= len(kept) < len(earlier)
    assert kept == earlier[-len(kept):]  # the newest sentences, whole and in order


def test_a_reply_many_windows_long_speaks_to_its_end(short_generator, voice):
    options = SynthesisOptions(max_audio_ms=480, seed=1)
    conversation = _conversation()
    _says_to_the_end(ReplySynthesizer(short_generator, conversation, voice, options), conversation, voice)


def test_a_reply_many_windows_long_speaks_to_its_end_through_csm_serve(voice, server):
    # The server runs the short-window copy; the client trims for the window the server reports.
    conversation = _conversation()
    synth = RemoteSynthesizer.connect(server.url, conversation, voice, SynthesisOptions(max_audio_ms=480, seed=1),
                                      api_key=KEY)
    try:
        assert synth.window == SHORT_WINDOW
        _says_to_the_end(synth, conversation, voice)
    finally:
        synth.close()


def test_a_sentence_too_long_for_the_window_is_cut_with_a_warning(short_generator, caplog):
    synth = ReplySynthesizer(short_generator, _conversation(), None, SynthesisOptions(max_audio_ms=240, seed=1))
    text = " ".join(["the dragon sang"] * 200) + "."
    with caplog.at_level(logging.WARNING, logger="agent.speak.synthesis"):
        spoken = synth.speak(text, 0)
    assert text.startswith(spoken.text) and 20 < len(spoken.text.split()) < len(text.split())
    assert len(spoken.audio) > 0
    assert any("too long" in r.getMessage() for r in caplog.records)


# ---- the reproduction: csm-chat --headless, one spoken question, a long story ----------


def _story_persona(tmp_path: Path, espeak_wav) -> Path:
    clip = "hello, this is my voice"
    shutil.copy(espeak_wav(clip), tmp_path / "voice.wav")
    path = tmp_path / "storyteller.toml"
    path.write_text('name = "Teller"\nspeaker_id = 0\n'
                    f'voice = {{ clip = "voice.wav", transcript = "{clip}" }}\n'
                    'system_prompt = "You are a storyteller. Tell long stories in many short sentences."\n'
                    "[llm]\nmax_tokens = 50\ntemperature = 0.0\n", encoding="utf-8")
    return path


def _run_story(tmp_path: Path, checkpoint: Path, espeak_wav, *extra: str) -> Conversation:
    csm_chat = str(Path(sys.executable).with_name("csm-chat"))
    persona = _story_persona(tmp_path, espeak_wav)
    args = [csm_chat, "--headless", "--csm-model", str(checkpoint), "--persona", str(persona),
            "--mic-file", str(espeak_wav(STORY, "en-us", 145)), "--max-audio-ms", "8000", "--fast",
            "--speaker-file", str(tmp_path / "agent.wav"), "--save", str(tmp_path / "saved"), "--no-watermark",
            "--seed", "5", "--device", "cpu", "--turn", "silence", *extra]
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data"),
           "CSM_SERVE_API_KEY": KEY}
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage failed" not in result.stderr and "could not speak" not in result.stderr, result.stderr[-3000:]
    saved = Conversation.load(tmp_path / "saved")
    assert [t.role for t in saved.turns] == ["user", "agent"]
    agent = saved.turns[1]
    assert not agent.interrupted
    agent_line = [line for line in result.stdout.splitlines() if line.startswith("agent: ")]
    assert agent_line == [f"agent: {agent.text}"], result.stdout
    # Every sentence was spoken, and together they pass the window: the case that used to crash.
    assert len(agent.sentences) >= 3 and all(s.samples > 0 for s in agent.sentences), agent.sentences
    rows = sum(s.samples // SAMPLES_PER_FRAME + 1 for s in agent.sentences)
    assert rows > SHORT_WINDOW, rows
    return saved


@pytest.mark.e2e
def test_the_long_story_is_spoken_and_saved_whole(tmp_path, short_window_checkpoint, espeak_wav):
    _run_story(tmp_path, short_window_checkpoint, espeak_wav)


@pytest.mark.e2e
def test_the_long_story_is_spoken_and_saved_whole_through_csm_serve(tmp_path, server, espeak_wav,
                                                                     short_window_checkpoint):
    _run_story(tmp_path, short_window_checkpoint, espeak_wav, "--tts-url", server.url)
