"""Audio devices: WAV-file and in-memory sources/sinks, resampling, bad files, no sound card."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import soundfile as sf

from agent.audio import (
    PIPELINE_RATE,
    MemorySink,
    QueueSource,
    StreamResampler,
    WavFileSink,
    WavFileSource,
    describe_devices,
    list_devices,
    load_audio,
    open_microphone,
    open_speaker,
    read_wav,
    resample,
    rms_dbfs,
    write_wav,
)
from agent.errors import AgentError


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_freq(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def test_resample_keeps_pitch_and_duration():
    x = tone(440, 1.0, 48_000)
    y = resample(x, 48_000, 16_000)
    assert len(y) == 16_000 and y.dtype == np.float32
    assert abs(dominant_freq(y, 16_000) - 440) < 2


@pytest.mark.parametrize("src,dst", [(24_000, 48_000), (44_100, 16_000), (24_000, 44_100)])
def test_stream_resampler_matches_whole_signal_resampling(src, dst):
    x = tone(300, 0.5, src)
    resampler = StreamResampler(src, dst)
    pieces = [resampler.process(x[i : i + 1001]) for i in range(0, len(x), 1001)]
    y = np.concatenate(pieces + [resampler.flush()])
    whole = resample(x, src, dst)
    assert len(y) == len(whole)
    np.testing.assert_allclose(y, whole, atol=1e-5)  # no clicks at chunk boundaries


def test_read_wav_downmixes_stereo_48k(tmp_path):
    left, right = tone(440, 0.5, 48_000), tone(440, 0.5, 48_000, amplitude=0.1)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 48_000)
    audio, rate = read_wav(path)
    assert rate == 48_000 and audio.ndim == 1 and len(audio) == 24_000
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-4)


def test_wav_file_source_round_trip_through_wav_file_sink_with_resampling(tmp_path):
    # 48 kHz stereo in -> 16 kHz mono blocks -> sink at 24 kHz -> WAV on disk.
    x = tone(500, 1.0, 48_000)
    src_path = tmp_path / "in.wav"
    sf.write(src_path, np.stack([x, x], axis=1), 48_000)
    source = WavFileSource(src_path, speed=None)
    blocks = list(source)
    assert all(len(b) == source.block_samples == 512 for b in blocks)
    captured = np.concatenate(blocks)
    assert abs(len(captured) - PIPELINE_RATE) < 512

    out_path = tmp_path / "out.wav"
    sink = WavFileSink(out_path, sample_rate=24_000, speed=None)
    for block in blocks:
        sink.write(block, PIPELINE_RATE)
    sink.close()
    written, rate = sf.read(out_path, dtype="float32")
    assert rate == 24_000 and abs(len(written) - 24_000) < 24_000 * 512 / PIPELINE_RATE
    assert abs(dominant_freq(written, 24_000) - 500) < 3
    assert sink.played_samples == len(written)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


def test_wav_file_source_paces_in_real_time_times_speed(tmp_path):
    path = write_wav(tmp_path / "half_second.wav", tone(200, 0.5, 16_000), 16_000)
    started = time.monotonic()
    blocks = list(WavFileSource(path, speed=2.0))
    elapsed = time.monotonic() - started
    assert len(blocks) == 16  # 0.5 s in 32 ms blocks, rounded up
    assert 0.2 < elapsed < 0.6  # ~0.26 s at twice real time


def test_wav_file_source_adds_trailing_silence_and_stops_early(tmp_path):
    path = write_wav(tmp_path / "a.wav", tone(200, 0.2, 16_000), 16_000)
    source = WavFileSource(path, speed=None, trailing_silence_s=1.0)
    assert source.duration_s == pytest.approx(1.2)
    first = source.read()
    source.stop()
    assert first is not None and source.read() is None


def test_memory_sink_stop_cuts_playback_within_one_block():
    sink = MemorySink(24_000, speed=1.0)
    sink.write(tone(300, 3.0, 24_000), 24_000)
    time.sleep(0.3)
    sink.stop()
    at_stop = sink.played_samples
    time.sleep(0.15)
    assert sink.played_samples - at_stop <= sink.block_samples
    assert 0.1 < sink.played_s < 0.6  # what was heard, not what was queued
    assert sink.wait_idle(timeout=0.5)
    sink.close()


def test_sink_records_when_chunks_started_playing():
    sink = MemorySink(24_000, speed=4.0)
    before = time.monotonic()
    sink.write(tone(300, 0.4, 24_000), 24_000)
    sink.write(tone(300, 0.4, 24_000), 24_000)
    assert sink.wait_idle(timeout=2)
    sink.close()
    assert [c.offset for c in sink.chunks] == [0, 9600]
    assert before <= sink.chunks[0].started_at < sink.chunks[1].started_at
    assert sink.chunks[1].started_at - sink.chunks[0].started_at == pytest.approx(0.1, abs=0.06)


def test_sink_resamples_24k_chunks_to_its_rate():
    sink = MemorySink(48_000, speed=None)
    for chunk in np.split(tone(1000, 0.48, 24_000), 6):  # CSM-sized chunks
        sink.write(chunk, 24_000)
    assert sink.wait_idle(timeout=2)
    sink.close()
    audio = sink.audio()
    assert len(audio) == 23_040
    assert abs(dominant_freq(audio, 48_000) - 1000) < 3


def test_write_from_another_thread_while_playing():
    sink = MemorySink(16_000, speed=8.0)
    writer = threading.Thread(target=lambda: [sink.write(tone(200, 0.05, 16_000), 16_000) for _ in range(10)])
    writer.start()
    writer.join()
    assert sink.wait_idle(timeout=2)
    sink.close()
    assert sink.played_samples == 8000


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"", "empty"),
        (b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk", "cannot read"),
        (b"not audio at all" * 20, "cannot read"),
    ],
)
def test_bad_wav_files_give_one_line_agent_errors(tmp_path, content, expected):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AgentError) as info:
        read_wav(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert expected in message


def test_wav_with_no_samples_is_an_agent_error(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros((0, 1), np.float32), 16_000)
    with pytest.raises(AgentError, match="is empty"):
        load_audio(path)


def test_missing_wav_is_an_agent_error(tmp_path):
    with pytest.raises(AgentError, match="audio file not found"):
        WavFileSource(tmp_path / "nope.wav")


def test_no_sound_card_gives_one_line_errors_naming_the_file_fallbacks():
    import sounddevice as sd

    if len(sd.query_devices()) > 0:
        pytest.skip("this machine has audio devices")
    with pytest.raises(AgentError) as mic:
        open_microphone()
    assert str(mic.value).startswith("no microphone found") and "--mic-file" in str(mic.value)
    assert "\n" not in str(mic.value)
    with pytest.raises(AgentError, match="--speaker-file"):
        open_speaker()
    with pytest.raises(AgentError, match="--list-devices"):
        open_microphone("USB headset")
    assert list_devices() == ([], [])
    assert "no audio devices found" in describe_devices()


def test_rms_dbfs():
    assert rms_dbfs(np.zeros(512, np.float32)) == -120.0
    assert rms_dbfs(np.ones(512, np.float32)) == pytest.approx(0.0)
    assert rms_dbfs(tone(440, 0.1, 16_000, amplitude=1.0)) == pytest.approx(-3.01, abs=0.05)


def test_queue_source_turns_pushed_44k_audio_into_16k_blocks_across_threads():
    source = QueueSource(44_100)
    x = tone(440, 1.0, 44_100)

    def producer():
        for i in range(0, len(x), 441):  # 10 ms callbacks, like a sound card
            source.push(x[i : i + 441])
        source.end()

    threading.Thread(target=producer).start()
    blocks = list(source)
    assert all(len(b) == 512 for b in blocks)
    audio = np.concatenate(blocks)
    assert len(audio) == 512 * 32  # 16000 samples, last block zero-padded
    np.testing.assert_allclose(audio[:16000], resample(x, 44_100, 16_000), atol=1e-5)


def test_queue_source_read_times_out_and_stop_wakes_a_blocked_reader():
    source = QueueSource()
    with pytest.raises(TimeoutError):
        source.read(timeout=0.05)
    result = []
    reader = threading.Thread(target=lambda: result.append(source.read()))
    reader.start()
    time.sleep(0.05)
    source.stop()
    reader.join(timeout=1)
    assert result == [None]


# ---- the far-end tap: what the sink hands to the device, with its play time


class _Tap:
    def __init__(self) -> None:
        self.blocks: list[tuple[np.ndarray, int, float]] = []

    def __call__(self, samples: np.ndarray, sample_rate: int, play_time: float) -> None:
        self.blocks.append((samples.copy(), sample_rate, play_time))


def test_sink_tap_gets_every_block_in_order_with_its_play_time():
    sink = MemorySink(16_000, speed=1.0)
    tap = _Tap()
    sink.add_listener(tap)
    before = time.monotonic()
    sink.write(tone(300, 0.5, 16_000), 16_000)
    assert sink.wait_idle(timeout=5.0)
    sink.close()
    np.testing.assert_array_equal(np.concatenate([b for b, _, _ in tap.blocks]), sink.audio())
    assert {rate for _, rate, _ in tap.blocks} == {16_000} and len(tap.blocks) == 25  # 20 ms blocks
    times = np.array([t for _, _, t in tap.blocks])
    assert times[0] >= before and np.all(np.diff(times) > 0)
    # Paced at 1x: each block plays about 20 ms after the one before (thread jitter aside).
    assert times[-1] - times[0] == pytest.approx(0.48, abs=0.1)


def test_sink_tap_play_times_jump_over_idle_gaps():
    sink = MemorySink(16_000, speed=1.0)
    tap = _Tap()
    sink.add_listener(tap)
    sink.write(tone(300, 0.2, 16_000), 16_000)
    sink.wait_idle(timeout=5.0)
    time.sleep(0.3)  # MemorySink hands nothing over while idle
    sink.write(tone(300, 0.2, 16_000), 16_000)
    sink.wait_idle(timeout=5.0)
    sink.close()
    ends = [t + len(b) / 16_000 for b, _, t in tap.blocks]
    starts = [t for _, _, t in tap.blocks]
    gaps = [s - e for s, e in zip(starts[1:], ends[:-1])]
    assert max(gaps) >= 0.25 and sorted(gaps)[-2] < 0.05  # one gap, where it was idle


def test_sink_tap_remover_and_a_failing_listener_do_not_stop_playback():
    sink = MemorySink(16_000, speed=None)
    kept, dropped = _Tap(), _Tap()
    calls = []

    def broken(samples, sample_rate, play_time):
        calls.append(play_time)
        samples[0] = 1.0  # blocks are read-only: this raises, and the listener is removed

    remove = sink.add_listener(dropped)
    sink.add_listener(broken)
    sink.add_listener(kept)
    remove()
    sink.write(tone(300, 0.1, 16_000), 16_000)
    sink.wait_idle(timeout=5.0)
    sink.write(tone(300, 0.1, 16_000), 16_000)
    sink.close()
    assert dropped.blocks == [] and len(calls) == 1
    assert sum(len(b) for b, _, _ in kept.blocks) == 3200 == len(sink.audio())
