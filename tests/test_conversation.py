"""Conversation: turns, CSM context trimming, LLM history, atomic save and validated load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agent.conversation.conversation import JSON_NAME, Conversation, Sentence
from agent.errors import AgentError
from csm_engine.tokens import Segment


def _tone(seconds: float, rate: int, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _measure(segment: Segment) -> int:
    """A stand-in for Generator.segment_frames: 1 row per word + 1 per 80 ms of audio + end frame."""
    rows = len(segment.text.split()) + 2
    if segment.audio is not None:
        rows += -(-segment.audio.numel() // 1920) + 1
    return rows


def _conversation(turns: int = 6) -> Conversation:
    conversation = Conversation("default", agent_speaker=0)
    for i in range(turns):
        conversation.add_user_turn(f"user says number {i} here", _tone(0.8, 16_000))
        audio = _tone(0.48, 24_000)
        conversation.add_agent_turn([Sentence(f"agent reply {i}.", len(audio))], audio)
    return conversation


def test_user_and_agent_get_their_speaker_ids():
    conversation = _conversation(1)
    assert [t.speaker for t in conversation.turns] == [1, 0]
    assert Conversation("x", agent_speaker=1).user_speaker == 0


def test_context_holds_every_turn_with_audio_when_it_fits():
    conversation = _conversation(3)
    voice = Segment(0, "voice clip words", torch.zeros(24_000))
    context, report = conversation.csm_context(voice, 10_000, _measure)
    assert context[0] is voice
    assert [s.text for s in context[1:]] == [t.text for t in conversation.turns]
    assert all(s.audio is not None for s in context)
    assert report.dropped == () and report.text_only == ()
    assert report.rows == sum(_measure(s) for s in context)


def test_user_audio_is_resampled_to_24k_for_csm():
    conversation = _conversation(1)
    segment = conversation.turns[0].csm_segments()[0]
    assert segment.audio.numel() == int(0.8 * 24_000)


def test_context_segments_are_the_same_tensors_every_turn():
    conversation = _conversation(2)
    first, _ = conversation.csm_context(None, 10_000, _measure)
    conversation.add_user_turn("one more", _tone(0.5, 16_000))
    second, _ = conversation.csm_context(None, 10_000, _measure)
    assert all(a is b for a, b in zip(first, second))  # an unchanged prefix: the engine's cache can hit
    assert len(second) == len(first) + 1


def test_trimming_drops_oldest_audio_first_then_oldest_turns():
    conversation = _conversation(6)
    voice = Segment(0, "voice", torch.zeros(48_000))
    full = sum(_measure(s) for s in conversation.csm_context(voice, 10_000, _measure)[0])
    # Room for everything as text but not for all the audio: the oldest turns become text-only.
    context, report = conversation.csm_context(voice, full - 20, _measure)
    assert context[0] is voice and report.voice_kept
    assert report.rows <= full - 20
    assert report.text_only and not report.dropped
    assert min(report.with_audio) > max(report.text_only)  # the newest turns keep their audio
    assert [s.text for s in context[1:]] == [t.text for t in conversation.turns]  # all text kept
    # Much less room: the oldest turns go entirely; the newest stays.
    context, report = conversation.csm_context(voice, 40, _measure)
    assert report.dropped and report.dropped[0] == 1
    assert context[-1].text == conversation.turns[-1].text
    assert report.rows <= 40


def test_trimming_cut_points_only_move_forward():
    conversation = _conversation(6)
    budget = 90
    _, first = conversation.csm_context(None, budget, _measure)
    conversation.add_user_turn("short", None, typed=True)
    _, second = conversation.csm_context(None, budget, _measure)
    assert set(first.dropped) <= set(second.dropped)
    assert second.rows <= budget
    # Trimming leaves headroom, so the next small turn does not move the cut again.
    assert first.dropped == second.dropped and first.with_audio == second.with_audio


def test_voice_that_cannot_fit_is_left_out_rather_than_the_conversation():
    conversation = _conversation(1)
    voice = Segment(0, "voice", torch.zeros(24_000 * 60))
    context, report = conversation.csm_context(voice, 50, _measure)
    assert not report.voice_kept and context and context[0] is not voice


def test_llm_messages_alternate_after_the_system_prompt_and_stay_bounded():
    conversation = _conversation(30)
    messages = conversation.llm_messages("Be brief.", max_chars=300)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    roles = [m["role"] for m in messages[1:]]
    assert roles[0] == "user" and all(a != b for a, b in zip(roles, roles[1:]))
    assert sum(len(m["content"]) for m in messages[1:]) <= 300
    assert messages[-1]["content"] == "agent reply 29."


def test_llm_messages_merge_a_user_turn_left_without_reply():
    conversation = Conversation()
    conversation.add_user_turn("first", None, typed=True)
    conversation.add_agent_turn([], None, interrupted=True)  # cut off before it said anything
    conversation.add_user_turn("second", None, typed=True)
    assert conversation.llm_messages("s")[1:] == [{"role": "user", "content": "first second"}]


def test_save_writes_one_wav_per_turn_and_loads_back(tmp_path):
    conversation = _conversation(2)
    conversation.add_user_turn("typed words", None, typed=True)
    conversation.save(tmp_path / "conv")
    names = sorted(p.name for p in (tmp_path / "conv").iterdir())
    assert names == [JSON_NAME, "turn-0001-user.wav", "turn-0002-agent.wav", "turn-0003-user.wav",
                     "turn-0004-agent.wav"]
    loaded = Conversation.load(tmp_path / "conv" / JSON_NAME)
    assert [(t.role, t.text, t.speaker, t.typed) for t in loaded.turns] == [
        (t.role, t.text, t.speaker, t.typed) for t in conversation.turns]
    assert loaded.turns[0].sample_rate == 16_000 and loaded.turns[1].sample_rate == 24_000
    np.testing.assert_allclose(loaded.turns[1].audio, conversation.turns[1].audio, atol=1e-4)
    assert loaded.turns[1].sentences[0].samples == len(conversation.turns[1].audio)


def test_save_after_every_turn_leaves_no_temp_files_and_keeps_earlier_wavs(tmp_path):
    conversation = _conversation(1)
    conversation.save(tmp_path)
    before = (tmp_path / "turn-0001-user.wav").stat().st_mtime_ns
    conversation.add_user_turn("again", _tone(0.3, 16_000))
    conversation.save()
    assert (tmp_path / "turn-0001-user.wav").stat().st_mtime_ns == before  # written once
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(json.loads((tmp_path / JSON_NAME).read_text())["turns"]) == 3


def test_released_audio_is_reloaded_when_saving_elsewhere(tmp_path):
    conversation = _conversation(6)
    conversation.save(tmp_path / "a")
    conversation.csm_context(None, 40, _measure)  # trims: old turns leave the context
    assert conversation.release_old_audio() > 0
    assert conversation.audio_turns_in_memory() < len(conversation)
    conversation.save(tmp_path / "b")
    copy = Conversation.load(tmp_path / "b")
    assert all(t.audio is not None for t in copy.turns)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something else"}', "not a csm-chat conversation"),
        ('{"format": "csm-chat-conversation", "version": 99, "turns": []}', "upgrade csm-chat"),
        ('{"format": "csm-chat-conversation", "version": 1, "turns": [{"role": "bot", "text": "x"}]}', "'role'"),
    ],
)
def test_broken_transcripts_are_one_line_errors(tmp_path, content, message):
    (tmp_path / JSON_NAME).write_text(content)
    with pytest.raises(AgentError, match=message) as error:
        Conversation.load(tmp_path)
    assert "\n" not in str(error.value)


def test_missing_turn_wav_is_named(tmp_path):
    _conversation(1).save(tmp_path)
    (tmp_path / "turn-0002-agent.wav").unlink()
    with pytest.raises(AgentError, match="turn-0002-agent.wav is missing"):
        Conversation.load(tmp_path)


def test_loading_a_missing_transcript_names_the_fix(tmp_path):
    with pytest.raises(AgentError, match="--save"):
        Conversation.load(tmp_path / "nothing")
