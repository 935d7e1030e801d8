"""Smart Turn v3.2: does the audio of a turn so far sound like the speaker is done?

The model (pipecat's ~8 M-parameter Whisper-tiny encoder with an attention-pooling classifier,
int8 ONNX, shipped inside the ``pipecat-ai`` wheel) reads Whisper log-mel features of the
last 8 s of 16 kHz audio and returns the probability that the turn is complete. Its input is
prepared the way it was trained (pipecat-ai/smart-turn ``train.py``: transformers'
``WhisperFeatureExtractor(chunk_length=8)`` with ``do_normalize=True``):

- keep the last 8 s (128,000 samples); a shorter clip is padded with zeros on the LEFT;
- normalize the whole 8 s window (padding included) to zero mean and unit variance;
- 80-bin log-mel spectrogram, n_fft 400, hop 160, Slaney mel, log10 clamped at max-8,
  ``(x + 4) / 4``, last frame dropped -> (80, 800) float32, input ``input_features``.

The spectrogram is faster-whisper's numpy ``FeatureExtractor`` (no torch: it runs on the
capture thread beside CSM without touching torch's thread pool); tests check the features
against transformers' extractor. The output ``logits`` is already a sigmoid probability.

How ONNX Runtime runs it (``TurnRuntime``) is chosen for the same answers, bit for bit, as
the plain int8 QDQ graph: this model turns last-bit float differences into P(done) moves of
up to ~0.2-0.7 on espeak speech (benchmarks/README.md), so any faster route that rounds
differently changes what it decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from agent.audio import PIPELINE_RATE
from agent.embedded import PIPECAT_PIN
from agent.errors import AgentError

WINDOW_S = 8  # seconds of audio the model reads (the end of the turn)
WINDOW_SAMPLES = WINDOW_S * PIPELINE_RATE
N_MELS, N_FRAMES = 80, 800
NORM_EPS = 1e-7  # transformers' zero_mean_unit_var_norm epsilon


@dataclass(frozen=True)
class TurnRuntime:
    """How ONNX Runtime runs Smart Turn.

    ``threads``: intra-op threads (1: a decision must not compete with CSM for the cores).
    ``fold_weights``: dequantize the int8 weights once at load instead of on every run
    (~10% less CPU per decision here, the same output bits); False runs the reference graph.
    """

    threads: int = 1
    fold_weights: bool = True

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise AgentError(f"end-of-turn model threads must be at least 1, got {self.threads}")


def session_options(runtime: TurnRuntime):
    """ONNX Runtime session options for ``runtime`` (see ``TurnRuntime``)."""
    import onnxruntime  # comes with faster-whisper; imported here so a broken install is a notice

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = runtime.threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # BASIC runs the int8 (QDQ) graph as dequantize + float ops. ENABLE_ALL fuses it into
    # u8 x s8 integer kernels that saturate on AVX2 CPUs without VNNI (like this project's):
    # P(done) moved by up to 0.5 on the same clip here.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if runtime.fold_weights:
        # Constant folding skips DequantizeLinear by default (kept for QDQ fusion); with QDQ
        # fusion off it dequantizes the weights once, with the same kernel, at load.
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        # A MatMul whose weight became constant would prepack it, and the prepacked sgemm
        # sums in another order: last-bit differences this model amplifies (see above).
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


@lru_cache(maxsize=1)
def _extractor():
    # Lazy: importing faster_whisper loads PyAV and CTranslate2 (~0.7 s) for a numpy spectrogram.
    from faster_whisper.feature_extractor import FeatureExtractor

    return FeatureExtractor(feature_size=N_MELS, sampling_rate=PIPELINE_RATE, chunk_length=WINDOW_S)


def last_window(audio: np.ndarray) -> np.ndarray:
    """The last 8 s of 16 kHz ``audio`` as float32, left-padded with zeros to exactly 128,000 samples."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)[-WINDOW_SAMPLES:]
    return np.pad(audio, (WINDOW_SAMPLES - len(audio), 0)) if len(audio) < WINDOW_SAMPLES else audio


def turn_features(audio: np.ndarray) -> np.ndarray:
    """Smart Turn's input for 16 kHz float ``audio`` (any length): (80, 800) float32 log-mel."""
    window = last_window(audio)
    window = (window - window.mean()) / np.sqrt(window.var() + NORM_EPS)
    return _extractor()(window, padding=0).astype(np.float32)


class SmartTurnModel:
    """The Smart Turn ONNX model run as ``runtime`` says: ``probability(audio)`` of a finished turn."""

    INPUT = "input_features"

    def __init__(self, path: Path, runtime: TurnRuntime | None = None) -> None:
        import onnxruntime  # comes with faster-whisper; imported here so a broken install is a notice

        self.path = Path(path)
        self.runtime = runtime or TurnRuntime()
        fix = f"reinstall it with `pip install --force-reinstall --no-deps {PIPECAT_PIN}`"
        try:
            options = session_options(self.runtime)
            self._session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # a truncated or foreign file
            raise AgentError(f"cannot load the end-of-turn model {self.path}: {error}: {fix}") from None
        inputs = [i.name for i in self._session.get_inputs()]
        if inputs != [self.INPUT]:
            raise AgentError(f"{self.path} is not a Smart Turn v3 model (inputs {inputs}): {fix}")
        try:  # one run at load: a file that loads but cannot run fails here, not mid-conversation
            self.probability(np.zeros(PIPELINE_RATE // 2, np.float32))
        except Exception as error:
            raise AgentError(f"the end-of-turn model {self.path} does not run: {error}: {fix}") from None

    def probability_of_features(self, features: np.ndarray) -> float:
        """P(turn complete) for one (80, 800) feature array from ``turn_features``."""
        (out,) = self._session.run(None, {self.INPUT: features.reshape(1, N_MELS, N_FRAMES)})
        return float(np.asarray(out).reshape(-1)[0])

    def probability(self, audio: np.ndarray) -> float:
        """P(turn complete), 0..1, for the 16 kHz float audio of the turn so far (its last 8 s count)."""
        return self.probability_of_features(turn_features(audio))


def load_turn_model(path: str | Path | None = None, runtime: TurnRuntime | None = None) -> SmartTurnModel:
    """Smart Turn v3.2 from the installed ``pipecat-ai`` wheel (or ``path``); AgentError naming the fix."""
    from agent.embedded import smart_turn_onnx

    return SmartTurnModel(Path(path) if path is not None else smart_turn_onnx(), runtime)


def try_load_turn_model(path: str | Path | None = None) -> tuple[SmartTurnModel | None, str | None]:
    """``(model, None)``, or ``(None, notice)`` with a one-line notice when the model cannot be used:
    the caller then ends turns with the fixed-silence rule instead of failing."""
    try:
        return load_turn_model(path), None
    except AgentError as error:
        return None, f"end-of-turn model unavailable, turns end after a fixed pause instead ({error})"
