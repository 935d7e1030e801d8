"""The MLX engine as the agent uses it: one generator protocol, the conversation cache, the factory.

Torch is the reference. Both engines get the tiny checkpoint's float32 weights, the same Mimi
and tokenizer, and a multi-turn conversation with audio context; greedy frames must be equal
turn after turn, with the MLX conversation cache on and off; sampled MLX streams must be equal
with and without the cache for the same seed, also after a cancelled (barged-in) turn.
"""

from __future__ import annotations

import threading

import pytest
import torch

from csm_engine.errors import CSMError
from csm_engine.speech import LocalSpeechGenerator, SpeechGenerator, default_engine, resolve_engine
from csm_engine.tokens import Segment

mx = pytest.importorskip("mlx.core", reason="MLX is not importable here: pip install 'mlx[cpu]' (Linux) or mlx (macOS)")

BLOCK = 4  # small prefill blocks: prompts span several, reuse rounds down to a block start
GREEDY = dict(temperature=0.0, topk=1)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint, tiny_generator):
    """(torch Generator, MLXGenerator) over the tiny checkpoint, sharing its Mimi and tokenizer."""
    from csm_engine.generator import Generator
    from csm_engine.mlx.convert import load_mlx_model
    from csm_engine.mlx.generator import MLXGenerator
    from csm_engine.weights.loading import load_csm_model

    torch_gen = Generator(load_csm_model(str(tiny_checkpoint)), tiny_generator.codec, tiny_generator.tokenizer,
                          dtype="float32")
    mlx_gen = MLXGenerator(load_mlx_model(str(tiny_checkpoint)), tiny_generator.codec, tiny_generator.tokenizer)
    for g in (torch_gen, mlx_gen):
        g.prefill_block = BLOCK
    return torch_gen, mlx_gen


def _clip(gens, codes: torch.Tensor, tag: float) -> torch.Tensor:
    """A stand-in waveform every engine knows as the decoding of ``codes`` (never Mimi-encoded)."""
    audio = torch.full((codes.shape[1] * 1920,), tag)
    for g in gens:
        g.remember_codes(audio, codes)
    return audio


def _user(gens, text: str, n_frames: int, seed: int) -> Segment:
    codes = torch.randint(1, 2048, (32, n_frames), generator=torch.Generator().manual_seed(seed))
    return Segment(0, text, _clip(gens, codes, float(seed)))


def _frames(gen, text, context, n_frames, *, cached=True, cancel_after=None, **sampling):
    if not cached:
        gen.forget_cache()
    prompt = gen.build_prompt(text, 1, context, 80 * n_frames, runaway_guard=False)
    cancel = threading.Event()
    out = []
    for frame in gen.frames(prompt, cancel=cancel, **sampling):
        out.append(frame.clone())
        if cancel_after is not None and len(out) == cancel_after:
            cancel.set()
    if not cached:
        assert gen.last_prefill_rows == prompt.tokens.shape[0]
    return prompt, torch.stack(out)


def _conversation(gens, speak, turns=3):
    """Run ``turns`` agent replies after user turns; ``speak(text, context)`` -> frames of one reply."""
    context, replies = [], []
    lines = [("hello there how are you ?", "fine thanks"), ("what about the weather ?", "it is sunny today"),
             ("and you ?", "fine and you")]
    for i, (asked, said) in enumerate(lines[:turns]):
        context.append(_user(gens, asked, 3 + i, seed=20 + i))
        frames = speak(said, list(context))
        replies.append(frames)
        context.append(Segment(1, said + ".", _clip(gens, frames.T.contiguous(), -1.0 - i)))
    return replies


def test_both_engines_satisfy_the_one_protocol(engines):
    for g in engines:
        assert isinstance(g, SpeechGenerator) and isinstance(g, LocalSpeechGenerator)
    assert [g.engine for g in engines] == ["torch", "mlx"]


def test_greedy_frames_equal_torch_over_a_conversation_with_and_without_the_cache(engines):
    torch_gen, mlx_gen = engines
    gens = engines
    torch_gen.forget_cache()
    want = _conversation(gens, lambda text, ctx: _frames(torch_gen, text, ctx, 4, **GREEDY)[1])
    prefilled = []

    def cached(text, ctx):
        prompt, frames = _frames(mlx_gen, text, ctx, 4, **GREEDY)
        prefilled.append((mlx_gen.last_prefill_rows, prompt.tokens.shape[0]))
        return frames

    mlx_gen.forget_cache()
    got_cached = _conversation(gens, cached)
    got_uncached = _conversation(gens, lambda text, ctx: _frames(mlx_gen, text, ctx, 4, cached=False, **GREEDY)[1])
    assert len({tuple(f) for f in torch.cat(want).tolist()}) > 3  # a real trajectory, not one repeated frame
    for w, c, u in zip(want, got_cached, got_uncached):
        assert torch.equal(c, w) and torch.equal(u, w)
    # Turns 2 and 3 ran only their new rows (and the block the cache's end fell in) through the backbone.
    assert prefilled[0][0] == prefilled[0][1]
    assert all(rows < total - 10 for rows, total in prefilled[1:]), prefilled


def test_sampled_streams_follow_the_seed_with_and_without_the_cache(engines):
    _, mlx_gen = engines
    mlx_gen.forget_cache()
    cached = _conversation(engines, lambda text, ctx: _frames(mlx_gen, text, ctx, 6, seed=7, topk=50)[1])
    uncached = _conversation(engines, lambda text, ctx: _frames(mlx_gen, text, ctx, 6, cached=False, seed=7,
                                                                topk=50)[1])
    other = _conversation(engines, lambda text, ctx: _frames(mlx_gen, text, ctx, 6, seed=8, topk=50)[1], turns=1)
    for c, u in zip(cached, uncached):
        assert torch.equal(c, u)
    assert not torch.equal(cached[0], other[0])


def test_a_cancelled_turn_rolls_the_cache_back_to_what_was_heard(engines):
    _, mlx_gen = engines
    gens = engines
    mlx_gen.forget_cache()
    user1 = _user(gens, "hello there how are you ?", 4, seed=31)
    _, cut = _frames(mlx_gen, "fine thanks and you", [user1], 8, cancel_after=3, seed=3)
    assert len(cut) == 3  # barge-in after three frames
    heard = Segment(1, "fine thanks and you.", _clip(gens, cut[:2].T.contiguous(), -5.0))  # two frames played
    context = [user1, heard, _user(gens, "what about the weather ?", 3, seed=32)]
    prompt, after = _frames(mlx_gen, "it is sunny today", context, 5, seed=4)
    assert mlx_gen.last_prefill_rows < prompt.tokens.shape[0]  # the turn before the cut was reused
    _, fresh = _frames(mlx_gen, "it is sunny today", context, 5, cached=False, seed=4)
    assert torch.equal(after, fresh)


def test_mimi_on_mlx_streams_the_torch_pcm_within_1e_4(engines):
    """moshi_mlx's Mimi, given the torch codec's weights, decodes the same frames to the same PCM
    within 1e-4 (about 3 steps of 16-bit PCM). Measured on this checkpoint's random Mimi: max
    |difference| 4.0e-5, RMS 1.1e-5 against a signal of peak 0.18 and RMS 0.14 (-82 dB)."""
    pytest.importorskip("moshi_mlx", reason="Mimi on MLX needs moshi_mlx (pip install --no-deps moshi-mlx)")
    from csm_engine.mlx.generator import MLXGenerator
    from csm_engine.mlx.mimi import MLXMimiCodec

    torch_gen, mlx_gen = engines
    on_mlx = MLXGenerator(mlx_gen.model, MLXMimiCodec(torch_gen.codec), mlx_gen.tokenizer)
    opts = dict(max_audio_length_ms=80 * 4, runaway_guard=False, silence=None, seed=0, **GREEDY)
    frames: list[list[torch.Tensor]] = [[], []]
    want = torch_gen.generate("fine thanks", 1, on_frame=lambda i, f: frames[0].append(f), **opts)
    got = on_mlx.generate("fine thanks", 1, on_frame=lambda i, f: frames[1].append(f), **opts)
    assert torch.equal(torch.stack(frames[0]), torch.stack(frames[1]))
    assert got.shape == want.shape and want.abs().max() > 0.01
    diff = (got - want).abs()
    print(f"Mimi MLX vs torch: max |diff| {diff.max():.2e}, rms {diff.pow(2).mean().sqrt():.2e}, "
          f"peak {want.abs().max():.3f}, rms {want.pow(2).mean().sqrt():.3f}")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# The factory and the engine choice
# ---------------------------------------------------------------------------------------------


def test_auto_is_mlx_only_on_apple_silicon():
    assert default_engine("Darwin", "arm64") == "mlx"
    assert default_engine("Darwin", "x86_64") == "torch" and default_engine("Linux", "aarch64") == "torch"
    assert resolve_engine("auto") == default_engine() and resolve_engine("MLX") == "mlx"
    with pytest.raises(CSMError, match="unknown engine 'tpu': use torch, mlx or auto"):
        resolve_engine("tpu")


def test_the_factory_loads_mlx_at_each_precision_and_refuses_torch_only_ones(tiny_checkpoint):
    import mlx.nn as nn

    from csm_engine.mlx.generator import MLXGenerator
    from csm_engine.speech import load_speech_generator

    gen = load_speech_generator("mlx", tiny_checkpoint, dtype="int4")
    assert isinstance(gen, MLXGenerator) and gen.precision == "int4"
    assert isinstance(gen.model.backbone.layers[0].mlp.w1, nn.QuantizedLinear)
    assert gen.model.backbone.layers[0].mlp.w1.bits == 4 and gen.model.cache_dtype == mx.bfloat16
    with pytest.raises(CSMError, match="unknown dtype 'int8-block': choose one of float32, bfloat16, int8, int4"):
        load_speech_generator("mlx", tiny_checkpoint, dtype="int8-block")


def test_default_precision_follows_the_chips_bandwidth():
    from csm_engine.config import get_flavor
    from csm_engine.mlx.precisions import APPLE_CHIPS, bound_fps, chip_named, default_precision, weights_read_per_frame
    from csm_engine.precision import lookup

    one_b = get_flavor("1B")
    # 16 backbone layers once, 4 decoder layers 31 times, the heads and the projection: 4.55 G weights
    # (the "~4.1 G" left out the decoder's projection and heads).
    assert 4.5e9 < weights_read_per_frame(one_b) < 4.6e9
    bf16 = lookup("bfloat16", "mlx")
    assert 112 < 12.5 * weights_read_per_frame(one_b) * 2 / 1e9 < 115  # GB/s for real time in bf16
    assert bound_fps(100, one_b, bf16) < 12.5
    chips = {c.name: c for c in APPLE_CHIPS}
    assert chip_named("Apple M2 Pro") is chips["M2 Pro"] and chip_named("Apple M2") is chips["M2"]
    assert chip_named("Intel(R) Core(TM) i7") is None
    picks = {name: default_precision(chips[name]) for name in ("M1", "M2", "M3 Pro", "M2 Pro", "M4 Max")}
    assert picks == {"M1": "int4", "M2": "int8", "M3 Pro": "int8", "M2 Pro": "bfloat16", "M4 Max": "bfloat16"}
    assert default_precision(None) in ("float32", "bfloat16", "int8", "int4")


@pytest.mark.slow
def test_mlx_speed_benchmark_reports_errors_chips_and_provenance(tmp_path):
    """benchmarks/mlx_speed.py's structure on tiny shapes (no timing is looked at)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mlx_speed

    out = tmp_path / "mlx.json"
    result = mlx_speed.main(["--flavor", "tiny", "--no-speed", "--no-torch", "--precisions", "float32,int8,int4",
                             "--error-activations", "float32", "--out", str(out)])
    errors = result["logit_error"]["rows"]
    assert set(errors) == {"int8", "int4"}
    assert 0 < errors["int8"]["decoder_rel_rms"] < errors["int4"]["decoder_rel_rms"] < 0.5
    assert [c["chip"] for c in result["apple_chips"]][:2] == ["M1", "M1 Pro"]
    assert result["apple_chips"][0]["precision_for_real_time"] == "int4"
    assert {"cpu", "date", "commit", "mlx"} <= set(result["provenance"]) and out.is_file()


@pytest.mark.slow
def test_parity_benchmark_compares_every_turn_and_fails_on_a_difference(monkeypatch):
    """benchmarks/mlx_parity.py (run at 1B shapes by hand, see benchmarks/README.md) on tiny shapes:
    equal frames pass, and one MLX frame changed is reported at its turn and frame."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mlx_parity

    result = mlx_parity.main(["--flavor", "tiny", "--frames", "4", "--block", "8"])
    assert result["equal"] and result["distinct_torch_frames"] > 3
    cached = result["mlx"]["cached"]["prefill_rows"]
    assert all(rows < total for rows, total in cached[1:]), cached  # later turns reused the cache
    assert all(rows == total for rows, total in result["mlx"]["uncached"]["prefill_rows"])
    frames = [torch.ones(4, 32, dtype=torch.long)] * 2
    changed = [frames[0], frames[1].clone()]
    changed[1][2, 5] = 7
    assert mlx_parity.compare(frames, changed)[1] == {"turn": 2, "frames": 4, "equal": False, "first_difference": 2}


@pytest.mark.slow
def test_mlx_speed_first_chunk_mode_brackets_the_long_turn_with_short_ones():
    """benchmarks/mlx_speed.py --first-chunk-only (the conversation cache's 1B check) on tiny shapes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mlx_speed

    result = mlx_speed.main(["--flavor", "tiny", "--precisions", "float32", "--long-precision", "float32", "--no-torch",
                             "--no-error", "--first-chunk-only", "--context-tokens", "300", "--reply-frames", "2"])
    row = result["rows"][0]
    assert "frames_per_s" not in row and "first_chunk_long_no_cache_ms" not in row
    assert row["first_chunk_long_prefill_rows"] < row["first_chunk_long_prompt_rows"] / 2
    for key in ("first_chunk_cpu_ms", "first_chunk_long_cpu_ms", "first_chunk_short_again_cpu_ms",
                "long_over_short_cpu"):
        assert row[key] > 0, key
