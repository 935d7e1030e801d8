"""One generated frame as a static step, replayed as a CUDA graph on GPUs.

At batch 1 a GPU is bound by launching kernels, not by arithmetic or memory: one frame is a
one-row backbone step, codebook 0, 31 decoder steps and 32 samplings, some two thousand small
kernels. Captured once as a CUDA graph, the frame is one launch.

A graph replays fixed addresses and fixed shapes, so everything a frame touches is static:

- the input row (tokens, mask) and its position are device buffers written before each replay;
  the backbone takes the position as a tensor (rope and mask are gathered from the
  precomputed tables by it, attention covers the whole preallocated cache under the mask);
- the decoder runs at the same positions every frame (0-1, then 2..31), so its int positions
  are constants of the graph;
- sampling noise (the exponential draws of ``sample_topk``) is drawn into a buffer with the
  caller's generator before each replay, so seeds keep working and the graph holds no RNG state;
- temperature and top-k are constants: each (temperature, topk, n_codes) gets its own graph.

``FrameStep`` runs the same static code with or without a graph (``graph=False``): CPU tests
check the static step against the model's usual path, and CUDA tests check the replayed graph
against the static step run directly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from csm_engine.model import CSMModel


class FrameStep:
    """Feed one row at a position and sample the next frame (32 codes) from static buffers."""

    def __init__(self, model: CSMModel, temperature: float, topk: int, n_codes: int | None, *, graph: bool = True):
        self.model = model
        self.temperature, self.topk = temperature, topk
        self.sampling = not (temperature <= 0 or topk == 1)
        cfg = model.config
        device = model.text_embeddings.weight.device
        self.tokens = torch.zeros(1, 1, cfg.frame_width, dtype=torch.long, device=device)
        self.mask = torch.zeros(1, 1, cfg.frame_width, dtype=torch.bool, device=device)
        # Warm-up and capture run at the last position: its cache row is garbage afterwards,
        # which is harmless (a row's keys are written before it is attended to) but means the
        # conversation cache must not count that row (see ``warmup_position``).
        self.pos = torch.full((1,), self.warmup_position(model), dtype=torch.long, device=device)
        vocab = n_codes or cfg.audio_vocab_size
        self.n_codes = n_codes
        self.noise = torch.ones(1, cfg.audio_num_codebooks, vocab, dtype=torch.float32, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.codes: Tensor | None = None
        if graph:
            self._capture()

    @staticmethod
    def warmup_position(model: CSMModel) -> int:
        """The backbone cache position that building a FrameStep overwrites."""
        return model.backbone.layers[0].attn.kv_cache.k.shape[2] - 1

    @torch.inference_mode()
    def _run(self) -> Tensor:
        return self.model.generate_frame(self.tokens, self.mask, self.pos, self.temperature, self.topk,
                                         n_codes=self.n_codes, noise=self.noise if self.sampling else None)

    def _capture(self) -> None:
        self.graph, self.codes = capture_graph(self._run)

    @torch.inference_mode()
    def __call__(self, tokens: Tensor, mask: Tensor, pos: int, generator: torch.Generator | None) -> Tensor:
        """The frame (32,) sampled after the row ``tokens``/``mask`` (33,) at position ``pos``."""
        self.tokens.view(-1).copy_(tokens.reshape(-1), non_blocking=True)
        self.mask.view(-1).copy_(mask.reshape(-1), non_blocking=True)
        self.pos.fill_(pos)
        if self.sampling:
            self.noise.exponential_(1, generator=generator)
        if self.graph is None:
            return self._run()[0]
        self.graph.replay()
        return self.codes[0].clone()


class FrameSteps:
    """The frame steps of one model, one per sampling setting, built on first use (a few kept)."""

    def __init__(self, model: CSMModel, *, graph: bool = True, keep: int = 4):
        self.model, self.graph, self.keep = model, graph, keep
        self._steps: OrderedDict[tuple, FrameStep] = OrderedDict()
        self._caches: tuple = ()

    def get(self, temperature: float, topk: int, n_codes: int | None) -> tuple[FrameStep, bool]:
        """The step for these settings, and whether it was just built (which overwrote a cache row)."""
        caches = tuple(layer.attn.kv_cache.k for layer in self.model.backbone.layers)
        if any(a is not b for a, b in zip(caches, self._caches)) or len(caches) != len(self._caches):
            self._steps.clear()  # setup_caches() made new buffers: the graphs point at the old ones
            self._caches = caches
        key = (float(temperature), int(topk), n_codes)
        step = self._steps.get(key)
        if step is not None:
            self._steps.move_to_end(key)
            return step, False
        step = FrameStep(self.model, temperature, topk, n_codes, graph=self.graph)
        self._steps[key] = step
        if len(self._steps) > self.keep:
            self._steps.popitem(last=False)
        return step, True


def capture_graph(run: Callable[[], Tensor], pool=None) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """Record ``run()`` as a CUDA graph; returns the graph and ``run``'s output, which every replay
    rewrites in place. Warms up on a side stream first: library handles and workspaces are
    created lazily and must not be created during capture. ``pool``: a memory pool to share
    with other graphs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA work on other threads meanwhile (the agent's Whisper) is allowed.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = run()
    return graph, output


def cuda_graphs_available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


__all__ = ["FrameStep", "FrameSteps", "cuda_graphs_available"]
