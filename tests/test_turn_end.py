"""Turn end from the transcript's own evidence (``agent.listen.text_turn``) with Smart Turn, and the
reply started early on the tentative words (``agent.stages.early_reply``).

Real parts: espeak-ng speech, Silero VAD, Smart Turn, Whisper tiny.en, SmolLM2; a loud room is the
simulated room with WebRTC's canceller (``tests/_room_helpers.py``), where Smart Turn alone waits
for the 2 s limit (issue 23). How often each rule is right over 60 utterances and three rooms is
``benchmarks/turn_end.py``'s job; these check the behaviour on a few.
"""

from __future__ import annotations

import numpy as np
import pytest
from _clips import speech_only
from _room_helpers import play_in_room
from _stage_helpers import EventLog, converse
from test_end_of_turn import run_stream, silence

from agent.audio import MemorySink, load_audio, write_wav
from agent.config.settings import AgentSettings
from agent.events import UserTurn
from agent.listen.end_of_turn import EndOfTurnJudge, TurnSettings
from agent.listen.text_turn import TextTurn, end_of_message_probability, normalize
from agent.listen.turn_model import load_turn_model
from agent.listen.vad import load_silero_model
from agent.pipeline import Pipeline
from agent.stages.early_reply import EarlyReply, EarlyServed, prompt_with

ROOM = "living-room-loud"
LIMIT_S = TurnSettings().max_silence_ms / 1000
QUESTIONS = [("What is the capital of France?", "en-gb", 130), ("How are you doing today?", "en-us", 175)]
PAUSED = [("I stayed at home because", "it was raining all day."),
          ("We could go to the beach, or", "we could stay here.")]


@pytest.fixture(scope="module")
def silero():
    return load_silero_model()


@pytest.fixture(scope="module")
def turn_model():
    return load_turn_model()


@pytest.fixture(scope="module")
def text_turn(faster_whisper_tiny, smollm2_llm):
    return TextTurn(lambda: faster_whisper_tiny, lambda: smollm2_llm)


def _judge(mode: str, turn_model, text_turn) -> EndOfTurnJudge:
    judge = EndOfTurnJudge(TurnSettings(mode=mode), turn_model)
    judge.use_text(text_turn)
    return judge


def _in_room(audio: np.ndarray) -> np.ndarray:
    return play_in_room(ROOM, [], audio, seconds=len(audio) / 16_000).cleaned[: len(audio)]


def _clip(espeak_wav, text: str, voice: str = "en-us", wpm: int = 160) -> np.ndarray:
    return speech_only(load_audio(espeak_wav(text, voice=voice, wpm=wpm)))


def test_the_transcript_scores_a_finished_question_above_an_unfinished_clause(smollm2_llm):
    assert normalize("What's the capital of France?") == "what's the capital of france"
    done = end_of_message_probability(smollm2_llm, "What is the capital of France?")
    clause = end_of_message_probability(smollm2_llm, "I stayed at home because")
    assert done is not None and clause is not None
    assert done >= TurnSettings().text_done > TurnSettings().text_likely > clause, (done, clause)
    assert end_of_message_probability(smollm2_llm, " ?! ") is None  # no words, no evidence


@pytest.mark.slow
def test_questions_in_a_loud_room_end_at_the_first_check_not_at_the_limit(espeak_wav, silero, turn_model,
                                                                          text_turn):
    smart, reasons = _judge("smart", turn_model, text_turn), []
    for text, voice, wpm in QUESTIONS:
        speech = _clip(espeak_wav, text, voice, wpm)
        run = run_stream(_in_room(np.concatenate([silence(0.5), speech, silence(2.5)])), silero, smart)
        (turn,) = run.turns
        reasons.append(run.verdicts[-1][1].reason)
        assert turn.ended_t - turn.t < LIMIT_S / 4, (text, run.verdicts[-1])  # the first check, not the 2 s limit
    assert "text" in reasons, reasons  # the transcript ended at least one (its own evidence, no audio model call)


@pytest.mark.slow
def test_a_mid_sentence_pause_stays_one_turn_in_the_loud_room(espeak_wav, silero, turn_model, text_turn):
    smart = _judge("smart", turn_model, text_turn)
    for clause, rest in PAUSED:
        first, second = _clip(espeak_wav, clause), _clip(espeak_wav, rest)
        audio = np.concatenate([silence(0.5), first, silence(1.0), second, silence(2.5)])
        run = run_stream(_in_room(audio), silero, smart)
        texts = [v.text_probability for _, v in run.verdicts if v.text_ms is not None]
        assert len(run.turns) == 1, (clause, texts)
        assert texts and texts[0] < TurnSettings().text_likely  # the clause itself was judged unfinished


def test_an_early_reply_is_served_only_for_its_own_prompt(smollm2_llm):
    messages = prompt_with([{"role": "system", "content": "Be brief."}], "Name a colour.")
    assert messages[-1] == {"role": "user", "content": "Name a colour."}
    early = EarlyReply.start(smollm2_llm, messages, smollm2_llm.sampling)
    served = EarlyServed(smollm2_llm, early)
    assert "".join(served.stream_reply(messages, sampling=smollm2_llm.sampling)).strip()
    assert served.served and not early.discarded
    other = EarlyReply.start(smollm2_llm, messages, smollm2_llm.sampling)
    changed = prompt_with(messages[:1], "Name a fruit.")
    reply = "".join(EarlyServed(smollm2_llm, other).stream_reply(changed, sampling=smollm2_llm.sampling))
    assert other.discarded and reply.strip()  # a different prompt: the early one is dropped, the LLM runs


def _settings(tmp_path, persona, mic, **changes) -> AgentSettings:
    values = dict(csm_model=str(tmp_path / "no-csm"), persona=str(persona), save_dir=str(tmp_path / "saved"),
                  headless=True, watermark=False, seed=3, device="cpu", mic_file=str(mic), realtime=False)
    values.update(changes)
    return AgentSettings(**values)


@pytest.mark.slow
@pytest.mark.parametrize("tools", [False, True])
def test_the_reply_started_at_a_pause_is_discarded_when_the_user_goes_on(tmp_path, chat_persona, espeak_wav,
                                                                          smollm2_llm, faster_whisper_tiny, tools):
    clause, rest = PAUSED[0]
    mic = write_wav(tmp_path / "mic.wav", np.concatenate(
        [silence(0.5), _clip(espeak_wav, clause), silence(1.2), _clip(espeak_wav, rest), silence(3.0)]), 16_000)
    events = EventLog()
    pipeline = Pipeline(_settings(tmp_path, chat_persona, mic, tools=tools), events,
                        sink=MemorySink(24_000, speed=None), llm=smollm2_llm, transcriber=faster_whisper_tiny)
    converse(pipeline, events, 300.0)
    text_turn = pipeline.models.text_turn
    (turn,) = events.of(UserTurn)  # one turn: the whole sentence
    assert "home" in turn.text.lower() and "rain" in turn.text.lower(), turn.text
    if tools:
        assert pipeline.services.tools_on and text_turn.early_started == 0  # the tool loop must see the final words
    else:
        assert text_turn.early_started >= 1 and text_turn.early_discarded >= 1  # started at the pause, then dropped
        assert pipeline.think.conversation.turns[-1].role == "agent"  # the real reply, on the whole sentence
