"""Segments -> token frames.

A token frame has ``num_codebooks + 1`` columns: the audio codebooks, then one text token.
A text row carries one token of ``"[{speaker}]{text}"`` (with BOS and EOS) in the last column;
an audio row carries one Mimi frame in the codebook columns. The mask marks the columns that
count: the embedding of a row is the sum of its masked columns' embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from csm_engine.errors import CSMError, first_line

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"


@dataclass
class Segment:
    """One utterance of a conversation: who said what, and (optionally) how it sounded."""

    speaker: int
    text: str
    audio: Tensor | None = None  # (samples,) float32, 24 kHz mono

    @property
    def duration_s(self) -> float:
        return 0.0 if self.audio is None else self.audio.numel() / 24_000


class TextTokenizer:
    """A Llama-3 style ``tokenizer.json`` that wraps every text in BOS ... EOS."""

    def __init__(self, tokenizer):  # a tokenizers.Tokenizer
        from tokenizers.processors import TemplateProcessing

        bos_id, eos_id = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
        if bos_id is None or eos_id is None:
            raise CSMError(f"text tokenizer lacks {BOS_TOKEN} / {EOS_TOKEN}: use the Llama-3.2 tokenizer.json "
                           "(unsloth/Llama-3.2-1B) or one written by `python -m csm_engine.testing make-checkpoint`")
        tokenizer.post_processor = TemplateProcessing(
            single=f"{BOS_TOKEN}:0 $A:0 {EOS_TOKEN}:0",
            pair=f"{BOS_TOKEN}:0 $A:0 {EOS_TOKEN}:0 {BOS_TOKEN}:1 $B:1 {EOS_TOKEN}:1",
            special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
        )
        self._tok = tokenizer
        self.bos_id, self.eos_id = bos_id, eos_id

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise CSMError(f"text tokenizer not found: {path} (pass --tokenizer-path to a tokenizer.json)")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except CSMError:
            raise
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON
            raise CSMError(f"cannot read text tokenizer {path}: {first_line(e)}") from None

    def to_json(self) -> str:
        """The tokenizer.json text (``from_json`` of it tokenizes alike): a remote client builds the same prompts."""
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> TextTokenizer:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(text))
        except CSMError:
            raise
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON
            raise CSMError(f"cannot read a text tokenizer from JSON: {first_line(e)}") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def text_frames(tokenizer: TextTokenizer, speaker: int, text: str, num_codebooks: int = 32) -> tuple[Tensor, Tensor]:
    """The text rows of a segment: tokens (T, num_codebooks + 1) long and mask (T, num_codebooks + 1) bool."""
    ids = tokenizer.encode(f"[{speaker}]{text}")
    tokens = torch.zeros(len(ids), num_codebooks + 1, dtype=torch.long)
    mask = torch.zeros(len(ids), num_codebooks + 1, dtype=torch.bool)
    tokens[:, -1] = torch.tensor(ids, dtype=torch.long)
    mask[:, -1] = True
    return tokens, mask


def audio_frames(codes: Tensor) -> tuple[Tensor, Tensor]:
    """The audio rows of a segment from Mimi codes (num_codebooks, frames), with the all-zero end frame."""
    n_cb, n_frames = codes.shape
    tokens = torch.zeros(n_frames + 1, n_cb + 1, dtype=torch.long)
    mask = torch.zeros(n_frames + 1, n_cb + 1, dtype=torch.bool)
    tokens[:n_frames, :-1] = codes.T.to(torch.long)
    mask[:, :-1] = True
    return tokens, mask
