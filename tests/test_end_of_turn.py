"""The end-of-turn judge over real streams: espeak-ng speech, the real Silero VAD, the real Smart Turn model.

Utterances are fixed lists, not picked per result; which ones the model gets right is reported
by ``benchmarks/turn_model.py`` (espeak's synthetic voice is far from the human and neural-TTS
speech Smart Turn was trained on, so the bars below are counts, not "every one").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from _clips import QUESTIONS, speech_only  # QUESTIONS: shared with benchmarks/turn_end.py

from agent.audio import PIPELINE_RATE, load_audio
from agent.cli import build_parser, settings_from_args
from agent.errors import AgentError
from agent.listen.end_of_turn import EndOfTurnJudge, TurnSettings, TurnVerdict
from agent.listen.turn_model import load_turn_model
from agent.listen.vad import VadEvent, VadSettings, VoiceActivityDetector, load_silero_model

# An unfinished clause, a pause, the rest of the sentence.
PAUSED_SENTENCES = [
    ("I stayed at home because", "it was raining all day."),
    ("I'd like to know, um", "the capital of France."),
    ("We could go to the beach, or", "we could stay here."),
    ("I called you because", "I need some help with my car."),
    ("Can you tell me, um", "how far away the moon is?"),
    ("I was going to say that", "the movie was great."),
    ("My plan for tomorrow is, uh", "to visit my parents."),
    ("The reason I am late is because", "the bus broke down."),
]
PAUSES_S = (0.8, 1.0, 1.2)
LEAD_S = 0.5


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * PIPELINE_RATE)), np.float32)


def question_stream(espeak_wav, text: str) -> tuple[np.ndarray, float]:
    """``text`` spoken after LEAD_S of silence, then 2.5 s of silence: (audio, speech end s)."""
    speech = speech_only(load_audio(espeak_wav(text)))
    return np.concatenate([silence(LEAD_S), speech, silence(2.5)]), LEAD_S + len(speech) / PIPELINE_RATE


def paused_stream(espeak_wav, i: int) -> tuple[np.ndarray, float, float]:
    """PAUSED_SENTENCES[i] as one stream: (audio, its clause's length s, its whole sentence's length s)."""
    first, second = (speech_only(load_audio(espeak_wav(text))) for text in PAUSED_SENTENCES[i])
    pause = PAUSES_S[i % len(PAUSES_S)]
    audio = np.concatenate([silence(LEAD_S), first, silence(pause), second, silence(2.5)])
    return audio, len(first) / PIPELINE_RATE, (len(first) + len(second)) / PIPELINE_RATE + pause


@dataclass
class StreamRun:
    events: list[VadEvent]
    verdicts: list[tuple[float, TurnVerdict]]  # (pause_ms, verdict) for every window of a turn

    @property
    def turns(self) -> list[VadEvent]:
        return [e for e in self.events if e.kind == "speech_end"]

    @property
    def answers(self) -> list[float]:
        """The model's P(done) at each time it was asked."""
        return [v.probability for _, v in self.verdicts if v.model_ms is not None]


def run_stream(audio: np.ndarray, silero, judge: EndOfTurnJudge | None, vad_settings: VadSettings | None = None):
    vad = VoiceActivityDetector(vad_settings, model=silero, end_of_turn=judge)
    events, verdicts = [], []
    for i in range(0, len(audio), 512):
        events += vad.feed(audio[i : i + 512])
        if vad.last_verdict is not None and (not verdicts or verdicts[-1][1] is not vad.last_verdict):
            verdicts.append((vad.pause_ms, vad.last_verdict))
    return StreamRun(events + vad.flush(), verdicts)


def checks_ms(settings: TurnSettings | None = None, offset_ms: float = 0.0) -> list[float]:
    """The pauses at which the judge asks its models before ``max_silence_ms``: the VAD asks on 32 ms
    windows, and the pause began ``offset_ms`` (0-32 ms, 8 ms steps) before a window's end, where the
    level fell."""
    s, checks, due = settings or TurnSettings(), [], (settings or TurnSettings()).first_check_ms
    for pause in np.arange(offset_ms or 32.0, s.max_silence_ms, 32.0):
        if pause >= due:
            checks.append(pause)
            while due <= pause:
                due += s.recheck_ms
    return checks


@pytest.fixture(scope="module")
def silero():
    return load_silero_model()


@pytest.fixture(scope="module")
def smart(silero):
    return EndOfTurnJudge(TurnSettings(), load_turn_model())


@pytest.fixture(scope="module")
def question_runs(espeak_wav, silero, smart):
    """Each question spoken after LEAD_S of silence, then 2.5 s of silence: (speech end s, run)."""
    runs = []
    for text in QUESTIONS:
        audio, speech_end_s = question_stream(espeak_wav, text)
        runs.append((speech_end_s, run_stream(audio, silero, smart)))
    return runs


@pytest.fixture(scope="module")
def paused_audio(espeak_wav):
    """Each paused sentence as one stream, with its clause's and its whole sentence's length (s)."""
    return [paused_stream(espeak_wav, i) for i in range(len(PAUSED_SENTENCES))]


@pytest.fixture(scope="module")
def paused_runs(paused_audio, silero, smart):
    return [run_stream(audio, silero, smart) for audio, _, _ in paused_audio]


@pytest.mark.slow
def test_complete_questions_are_judged_done_at_the_first_check(question_runs):
    done_at_once = [run for _, run in question_runs if run.answers and run.answers[0] >= 0.5]
    assert len(done_at_once) >= 10, [run.answers[:3] for _, run in question_runs]
    first = TurnSettings().first_check_ms / 1000  # ... asked at the first VAD window (32 ms) past it
    assert all(first - 1e-9 <= run.turns[0].ended_t - run.turns[0].t < first + 0.032 for run in done_at_once)


@pytest.mark.slow
def test_end_of_speech_to_turn_ended_has_a_median_under_300_ms(question_runs):
    """Stream time from the last audible sample of each question to the judge's end of turn."""
    delays = [run.turns[0].ended_t - speech_end for speech_end, run in question_runs]
    assert all(d > 0 for d in delays)
    assert np.median(delays) <= 0.300, sorted(round(d, 3) for d in delays)


@pytest.mark.slow
def test_unfinished_clauses_are_judged_not_done(paused_runs):
    first_answers = [run.answers[0] for run in paused_runs]
    assert sum(p < 0.5 for p in first_answers) >= 6, first_answers


@pytest.mark.slow
def test_a_mid_sentence_pause_is_one_turn_with_smart_and_two_with_silence(paused_audio, paused_runs, silero):
    whole = 0
    for (audio, clause_s, sentence_s), run in zip(paused_audio, paused_runs):
        fixed = run_stream(audio, silero, None, VadSettings(end_silence_ms=600))
        assert len(fixed.turns) == 2 and fixed.turns[0].duration_s < clause_s + 0.5
        if len(run.turns) == 1 and run.turns[0].duration_s >= sentence_s:
            whole += 1
    assert whole >= 6, [len(run.turns) for run in paused_runs]


@pytest.mark.slow
def test_waiting_is_shown_while_unfinished_and_speech_resuming_continues_the_turn(paused_runs):
    run = paused_runs[2]  # "We could go to the beach, or [1.2 s] we could stay here."
    pauses, current = [], []  # the verdicts of each pause, split where speech resumes
    for pause_ms, verdict in run.verdicts:
        if pause_ms > 0:
            current.append((pause_ms, verdict))
        elif current:
            pauses.append((current, verdict))
            current = []
    long_pause, resumed = next((p, r) for p, r in pauses if any(v.model_ms is not None for _, v in p))
    asked = [pause_ms for pause_ms, v in long_pause if v.model_ms is not None]
    offset = long_pause[0][0] % 32 or 32.0
    assert asked[:3] == pytest.approx(checks_ms(offset_ms=offset)[:3])  # first check, then every 300 ms
    assert all(v.waiting and v.reason == "unfinished" for pause_ms, v in long_pause if pause_ms >= asked[0])
    assert resumed.reason == "speech" and not resumed.waiting and len(run.turns) == 1


@pytest.mark.slow
def test_max_silence_ends_a_turn_the_model_keeps_judging_unfinished(espeak_wav, silero, smart):
    clause = speech_only(load_audio(espeak_wav("The reason I am late is because")))
    run = run_stream(np.concatenate([silence(LEAD_S), clause, silence(3.0)]), silero, smart)
    (turn,) = run.turns
    offset = next(pause for pause, _ in run.verdicts if pause > 0) % 32 or 32.0
    assert max(run.answers) < 0.5 and len(run.answers) == len(checks_ms(offset_ms=offset))  # e.g. 224, 544, ... ms
    assert run.verdicts[-1][1].reason == "max_silence" and 2.0 <= turn.ended_t - turn.t < 2.032


def test_silence_mode_reproduces_the_fixed_pause_rule(spoken_turns_wav, silero):
    audio = load_audio(spoken_turns_wav(["Good morning to you.", "What time is it?"], gap_s=0.7))
    for end_silence_ms in (300, 600):
        fixed = run_stream(audio, silero, None, VadSettings(end_silence_ms=end_silence_ms))
        judged = run_stream(audio, silero, EndOfTurnJudge(TurnSettings(mode="silence", end_silence_ms=end_silence_ms)))
        assert [(e.kind, e.t, e.ended_t, e.forced) for e in judged.events] == \
               [(e.kind, e.t, e.ended_t, e.forced) for e in fixed.events]
        for a, b in zip(judged.turns, fixed.turns):
            np.testing.assert_array_equal(a.audio, b.audio)
        assert len(fixed.turns) == 2


def test_turn_options_reach_the_settings_and_bad_ones_are_one_line_errors(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('turn = "silence"\nturn_threshold = 0.6\n', encoding="utf-8")
    settings = settings_from_args(build_parser().parse_args(["--config", str(config)]))
    assert settings.turn_settings() == TurnSettings(mode="silence", threshold=0.6)
    settings = settings_from_args(build_parser().parse_args(["--config", str(config), "--turn", "smart"]))
    assert settings.turn_settings().mode == "smart"
    with pytest.raises(AgentError, match="between 0 and 1"):
        settings_from_args(build_parser().parse_args(["--config", str(config), "--turn-threshold", "1.5"]))
    with pytest.raises(AgentError, match="first check"):
        TurnSettings(first_check_ms=3000, max_silence_ms=2000)
