"""Watermarking through silentcipher's real loading, embedding and decoding code.

The model is random-init (no hub here), written in silentcipher's own checkpoint layout by
``csm_engine.testing.watermark``. These tests check the plumbing — files found and loaded,
audio resampled to 44.1 kHz and back, lengths, errors, streaming — NOT detection accuracy: a
random model embeds noise-like marks it cannot reliably read back.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import torch
from scipy.signal import resample_poly

from csm_engine.errors import CSMError
from csm_engine.watermark import (
    CHECKPOINT_FILES,
    CSM_WATERMARK_KEY,
    WATERMARK_DIR_ENV,
    Watermarker,
    WatermarkResult,
    apply_watermark,
    load_watermarker,
    verify,
    verify_file,
)
from csm_engine.watermark_stream import StreamingWatermarker


@pytest.fixture(scope="module")
def watermarker(random_watermark_dir) -> Watermarker:
    return load_watermarker(random_watermark_dir)


@pytest.fixture(scope="module")
def speech_24k(espeak_speech_wav) -> torch.Tensor:
    """The first 1.2 s of the espeak clip at 24 kHz (long enough for one watermark message)."""
    data, rate = soundfile.read(str(espeak_speech_wav), dtype="float32")
    data = resample_poly(data, 24000 // math.gcd(rate, 24000), rate // math.gcd(rate, 24000))
    return torch.from_numpy(np.ascontiguousarray(data[: int(1.2 * 24000)], dtype=np.float32))


@pytest.fixture(scope="module")
def marked_24k(watermarker, speech_24k) -> torch.Tensor:
    return apply_watermark(speech_24k, 24000, watermarker)


def _snr_db(clean: np.ndarray, marked: np.ndarray) -> float:
    return 10 * math.log10(float(np.mean(clean**2)) / float(np.mean((marked - clean) ** 2)))


# --- embedding ---------------------------------------------------------------------------------


def test_apply_keeps_length_rate_and_dtype(speech_24k, marked_24k):
    assert marked_24k.shape == speech_24k.shape
    assert marked_24k.dtype == torch.float32
    assert torch.isfinite(marked_24k).all()


def test_apply_changes_samples_at_about_the_reference_strength(speech_24k, marked_24k):
    # The reference embeds at a 36 dB message SDR; the mark must be there but quiet.
    assert not torch.equal(marked_24k, speech_24k)
    snr = _snr_db(speech_24k.numpy(), marked_24k.numpy())
    assert 25.0 < snr < 50.0, snr


def test_apply_works_at_other_sample_rates(watermarker, speech_24k):
    clip_16k = torch.from_numpy(resample_poly(speech_24k.numpy()[:12000], 2, 3).astype(np.float32))
    marked = watermarker.apply(clip_16k, 16000)
    assert marked.shape == clip_16k.shape
    assert torch.isfinite(marked).all() and not torch.equal(marked, clip_16k)


def test_long_clips_are_embedded_in_message_aligned_blocks_without_clicks(watermarker, espeak_speech_wav,
                                                                          monkeypatch):
    import csm_engine.watermark as wm

    # One message per block (instead of six) so a 2 s clip crosses two block seams.
    monkeypatch.setattr(wm, "BLOCK_SAMPLES", wm.MESSAGE_FRAMES * wm.STFT_HOP)
    data, rate = soundfile.read(str(espeak_speech_wav), dtype="float32")
    clip = resample_poly(data, 24000 // math.gcd(rate, 24000), rate // math.gcd(rate, 24000)).astype(np.float32)
    marked = watermarker.apply_numpy(clip, 24000)
    assert marked.shape == clip.shape and np.all(np.isfinite(marked))
    assert 25.0 < _snr_db(clip, marked) < 50.0
    delta = np.abs(marked - clip)
    seam = round(wm.BLOCK_SAMPLES * 24000 / 44100)
    near_seam = slice(seam - 240, seam + 240)  # +-10 ms
    assert delta[near_seam].max() <= 2 * np.delete(delta, np.r_[near_seam]).max()


def test_apply_returns_silence_unchanged(watermarker):
    silence = torch.zeros(4800)
    assert torch.equal(watermarker.apply(silence, 24000), silence)


@pytest.mark.parametrize("bad", [torch.zeros(2, 4800), torch.full((4800,), float("nan"))])
def test_apply_rejects_non_mono_or_non_finite_audio(watermarker, bad):
    with pytest.raises(CSMError) as info:
        watermarker.apply(bad, 24000)
    assert "\n" not in str(info.value)


# --- decoding ----------------------------------------------------------------------------------


def test_verify_runs_the_decoder_and_returns_a_result(watermarker, marked_24k):
    result = verify(marked_24k, 24000, watermarker)
    assert isinstance(result, WatermarkResult)
    assert 0.0 <= result.confidence <= 1.0
    assert result.message is None or len(result.message) == len(CSM_WATERMARK_KEY)
    # It got past the length/silence checks into silentcipher's decoder.
    assert "shorter than" not in result.detail and "silent" not in result.detail
    assert verify(marked_24k, 24000, watermarker) == result  # deterministic


def test_verify_file_on_unwatermarked_speech_says_no_watermark(watermarker, espeak_speech_wav):
    result = verify_file(espeak_speech_wav, watermarker)
    assert result.present is False
    line = result.describe()
    assert line.startswith("no CSM watermark found") and "\n" not in line


def test_verify_file_reads_written_watermarked_wav(watermarker, marked_24k, tmp_path):
    path = tmp_path / "marked.wav"
    soundfile.write(str(path), marked_24k.numpy(), 24000, subtype="PCM_16")
    result = verify_file(path, watermarker)
    assert isinstance(result, WatermarkResult) and 0.0 <= result.confidence <= 1.0


def test_verify_short_clip_reports_too_short_without_decoding(watermarker, speech_24k):
    result = watermarker.verify(speech_24k[:4800], 24000)
    assert result.present is False and "shorter than one watermark message" in result.describe()


def test_verify_file_on_corrupt_file_is_a_one_line_error(watermarker, tmp_path):
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(CSMError) as info:
        verify_file(path, watermarker)
    assert "cannot read" in str(info.value) and "\n" not in str(info.value)


def test_verify_file_on_missing_file_is_a_one_line_error(watermarker, tmp_path):
    with pytest.raises(CSMError) as info:
        verify_file(tmp_path / "nope.wav", watermarker)
    assert "nope.wav" in str(info.value) and "\n" not in str(info.value)


def test_result_describe_names_a_decoded_foreign_message():
    line = WatermarkResult(False, 0.8, (1, 2, 3, 4, 5)).describe()
    assert "[1, 2, 3, 4, 5] is not the CSM key" in line
    assert WatermarkResult(True, 0.97, CSM_WATERMARK_KEY).describe().startswith("CSM watermark present")


# --- streaming ---------------------------------------------------------------------------------


def test_streaming_marks_every_sample_and_keeps_the_total_length(watermarker, speech_24k):
    stream = StreamingWatermarker(watermarker, sample_rate=24000)  # min: one STFT window, 2229
    chunks = [speech_24k[i:i + 1920].numpy() for i in range(0, 1920 * 3, 1920)] + [speech_24k[5760:6000].numpy()]
    first = stream.push(chunks[0])
    assert first.size == 0 and stream.buffered_samples == 1920  # held back: below one STFT window
    second = stream.push(chunks[1])
    assert second.size == 3840 and stream.buffered_samples == 0
    third = stream.push(chunks[2])
    fourth = stream.push(chunks[3])
    tail = stream.flush()
    out = np.concatenate([first, second, third, fourth, tail])
    original = np.concatenate(chunks)
    assert out.shape == original.shape and np.all(np.isfinite(out))
    assert not np.array_equal(out[:3840], original[:3840])  # marked, not passed through
    assert len(stream.compute_s) == 2  # two blocks: 1920+1920, then 1920+240 at flush


def test_streaming_wrap_with_whole_message_blocks(watermarker, speech_24k):
    stream = watermarker.streaming(min_samples=None)
    period = stream.message_period_samples
    assert period == math.ceil(21 * 2048 / 44100 * 24000)
    stream = watermarker.streaming(min_samples=period)
    chunks = [speech_24k[i:i + 3840].numpy() for i in range(0, speech_24k.numel(), 3840)]
    out = list(stream.wrap(chunks))
    first_block = math.ceil(period / 3840) * 3840  # whole chunks until one message fits
    assert [o.size for o in out] == [first_block, speech_24k.numel() - first_block]
    assert sum(o.size for o in out) == speech_24k.numel()


# --- loading -----------------------------------------------------------------------------------


def test_random_checkpoint_has_silentciphers_layout(random_watermark_dir):
    names = sorted(p.name for p in random_watermark_dir.iterdir())
    assert names == sorted(CHECKPOINT_FILES)
    for name in CHECKPOINT_FILES[:-1]:
        state = torch.load(random_watermark_dir / name, weights_only=True)
        assert state and all(isinstance(v, torch.Tensor) for v in state.values())


def test_load_is_cached_per_folder(random_watermark_dir, watermarker):
    assert load_watermarker(random_watermark_dir) is watermarker
    assert watermarker.source == random_watermark_dir.resolve()


def test_env_var_names_the_checkpoint_folder(random_watermark_dir, watermarker, monkeypatch):
    monkeypatch.setenv(WATERMARK_DIR_ENV, str(random_watermark_dir))
    assert load_watermarker() is watermarker


def test_missing_checkpoint_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(CSMError) as info:
        load_watermarker(tmp_path / "absent")
    message = str(info.value)
    assert "does not exist" in message and WATERMARK_DIR_ENV in message and "--no-watermark" in message
    assert "\n" not in message


def test_incomplete_checkpoint_folder_names_the_missing_file(random_watermark_dir, tmp_path):
    for name in ("enc_c.ckpt", "dec_c.ckpt", "hparams.yaml"):
        (tmp_path / name).write_bytes((random_watermark_dir / name).read_bytes())
    with pytest.raises(CSMError, match="lacks dec_m_0.ckpt"):
        load_watermarker(tmp_path)


def test_corrupt_checkpoint_is_a_one_line_error(random_watermark_dir, tmp_path):
    for name in CHECKPOINT_FILES:
        (tmp_path / name).write_bytes((random_watermark_dir / name).read_bytes())
    (tmp_path / "dec_c.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CSMError) as info:
        load_watermarker(tmp_path)
    assert "dec_c.ckpt is not a readable weights file" in str(info.value) and "\n" not in str(info.value)


def test_non_44k_model_is_refused(random_watermark_dir, tmp_path):
    for name in CHECKPOINT_FILES:
        (tmp_path / name).write_bytes((random_watermark_dir / name).read_bytes())
    hparams = (tmp_path / "hparams.yaml").read_text().replace("SR: 44100", "SR: 16000")
    (tmp_path / "hparams.yaml").write_text(hparams)
    with pytest.raises(CSMError, match="not silentcipher's 44.1 kHz model"):
        load_watermarker(tmp_path)


def test_unreachable_hub_is_a_one_line_error_naming_the_fix(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv(WATERMARK_DIR_ENV, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 would
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # nothing cached
    with pytest.raises(CSMError) as info:
        load_watermarker()
    message = str(info.value)
    assert "sony/silentcipher" in message and WATERMARK_DIR_ENV in message and "\n" not in message


# --- reading silentcipher's decode result ------------------------------------------------------
# A random-init decoder never emits the end-of-message symbol, so silentcipher reports
# status=False on every clip here; these feed its documented result dict to our reader directly.


def test_decoded_csm_key_counts_as_present():
    from csm_engine.watermark import _result_from_decode

    result = _result_from_decode({"messages": [list(CSM_WATERMARK_KEY)], "confidences": [0.93], "status": True},
                                 CSM_WATERMARK_KEY)
    assert result == WatermarkResult(True, 0.93, CSM_WATERMARK_KEY)


def test_decoded_other_message_is_not_present():
    from csm_engine.watermark import _result_from_decode

    result = _result_from_decode({"messages": [[1, 2, 3, 4, 5]], "confidences": [0.7], "status": True},
                                 CSM_WATERMARK_KEY)
    assert result.present is False and result.message == (1, 2, 3, 4, 5)


def test_failed_decode_is_not_present():
    from csm_engine.watermark import _result_from_decode

    result = _result_from_decode({"messages": [], "confidences": [], "error": "Could not find message",
                                  "status": False}, CSM_WATERMARK_KEY)
    assert result.present is False and result.message is None and result.confidence == 0.0
