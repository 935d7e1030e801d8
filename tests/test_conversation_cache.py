"""The conversation cache: a new turn prefills only the rows the backbone cache does not hold,
and outputs are identical with and without it (float32, fixed seeds, tiny random model)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from _engine_helpers import tiny_generator

from csm_engine.codec import MimiCodec
from csm_engine.cuda_graphs import FrameSteps
from csm_engine.tokens import Segment

BLOCK = 4  # small prefill blocks: prompts span several, and reuse rounds down to a block start


@pytest.fixture(scope="module", params=[
    "eager",
    "static-step",  # the frame step a CUDA graph replays, run directly (see test_cuda_graphs.py)
    pytest.param("cuda-graph", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def gen(request):
    if request.param == "cuda-graph":
        g = tiny_generator(seed=3, codec=MimiCodec.load(None, device="cuda"), device="cuda")
        assert g._frame_steps is not None
    else:
        g = tiny_generator(seed=3)
        if request.param == "static-step":
            g._frame_steps = FrameSteps(g.model, graph=False)
    g.prefill_block = BLOCK
    return g


def _audio_with_codes(gen, codes: torch.Tensor, tag: float) -> torch.Tensor:
    """A stand-in waveform registered as the decoding of ``codes`` (so it is never Mimi-encoded)."""
    audio = torch.full((codes.shape[1] * 1920,), tag)
    gen.remember_codes(audio, codes)
    return audio


def _user_turn(gen, text: str, n_frames: int, seed: int) -> Segment:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(1, 2048, (32, n_frames), generator=g)
    return Segment(0, text, _audio_with_codes(gen, codes, float(seed)))


def _frames(gen, text, speaker, context, n_frames, seed, cancel=None):
    prompt = gen.build_prompt(text, speaker, context, 80 * n_frames, runaway_guard=False)
    frames = list(gen.frames(prompt, seed=seed, cancel=cancel))
    return prompt, torch.stack(frames).cpu()


def _uncached(gen, text, speaker, context, n_frames, seed):
    gen.forget_cache()
    prompt, frames = _frames(gen, text, speaker, context, n_frames, seed)
    assert gen.last_prefill_rows == prompt.tokens.shape[0]
    return frames


def test_second_turn_prefills_only_new_rows_and_matches_uncached(gen):
    gen.forget_cache()
    user1 = _user_turn(gen, "hello there how are you ?", 6, seed=11)
    p1, reply1 = _frames(gen, "fine thanks", 1, [user1], 5, seed=1)
    agent1 = Segment(1, "fine thanks.", _audio_with_codes(gen, reply1.T.contiguous(), -1.0))
    user2 = _user_turn(gen, "what about the weather ?", 4, seed=12)
    context2 = [user1, agent1, user2]

    p2, cached = _frames(gen, "it is sunny today", 1, context2, 5, seed=2)
    # Held: turn 1's prompt and the 4 frames fed back; all of it is a prefix of turn 2's prompt.
    held = p1.tokens.shape[0] + reply1.shape[0] - 1
    assert torch.equal(p2.tokens[:held, :32][p1.tokens.shape[0]:], reply1[:-1])
    assert gen.last_prefill_rows == p2.tokens.shape[0] - held // BLOCK * BLOCK

    assert torch.equal(cached, _uncached(gen, "it is sunny today", 1, context2, 5, seed=2))


def test_trimmed_context_invalidates_the_cache(gen):
    words = ["hello", "how", "what", "fine"]
    turns = [_user_turn(gen, f"{w} there .", 5, seed=20 + i) for i, w in enumerate(words)]
    gen.forget_cache()
    p_old, _ = _frames(gen, "fine thanks", 1, turns, 3, seed=5)
    # The window is full: the oldest turn is dropped, so the rows at each position change.
    p, cached = _frames(gen, "fine thanks", 1, turns[1:], 3, seed=5)
    # Only the leading rows that are equal position by position (BOS, speaker tag) are reused.
    n = min(p_old.tokens.shape[0], p.tokens.shape[0])
    equal = (p_old.tokens[:n] == p.tokens[:n]).all(1) & (p_old.mask[:n] == p.mask[:n]).all(1)
    common = int((~equal).nonzero()[0, 0])
    assert common < gen.segment_frames(turns[1])[0].shape[0]
    assert gen.last_prefill_rows == p.tokens.shape[0] - common // BLOCK * BLOCK
    assert torch.equal(cached, _uncached(gen, "fine thanks", 1, turns[1:], 3, seed=5))


def test_identical_prompt_recomputes_only_its_last_block(gen):
    ctx = [_user_turn(gen, "how are you ?", 4, seed=30)]
    gen.forget_cache()
    p, first = _frames(gen, "fine", 1, ctx, 3, seed=9)
    _, again = _frames(gen, "fine", 1, ctx, 3, seed=9)
    n = p.tokens.shape[0]
    assert gen.last_prefill_rows == n - (n - 1) // BLOCK * BLOCK
    assert torch.equal(first, again)


@pytest.mark.parametrize("precision", ["int8", "int8-block", "int8-hybrid", "int8-dynamic"])
def test_repeated_call_is_reproducible_at_quantized_precisions(precision):
    """Blocks are aligned to positions, so a reused prefix never changes how a row is batched."""
    from csm_engine.quantize import apply_precision, block_kernel_available, fbgemm_available

    if precision in ("int8-hybrid", "int8-dynamic") and not fbgemm_available():
        pytest.skip("fbgemm (x86) only")
    if precision == "int8-block" and not block_kernel_available():
        pytest.skip("the AVX2 kernel does not build here")
    g = tiny_generator(seed=4)
    g.prefill_block = BLOCK
    apply_precision(g.model, precision)
    ctx = [_user_turn(g, "how are you ?", 6, seed=31), _user_turn(g, "hello there .", 5, seed=32)]
    _, first = _frames(g, "fine", 1, ctx, 4, seed=9)
    _, again = _frames(g, "fine", 1, ctx, 4, seed=9)
    assert 0 < g.last_prefill_rows <= BLOCK
    assert torch.equal(first, again)
    g.forget_cache()
    _, cold = _frames(g, "fine", 1, ctx, 4, seed=9)
    assert torch.equal(first, cold)


def test_cancelled_turn_leaves_a_valid_cache(gen):
    ctx = [_user_turn(gen, "hello .", 4, seed=40)]
    gen.forget_cache()
    cancel = threading.Event()
    prompt = gen.build_prompt("fine thanks", 1, ctx, 80 * 10, runaway_guard=False)
    for i, _frame in enumerate(gen.frames(prompt, seed=3, cancel=cancel)):
        if i == 2:
            cancel.set()
    ctx2 = ctx + [_user_turn(gen, "and you ?", 3, seed=41)]
    _, cached = _frames(gen, "fine", 1, ctx2, 4, seed=4)
    assert torch.equal(cached, _uncached(gen, "fine", 1, ctx2, 4, seed=4))


def test_new_caches_are_never_reused(gen):
    ctx = [_user_turn(gen, "hello .", 4, seed=50)]
    gen.forget_cache()
    _frames(gen, "fine", 1, ctx, 3, seed=6)
    gen.model.setup_caches(1)  # fresh, zeroed buffers
    p, frames = _frames(gen, "fine", 1, ctx, 3, seed=6)
    assert gen.last_prefill_rows == p.tokens.shape[0]
    assert torch.equal(frames, _uncached(gen, "fine", 1, ctx, 3, seed=6))


def test_streamed_pcm_is_identical_with_and_without_the_cache(gen):
    user1 = _user_turn(gen, "hello there .", 3, seed=60)
    opts = dict(max_audio_length_ms=80 * 3, runaway_guard=False, silence=None, seed=8)
    gen.forget_cache()
    codes: list[torch.Tensor] = []
    list(gen.stream("fine thanks", 1, [user1], on_frame=lambda i, f: codes.append(f.clone()), **opts))
    agent = Segment(1, "fine thanks.", _audio_with_codes(gen, torch.stack(codes, 1), -2.0))
    context = [user1, agent, _user_turn(gen, "and today ?", 2, seed=61)]
    cached = np.concatenate(list(gen.stream("sunny", 1, context, **opts)))
    assert gen.last_prefill_rows < sum(gen.segment_frames(s)[0].shape[0] for s in context)
    gen.forget_cache()
    uncached = np.concatenate(list(gen.stream("sunny", 1, context, **opts)))
    np.testing.assert_array_equal(cached, uncached)
