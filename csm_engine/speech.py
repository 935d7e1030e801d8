"""One speech-generator interface whatever runs the model, and the one factory that picks the backend.

``SpeechGenerator`` is what the agent speaks through (the in-process engines and the
``--tts-url`` client alike): prompts built from a context of segments, PCM streamed in chunks as
frames decode, cancel between frames, seeds, codes remembered for clips it said. The in-process
engines (``LocalSpeechGenerator``) also expose the frame loop and the conversation cache.

    generator = load_speech_generator("auto", "sesame/csm-1b")   # MLX on a Mac, torch elsewhere

Engines: ``torch`` (``csm_engine.generator.Generator``; CPU, CUDA, MPS) and ``mlx``
(``csm_engine.mlx.generator.MLXGenerator``; Apple Silicon, or ``mlx[cpu]`` on Linux). ``auto`` is
MLX on macOS arm64 where MLX imports, torch everywhere else. ``dtype`` is a precision of the
chosen engine (``csm_engine.precision.precisions(engine)``); None / "auto" is its default.
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from csm_engine.errors import CSMError

if TYPE_CHECKING:
    from torch import Tensor

    from csm_engine.generator import FrameCallback
    from csm_engine.prompt import Prompt
    from csm_engine.tokens import Segment

ENGINES = ("auto", "torch", "mlx")


@runtime_checkable
class SpeechGenerator(Protocol):
    """What the agent needs of CSM: see the module docstring."""

    sample_rate: int
    config: Any  # max_seq_len, audio_num_codebooks, frame_width

    def build_prompt(self, text: str, speaker: int, context: Sequence[Segment], max_audio_length_ms: int,
                     runaway_guard: bool = True) -> Prompt: ...

    def segment_frames(self, segment: Segment) -> tuple[Tensor, Tensor]: ...

    def stream(self, text: str, speaker: int, context: Sequence[Segment] = (), *, max_audio_length_ms: int = ...,
               temperature: float = ..., topk: int = ..., seed: int | None = None, chunk_frames: int = ...,
               cancel: threading.Event | None = None, on_frame: FrameCallback | None = None,
               **options: Any) -> Iterator[np.ndarray]: ...

    def remember_codes(self, audio: Tensor, codes: Tensor) -> None: ...


@runtime_checkable
class LocalSpeechGenerator(SpeechGenerator, Protocol):
    """An in-process engine: the frame loop, whole utterances, the conversation cache."""

    engine: str  # "torch" | "mlx"
    last_prefill_rows: int  # prompt rows the last utterance ran through the backbone (the rest were cached)

    def frames(self, prompt: Prompt, *, temperature: float = 0.9, topk: int = 50, seed: int | None = None,
               cancel: threading.Event | None = None) -> Iterator[Tensor]: ...

    def generate(self, text: str, speaker: int, context: Sequence[Segment] = (), **kwargs: Any) -> Tensor: ...

    def forget_cache(self) -> None: ...

    def prepare(self, temperature: float = 0.9, topk: int = 50) -> None: ...


def default_engine(system: str | None = None, machine: str | None = None) -> str:
    """``mlx`` on macOS arm64 (Apple Silicon) where MLX imports, ``torch`` everywhere else."""
    system = system or platform.system()
    machine = machine or platform.machine()
    if system == "Darwin" and machine == "arm64":
        from csm_engine import mlx as backend  # imports no MLX

        if backend.is_available():
            return "mlx"
    return "torch"


def resolve_engine(engine: str | None) -> str:
    """``torch`` or ``mlx`` for an ``--engine`` value (CSMError with the choices for anything else)."""
    engine = (engine or "auto").lower()
    if engine not in ENGINES:
        raise CSMError(f"unknown engine {engine!r}: use torch, mlx or auto (MLX on Apple Silicon, torch elsewhere)")
    return default_engine() if engine == "auto" else engine


def engine_precisions(engine: str) -> tuple[str, ...]:
    """The precision names an engine takes as ``dtype`` (no torch or MLX import)."""
    from csm_engine.precision import precisions

    if resolve_engine(engine) == "mlx":
        import csm_engine.mlx.precisions  # noqa: F401  (registers MLX's precisions)
    return tuple(p.name for p in precisions(resolve_engine(engine)))


def load_speech_generator(engine: str | None = "auto", model_path: str | os.PathLike | None = None, *,
                          mimi_path: str | None = None, tokenizer_path: str | None = None, device: str = "cpu",
                          dtype: str | None = None, adapter: str | os.PathLike | None = None,
                          cuda_graphs: bool | None = None) -> LocalSpeechGenerator:
    """The in-process engine named by ``engine`` over a checkpoint dir or hub id (default CSM-1B).

    ``device``: where torch runs (the model on the torch engine; Mimi on MLX, which keeps it on
    the CPU unless it is a CUDA device). ``dtype``: a precision name of that engine, None/auto for
    its default. ``adapter``: a csm-finetune output merged into the weights.
    """
    chosen = resolve_engine(engine)
    if chosen == "mlx":
        from csm_engine import mlx as backend

        backend.require_mlx()
        from csm_engine.mlx.precisions import resolve

        precision = resolve(dtype).name  # a torch-only name fails here, naming MLX's choices
        mimi_device = str(device) if str(device).startswith("cuda") else "cpu"
        return backend.load_generator(None if model_path is None else str(model_path), mimi_path=mimi_path,
                                      tokenizer_path=tokenizer_path, precision=precision, device=mimi_device,
                                      adapter=adapter)
    from csm_engine.generator import load_generator

    return load_generator(None if model_path is None else str(model_path), mimi_path=mimi_path,
                          tokenizer_path=tokenizer_path, device=device, dtype=dtype, cuda_graphs=cuda_graphs,
                          adapter=adapter)


__all__ = ["ENGINES", "LocalSpeechGenerator", "SpeechGenerator", "default_engine", "engine_precisions",
           "load_speech_generator", "resolve_engine"]
