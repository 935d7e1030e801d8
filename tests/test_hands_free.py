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
from _clips import speech_only
from _stage_helpers import EventLog, converse
from _voice_helpers import EspeakVoice

from agent.audio import MemorySink, load_audio
from agent.config.settings import AgentSettings
from agent.echo.room import SimulatedRoom
from agent.echo.room_spec import load_room
from agent.events import AgentTurnDone, AudioSetup, UserTurn
from agent.pipeline import Pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TIMEOUT_S = 600.0
QUESTIONS = ["What is the capital of France?", "Can you tell me a joke?", "How are you doing today?",
             "What time is it in Tokyo?", "Who wrote the book Dune?", "Why is the sky blue?",
             "How far away is the moon?", "What is your name?", "Where do penguins live?", "What is two plus two?"]


def _questions(espeak_wav, n: int) -> np.ndarray:
    parts = [np.zeros(8_000, np.float32)]
    for question in QUESTIONS[:n]:
        parts += [speech_only(load_audio(espeak_wav(question, voice="en-gb"))), np.zeros(16_000, np.float32)]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def terse_persona(chat_persona, tmp_path_factory):
    """The test persona with one-sentence answers of a few words: real time is what these tests spend."""
    path = tmp_path_factory.mktemp("terse") / "terse.toml"
    text = chat_persona.read_text(encoding="utf-8").replace("max_tokens = 24", "max_tokens = 12")
    path.write_text(text.replace('clip = "voice.wav"', f'clip = "{chat_persona.parent / "voice.wav"}"'),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def babbling_persona(terse_persona, tmp_path_factory):
    """The terse persona speaking through the tiny CSM checkpoint itself: broadband babble, speech-like in
    level but not in shape, up to 3 s a sentence (long enough for the echo model to be fitted on it)."""
    path = tmp_path_factory.mktemp("babble") / "babble.toml"
    path.write_text(terse_persona.read_text(encoding="utf-8").replace("max_audio_length_ms = 480",
                                                                       "max_audio_length_ms = 3000"), encoding="utf-8")
    return path


def talk_in_room(tmp_path, room: str, aec: str, replies: int, persona, espeak_wav, generator, llm, transcriber,
                 voice: str = "espeak"):
    """``replies`` questions asked in ``room``; returns (pipeline, events) once all are answered. The
    agent speaks through espeak-ng (``voice="espeak"``) or through the tiny CSM checkpoint (``"tiny-csm"``)."""
    source = SimulatedRoom(load_room(room), _questions(espeak_wav, replies), realtime=True, user_waits=True,
                           trailing_silence_s=2.0)
    settings = AgentSettings(persona=str(persona), save_dir=str(tmp_path / f"{room}-{aec}"), headless=True,
                             watermark=False, seed=2, device="cpu", turn="silence", aec=aec, max_turns=replies)
    events = EventLog()
    pipeline = Pipeline(settings, events, source=source, sink=MemorySink(24_000, speed=1.0),
                        generator=EspeakVoice(generator) if voice == "espeak" else generator, llm=llm,
                        transcriber=transcriber)
    source.user_waits_for = lambda: pipeline.ctx.progress.busy  # a user who waits for the answer
    converse(pipeline, events, TIMEOUT_S)
    return pipeline, events


@pytest.mark.parametrize("voice", ["espeak", "tiny-csm"])
@pytest.mark.parametrize("room", ["office-loud", "living-room-loud"])
def test_the_agent_never_interrupts_itself_with_echo_cancellation(tmp_path, room, voice, terse_persona,
                                                                   babbling_persona, espeak_wav, tiny_generator,
                                                                   smollm2_llm, faster_whisper_tiny):
    """Five replies per room in espeak's voice, three in the tiny checkpoint's babble (its sentences run
    to 3 s, so three of them keep the room's echo busy as long as the test can afford; ten replies per
    room and voice are in benchmarks/self_interruption.py)."""
    persona, replies = (terse_persona, 5) if voice == "espeak" else (babbling_persona, 3)
    pipeline, events = talk_in_room(tmp_path, room, "on", replies, persona, espeak_wav, tiny_generator, smollm2_llm,
                                    faster_whisper_tiny, voice=voice)
    assert events.of(AudioSetup)[0].echo_cancellation
    done = events.of(AgentTurnDone)
    assert len(done) == replies and not any(d.interrupted for d in done)
    assert pipeline.barge_in.pauses == 0  # not even a moment's pause for its own voice
    assert len(events.of(UserTurn)) == replies


def test_without_echo_cancellation_the_agent_interrupts_itself(tmp_path, terse_persona, espeak_wav, tiny_generator,
                                                               smollm2_llm, faster_whisper_tiny):
    pipeline, events = talk_in_room(tmp_path, "living-room-loud", "off", 3, terse_persona, espeak_wav, tiny_generator,
                                    smollm2_llm, faster_whisper_tiny)
    assert not events.of(AudioSetup)[0].echo_cancellation
    assert pipeline.barge_in.pauses >= 1 and any(d.interrupted for d in events.of(AgentTurnDone))


def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


def test_a_user_who_talks_over_the_reply_stops_it_and_is_heard(tmp_path, chat_persona, espeak_wav, tiny_generator,
                                                                smollm2_llm, faster_whisper_tiny):
    """Double talk in the loudest room: the user asks, then talks over the answer. The speaker must
    fall silent within 400 ms of the voice, and Whisper must get the words of it but one, though AEC3's
    suppressor takes most of a voice that talks over a loud reply (``benchmarks/double_talk.py``: mean
    word recall 0.66 on its output in this room, 1.00 on the recovered voice). Whisper tiny.en heard
    the same recovered voice as "Top, what is ..." in 2 of 7 runs, depending only on where the clip
    began (a 125 ms later start), so one word may go."""
    question = "Can you tell me a long story about a dragon?"
    barge_in = "Stop, what is the weather like in Paris?"
    clips = []
    for text in (question, barge_in):
        clips.append(speech_only(load_audio(espeak_wav(text, voice="en-gb"))))
    gap = np.zeros(16_000, np.float32)
    user = np.concatenate([gap[:8_000], clips[0], gap, clips[1]])
    phrase_at_s = (len(user) - len(clips[1])) / 16_000
    source = SimulatedRoom(load_room("living-room-loud"), user, realtime=True, user_waits=False,
                           trailing_silence_s=3.0)
    far: list[tuple[float, float]] = []  # (room time a played block starts, its RMS)
    detach = source.add_listener(lambda samples, rate, start_s: far.append(
        (start_s, float(np.sqrt(np.mean(np.square(samples)))) if len(samples) else 0.0)))
    released: list[float] = []

    def user_waits() -> bool:
        """Before the second phrase, wait until the answer has played for 3 s (the double-talk detector
        learns the room's echo over the agent's first ~2.3 s of speech); then talk over it."""
        if released or source.user_position_s < phrase_at_s:
            return False
        sounding = [start for start, rms in far if rms > 1e-3]
        if sounding and source.clock() - sounding[0] >= 3.0:
            released.append(source.clock())  # the next block read carries the voice's first sample
            return False
        return True

    source.user_waits_for = user_waits
    settings = AgentSettings(persona=str(chat_persona), save_dir=str(tmp_path / "dtalk"), headless=True,
                             watermark=False, seed=2, device="cpu", turn="silence", aec="on", max_turns=2)
    events = EventLog()
    pipeline = Pipeline(settings, events, source=source, sink=MemorySink(24_000, speed=1.0),
                        generator=EspeakVoice(tiny_generator), llm=smollm2_llm, transcriber=faster_whisper_tiny)
    converse(pipeline, events, TIMEOUT_S, finally_=detach)
    assert released, "the answer never played long enough to talk over it"
    voice_at = released[0]
    phrase_s = len(clips[1]) / 16_000
    assert any(voice_at - 1.0 <= start < voice_at and rms > 1e-3 for start, rms in far), "no reply was playing"
    still = [round(start - voice_at, 3) for start, rms in far
             if voice_at + 0.4 <= start < voice_at + phrase_s and rms > 1e-3]
    assert not still, f"the speaker went on playing over the user (seconds after the voice began): {still}"
    done = events.of(AgentTurnDone)
    assert done[0].interrupted
    turns = events.of(UserTurn)
    assert len(turns) == 2 and len(set(_words(barge_in)) - set(_words(turns[1].text))) <= 1, turns[1].text
    assert pipeline.transcribe.recovered == 1
