"""Fine-tuning speed and memory: optimizer steps of csm-finetune's own Trainer; prints one JSON object.

    python benchmarks/train_speed.py                                   # tiny, CPU, LoRA and full
    python benchmarks/train_speed.py --flavor 1B --device cuda --dtype bfloat16 --modes lora \\
        --batch-size 4 --seq-len 1024 --target-frames 250 --steps 10  # a CSM-1B LoRA step on a GPU

Each row: a model of the flavor's real shapes with random weights (speed does not depend on
the values), LoRA (rank 16, the default targets) or full fine-tuning, ``--batch-size``
synthetic samples of ``--seq-len`` positions each (text rows, then audio rows; the last
``--target-frames`` audio rows are the target the loss covers, the decoder trains on
``--decoder-fraction`` of them), AdamW. ``steps_per_s`` is the mean over ``--steps`` timed
optimizer steps after ``--warmup`` untimed ones; ``target_frames_per_s`` = steps/s x batch x
target frames (80 ms of audio each). Memory: peak RSS of the process on CPU, peak allocated
GPU memory on CUDA (``torch.cuda.max_memory_allocated``, per row). The RSS is the process's
peak so far: rows run in the order given, so list the smaller (lora) first.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import n_params, peak_rss_mb, random_csm_model  # noqa: E402
from provenance import provenance  # noqa: E402

from csm_engine.train.lora import LoraSettings, add_lora, mark_trainable  # noqa: E402
from csm_engine.train.samples import IGNORE, Sample  # noqa: E402
from csm_engine.train.trainer import StopRequest, Trainer, TrainOptions  # noqa: E402


def synthetic_samples(config, n: int, seq_len: int, target_frames: int, seed: int = 0) -> list[Sample]:
    """``n`` samples of ``seq_len`` rows: a third text rows, then audio rows; the last ``target_frames`` labelled."""
    g = torch.Generator().manual_seed(seed)
    n_cb = config.audio_num_codebooks
    out = []
    for _ in range(n):
        tokens = torch.zeros(seq_len, n_cb + 1, dtype=torch.long)
        mask = torch.zeros(seq_len, n_cb + 1, dtype=torch.bool)
        n_text = seq_len // 3
        tokens[:n_text, -1] = torch.randint(0, config.text_vocab_size, (n_text,), generator=g)
        mask[:n_text, -1] = True
        tokens[n_text:, :n_cb] = torch.randint(0, 2048, (seq_len - n_text, n_cb), generator=g)
        mask[n_text:, :n_cb] = True
        labels = torch.full((seq_len, n_cb), IGNORE, dtype=torch.long)
        labels[-target_frames:] = tokens[-target_frames:, :n_cb]
        out.append(Sample(tokens, mask, labels, 1, "synthetic", "synthetic"))
    return out


def run_row(args: argparse.Namespace, mode: str) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = random_csm_model(args.flavor, device=args.device)
    options = TrainOptions(full=mode == "full", lora=LoraSettings(rank=args.lora_rank), batch_size=args.batch_size,
                           steps=args.warmup + args.steps, dtype=args.dtype, grad_checkpointing=args.grad_checkpointing,
                           decoder_fraction=args.decoder_fraction, lr=1e-4)
    if mode == "lora":
        if args.dtype == "bfloat16":
            model.to(torch.bfloat16)  # frozen base weights in bf16, as csm-finetune loads them
        add_lora(model, options.lora)
    mark_trainable(model, mode == "full", [])
    samples = synthetic_samples(model.config, args.batch_size, args.seq_len, args.target_frames)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, samples, [], options, Path(tmp), {}, log=lambda line: None)
        stop = StopRequest()
        times = []
        for step in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            loss = trainer.step(step, stop)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - started)
    steps_per_s = len(times) / sum(times)
    row = {
        "mode": mode, "flavor": args.flavor, "device": args.device, "dtype": args.dtype,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "target_frames": args.target_frames,
        "decoder_fraction": args.decoder_fraction, "grad_checkpointing": args.grad_checkpointing,
        "params": n_params(model), "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps_per_s": round(steps_per_s, 3), "s_per_step": round(1 / steps_per_s, 4),
        "target_frames_per_s": round(steps_per_s * args.batch_size * args.target_frames, 1),
        "last_loss": round(float(loss), 4),
    }
    if device.type == "cuda":
        row["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["gpu"] = torch.cuda.get_device_name()
    else:
        row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    del trainer, model
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavor", default="tiny", help="model shapes: tiny or 1B (default tiny)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute precision")
    p.add_argument("--modes", default="lora,full", help="comma list of lora and/or full (default both)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256, help="positions per sample (default 256)")
    p.add_argument("--target-frames", type=int, default=64, help="labelled audio frames per sample (default 64)")
    p.add_argument("--decoder-fraction", type=float, default=1 / 16)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.target_frames >= args.seq_len * 2 // 3:
        p.error("--target-frames must be below two thirds of --seq-len (the audio rows)")
    rows = [run_row(args, mode.strip()) for mode in args.modes.split(",") if mode.strip()]
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rows": rows}
    result["provenance"] = provenance(args.device)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
