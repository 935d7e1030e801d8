"""Hands-free on open speakers: the whole agent in a simulated room, in real time.

The agent's voice (espeak-ng, through ``EspeakVoice``) goes from a real-time speaker into a
pyroomacoustics room and back into the "microphone" with the user's espeak questions; the real
WebRTC echo canceller, Silero VAD, Whisper tiny.en and SmolLM2 do the rest. The user waits for
each answer (and its echo) before asking the next question, so every barge-in here would be the
agent interrupting itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from _stage_helpers import EventLog
from _voice_helpers import EspeakVoice
from agent.audio import MemorySink, load_audio
from agent.events import AgentTurnDone, AudioSetup, Notice, UserTurn
from agent.pipeline import Pipeline
from agent.room import SimulatedRoom
from agent.room_spec import load_room
from agent.settings import AgentSettings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TIMEOUT_S = 600.0
QUESTIONS = ["What is the capital of France?", "Can you tell me a joke?", "How are you doing today?",
             "What time is it in Tokyo?", "Who wrote the book Dune?", "Why is the sky blue?",
             "How far away is the moon?", "What is your name?", "Where do penguins live?", "What is two plus two?"]


def _questions(espeak_wav, n: int) -> np.ndarray:
    parts = [np.zeros(8_000, np.float32)]
    for question in QUESTIONS[:n]:
        clip = load_audio(espeak_wav(question, voice="en-gb"))
        loud = np.nonzero(np.abs(clip) > 0.02)[0]
        parts += [clip[loud[0] : loud[-1] + 1], np.zeros(16_000, np.float32)]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def terse_persona(chat_persona, tmp_path_factory):
    """The test persona with one-sentence answers of a few words: real time is what these tests spend."""
    path = tmp_path_factory.mktemp("terse") / "terse.toml"
    text = chat_persona.read_text(encoding="utf-8").replace("max_tokens = 24", "max_tokens = 12")
    path.write_text(text.replace('clip = "voice.wav"', f'clip = "{chat_persona.parent / "voice.wav"}"'),
                    encoding="utf-8")
    return path


def talk_in_room(tmp_path, room: str, aec: str, replies: int, persona, espeak_wav, generator, llm, transcriber):
    """``replies`` questions asked in ``room``; returns (pipeline, events) once all are answered."""
    source = SimulatedRoom(load_room(room), _questions(espeak_wav, replies), realtime=True, user_waits=True,
                           trailing_silence_s=2.0)
    settings = AgentSettings(persona=str(persona), save_dir=str(tmp_path / f"{room}-{aec}"), headless=True,
                             watermark=False, seed=2, device="cpu", turn="silence", aec=aec, max_turns=replies)
    events = EventLog()
    pipeline = Pipeline(settings, events, source=source, sink=MemorySink(24_000, speed=1.0),
                        generator=EspeakVoice(generator), llm=llm, transcriber=transcriber)
    source.user_waits_for = lambda: pipeline.ctx.progress.busy  # a user who waits for the answer
    try:
        pipeline.start()
        pipeline.wait_ready(TIMEOUT_S)
        assert pipeline.finished.wait(TIMEOUT_S), "the conversation did not finish"
    finally:
        pipeline.stop()
    assert not [n for n in events.of(Notice) if n.level == "error"]
    return pipeline, events


@pytest.mark.parametrize("room", ["office-loud", "living-room-loud"])
def test_the_agent_never_interrupts_itself_with_echo_cancellation(tmp_path, room, terse_persona, espeak_wav,
                                                                   tiny_generator, smollm2_llm, faster_whisper_tiny):
    pipeline, events = talk_in_room(tmp_path, room, "on", 10, terse_persona, espeak_wav, tiny_generator, smollm2_llm,
                                    faster_whisper_tiny)
    assert events.of(AudioSetup)[0].echo_cancellation
    done = events.of(AgentTurnDone)
    assert len(done) == 10 and not any(d.interrupted for d in done)
    assert pipeline.barge_in.pauses == 0  # not even a moment's pause for its own voice
    assert len(events.of(UserTurn)) == 10


def test_without_echo_cancellation_the_agent_interrupts_itself(tmp_path, terse_persona, espeak_wav, tiny_generator,
                                                               smollm2_llm, faster_whisper_tiny):
    pipeline, events = talk_in_room(tmp_path, "living-room-loud", "off", 3, terse_persona, espeak_wav, tiny_generator,
                                    smollm2_llm, faster_whisper_tiny)
    assert not events.of(AudioSetup)[0].echo_cancellation
    assert pipeline.barge_in.pauses >= 1 and any(d.interrupted for d in events.of(AgentTurnDone))
