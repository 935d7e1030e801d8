"""The AVX2 int8 kernel (csm_engine/kernels) and the int8-block modules built on it.

Exact properties are checked exactly (packing, row independence, fusion changing no number);
the int8 arithmetic is checked against the float product of the same int8 weights, within
what 8-bit activations in 32-value blocks allow.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from csm_engine import kernels
from csm_engine import linears as L
from csm_engine import quantize as Q

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernel unavailable: {kernels.unavailable_reason()}")


def _weights(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, scales = L.quantize_per_channel(torch.randn(n, k, generator=g) * 0.02)
    return q, scales


@pytest.mark.parametrize("n,k", [(4, 32), (6, 64), (257, 96), (2051, 128)])
def test_pack_round_trip_pads_to_whole_tiles(n, k):
    q, _ = _weights(n, k)
    packed = kernels.pack_int8(q)
    assert packed.shape == (-(-n // 4), k // 32, 4, 32) and packed.is_contiguous()
    assert torch.equal(kernels.unpack_int8(packed, n), q)
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.pack_int8(torch.zeros(4, 40, dtype=torch.int8))


@pytest.mark.parametrize("m", [1, 2, 3, 5, 33])
@pytest.mark.parametrize("n,k", [(8, 32), (2051, 128), (96, 1024)])
def test_matches_the_float_product_of_the_int8_weights(m, n, k):
    q, scales = _weights(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    want = x @ (q.float() * scales[:, None]).T
    got = kernels.int8_linear(x, kernels.pack_int8(q), scales)
    assert got.shape == (m, n) and got.dtype == torch.float32
    # 8-bit activations per 32 values: ~0.3% relative error on Gaussian rows.
    assert float((got - want).norm() / want.norm()) < 0.01
    # A wrong block scale or tile order would be far off; so would using only some blocks.
    assert float((got - want).abs().max() / want.abs().max()) < 0.05


def test_a_row_does_not_depend_on_the_rows_beside_it():
    q, scales = _weights(100, 256)
    packed = kernels.pack_int8(q)
    x = torch.randn(7, 256)
    x[3] *= 1000.0  # a loud neighbour must not change the others' quantization
    together = kernels.int8_linear(x, packed, scales)
    alone = torch.cat([kernels.int8_linear(x[i:i + 1], packed, scales) for i in range(7)])
    assert torch.equal(together, alone)
    assert torch.equal(kernels.int8_linear(x.view(1, 7, 256), packed, scales), together.view(1, 7, 100))


def test_zero_rows_and_batch_shapes():
    q, scales = _weights(8, 64)
    packed = kernels.pack_int8(q)
    assert torch.equal(kernels.int8_linear(torch.zeros(2, 64), packed, scales), torch.zeros(2, 8))
    assert kernels.int8_linear(torch.zeros(0, 64), packed, scales).shape == (0, 8)
    with pytest.raises(RuntimeError, match="features"):
        kernels.int8_linear(torch.zeros(1, 32), packed, scales)


def test_folded_rms_norm_equals_norm_then_linear():
    q, scales = _weights(64, 128)
    g = torch.rand(128) + 0.5
    x = torch.randn(3, 128) * 5.0
    want = kernels.int8_linear(F.rms_norm(x, (128,), g, 1e-5), kernels.pack_int8(q), scales)
    got = torch.ops.csm_kernels.int8_linear(x, kernels.pack_int8(q), scales, g, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_block_linear_loads_plain_int8_weights():
    q, scales = _weights(48, 64)
    mod = L.BlockInt8Linear(64, 48)
    mod.load_state_dict({"weight": q, "scales": scales})
    assert torch.equal(mod.unpacked_weight(), q)
    x = torch.randn(2, 3, 64)
    assert torch.equal(mod(x), kernels.int8_linear(x, kernels.pack_int8(q), scales))


def test_fusion_changes_no_number():
    """q|k|v and w1|w3 in one call give exactly what the separate calls give, without a weight copy."""
    parts = []
    for n in (64, 32, 32):
        q, scales = _weights(n, 96, seed=n)
        mod = L.BlockInt8Linear(96, n)
        mod.load_state_dict({"weight": q, "scales": scales})
        parts.append(mod)
    x = torch.randn(2, 96)
    separate = torch.cat([p(x) for p in parts], dim=-1)
    fused = L.FusedBlockInt8Linear(parts)
    assert torch.equal(fused(x), separate)
    assert all(p.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr() for p in parts)
    assert torch.equal(torch.cat([p(x) for p in parts], dim=-1), separate)  # the parts still work


def test_int8_block_model_fuses_every_layer_and_counts_bytes_once():
    from _engine_helpers import random_tiny_model

    m = random_tiny_model(seed=1, std=0.02)
    before = Q.weight_bytes_per_frame(m)
    Q.apply_precision(m, "int8-block")
    for tf in (m.backbone, m.decoder):
        for layer in tf.layers:
            assert layer.attn.qkv_fused is not None and layer.mlp.w13_fused is not None
            assert isinstance(layer.sa_norm, L.FoldedRMSNorm) and isinstance(layer.mlp_norm, L.FoldedRMSNorm)
    assert "backbone.layers.0.sa_norm.scale" in m.state_dict()
    after = Q.weight_bytes_per_frame(m)
    # float32 -> int8: a quarter of the bytes (+ padding of the 2051-row heads to whole tiles).
    assert 0.24 < after / before < 0.27


def test_unavailable_kernel_falls_back_and_says_why():
    env = dict(os.environ, CSM_NO_KERNELS="1")
    code = ("from csm_engine import quantize as Q; from csm_engine.errors import CSMError\n"
            "print(Q.default_precision('cpu', n_params=1_600_000_000))\n"
            "try:\n    Q.resolve_precision('int8-block', 'cpu')\nexcept CSMError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    default, error = out.strip().splitlines()
    assert default in ("int8-hybrid", "int8")
    assert "int8-block" in error and "CSM_NO_KERNELS" in error and "--dtype int8" in error


def _run_decoder(m, x2, steps):
    """The decoder's steps of one frame from empty caches: outputs (1, 2 + len(steps), dim) and each layer's k|v."""
    dec = m.decoder
    m.reset_caches()
    outs = [dec(x2, 0)] + [dec(x, i) for i, x in enumerate(steps, start=2)]
    caches = [torch.cat([layer.attn.kv_cache.k, layer.attn.kv_cache.v]).clone() for layer in dec.layers]
    return torch.cat(outs, dim=1), caches


def test_attend_rows_matches_the_torch_attention_path():
    """The decoder's one-call attention: same keys/values in the cache (bit for bit), same outputs."""
    from _engine_helpers import random_tiny_model

    m = random_tiny_model(seed=2, std=0.05)
    Q.apply_precision(m, "int8-block")
    m.setup_caches(1)
    dec = m.decoder
    assert all(layer.attn.attend_fused is not None for layer in dec.layers)
    x2, steps = torch.randn(1, 2, dec.cfg.dim), [torch.randn(1, 1, dec.cfg.dim) for _ in range(6)]

    with torch.inference_mode():
        steps_ = [layer.step_fused for layer in dec.layers]
        for layer in dec.layers:
            layer.step_fused = None  # the module path, so that attend_fused alone is compared
        fused_out, fused_caches = _run_decoder(m, x2, steps)
        kernels_ = [layer.attn.attend_fused for layer in dec.layers]
        for layer in dec.layers:
            layer.attn.attend_fused = None
        torch_out, torch_caches = _run_decoder(m, x2, steps)
        for layer, k, st in zip(dec.layers, kernels_, steps_):
            layer.attn.attend_fused, layer.step_fused = k, st
    assert torch.equal(fused_caches[0], torch_caches[0])  # first layer: same input, same rope
    for a, b in zip(fused_caches, torch_caches):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_out, torch_out, rtol=1e-4, atol=1e-5)
    assert fused_out.abs().mean() > 0.01  # not trivially equal


def test_block_layer_step_is_the_module_path_in_one_call():
    """A decoder layer's whole step in one kernel call gives exactly what its modules give."""
    from _engine_helpers import random_tiny_model

    m = random_tiny_model(seed=3, std=0.05)
    Q.apply_precision(m, "int8-block")
    m.setup_caches(1)
    dec = m.decoder
    assert all(isinstance(layer.step_fused, L.BlockLayerStep) for layer in dec.layers)
    assert all(layer.step_fused is None for layer in m.backbone.layers)  # long contexts: torch's attention
    x2, steps = torch.randn(1, 2, dec.cfg.dim), [torch.randn(1, 1, dec.cfg.dim) for _ in range(5)]

    with torch.inference_mode():
        one_call, one_call_caches = _run_decoder(m, x2, steps)
        saved = [layer.step_fused for layer in dec.layers]
        for layer in dec.layers:
            layer.step_fused = None
        modules, module_caches = _run_decoder(m, x2, steps)
        for layer, st in zip(dec.layers, saved):
            layer.step_fused = st
    assert torch.equal(one_call, modules)
    assert all(torch.equal(a, b) for a, b in zip(one_call_caches, module_caches))
    assert one_call.abs().mean() > 0.01


def test_decoder_norm_folded_into_the_audio_head():
    """int8-block reads the decoder's final norm inside the head's kernel call: same logits as norm then head."""
    from _engine_helpers import random_tiny_model

    m = random_tiny_model(seed=4, std=0.05)
    ref_norm = m.decoder.norm
    Q.apply_precision(m, "int8-block")
    assert isinstance(m.decoder.norm, L.FoldedRMSNorm) and "decoder.norm.scale" in m.state_dict()
    h = torch.randn(3, m.config.decoder.dim) * 3
    with torch.inference_mode():
        folded = m.audio_logits(h, 5)
        plain = L.BlockInt8AudioHead(m.audio_head)(ref_norm(h), 5)
    torch.testing.assert_close(folded, plain, rtol=1e-3, atol=1e-3)
