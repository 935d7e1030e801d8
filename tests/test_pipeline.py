"""The live pipeline in-process, with real parts: Silero VAD, faster-whisper tiny.en, SmolLM2 on
llama.cpp, a tiny random CSM, espeak-ng speech as the microphone, in-memory speakers."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from _stage_helpers import EventLog as Events
from _stage_helpers import RecordingGenerator

from agent.audio import MemorySink, QueueSource, load_audio
from agent.config.settings import AgentSettings
from agent.events import AgentState, AgentText, AgentTurnDone, Notice, StateChanged, TurnLatency, UserTurn
from agent.pipeline import Pipeline

pytestmark = pytest.mark.e2e
TIMEOUT_S = 240.0


def _settings(tmp_path, persona, **changes) -> AgentSettings:
    # The fixed-pause turn rule: these tests are about the pipeline, not about judging turns.
    values = dict(csm_model="unused", persona=str(persona), save_dir=str(tmp_path / "saved"), headless=True,
                  watermark=False, seed=7, device="cpu", turn="silence")
    values.update(changes)
    return AgentSettings(**values)


def _run_until_finished(pipeline: Pipeline, timeout: float = TIMEOUT_S) -> None:
    pipeline.start()
    pipeline.wait_ready(timeout)
    assert pipeline.finished.wait(timeout), "the pipeline never finished the input"
    pipeline.stop()


def test_spoken_turns_are_answered_with_earlier_turns_and_their_audio_as_context(
    tmp_path, chat_persona, spoken_turns_wav, tiny_generator, smollm2_llm, faster_whisper_tiny
):
    mic = spoken_turns_wav(["what is the capital of france", "tell me about the weather today",
                            "thank you very much"], gap_s=1.5)
    generator = RecordingGenerator(tiny_generator)
    sink = MemorySink(24_000, speed=None)
    events = Events()
    pipeline = Pipeline(_settings(tmp_path, chat_persona, mic_file=str(mic), realtime=False), events, sink=sink,
                        generator=generator, llm=smollm2_llm, transcriber=faster_whisper_tiny)
    _run_until_finished(pipeline)
    assert not [n for n in events.of(Notice) if n.level == "error"]

    users = [e.text.lower() for e in events.of(UserTurn)]
    assert len(users) == 3
    assert "capital" in users[0] and "weather" in users[1] and "thank" in users[2]
    done = events.of(AgentTurnDone)
    assert len(done) == 3 and all(d.text and not d.interrupted for d in done)

    turns = pipeline.conversation.turns
    assert [t.role for t in turns] == ["user", "agent"] * 3
    # For the first sentence of reply k, CSM's context is the voice clip, then turns 1..2k-1 with audio.
    first_calls = []
    for turn in turns[1::2]:
        first_calls.append(next(c for c in generator.calls if c["text"] == turn.sentences[0].text))
    for k, call in enumerate(first_calls):
        context = call["context"]
        assert context[0].text == "hello, this is my voice" and context[0].audio is not None
        earlier = turns[: 2 * k + 1]
        expected = [(t.speaker, s.text) for t in earlier for s in t.csm_segments()]
        assert [(s.speaker, s.text) for s in context[1:]] == expected
        assert all(s.audio is not None and s.audio.numel() > 0 for s in context)
    # Same tensors (bytes) from one turn to the next: the earlier context is an unchanged prefix.
    assert all(a.audio is b.audio for a, b in zip(first_calls[1]["context"], first_calls[2]["context"]))

    # Streaming: each reply's first audio was playing before CSM finished that sentence.
    for call in first_calls:
        heard = [c.started_at for c in sink.chunks if call["started"] <= c.started_at]
        assert heard and heard[0] < call["ended"], "audio reached the speaker only after generation ended"

    latencies = events.of(TurnLatency)
    assert len(latencies) == 3 and all(t.transcript_ms and t.first_token_ms and t.first_audio_ms for t in latencies)
    assert all(t.transcript_ms <= t.first_token_ms <= t.first_audio_ms for t in latencies)

    saved = json.loads((tmp_path / "saved" / "conversation.json").read_text())
    assert [t["role"] for t in saved["turns"]] == ["user", "agent"] * 3
    assert all((tmp_path / "saved" / t["audio"]).is_file() for t in saved["turns"])
    states = [e.state for e in events.of(StateChanged)]
    for state in (AgentState.HEARING, AgentState.TRANSCRIBING, AgentState.THINKING, AgentState.SPEAKING):
        assert state in states


def test_speaking_over_the_agent_cuts_playback_and_marks_the_turn_interrupted(
    tmp_path, chat_persona, espeak_wav, tiny_generator, smollm2_llm, faster_whisper_tiny
):
    source = QueueSource(16_000)
    sink = MemorySink(24_000, speed=1.0)  # a real-time speaker: the reply is still playing when the user cuts in
    events = Events()
    cut: dict = {}
    pipeline = Pipeline(_settings(tmp_path, chat_persona, max_audio_ms=4000, end_silence_ms=400), events,
                        source=source, sink=sink, generator=tiny_generator, llm=smollm2_llm,
                        transcriber=faster_whisper_tiny)
    question = load_audio(espeak_wav("please tell me a long story about a dragon"))
    silence = np.zeros(16_000, np.float32)
    try:
        pipeline.start()
        pipeline.wait_ready(TIMEOUT_S)
        source.push(np.concatenate([silence, question, silence]))
        events.wait_for(lambda: AgentState.SPEAKING in [e.state for e in events.of(StateChanged)], "the agent speaking")
        events.wait_for(lambda: sink.played_samples > 24_000 * 0.3, "some of the reply being played", 60)
        cut["played_before"] = sink.played_samples
        source.push(load_audio(espeak_wav("stop, wait a moment")))
        events.wait_for(lambda: events.of(AgentTurnDone), "the interrupted reply to be recorded")
        cut["played_after"] = sink.played_samples
        time.sleep(0.3)
        assert sink.played_samples == cut["played_after"]  # silent: nothing left queued
    finally:
        pipeline.stop()
    done = events.of(AgentTurnDone)[0]
    assert done.interrupted
    agent = next(t for t in pipeline.conversation.turns if t.role == "agent")
    assert agent.interrupted and agent.text == done.text
    # Only what was played is kept: less than was generated, and the sentences sum to it.
    assert agent.audio is not None and 0 < len(agent.audio) <= cut["played_after"]
    assert sum(s.samples for s in agent.sentences) == len(agent.audio)
    shown = [e.text for e in events.of(AgentText) if e.turn_id == agent.id]
    assert agent.text.startswith(shown[0])
    saved = json.loads((tmp_path / "saved" / "conversation.json").read_text())
    assert any(t["role"] == "agent" and t["interrupted"] for t in saved["turns"])


def test_interrupt_key_silences_playback_within_one_block(tmp_path, chat_persona, tiny_generator, smollm2_llm):
    sink = MemorySink(24_000, speed=1.0)
    events = Events()
    pipeline = Pipeline(_settings(tmp_path, chat_persona, max_audio_ms=4000), events, source=False, sink=sink,
                        generator=tiny_generator, llm=smollm2_llm, transcriber=object())
    try:
        pipeline.start()
        pipeline.wait_ready(TIMEOUT_S)
        pipeline.submit_text("Tell me a long story about a dragon.")
        events.wait_for(lambda: sink.played_samples > 2400, "the reply playing")
        pipeline.interrupt()
        at_interrupt = sink.played_samples
        events.wait_for(lambda: events.of(AgentTurnDone), "the reply to be recorded")
        time.sleep(0.2)
        assert sink.played_samples - at_interrupt <= 2 * sink.block_samples
    finally:
        pipeline.stop()
    assert events.of(AgentTurnDone)[0].interrupted


def test_without_csm_weights_the_agent_answers_in_text(tmp_path, chat_persona, smollm2_llm):
    events = Events()
    pipeline = Pipeline(_settings(tmp_path, chat_persona, csm_model=str(tmp_path / "no-such-model")), events,
                        source=False, sink=MemorySink(24_000, speed=None), llm=smollm2_llm, transcriber=object())
    try:
        pipeline.start()
        pipeline.wait_ready(TIMEOUT_S)
        pipeline.submit_text("Hello, who are you?")
        events.wait_for(lambda: events.of(AgentTurnDone), "a text reply")
    finally:
        pipeline.stop()
    warnings = [n for n in events.of(Notice) if n.level == "warning" and "text only" in n.message]
    assert len(warnings) == 1 and "\n" not in warnings[0].message
    assert events.of(AgentText) and events.of(AgentTurnDone)[0].text
    agent = pipeline.conversation.turns[-1]
    assert agent.role == "agent" and agent.audio is None and agent.text


def _small_window_checkpoint(tiny_checkpoint, directory, max_seq_len: int):
    """The tiny checkpoint with a shorter backbone window, so a test conversation overflows it."""
    target = directory / "tiny-window"
    shutil.copytree(tiny_checkpoint, target)
    config = json.loads((target / "config.json").read_text())
    from csm_engine.config import get_flavor

    backbone = config.get("backbone") or get_flavor("tiny").backbone.to_dict()
    backbone["max_seq_len"] = max_seq_len
    config["backbone"] = backbone
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.slow
def test_forty_turns_stay_within_the_window_with_bounded_memory(tmp_path, chat_persona, tiny_checkpoint,
                                                                 smollm2_llm):
    from csm_engine.generator import load_generator

    window = 512
    generator = RecordingGenerator(load_generator(str(_small_window_checkpoint(tiny_checkpoint, tmp_path, window)),
                                                  device="cpu", dtype="float32"))
    assert generator.config.max_seq_len == window
    events = Events()
    held: list[int] = []
    prompt_rows: list[int] = []
    pipeline = Pipeline(_settings(tmp_path, chat_persona, max_audio_ms=240), events, source=False,
                        sink=MemorySink(24_000, speed=None), generator=generator, llm=smollm2_llm,
                        transcriber=object(),
                        on_prompt=lambda context, prompt: prompt_rows.append(
                            prompt.tokens.shape[0] + prompt.max_frames))
    try:
        pipeline.start()
        pipeline.wait_ready(TIMEOUT_S)
        for i in range(40):
            pipeline.submit_text(f"Say one word about the number {i}.")
            events.wait_for(lambda n=i: len(events.of(AgentTurnDone)) > n, f"reply {i + 1}")
            held.append(pipeline.conversation.audio_turns_in_memory())
    finally:
        pipeline.stop()
    assert len(prompt_rows) >= 40 and max(prompt_rows) <= window
    report = pipeline.conversation.last_context
    assert report.dropped, "40 turns should overflow a 512-position window"
    assert max(held[20:]) <= max(held[:20]) + 2  # audio held in memory stops growing
    saved = json.loads((tmp_path / "saved" / "conversation.json").read_text())
    assert len(saved["turns"]) == 80
    assert sum(t["role"] == "user" for t in saved["turns"]) == 40
