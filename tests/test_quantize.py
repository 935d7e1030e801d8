"""Precision: bf16 and int8 stay close to float32 and never change behaviour silently."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _engine_helpers import random_tiny_model, tiny_generator

from csm_engine import linears as L
from csm_engine import quantize as Q
from csm_engine.errors import CSMError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quant_error import logit_error, probe_logits  # noqa: E402  (the error diagnostics live with their benchmark)

# Relative RMS logit error allowed vs float32 on the tiny flavor (measured: bf16 ~0.005,
# int8 ~0.009, int8-hybrid ~0.013, int8-dynamic ~0.02; benchmarks/quant_error.py for 1B).
TOLERANCE = {"bfloat16": 0.03, "int8": 0.05, "int8-block": 0.05, "int8-hybrid": 0.06, "int8-dynamic": 0.08}
PRECISIONS = [p for p in TOLERANCE
              if (p not in ("int8-dynamic", "int8-hybrid") or Q.fbgemm_available())
              and (p != "int8-block" or Q.block_kernel_available())]


def _probe_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 500, (1, 24, 33), generator=g)
    tokens[..., :32] = torch.randint(0, 2051, (1, 24, 32), generator=g)
    mask = torch.zeros(1, 24, 33, dtype=torch.bool)
    mask[:, :12, -1] = True
    mask[:, 12:, :32] = True
    return tokens, mask, torch.randint(0, 2051, (1, 32), generator=g)


def _model(precision: str | None = None):
    m = random_tiny_model(seed=1, std=0.02)
    m.setup_caches(1)
    if precision is not None:
        Q.apply_precision(m, precision)
    return m


@pytest.fixture(scope="module")
def reference():
    return probe_logits(_model(), *_probe_inputs())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_logits_stay_close_to_float32(reference, precision):
    err = logit_error(reference, probe_logits(_model(precision), *_probe_inputs()))
    assert err["codebook0_rel_rms"] < TOLERANCE[precision], err
    assert err["decoder_rel_rms"] < TOLERANCE[precision], err
    assert err["codebook0_top1_agree"] >= 0.8 and err["decoder_top1_agree"] >= 0.8, err


def test_float32_is_the_untouched_reference(reference):
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    Q.apply_precision(m, "float32")
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in m.state_dict().items())
    after = probe_logits(m, *_probe_inputs())
    assert torch.equal(after[0], reference[0]) and torch.equal(after[1], reference[1])


def test_quantized_state_dict_has_int8_linears_and_float_rest():
    m = _model()
    sd = Q.Int8QuantHandler(m).create_quantized_state_dict()
    assert sd["backbone.layers.0.attn.q_proj.weight"].dtype == torch.int8
    assert sd["decoder.layers.1.mlp.w2.weight"].dtype == torch.int8
    assert sd["codebook0_head.weight"].dtype == torch.int8
    assert sd["decoder.layers.1.mlp.w2.scales"].shape == (m.config.decoder.dim,)
    # Raw parameters read by slices or rows stay float.
    for key in ("audio_head", "text_embeddings.weight", "audio_embeddings.weight", "backbone.norm.scale"):
        assert sd[key].dtype == torch.float32


@pytest.mark.parametrize("precision", PRECISIONS)
def test_model_converts_whole_caches_included(precision):
    m = _model(precision)
    assert Q.model_precision(m) == precision
    cache = m.backbone.layers[0].attn.kv_cache.k
    assert cache.dtype == Q.compute_dtype(precision)
    assert m.backbone.rope_cos.dtype == torch.float32  # rope math stays float32
    assert m.audio_head.dtype == torch.float32  # read per step by the fast float32 kernel (or kept for it)
    # int8-block reads the head through its own int8 copy; the others read audio_head itself.
    assert (m.audio_head_kernel is not None) == (precision == "int8-block")
    with pytest.raises(CSMError, match="already quantized") if precision.startswith("int8") else _noop():
        Q.apply_precision(m, "float32")


class _noop:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_unknown_dtype_is_a_one_line_error():
    with pytest.raises(CSMError, match="choose one of") as e:
        Q.resolve_precision("int3", "cpu")
    assert "\n" not in str(e.value)


def test_dtype_aliases_and_default():
    assert Q.resolve_precision(torch.bfloat16, "cpu") == "bfloat16"
    assert Q.resolve_precision("bf16", "cpu") == "bfloat16"
    assert Q.resolve_precision("fp32", "cpu") == "float32"
    assert Q.resolve_precision(None, "cpu") == Q.default_precision("cpu")
    assert Q.resolve_precision("auto", "cpu", n_params=1000) == "float32"
    assert Q.default_precision("cpu") in ("int8-block", "int8-hybrid", "int8", "bfloat16")


@pytest.mark.skipif(not Q.fbgemm_available(), reason="fbgemm (x86) only")
def test_dynamic_linear_sees_in_place_weight_changes():
    m = _model("int8-dynamic")
    x = torch.randn(1, 1, m.config.backbone.dim)
    assert m.codebook0_head(x).abs().sum() > 0
    with torch.no_grad():
        m.codebook0_head.weight.zero_()
    assert m.codebook0_head(x).abs().sum() == 0


def test_weight_only_linear_float32_fallback_is_the_dequantized_matmul():
    lin = torch.nn.Linear(64, 48, bias=False)
    q, scales = L.quantize_per_channel(lin.weight)
    mod = L.Int8WeightOnlyLinear(64, 48, dtype=torch.float32)
    mod.load_state_dict({"weight": q, "scales": scales})
    x = torch.randn(3, 64)
    torch.testing.assert_close(mod(x), x @ (q.float() * scales[:, None]).T, atol=1e-5, rtol=1e-5)
    # The bf16 CPU kernel computes the same product.
    mod_bf16 = L.Int8WeightOnlyLinear(64, 48, dtype=torch.bfloat16)
    mod_bf16.load_state_dict({"weight": q, "scales": scales.bfloat16()})
    torch.testing.assert_close(mod_bf16(x.bfloat16()).float(), mod(x), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("precision", ["bfloat16", "int8", "int8-block"])
def test_generator_dtype_converts_the_model_and_generates(precision):
    if precision == "int8-block" and not Q.block_kernel_available():
        pytest.skip("the AVX2 kernel does not build here")
    gen = tiny_generator(seed=2)
    gen2 = type(gen)(gen.model, gen.codec, gen.tokenizer, dtype=precision)
    assert Q.model_precision(gen2.model) == precision
    prompt = gen2.build_prompt("hello there", 0, [], 80 * 3, runaway_guard=False)
    frames = list(gen2.frames(prompt, seed=1))
    assert len(frames) == 3 and all(f.shape == (32,) and f.dtype == torch.long for f in frames)


def test_load_generator_passes_dtype_through(tmp_path):
    import subprocess
    import sys

    from csm_engine.generator import load_generator

    subprocess.run([sys.executable, "-m", "csm_engine.testing", "make-checkpoint", str(tmp_path), "--flavor", "tiny"],
                   check=True)
    for precision in ("float32", "bfloat16", "int8"):
        gen = load_generator(str(tmp_path), dtype=precision)
        assert Q.model_precision(gen.model) == precision
    # Left to choose, a tiny model runs float32 (overhead-bound); a 1B one int8 (bandwidth-bound).
    assert Q.model_precision(load_generator(str(tmp_path)).model) == "float32"
    assert Q.default_precision("cpu", n_params=1_600_000_000) in ("int8-block", "int8-hybrid", "int8")


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@torch.inference_mode()
def test_fused_linears_compute_the_parts_without_a_second_copy(precision):
    """GPUs run q|k|v and w1|w3 as one matmul each (see Generator with CUDA graphs)."""
    model = random_tiny_model(seed=2)
    Q.apply_precision(model, precision)
    model.setup_caches(1)
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    tokens = torch.randint(0, cfg.text_vocab_size, (1, 7, 33), generator=g)
    tokens[..., :32] = torch.randint(0, cfg.audio_vocab_size, (1, 7, 32), generator=g)
    mask = torch.rand(1, 7, 33, generator=g) > 0.3
    keys = set(model.state_dict())
    before = model.backbone_hidden(tokens, mask, 0)
    assert L.fuse_linears(model) == 2 * (len(model.backbone.layers) + len(model.decoder.layers))
    assert L.fuse_linears(model) == 0  # already fused
    attn = model.backbone.layers[0].attn
    fused = attn.qkv_fused.weight
    assert attn.q_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert torch.equal(fused[attn.q_proj.out_features:][:attn.k_proj.out_features], attn.k_proj.weight)
    assert set(model.state_dict()) == keys  # the fused buffers are not saved
    model.reset_caches()
    after = model.backbone_hidden(tokens, mask, 0)
    tol = 1e-5 if precision == "float32" else 2e-2
    torch.testing.assert_close(after, before, atol=tol, rtol=tol)
    assert Q.weight_bytes_per_frame(model) > 0


def test_every_precision_is_described_by_data_and_found_by_name_or_alias():
    from csm_engine.precision import PRECISIONS, TORCH_PRECISIONS, lookup

    assert PRECISIONS == tuple(p.name for p in TORCH_PRECISIONS)
    for spec in TORCH_PRECISIONS:
        assert lookup(spec.name) is spec and all(lookup(alias) is spec for alias in spec.aliases)
        assert Q.compute_dtype(spec.name) == getattr(torch, spec.dtype)
    hybrid = lookup("int8-hybrid")
    assert hybrid.rule_for("decoder.layers.0.mlp.w1").activations == "dynamic"
    assert hybrid.rule_for("backbone.layers.0.attn.q_proj").activations == "weight-only"
    assert hybrid.rule_for("projection") is None  # kept float: see precision.py
    assert lookup("float32").rule_for("codebook0_head") is None


def test_a_precision_described_anew_is_applied_as_it_says():
    """One int8 rule for the backbone only: the decoder keeps its float Linears (no new code needed)."""
    from csm_engine.precision import LinearQuant, Precision

    backbone_int8 = Precision("int8-backbone", "float32", "weight-only int8 backbone, float32 decoder",
                              linears=(LinearQuant(layers=("backbone.", "codebook0_head")),), needs=("int8pack",))
    m = _model()
    Q.apply_precision(m, backbone_int8)
    assert isinstance(m.backbone.layers[0].attn.q_proj, L.Int8WeightOnlyLinear)
    assert isinstance(m.codebook0_head, L.Int8WeightOnlyLinear)
    assert type(m.decoder.layers[0].mlp.w1) is torch.nn.Linear and type(m.projection) is torch.nn.Linear
    assert Q.model_precision(m) == "int8-backbone"
    float_model = _model()  # the same seed: the same float weights
    assert torch.equal(m.decoder.layers[1].mlp.w2.weight, float_model.decoder.layers[1].mlp.w2.weight)
    err = logit_error(probe_logits(float_model, *_probe_inputs()), probe_logits(m, *_probe_inputs()))
    assert err["codebook0_rel_rms"] < TOLERANCE["int8"] and err["decoder_rel_rms"] < TOLERANCE["int8"], err


def test_registering_a_taken_name_fails_and_other_backends_keep_their_own_tables(monkeypatch):
    from csm_engine import precision
    from csm_engine.precision import LinearQuant, Precision, lookup, precisions, register

    # Leave the tables as they were found.
    monkeypatch.setattr(precision, "_REGISTRY", {k: dict(v) for k, v in precision._REGISTRY.items()})

    with pytest.raises(ValueError, match="taken"):
        register(Precision("bf16", "bfloat16", "a second bf16"))
    with pytest.raises(CSMError, match="choose one of"):
        lookup("int4", backend="torch")
    mlx_4bit = Precision("int4", "bfloat16", "4-bit group quantization", linears=(LinearQuant(bits=4, group_size=64),),
                         backend="test-backend")
    register(mlx_4bit)
    assert lookup("int4", backend="test-backend") is mlx_4bit and precisions("test-backend") == (mlx_4bit,)
    with pytest.raises(CSMError, match="not one of the torch engine's"):
        Q.check_precision(mlx_4bit, "cpu")


def test_a_precision_refuses_a_device_it_does_not_run_on():
    with pytest.raises(CSMError, match="runs on x86 CPUs only") as e:
        Q.resolve_precision("int8-dynamic", "cuda")
    assert "--dtype bfloat16" in str(e.value)
    with pytest.raises(CSMError, match="runs on cpu and cuda only, not on mps"):
        Q.resolve_precision("int8", "mps")
