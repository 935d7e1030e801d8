"""Voice prompts: the shipped table, user tables, clip paths, and one-line errors for missing clips."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from csm_engine.errors import CSMError
from csm_engine.voices import (
    SHIPPED_VOICES_FILE,
    VoicePrompt,
    list_voices,
    load_voice_audio,
    load_voice_segment,
    resolve_voice,
    user_voices_file,
)


@pytest.fixture(autouse=True)
def isolated_user_config(tmp_path, monkeypatch):
    """Point the user's config dir (platformdirs honours XDG_CONFIG_HOME) at an empty temp dir."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "csm-chat"


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """No cached hub files and no network, as on this machine (HF_HUB_OFFLINE=1 + a fresh cache)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- named voices ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "speaker"), [("conversational_a", 0), ("conversational_b", 1)])
def test_shipped_voices_resolve_to_sesame_prompt_clips(name, speaker):
    voice = resolve_voice(name)
    assert voice.name == name and voice.speaker == speaker
    assert voice.audio_ref == f"hf://sesame/csm-1b/prompts/{name}.wav"
    assert len(voice.text.split()) > 50  # the clip's full transcript, not a placeholder
    assert voice.source == str(SHIPPED_VOICES_FILE)


def test_unknown_voice_lists_the_known_names():
    with pytest.raises(CSMError) as info:
        resolve_voice("narrator_9000")
    message = _one_line(info)
    assert "unknown voice 'narrator_9000'" in message
    assert "conversational_a" in message and "conversational_b" in message
    assert "--voice-text" in message


def test_speaker_override_keeps_the_clip_and_transcript():
    voice = resolve_voice("conversational_a", speaker=3)
    assert voice.speaker == 3 and voice.text == resolve_voice("conversational_a").text


def test_transcript_override_on_a_named_voice_is_refused():
    with pytest.raises(CSMError, match="--voice-text goes with a clip path"):
        resolve_voice("conversational_a", text="something else")


def test_user_table_adds_voices_and_wins_on_names(isolated_user_config, espeak_speech_wav):
    isolated_user_config.mkdir(parents=True)
    (isolated_user_config / "clips").mkdir()
    (isolated_user_config / "clips" / "me.wav").write_bytes(espeak_speech_wav.read_bytes())
    (isolated_user_config / "voices.toml").write_text(
        '[voices.me]\nspeaker = 2\naudio = "clips/me.wav"\ntext = "hello there"\n\n'
        '[voices.conversational_b]\nspeaker = 1\naudio = "clips/me.wav"\ntext = "mine now"\n'
    )
    assert user_voices_file() == isolated_user_config / "voices.toml"
    voices = list_voices()
    assert {"conversational_a", "conversational_b", "me"} <= set(voices)
    me = resolve_voice("me")
    assert me.speaker == 2 and me.audio_ref == str((isolated_user_config / "clips" / "me.wav").resolve())
    assert resolve_voice("conversational_b").text == "mine now"
    assert load_voice_audio(me).numel() > 0


def test_invalid_user_table_is_a_one_line_error(isolated_user_config):
    isolated_user_config.mkdir(parents=True)
    (isolated_user_config / "voices.toml").write_text("[voices.me\nspeaker = ")
    with pytest.raises(CSMError) as info:
        resolve_voice("me")
    assert "is not valid TOML" in _one_line(info)


def test_table_entry_without_audio_is_a_one_line_error(isolated_user_config):
    isolated_user_config.mkdir(parents=True)
    (isolated_user_config / "voices.toml").write_text('[voices.me]\nspeaker = 0\ntext = "hi"\n')
    with pytest.raises(CSMError) as info:
        resolve_voice("me")
    assert "[voices.me]: audio must name a clip" in _one_line(info)


# --- clip paths --------------------------------------------------------------------------------


def test_local_clip_path_with_transcript_loads_as_24k_mono(espeak_speech_wav):
    voice = resolve_voice(str(espeak_speech_wav), text="hello there, this is a short test of my voice")
    assert voice.speaker == 0 and voice.name == espeak_speech_wav.stem
    audio = load_voice_audio(voice)
    info = soundfile.info(str(espeak_speech_wav))
    assert audio.dtype == torch.float32 and audio.ndim == 1
    assert abs(audio.numel() - info.frames * 24000 / info.samplerate) <= 1
    assert torch.isfinite(audio).all() and audio.abs().max() > 0.05  # real speech, not silence


def test_stereo_48k_clip_is_downmixed_and_resampled(tmp_path):
    t = np.arange(48000) / 48000
    tone = np.sin(2 * np.pi * 220 * t)
    soundfile.write(str(tmp_path / "stereo.wav"), np.stack([0.5 * tone, 0.3 * tone], axis=1), 48000)
    audio = load_voice_audio(resolve_voice(tmp_path / "stereo.wav", text="a tone"))
    assert audio.shape == (24000,)
    expected = 0.4 * np.sin(2 * np.pi * 220 * np.arange(24000) / 24000)  # the channels' mean
    assert np.abs(audio.numpy()[200:-200] - expected[200:-200]).max() < 0.01


def test_clip_transcript_can_sit_next_to_the_clip(tmp_path, espeak_speech_wav):
    clip = tmp_path / "voice.wav"
    clip.write_bytes(espeak_speech_wav.read_bytes())
    clip.with_suffix(".txt").write_text("  hello there,\nthis is a test  \n")
    assert resolve_voice(clip).text == "hello there, this is a test"


def test_clip_without_transcript_asks_for_voice_text(espeak_speech_wav):
    with pytest.raises(CSMError) as info:
        resolve_voice(str(espeak_speech_wav))
    assert "--voice-text" in _one_line(info)


def test_missing_clip_path_is_a_one_line_error(tmp_path):
    with pytest.raises(CSMError) as info:
        resolve_voice(str(tmp_path / "gone.wav"), text="hi")
    assert "not found" in _one_line(info)


def test_table_clip_deleted_after_resolving_names_the_table_to_fix(isolated_user_config, espeak_speech_wav):
    isolated_user_config.mkdir(parents=True)
    clip = isolated_user_config / "me.wav"
    clip.write_bytes(espeak_speech_wav.read_bytes())
    (isolated_user_config / "voices.toml").write_text('[voices.me]\naudio = "me.wav"\ntext = "hi"\n')
    voice = resolve_voice("me")
    clip.unlink()
    with pytest.raises(CSMError) as info:
        load_voice_audio(voice)
    message = _one_line(info)
    assert "not found" in message and str(isolated_user_config / "voices.toml") in message


def test_unreadable_clip_is_a_one_line_error(tmp_path):
    clip = tmp_path / "junk.wav"
    clip.write_bytes(b"this is not audio at all")
    with pytest.raises(CSMError) as info:
        load_voice_audio(resolve_voice(clip, text="hi"))
    assert "cannot read" in _one_line(info)


# --- hub clips ---------------------------------------------------------------------------------


def test_uncached_hub_clip_without_download_names_the_fixes(empty_hub_cache):
    with pytest.raises(CSMError) as info:
        load_voice_audio(resolve_voice("conversational_a"), download=False)
    message = _one_line(info)
    assert "prompts/conversational_a.wav from sesame/csm-1b" in message
    assert "hf auth login" in message and "hf download sesame/csm-1b prompts/conversational_a.wav" in message
    assert "local" in message


def test_unreachable_hub_is_a_one_line_error(empty_hub_cache):
    # download=True goes through hf_hub_download's real network path, refused by offline mode.
    with pytest.raises(CSMError) as info:
        load_voice_segment(resolve_voice("conversational_b"))
    assert "cannot get prompts/conversational_b.wav" in _one_line(info)


def test_hub_host_that_does_not_resolve_fails_at_once(tmp_path, monkeypatch, capsys):
    """Not in offline mode, but no DNS for the hub (this machine): no retry loop, no retry noise."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 6761)
    started = time.monotonic()
    with pytest.raises(CSMError) as info:
        load_voice_audio(resolve_voice("conversational_a"))
    assert "unreachable" in _one_line(info)
    assert time.monotonic() - started < 5.0
    assert "Retry" not in capsys.readouterr().err


def test_malformed_hub_ref_is_refused():
    with pytest.raises(CSMError, match="not a hub clip reference"):
        resolve_voice("hf://sesame/clip.wav", text="hi")


def test_voice_segment_carries_speaker_text_and_audio(espeak_speech_wav):
    voice = VoicePrompt("me", 1, "hello there", str(espeak_speech_wav), source="command line")
    segment = load_voice_segment(voice)
    assert segment.speaker == 1 and segment.text == "hello there" and segment.audio.ndim == 1
