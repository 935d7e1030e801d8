"""The static frame step (what a CUDA graph replays) samples the frames of the usual path.

Both draw a frame's sampling noise for all 32 codebooks at once from the caller's generator,
so the same seed gives the same frames with and without graphs.

On CPU the static step runs directly (``graph=False``); with a GPU, the tests marked ``cuda``
check that replaying the captured graph gives exactly what running the step directly gives.
Correctness only: benchmarks/engine_speed.py --device cuda measures the speed.
"""

from __future__ import annotations

import pytest
import torch
from _engine_helpers import random_tiny_model, tiny_generator, word_tokenizer

from csm_engine.codec import MimiCodec
from csm_engine.cuda_graphs import FrameStep, FrameSteps
from csm_engine.errors import CSMError
from csm_engine.generator import Generator
from csm_engine.sampling import sample_topk

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
N_CODES = 2048


def _prompt(cfg, n: int, seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.text_vocab_size, (1, n, 33), generator=g)
    tokens[..., :32] = torch.randint(0, N_CODES, (1, n, 32), generator=g)
    mask = torch.rand(1, n, 33, generator=g) > 0.5
    return tokens.to(device), mask.to(device)


def _row(frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.cat([frame, frame.new_zeros(1)])
    mask = torch.ones(33, dtype=torch.bool, device=frame.device)
    mask[-1] = False
    return tokens, mask


@torch.inference_mode()
def _usual_frames(model, tokens, mask, n_frames, temperature, topk, seed):
    """The model's own path: the whole prompt at int positions, the caller's generator."""
    device = tokens.device
    model.setup_caches(1)
    gen = torch.Generator(device=device).manual_seed(seed)
    frames, start, t, m = [], 0, tokens, mask
    for _ in range(n_frames):
        frame = model.generate_frame(t, m, start, temperature, topk, gen, n_codes=N_CODES)[0]
        frames.append(frame)
        start += t.shape[1]
        row_t, row_m = _row(frame)
        t, m = row_t[None, None], row_m[None, None]
    return torch.stack(frames)


@torch.inference_mode()
def _step_frames(model, tokens, mask, n_frames, temperature, topk, seed, graph):
    """The static step: the prompt but its last row prefilled, then one row per frame."""
    device = tokens.device
    model.setup_caches(1)
    step = FrameStep(model, temperature, topk, N_CODES, graph=graph)
    gen = torch.Generator(device=device).manual_seed(seed)
    n = tokens.shape[1]
    if n > 1:
        model.backbone_hidden(tokens[:, :-1], mask[:, :-1], 0)
    frames, pos, row = [], n - 1, (tokens[0, -1], mask[0, -1])
    for _ in range(n_frames):
        frame = step(*row, pos, gen)
        frames.append(frame)
        pos += 1
        row = _row(frame)
    return torch.stack(frames)


def test_noise_drawn_beforehand_samples_what_the_generator_would():
    logits = torch.randn(1, N_CODES, generator=torch.Generator().manual_seed(0)) * 3
    for seed in range(20):
        drawn = torch.empty(1, N_CODES).exponential_(1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sample_topk(logits, 50, 0.9, noise=drawn),
                           sample_topk(logits, 50, 0.9, torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("temperature,topk", [(0.0, 1), (0.9, 50)])
def test_static_step_samples_the_frames_of_the_usual_path(temperature, topk):
    model = random_tiny_model(seed=6)
    tokens, mask = _prompt(model.config, 11, seed=1)
    usual = _usual_frames(model, tokens, mask, 6, temperature, topk, seed=3)
    static = _step_frames(model, tokens, mask, 6, temperature, topk, seed=3, graph=False)
    assert torch.equal(static, usual)
    assert static.max() < N_CODES


def test_cuda_graphs_need_a_cuda_model():
    model = random_tiny_model(seed=0)
    with pytest.raises(CSMError, match="CUDA graphs need the model on a CUDA device"):
        Generator(model, MimiCodec.load(None), word_tokenizer(model.config.text_vocab_size), cuda_graphs=True)


def test_generator_without_a_gpu_runs_no_graphs():
    assert tiny_generator(seed=0)._frame_steps is None


def test_frame_steps_are_rebuilt_for_new_caches():
    model = random_tiny_model(seed=0)
    model.setup_caches(1)
    steps = FrameSteps(model, graph=False)
    first, built = steps.get(0.9, 50, N_CODES)
    assert built and steps.get(0.9, 50, N_CODES) == (first, False)
    assert steps.get(0.5, 50, N_CODES)[1]  # other settings: another step
    model.setup_caches(1)
    again, built = steps.get(0.9, 50, N_CODES)
    assert built and again is not first


# ---- with a GPU -----------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("temperature,topk", [(0.0, 1), (0.9, 50)])
def test_replayed_graph_equals_the_step_run_directly(temperature, topk):
    model = random_tiny_model(seed=6).to("cuda")
    tokens, mask = _prompt(model.config, 11, seed=1, device="cuda")
    direct = _step_frames(model, tokens, mask, 8, temperature, topk, seed=3, graph=False)
    graphed = _step_frames(model, tokens, mask, 8, temperature, topk, seed=3, graph=True)
    assert torch.equal(graphed, direct)


@cuda
@pytest.mark.parametrize("temperature,topk", [(0.0, 1), (0.9, 50)])
def test_graphed_generator_speaks_the_frames_of_the_eager_one(temperature, topk):
    codec = MimiCodec.load(None, device="cuda")
    model = random_tiny_model(seed=6).to("cuda")
    tok = word_tokenizer(model.config.text_vocab_size)
    eager = Generator(model, codec, tok, cuda_graphs=False)
    graphed = Generator(model, codec, tok, cuda_graphs=True)
    outs = []
    for gen in (eager, graphed):
        gen.model.setup_caches(1)
        prompt = gen.build_prompt("hello there how are you ?", 1, [], 80 * 6, runaway_guard=False)
        outs.append(torch.stack(list(gen.frames(prompt, temperature=temperature, topk=topk, seed=4))))
    assert graphed._frame_steps is not None and eager._frame_steps is None
    assert torch.equal(outs[0], outs[1])


def test_prepare_builds_the_step_ahead_and_keeps_the_cache_record_true():
    gen = tiny_generator(seed=1)
    gen.prepare(0.9, 50)  # no graphs on a CPU: nothing to build
    gen._frame_steps = FrameSteps(gen.model, graph=False)  # the step a graph replays, run directly
    prompt = gen.build_prompt("hello there", 1, [], 80 * 3, runaway_guard=False)
    list(gen.frames(prompt, seed=1, temperature=0.5, topk=20))
    held = gen.conversation_cache.length
    gen.prepare(0.9, 50)
    assert len(gen._frame_steps._steps) == 2
    assert gen.conversation_cache.length == min(held, FrameStep.warmup_position(gen.model))
    gen.prepare(0.9, 50)
    assert len(gen._frame_steps._steps) == 2
