"""A pause counts from where the voice stopped: the level's fall, not Silero's late letting go.

Real espeak-ng speech in several voices and rates, clean and through the loud room's capture path
(gain, pink noise, WebRTC's canceller, the double-talk detector), then the real Silero VAD with and
without the level dating; and the dating rule itself on signals whose fall is known to the sample.
"""

from __future__ import annotations

import numpy as np
import pytest
from _clips import speech_only
from _room_helpers import play_in_room

from agent.audio import PIPELINE_RATE, load_audio
from agent.echo.room_spec import load_room, room_impulse_response
from agent.listen.pause_start import STEP, LevelHistory
from agent.listen.vad import WINDOW, VadSettings, VoiceActivityDetector, load_silero_model

SAID = [("Is the library open on Sundays?", "en-us", 150), ("Turn the music down a little.", "en-gb", 175),
        ("How many stamps do I need for a letter?", "en-us+f4", 125)]
LEAD_S, TAIL_S = 0.5, 1.0


@pytest.fixture(scope="module")
def silero():
    return load_silero_model()


@pytest.fixture(scope="module")
def spoken(espeak_wav) -> list[tuple[np.ndarray, float]]:
    """(stream, where its speech ends in s) for each of SAID."""
    out = []
    for text, voice, wpm in SAID:
        speech = speech_only(load_audio(espeak_wav(text, voice=voice, wpm=wpm)))
        stream = np.concatenate([np.zeros(int(LEAD_S * PIPELINE_RATE), np.float32), speech,
                                 np.zeros(int(TAIL_S * PIPELINE_RATE), np.float32)])
        out.append((stream, LEAD_S + len(speech) / PIPELINE_RATE))
    return out


def speech_end_ms(audio: np.ndarray, end_s: float, silero, lookback_ms: int) -> float:
    """Where the VAD's one turn over ``audio`` says the speech stopped, ms after ``end_s``."""
    vad = VoiceActivityDetector(VadSettings(end_silence_ms=400, pause_lookback_ms=lookback_ms), model=silero)
    events = [e for i in range(0, len(audio), 512) for e in vad.feed(audio[i : i + 512])] + vad.flush()
    ends = [e.t for e in events if e.kind == "speech_end"]
    assert len(ends) == 1, ends
    return (ends[0] - end_s) * 1000


@pytest.mark.parametrize("room", ["none", "office-loud"])
def test_the_pause_starts_where_the_voice_stopped_in_any_room(spoken, silero, room):
    dated, heard = [], []
    for stream, end_s in spoken:
        seconds = len(stream) / PIPELINE_RATE
        audio = stream if room == "none" else play_in_room(room, [], stream, seconds=seconds).cleaned
        dated.append(speech_end_ms(audio, end_s, silero, 192))
        heard.append(speech_end_ms(audio, end_s, silero, 0))
    # The capture path delays the voice by ~22 ms in the loud room (AEC3 and the double-talk blocks).
    path = 0.0 if room == "none" else 22.0
    for at, late in zip(dated, heard):
        assert -2 <= at - path <= 2 * STEP * 1000 / PIPELINE_RATE + 20, (dated, heard)  # within a few 8 ms steps
        assert at <= late  # never later than where Silero let go
    # Silero alone lets go a window or more after the fall, more in the loud room.
    assert np.median(heard) - np.median(dated) >= (32 if room == "none" else 60), (dated, heard)


def test_a_voice_that_reverberates_is_never_cut_before_its_direct_sound_ends(spoken, silero):
    """The user across a living room (RT60 0.6 s: the room's own impulse response, pyroomacoustics) with a
    noise floor: the tail decays over hundreds of ms, and the pause may start anywhere in it, but never
    before the voice itself stopped, and never later than Silero let go."""
    rir = room_impulse_response(load_room("living-room"))
    rng = np.random.default_rng(3)
    for stream, end_s in spoken:
        heard = np.convolve(stream, rir)[: len(stream)].astype(np.float32)
        heard += (rng.standard_normal(len(heard)) * 10 ** (-65 / 20)).astype(np.float32)
        dated, late = speech_end_ms(heard, end_s, silero, 192), speech_end_ms(heard, end_s, silero, 0)
        assert -STEP * 1000 / PIPELINE_RATE <= dated <= late, (dated, late)


def history(signal: np.ndarray, lookback_ms: int = 192) -> LevelHistory:
    levels = LevelHistory(lookback_ms * PIPELINE_RATE // 1000)
    for i in range(0, len(signal) - len(signal) % WINDOW, WINDOW):
        levels.push(signal[i : i + WINDOW], i + WINDOW)
    return levels


def tone_then_floor(tone_db: float, floor_db: float, tone_s: float, total_s: float, decay_db_per_s: float = 0.0):
    rng = np.random.default_rng(7)
    n, cut = int(total_s * PIPELINE_RATE), int(tone_s * PIPELINE_RATE)
    t = np.arange(n) / PIPELINE_RATE
    floor = rng.standard_normal(n) * 10 ** (floor_db / 20)
    tone = np.sqrt(2) * 10 ** (tone_db / 20) * np.sin(2 * np.pi * 220 * t)
    if decay_db_per_s:  # a reverberant tail after the tone: the level comes down gradually
        tone[cut:] *= 10 ** (-decay_db_per_s * (t[cut:] - t[cut]) / 20)
    else:
        tone[cut:] = 0
    return (tone + floor).astype(np.float32), cut


def silero_let_go(cut: int, windows: int) -> int:
    """The start of the window ``windows`` whole windows after the one holding sample ``cut``."""
    return (cut // WINDOW + 1 + windows) * WINDOW


def test_a_clear_fall_dates_the_pause_to_the_step():
    signal, cut = tone_then_floor(-25, -75, 0.5, 0.75)
    silent_window = silero_let_go(cut, 3)  # Silero let go three windows after the fall
    signal = signal[: silent_window + WINDOW]  # the VAD asks as soon as it has the silent window
    start = history(signal).pause_start(silent_window)
    assert 0 <= start - cut < STEP
    # The same fall further back than the look-back: not in view, so the VAD's own start stands.
    assert history(signal, lookback_ms=32).pause_start(silent_window) == silent_window


def test_speech_barely_above_the_noise_is_not_dated_back():
    signal, cut = tone_then_floor(-62, -75, 0.5, 0.75)  # 13 dB above the floor: not a clear fall
    silent_window = silero_let_go(cut, 3)
    signal = signal[: silent_window + WINDOW]
    assert history(signal).pause_start(silent_window) == silent_window


def test_a_slow_tail_is_dated_from_where_it_came_near_the_pause_level():
    signal, cut = tone_then_floor(-25, -75, 0.5, 0.75, decay_db_per_s=250)  # 10 dB every 40 ms
    silent_window = silero_let_go(cut, 5)
    signal = signal[: silent_window + WINDOW]
    start = history(signal).pause_start(silent_window)
    assert cut < start < silent_window  # after the tone stopped (the tail is still loud), before Silero let go
