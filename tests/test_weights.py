"""Checkpoint loading: both tensor layouts, hub resolution against a local cache, bad files.

Everything runs on tiny random checkpoints written by ``csm_engine.testing.checkpoints`` in the real
formats, read back through the real loading code (safetensors, huggingface_hub, tokenizers,
moshi). The hub is never contacted: hub tests point huggingface_hub at a pre-populated cache
or at a local HTTP server that answers like the hub does for gated or unknown repos.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from csm_engine import weights
from csm_engine.config import get_flavor
from csm_engine.errors import CSMError
from csm_engine.model import CSMModel
from csm_engine.testing.checkpoints import main as make_checkpoint_main
from csm_engine.testing.checkpoints import random_state_dict, write_model_weights
from csm_engine.weights import layouts

TINY = get_flavor("tiny")


def _assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg


@pytest.fixture(scope="module")
def transformers_checkpoint(tmp_path_factory) -> Path:
    """The same tiny weights as ``tiny_checkpoint`` (seed 0), stored in the transformers layout."""
    out = tmp_path_factory.mktemp("tiny_transformers")
    return write_model_weights(out, TINY, seed=0, layout=weights.TRANSFORMERS).parent


def _copy_model_files(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in (weights.CONFIG_FILE, weights.MODEL_FILE):
        shutil.copy(src / name, dst / name)
    return dst


# ---------------------------------------------------------------------------------------------
# make-checkpoint -> load
# ---------------------------------------------------------------------------------------------


def test_make_checkpoint_writes_config_weights_tokenizer_and_mimi(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", weights.MIMI_FILE} <= names
    assert json.loads((tiny_checkpoint / "config.json").read_text()) == TINY.to_json_dict()


def test_loaded_state_dict_has_every_model_tensor_with_its_shape(tiny_checkpoint):
    config, sd = weights.load_state_dict(tiny_checkpoint)
    assert config == TINY
    want = CSMModel(TINY).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in want.items()}
    CSMModel(config).load_state_dict(sd, strict=True)


def test_checkpoint_weights_are_the_seeded_random_state_dict(tiny_checkpoint):
    _, sd = weights.load_state_dict(tiny_checkpoint)
    ref = random_state_dict(TINY, seed=0)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    other = random_state_dict(TINY, seed=1)
    assert not torch.equal(other["text_embeddings.weight"], ref["text_embeddings.weight"])
    scales = sd["backbone.norm.scale"]
    assert 0.8 < float(scales.min()) and float(scales.max()) < 1.2 and not torch.all(scales == 1)


def test_load_csm_model_puts_weights_in_the_requested_dtype(tiny_checkpoint):
    model = weights.load_csm_model(tiny_checkpoint, dtype="bfloat16")
    assert not model.training
    _, sd = weights.load_state_dict(tiny_checkpoint)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, sd[name].to(torch.bfloat16)), name


def test_load_csm_model_has_real_buffers_equal_to_a_plain_model(tiny_checkpoint):
    # Weights are created empty (meta) and filled from the file; nothing may be left on meta.
    model = weights.load_csm_model(tiny_checkpoint)
    plain = dict(CSMModel(TINY).named_buffers())
    for name, buf in model.named_buffers():
        assert not buf.is_meta, name
        assert torch.equal(buf, plain[name]), name
    assert not any(p.is_meta for p in model.parameters())


def test_make_checkpoint_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "csm_engine.testing", "make-checkpoint", str(tmp_path / "ck"),
                          "--flavor", "tiny", "--seed", "3", "--no-mimi"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    _, sd = weights.load_state_dict(tmp_path / "ck")
    assert torch.equal(sd["audio_head"], random_state_dict(TINY, seed=3)["audio_head"])


def test_make_checkpoint_rejects_an_unknown_flavor(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_checkpoint_main(["make-checkpoint", str(tmp_path / "ck"), "--flavor", "huge"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


def test_text_tokenizer_adds_bos_and_eos_and_fits_the_vocab(tiny_checkpoint):
    tok = weights.load_text_tokenizer(model_path=tiny_checkpoint)
    ids = tok.encode("[0]Hello there, it's 7:30!")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert max(ids) < TINY.text_vocab_size and tok.vocab_size <= TINY.text_vocab_size
    assert tok.decode(ids) == "[0]Hello there, it's 7:30!"


def test_mimi_file_round_trips_through_moshi(tiny_checkpoint):
    codec = weights.load_mimi(model_path=tiny_checkpoint)
    wav = torch.sin(torch.arange(24_000) * 0.05) * 0.3
    codes = codec.encode(wav)
    assert codes.shape == (32, 13)
    # Random codebooks (not moshi's all-zero init): different codes decode to different audio.
    a = codec.decode(torch.zeros(32, 2, dtype=torch.long))
    b = codec.decode(torch.full((32, 2), 7, dtype=torch.long))
    assert a.shape == (2 * 1920,) and not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------------
# transformers layout
# ---------------------------------------------------------------------------------------------


def test_original_to_transformers_and_back_is_the_identity():
    sd = random_state_dict(TINY, seed=5)
    hf = weights.original_to_transformers(sd, TINY)
    assert "backbone_model.layers.1.self_attn.q_proj.weight" in hf and "lm_head.weight" in hf
    assert not torch.equal(hf["backbone_model.layers.0.self_attn.q_proj.weight"],
                           sd["backbone.layers.0.attn.q_proj.weight"])
    back = weights.transformers_to_original(hf, TINY)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_qk_permutation_turns_interleaved_rope_into_rotate_half():
    # RoPE on interleaved pairs of W x equals rotate-half RoPE on (permuted W) x, row-permuted.
    n_heads, head_dim, dim = 2, 8, 6
    w = torch.randn(n_heads * head_dim, dim)
    x = torch.randn(dim)
    angle = torch.randn(head_dim // 2)
    cos, sin = angle.cos(), angle.sin()
    q = (w @ x).view(n_heads, head_dim // 2, 2)
    inter = torch.stack([q[..., 0] * cos - q[..., 1] * sin, q[..., 1] * cos + q[..., 0] * sin], dim=-1)
    qh = (layouts.interleaved_to_half(w, n_heads) @ x).view(n_heads, head_dim)
    lo, hi = qh[:, : head_dim // 2], qh[:, head_dim // 2:]
    half = torch.cat([lo * cos - hi * sin, hi * cos + lo * sin], dim=-1)
    # The rotate-half result is the interleaved one with evens first, then odds, per head.
    torch.testing.assert_close(half, torch.cat([inter[..., 0], inter[..., 1]], dim=-1))
    torch.testing.assert_close(layouts.half_to_interleaved(layouts.interleaved_to_half(w, n_heads), n_heads), w)


def test_transformers_layout_dir_loads_the_identical_state_dict(tiny_checkpoint, transformers_checkpoint):
    stored = load_file(str(transformers_checkpoint / "model.safetensors"))
    assert "depth_decoder.codebooks_head.weight" in stored and "audio_head" not in stored
    config, sd = weights.load_state_dict(transformers_checkpoint)
    ref_config, ref = weights.load_state_dict(tiny_checkpoint)
    assert config == ref_config
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


@torch.inference_mode()
def test_transformers_layout_model_gives_identical_outputs(tiny_checkpoint, transformers_checkpoint):
    a = weights.load_csm_model(tiny_checkpoint)
    b = weights.load_csm_model(transformers_checkpoint)
    tokens = torch.zeros(1, 6, 33, dtype=torch.long)
    tokens[..., -1] = torch.tensor([510, 58, 15, 60, 424, 511])
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[..., -1] = True
    frames = []
    for model in (a, b):
        model.setup_caches(1)
        frames.append(model.generate_frame(tokens, mask, torch.arange(6)[None], temperature=0, topk=1))
    assert torch.equal(frames[0], frames[1])
    positions = torch.arange(6)
    assert torch.equal(a.backbone_hidden(tokens, mask, positions), b.backbone_hidden(tokens, mask, positions))


def test_transformers_config_maps_to_the_same_flavor():
    for name in ("tiny", "1B"):
        cfg = get_flavor(name)
        assert weights.config_from_transformers(weights.transformers_config_dict(cfg)) == cfg


def _small_codec_config() -> dict:
    # CsmForConditionalGeneration builds its own Mimi; it plays no part here, so keep it small.
    return {"model_type": "mimi", "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 64,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32, "num_filters": 8,
            "codebook_dim": 32, "vector_quantization_hidden_dimension": 32, "upsample_groups": 64,
            "num_quantizers": 32}


def test_a_checkpoint_saved_by_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    sd = random_state_dict(TINY, seed=9)
    hf_config = transformers.CsmConfig.from_dict({**weights.transformers_config_dict(TINY),
                                                  "codec_config": _small_codec_config()})
    hf_model = transformers.CsmForConditionalGeneration(hf_config)
    missing, unexpected = hf_model.load_state_dict(weights.original_to_transformers(sd, TINY), strict=False)
    assert not unexpected
    assert all(k.startswith("codec_model.") or k == "depth_decoder.model.embed_tokens.weight" for k in missing)
    hf_model.save_pretrained(tmp_path)  # transformers' own config.json and tensor names (tied table saved once)
    config, loaded = weights.load_state_dict(tmp_path)
    assert config == TINY
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: one-line CSMErrors naming the fix
# ---------------------------------------------------------------------------------------------


def test_missing_directory_names_make_checkpoint_and_repo_ids(tmp_path):
    with pytest.raises(CSMError) as err:
        weights.load_state_dict(tmp_path / "nope" / "deeper")
    _assert_one_line(err, "model directory not found", "make-checkpoint", "sesame/csm-1b")


def test_missing_config_json(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CSMError) as err:
        weights.load_state_dict(tmp_path)
    _assert_one_line(err, "config.json", "not found", "make-checkpoint")


def test_missing_model_safetensors(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    with pytest.raises(CSMError) as err:
        weights.load_state_dict(tmp_path)
    _assert_one_line(err, str(tmp_path / "model.safetensors"), "make-checkpoint")


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    (tmp_path / "ckpt.pt").write_bytes(b"\x80\x04not to be unpickled")
    with pytest.raises(CSMError) as err:
        weights.load_state_dict(tmp_path)
    _assert_one_line(err, "ckpt.pt", "never loads", "model.safetensors")


def test_invalid_config_json(tmp_path, tiny_checkpoint):
    d = _copy_model_files(tiny_checkpoint, tmp_path / "ck")
    (d / "config.json").write_text('{"backbone_flavor": "tiny-backbone",')
    with pytest.raises(CSMError) as err:
        weights.load_state_dict(d)
    _assert_one_line(err, "config.json", "not valid JSON")


def test_config_json_of_another_model(tmp_path, tiny_checkpoint):
    d = _copy_model_files(tiny_checkpoint, tmp_path / "ck")
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CSMError) as err:
        weights.load_state_dict(d)
    _assert_one_line(err, "not a CSM config", "backbone_flavor")


def test_unknown_flavor_in_config_json(tmp_path, tiny_checkpoint):
    d = _copy_model_files(tiny_checkpoint, tmp_path / "ck")
    (d / "config.json").write_text(json.dumps({"backbone_flavor": "llama-42B", "decoder_flavor": "llama-100M"}))
    with pytest.raises(CSMError) as err:
        weights.load_state_dict(d)
    _assert_one_line(err, "llama-42B")


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path, tiny_checkpoint):
    d = _copy_model_files(tiny_checkpoint, tmp_path / "ck")
    sd = load_file(str(d / "model.safetensors"))
    sd["decoder.layers.1.mlp.w2.weight"] = torch.zeros(32, 65)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CSMError) as err:
        weights.load_csm_model(d)
    _assert_one_line(err, "'decoder.layers.1.mlp.w2.weight'", "(32, 65)", "(32, 64)")


def test_config_that_does_not_match_the_weights(tmp_path, tiny_checkpoint):
    d = _copy_model_files(tiny_checkpoint, tmp_path / "ck")
    (d / "config.json").write_text(json.dumps({**TINY.to_json_dict(), "text_vocab_size": 1024}))
    with pytest.raises(CSMError) as err:
        weights.load_state_dict(d)
    _assert_one_line(err, "'text_embeddings.weight'", "(512, 64)", "(1024, 64)")


def test_missing_tensor_is_named(tmp_path, tiny_checkpoint):
    d = _copy_model_files(tiny_checkpoint, tmp_path / "ck")
    sd = load_file(str(d / "model.safetensors"))
    del sd["audio_head"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CSMError) as err:
        weights.load_state_dict(d)
    _assert_one_line(err, "missing tensor 'audio_head'")


def test_unexpected_tensor_in_transformers_layout_is_named(tmp_path, transformers_checkpoint):
    d = _copy_model_files(transformers_checkpoint, tmp_path / "ck")
    sd = load_file(str(d / "model.safetensors"))
    sd["backbone_model.layers.0.self_attn.rotary.weight"] = torch.zeros(2)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CSMError) as err:
        weights.load_state_dict(d)
    _assert_one_line(err, "backbone_model.layers.0.self_attn.rotary.weight")


def test_truncated_safetensors(tmp_path, tiny_checkpoint):
    d = _copy_model_files(tiny_checkpoint, tmp_path / "ck")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CSMError) as err:
        weights.load_state_dict(d)
    _assert_one_line(err, "model.safetensors", "not a readable safetensors file")


def test_mimi_path_must_be_safetensors(tmp_path):
    pt = tmp_path / "mimi.pt"
    pt.write_bytes(b"\x80\x04pickle")
    with pytest.raises(CSMError) as err:
        weights.load_mimi(pt)
    _assert_one_line(err, ".safetensors", weights.MIMI_REPO)


def test_missing_mimi_and_tokenizer_files_name_the_option(tmp_path):
    with pytest.raises(CSMError) as err:
        weights.load_mimi(tmp_path / "absent.safetensors")
    _assert_one_line(err, "--mimi-path")
    with pytest.raises(CSMError) as err:
        weights.load_text_tokenizer(tmp_path / "absent.json")
    _assert_one_line(err, "--tokenizer-path")


# ---------------------------------------------------------------------------------------------
# Hub repo ids: the real huggingface_hub code against a local cache / a local fake hub
# ---------------------------------------------------------------------------------------------


def _put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay files out as huggingface_hub's cache does: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        blob = repo / "blobs" / hashlib.sha256(str(src.resolve()).encode()).hexdigest()
        if not blob.exists():
            blob.symlink_to(src.resolve())
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache; the hub itself points at a closed local port."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    _point_hub_at(monkeypatch, "http://127.0.0.1:9")
    return cache


def _point_hub_at(monkeypatch, endpoint: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


def test_repo_id_resolves_to_its_cached_snapshot_offline(hub_cache, tiny_checkpoint, monkeypatch):
    from huggingface_hub import constants

    files = {n: tiny_checkpoint / n for n in ("config.json", "model.safetensors", "tokenizer.json", weights.MIMI_FILE)}
    snapshot = _put_in_hub_cache(hub_cache, "someone/csm-tiny", files)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert weights.resolve_model_dir("someone/csm-tiny") == snapshot
    config, sd = weights.load_state_dict("someone/csm-tiny")
    assert config == TINY and torch.equal(sd["audio_head"], random_state_dict(TINY, 0)["audio_head"])
    assert weights.find_mimi_file(model_path="someone/csm-tiny") == snapshot / weights.MIMI_FILE
    assert weights.load_text_tokenizer(model_path="someone/csm-tiny").vocab_size == 512


def test_cached_repo_is_used_when_the_hub_is_unreachable(hub_cache, tiny_checkpoint):
    files = {n: tiny_checkpoint / n for n in ("config.json", "model.safetensors")}
    snapshot = _put_in_hub_cache(hub_cache, "someone/csm-tiny", files)
    assert weights.resolve_model_dir("someone/csm-tiny") == snapshot


def test_default_tokenizer_and_mimi_come_from_their_hub_repos(hub_cache, tiny_checkpoint, tmp_path, monkeypatch):
    from huggingface_hub import constants

    _put_in_hub_cache(hub_cache, weights.TOKENIZER_REPO, {"tokenizer.json": tiny_checkpoint / "tokenizer.json"})
    mimi = _put_in_hub_cache(hub_cache, weights.MIMI_REPO, {weights.MIMI_FILE: tiny_checkpoint / weights.MIMI_FILE})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    bare = _copy_model_files(tiny_checkpoint, tmp_path / "bare")  # no tokenizer.json, no Mimi file
    assert weights.find_tokenizer_file(model_path=bare).parent.parent.parent.name.startswith("models--unsloth")
    assert weights.find_mimi_file(model_path=bare) == mimi / weights.MIMI_FILE


def test_uncached_repo_offline_says_how_to_fix_it(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CSMError) as err:
        weights.resolve_model_dir("sesame/csm-1b")
    _assert_one_line(err, "sesame/csm-1b", "not in the local cache", "HF_HUB_OFFLINE")


def test_uncached_repo_with_the_hub_unreachable(hub_cache):
    with pytest.raises(CSMError) as err:
        weights.resolve_model_dir("sesame/csm-1b")
    _assert_one_line(err, "unreachable", "pass a local directory")


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a gated repo (no token) or an unknown one."""

    error_code = "GatedRepo"

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(401)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("X-Error-Message", "Access restricted." if self.error_code == "GatedRepo" else "Not found.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(hub_cache, monkeypatch):
    def start(error_code: str) -> None:
        handler = type("Handler", (_FakeHub,), {"error_code": error_code})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        _point_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")

    servers: list[http.server.ThreadingHTTPServer] = []
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_gated_repo_names_the_licence_page_and_the_token(fake_hub):
    fake_hub("GatedRepo")
    with pytest.raises(CSMError) as err:
        weights.resolve_model_dir("sesame/csm-1b")
    _assert_one_line(err, "gated", "https://huggingface.co/sesame/csm-1b", "huggingface-cli login", "HF_TOKEN")


def test_gated_single_file_download_says_the_same(fake_hub):
    fake_hub("GatedRepo")
    with pytest.raises(CSMError) as err:
        weights.find_tokenizer_file("meta-llama/Llama-3.2-1B")
    _assert_one_line(err, "gated", "https://huggingface.co/meta-llama/Llama-3.2-1B", "HF_TOKEN")


def test_unknown_repo_says_it_is_neither_a_dir_nor_a_repo(fake_hub):
    fake_hub("RepoNotFound")
    with pytest.raises(CSMError) as err:
        weights.resolve_model_dir("nobody/no-such-model")
    _assert_one_line(err, "'nobody/no-such-model'", "neither a local directory nor a hub repo")


def test_a_file_is_not_a_model_directory(tiny_checkpoint):
    with pytest.raises(CSMError) as err:
        weights.resolve_model_dir(tiny_checkpoint / "model.safetensors")
    _assert_one_line(err, "is a file", "checkpoint directory")
