"""A tiny random CSM generator built in memory (no checkpoint files needed) for engine speed tests."""

from __future__ import annotations

import torch

from csm_engine.codec import MimiCodec
from csm_engine.config import get_flavor
from csm_engine.generator import Generator
from csm_engine.model import CSMModel
from csm_engine.tokens import BOS_TOKEN, EOS_TOKEN, TextTokenizer


def word_tokenizer(vocab_size: int) -> TextTokenizer:
    """A word-level tokenizer.json equivalent with BOS/EOS, every id inside ``vocab_size``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [BOS_TOKEN, EOS_TOKEN, "[UNK]"] + [f"[{i}]" for i in range(10)]
    words += "hello there how are you fine thanks and what about the weather today it is sunny . , ? !".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    assert len(vocab) < vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return TextTokenizer(tok)


def random_tiny_model(seed: int = 0, std: float = 0.2) -> CSMModel:
    """Tiny flavor, random weights; std 0.2 (above init) keeps sampling far from uniform."""
    torch.manual_seed(seed)
    model = CSMModel(get_flavor("tiny"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(".scale"):
                p.normal_(0.0, std)
    return model.eval()


def tiny_generator(seed: int = 0, codec: MimiCodec | None = None, device: str = "cpu") -> Generator:
    model = random_tiny_model(seed).to(device)
    codec = codec or MimiCodec.load(None, device=device)
    return Generator(model, codec, word_tokenizer(model.config.text_vocab_size))
