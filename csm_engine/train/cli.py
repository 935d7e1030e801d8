"""``csm-finetune``: train a LoRA adapter (or full weights) on clips, manifests or conversations.

    csm-finetune DATA... --out OUT [--csm-model BASE] [--steps N] [--lora-rank 16] ...
    csm-finetune DATA... --out OUT --resume          continue an interrupted run
    csm-finetune --merge OUT --out MERGED            base + adapter -> a checkpoint directory

Everything is checked (data, transcripts, audio, lengths, model) before OUT is created, so a
bad input leaves nothing behind. User errors are one line and exit 2; Ctrl-C saves the last
whole step (checkpoint + adapter) and exits 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from csm_engine.console import add_csm_model_option, run_cli
from csm_engine.device import DEVICES, resolve_device
from csm_engine.errors import CSMError

PROG = "csm-finetune"
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from csm_engine.train.lora import DEFAULT_TARGETS
    from csm_engine.train.trainer import SCHEDULES

    p = argparse.ArgumentParser(prog=PROG, description="Fine-tune CSM on your own clips or saved conversations.")
    p.add_argument("data", nargs="*", help="clip folders (NAME.wav + NAME.txt), voices.toml, manifest .jsonl files, "
                                           "or csm-chat conversation directories (or a folder of them)")
    p.add_argument("--out", required=True, help="output directory: adapter.safetensors + adapter.json + checkpoint/")
    p.add_argument("--merge", metavar="ADAPTER", help="write base + ADAPTER as a checkpoint directory to --out")
    m = p.add_argument_group("model")
    add_csm_model_option(m, help="base checkpoint directory or hub repo id (default sesame/csm-1b)",
                         old_names=("--model-path",))
    m.add_argument("--mimi-path", default=None, help="Mimi codec safetensors (default: from the model dir or hub)")
    m.add_argument("--tokenizer-path", default=None, help="text tokenizer.json (default: from the model dir or hub)")
    m.add_argument("--device", default="auto", choices=DEVICES, help="where to train (default auto)")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute precision; bfloat16 autocasts (trained weights stay float32; default float32)")
    w = p.add_argument_group("what to train")
    w.add_argument("--full", action="store_true", help="train every weight instead of a LoRA adapter")
    w.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16)")
    w.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha; the update is scaled by alpha/rank")
    w.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (default 0)")
    w.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                   help=f"linear layers to adapt, by name (default {','.join(DEFAULT_TARGETS)})")
    w.add_argument("--train-also", default="", metavar="NAMES",
                   help="modules/parameters trained whole next to LoRA, e.g. codebook0_head,audio_head")
    d = p.add_argument_group("data")
    d.add_argument("--speaker", type=int, default=0, help="speaker id of clip folders and manifest lines without one")
    d.add_argument("--roles", default="user,agent", help="conversation turns to train on (default user,agent)")
    d.add_argument("--no-context", action="store_true", help="train every utterance alone, without earlier turns")
    d.add_argument("--max-context-turns", type=int, default=None, help="at most this many earlier turns as context")
    d.add_argument("--max-seq-len", type=int, default=2048, help="positions per sample (default 2048, the window)")
    d.add_argument("--skip-long", action="store_true", help="leave out clips longer than the window instead of failing")
    d.add_argument("--no-trim", action="store_true", help="keep silence at the ends of clips")
    d.add_argument("--cache-dir", default=None, help="where Mimi codes are cached (default ~/.cache/csm-chat/codes)")
    d.add_argument("--eval-fraction", type=float, default=0.1, help="share held out for eval loss (default 0.1)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is not given")
    t.add_argument("--batch-size", type=int, default=1, help="samples per micro-batch (default 1)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    t.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    t.add_argument("--schedule", default="cosine", choices=SCHEDULES, help="lr schedule (default cosine)")
    t.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    t.add_argument("--decoder-fraction", type=float, default=1 / 16,
                   help="share of frames the decoder trains on (CSM's amortization; default 1/16, 1 = all)")
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    t.add_argument("--eval-every", type=int, default=50, help="eval loss every N steps (default 50)")
    t.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    t.add_argument("--seed", type=int, default=0, help="seed of data order and frame subsets (default 0)")
    t.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def options_from_args(args: argparse.Namespace):
    from csm_engine.train.lora import LoraSettings
    from csm_engine.train.trainer import TrainOptions

    options = TrainOptions(
        full=args.full,
        lora=LoraSettings(args.lora_rank, args.lora_alpha, args.lora_dropout, _names(args.lora_targets)),
        train_also=_names(args.train_also), steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
        warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm, dtype=args.dtype,
        grad_checkpointing=args.grad_checkpointing, decoder_fraction=args.decoder_fraction,
        eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
    )
    options.validate()
    return options


def check_out_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CSMError(f"--out {out} is a file; pass a directory for the adapter")
    if resume:
        from csm_engine.train.checkpoint import read_state

        if read_state(out) is None:
            raise CSMError(f"--resume: no checkpoint in {out}; run without --resume to start training")
    elif out.is_dir() and any(out.iterdir()):
        raise CSMError(f"--out {out} is not empty; pass --resume to continue its run, or a new directory")
    if not out.parent.is_dir():
        raise CSMError(f"--out {out}: directory {out.parent} does not exist (create it first)")


def run_merge(args: argparse.Namespace) -> int:
    from csm_engine.adapters import read_adapter
    from csm_engine.train.merge import write_merged_checkpoint

    if args.data:
        raise CSMError("--merge takes no training data: csm-finetune --merge ADAPTER --out MERGED_DIR")
    adapter = read_adapter(args.merge)
    out = write_merged_checkpoint(adapter, args.out, args.csm_model)
    print(f"wrote {out}: {adapter.info.get('base_model')} + {adapter.describe()} (original layout)")
    return 0


def main_body(args: argparse.Namespace) -> int:
    if args.merge:
        return run_merge(args)
    from csm_engine.train.session import prepare_session

    options = options_from_args(args)
    out = Path(args.out).expanduser()
    check_out_dir(out, args.resume)
    session = prepare_session(args, options, resolve_device(args.device))  # every input checked here
    progress = session.train(out, resume=args.resume)
    if progress.interrupted:
        print(f"{PROG}: interrupted at step {progress.step}/{progress.total}; saved the adapter and checkpoint in "
              f"{out} (continue with the same command and --resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    first = f"{progress.first_loss:.4f}" if progress.first_loss is not None else "-"
    last = f"{progress.last_loss:.4f}" if progress.last_loss is not None else "-"
    print(f"wrote {out}: {progress.step} steps in {progress.seconds:.1f} s, loss {first} -> {last}"
          + (f", eval {progress.eval_loss:.4f}" if progress.eval_loss is not None else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``csm-finetune``."""
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: main_body(args))


if __name__ == "__main__":
    sys.exit(main())
