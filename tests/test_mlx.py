"""The MLX backend against the torch engine (tiny flavor, float32, ``mlx[cpu]`` on Linux).

The torch engine is the reference: both get the same random weights and the same token frames
and must agree on backbone logits, decoder logits, greedy frames and the PCM of a streamed
greedy generation.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from csm_engine.config import SAMPLES_PER_FRAME, CSMConfig, get_flavor
from csm_engine.errors import CSMError
from csm_engine.model import CSMModel

ATOL = 1e-4


def test_import_without_mlx_names_the_install_command():
    # A real interpreter where `import mlx` fails: the package imports, the backend says how to fix it.
    code = textwrap.dedent("""
        import sys
        sys.modules["mlx"] = None  # makes `import mlx...` raise ImportError
        import csm_engine.mlx as m
        assert not m.is_available()
        for use in (lambda: m.MLXGenerator, lambda: m.load_generator("x")):
            try:
                use()
            except m.CSMError as e:
                print(e)
            else:
                raise SystemExit("no CSMError")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines == ["MLX backend not available: pip install 'mlx[cpu]' (Linux) or mlx (macOS)"] * 2


mx = pytest.importorskip("mlx.core", reason="MLX is not importable here: pip install 'mlx[cpu]' (Linux) or mlx (macOS)")

from csm_engine.mlx.convert import build_model, quantize_model, state_dict_to_mlx  # noqa: E402
from csm_engine.mlx.model import MLXCSMModel, sample_topk  # noqa: E402


def _random_torch_model(cfg: CSMConfig, seed: int) -> CSMModel:
    """A float32 CSMModel with random weights of realistic spread (norm scales away from 1)."""
    model = CSMModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                fan_in = p.shape[1] if name == "audio_head" else p.shape[-1]  # audio_head is (31, in, out)
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / fan_in ** 0.5))
        model.text_embeddings.weight.mul_(4.0)
        model.audio_embeddings.weight.mul_(4.0)
        model.audio_head.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[CSMModel, MLXCSMModel, CSMConfig]:
    """(torch, mlx, config) sharing one random tiny checkpoint."""
    cfg = get_flavor("tiny")
    ours = _random_torch_model(cfg, seed=11)
    ours.setup_caches(1)
    theirs = build_model(cfg, state_dict_to_mlx(ours.state_dict(), cfg))
    return ours, theirs, cfg


def _context_frames(cfg: CSMConfig, n_text: int, n_audio: int, n_prompt: int, seed: int = 0):
    """Text rows, audio rows (with the all-zero end row), then the prompt's text rows; (1, T, 33)."""
    g = torch.Generator().manual_seed(seed)
    n_cb = cfg.audio_num_codebooks
    total = n_text + n_audio + n_prompt
    tokens = torch.zeros(total, n_cb + 1, dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    text_rows = list(range(n_text)) + list(range(n_text + n_audio, total))
    tokens[text_rows, -1] = torch.randint(0, cfg.text_vocab_size, (len(text_rows),), generator=g)
    mask[text_rows, -1] = True
    tokens[n_text:n_text + n_audio - 1, :n_cb] = torch.randint(1, cfg.audio_vocab_size, (n_audio - 1, n_cb),
                                                               generator=g)
    mask[n_text:n_text + n_audio, :n_cb] = True
    return tokens[None], mask[None]


def _mx(t: torch.Tensor):
    return mx.array(t.numpy())


def test_backbone_logits_match_torch(pair):
    ours, theirs, cfg = pair
    tokens, mask = _context_frames(cfg, n_text=6, n_audio=5, n_prompt=4)
    with torch.inference_mode():
        want = ours.codebook0_head(ours.backbone_hidden(tokens, mask, torch.arange(tokens.shape[1])))
    got = theirs.codebook0_head(theirs.backbone_hidden(_mx(tokens), _mx(mask), 0))
    assert want.abs().max() > 1.0  # logits with real spread, so the tolerance means something
    np.testing.assert_allclose(np.array(got), want.numpy(), atol=ATOL, rtol=1e-4)


def test_backbone_extension_at_an_offset_matches_one_prefill(pair):
    # Prefill 9 rows then extend by 3 at position 9 == the torch model over all 12 at once.
    ours, theirs, cfg = pair
    tokens, mask = _context_frames(cfg, n_text=4, n_audio=4, n_prompt=4, seed=3)
    with torch.inference_mode():
        want = ours.codebook0_head(ours.backbone_hidden(tokens, mask, torch.arange(12)))[:, 9:]
    theirs.backbone_hidden(_mx(tokens[:, :9]), _mx(mask[:, :9]), 0)
    got = theirs.codebook0_head(theirs.backbone_hidden(_mx(tokens[:, 9:]), _mx(mask[:, 9:]), 9))
    np.testing.assert_allclose(np.array(got), want.numpy(), atol=ATOL, rtol=1e-4)


def test_decoder_logits_match_torch_for_every_codebook(pair):
    ours, theirs, cfg = pair
    n_cb = cfg.audio_num_codebooks
    tokens, mask = _context_frames(cfg, n_text=5, n_audio=3, n_prompt=3, seed=1)
    codes = torch.randint(0, cfg.audio_vocab_size, (1, n_cb), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        h = ours.backbone_hidden(tokens, mask, torch.arange(tokens.shape[1]))[:, -1]
        emb = torch.stack([ours.embed_audio(i, codes[:, i]) for i in range(n_cb - 1)], dim=1)
        dh = ours.decoder_hidden(ours.projection(torch.cat([h[:, None], emb], dim=1)), torch.arange(n_cb))
        want = torch.stack([dh[:, i] @ ours.audio_head[i - 1] for i in range(1, n_cb)], dim=1)  # (1, 31, V)
    h_mx = mx.array(h.numpy())
    emb_mx = mx.stack([theirs.embed_audio(i, _mx(codes[:, i])) for i in range(n_cb - 1)], axis=1)
    dh_mx = theirs.decoder_hidden(theirs.projection(mx.concatenate([h_mx[:, None], emb_mx], axis=1)), 0)
    got = mx.stack([theirs.audio_head[i - 1](dh_mx[:, i]) for i in range(1, n_cb)], axis=1)
    assert want.abs().max() > 0.5
    np.testing.assert_allclose(np.array(got), want.numpy(), atol=ATOL, rtol=1e-4)


def _greedy_frames_torch(model: CSMModel, tokens, mask, n_frames: int) -> torch.Tensor:
    pos = torch.arange(tokens.shape[1])
    out = []
    for _ in range(n_frames):
        frame = model.generate_frame(tokens, mask, pos, temperature=0.0, topk=1)
        out.append(frame[0])
        tokens = torch.cat([frame, torch.zeros(1, 1, dtype=torch.long)], dim=1)[:, None]
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[..., -1] = False
        pos = pos[-1:] + 1
    return torch.stack(out)


def _greedy_frames_mlx(model: MLXCSMModel, tokens, mask, n_frames: int) -> np.ndarray:
    tokens, mask, start = _mx(tokens), _mx(mask), 0
    step_mask = mx.array(np.arange(tokens.shape[-1]) < tokens.shape[-1] - 1)[None, None]
    out = []
    for _ in range(n_frames):
        frame = model.generate_frame(tokens, mask, start, temperature=0.0, topk=1)
        out.append(np.array(frame[0]))
        start += tokens.shape[1]
        tokens = mx.concatenate([frame[:, None], mx.zeros((1, 1, 1), dtype=mx.int32)], axis=-1)
        mask = step_mask
    return np.stack(out)


def test_greedy_frames_equal_torch_with_context_audio(pair):
    ours, theirs, cfg = pair
    tokens, mask = _context_frames(cfg, n_text=6, n_audio=6, n_prompt=5, seed=4)
    want = _greedy_frames_torch(ours, tokens, mask, n_frames=6)
    got = _greedy_frames_mlx(theirs, tokens, mask, n_frames=6)
    assert len({tuple(f) for f in want.tolist()}) > 1  # frames differ from each other: a real trajectory
    np.testing.assert_array_equal(got, want.numpy())


def test_sampling_stays_in_the_top_k_and_follows_the_key():
    logits = mx.random.normal((4, 2051), key=mx.random.key(0))
    top5 = np.argsort(-np.array(logits), axis=-1)[:, :5]
    draws = [np.array(sample_topk(logits, 5, 0.9, mx.random.key(k)))[:, 0] for k in range(60)]
    for row in range(4):
        seen = {d[row] for d in draws}
        assert seen <= set(top5[row].tolist())
        assert len(seen) > 1
    again = np.array(sample_topk(logits, 5, 0.9, mx.random.key(7)))[:, 0]
    np.testing.assert_array_equal(again, draws[7])
    greedy = np.array(sample_topk(logits, 1, 0.9, None))[:, 0]
    np.testing.assert_array_equal(greedy, top5[:, 0])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_stays_close_to_float(pair, bits):
    ours, theirs, cfg = pair
    import mlx.nn as nn

    quant = quantize_model(build_model(cfg, state_dict_to_mlx(ours.state_dict(), cfg)), bits)
    assert isinstance(quant.backbone.layers[0].attn.q_proj, nn.QuantizedLinear)
    assert isinstance(quant.audio_head[0], nn.QuantizedLinear)
    assert isinstance(quant.audio_embeddings, nn.QuantizedEmbedding)
    tokens, mask = _context_frames(cfg, n_text=6, n_audio=5, n_prompt=4, seed=5)
    ref = np.array(theirs.codebook0_head(theirs.backbone_hidden(_mx(tokens), _mx(mask), 0)))
    got = np.array(quant.codebook0_head(quant.backbone_hidden(_mx(tokens), _mx(mask), 0)))
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"{bits}-bit: max |logit error| / max |logit| = {rel:.4f}")
    assert 0 < rel < {8: 0.02, 4: 0.25}[bits]


# ---------------------------------------------------------------------------------------------
# Through real checkpoint files: conversion cache, generator, CLI
# ---------------------------------------------------------------------------------------------


def test_converted_weights_are_cached_and_reused(tiny_checkpoint, tmp_path, monkeypatch):
    from csm_engine import weights
    from csm_engine.mlx.convert import load_mlx_weights

    config, first = load_mlx_weights(tiny_checkpoint, cache_dir=tmp_path)
    cached = list(tmp_path.glob("*.safetensors"))
    assert len(cached) == 1

    def no_torch_load(*_a, **_k):
        raise AssertionError("a cached checkpoint must not be converted again")

    monkeypatch.setattr(weights, "load_state_dict", no_torch_load)
    config2, second = load_mlx_weights(tiny_checkpoint, cache_dir=tmp_path)
    assert config2 == config
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(np.array(second[name]), np.array(first[name]))
    # Another dtype is another cache entry (and needs a conversion).
    with pytest.raises(AssertionError, match="converted again"):
        load_mlx_weights(tiny_checkpoint, cache_dir=tmp_path, dtype="bfloat16")


@pytest.fixture(scope="module")
def generators(tiny_checkpoint):
    """(torch Generator, MLXGenerator) over the same checkpoint, sharing one Mimi codec and tokenizer."""
    from csm_engine.generator import load_generator
    from csm_engine.mlx import load_mlx_model
    from csm_engine.mlx.generator import MLXGenerator

    torch_gen = load_generator(str(tiny_checkpoint))
    mlx_gen = MLXGenerator(load_mlx_model(str(tiny_checkpoint)), torch_gen.codec, torch_gen.tokenizer)
    return torch_gen, mlx_gen


def _greedy(n_frames: int) -> dict:
    return dict(max_audio_length_ms=80 * n_frames, runaway_guard=False, silence=None, topk=1, temperature=0.0,
                seed=0, chunk_frames=2)


def test_streamed_greedy_pcm_equals_the_torch_path(generators):
    from csm_engine.tokens import Segment

    torch_gen, mlx_gen = generators
    context_audio = torch_gen.codec.decode(torch.randint(0, 2048, (32, 4), generator=torch.Generator().manual_seed(0)))
    context = [Segment(1, "Hi, how are you?", context_audio)]
    got_frames, want_frames = [], []
    want = list(torch_gen.stream("Fine, thanks.", 0, context, on_frame=lambda i, f: want_frames.append(f.clone()),
                                 **_greedy(5)))
    got = list(mlx_gen.stream("Fine, thanks.", 0, context, on_frame=lambda i, f: got_frames.append(f.clone()),
                              **_greedy(5)))
    assert len(want_frames) == 5
    assert torch.equal(torch.stack(got_frames), torch.stack(want_frames))
    assert [c.shape for c in got] == [c.shape for c in want]
    pcm_got, pcm_want = np.concatenate(got), np.concatenate(want)
    assert pcm_got.shape == (5 * SAMPLES_PER_FRAME,) and np.abs(pcm_want).max() > 0
    np.testing.assert_array_equal(pcm_got, pcm_want)


def test_sampled_generation_follows_the_seed(generators):
    _, mlx_gen = generators
    opts = dict(max_audio_length_ms=80 * 4, runaway_guard=False, silence=None)

    def sampled(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        frames: list[torch.Tensor] = []
        pcm = mlx_gen.generate("Same seed, same sound.", 1, seed=seed, on_frame=lambda i, f: frames.append(f), **opts)
        return torch.stack(frames), pcm

    (fa, a), (fb, b), (fc, _) = sampled(5), sampled(5), sampled(6)
    assert a.shape == (4 * SAMPLES_PER_FRAME,)
    assert torch.equal(fa, fb) and torch.equal(a, b)
    assert not torch.equal(fa, fc)


def test_stream_stops_when_cancelled(generators):
    import threading

    _, mlx_gen = generators
    cancel = threading.Event()
    chunks = []
    for chunk in mlx_gen.stream("Stop me early please.", 0, chunk_frames=1, cancel=cancel,
                                max_audio_length_ms=80 * 20, runaway_guard=False, silence=None):
        chunks.append(chunk)
        cancel.set()
    assert len(chunks) == 1


def test_load_generator_quantized(tiny_checkpoint):
    import mlx.nn as nn

    from csm_engine.mlx import load_generator

    gen = load_generator(str(tiny_checkpoint), quantize_bits=8)
    assert isinstance(gen.model.backbone.layers[0].mlp.w1, nn.QuantizedLinear)
    pcm = gen.generate("Quantized.", 0, max_audio_length_ms=160, runaway_guard=False, silence=None, seed=1)
    assert pcm.shape == (2 * SAMPLES_PER_FRAME,) and torch.isfinite(pcm).all()
    with pytest.raises(CSMError, match="--quantize 4 or --quantize 8"):
        load_generator(str(tiny_checkpoint), quantize_bits=3)


def test_csm_generate_mlx_writes_a_24khz_wav(tiny_checkpoint, tmp_path):
    """The real console script: csm-generate's options and output path with the model on MLX."""
    from pathlib import Path

    import soundfile as sf

    script = Path(sys.executable).with_name("csm-generate-mlx")
    assert script.is_file(), "csm-generate-mlx is not installed; run `make test` (pip install -e .)"
    out = tmp_path / "mlx.wav"
    result = subprocess.run(
        [str(script), "--csm-model", str(tiny_checkpoint), "--text", "Hello from MLX.", "--no-watermark",
         "--max-audio-length-ms", "480", "--seed", "3", "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    data, rate = sf.read(out)
    assert rate == 24_000 and data.ndim == 1
    assert 0 < len(data) <= 7 * SAMPLES_PER_FRAME and len(data) % SAMPLES_PER_FRAME == 0


def test_csm_generate_mlx_missing_model_is_one_line(tmp_path):
    from pathlib import Path

    script = Path(sys.executable).with_name("csm-generate-mlx")
    result = subprocess.run([str(script), "--csm-model", str(tmp_path / "none"), "--text", "Hi.", "--no-watermark"],
                            capture_output=True, text=True, timeout=120)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("csm-generate-mlx: error:"), result.stderr
