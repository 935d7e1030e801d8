"""The fast generation path computes what the reference path computes, and its decoder loop is lean.

Correctness only: no test here measures time (benchmarks/engine_speed.py does).
"""

from __future__ import annotations

import pytest
import torch
from _engine_helpers import random_tiny_model
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(scope="module")
def model():
    m = random_tiny_model(seed=5)
    m.setup_caches(1)
    return m


def _frames(cfg, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.text_vocab_size, (1, n, 33), generator=g)
    tokens[..., :32] = torch.randint(0, cfg.audio_vocab_size, (1, n, 32), generator=g)
    mask = torch.rand(1, n, 33, generator=g) > 0.5
    return tokens, mask


@torch.inference_mode()
def test_int_positions_equal_tensor_positions(model):
    tokens, mask = _frames(model.config, 17, seed=0)
    reference = model.backbone_hidden(tokens, mask, torch.arange(17))
    model.reset_caches()
    fast = model.backbone_hidden(tokens, mask, 0)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_incremental_prefill_equals_one_prefill(model):
    tokens, mask = _frames(model.config, 20, seed=1)
    whole = model.backbone_hidden(tokens, mask, 0)
    model.reset_caches()
    parts = [model.backbone_hidden(tokens[:, a:b], mask[:, a:b], a) for a, b in ((0, 7), (7, 8), (8, 20))]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_attention_ignores_stale_cache_rows_beyond_the_current_length(model):
    tokens, mask = _frames(model.config, 12, seed=2)
    model.reset_caches()
    clean = model.backbone_hidden(tokens, mask, 0)
    # Fill positions 12.. with garbage, as a longer earlier turn would have left them.
    model.backbone_hidden(*_frames(model.config, 40, seed=3), 0)
    dirty = model.backbone_hidden(tokens, mask, 0)
    torch.testing.assert_close(dirty, clean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature,topk", [(0.0, 1), (0.9, 50)])
@torch.inference_mode()
def test_generate_frame_fast_path_samples_the_reference_frames(model, temperature, topk):
    tokens, mask = _frames(model.config, 9, seed=4)
    runs = []
    for use_int in (False, True):
        model.setup_caches(1)
        gen = torch.Generator().manual_seed(7)
        t, m, pos, start, out = tokens, mask, torch.arange(9), 0, []
        for _ in range(5):
            frame = model.generate_frame(t, m, start if use_int else pos, temperature, topk, gen)
            out.append(frame)
            start, pos = start + t.shape[1], pos[-1:] + 1
            t = torch.cat([frame, torch.zeros(1, 1, dtype=torch.long)], dim=1)[:, None]
            m = torch.ones_like(t, dtype=torch.bool)
            m[..., -1] = False
        runs.append(torch.cat(out))
    assert torch.equal(runs[0], runs[1])


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@torch.inference_mode()
def test_frame_step_builds_no_masks_positions_or_host_syncs(model):
    """One generated frame (backbone step + 31 decoder steps) runs only model math on views."""
    tokens, mask = _frames(model.config, 6, seed=5)
    model.setup_caches(1)
    model.generate_frame(tokens, mask, 0, 0.9, 50, torch.Generator().manual_seed(0))
    step_t = torch.zeros(1, 1, 33, dtype=torch.long)
    step_m = torch.ones(1, 1, 33, dtype=torch.bool)
    with _OpRecorder() as rec:
        model.generate_frame(step_t, step_m, 6, 0.9, 50, torch.Generator().manual_seed(0))
    forbidden = {"arange", "tril", "triu", "ones", "full", "nonzero", "_local_scalar_dense", "item", "index",
                 "index_put_", "masked_select", "repeat_interleave"}
    assert not forbidden & set(rec.ops), sorted(forbidden & set(rec.ops))
    # Bounded work per decoder step: no op count that grows with the frame or the context.
    per_step = len(rec.ops) / (model.config.audio_num_codebooks - 1)
    assert per_step < 150, per_step
