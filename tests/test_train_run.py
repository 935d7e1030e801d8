"""csm-finetune runs for real on the tiny checkpoint: it learns, it resumes exactly, Ctrl-C saves cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from csm_engine.adapters import read_adapter
from csm_engine.generator import load_generator
from csm_engine.train.cli import main as finetune_main
from csm_engine.train.lora import LoraSettings
from csm_engine.train.session import DataOptions, ModelSource, prepare_session
from csm_engine.train.trainer import TrainOptions

pytestmark = pytest.mark.slow


def _greedy_match(generator, text: str, target: torch.Tensor) -> float:
    """Share of the target's codes (32, F) that greedy generation of ``text`` reproduces, frame by frame."""
    frames = target.shape[1]
    prompt = generator.build_prompt(text, 0, [], max_audio_length_ms=(frames + 1) * 80, runaway_guard=False)
    generated = list(generator.frames(prompt, temperature=0.0, topk=1))[:frames]
    got = torch.stack(generated, dim=1)
    return float((got == target[:, :got.shape[1]]).float().sum() / target.numel())


def test_finetuning_learns_the_clips(train_clip_folder, tiny_checkpoint, tiny_generator, tmp_path):
    """LoRA (+ both heads whole) on a tiny model, 3 espeak clips: the training loss falls by >= 60% and
    greedy generation of a training text reproduces far more of its Mimi codes than the base model does."""
    from csm_engine.audio_io import load_audio
    from csm_engine.train.codes import trim_silence

    options = TrainOptions(lora=LoraSettings(rank=16, alpha=32), train_also=("codebook0_head", "audio_head"),
                           steps=30, batch_size=3, lr=1e-2, decoder_fraction=1.0, schedule="constant", seed=0,
                           eval_every=1000)
    data = DataOptions(paths=(str(train_clip_folder),), cache_dir=str(tmp_path / "cache"), eval_fraction=0.0,
                       progress=False)
    session = prepare_session(None, options, "cpu", data=data, source=ModelSource(str(tiny_checkpoint)),
                              log=lambda line: None)
    progress = session.train(tmp_path / "out")
    drop = 1 - progress.last_loss / progress.first_loss
    print(f"loss {progress.first_loss:.3f} -> {progress.last_loss:.3f} ({drop:.0%} lower)")
    assert drop >= 0.6

    target = tiny_generator.codec.encode(trim_silence(load_audio(train_clip_folder / "clip0.wav")))
    text = (train_clip_folder / "clip0.txt").read_text().strip()
    before = _greedy_match(tiny_generator, text, target)
    after = _greedy_match(load_generator(str(tiny_checkpoint), dtype="float32", adapter=tmp_path / "out"), text, target)
    print(f"greedy generation reproduces {before:.1%} of the clip's codes before, {after:.1%} after")
    assert after >= before + 0.3


def _args(data, out, checkpoint, cache, steps):
    return [str(data), "--out", str(out), "--csm-model", str(checkpoint), "--device", "cpu", "--cache-dir",
            str(cache), "--quiet", "--steps", str(steps), "--lr", "3e-3", "--eval-fraction", "0", "--seed", "3",
            "--save-every", "1000", "--lora-rank", "4", "--batch-size", "2"]


def test_ctrl_c_saves_and_resume_matches_an_unbroken_run(train_clip_folder, tiny_checkpoint, tmp_path):
    steps = 16
    cache = tmp_path / "cache"
    assert finetune_main(_args(train_clip_folder, tmp_path / "whole", tiny_checkpoint, cache, steps)) == 0

    broken = tmp_path / "broken"
    script = "import sys; from csm_engine.train.cli import main; sys.exit(main())"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", script, *_args(train_clip_folder, broken, tiny_checkpoint, cache,
                                                                  steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err
    stopped = read_adapter(broken)
    done = stopped.info["training"]["steps_done"]
    assert 3 <= done < steps  # stopped after a whole step, before the end

    assert finetune_main(_args(train_clip_folder, broken, tiny_checkpoint, cache, steps) + ["--resume"]) == 0
    resumed, whole = read_adapter(broken), read_adapter(tmp_path / "whole")
    assert resumed.info["training"]["steps_done"] == whole.info["training"]["steps_done"] == steps
    assert resumed.tensors.keys() == whole.tensors.keys()
    for name, tensor in whole.tensors.items():
        assert torch.equal(resumed.tensors[name], tensor), name


def test_resume_refuses_other_options(train_clip_folder, tiny_checkpoint, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert finetune_main(_args(train_clip_folder, tmp_path / "run", tiny_checkpoint, cache, 2)) == 0
    capsys.readouterr()
    args = _args(train_clip_folder, tmp_path / "run", tiny_checkpoint, cache, 2) + ["--resume", "--lr", "1e-3"]
    assert finetune_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings" in err and "options" in err
    # Without --resume an existing run is never overwritten.
    assert finetune_main(_args(train_clip_folder, tmp_path / "run", tiny_checkpoint, cache, 2)) == 2
    assert "not empty" in capsys.readouterr().err
