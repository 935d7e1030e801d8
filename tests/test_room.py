"""The simulated room: specs, presets and room files, its RIRs, and the echo it puts into the mic."""

from __future__ import annotations

import numpy as np
import pytest

from agent.audio import PIPELINE_RATE, MemorySink, load_audio, resample
from agent.audio.timeline import PlayedTimeline
from agent.echo.room import PRESETS, BlockConvolver, RoomSpec, SimulatedRoom, load_room, room_impulse_response
from agent.errors import AgentError


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ---- specs, presets, room files


def test_presets_cover_both_reverberation_times_and_the_loud_variants():
    assert {PRESETS["office"].rt60_s, PRESETS["living-room"].rt60_s} == {0.25, 0.6}
    for name in ("office", "living-room"):
        loud, plain = PRESETS[f"{name}-loud"], PRESETS[name]
        assert loud.rt60_s == plain.rt60_s
        assert (loud.echo_gain_db - loud.user_gain_db) - (plain.echo_gain_db - plain.user_gain_db) == 10.0


def test_room_file_starts_from_a_preset_and_changes_what_it_lists(tmp_path):
    path = tmp_path / "den.toml"
    path.write_text('preset = "living-room"\nrt60-s = 0.4\ndistance_m = 1.2\nnoise = "white"\nseed = 3\n')
    spec = load_room(str(path))
    assert (spec.rt60_s, spec.distance_m, spec.noise, spec.seed) == (0.4, 1.2, "white", 3)
    assert spec.dims_m == PRESETS["living-room"].dims_m and spec.name == str(path)
    assert spec.echo_delay_ms == pytest.approx(80.0 + 1200.0 / 343.0)


@pytest.mark.parametrize("content, message", [
    ("rt60_s = 7.0", "rt60_s = 7 is out of range: use 0.05 to 2 seconds"),
    ("rt60_s = \"long\"", "rt60_s = 'long' must be a number"),
    ("dims_m = [4, 3]", "dims_m = [4, 3] must be three numbers in metres"),
    ("noise = \"brown\"", "noise = 'brown' is unknown: use one of pink, white, none"),
    ("echo-gain = 3", "unknown key 'echo-gain': known keys are preset, dims_m"),
    ("preset = \"cave\"", "preset = 'cave' is unknown: use one of office"),
    ("mic_pos_m = [9.0, 1.0, 1.0]", "mic_pos_m = [9.0, 1.0, 1.0] is not inside the room"),
    ("rt60_s = 0.4\n[extra", "is not valid TOML"),
])
def test_bad_room_files_are_one_line_errors_naming_the_fix(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(AgentError) as error:
        load_room(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_room_name_lists_the_presets():
    with pytest.raises(AgentError, match="unknown room 'attic': use a preset \\(office, living-room"):
        load_room("attic")


def test_a_room_too_large_for_its_reverberation_time_is_refused():
    with pytest.raises(AgentError, match="cannot reverberate"):
        room_impulse_response(RoomSpec(name="hall", dims_m=(30.0, 30.0, 10.0), rt60_s=0.05, distance_m=1.0))


# ---- impulse responses


@pytest.mark.parametrize("name", ["office", "living-room"])
def test_rir_has_the_asked_rt60_unit_energy_and_the_direct_sound_at_its_air_delay(name):
    import pyroomacoustics as pra

    spec = PRESETS[name]
    rir = room_impulse_response(spec)
    measured = pra.experimental.measure_rt60(rir, fs=PIPELINE_RATE)
    assert measured == pytest.approx(spec.rt60_s, rel=0.05)
    assert float(np.sum(rir.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-4)
    air_samples = spec.distance_m / 343.0 * PIPELINE_RATE
    assert abs(int(np.argmax(np.abs(rir))) - air_samples) <= 2


def test_block_convolver_matches_full_convolution_across_silences():
    rng = np.random.default_rng(1)
    response = rng.standard_normal(3000)
    x = rng.standard_normal(512 * 30)
    x[512 * 5 : 512 * 20] = 0.0  # long enough for the convolver to skip work, then start again
    convolver = BlockConvolver(response, 512)
    y = np.concatenate([convolver.process(x[i : i + 512]) for i in range(0, len(x), 512)])
    np.testing.assert_allclose(y, np.convolve(x, response)[: len(x)], atol=1e-4)


# ---- the played timeline


def test_timeline_places_blocks_by_play_time_and_reads_gaps_as_silence():
    timeline = PlayedTimeline(16_000)
    first = np.ones(320, np.float32)
    timeline.add(first, 16_000, 10.0)
    timeline.add(first * 2, 16_000, 10.0 + 0.02 + 0.004)  # 4 ms of jitter: continues the run
    timeline.add(first * 3, 16_000, 11.0)  # a second later: a new run after silence
    out = timeline.read(160_000 - 100, 16_000 + 500)
    assert np.all(out[:100] == 0) and np.all(out[100:420] == 1) and np.all(out[420:740] == 2)
    assert np.all(out[740:16_100] == 0) and np.all(out[16_100:16_420] == 3)


def test_timeline_resamples_each_run_without_losing_time():
    timeline = PlayedTimeline(16_000)
    x = tone(440, 1.0, 24_000)
    for i in range(0, len(x), 480):  # 20 ms blocks at 24 kHz
        timeline.add(x[i : i + 480], 24_000, 5.0 + i / 24_000)
    y = timeline.read(80_000, 16_000)
    # The run is resampled as one signal (no clicks, no drift); only the look-ahead tail waits.
    np.testing.assert_allclose(y[:15_950], resample(x, 24_000, 16_000)[:15_950], atol=1e-4)


def test_a_device_timeline_never_places_a_block_before_it_came():
    timeline, lead = PlayedTimeline(16_000), 480  # a 30 ms buffer
    block = np.ones(320, np.float32)
    first = timeline.add(block, 16_000, 10.0, lead=lead)
    assert first == 160_000 + lead  # the first block plays once the buffer has it
    on_time = timeline.add(block * 2, 16_000, 10.0 + 0.02 + 0.004, lead=lead)  # came before the run ran out
    assert on_time == first + 320
    late = timeline.add(block * 3, 16_000, 10.08, lead=lead)  # came 10 ms after the run ran out (10.07 s)
    assert late == 161_280 + lead  # not snapped back to the run's end (161_120): never before it came
    out = timeline.read(first, late + 320 - first)
    assert np.all(out[:320] == 1) and np.all(out[320:640] == 2) and np.all(out[640 : late - first] == 0)
    assert np.all(out[late - first :] == 3)


# ---- the room as a microphone


def _echo_only_run(spec: RoomSpec, far: np.ndarray, *, realtime: bool) -> tuple[np.ndarray, np.ndarray]:
    """Play ``far`` (16 kHz) after 0.25 s; return (mic, what was played on the mic's timeline)."""
    room = SimulatedRoom(spec, realtime=realtime)
    sink = MemorySink(PIPELINE_RATE, speed=1.0 if realtime else None)
    sink.add_listener(room.hear)
    played = PlayedTimeline(PIPELINE_RATE)
    room.add_listener(lambda x, rate, at: played.add(x, rate, at, lead=0))  # exactly where the room placed it
    blocks = []
    try:
        room.start()
        for i in range(int((len(far) / PIPELINE_RATE + 0.75) * PIPELINE_RATE / 512)):
            if i == 8:
                sink.write(far, PIPELINE_RATE)
                if not realtime:  # paced: the room must hear it all before it moves on
                    sink.wait_idle(timeout=10.0)
            blocks.append(room.read(timeout=2.0))
    finally:
        sink.close()
        room.stop()
    mic = np.concatenate(blocks)
    origin = int(round(room.clock() * PIPELINE_RATE)) - len(mic)
    return mic, played.read(origin, len(mic))


@pytest.mark.parametrize("realtime", [False, True])
def test_echo_arrives_after_the_device_delay_at_the_set_level(realtime, espeak_wav):
    spec = RoomSpec(name="test", rt60_s=0.25, device_delay_ms=120.0, echo_gain_db=-6.0, noise="none")
    far = load_audio(espeak_wav("one two three four five"), PIPELINE_RATE)
    mic, played = _echo_only_run(spec, far, realtime=realtime)
    expected = np.convolve(played, room_impulse_response(spec))[: len(mic)] * 10 ** (-6 / 20)
    expected = np.concatenate([np.zeros(int(0.120 * PIPELINE_RATE), np.float32), expected])[: len(mic)]
    start = int(np.flatnonzero(played)[0])
    assert 0.2 * PIPELINE_RATE <= start <= 0.35 * PIPELINE_RATE  # played 8 blocks in
    np.testing.assert_allclose(mic, expected, atol=2e-3)
    assert np.max(np.abs(mic[: start + int(0.119 * PIPELINE_RATE)])) < 1e-3  # nothing before the delay


def test_user_noise_and_echo_mix_at_their_gains():
    spec = RoomSpec(name="test", user_gain_db=-6.0, noise="white", noise_dbfs=-40.0, seed=5)
    user = tone(300, 1.0, PIPELINE_RATE, amplitude=0.5)
    room = SimulatedRoom(spec, user, realtime=False)
    mic = np.concatenate(list(room))
    assert len(mic) == 32 * 512  # the source ends with the file (its last block zero-padded)
    noise = mic[:PIPELINE_RATE] - user * 10 ** (-6 / 20)
    assert 20 * np.log10(np.sqrt(np.mean(noise**2))) == pytest.approx(-40.0, abs=0.3)


def test_paced_room_user_waits_for_the_echo_to_die_away():
    spec = RoomSpec(name="test", noise="none", device_delay_ms=50.0)
    user = np.concatenate([np.zeros(512 * 4, np.float32), tone(300, 0.5, PIPELINE_RATE)])
    room = SimulatedRoom(spec, user, realtime=False)
    sink = MemorySink(PIPELINE_RATE, speed=None)
    sink.add_listener(room.hear)
    blocks = [room.read()]
    sink.write(tone(500, 1.0, PIPELINE_RATE), PIPELINE_RATE)  # the agent talks for 1 s
    sink.wait_idle(timeout=10.0)
    while (block := room.read()) is not None:
        blocks.append(block)
    sink.close()
    mic = np.concatenate(blocks)
    spectrum = lambda x: np.abs(np.fft.rfft(x * np.hanning(len(x))))  # noqa: E731
    tail = len(room.rir) + int(0.05 * PIPELINE_RATE)
    echo_part = mic[512 : 512 + PIPELINE_RATE]
    user_part = mic[512 + PIPELINE_RATE + tail :]
    assert np.argmax(spectrum(echo_part)) * PIPELINE_RATE / len(echo_part) == pytest.approx(500, abs=5)
    assert np.argmax(spectrum(user_part)) * PIPELINE_RATE / len(user_part) == pytest.approx(300, abs=5)
    assert len(mic) >= 512 + PIPELINE_RATE + tail + len(user) - 512  # nothing of the user was lost
