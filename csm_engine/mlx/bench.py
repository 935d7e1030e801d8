"""Timing of the MLX frame loop, as one row for ``benchmarks/engine_speed.py --backend mlx``.

Speed does not depend on weight values when the frame count is fixed, so a ``CSMConfig``
builds a random-weight MLX model directly (no torch copy of a 1B model in memory).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import numpy as np

from csm_engine.config import FRAME_MS, CSMConfig
from csm_engine.mlx.convert import build_model, mlx_dtype, quantize_model, state_dict_to_mlx
from csm_engine.mlx.model import MLXCSMModel


def _model(config_or_state_dict: CSMConfig | tuple[CSMConfig, Mapping[str, Any]] | MLXCSMModel,
           dtype: str | None, quantize_bits: int | None) -> MLXCSMModel:
    if isinstance(config_or_state_dict, MLXCSMModel):
        return config_or_state_dict
    if isinstance(config_or_state_dict, CSMConfig):
        model = MLXCSMModel(config_or_state_dict)  # MLX's own random init
        target = mlx_dtype(dtype)
        if target != mx.float32:
            model.set_dtype(target)
            model.cache_dtype = target
        if quantize_bits is not None:
            quantize_model(model, quantize_bits)
        mx.eval(model.parameters())
        model.setup_caches(1)
        return model
    config, state_dict = config_or_state_dict
    return build_model(config, state_dict_to_mlx(state_dict, config, dtype), quantize_bits=quantize_bits)


def bench_mlx(config_or_state_dict: CSMConfig | tuple[CSMConfig, Mapping[str, Any]] | MLXCSMModel, frames: int = 24,
              context_tokens: int = 128, *, dtype: str | None = None, quantize_bits: int | None = None,
              chunk_frames: int = 2, codec=None, warmup_frames: int = 2, seed: int = 0) -> dict[str, Any]:
    """Time a prefill of ``context_tokens`` text rows then ``frames`` sampled frames (top-k 50, T 0.9).

    ``config_or_state_dict``: a ``CSMConfig`` (random MLX weights), a ``(config, torch state dict)``
    pair, or a built ``MLXCSMModel``. With ``codec`` (a ``MimiCodec``) each frame is also decoded to
    PCM through its streaming decoder, as the generator does. Returned row:
    ``frames_per_s`` steady-state frames per second after the first chunk; ``rtf`` wall time of the
    whole utterance (prefill + frames [+ Mimi]) / its audio duration (below 1 is faster than real
    time); ``first_chunk_ms`` from start to the first ``chunk_frames`` frames being ready;
    ``prefill_ms`` the backbone prefill plus the first frame.
    """
    model = _model(config_or_state_dict, dtype, quantize_bits)
    cfg = model.config
    n_cb = cfg.audio_num_codebooks
    rng = np.random.default_rng(seed)
    prompt = np.zeros((1, context_tokens, n_cb + 1), dtype=np.int32)
    prompt[..., -1] = rng.integers(0, cfg.text_vocab_size, context_tokens)
    prompt_mask = np.zeros(prompt.shape, dtype=bool)
    prompt_mask[..., -1] = True
    step_mask = mx.array(np.arange(n_cb + 1) < n_cb)[None, None]
    text_col = mx.zeros((1, 1, 1), dtype=mx.int32)

    def run(n_frames: int) -> list[float]:
        """Seconds from start until each frame is ready (and decoded when a codec is given)."""
        import contextlib

        key = mx.random.key(seed)
        tokens, mask, start = mx.array(prompt), mx.array(prompt_mask), 0
        stamps = []
        ctx = codec.streaming() if codec is not None else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx as decoder:
            for _ in range(n_frames):
                key, sub = mx.random.split(key)
                frame = model.generate_frame(tokens, mask, start, 0.9, 50, sub)
                mx.eval(frame)
                if decoder is not None:
                    import torch

                    decoder.decode_frame(torch.from_numpy(np.array(frame[0], dtype=np.int64)))
                stamps.append(time.perf_counter() - t0)
                start += tokens.shape[1]
                tokens = mx.concatenate([frame[:, None], text_col], axis=-1)
                mask = step_mask
        return stamps

    if warmup_frames:
        run(warmup_frames)
    stamps = run(frames)
    first = min(chunk_frames, frames) - 1
    steady = (frames - 1 - first) / (stamps[-1] - stamps[first]) if frames - 1 > first else float("nan")
    return {
        "backend": "mlx",
        "device": str(mx.default_device()),
        "dtype": str(dtype or "float32"),
        "quantize_bits": quantize_bits,
        "frames": frames,
        "context_tokens": context_tokens,
        "prefill_ms": stamps[0] * 1000,
        "first_chunk_ms": stamps[first] * 1000,
        "frames_per_s": steady,
        "rtf": stamps[-1] / (frames * FRAME_MS / 1000),
        "with_mimi": codec is not None,
    }
