"""The training loop: batches, accumulation, schedule, clipping, eval, checkpoints, Ctrl-C.

Everything random is a function of (seed, micro-batch index): the sample order of each epoch,
the decoder's frame subset of each batch and LoRA dropout. So a run resumed from its checkpoint
at step k takes exactly the steps the unbroken run takes after k.

Ctrl-C does not tear a step: the first one asks the loop to stop after the current micro-batch,
then the last whole step is saved (checkpoint and adapter) and the run ends; a second Ctrl-C
interrupts at once (the files on disk are still whole: every write is temp-then-rename).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from csm_engine.errors import CSMError
from csm_engine.train.checkpoint import load_checkpoint, save_checkpoint
from csm_engine.train.lora import LoraSettings
from csm_engine.train.loss import DEFAULT_DECODER_FRACTION, choose_decoder_frames, csm_loss
from csm_engine.train.samples import Sample, collate

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainOptions:
    """How to train (``csm-finetune`` options; the defaults are its defaults)."""

    full: bool = False  # every weight instead of LoRA
    lora: LoraSettings = field(default_factory=LoraSettings)
    train_also: tuple[str, ...] = ()  # modules/parameters trained whole next to LoRA
    steps: int | None = None  # optimizer steps; None: ``epochs`` passes over the data
    epochs: float = 1.0
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0: no clipping
    dtype: str = "float32"  # compute precision: float32 | bfloat16 (autocast; trained weights stay float32)
    grad_checkpointing: bool = False
    decoder_fraction: float = DEFAULT_DECODER_FRACTION
    eval_every: int = 50
    save_every: int = 100
    seed: int = 0

    def validate(self) -> None:
        checks = [
            (self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (0 < self.decoder_fraction <= 1, f"--decoder-fraction must be in (0, 1], got {self.decoder_fraction}"),
            (self.dtype in ("float32", "bfloat16"), f"--dtype must be float32 or bfloat16, got {self.dtype}"),
            (self.eval_every >= 1 and self.save_every >= 1, "--eval-every and --save-every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise CSMError(message)

    def fingerprint(self) -> dict:
        """What shapes the trajectory (a resume must match it); logging cadence is left out."""
        d = asdict(self)
        d.pop("eval_every")
        d.pop("save_every")
        return d


def lr_at(step: int, total: int, options: TrainOptions) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then the schedule down to 0."""
    if step < options.warmup_steps:
        return options.lr * (step + 1) / (options.warmup_steps + 1)
    if options.schedule == "constant":
        return options.lr
    progress = (step - options.warmup_steps) / max(1, total - options.warmup_steps)
    if options.schedule == "linear":
        return options.lr * (1 - progress)
    return options.lr * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Progress:
    """What a run did: steps, losses, and whether it was interrupted."""

    step: int = 0
    total: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    eval_loss: float | None = None
    interrupted: bool = False
    seconds: float = 0.0


class StopRequest:
    """SIGINT while training: the first asks to stop at the next safe point, the second interrupts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """Trains ``model``'s trainable parameters on ``train`` samples; ``on_save(step)`` writes the adapter."""

    def __init__(self, model: nn.Module, train: list[Sample], evaluation: list[Sample], options: TrainOptions,
                 out_dir: Path, fingerprint: dict, *, log: Callable[[str], None] = print,
                 on_save: Callable[[Progress], None] | None = None):
        options.validate()
        self.model, self.train, self.evaluation, self.options = model, train, evaluation, options
        self.out_dir, self.log, self.on_save = Path(out_dir), log, on_save
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=options.lr, weight_decay=options.weight_decay)
        self.batches_per_epoch = max(1, len(train) // options.batch_size)
        steps = options.steps or math.ceil(options.epochs * self.batches_per_epoch / options.grad_accum)
        self.progress = Progress(total=steps)
        # Through JSON, as it is stored: tuples become lists, so a resumed run compares equal.
        self.fingerprint = json.loads(json.dumps({**fingerprint, "options": options.fingerprint(),
                                                  "total_steps": steps}))
        for module in (getattr(model, "backbone", None), getattr(model, "decoder", None)):
            if module is not None:
                module.gradient_checkpointing = options.grad_checkpointing

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.options.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def batch(self, micro: int) -> list[Sample]:
        """The samples of micro-batch ``micro``: epoch ``micro // batches_per_epoch`` in its seeded order."""
        epoch, index = divmod(micro, self.batches_per_epoch)
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(self.options.seed + epoch))
        size = self.options.batch_size
        return [self.train[i] for i in order[index * size:(index + 1) * size].tolist()]

    def _micro_loss(self, micro: int):
        seed = self.options.seed * 1_000_003 + micro
        tokens, mask, labels = (t.to(self.device) for t in collate(self.batch(micro)))
        frames = choose_decoder_frames(labels.cpu(), self.options.decoder_fraction,
                                       torch.Generator().manual_seed(seed)).to(self.device)
        torch.manual_seed(seed)  # LoRA dropout draws
        with self._autocast():
            return csm_loss(self.model, tokens, mask, labels, frames)

    def step(self, step: int, stop: StopRequest) -> float | None:
        """One optimizer step (``grad_accum`` micro-batches); None if a stop was asked for meanwhile."""
        self.model.train()
        accum = self.options.grad_accum
        total = 0.0
        for k in range(accum):
            parts = self._micro_loss(step * accum + k)
            (parts.total / accum).backward()
            total += float(parts.total.detach()) / accum
            if stop.requested:
                self.optimizer.zero_grad(set_to_none=True)
                return None
        if self.options.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.options.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.progress.total, self.options)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the held-out samples (decoder on every frame), weighted by frames."""
        if not self.evaluation:
            return None
        self.model.eval()
        total = weight = 0.0
        size = self.options.batch_size
        for i in range(0, len(self.evaluation), size):
            tokens, mask, labels = (t.to(self.device) for t in collate(self.evaluation[i:i + size]))
            with self._autocast():
                parts = csm_loss(self.model, tokens, mask, labels)
            total += float(parts.total) * parts.frames
            weight += parts.frames
        return total / weight

    def resume(self) -> None:
        p = self.progress
        p.step, metrics = load_checkpoint(self.out_dir, self.model, self.optimizer, self.fingerprint)
        p.first_loss, p.last_loss, p.eval_loss = (metrics.get(k) for k in ("first_loss", "last_loss", "eval_loss"))
        self.log(f"resumed from step {p.step}/{p.total}")

    def save(self) -> None:
        """Checkpoint and adapter of the last whole step (each file temp-then-rename)."""
        p = self.progress
        metrics = {"first_loss": p.first_loss, "last_loss": p.last_loss, "eval_loss": p.eval_loss}
        save_checkpoint(self.out_dir, p.step, self.model, self.optimizer, self.fingerprint, metrics)
        if self.on_save is not None:
            self.on_save(self.progress)

    def run(self) -> Progress:
        p, o = self.progress, self.options
        started = time.monotonic()
        start_step = p.step
        with StopRequest() as stop:
            while p.step < p.total and not stop.requested:
                loss = self.step(p.step, stop)
                if loss is None:
                    break
                p.step += 1
                p.first_loss = loss if p.first_loss is None else p.first_loss
                p.last_loss = loss
                rate = (p.step - start_step) / max(time.monotonic() - started, 1e-9)
                if p.step % max(1, p.total // 100) == 0 or p.step == p.total:  # ~100 lines a run
                    self.log(f"step {p.step}/{p.total} loss {loss:.4f} lr {lr_at(p.step - 1, p.total, o):.2e} "
                             f"{rate:.2f} steps/s")
                if p.step % o.eval_every == 0 or p.step == p.total:
                    p.eval_loss = self.evaluate()
                    if p.eval_loss is not None:
                        self.log(f"step {p.step}/{p.total} eval loss {p.eval_loss:.4f}")
                if p.step % o.save_every == 0 and p.step < p.total:
                    self.save()
            p.interrupted = stop.requested
            p.seconds = time.monotonic() - started
            # A Ctrl-C from here on must not tear the files being written.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if stop._previous is not None else None
            try:
                self.save()
            finally:
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)
        return p
