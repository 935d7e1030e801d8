"""Random-weight checkpoints in the real formats, so every code path runs without hub access.

``python -m csm_engine.testing make-checkpoint OUT_DIR --flavor tiny|1B [--seed N]`` writes

- ``config.json`` + ``model.safetensors``: CSM with random weights, original (or transformers) layout;
- ``tokenizer-e351c8d8-checkpoint125.safetensors``: a random-init Mimi in moshi's key layout;
- ``tokenizer.json``: a small Llama-3 style byte-level BPE with ``<|begin_of_text|>``/``<|end_of_text|>``.

The pieces are functions (``random_state_dict``, ``write_checkpoint``, ...) for tests and benchmarks.
Weights are written one tensor at a time, so the 1B flavor never holds a second copy in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from csm_engine.config import CSMConfig, get_flavor
from csm_engine.errors import CSMError
from csm_engine.files import write_text_atomic
from csm_engine.weights import (
    CONFIG_FILE,
    MIMI_FILE,
    MODEL_FILE,
    ORIGINAL,
    TOKENIZER_FILE,
    TRANSFORMERS,
    as_dtype,
    expected_shapes,
    key_map,
    original_to_transformers,
    transformers_config_dict,
    write_safetensors,
)

WEIGHT_STD = 0.02
NORM_NOISE = 0.02
TOKENIZER_VOCAB = 512  # the tiny flavor's whole text vocab; larger vocabs just leave ids unused
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Llama 3's pre-tokenizer split: contractions, words, 1-3 digit groups, punctuation runs, whitespace.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Training text for the test tokenizer: everyday conversational English, digits and punctuation.
_CORPUS = """\
Hello there, how are you doing today? I'm doing well, thanks for asking.
What did you have for breakfast this morning? Just some toast and a cup of coffee.
The weather is lovely: the sun is out and there is hardly a cloud in the sky.
Could you tell me the way to the train station? Turn left at the second corner.
We're meeting at 7:30 on Friday, the 12th of March, at the cafe near the park.
She said it would take about 45 minutes, but it took nearly two hours.
I don't think that's right. Let me check again and I'll get back to you.
Thank you so much! That was really kind of you to help me with this.
Do you remember the name of the song they played at the end of the evening?
It's been a long week; I'm looking forward to a quiet weekend at home.
They've been working on the new project since January and it's almost done.
Please speak a little more slowly, I couldn't quite understand what you said.
The quick brown fox jumps over the lazy dog while the cat watches from the window.
My phone number is 555 0192, and my email is written on the card I gave you.
Would you like to go for a walk later, or would you rather stay inside and read?
That sounds like a great idea. Let's do it tomorrow after lunch.
He laughed and said, "You never know what will happen next," then left the room.
Numbers like 1, 2, 3, 10, 100 and 2048 show up in speech all the time.
I'm sorry, I didn't mean to interrupt. Please go on with your story.
Good morning! Good afternoon! Good evening! Good night, and sleep well.
"""


# ---------------------------------------------------------------------------------------------
# CSM weights
# ---------------------------------------------------------------------------------------------


def random_tensors(config: CSMConfig, seed: int = 0, dtype: torch.dtype = torch.float32
                   ) -> Iterator[tuple[str, Tensor]]:
    """Original-layout (name, tensor) pairs with random values, one at a time, in a fixed order.

    Weights ~ N(0, 0.02); RMSNorm scales ~ 1 + N(0, 0.02). Seeded: the same seed gives the same tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, shape in expected_shapes(config).items():
        t = torch.randn(shape, generator=gen)
        if name.endswith(".scale"):
            t.mul_(NORM_NOISE).add_(1.0)
        else:
            t.mul_(WEIGHT_STD)
        yield name, t.to(dtype)


def random_state_dict(config: CSMConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A whole random original-layout state dict for ``config`` (loads into ``CSMModel`` with strict=True)."""
    return dict(random_tensors(config, seed, dtype))


def write_model_weights(out_dir: Path, config: CSMConfig, seed: int = 0, layout: str = ORIGINAL,
                        dtype: torch.dtype = torch.float32) -> Path:
    """``config.json`` + ``model.safetensors`` with random weights in the original or transformers layout."""
    shapes = expected_shapes(config)
    if layout == ORIGINAL:
        config_json = config.to_json_dict()
        specs = [(name, shape, dtype) for name, shape in shapes.items()]
        tensors: Iterable[tuple[str, Tensor]] = random_tensors(config, seed, dtype)
    elif layout == TRANSFORMERS:
        config_json = transformers_config_dict(config)
        names = key_map(config)
        specs = [(names[name], shape, dtype) for name, shape in shapes.items()]
        tensors = (next(iter(original_to_transformers({n: t}, config).items()))
                   for n, t in random_tensors(config, seed, dtype))
    else:
        raise CSMError(f"unknown layout {layout!r}: choose original or transformers")
    write_safetensors(out_dir / MODEL_FILE, specs, tensors)
    write_text_atomic(out_dir / CONFIG_FILE, json.dumps(config_json, indent=2) + "\n")
    return out_dir / MODEL_FILE


# ---------------------------------------------------------------------------------------------
# Mimi
# ---------------------------------------------------------------------------------------------


def random_mimi_state_dict(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    """A random-init Mimi in moshi's key layout, with distinct random codebook vectors.

    moshi's own init leaves every codebook entry at zero (they are learnt), which would make all
    codes decode alike; here each entry gets its own random vector, as a trained file has.
    """
    from moshi.models import loaders

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mimi = loaders.get_mimi(None, device="cpu")
    gen = torch.Generator().manual_seed(seed + 1)
    state = {}
    for name, t in mimi.state_dict().items():
        if name.endswith("_codebook.embedding_sum"):
            t = torch.randn(t.shape, generator=gen)
        elif name.endswith("_codebook._initialized"):
            t = torch.ones_like(t)
        state[name] = t.to(dtype) if t.is_floating_point() else t
    return state


def write_mimi(path: Path, seed: int = 0) -> Path:
    """Mimi weights as moshi's ``get_mimi(path)`` loads them (bf16, like the released file)."""
    state = random_mimi_state_dict(seed)
    specs = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    write_safetensors(path, specs, state.items())
    return path


# ---------------------------------------------------------------------------------------------
# Text tokenizer
# ---------------------------------------------------------------------------------------------


def build_text_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """A Llama-3 shaped byte-level BPE ``tokenizers.Tokenizer`` of at most ``vocab_size`` ids.

    Same pipeline as Llama 3 (regex split, byte-level, BOS post-processor); the two special
    tokens take the last ids, as Llama 3's do. Deterministic: trained on a fixed corpus.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, tok.token_to_id(BOS))]),
    ])
    return tok


def write_text_tokenizer(path: Path, vocab_size: int = TOKENIZER_VOCAB) -> Path:
    write_text_atomic(path, build_text_tokenizer(vocab_size).to_str(pretty=True))
    return path


# ---------------------------------------------------------------------------------------------
# A whole checkpoint directory
# ---------------------------------------------------------------------------------------------


def write_checkpoint(out_dir: str | os.PathLike, flavor: str = "tiny", seed: int = 0, layout: str = ORIGINAL,
                     dtype: torch.dtype | str = torch.float32, with_mimi: bool = True) -> Path:
    """A complete checkpoint dir (CSM weights, config, tokenizer, Mimi) that ``load_generator`` accepts."""
    try:
        config = get_flavor(flavor)
    except ValueError as e:
        raise CSMError(str(e)) from None
    weight_dtype = as_dtype(dtype) or torch.float32
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_model_weights(out, config, seed=seed, layout=layout, dtype=weight_dtype)
    write_text_tokenizer(out / TOKENIZER_FILE, min(TOKENIZER_VOCAB, config.text_vocab_size))
    if with_mimi:
        write_mimi(out / MIMI_FILE, seed=seed)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csm_engine.testing",
                                     description="Test fixtures for csm_engine that need no hub access.")
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint directory")
    mk.add_argument("out_dir", type=Path, help="directory to write (created if missing)")
    mk.add_argument("--flavor", default="tiny", choices=["tiny", "1B", "3B", "8B"], help="model size (default tiny)")
    mk.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    mk.add_argument("--layout", default=ORIGINAL, choices=[ORIGINAL, TRANSFORMERS],
                    help="tensor layout of model.safetensors (default original)")
    mk.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weight dtype (default float32; bfloat16 halves the 1B file to ~3 GB)")
    mk.add_argument("--no-mimi", action="store_true", help="skip the Mimi codec weights")
    args = parser.parse_args(argv)
    try:
        out = write_checkpoint(args.out_dir, args.flavor, seed=args.seed, layout=args.layout, dtype=args.dtype,
                               with_mimi=not args.no_mimi)
    except CSMError as e:
        print(f"make-checkpoint: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"make-checkpoint: error: cannot write {args.out_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.flavor} checkpoint ({args.layout} layout) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
