"""Turn-taking through the whole pipeline: the end-of-turn model, backchannels, barge-in.

Real parts throughout: espeak-ng speech as the user, Silero VAD, the Smart Turn model, Whisper
tiny.en, SmolLM2; the agent speaks with espeak (``EspeakVoice``) where what it says must sound
like speech.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
from _clips import speech_only
from _stage_helpers import EventLog as Events
from _stage_helpers import converse
from _voice_helpers import EspeakVoice
from test_end_of_turn import QUESTIONS  # the 20 complete questions the judge's own tests use

from agent.audio import MemorySink, QueueSource, load_audio, write_wav
from agent.config.settings import AgentSettings
from agent.events import AgentTurnDone, TurnLatency, UserTurn
from agent.listen.barge_in import is_backchannel
from agent.pipeline import Pipeline

pytestmark = pytest.mark.e2e
TIMEOUT_S = 300.0
# An unfinished clause, a pause of 0.8-1.2 s, the rest; word stems to find in each half's transcript.
PAUSED = [
    ("I stayed at home because", "it was raining all day.", {"home", "stayed"}, {"rain", "day"}),
    ("We could go to the beach, or", "we could stay here.", {"beach"}, {"stay", "here"}),
    ("I called you because", "I need some help with my car.", {"call"}, {"help", "car"}),
    ("I was going to say that", "the movie was great.", {"going", "say"}, {"movie", "great"}),
    ("My plan for tomorrow is, uh", "to visit my parents.", {"plan", "tomorrow"}, {"visit", "parent"}),
    ("The reason I am late is because", "the bus broke down.", {"reason", "late"}, {"bus", "broke", "down"}),
]
PAUSES_S = (0.8, 1.0, 1.2)


def _settings(tmp_path, persona, **changes) -> AgentSettings:
    values = dict(csm_model=str(tmp_path / "no-csm"), persona=str(persona), save_dir=str(tmp_path / "saved"),
                  headless=True, watermark=False, seed=3, device="cpu")
    values.update(changes)
    return AgentSettings(**values)


def _speech(espeak_wav, text: str) -> np.ndarray:
    return speech_only(load_audio(espeak_wav(text)))


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16_000), np.float32)


def _has_any(text: str, stems: set[str]) -> bool:
    words = text.replace(",", " ").replace(".", " ").replace("?", " ").split()
    return any(word.startswith(stem) for word in words for stem in stems)


def _run_file(tmp_path, persona, mic: np.ndarray, llm, transcriber, keep: list | None = None, **settings) -> Events:
    path = write_wav(tmp_path / f"mic-{settings.get('turn', 'smart')}.wav", mic, 16_000)
    events = Events()
    pipeline = Pipeline(_settings(tmp_path, persona, mic_file=str(path), **settings), events,
                        sink=MemorySink(24_000, speed=None), llm=llm, transcriber=transcriber)
    if keep is not None:
        keep.append(pipeline)
    converse(pipeline, events, TIMEOUT_S)
    return events


@pytest.mark.slow
def test_a_pause_after_an_unfinished_clause_does_not_end_the_turn(tmp_path, chat_persona, espeak_wav, smollm2_llm,
                                                                   faster_whisper_tiny):
    parts = [_silence(0.5)]
    for i, (clause, rest, _, _) in enumerate(PAUSED):
        parts += [_speech(espeak_wav, clause), _silence(PAUSES_S[i % 3]), _speech(espeak_wav, rest), _silence(3.0)]
    mic = np.concatenate(parts)
    smart = _run_file(tmp_path, chat_persona, mic, smollm2_llm, faster_whisper_tiny, realtime=False, turn="smart")
    heard = [e.text.lower() for e in smart.of(UserTurn)]
    # Each sentence stayed one turn: as many turns as sentences (the silence rule below makes
    # twice as many), each holding words of its own sentence.
    assert len(heard) == len(PAUSED), heard
    halves = [(_has_any(text, first), _has_any(text, second)) for text, (_, _, first, second) in zip(heard, PAUSED)]
    assert all(a or b for a, b in halves), heard
    # The words, with a margin: Whisper tiny mishears a borderline half now and then, and which one
    # depends on the CPU's kernels ("the must rock town" for "the bus broke down" on an AMX Xeon).
    assert sum(a + b for a, b in halves) >= 2 * len(PAUSED) - 2, heard
    fixed = _run_file(tmp_path, chat_persona, mic, smollm2_llm, faster_whisper_tiny, realtime=False, turn="silence")
    assert len(fixed.of(UserTurn)) == 2 * len(PAUSED)  # the 600 ms rule cuts every sentence in two


@pytest.mark.slow
def test_a_finished_question_ends_the_turn_soon_after_the_speech(tmp_path, chat_persona, espeak_wav, smollm2_llm,
                                                                 faster_whisper_tiny):
    # Paced: the judge's decisions in stream time do not depend on how busy this machine is
    # (benchmarks/agent_latency.py measures the wall clock, where the model's compute adds on).
    parts = [_silence(0.5)]
    for question in QUESTIONS:
        parts += [_speech(espeak_wav, question), _silence(2.5)]
    pipeline_box: list = []
    events = _run_file(tmp_path, chat_persona, np.concatenate(parts), smollm2_llm, faster_whisper_tiny,
                       realtime=False, turn="smart", keep=pipeline_box)
    decisions = pipeline_box[0].turn.turn_end_ms
    assert len(decisions) == len(QUESTIONS) == len(events.of(UserTurn))
    stream_ms = [stream for stream, _ in decisions]
    print("end of speech -> turn ended, stream ms:", sorted(round(t) for t in stream_ms))
    assert statistics.median(stream_ms) <= 300  # the fixed rule: 600 ms every time
    for latency in events.of(TurnLatency):
        assert latency.turn_end_ms <= latency.transcript_ms <= latency.first_token_ms


def _speaking_pipeline(tmp_path, persona, tiny_generator, smollm2_llm, faster_whisper_tiny):
    events = Events()
    source = QueueSource(16_000)
    sink = MemorySink(24_000, speed=1.0)
    pipeline = Pipeline(_settings(tmp_path, persona, turn="silence", end_silence_ms=400), events, source=source,
                        sink=sink, generator=EspeakVoice(tiny_generator), llm=smollm2_llm,
                        transcriber=faster_whisper_tiny)
    pipeline.start()
    pipeline.wait_ready(TIMEOUT_S)
    source.push(_silence(0.5))
    pipeline.submit_text("Tell me about the weather in the mountains.")
    events.wait_for(lambda: sink.played_samples > 24_000 * 0.6, "the reply playing")
    return pipeline, source, events


@pytest.mark.parametrize("heard", ["Mm-hmm.", "M. M. M. M. M.", "Mmmm", "Hmm, yeah.", "mhmm", "Okay", ""])
def test_listening_noises_as_whisper_writes_them_are_backchannels(heard):
    # "M. M. M. M. M." is how Whisper's 10 s window wrote espeak's "mm hmm" under the agent's voice.
    assert is_backchannel(heard)


@pytest.mark.parametrize("heard", ["Mom?", "Hmm, what about tomorrow?", "Him.", "Stop.", "Huh?"])
def test_words_are_not_backchannels(heard):
    assert not is_backchannel(heard)


@pytest.mark.parametrize("words, interrupted", [("mm hmm", False), ("wait, what about tomorrow morning", True)])
def test_a_backchannel_lets_the_reply_go_on_and_a_sentence_stops_it(tmp_path, chat_persona, espeak_wav,
                                                                    tiny_generator, smollm2_llm,
                                                                    faster_whisper_tiny, words, interrupted):
    pipeline, source, events = _speaking_pipeline(tmp_path, chat_persona, tiny_generator, smollm2_llm,
                                                  faster_whisper_tiny)
    try:
        source.push(np.concatenate([load_audio(espeak_wav(words, voice="en-us+f3")), _silence(1.5)]))
        events.wait_for(lambda: events.of(AgentTurnDone), "the reply to end")
        source.push(_silence(1.0))
        if interrupted:
            events.wait_for(lambda: len(events.of(UserTurn)) == 2, "the user's words to be taken as a turn")
        else:
            time.sleep(0.5)
    finally:
        pipeline.stop()
    done = events.of(AgentTurnDone)[0]
    assert pipeline.barge_in.pauses == 1  # silent the moment the user was heard, either way
    assert done.interrupted is interrupted
    users = [e.text.lower() for e in events.of(UserTurn)]
    if interrupted:
        assert any("tomorrow" in u for u in users)  # and answered
    else:
        assert pipeline.barge_in.resumed == 1 and len(users) == 1  # only the typed question
