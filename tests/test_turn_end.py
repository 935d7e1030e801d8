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
from agent.listen.turn_jobs import run_in_thread, run_when_asked
from agent.listen.turn_model import load_turn_model
from agent.listen.vad import VoiceActivityDetector, load_silero_model
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


def _judge(mode: str, turn_model, text_turn, start=run_when_asked) -> EndOfTurnJudge:
    judge = EndOfTurnJudge(TurnSettings(mode=mode), turn_model, start=start)
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
        # The pause counts from where the voice stopped (the capture path's ~22 ms later), not from where
        # Silero let go of the canceller's tail (80-150 ms after the speech).
        assert turn.t - (0.5 + len(speech) / 16_000) < 0.07, turn.t
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


class _Recorded:
    """``run_in_thread``, keeping each job it started (to see when work began, and to wait for it)."""

    def __init__(self) -> None:
        self.jobs: list = []

    def __call__(self, work):
        job = run_in_thread(work)
        self.jobs.append(job)
        return job


def _verdicts(audio: np.ndarray, silero, judge: EndOfTurnJudge, jobs: _Recorded | None = None):
    """(turns, verdicts, jobs started while a pause was still shorter than the first check)."""
    vad = VoiceActivityDetector(model=silero, end_of_turn=judge)
    turns, verdicts, early, last = [], [], 0, None
    for i in range(0, len(audio), 512):
        turns += [(round(e.t, 3), round(e.ended_t, 3)) for e in vad.feed(audio[i : i + 512]) if e.kind == "speech_end"]
        if jobs is not None and 0 < vad.pause_ms < judge.settings.first_check_ms and jobs.jobs:
            early += 1
        v = vad.last_verdict
        if v is not None and v is not last and v.reason not in ("pause", "speech"):
            last = v
            verdicts.append((v.ended, v.reason, v.probability, v.text_probability))
    return turns, verdicts, early


def _same(a: list, b: list) -> bool:
    """The same decisions, and the same answers from the models (llama.cpp's P(end) moves by a few
    hundredths with what its KV cache already held: a prefix evaluated in another batch split)."""
    close = lambda x, y: (x is None) == (y is None) and (x is None or abs(x - y) < 0.05)  # noqa: E731
    return len(a) == len(b) and all(x[:2] == y[:2] and close(x[2], y[2]) and close(x[3], y[3])
                                    for x, y in zip(a, b))


@pytest.mark.slow
def test_threaded_model_calls_start_early_and_give_the_sequential_verdicts(espeak_wav, silero, turn_model,
                                                                          text_turn):
    """Whisper starts on the tentative turn before the first check and Smart Turn runs beside it; the
    turns and verdicts are those of the one-after-the-other judge (stream time decides)."""
    clause, rest = PAUSED[0]
    streams = [np.concatenate([silence(0.5), _clip(espeak_wav, text, voice, wpm), silence(2.5)])
               for text, voice, wpm in [*QUESTIONS, ("Who wrote the book Dune?", "en-gb", 130)]]
    streams.append(np.concatenate([silence(0.5), _clip(espeak_wav, clause), silence(1.0), _clip(espeak_wav, rest),
                                   silence(2.5)]))
    reasons = set()
    for audio in streams:
        turns, verdicts, _ = _verdicts(audio, silero, _judge("smart", turn_model, text_turn))
        jobs = _Recorded()
        threaded = _verdicts(audio, silero, _judge("smart", turn_model, text_turn, jobs), jobs)
        assert turns == threaded[0] and _same(verdicts, threaded[1]), (verdicts, threaded[1])
        assert threaded[2] > 0, "the text evidence began only at the check"
        reasons |= {v[1] for v in verdicts}
    assert {"text", "unfinished"} <= reasons, reasons  # the text decided some checks, Smart Turn others


@pytest.mark.slow
def test_speaking_on_drops_the_work_started_for_the_pause(espeak_wav, turn_model, text_turn):
    """The user goes on after the text evidence for a pause began: its job is cancelled or its answer
    dropped (not kept as this turn's transcript), and the next check asks afresh."""
    audio = _clip(espeak_wav, PAUSED[0][0])
    span, jobs = (0, len(audio)), _Recorded()
    judge = _judge("smart", turn_model, text_turn, jobs)
    tentative = lambda: (span, audio)  # noqa: E731
    judge.reset()
    first = TurnSettings().first_check_ms
    assert not judge.update(first - 5, lambda: audio, tentative).ended  # before the first check: work starts
    assert len(jobs.jobs) == 1
    assert judge.update(0, lambda: audio, tentative).reason == "speech"  # the user went on
    try:
        jobs.jobs[0].result()  # it may have been running: let it finish
    except Exception:  # noqa: BLE001 - cancelled before it began
        pass
    assert text_turn.transcript_for(span) is None  # a pause that is over leaves no transcript behind
    assert not judge.update(first - 5, lambda: audio, tentative).ended  # a new pause: the text starts again
    verdict = judge.update(first, lambda: audio, tentative)
    assert len(jobs.jobs) == 3  # ... and at the check Smart Turn beside it
    assert not verdict.ended and verdict.text_probability is not None
    assert verdict.text_probability < TurnSettings().text_likely
    assert text_turn.transcript_for(span) is not None


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
