"""Playback without gaps: the voice stage holds a sentence until it can play through.

A generator paced at a fixed real-time factor replays audio the tiny random CSM really made, so
the timing is exact whatever else this machine is doing; the speaker is a real-time in-memory
sink that counts the silence it had to insert inside a sentence.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from _stage_helpers import context, run_stage

from agent.audio import MemorySink
from agent.config.personas import load_persona
from agent.conversation.conversation import CSM_RATE, Conversation
from agent.frames import AgentSentence, EndOfReply, Reply
from agent.speak.playback import GenerationSpeed, PlaybackPlanner, PlaybackPolicy
from agent.stages.loading import Models
from agent.stages.voice import VoiceStage

SENTENCE = "This is a rather long sentence about the weather up in the mountains today."
SECOND = "And the valley below it is still warm and green."
TEXTS = [SENTENCE, SECOND]
BUDGET_MS = 2000  # the tiny random CSM speaks until its budget: 25 frames, 2.0 s


class PacedGenerator:
    """The tiny Generator's real output for each text, replayed at ``rtf`` x the audio's duration."""

    def __init__(self, generator, rtf: float, made: dict[str, tuple[list[np.ndarray], list]]) -> None:
        self._generator = generator
        self.rtf = rtf
        self._made = made  # text -> (chunks, frames) the real generator made for it
        self.calls: list[dict] = []  # per stream(): when it was called and when each chunk arrived

    def __getattr__(self, name):
        return getattr(self._generator, name)

    def stream(self, text, speaker, context=(), *, on_frame=None, cancel=None, **kwargs):
        chunks, frames = self._made[text]
        call = {"called": time.monotonic(), "arrivals": [], "offsets": []}
        self.calls.append(call)
        made_s = 0.0
        for frame in frames:
            if on_frame is not None:
                on_frame(*frame)
        for chunk in chunks:
            made_s += len(chunk) / CSM_RATE
            due = call["called"] + made_s * self.rtf
            while time.monotonic() < due:
                if cancel is not None and cancel.is_set():
                    return
                time.sleep(min(0.005, max(0.0, due - time.monotonic())))
            call["arrivals"].append(time.monotonic())
            call["offsets"].append(made_s - len(chunk) / CSM_RATE)
            yield chunk


@pytest.fixture(scope="module")
def made(tiny_generator) -> dict:
    """Each test sentence as the tiny CSM really says it (at the test's budget), made once."""
    result = {}
    for text in TEXTS:
        frames: list = []
        chunks = list(tiny_generator.stream(text, 0, max_audio_length_ms=BUDGET_MS, seed=11,
                                            on_frame=lambda i, codes, frames=frames: frames.append((i, codes))))
        result[text] = (chunks, frames)
    return result


def _speak(generator, persona_path, texts: list[str]) -> tuple[VoiceStage, MemorySink]:
    ctx, _ = context()
    sink = MemorySink(CSM_RATE, speed=1.0)
    conversation = Conversation("tester", 0)
    conversation.add_user_turn("Tell me about the weather.", None)
    stage = VoiceStage(ctx, Models(generator=generator, sink=sink).mark_ready(), conversation,
                       load_persona(str(persona_path)), max_audio_ms=BUDGET_MS, seed=11)
    reply = Reply(2, time.monotonic())
    ctx.replies.begin(reply)
    run_stage(stage, [AgentSentence(reply, t, t) for t in texts] + [EndOfReply(reply)], timeout=120)
    assert reply.done.is_set() and not reply.cancelled
    return stage, sink


def _shortest_gapless_delay(call: dict) -> float:
    """The earliest start (after stream() was called) at which every chunk arrives before it is due."""
    return max(arrival - call["called"] - offset for arrival, offset in zip(call["arrivals"], call["offsets"]))


def test_faster_than_real_time_starts_with_the_first_chunk(tiny_generator, chat_persona, made):
    paced = PacedGenerator(tiny_generator, 0.5, made)
    stage, sink = _speak(paced, chat_persona, [SENTENCE])
    call = paced.calls[0]
    first_chunk_s = call["arrivals"][0] - call["called"]
    assert stage.start_delays[0] <= first_chunk_s + 0.05  # released with the first chunk (2 frames)
    assert sink.underruns == 0
    sink.close()


@pytest.mark.parametrize("rtf", [1.5, 3.0])
def test_slower_than_real_time_plays_each_sentence_without_a_gap(tiny_generator, chat_persona, made, rtf):
    paced = PacedGenerator(tiny_generator, rtf, made)
    stage, sink = _speak(paced, chat_persona, TEXTS)
    assert sink.underruns == 0 and sink.underrun_s == 0.0
    for call, delay in zip(paced.calls, stage.start_delays):
        shortest = _shortest_gapless_delay(call)
        assert shortest > 0.2  # the case is real: starting at once would have had a gap
        assert delay <= 1.25 * shortest, (delay, shortest)
    turn = stage.conversation.turns[-1]
    assert turn.timings["underruns"] == 0 and "first_audio_ms" in turn.timings
    sink.close()


def test_without_holding_back_a_slow_generator_does_leave_gaps(tiny_generator, chat_persona, made):
    # The same run with the planner told that sentences are 0 s long starts at once: the sink
    # counts the gaps this issue is about (so the test above can fail).
    paced = PacedGenerator(tiny_generator, 1.5, made)
    ctx, _ = context()
    sink = MemorySink(CSM_RATE, speed=1.0)
    conversation = Conversation("tester", 0)
    stage = VoiceStage(ctx, Models(generator=paced, sink=sink).mark_ready(), conversation,
                       load_persona(str(chat_persona)), max_audio_ms=BUDGET_MS, seed=11)
    stage.planner = PlaybackPlanner(PlaybackPolicy(lead_s=0.0, chars_per_s=1e9))
    reply = Reply(2, time.monotonic())
    ctx.replies.begin(reply)
    run_stage(stage, [AgentSentence(reply, SENTENCE, SENTENCE), EndOfReply(reply)], timeout=120)
    assert sink.underruns >= 1 and sink.underrun_s > 0.2
    assert conversation.turns[-1].timings["underruns"] == sink.underruns
    sink.close()


def test_generation_speed_is_audio_per_wall_second():
    speed = GenerationSpeed(window=3)
    assert speed.speed is None
    for _ in range(5):
        speed.add(0.16, 0.32)
    assert speed.speed == pytest.approx(0.5)


def test_the_speaking_rate_is_learnt_from_finished_sentences():
    planner = PlaybackPlanner(PlaybackPolicy(chars_per_s=14.0, learn_rate=0.5, lead_s=0.3))
    before = planner.expected_length_s("x" * 70)
    planner.learn("x" * 70, 0.3 + 70 / 28.0)  # a fast talker: 28 characters a second
    assert planner.chars_per_s == pytest.approx(21.0)
    assert planner.expected_length_s("x" * 70) < before
