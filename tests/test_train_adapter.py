"""Adapters round-trip: saved == in memory, merged == base + adapter, and every loader speaks with it."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from csm_engine import weights
from csm_engine.adapters import read_adapter
from csm_engine.config import get_flavor
from csm_engine.errors import CSMError
from csm_engine.generator import load_generator
from csm_engine.testing.checkpoints import write_model_weights
from csm_engine.train.cli import main as finetune_main
from csm_engine.train.lora import LoraSettings, load_lora
from csm_engine.train.loss import forward_logits, labelled_frames
from csm_engine.train.samples import collate
from csm_engine.train.session import DataOptions, ModelSource, prepare_session
from csm_engine.train.trainer import TrainOptions

pytestmark = pytest.mark.slow
TEXT = "Hello there, how are you doing today?"


@pytest.fixture(scope="module")
def trained(train_clip_folder, tiny_checkpoint, tmp_path_factory):
    """(session, adapter dir): 8 LoRA steps (+ codebook0_head trained whole) on the three clips."""
    out = tmp_path_factory.mktemp("adapter") / "run"
    options = TrainOptions(lora=LoraSettings(rank=8, alpha=16, targets=("q_proj", "v_proj", "w1", "w2", "projection")),
                           train_also=("codebook0_head",), steps=8, lr=1e-2, decoder_fraction=0.5, seed=1)
    data = DataOptions(paths=(str(train_clip_folder),), cache_dir=str(out.parent / "cache"), eval_fraction=0.0,
                       progress=False)
    session = prepare_session(None, options, "cpu", data=data, source=ModelSource(str(tiny_checkpoint)),
                              log=lambda line: None)
    session.train(out)
    return session, out


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory):
    _, out = trained
    target = tmp_path_factory.mktemp("merged") / "ckpt"
    assert finetune_main(["--merge", str(out), "--out", str(target)]) == 0
    return target


def _logits(model, session):
    """(backbone logits, decoder logits) of the training samples, every frame through the decoder."""
    tokens, mask, labels = collate(session.train_samples)
    with torch.no_grad():
        return forward_logits(model.eval(), tokens, mask, labels, labelled_frames(labels))[:2]


def _greedy(generator, n=6):
    prompt = generator.build_prompt(TEXT, 0, [], max_audio_length_ms=n * 80, runaway_guard=False)
    return torch.stack(list(generator.frames(prompt, temperature=0.0, topk=1)))


def test_saved_adapter_reloads_bit_identical(trained, tiny_checkpoint):
    session, out = trained
    adapter = read_adapter(out)
    assert adapter.info["kind"] == "lora" and adapter.replaced() == ["codebook0_head.weight"]
    assert len(adapter.lora_modules()) == 4 * 4 + 1  # 4 layers (2 backbone, 2 decoder) x 4 targets + projection
    reloaded = load_lora(weights.load_csm_model(str(tiny_checkpoint)), adapter)
    for mine, theirs in zip(_logits(session.model, session), _logits(reloaded, session)):
        assert torch.equal(mine, theirs)


def test_merged_checkpoint_equals_base_plus_adapter(trained, merged, tiny_checkpoint):
    session, out = trained
    assert {p.name for p in merged.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                  weights.MIMI_FILE, "merged-adapter.json"}
    with_adapter = load_lora(weights.load_csm_model(str(tiny_checkpoint)), read_adapter(out))
    merged_model = weights.load_csm_model(str(merged))
    base = weights.load_csm_model(str(tiny_checkpoint))
    for a, b, c in zip(_logits(with_adapter, session), _logits(merged_model, session), _logits(base, session)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        assert (c - a).abs().max() > 1e-2  # the adapter changed the model


def test_generator_with_adapter_speaks_as_the_merged_checkpoint(trained, merged, tiny_checkpoint):
    _, out = trained
    with_adapter = _greedy(load_generator(str(tiny_checkpoint), dtype="float32", adapter=str(out)))
    from_merged = _greedy(load_generator(str(merged), dtype="float32"))
    base = _greedy(load_generator(str(tiny_checkpoint), dtype="float32"))
    assert torch.equal(with_adapter, from_merged)
    assert not torch.equal(with_adapter, base)


def test_persona_with_an_adapter_speaks_with_it(trained, merged, tiny_checkpoint, tmp_path):
    from agent.config.personas import load_persona

    _, out = trained
    shutil.copytree(out, tmp_path / "voices" / "mine", ignore=shutil.ignore_patterns("checkpoint"))
    persona_file = tmp_path / "p.toml"
    persona_file.write_text('name = "Mine"\nsystem_prompt = "Be brief."\nadapter = "voices/mine"\n')
    persona = load_persona(persona_file)
    assert persona.adapter_path() == str(tmp_path / "voices" / "mine")
    spoken = _greedy(load_generator(str(tiny_checkpoint), dtype="float32", adapter=persona.adapter_path()))
    assert torch.equal(spoken, _greedy(load_generator(str(merged), dtype="float32")))
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "Bad"\nsystem_prompt = "x"\nadapter = 3\n')
    from agent.errors import AgentError

    with pytest.raises(AgentError, match="'adapter' must be a string"):
        load_persona(bad)


def test_adapter_for_another_model_size_is_refused(trained, tiny_checkpoint, tmp_path, capsys):
    _, out = trained
    tiny = get_flavor("tiny")
    other = dataclasses.replace(tiny, backbone=dataclasses.replace(tiny.backbone, n_layers=3))
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    write_model_weights(other_dir, other)
    for name in ("tokenizer.json", weights.MIMI_FILE):
        shutil.copy(tiny_checkpoint / name, other_dir / name)
    with pytest.raises(CSMError, match="trained for another model size"):
        load_generator(str(other_dir), dtype="float32", adapter=str(out))
    from csm_engine.cli import generate_main

    rc = generate_main(["--text", "Hi.", "--csm-model", str(other_dir), "--adapter", str(out), "--no-watermark",
                        "--output", str(tmp_path / "x.wav"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "another model size" in err and str(tiny_checkpoint) in err
    assert not (tmp_path / "x.wav").exists()
    assert finetune_main(["--merge", str(out), "--out", str(tmp_path / "m"), "--csm-model", str(other_dir)]) == 2
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp-*"))


def test_csm_generate_with_adapter_writes_audio(trained, tiny_checkpoint, tmp_path, capsys):
    from csm_engine.cli import generate_main

    _, out = trained
    wav = tmp_path / "a.wav"
    rc = generate_main(["--text", TEXT, "--csm-model", str(tiny_checkpoint), "--adapter", str(out), "--no-watermark",
                        "--output", str(wav), "--device", "cpu", "--seed", "1", "--max-audio-length-ms", "800"])
    assert rc == 0 and wav.stat().st_size > 44
    assert generate_main(["--text", "x", "--csm-model", str(tiny_checkpoint), "--adapter", str(tmp_path),
                          "--no-watermark", "--output", str(tmp_path / "b.wav")]) == 2
    assert "no adapter.json" in capsys.readouterr().err


def test_mlx_loads_an_adapter_as_the_merged_checkpoint(trained, merged, tiny_checkpoint):
    mlx_backend = pytest.importorskip("csm_engine.mlx")
    if not mlx_backend.is_available():
        pytest.skip("mlx.core does not import here")
    import numpy as np

    from csm_engine.mlx.convert import load_mlx_weights

    _, out = trained
    _, with_adapter = load_mlx_weights(str(tiny_checkpoint), adapter=str(out))
    _, from_merged = load_mlx_weights(str(merged), use_cache=False)
    assert with_adapter.keys() == from_merged.keys()
    for name in with_adapter:
        assert np.array_equal(np.array(with_adapter[name]), np.array(from_merged[name])), name
