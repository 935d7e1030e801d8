"""Speech to text with the real embedded Whisper tiny.en on espeak-ng speech (both engines)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from agent.audio import load_audio
from agent.errors import AgentError
from agent.listen.asr import FasterWhisperTranscriber, OpenAIWhisperTranscriber, make_transcriber

SENTENCE = "I would like to hear a short story about a dragon."


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def roughly_same(heard: str, said: str, allowed_misses: int = 2) -> bool:
    """Whisper tiny on robot speech may mishear a word or two ("cats" -> "cars")."""
    expected = words(said)
    missing = [w for w in expected if w not in words(heard)]
    return len(missing) <= allowed_misses and abs(len(words(heard)) - len(expected)) <= allowed_misses


@pytest.fixture(scope="module")
def story(espeak_wav) -> np.ndarray:
    return load_audio(espeak_wav(SENTENCE))


def test_faster_whisper_transcribes_espeak_speech(faster_whisper_tiny, story):
    transcript = faster_whisper_tiny.transcribe(story)
    assert roughly_same(transcript.text, SENTENCE), transcript.text
    assert transcript.language == "en"
    assert transcript.duration_s == pytest.approx(len(story) / 16000)
    assert transcript.elapsed_s > 0


def test_faster_whisper_second_sentence(faster_whisper_tiny, espeak_wav):
    said = "What is the weather like today?"
    transcript = faster_whisper_tiny.transcribe(load_audio(espeak_wav(said)))
    assert roughly_same(transcript.text, said), transcript.text


def test_partial_transcript_of_a_growing_buffer(faster_whisper_tiny, story):
    partial = faster_whisper_tiny.transcribe(story[: len(story) // 2])
    assert partial.text and words(partial.text)[0] in words(SENTENCE)[:2]


def encoder_windows(transcriber, monkeypatch) -> list[int]:
    """The mel frames the real encoder is given, call by call."""
    model, seen = transcriber._model, []
    real = model.encode

    def encode(features):
        seen.append(features.shape[-1])
        return real(features)

    monkeypatch.setattr(model, "encode", encode)
    return seen


def test_a_short_turn_is_encoded_in_a_short_window_and_a_long_one_in_30_s(faster_whisper_tiny, story, espeak_wav,
                                                                       monkeypatch):
    seen = encoder_windows(faster_whisper_tiny, monkeypatch)
    heard = faster_whisper_tiny.transcribe(story).text
    said = "Please remind me to water the plants in the garden before the sun goes down, and to call my brother."
    longer = load_audio(espeak_wav(said, wpm=80))  # ~10 s: the clip plus 2 s of margin
    heard_longer = faster_whisper_tiny.transcribe(longer).text
    padded = np.concatenate([story, np.zeros(29 * 16000 - len(story), np.float32)])  # no room for the margin
    heard_padded = faster_whisper_tiny.transcribe(padded).text
    frames = len(longer) // 160
    assert seen == [1000, frames + 200, 3000], (seen, frames)
    assert roughly_same(heard, SENTENCE) and roughly_same(heard_padded, SENTENCE), (heard, heard_padded)
    assert roughly_same(heard_longer, said, allowed_misses=3), heard_longer


def test_the_30_s_window_stays_available_and_bad_windows_are_one_line_errors(story, monkeypatch):
    full = FasterWhisperTranscriber(window_s=None)
    seen = encoder_windows(full, monkeypatch)
    assert roughly_same(full.transcribe(story).text, SENTENCE) and seen == [3000]
    with pytest.raises(AgentError, match="Whisper window must be"):
        FasterWhisperTranscriber(window_s=0.5)


def test_silence_and_tiny_buffers_give_empty_transcripts(faster_whisper_tiny):
    assert faster_whisper_tiny.transcribe(np.zeros(800, np.float32)).is_empty
    assert faster_whisper_tiny.transcribe(np.zeros(16000, np.float32)).is_empty


@pytest.mark.slow
def test_openai_whisper_on_the_converted_checkpoint_hears_the_same_words(
    openai_whisper_tiny_pt, faster_whisper_tiny, story
):
    transcriber = make_transcriber("openai-whisper", str(openai_whisper_tiny_pt))
    assert isinstance(transcriber, OpenAIWhisperTranscriber) and transcriber.language == "en"
    heard = transcriber.transcribe(story).text
    assert roughly_same(heard, SENTENCE), heard
    # The same words as faster-whisper (int8 CTranslate2) but for one: the two runtimes' kernels
    # differ, and on another CPU one of them may flip a word; a wrong conversion hears nonsense.
    assert roughly_same(heard, faster_whisper_tiny.transcribe(story).text, allowed_misses=1), heard


def test_factory_defaults_to_the_embedded_faster_whisper_model():
    transcriber = make_transcriber()
    assert isinstance(transcriber, FasterWhisperTranscriber)
    assert transcriber.model_name.endswith("model") and transcriber.language == "en"


@pytest.mark.parametrize(
    "engine,model,fix",
    [
        ("faster-whisper", "/no/such/whisper_dir", "--asr-model"),
        ("openai-whisper", "/no/such/tiny.pt", "--asr-model PATH.pt"),
        ("vosk", None, "--asr faster-whisper"),
    ],
)
def test_missing_models_and_unknown_engines_are_one_line_agent_errors(engine, model, fix):
    with pytest.raises(AgentError) as info:
        make_transcriber(engine, model)
    assert fix in str(info.value) and "\n" not in str(info.value)


def test_corrupt_ct2_model_dir_is_an_agent_error(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"garbage")
    with pytest.raises(AgentError, match="cannot load Whisper model"):
        FasterWhisperTranscriber(tmp_path)
