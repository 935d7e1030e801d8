"""Drop-in replacements of a bias-free ``nn.Linear``: three int8 kernels, and fused groups of Linears.

Quantization never enters model code (gpt-fast's design): ``csm_engine.quantize`` swaps a
model's chosen Linears for these modules, which share one state-dict layout (``<name>.weight``
int8 (out, in), ``<name>.scales`` one per output row):

- ``Int8WeightOnlyLinear``: bf16 activations times int8 weights through
  ``torch.ops.aten._weight_int8pack_mm`` (a CPU kernel that dequantizes on the fly).
- ``DynamicInt8Linear``: fbgemm's dynamically quantized matmul (activations quantized per call
  to 7 bits, int8 x int8 products) with float32 around it.
- ``BlockInt8Linear``: this project's AVX2 kernel (``csm_engine.kernels``): each activation row
  quantized to int8 per block of 32 values (one scale each), int8 x int8 products, float32
  around it. Finer activation scales than fbgemm's one per call, and a row's result does not
  depend on its neighbours. ``FusedBlockInt8Linear``, ``FoldedRMSNorm``, ``BlockLayerStep`` and
  ``BlockInt8AudioHead`` fuse more of a step into single kernel calls.

``FusedLinear`` runs several float Linears over one input as one matmul (GPUs, CUDA graphs).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------
# Int8 Linear modules (drop-in replacements of nn.Linear without bias)
# ---------------------------------------------------------------------------------------------


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output row: weight (out, in) ~ int8 (out, in) * scales (out,) float32."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """What the int8 Linears share: ``weight`` int8 (out, in) and ``scales`` (out,), y = x @ (weight * scales).T."""

    scales_dtype = torch.float32  # what its kernel multiplies with

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        """Whether its kernel can stand in for ``linear``."""
        return True

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        """``dtype``: the scales' dtype (default ``scales_dtype``)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype or self.scales_dtype, device=device))


class Int8WeightOnlyLinear(Int8Linear):
    """On CPU with bf16 scales the product runs in bf16 (torch's int8pack kernel) whatever x's dtype."""

    scales_dtype = torch.bfloat16  # int8pack multiplies with bf16 scales

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and self.scales.dtype == torch.bfloat16:
            xb = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(xb, self.weight, self.scales)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


class DynamicInt8Linear(Int8Linear):
    """x quantized per call (7 bits, per tensor; fbgemm, x86 CPU), float32 around it."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__(in_features, out_features, torch.float32, device)  # fbgemm takes float32 scales
        self._packed = None
        self._packed_key: tuple = ()
        # Without VNNI, fbgemm's u8 x s8 pair products can overflow int16 with full-range
        # activations; 7-bit activations (reduce_range) avoid that (torch.ao's default for x86).
        self.reduce_range = True

    def pack(self) -> None:
        """Build fbgemm's packed weight from the int8 buffers (after loading them)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensor creation is deprecated, the kernels are not
            zero = torch.zeros(self.out_features, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(self.weight.cpu(), self.scales.double().cpu(), zero, 0)
            self._packed = torch.ops.quantized.linear_prepack(qw, None)
        self._packed_key = self._buffers_key()

    def _buffers_key(self) -> tuple:
        w, s = self.weight, self.scales
        return (w.data_ptr(), w._version, s.data_ptr(), s._version)

    def forward(self, x: Tensor) -> Tensor:
        # Repack when the buffers were replaced or changed in place (load_state_dict, zero_()).
        if self._packed is None or self._packed_key != self._buffers_key():
            self.pack()
        y = torch.ops.quantized.linear_dynamic(x.float(), self._packed, self.reduce_range)
        return y.to(x.dtype)


def _block_linear(x: Tensor, weight: Tensor, scales: Tensor, norm: Tensor | None = None, eps: float = 0.0) -> Tensor:
    if x.dtype == torch.float32:  # the usual case: skip two no-op casts (a dispatch each)
        return torch.ops.csm_kernels.int8_linear(x, weight, scales, norm, eps)
    return torch.ops.csm_kernels.int8_linear(x.float(), weight, scales, norm, eps).to(x.dtype)


class BlockInt8Linear(Int8Linear):
    """Activations quantized per row in blocks of 32 (csm_engine.kernels), float32 around it.

    ``weight`` is held in the kernel's packed tile layout (``kernels.pack_int8``); a state dict
    with plain (out, in) int8 weights is packed as it loads, and ``unpacked_weight()`` gives it back.
    """

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        return linear.in_features % 32 == 0  # the kernel reads 32-value blocks; other Linears stay float

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        from csm_engine import kernels

        super().__init__(in_features, out_features, torch.float32, device)
        self.weight = kernels.pack_int8(self.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        from csm_engine import kernels

        w = state_dict.get(prefix + "weight")
        if w is not None and w.dim() == 2:
            state_dict[prefix + "weight"] = kernels.pack_int8(w)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def unpacked_weight(self) -> Tensor:
        from csm_engine import kernels

        return kernels.unpack_int8(self.weight, self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return _block_linear(x, self.weight, self.scales)


class FusedBlockInt8Linear(nn.Module):
    """Several BlockInt8Linears over the same input as one kernel call: outputs side by side.

    The parts' buffers become views of this module's (no second copy), so the parts still hold
    their weights for the state dict. Each output channel is computed exactly as its part would
    (the kernel quantizes the input rows the same way whatever the weights), so fusing changes
    no number.
    """

    def __init__(self, parts: list[BlockInt8Linear], norm: nn.Module | None = None):
        """``norm``: an RMSNorm applied to the input first, inside the kernel (see ``FoldedRMSNorm``)."""
        super().__init__()
        self.norm_weight = None if norm is None else norm.scale.detach().float().contiguous()
        self.norm_eps = 0.0 if norm is None else float(norm.eps)
        self.register_buffer("weight", torch.cat([p.weight for p in parts]), persistent=False)
        self.register_buffer("scales", torch.cat([p.scales for p in parts]), persistent=False)
        tile = 0
        for p in parts:
            n = p.weight.shape[0]
            p.weight = self.weight[tile:tile + n]
            p.scales = self.scales[tile * 4:(tile + n) * 4]
            tile += n

    @staticmethod
    def can_fuse(parts: list[nn.Module]) -> bool:
        return (all(isinstance(p, BlockInt8Linear) and p.out_features % 4 == 0 for p in parts)
                and len({p.in_features for p in parts}) == 1)

    def forward(self, x: Tensor) -> Tensor:
        return _block_linear(x, self.weight, self.scales, self.norm_weight, self.norm_eps)


class FoldedRMSNorm(nn.Module):
    """Stands in for an RMSNorm whose work moved into the fused kernel that reads its output.

    Returns its input unchanged; keeps ``scale`` (so the state dict keeps its keys) for the
    kernel, which normalizes each row as it quantizes it: one pass over the row instead of six
    elementwise ops, measured as a large share of a decoder step's non-matmul time.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.scale, self.eps = norm.scale, norm.eps

    def forward(self, x: Tensor) -> Tensor:
        return x


class BlockLayerStep:
    """A decoder layer's int8-block step as one ``kernels.block_layer`` call (``TransformerLayer.step_fused``).

    Holds the layer's fused weights (the same tensors, no copy); the caches are passed per call
    because ``setup_caches`` replaces them.
    """

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.attn, layer.mlp
        qkv, w13 = attn.qkv_fused, mlp.w13_fused
        if qkv.norm_eps != w13.norm_eps:
            raise ValueError("block_layer takes one norm eps for both norms")
        self.weights = (qkv.weight, qkv.scales, qkv.norm_weight, attn.output_proj.weight, attn.output_proj.scales,
                        w13.weight, w13.scales, w13.norm_weight, mlp.w2.weight, mlp.w2.scales)
        self.eps, self.n_heads = qkv.norm_eps, attn.n_heads

    @staticmethod
    def can_step(layer: nn.Module) -> bool:
        attn, mlp = layer.attn, layer.mlp
        return (attn.attend_fused is not None and isinstance(attn.qkv_fused, FusedBlockInt8Linear)
                and isinstance(mlp.w13_fused, FusedBlockInt8Linear) and attn.qkv_fused.norm_weight is not None
                and mlp.w13_fused.norm_weight is not None
                and isinstance(attn.output_proj, BlockInt8Linear) and isinstance(mlp.w2, BlockInt8Linear))

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int) -> Tensor:
        from csm_engine import kernels

        return kernels.block_layer(x, self.weights, self.eps, cos, sin, k_cache, v_cache, pos, self.n_heads)


def fuse_block_linears(model: nn.Module) -> int:
    """Give every attention a fused norm + q|k|v and every MLP a fused norm + w1|w3 (int8-block).

    The layer's ``sa_norm`` / ``mlp_norm`` become ``FoldedRMSNorm`` pass-throughs: the fused
    kernel normalizes. The decoder's attentions (1-2 new rows over at most 33 positions, 124
    layer steps a frame) also run rope, cache writes and attention as one ``attend_rows`` call,
    and each decoder layer's whole step is one ``block_layer`` call (``BlockLayerStep``); the
    backbone keeps torch's attention (long contexts, prompt blocks). Returns how many
    projections were fused.
    """
    from csm_engine import kernels

    fused = 0
    for tf in (model.backbone, model.decoder):
        for layer in tf.layers:
            attn, mlp = layer.attn, layer.mlp
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            if FusedBlockInt8Linear.can_fuse(qkv) and attn.qkv_fused is None:
                attn.qkv_fused = FusedBlockInt8Linear(qkv, norm=layer.sa_norm)
                layer.sa_norm = FoldedRMSNorm(layer.sa_norm)
                if tf is model.decoder and attn.head_dim % 8 == 0:
                    attn.attend_fused = kernels.attend_rows
                fused += 1
            w13 = [mlp.w1, mlp.w3]
            if FusedBlockInt8Linear.can_fuse(w13) and mlp.w13_fused is None:
                mlp.w13_fused = FusedBlockInt8Linear(w13, norm=layer.mlp_norm)
                layer.mlp_norm = FoldedRMSNorm(layer.mlp_norm)
                fused += 1
            if tf is model.decoder and BlockLayerStep.can_step(layer):
                layer.step_fused = BlockLayerStep(layer)  # the whole layer step in one call
    return fused


class FusedLinear(nn.Module):
    """Several bias-free nn.Linears over the same input as one matmul: outputs side by side.

    For GPUs, where a batch-1 step is bound by kernel launches: q|k|v is one launch instead of
    three, w1|w3 one instead of two. The parts' weights become views of this module's
    non-persistent buffer, so there is no second copy and the state dict keeps its keys. Fuse
    after any dtype conversion (converting afterwards would split the views into copies).
    """

    def __init__(self, parts: list[nn.Linear]):
        super().__init__()
        self.register_buffer("weight", torch.cat([p.weight.detach() for p in parts]), persistent=False)
        row = 0
        for p in parts:
            n = p.out_features
            p.weight = nn.Parameter(self.weight[row:row + n], requires_grad=False)
            row += n

    @staticmethod
    def can_fuse(parts: list[nn.Module]) -> bool:
        return (all(type(p) is nn.Linear and p.bias is None for p in parts)
                and len({(p.in_features, p.weight.dtype, p.weight.device) for p in parts}) == 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


def fuse_linears(model: nn.Module) -> int:
    """Give every attention a fused q|k|v and every MLP a fused w1|w3 (float models; GPUs).

    Returns how many projections were fused (0 when already fused or quantized).
    """
    fused = 0
    for tf in (model.backbone, model.decoder):
        for layer in tf.layers:
            attn, mlp = layer.attn, layer.mlp
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            if attn.qkv_fused is None and FusedLinear.can_fuse(qkv):
                attn.qkv_fused = FusedLinear(qkv)
                fused += 1
            w13 = [mlp.w1, mlp.w3]
            if mlp.w13_fused is None and FusedLinear.can_fuse(w13):
                mlp.w13_fused = FusedLinear(w13)
                fused += 1
    return fused


class BlockInt8AudioHead(nn.Module):
    """``audio_head`` (31, D, V) as 31 int8 matrices for the block kernel: logits(h, i) = h @ audio_head[i - 1].

    Set as ``CSMModel.audio_head_kernel`` by ``apply_precision(model, "int8-block")``; the float
    parameter stays for the state dict. ``norm``: the decoder's final RMSNorm, applied inside the
    kernel call (the decoder's ``norm`` then becomes a ``FoldedRMSNorm``): the head is the only
    reader of the decoder's output, and a separate norm op cost ~75 us a step here.
    """

    def __init__(self, head: Tensor, norm: nn.Module | None = None):
        super().__init__()
        from csm_engine import kernels

        self.norm_weight = None if norm is None else norm.scale.detach().float().contiguous()
        self.norm_eps = 0.0 if norm is None else float(norm.eps)
        w = head.detach().float().transpose(1, 2)  # (31, V, D): one (out, in) matrix per codebook
        packed, scales = [], []
        for wi in w:
            q, sc = quantize_per_channel(wi)
            packed.append(kernels.pack_int8(q))
            scales.append(sc)
        self.register_buffer("weight", torch.stack(packed), persistent=False)
        self.register_buffer("scales", torch.stack(scales), persistent=False)

    def forward(self, h: Tensor, i: int) -> Tensor:
        return _block_linear(h, self.weight[i - 1], self.scales[i - 1], self.norm_weight, self.norm_eps)


# The int8 module for each way of treating activations (``csm_engine.precision``'s rule names).
INT8_MODULES: dict[str, type[Int8Linear]] = {"weight-only": Int8WeightOnlyLinear, "dynamic": DynamicInt8Linear,
                                            "block": BlockInt8Linear}
