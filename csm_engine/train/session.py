"""One fine-tuning run put together: data -> codes -> samples, base model + LoRA, trainer, adapter files.

``prepare_session`` does everything that can fail on bad input (find the data, read and encode
every clip, build and fit every sample, load the model, set up what is trained) before any
output exists; ``Session.train`` then creates the output directory and runs.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from csm_engine import weights
from csm_engine.adapters import save_adapter
from csm_engine.errors import CSMError
from csm_engine.train.codes import CodesCache, default_cache_dir, encode_utterances, file_key
from csm_engine.train.data import find_utterances
from csm_engine.train.lora import adapter_tensors, add_lora, mark_trainable, resolve_train_also
from csm_engine.train.samples import Sample, build_samples, split_eval
from csm_engine.train.trainer import Progress, Trainer, TrainOptions


@dataclass(frozen=True)
class DataOptions:
    """Where the data is and how samples are made from it (``csm-finetune``'s data options)."""

    paths: tuple[str, ...]
    speaker: int = 0
    roles: tuple[str, ...] = ("user", "agent")
    context: bool = True
    max_context_turns: int | None = None
    max_seq_len: int = 2048
    skip_long: bool = False
    trim: bool = True
    cache_dir: str | None = None
    eval_fraction: float = 0.1
    progress: bool = True


@dataclass(frozen=True)
class ModelSource:
    model_path: str | None = None
    mimi_path: str | None = None
    tokenizer_path: str | None = None


@dataclass
class Session:
    """A prepared run: the model with its trainable parameters, the samples, the adapter's settings."""

    model: nn.Module
    train_samples: list[Sample]
    eval_samples: list[Sample]
    options: TrainOptions
    info: dict[str, Any]
    replaced: list[str]
    log: Any = print
    notes: list[str] = field(default_factory=list)

    def data_fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for s in self.train_samples:
            h.update(s.tokens.numpy().tobytes())
            h.update(s.labels.numpy().tobytes())
        return h.hexdigest()

    def write_adapter(self, out: Path, progress: Progress) -> None:
        info = {**self.info, "training": {**self.info["training"], "steps_done": progress.step,
                                          "total_steps": progress.total},
                "metrics": {"first_loss": progress.first_loss, "last_loss": progress.last_loss,
                            "eval_loss": progress.eval_loss}}
        save_adapter(out, info, adapter_tensors(self.model, self.replaced))

    def trainer(self, out: Path) -> Trainer:
        return Trainer(self.model, self.train_samples, self.eval_samples, self.options, out,
                       {"data": self.data_fingerprint(), "base": self.info["config"]}, log=self.log,
                       on_save=lambda progress: self.write_adapter(out, progress))

    def train(self, out: Path, resume: bool = False) -> Progress:
        trainer = self.trainer(out)
        if resume:
            trainer.resume()
        out.mkdir(parents=True, exist_ok=True)
        for note in self.notes:
            self.log(note)
        return trainer.run()


def load_samples(data: DataOptions, source: ModelSource, config, device: str
                 ) -> tuple[list[Sample], list[Sample], dict[str, Any], list[str]]:
    """(train, eval, data summary, notes): every clip read, encoded (cached) and fitted to the window."""
    utterances = find_utterances(list(data.paths), speaker=data.speaker, roles=data.roles)
    tokenizer = weights.load_text_tokenizer(source.tokenizer_path, model_path=source.model_path)
    mimi_file = weights.find_mimi_file(source.mimi_path, model_path=source.model_path)
    codec = weights.load_mimi(mimi_file, device=device)
    cache = CodesCache(Path(data.cache_dir) if data.cache_dir else default_cache_dir(), file_key(mimi_file))
    notes: list[str] = []
    window = min(data.max_seq_len, config.max_seq_len)
    if window < 16:
        raise CSMError(f"--max-seq-len must be at least 16 positions, got {data.max_seq_len}")
    encoded = encode_utterances(utterances, codec, cache, trim=data.trim, progress=data.progress)
    samples = build_samples(encoded, tokenizer, window, context=data.context,
                            max_context_turns=data.max_context_turns, num_codebooks=config.audio_num_codebooks,
                            skip_long=data.skip_long, on_skip=lambda u, why: notes.append(f"left out {why}"))
    if not samples:
        raise CSMError("no training sample is left (every clip was left out); "
                       "pass shorter clips or raise --max-seq-len")
    train, evaluation = split_eval(samples, data.eval_fraction, seed=0)
    frames = sum(e.codes.shape[1] for e in encoded if e.codes is not None)
    summary = {"sources": [str(p) for p in data.paths], "utterances": len(utterances), "samples": len(samples),
               "train_samples": len(train), "eval_samples": len(evaluation),
               "conversations": len({s.conversation for s in samples}), "audio_seconds": round(frames * 0.08, 2),
               "with_context": sum(s.context_turns > 0 for s in samples), "window": window}
    return train, evaluation, summary, notes


def build_trainable_model(source: ModelSource, options: TrainOptions, device: str) -> tuple[nn.Module, list[str], dict]:
    """The base model with LoRA injected (or fully trainable); (model, whole-trained names, lora info)."""
    frozen_bf16 = options.dtype == "bfloat16" and not options.full
    model = weights.load_csm_model(source.model_path, device=device,
                                   dtype=torch.bfloat16 if frozen_bf16 else torch.float32)
    lora_info: dict[str, Any] = {}
    if options.full:
        replaced = [name for name, _ in model.named_parameters()]
    else:
        replaced = resolve_train_also(model, options.train_also)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)  # LoRA's A matrices start random: the same run starts the same
            modules = add_lora(model, options.lora) if options.lora.targets else []
        overlap = [m for m in modules if any(r.startswith(f"{m}.") for r in replaced)]
        if overlap:
            raise CSMError(f"--train-also and --lora-targets both name {overlap[0]!r}; keep it in one of them")
        lora_info = {"rank": options.lora.rank, "alpha": options.lora.alpha, "dropout": options.lora.dropout,
                     "targets": list(options.lora.targets), "modules": modules}
    mark_trainable(model, options.full, replaced)
    return model, replaced, lora_info


def prepare_session(args: argparse.Namespace | None, options: TrainOptions, device: str, *,
                    data: DataOptions | None = None, source: ModelSource | None = None, log=print) -> Session:
    """Check and load everything a run needs (from csm-finetune's ``args``, or ``data`` + ``source``)."""
    if args is not None:
        data = DataOptions(paths=tuple(args.data), speaker=args.speaker, roles=tuple(
            r.strip() for r in args.roles.split(",") if r.strip()), context=not args.no_context,
            max_context_turns=args.max_context_turns, max_seq_len=args.max_seq_len, skip_long=args.skip_long,
            trim=not args.no_trim, cache_dir=args.cache_dir, eval_fraction=args.eval_fraction,
            progress=not args.quiet)
        source = ModelSource(args.csm_model, args.mimi_path, args.tokenizer_path)
    bad_roles = [r for r in data.roles if r not in ("user", "agent")]
    if bad_roles or not data.roles:
        raise CSMError(f"--roles takes user and/or agent, got {','.join(data.roles) or 'nothing'}")
    model_dir = weights.resolve_model_dir(source.model_path)
    config = weights.read_config(model_dir)
    train, evaluation, summary, notes = load_samples(data, source, config, device)
    model, replaced, lora_info = build_trainable_model(source, options, device)
    local = source.model_path and Path(source.model_path).expanduser().is_dir()
    info = {"kind": "full" if options.full else "lora",
            "base_model": str(model_dir.resolve()) if local else source.model_path or weights.DEFAULT_CSM_REPO,
            "config": config.to_json_dict(), "lora": lora_info, "replaced": replaced,
            "training": {k: v for k, v in options.fingerprint().items() if k != "lora"}, "data": summary}
    return Session(model, train, evaluation, options, info, replaced, log=log, notes=notes)
