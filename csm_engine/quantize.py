"""Precision of a CSMModel: float32 (the reference), bfloat16, and int8 weights for its Linear layers.

Quantization never enters model code: a handler turns a float state dict into int8 weights plus
per-output-channel scales, and swaps each chosen ``nn.Linear`` for a drop-in module that reads
them. Two int8 modules share that state-dict layout (``<name>.weight`` int8, ``<name>.scales``):

- ``Int8WeightOnlyLinear`` (precision ``"int8"``): bf16 activations times int8 weights through
  ``torch.ops.aten._weight_int8pack_mm`` (a CPU kernel that dequantizes on the fly).
- ``DynamicInt8Linear`` (precision ``"int8-dynamic"``): fbgemm's dynamically quantized matmul
  (activations quantized per call to 7 bits, int8 x int8 products) with float32 around it.
- ``"int8-hybrid"``: the backbone weight-only, the decoder dynamic (float32 activations
  around both; the weight-only Linears cast to bf16 inside).
- ``BlockInt8Linear`` (precision ``"int8-block"``): every Linear through this project's AVX2
  kernel (``csm_engine.kernels``): each activation row quantized to int8 per block of 32 values
  (one scale each), int8 x int8 products, float32 around it. Finer activation scales than
  fbgemm's one 7-bit scale per call, and a row's result does not depend on its neighbours.

At batch 1 a frame is bound by reading weights, so bytes per weight decide speed. The
``audio_head`` (a raw (31, D, 2051) parameter read one slice per decoder step, ~7% of an int8
step's bytes) stays float32, laid out for the fast kernel; the embeddings (gathered row by
row, never read whole) take the compute dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csm_engine.config import PRECISIONS
from csm_engine.errors import CSMError

_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "int8-dyn": "int8-dynamic",
            "w8a8": "int8-dynamic", "int8-weight-only": "int8", "q8": "int8-block"}
# Precisions that run on x86 CPUs only.
_X86_ONLY = ("int8-block", "int8-dynamic", "int8-hybrid")


# ---------------------------------------------------------------------------------------------
# Choosing a precision
# ---------------------------------------------------------------------------------------------


def cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def int8pack_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def block_kernel_available() -> bool:
    """Whether csm_engine.kernels' int8 kernel builds and loads here (x86-64 AVX2, a C++ compiler)."""
    from csm_engine import kernels

    return kernels.available()


# Below this many bytes of float32 weights a model is bound by per-op overhead, not by reading
# weights, and float32 is fastest (measured: tiny flavor 24 frames/s float32 vs 13 int8-dynamic).
SMALL_MODEL_BYTES = 256 * 2**20


def default_precision(device: str | torch.device, n_params: int | None = None) -> str:
    """The default precision for a device and model size (measurements: benchmarks/README.md).

    CPU, models big enough to be bound by reading weights (CSM-1B): ``int8-block`` where this
    project's AVX2 kernel builds (x86-64 with AVX2, a C++ compiler): every Linear and the audio
    head int8, norms and q|k|v / w1|w3 fused into single kernel calls; otherwise ``int8-hybrid``
    (torch's weight-only int8 backbone + fbgemm decoder), then ``int8``. This CPU has no
    AVX512-BF16, so bf16 is converted in software and is no default here.
    Small test models: float32 (overhead-bound, fastest there).
    CUDA: bfloat16 (measured on an H100 with CUDA graphs: 81.7 frames/s vs 56.5 for float32).
    """
    kind = torch.device(device).type
    if kind == "cpu":
        if n_params is not None and n_params * 4 < SMALL_MODEL_BYTES:
            return "float32"
        if block_kernel_available():
            return "int8-block"
        if fbgemm_available() and int8pack_available():
            return "int8-hybrid"
        return "int8" if int8pack_available() else "bfloat16"
    if kind in ("cuda", "mps"):
        return "bfloat16"
    return "float32"


def resolve_precision(dtype: str | torch.dtype | None, device: str | torch.device = "cpu",
                      n_params: int | None = None) -> str:
    """A precision name from a ``--dtype`` value (``None`` / auto = the default for the device and model size).

    Raises CSMError naming the choices for an unknown value.
    """
    if dtype is None or dtype == "auto":
        return default_precision(device, n_params)
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = str(dtype).lower().removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise CSMError(f"unknown dtype {dtype!r}: choose one of {', '.join(PRECISIONS)} (or auto)")
    if name in _X86_ONLY and torch.device(device).type != "cpu":
        raise CSMError(f"--dtype {name} runs on x86 CPUs only; on {device} use --dtype bfloat16")
    if name == "int8-block" and not block_kernel_available():
        from csm_engine import kernels

        raise CSMError(f"--dtype int8-block needs csm-chat's AVX2 kernel, which is unavailable here "
                       f"({kernels.unavailable_reason()}); use --dtype int8")
    if name in ("int8-dynamic", "int8-hybrid") and not fbgemm_available():
        raise CSMError(f"--dtype {name} needs torch's fbgemm backend (x86 CPU); use --dtype int8 or bfloat16")
    if name in ("int8", "int8-dynamic") and torch.device(device).type == "mps":
        raise CSMError(f"--dtype {name} is not supported on mps; use --dtype bfloat16")
    return name


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of activations, KV caches and unquantized parameters for a precision."""
    return torch.float32 if precision in ("float32", "int8-block", "int8-dynamic", "int8-hybrid") else torch.bfloat16


def model_precision(model: nn.Module) -> str:
    """The precision a model currently runs at."""
    kinds = {type(m) for m in model.modules()}
    if BlockInt8Linear in kinds:
        return "int8-block"
    if DynamicInt8Linear in kinds:
        return "int8-hybrid" if Int8WeightOnlyLinear in kinds else "int8-dynamic"
    if Int8WeightOnlyLinear in kinds:
        return "int8"
    dtype = model.backbone.norm.scale.dtype  # the transformers' dtype (audio_head may stay float32)
    return "bfloat16" if dtype == torch.bfloat16 else "float32"


# ---------------------------------------------------------------------------------------------
# Int8 Linear modules (drop-in replacements of nn.Linear without bias)
# ---------------------------------------------------------------------------------------------


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output row: weight (out, in) ~ int8 (out, in) * scales (out,) float32."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8WeightOnlyLinear(nn.Module):
    """y = x @ (int8 weight * scales).T; on CPU with bf16 scales the product runs in bf16 whatever x's dtype."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and self.scales.dtype == torch.bfloat16:
            xb = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(xb, self.weight, self.scales)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


class DynamicInt8Linear(nn.Module):
    """y = x @ (int8 weight * scales).T with x quantized per call (7 bits, per tensor; fbgemm, x86 CPU, float32)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
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


class BlockInt8Linear(nn.Module):
    """y = x @ (int8 weight * scales).T, activations quantized per row in blocks of 32 (csm_engine.kernels, float32).

    ``weight`` is held in the kernel's packed tile layout (``kernels.pack_int8``); a state dict
    with plain (out, in) int8 weights is packed as it loads, and ``unpacked_weight()`` gives it back.
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        from csm_engine import kernels

        self.in_features, self.out_features = in_features, out_features
        packed = kernels.pack_int8(torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight", packed)
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))

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


# ---------------------------------------------------------------------------------------------
# The handler: which Linears, state dict conversion, module swap
# ---------------------------------------------------------------------------------------------


def default_filter(name: str, module: nn.Module) -> bool:
    """Every Linear of both transformers, the projection and codebook0_head."""
    return isinstance(module, nn.Linear) and module.bias is None


def dynamic_filter(name: str, module: nn.Module) -> bool:
    """As ``default_filter`` but the projection stays float: its first call of a frame takes the
    backbone's normed state and a raw embedding in one tensor, and one per-tensor activation
    scale for both rows rounds the (much smaller) embedding row away (measured: decoder logit
    error 0.42 vs 0.03 relative RMS on the tiny flavor)."""
    return default_filter(name, module) and name != "projection"


class Int8QuantHandler:
    """Converts a float CSMModel's chosen Linears to int8 (gpt-fast's quantize handler, for CSM)."""

    def __init__(self, model: nn.Module, dynamic: bool = False,
                 include: Callable[[str, nn.Module], bool] = default_filter,
                 choose: Callable[[str, nn.Module], type | None] | None = None):
        """``choose(name, module)`` -> the int8 class for that Linear or None (default: ``include`` + ``dynamic``)."""
        self.model = model
        if choose is None:
            cls = DynamicInt8Linear if dynamic else Int8WeightOnlyLinear
            choose = lambda name, m: cls if include(name, m) else None  # noqa: E731
        self.plan = {name: c for name, m in model.named_modules() if (c := choose(name, m)) is not None}
        self.names = list(self.plan)

    @torch.no_grad()
    def create_quantized_state_dict(self) -> dict[str, Tensor]:
        """The model's state dict with each chosen Linear as ``weight`` int8 + ``scales``."""
        sd = dict(self.model.state_dict())
        for name in self.names:
            q, scales = quantize_per_channel(sd[f"{name}.weight"])
            sd[f"{name}.weight"] = q
            # int8pack multiplies with bf16 scales; fbgemm and the block kernel keep float32 ones.
            sd[f"{name}.scales"] = scales.bfloat16() if self.plan[name] is Int8WeightOnlyLinear else scales
        return sd

    def convert_for_runtime(self, dtype: torch.dtype) -> nn.Module:
        """Swap the chosen Linears for int8 modules (weights still to be loaded)."""
        for name in self.names:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            old = getattr(parent, child)
            cls = self.plan[name]
            scales_dtype = torch.bfloat16 if cls is Int8WeightOnlyLinear else torch.float32
            new = cls(old.in_features, old.out_features, dtype=scales_dtype, device=old.weight.device)
            setattr(parent, child, new)
        return self.model


@torch.no_grad()
def apply_precision(model: nn.Module, precision: str | torch.dtype | None, *,
                    include: Callable[[str, nn.Module], bool] | None = None) -> nn.Module:
    """Convert a float model in place to a precision (float32 | bfloat16 | int8 | int8-hybrid | int8-dynamic).

    Quantize from the float32 weights when you have them (scales are computed before any
    rounding to bf16). The KV caches are rebuilt in the new compute dtype, so any conversation
    cache kept outside the model is stale afterwards.
    """
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device, sum(p.numel() for p in model.parameters()))
    current = model_precision(model)
    if current == precision:
        return model
    if current.startswith("int8"):
        raise CSMError(f"model is already quantized ({current}); load the float checkpoint again for {precision}")
    dtype = compute_dtype(precision)
    # audio_head (31, D, 2051) is read one (D, 2051) slice per decoder step. Kept float32 and
    # stored column-major (each slice a transposed contiguous (2051, D) matrix) it is read by
    # the fast x @ W.T kernel: measured 0.45 ms per step vs 6.7 ms for bf16 row-major (AVX2).
    head = model.audio_head.detach().float().transpose(1, 2).contiguous().transpose(1, 2)
    if precision.startswith("int8"):
        if precision == "int8-hybrid":
            # Backbone (22% of a frame's bytes, and every prompt row): weight-only int8, close to
            # float32. Decoder (78%, always 2 rows then 1 per step): fbgemm's faster int8 x int8.
            def choose(name, m):
                if not dynamic_filter(name, m):
                    return None
                return DynamicInt8Linear if name.startswith("decoder.") else Int8WeightOnlyLinear
            handler = Int8QuantHandler(model, choose=choose)
        elif precision == "int8-block":  # resolve_precision has loaded the kernel (or refused)
            def choose_block(name, m):
                ok = (include or default_filter)(name, m) and m.in_features % 32 == 0
                return BlockInt8Linear if ok else None  # the kernel reads 32-value blocks; others stay float
            handler = Int8QuantHandler(model, choose=choose_block)
        else:
            dynamic = precision == "int8-dynamic"
            handler = Int8QuantHandler(model, dynamic=dynamic,
                                       include=include or (dynamic_filter if dynamic else default_filter))
        sd = handler.create_quantized_state_dict()
        handler.convert_for_runtime(dtype)
        for k, v in sd.items():
            if v.is_floating_point() and not k.endswith(".scales"):
                sd[k] = v.to(dtype)
        model.load_state_dict(sd, strict=True, assign=True)
        for m in model.modules():
            if isinstance(m, DynamicInt8Linear):
                m.pack()
        if precision == "int8-block":
            fuse_block_linears(model)
    else:
        model.to(dtype)
    model.audio_head = nn.Parameter(head, requires_grad=False)
    # int8-block reads the head through the kernel too (2.1 MB a step instead of 8.4 MB float32).
    model.audio_head_kernel = None
    if precision == "int8-block":
        model.audio_head_kernel = BlockInt8AudioHead(head, norm=model.decoder.norm)
        model.decoder.norm = FoldedRMSNorm(model.decoder.norm)
    # Non-persistent float buffers (rope tables) stay float32: rope is computed in float32.
    for tf in (model.backbone, model.decoder):
        tf.rope_cos.data = tf.rope_cos.float()
        tf.rope_sin.data = tf.rope_sin.float()
    if model.caches_are_setup():
        batch = model.backbone.layers[0].attn.kv_cache.k.shape[0]
        model.setup_caches(batch)
    return model


def weight_bytes_per_frame(model: nn.Module) -> int:
    """Bytes of weights one generated frame reads at batch 1: 1 backbone step + 31 decoder steps.

    Counts what the kernels stream from memory: every Linear of the backbone and codebook0_head
    once; the decoder's Linears, the projection and one audio_head slice once per decoder step.
    Embedding rows (a few KB) are not counted.
    """
    def nbytes(module: nn.Module) -> int:
        total = 0
        for m in module.modules():
            if isinstance(m, (nn.Linear, Int8WeightOnlyLinear, DynamicInt8Linear, BlockInt8Linear)):
                total += m.weight.numel() * m.weight.element_size()
        return total

    n_steps = model.config.audio_num_codebooks - 1
    kernel = getattr(model, "audio_head_kernel", None)
    head = kernel.weight if kernel is not None else model.audio_head
    head_slice = head[0].numel() * head.element_size()
    backbone = nbytes(model.backbone) + nbytes(model.codebook0_head)
    decoder_step = nbytes(model.decoder) + nbytes(model.projection) + head_slice
    return backbone + n_steps * decoder_step


@torch.inference_mode()
def probe_logits(model: nn.Module, tokens: Tensor, mask: Tensor, codes: Tensor, block: int = 32) -> tuple[Tensor, Tensor]:
    """Logits to compare precisions on, computed the way generation batches rows.

    tokens, mask (1, T, 33) a prompt, prefilled in position-aligned blocks of ``block`` rows
    (as ``Generator`` does); codes (1, 32) the frame teacher-forced through the decoder one
    step at a time (positions 0-1, then one per codebook, as ``generate_frame``). Returns
    float32 (T, 2051) codebook-0 logits of every prompt row and (31, 2051) decoder logits.
    """
    model.reset_caches()
    n = tokens.shape[1]
    h = torch.cat([model.backbone_hidden(tokens[:, a:a + block], mask[:, a:a + block], a)
                   for a in range(0, n, block)], dim=1)
    logits0 = model.codebook0_head(h)[0].float()
    n_cb = model.config.audio_num_codebooks
    dec_in = model.projection(torch.cat([h[:, -1:], model.embed_audio(0, codes[:, :1]).to(h.dtype)], dim=1))
    logits = []
    for i in range(1, n_cb):
        dh = model.decoder_hidden(dec_in, 0 if i == 1 else i)[0, -1]
        logits.append(model.audio_logits(dh, i).float())
        dec_in = model.projection(model.embed_audio(i, codes[:, i:i + 1]).to(h.dtype))
    return logits0, torch.stack(logits)


def logit_error(reference: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor]) -> dict[str, float]:
    """How far ``other``'s probe logits are from the reference: relative RMS and max error, top-1 agreement."""
    out: dict[str, float] = {}
    for name, a, b in (("codebook0", reference[0], other[0]), ("decoder", reference[1], other[1])):
        scale = float(a.std())
        out[f"{name}_rel_rms"] = float((a - b).pow(2).mean().sqrt()) / scale
        out[f"{name}_rel_max"] = float((a - b).abs().max()) / scale
        out[f"{name}_top1_agree"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return out
