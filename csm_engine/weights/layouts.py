"""Tensor layouts: original (Sesame) and transformers names, the q/k RoPE row order, conversion both ways.

- original: ``backbone.layers.N.attn.q_proj.weight``, ``...sa_norm.scale``, ``text_embeddings.weight``,
  ``audio_head``: the names ``CSMModel`` uses, q/k rows in interleaved-pair RoPE order;
- transformers (``CsmForConditionalGeneration``): ``backbone_model.layers.N.self_attn.q_proj.weight``,
  ``embed_text_tokens.weight``, ``lm_head.weight``, ``depth_decoder.codebooks_head.weight`` ...,
  with q/k rows permuted for rotate-half RoPE.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from csm_engine.config import CSMConfig
from csm_engine.errors import CSMError

ORIGINAL = "original"
TRANSFORMERS = "transformers"

_LAYER_NAMES = [
    ("attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("attn.k_proj.weight", "self_attn.k_proj.weight"),
    ("attn.v_proj.weight", "self_attn.v_proj.weight"),
    ("attn.output_proj.weight", "self_attn.o_proj.weight"),
    ("mlp.w1.weight", "mlp.gate_proj.weight"),
    ("mlp.w2.weight", "mlp.down_proj.weight"),
    ("mlp.w3.weight", "mlp.up_proj.weight"),
    ("sa_norm.scale", "input_layernorm.weight"),
    ("mlp_norm.scale", "post_attention_layernorm.weight"),
]
_STACKS = [("backbone", "backbone_model"), ("decoder", "depth_decoder.model")]
_TOP_NAMES = [
    ("text_embeddings.weight", "embed_text_tokens.weight"),
    ("audio_embeddings.weight", "backbone_model.embed_tokens.embed_audio_tokens.weight"),
    ("projection.weight", "depth_decoder.model.inputs_embeds_projector.weight"),
    ("codebook0_head.weight", "lm_head.weight"),
    ("audio_head", "depth_decoder.codebooks_head.weight"),
    ("backbone.norm.scale", "backbone_model.norm.weight"),
    ("decoder.norm.scale", "depth_decoder.model.norm.weight"),
]
# Names older transformers releases used for the same tensors.
_TRANSFORMERS_ALIASES = {"backbone_model.embed_tokens.embed_text_tokens.weight": "embed_text_tokens.weight"}
# The depth decoder's codebook table: the same tensor as the backbone's audio embeddings.
_TIED_AUDIO_TABLE = "depth_decoder.model.embed_tokens.weight"


def key_map(config: CSMConfig) -> dict[str, str]:
    """original name -> transformers name, for every tensor of ``config``."""
    out = dict(_TOP_NAMES)
    for orig, hf in _STACKS:
        n_layers = getattr(config, orig).n_layers
        for i in range(n_layers):
            for o, h in _LAYER_NAMES:
                out[f"{orig}.layers.{i}.{o}"] = f"{hf}.layers.{i}.{h}"
    return out


def _rope_heads(name: str, config: CSMConfig) -> int | None:
    """Heads of a q/k projection in original naming (rows to permute), or None for other tensors."""
    m = re.match(r"^(backbone|decoder)\.layers\.\d+\.attn\.(q|k)_proj\.weight$", name)
    if not m:
        return None
    t = getattr(config, m.group(1))
    return t.n_heads if m.group(2) == "q" else t.n_kv_heads


def interleaved_to_half(w: Tensor, n_heads: int) -> Tensor:
    """q/k rows per head from interleaved RoPE pairs (0,1),(2,3).. to rotate-half order (evens, then odds)."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def half_to_interleaved(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of ``interleaved_to_half``."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def original_to_transformers(sd: Mapping[str, Tensor], config: CSMConfig) -> dict[str, Tensor]:
    """An original-layout state dict -> ``CsmForConditionalGeneration`` names and q/k row order.

    The audio codebook table appears once, under the backbone's name (transformers ties the depth
    decoder's copy to it); the codec is not included (Mimi has its own file).
    """
    names = key_map(config)
    out: dict[str, Tensor] = {}
    for name, tensor in sd.items():
        if name not in names:
            raise CSMError(f"unexpected tensor {name!r} in an original-layout state dict")
        heads = _rope_heads(name, config)
        out[names[name]] = interleaved_to_half(tensor, heads) if heads else tensor
    return out


def transformers_to_original(sd: Mapping[str, Tensor], config: CSMConfig) -> dict[str, Tensor]:
    """A ``CsmForConditionalGeneration`` state dict -> original names and interleaved q/k rows."""
    return {orig: from_transformers(orig, sd[stored], config)
            for orig, stored in transformers_names(list(sd), config).items()}


def transformers_names(stored: list[str], config: CSMConfig, source: str = "a transformers-layout checkpoint"
                       ) -> dict[str, str]:
    """original name -> stored name for the tensors of a transformers-layout checkpoint.

    The codec's tensors are skipped (Mimi comes from its own file). The audio codebook table is
    tied between backbone and depth decoder, and transformers saves only one of the two names
    (which one depends on its version): either is accepted.
    """
    back = {h: o for o, h in key_map(config).items()}
    out: dict[str, str] = {}
    for name in stored:
        canonical = _TRANSFORMERS_ALIASES.get(name, name)
        if canonical.startswith("codec_model.") or canonical == _TIED_AUDIO_TABLE:
            continue
        if canonical not in back:
            raise CSMError(f"unexpected tensor {name!r} in {source} "
                           "(not a CsmForConditionalGeneration checkpoint of this config.json?)")
        out[back[canonical]] = name
    if "audio_embeddings.weight" not in out and _TIED_AUDIO_TABLE in stored:
        out["audio_embeddings.weight"] = _TIED_AUDIO_TABLE
    return out


def from_transformers(orig_name: str, tensor: Tensor, config: CSMConfig) -> Tensor:
    """One transformers-layout tensor, stored under ``orig_name``'s transformers name, in original row order."""
    heads = _rope_heads(orig_name, config)
    return half_to_interleaved(tensor, heads) if heads else tensor


def detect_layout(keys: list[str] | set[str]) -> str:
    """``"original"`` or ``"transformers"`` from tensor names; CSMError for anything else."""
    keys = set(keys)
    if "text_embeddings.weight" in keys or any(k.startswith("backbone.layers.") for k in keys):
        return ORIGINAL
    if "lm_head.weight" in keys or any(k.startswith("backbone_model.") for k in keys):
        return TRANSFORMERS
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise CSMError(f"unrecognised checkpoint tensors ({sample}); expected Sesame's original layout or "
                   "transformers' CsmForConditionalGeneration")


def expected_shapes(config: CSMConfig) -> dict[str, tuple[int, ...]]:
    """Original-layout name -> shape of every parameter ``CSMModel(config)`` has."""
    from csm_engine.model import CSMModel

    with torch.device("meta"):
        model = CSMModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def validate_shapes(found: Mapping[str, tuple[int, ...]], config: CSMConfig, source: Path | str) -> None:
    """CSMError naming the first missing, unexpected or mis-shaped tensor (original-layout names)."""
    want = expected_shapes(config)
    missing = [k for k in want if k not in found]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CSMError(f"{source}: missing tensor {missing[0]!r}{more} (incomplete download or a checkpoint of "
                       "another model: re-download it or rewrite it with make-checkpoint)")
    extra = [k for k in found if k not in want]
    if extra:
        raise CSMError(f"{source}: unexpected tensor {extra[0]!r} (not a CSM checkpoint for this config.json)")
    for k, shape in want.items():
        if tuple(found[k]) != shape:
            raise CSMError(f"{source}: tensor {k!r} has shape {tuple(found[k])}, config.json expects {shape} "
                           "(config.json and model weights do not match)")

