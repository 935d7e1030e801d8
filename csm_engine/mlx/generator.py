"""MLXGenerator: the torch ``Generator`` with its frame loop running on the MLX model.

Everything that is not model math is the torch engine's own code: prompt building and context
trimming (``Generator.build_prompt``), the streaming decode, silence guard and chunking
(``Generator.stream``), and Mimi decoding through ``MimiCodec.streaming()`` — so for the same
frames the PCM is the torch path's PCM. Only ``frames`` is replaced.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import mlx.core as mx
import numpy as np
import torch
from torch import Tensor

from csm_engine.codec import MimiCodec
from csm_engine.generator import Generator, Prompt
from csm_engine.mlx.model import MLXCSMModel
from csm_engine.tokens import TextTokenizer


class MLXGenerator(Generator):
    """``generate`` / ``stream`` with the options of ``csm_engine.generator.Generator``."""

    def __init__(self, model: MLXCSMModel, codec: MimiCodec, tokenizer: TextTokenizer):
        # The base class only needs config / eval() / caches_are_setup() / setup_caches() of the model.
        super().__init__(model, codec, tokenizer)  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        # Codes and PCM cross into torch on the CPU; the model itself lives on MLX's default device.
        return torch.device("cpu")

    def frames(self, prompt: Prompt, *, temperature: float = 0.9, topk: int = 50, seed: int | None = None,
               cancel: threading.Event | None = None) -> Iterator[Tensor]:
        """Yield sampled audio frames (32,) long until the all-zero end frame, the budget or ``cancel``.

        Same contract as ``Generator.frames``; the random stream differs from torch's (an MLX
        PRNG key seeded with ``seed``), greedy decoding (``topk=1`` or ``temperature=0``) is equal.
        """
        model: MLXCSMModel = self.model  # type: ignore[assignment]
        key = mx.random.key(seed if seed is not None else random.getrandbits(62))
        n_cb = self.config.audio_num_codebooks
        tokens = mx.array(prompt.tokens.numpy().astype(np.int32))[None]
        mask = mx.array(prompt.mask.numpy())[None]
        start = 0
        step_mask = mx.array(np.arange(n_cb + 1) < n_cb)[None, None]  # codes counted, text column not
        text_col = mx.zeros((1, 1, 1), dtype=mx.int32)
        for _ in range(prompt.max_frames):
            if cancel is not None and cancel.is_set():
                return
            key, frame_key = mx.random.split(key)
            frame_mx = model.generate_frame(tokens, mask, start, temperature, topk, frame_key)
            mx.eval(frame_mx)
            frame = torch.from_numpy(np.array(frame_mx[0], dtype=np.int64))
            yield frame
            if not frame.any():
                return
            start += tokens.shape[1]
            tokens = mx.concatenate([frame_mx[:, None, :], text_col], axis=-1)
            mask = step_mask
