"""config.json in either layout: Sesame's original (``backbone_flavor``...) or transformers' ``CsmConfig``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csm_engine.config import TRANSFORMER_FLAVORS, CSMConfig, RopeScaling, TransformerConfig
from csm_engine.errors import CSMError, first_line
from csm_engine.weights.hub import CONFIG_FILE, DEFAULT_CSM_REPO, MAKE_CHECKPOINT_HINT


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CSMError(f"{what} not found: {path} (write a checkpoint with {MAKE_CHECKPOINT_HINT} "
                       f"or pass a hub repo id such as {DEFAULT_CSM_REPO})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CSMError(f"{path} is not valid JSON ({first_line(e)}); re-download it or rewrite it "
                       f"with {MAKE_CHECKPOINT_HINT}") from None
    except OSError as e:
        raise CSMError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise CSMError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _rope_from_transformers(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope base, Llama-3 scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``."""
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or params)
    base = float(params.get("rope_theta", d.get("rope_theta", 500_000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return base, None
    if kind != "llama3":
        raise CSMError(f"config.json: unsupported rope type {kind!r} (CSM uses llama3 scaling)")
    return base, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _transformer_from_transformers(d: Mapping[str, Any], where: str) -> TransformerConfig:
    try:
        dim, n_heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        base, scaling = _rope_from_transformers(d)
        cfg = TransformerConfig(
            n_layers=int(d["num_hidden_layers"]), dim=dim, n_heads=n_heads,
            n_kv_heads=int(d.get("num_key_value_heads", n_heads)),
            intermediate_dim=int(d["intermediate_size"]),
            max_seq_len=int(d.get("max_position_embeddings", 2048)),
            norm_eps=float(d.get("rms_norm_eps", 1e-5)), rope_base=base, rope_scaling=scaling,
        )
    except KeyError as e:
        raise CSMError(f"config.json: {where} lacks {e.args[0]!r} (not a transformers CsmConfig?)") from None
    head_dim = d.get("head_dim")
    if head_dim is not None and int(head_dim) != cfg.head_dim:
        raise CSMError(f"config.json: {where} head_dim {head_dim} != hidden_size / num_attention_heads "
                       f"({cfg.head_dim}); this engine needs head_dim * heads == hidden_size")
    return cfg


def _name_flavor(cfg: TransformerConfig, ignore_seq_len: bool) -> tuple[str, TransformerConfig]:
    """The named flavor equal to ``cfg`` (optionally whatever its max_seq_len), else 'custom'."""
    for name, known in TRANSFORMER_FLAVORS.items():
        if (dataclasses.replace(known, max_seq_len=cfg.max_seq_len) if ignore_seq_len else known) == cfg:
            return name, known
    return "custom", cfg


def config_from_transformers(d: Mapping[str, Any]) -> CSMConfig:
    """CSMConfig from a transformers ``CsmConfig`` config.json."""
    depth = d.get("depth_decoder_config")
    if not isinstance(depth, Mapping):
        raise CSMError("config.json: transformers CsmConfig lacks 'depth_decoder_config'")
    b_name, backbone = _name_flavor(_transformer_from_transformers(d, "backbone"), ignore_seq_len=False)
    # transformers sizes the decoder's positions to num_codebooks + 1; ours only need >= num_codebooks.
    d_name, decoder = _name_flavor(_transformer_from_transformers(depth, "depth_decoder_config"), ignore_seq_len=True)
    try:
        return CSMConfig(
            backbone_flavor=b_name, decoder_flavor=d_name, backbone=backbone, decoder=decoder,
            text_vocab_size=int(d["text_vocab_size"]), audio_vocab_size=int(d["vocab_size"]),
            audio_num_codebooks=int(d["num_codebooks"]),
        )
    except KeyError as e:
        raise CSMError(f"config.json lacks {e.args[0]!r} (not a transformers CsmConfig?)") from None


def transformers_config_dict(config: CSMConfig) -> dict[str, Any]:
    """A transformers ``CsmConfig`` config.json for ``config`` (special token ids kept inside the text vocab)."""

    def block(t: TransformerConfig, max_positions: int) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": t.rope_base}
        if t.rope_scaling is not None:
            rs = t.rope_scaling
            rope = {"rope_type": "llama3", "rope_theta": t.rope_base, "factor": rs.factor,
                    "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
                    "original_max_position_embeddings": rs.original_max_position_embeddings}
        return {"hidden_size": t.dim, "intermediate_size": t.intermediate_dim, "num_hidden_layers": t.n_layers,
                "num_attention_heads": t.n_heads, "num_key_value_heads": t.n_kv_heads, "head_dim": t.head_dim,
                "max_position_embeddings": max_positions, "rms_norm_eps": t.norm_eps, "rope_parameters": rope,
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}

    n_cb, v = config.audio_num_codebooks, config.text_vocab_size
    depth = {"model_type": "csm_depth_decoder_model", "num_codebooks": n_cb, "vocab_size": config.audio_vocab_size,
             "backbone_hidden_size": config.backbone.dim, **block(config.decoder, n_cb + 1)}
    specials = ({"bos_token_id": 128000, "pad_token_id": 128002, "audio_token_id": 128002,
                 "audio_eos_token_id": 128003} if v >= 128256 else
                {"bos_token_id": v - 4, "pad_token_id": v - 3, "audio_token_id": v - 2, "audio_eos_token_id": v - 1})
    return {
        "architectures": ["CsmForConditionalGeneration"], "model_type": "csm",
        "num_codebooks": n_cb, "vocab_size": config.audio_vocab_size, "text_vocab_size": v,
        **block(config.backbone, config.backbone.max_seq_len),
        **specials, "codebook_pad_token_id": config.audio_vocab_size - 1, "codebook_eos_token_id": 0,
        "tie_codebooks_embeddings": True, "depth_decoder_config": depth,
    }


def read_config(model_dir: Path) -> CSMConfig:
    """The CSMConfig of a checkpoint directory, from either config.json layout."""
    path = model_dir / CONFIG_FILE
    d = read_json(path, "model config")
    if "backbone_flavor" in d:
        try:
            return CSMConfig.from_json_dict(d)
        except (ValueError, TypeError) as e:
            raise CSMError(f"{path}: {e} (rewrite it with {MAKE_CHECKPOINT_HINT})") from None
    if d.get("model_type") == "csm" or "depth_decoder_config" in d:
        return config_from_transformers(d)
    raise CSMError(f"{path} is not a CSM config: it has neither 'backbone_flavor' (original layout) nor "
                   f"model_type 'csm' (transformers); pass a CSM checkpoint directory or {DEFAULT_CSM_REPO}")

