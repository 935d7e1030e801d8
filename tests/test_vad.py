"""Turn detection on real espeak-ng speech: Silero VAD and push-to-talk."""

from __future__ import annotations

import numpy as np
import pytest
from _clips import audible_span

from agent.audio import PIPELINE_RATE, load_audio
from agent.errors import AgentError
from agent.listen.vad import PushToTalk, VadSettings, VoiceActivityDetector, load_silero_model


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * PIPELINE_RATE), np.float32)


def speech_bounds(clip: np.ndarray) -> tuple[float, float]:
    """Where espeak's clip is actually audible (it pads its WAVs with a little silence)."""
    start, end = audible_span(clip)
    return start / PIPELINE_RATE, (end - 1) / PIPELINE_RATE


def run(detector, audio: np.ndarray, block: int = 512):
    events = []
    for i in range(0, len(audio), block):
        events += detector.feed(audio[i : i + block])
    return events + detector.flush()


@pytest.fixture(scope="module")
def hello(espeak_wav) -> np.ndarray:
    return load_audio(espeak_wav("Hello there, how are you doing today?"))


def test_vad_finds_start_and_end_of_speech_padded_with_silence(hello):
    audio = np.concatenate([silence(1.0), hello, silence(1.5)])
    begin, end = speech_bounds(hello)
    events = run(VoiceActivityDetector(), audio, block=700)  # blocks need not be whole windows
    assert [e.kind for e in events] == ["speech_start", "speech_end"]
    start, stop = events
    assert start.t == pytest.approx(1.0 + begin, abs=0.15)
    assert stop.t == pytest.approx(1.0 + end, abs=0.25)
    assert not stop.forced
    # The turn's audio holds the whole utterance: lead-in before, a short tail after.
    assert stop.duration_s == pytest.approx(stop.t - start.t + 0.2 + 0.15, abs=0.05)


def test_two_utterances_with_a_long_pause_are_two_turns(spoken_turns_wav):
    audio = load_audio(spoken_turns_wav(["Good morning to you.", "What time is it?"], gap_s=1.5))
    events = run(VoiceActivityDetector(), audio)
    assert [e.kind for e in events] == ["speech_start", "speech_end"] * 2
    assert events[2].t - events[1].t > 1.2


def test_a_short_pause_inside_a_turn_does_not_end_it(spoken_turns_wav):
    audio = load_audio(spoken_turns_wav(["Good morning.", "What time is it?"], gap_s=0.3))
    events = run(VoiceActivityDetector(VadSettings(end_silence_ms=700)), audio)
    assert [e.kind for e in events] == ["speech_start", "speech_end"]


def test_silence_and_a_click_are_not_speech():
    click = np.zeros(int(0.5 * PIPELINE_RATE), np.float32)
    click[1000:1040] = 0.9
    assert run(VoiceActivityDetector(), np.concatenate([silence(1.0), click, silence(1.0)])) == []


def test_speech_running_to_the_end_of_input_is_flushed(hello):
    detector = VoiceActivityDetector()
    events = []
    for i in range(0, len(hello), 512):
        events += detector.feed(hello[i : i + 512])
    assert detector.speaking and len(detector.current_audio()) > 0
    ended = detector.flush()
    assert [e.kind for e in events + ended] == ["speech_start", "speech_end"]
    assert ended[0].forced and not detector.speaking


def test_max_speech_cuts_a_long_turn(hello):
    events = run(VoiceActivityDetector(VadSettings(max_speech_s=1.0)), np.concatenate([hello, silence(1.0)]))
    kinds = [e.kind for e in events]
    assert kinds[:3] == ["speech_start", "speech_end", "speech_start"] and events[1].forced


def test_reset_restarts_the_clock(hello):
    detector = VoiceActivityDetector()
    run(detector, np.concatenate([silence(0.5), hello]))
    detector.reset()
    assert detector.time_s == 0 and not detector.speaking
    events = run(detector, np.concatenate([silence(0.5), hello, silence(1.0)]))
    assert events[0].t < 1.0


def test_jit_and_onnx_runtimes_agree(espeak_wav):
    audio = np.concatenate([silence(0.3), load_audio(espeak_wav("Good morning.")), silence(0.8)])
    onnx = run(VoiceActivityDetector(model=load_silero_model(runtime="onnx")), audio)
    jit = run(VoiceActivityDetector(model=load_silero_model(runtime="jit")), audio)
    assert [(e.kind, e.t) for e in onnx] == [(e.kind, e.t) for e in jit]


def test_bad_vad_model_or_settings_are_agent_errors(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"nope")
    with pytest.raises(AgentError, match="silero-vad"):
        load_silero_model(bad, runtime="onnx")
    with pytest.raises(AgentError, match="threshold"):
        VadSettings(threshold=1.5)


def test_push_to_talk_turn_follows_the_key(hello):
    ptt = PushToTalk()
    audio = np.concatenate([silence(0.5), hello])
    events = []
    for i in range(0, len(audio), 512):
        if i == 512 * 10:
            ptt.press()
        if i == 512 * 60:
            ptt.release()
        events += ptt.feed(audio[i : i + 512])
    assert [e.kind for e in events] == ["speech_start", "speech_end"]
    assert events[0].t == pytest.approx(10 * 512 / PIPELINE_RATE)
    assert events[1].t == pytest.approx(60 * 512 / PIPELINE_RATE)
    np.testing.assert_array_equal(events[1].audio, audio[512 * 10 : 512 * 60])


def test_push_to_talk_held_at_the_end_is_flushed():
    ptt = PushToTalk()
    ptt.press()
    ptt.feed(silence(0.1))
    (event,) = ptt.flush()
    assert event.kind == "speech_end" and event.forced and event.duration_s == pytest.approx(0.1)
