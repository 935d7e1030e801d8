"""Silero VAD, the model: speech probability of each 32 ms window, on ONNX Runtime or TorchScript.

The model file comes from the ``silero-vad`` package (found without importing it: its import
sets torch's thread count for the whole process).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from agent.audio import PIPELINE_RATE
from agent.embedded import silero_vad_jit
from agent.errors import AgentError

WINDOW = 512  # samples per Silero window at 16 kHz (32 ms)


class SileroModel:
    """Silero VAD with its recurrent state: ``probability(window)`` for 512-sample 16 kHz windows.

    Two runtimes for the same packaged model. ONNX Runtime (the default when installed; it
    comes with faster-whisper) runs it on one thread of its own in ~0.2 ms a window.
    TorchScript needs only torch but runs on torch's shared intra-op pool, where it contends
    with CSM generation (torch.set_num_threads is process-wide, so it is not touched here).
    """

    CONTEXT = 64  # samples of the previous window the ONNX graph expects in front of each window

    def __init__(self, path: Path, runtime: str) -> None:
        self.path, self.runtime = path, runtime
        try:
            if runtime == "onnx":
                import onnxruntime  # the runtime chosen at load time; the other one is never imported

                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = 1
                options.inter_op_num_threads = 1
                options.log_severity_level = 3
                self._session = onnxruntime.InferenceSession(
                    str(path), options, providers=["CPUExecutionProvider"]
                )
            else:
                import torch  # TorchScript runtime only

                self._jit = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as error:  # a truncated or foreign file
            raise AgentError(
                f"cannot load the VAD model {path}: {error}: reinstall it with "
                "`pip install --force-reinstall silero-vad`"
            ) from None
        self.reset()

    def reset(self) -> None:
        """Forget the recurrent state (start of a new stream)."""
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros((1, self.CONTEXT), np.float32)
        if self.runtime == "jit":
            self._jit.reset_states()

    def probability(self, window: np.ndarray) -> float:
        """Speech probability (0..1) of one 512-sample float32 16 kHz window."""
        if self.runtime == "onnx":
            x = np.concatenate([self._context, window.reshape(1, WINDOW)], axis=1)
            out, self._state = self._session.run(
                None, {"input": x, "state": self._state, "sr": np.array(PIPELINE_RATE, dtype=np.int64)}
            )
            self._context = x[:, -self.CONTEXT :]
            return float(out.reshape(-1)[0])
        import torch  # TorchScript runtime only (imported at load)

        with torch.inference_mode():
            return float(self._jit(torch.from_numpy(np.ascontiguousarray(window)).unsqueeze(0), PIPELINE_RATE))


class SileroStream:
    """Silero over a stream cut into blocks of any length: whole windows are scored as they fill,
    the rest waits for the next block. ``probability`` is the last window's (0 before the first)."""

    def __init__(self, model: SileroModel) -> None:
        self.model = model
        self.probability = 0.0
        self._pending = np.zeros(0, np.float32)

    def feed(self, audio: np.ndarray) -> float:
        self._pending = np.concatenate([self._pending, audio])
        while len(self._pending) >= WINDOW:
            self.probability = self.model.probability(self._pending[:WINDOW])
            self._pending = self._pending[WINDOW:]
        return self.probability


def load_silero_model(path: str | Path | None = None, *, runtime: str = "auto") -> SileroModel:
    """Load Silero VAD from the silero-vad package (or ``path``); runtime "onnx", "jit" or "auto"."""
    if runtime not in ("auto", "onnx", "jit"):
        raise AgentError(f"unknown VAD runtime {runtime!r}: use onnx, jit or auto")
    if runtime == "auto":
        runtime = "onnx" if importlib.util.find_spec("onnxruntime") is not None else "jit"
    if path is None:
        jit = silero_vad_jit()
        path = jit.with_name("silero_vad.onnx") if runtime == "onnx" else jit
    return SileroModel(Path(path), runtime)
