"""Where checkpoints live and how they are read: local dirs, hub repos, two tensor layouts.

This is the one module that knows file names, repo ids and formats. A CSM checkpoint
directory holds ``config.json`` + ``model.safetensors`` (or shards with an index) in one of two
layouts:

- original (Sesame's reference code): ``backbone.layers.N.attn.q_proj.weight``,
  ``...sa_norm.scale``, ``text_embeddings.weight``, ``audio_head`` — the names ``CSMModel`` uses;
- transformers (``CsmForConditionalGeneration``): ``backbone_model.layers.N.self_attn.q_proj.weight``,
  ``embed_text_tokens.weight``, ``lm_head.weight``, ``depth_decoder.codebooks_head.weight`` ...,
  with q/k rows permuted for rotate-half RoPE. Loading converts them back.

Tensors are read with ``safetensors`` only: nothing here ever unpickles a file.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from csm_engine.config import TRANSFORMER_FLAVORS, CSMConfig, RopeScaling, TransformerConfig
from csm_engine.errors import CSMError

DEFAULT_CSM_REPO = "sesame/csm-1b"
MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_REPO = "unsloth/Llama-3.2-1B"

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
MODEL_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

ORIGINAL = "original"
TRANSFORMERS = "transformers"

# What a hub download of a CSM repo fetches: never pickles (ckpt.pt), never audio prompts.
HUB_PATTERNS = [CONFIG_FILE, "model*.safetensors", MODEL_INDEX_FILE, TOKENIZER_FILE, MIMI_FILE]

MAKE_CHECKPOINT_HINT = "`python -m csm_engine.testing make-checkpoint DIR`"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------
# Locating files: local paths or hub repos
# ---------------------------------------------------------------------------------------------


def looks_like_repo_id(name: str) -> bool:
    """``owner/name`` with no path syntax (``./``, ``~``, absolute paths, more slashes)."""
    return bool(_REPO_ID.match(name)) and not name.startswith(".")


def _hub_error(repo_id: str, err: BaseException, what: str, filename: str | None = None) -> CSMError:
    """One line saying why ``repo_id`` could not be fetched and what to do about it."""
    from huggingface_hub import errors

    url = f"https://huggingface.co/{repo_id}"
    if isinstance(err, errors.GatedRepoError):
        return CSMError(f"{repo_id} is gated: accept the licence at {url} and run `huggingface-cli login` "
                        "or set HF_TOKEN")
    if isinstance(err, errors.RepositoryNotFoundError):
        return CSMError(f"{what} {repo_id!r} is neither a local directory nor a hub repo you can access "
                        f"(check the name; private repos need `huggingface-cli login` or HF_TOKEN)")
    if isinstance(err, errors.RevisionNotFoundError):
        return CSMError(f"{repo_id}: revision not found on the hub (check the repo at {url})")
    if isinstance(err, getattr(errors, "RemoteEntryNotFoundError", ())):
        return CSMError(f"{repo_id} has no {filename or what} on the hub; pass a local path to the {what} instead")
    if isinstance(err, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError,
                        TimeoutError)) or _is_transport_error(err):
        return CSMError(f"cannot download {repo_id}: the hub is unreachable and it is not in the local cache "
                        "(connect and retry, unset HF_HUB_OFFLINE, or pass a local directory)")
    detail = (str(err).splitlines() or [""])[0] or type(err).__name__
    return CSMError(f"cannot download {repo_id}: {detail} (retry, or pass a local directory)")


def hub_error(repo_id: str, err: BaseException, what: str, filename: str | None = None) -> CSMError:
    """Public form of the one-line hub failure message (other packages fetch from the hub too)."""
    return _hub_error(repo_id, err, what, filename)


def _client_error_types(attr: str) -> tuple[type[BaseException], ...]:
    """Error classes named ``attr`` of the HTTP clients huggingface_hub releases use (httpx2, httpx)."""
    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _is_transport_error(err: BaseException) -> bool:
    """A network-level failure (no answer from the hub), whichever HTTP client the hub uses."""
    if isinstance(err, _client_error_types("TransportError")):
        return True
    try:  # huggingface_hub < 1.0 used requests
        from requests.exceptions import ConnectionError as RequestsConnectionError, Timeout
    except ImportError:
        return False
    return isinstance(err, (RequestsConnectionError, Timeout))


def hub_reachable() -> bool:
    """Whether the Hugging Face endpoint's host resolves (False in offline mode); a quick local check."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _hub_call(repo_id: str, what: str, filename: str | None, fn, *args, **kwargs) -> Path:
    """Run a huggingface_hub download and turn its failures into one-line CSMErrors."""
    from huggingface_hub import errors

    caught = (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled,
              ConnectionError, TimeoutError, OSError, *_client_error_types("HTTPError"))
    try:
        # The cache first; then only go to the network when the hub's host resolves at all:
        # offline, the hub client would retry a dead connection for ~25 s before failing.
        try:
            return Path(fn(*args, local_files_only=True, **kwargs))
        except errors.LocalEntryNotFoundError:
            if not hub_reachable():
                raise
        return Path(fn(*args, **kwargs))
    except errors.HFValidationError:
        raise CSMError(f"{what} {repo_id!r} is neither a local path nor a valid hub repo id") from None
    except caught as e:
        raise _hub_error(repo_id, e, what, filename) from None


def download_repo(repo_id: str, allow_patterns: list[str] | None = None, what: str = "model") -> Path:
    """Fetch (or find in the HF cache) a hub repo snapshot; tqdm progress bars while it downloads."""
    from huggingface_hub import snapshot_download

    return _hub_call(repo_id, what, None, snapshot_download, repo_id, allow_patterns=allow_patterns or HUB_PATTERNS)


def download_file(repo_id: str, filename: str, what: str) -> Path:
    """Fetch (or find in the HF cache) one file of a hub repo."""
    from huggingface_hub import hf_hub_download

    return _hub_call(repo_id, what, filename, hf_hub_download, repo_id, filename)


def resolve_model_dir(path_or_repo: str | os.PathLike | None = None) -> Path:
    """A checkpoint directory: ``path_or_repo`` itself if it is a local dir, else a hub snapshot of it.

    ``None`` means the released model (``sesame/csm-1b``).
    """
    name = DEFAULT_CSM_REPO if path_or_repo is None else os.fspath(path_or_repo)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CSMError(f"model path {local} is a file; pass the checkpoint directory that holds it "
                       f"({CONFIG_FILE} + {MODEL_FILE})")
    if not looks_like_repo_id(name):
        raise CSMError(f"model directory not found: {local} (write one with {MAKE_CHECKPOINT_HINT} "
                       f"or pass a hub repo id such as {DEFAULT_CSM_REPO})")
    return download_repo(name)


# ---------------------------------------------------------------------------------------------
# config.json: the original layout or transformers' CsmConfig
# ---------------------------------------------------------------------------------------------


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CSMError(f"{what} not found: {path} (write a checkpoint with {MAKE_CHECKPOINT_HINT} "
                       f"or pass a hub repo id such as {DEFAULT_CSM_REPO})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CSMError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); re-download it or rewrite it "
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


# ---------------------------------------------------------------------------------------------
# Tensor layouts: names, q/k RoPE permutation, conversion both ways
# ---------------------------------------------------------------------------------------------

# (original suffix inside a layer, transformers suffix inside a layer)
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
    return {orig: _from_transformers(orig, sd[stored], config)
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


def _from_transformers(orig_name: str, tensor: Tensor, config: CSMConfig) -> Tensor:
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


# ---------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint dir: ``model.safetensors`` or the shards of its index."""
    single = model_dir / MODEL_FILE
    if single.is_file():
        return [single]
    index = model_dir / MODEL_INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, "weight index").get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise CSMError(f"{absent[0]} (listed in {index.name}) is missing: re-download the checkpoint")
        if files:
            return files
    if (model_dir / "ckpt.pt").is_file():
        raise CSMError(f"{model_dir} holds only ckpt.pt, a pickle this engine never loads; use a directory "
                       f"with {MODEL_FILE} (the hub repo {DEFAULT_CSM_REPO} has one)")
    raise CSMError(f"model weights not found: {single} (write a checkpoint with {MAKE_CHECKPOINT_HINT} "
                   f"or pass a hub repo id such as {DEFAULT_CSM_REPO})")


class Checkpoint:
    """An opened checkpoint directory: config, layout and lazily read tensors (original names)."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self.dir = model_dir
        self.config = read_config(model_dir)
        self._handles = {}
        self._where: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for path in weight_files(model_dir):
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
                for key in handle.keys():
                    self._where[key] = path
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
            except CSMError:
                raise
            except Exception as e:  # safetensors raises its own error types on torn/foreign files
                raise CSMError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                               "re-download it or rewrite it with make-checkpoint") from None
            self._handles[path] = handle
        self.layout = detect_layout(list(shapes))
        if self.layout == ORIGINAL:
            self._names = {k: k for k in shapes}  # original name -> stored name
        else:
            self._names = transformers_names(list(shapes), self.config, str(model_dir))
        validate_shapes({o: shapes[s] for o, s in self._names.items()}, self.config, model_dir)

    def names(self) -> list[str]:
        return list(self._names)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of one tensor (original name), read from the file header only."""
        stored = self._names[name]
        code = self._handles[self._where[stored]].get_slice(stored).get_dtype()
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(code, torch.float32)

    def tensor(self, name: str) -> Tensor:
        """One tensor in original layout (q/k rows back in interleaved order), read from disk now."""
        stored = self._names[name]
        tensor = self._handles[self._where[stored]].get_tensor(stored)
        return _from_transformers(name, tensor, self.config) if self.layout == TRANSFORMERS else tensor

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        for name in self._names:
            yield name, self.tensor(name)


def open_checkpoint(path_or_repo: str | os.PathLike | None = None) -> Checkpoint:
    """Open (downloading if needed) a checkpoint; config and every tensor's name and shape are validated."""
    return Checkpoint(resolve_model_dir(path_or_repo))


def load_state_dict(path_or_repo: str | os.PathLike | None = None) -> tuple[CSMConfig, dict[str, Tensor]]:
    """(config, original-layout state dict) of a checkpoint dir or hub repo id, either layout."""
    ckpt = open_checkpoint(path_or_repo)
    return ckpt.config, dict(ckpt.tensors())


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(name, name)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise CSMError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return value


class _WeightsOnMeta(TorchFunctionMode):
    """While active (in this thread only), ``torch.empty`` allocates on the meta device.

    ``nn.Linear``/``nn.Embedding`` create their weights with ``torch.empty`` and then
    random-initialise them; on meta both cost nothing. Buffers computed from the config (rope
    tables, masks) are made by other ops and stay real. This halves peak memory and skips
    seconds of initialisation for weights the checkpoint replaces anyway.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _has_meta_tensors(module: torch.nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def load_csm_model(path_or_repo: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype | str | None = None):
    """A ``CSMModel`` in eval mode with the checkpoint's weights (``dtype`` None = float32).

    Parameters are created empty and filled one checkpoint tensor at a time, so peak memory is
    one model in ``dtype`` plus one tensor, never a random-init copy next to the loaded one.
    """
    from csm_engine.model import CSMModel

    target = as_dtype(dtype) or torch.float32
    ckpt = open_checkpoint(path_or_repo)
    with _WeightsOnMeta():
        model = CSMModel(ckpt.config)
    _fill_parameters(model, ckpt, device, target)
    if _has_meta_tensors(model):  # model.py made something else with torch.empty: build it the plain way
        model = CSMModel(ckpt.config)
        _fill_parameters(model, ckpt, device, target)
    return model.to(device).eval()


def _fill_parameters(model: torch.nn.Module, ckpt: Checkpoint, device: str | torch.device,
                     dtype: torch.dtype) -> None:
    """Replace every parameter of ``model`` by the checkpoint's tensor (names were validated on open)."""
    modules = dict(model.named_modules())
    for name, tensor in ckpt.tensors():
        owner, _, leaf = name.rpartition(".")
        module = modules[owner]
        requires_grad = getattr(module, leaf).requires_grad
        setattr(module, leaf, torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=requires_grad))
        del tensor


# ---------------------------------------------------------------------------------------------
# Mimi and the text tokenizer
# ---------------------------------------------------------------------------------------------


def _model_dir_or_none(model_path: str | os.PathLike | None) -> Path | None:
    """The checkpoint dir for a model path/repo (downloading a repo); None if there is none."""
    try:
        return resolve_model_dir(model_path)
    except CSMError:
        return None


def _find_file(explicit: str | os.PathLike | None, model_path: str | os.PathLike | None, filename: str,
               default_repo: str, what: str, fix: str) -> Path:
    """``explicit`` (file, dir or repo id), else the model dir's ``filename``, else ``default_repo``'s."""
    if explicit is not None:
        local = Path(explicit).expanduser()
        if local.is_dir():
            local = local / filename
        elif not local.exists() and looks_like_repo_id(os.fspath(explicit)):
            return download_file(os.fspath(explicit), filename, what)
        if not local.is_file():
            raise CSMError(f"{what} not found: {local} ({fix})")
        return local
    model_dir = _model_dir_or_none(model_path)
    if model_dir is not None and (model_dir / filename).is_file():
        return model_dir / filename
    return download_file(default_repo, filename, what)


def find_mimi_file(mimi_path: str | os.PathLike | None = None, *,
                   model_path: str | os.PathLike | None = None) -> Path:
    """Mimi's safetensors: ``mimi_path`` (file, dir or repo id), else the model dir's copy, else the hub."""
    return _find_file(mimi_path, model_path, MIMI_FILE, MIMI_REPO, "Mimi codec",
                      f"pass --mimi-path to {MIMI_FILE}, from the hub repo {MIMI_REPO}")


def load_mimi(mimi_path: str | os.PathLike | None = None, *, model_path: str | os.PathLike | None = None,
              device: str | torch.device = "cpu"):
    """A ``MimiCodec`` (32 codebooks) from a moshi-layout safetensors file, found as ``find_mimi_file`` says."""
    from csm_engine.codec import MimiCodec

    path = find_mimi_file(mimi_path, model_path=model_path)
    if path.suffix != ".safetensors":
        # moshi would torch.load (unpickle) anything else.
        raise CSMError(f"Mimi weights must be a .safetensors file, got {path.name} (use {MIMI_FILE} from {MIMI_REPO})")
    return MimiCodec.load(path, device=device)


def find_tokenizer_file(tokenizer_path: str | os.PathLike | None = None, *,
                        model_path: str | os.PathLike | None = None) -> Path:
    """``tokenizer.json``: ``tokenizer_path`` (file, dir or repo id), else the model dir's, else Llama-3.2's."""
    return _find_file(tokenizer_path, model_path, TOKENIZER_FILE, TOKENIZER_REPO, "text tokenizer",
                      f"pass --tokenizer-path to a tokenizer.json, e.g. from {TOKENIZER_REPO}")


def load_text_tokenizer(tokenizer_path: str | os.PathLike | None = None, *,
                        model_path: str | os.PathLike | None = None):
    """The Llama-3 style ``TextTokenizer`` (adds BOS/EOS), found as ``find_tokenizer_file`` says."""
    from csm_engine.tokens import TextTokenizer

    return TextTokenizer.from_file(find_tokenizer_file(tokenizer_path, model_path=model_path))


__all__ = [
    "DEFAULT_CSM_REPO", "MIMI_REPO", "MIMI_FILE", "TOKENIZER_REPO", "Checkpoint", "detect_layout",
    "config_from_transformers", "transformers_config_dict", "original_to_transformers", "transformers_to_original",
    "load_state_dict", "load_csm_model", "load_mimi", "load_text_tokenizer", "resolve_model_dir",
    "find_mimi_file", "find_tokenizer_file", "open_checkpoint", "read_config",
]
