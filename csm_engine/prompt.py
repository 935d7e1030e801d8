"""Prompts: the token rows of context segments and of the line to say, trimmed to the window.

A context segment is its text rows then its audio rows (its Mimi codes); the prompt is the
newest segments that fit, then the new line's text rows. The in-process ``Generator`` and the
``--tts-url`` client (``agent/speak/remote_voice.py``) build prompts with the same functions,
and both remember each clip's codes by content (``ClipCodes``) so a clip is encoded once.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from csm_engine.config import FRAME_MS
from csm_engine.errors import CSMError
from csm_engine.tokens import Segment, TextTokenizer, audio_frames, text_frames

# ---------------------------------------------------------------------------------------------
# The new line's text and frame budget; trimming the context to the window
# ---------------------------------------------------------------------------------------------


def text_frame_budget(text: str) -> int:
    """A generous upper bound on frames needed to say ``text``: 2 s + 1 s per word (80 ms frames).

    Normal speech runs at 2-3 words/s, so this never cuts a real utterance short, but it bounds
    the known runaway where the model never emits its end frame.
    """
    words = max(1, len(text.split()))
    return math.ceil((2000 + 1000 * words) / FRAME_MS)


def trim_context(segment_lengths: Sequence[int], available: int) -> int:
    """Index of the first segment to keep so the newest segments' lengths sum to <= ``available``.

    Whole segments are dropped from the oldest end; a segment is never cut in half (half a
    sentence or half a clip would teach the model a wrong voice or a wrong turn boundary).
    """
    total = 0
    for i in range(len(segment_lengths) - 1, -1, -1):
        total += segment_lengths[i]
        if total > available:
            return i + 1
    return 0


@dataclass
class Prompt:
    """Backbone input for one utterance: token frames (T, 33), their mask, and what was kept."""

    tokens: Tensor
    mask: Tensor
    context_kept: int  # number of context segments that fit (the newest ones)
    max_frames: int


def segment_rows(tokenizer: TextTokenizer, segment: Segment, codes: Tensor | None,
                 num_codebooks: int = 32) -> tuple[Tensor, Tensor]:
    """A context segment's token frames from its Mimi codes (32, frames) or None: text rows, then audio rows."""
    tokens, mask = text_frames(tokenizer, segment.speaker, segment.text, num_codebooks)
    if codes is not None:
        at, am = audio_frames(codes)
        tokens, mask = torch.cat([tokens, at]), torch.cat([mask, am])
    return tokens, mask


def assemble_prompt(tokenizer: TextTokenizer, config, segment_frames: Callable[[Segment], tuple[Tensor, Tensor]],
                    text: str, speaker: int, context: Sequence[Segment], max_audio_length_ms: int,
                    runaway_guard: bool = True) -> Prompt:
    """Context + the new line's text rows, trimmed from the oldest segment to fit ``config.max_seq_len``.

    ``segment_frames(segment)`` gives a context segment's rows (the Generator encodes its audio
    with Mimi; a remote client looks up codes it holds). Raises CSMError when the line alone
    does not fit.
    """
    text = prepare_text(text)
    max_frames = max(1, int(max_audio_length_ms // FRAME_MS))
    if runaway_guard:
        max_frames = min(max_frames, text_frame_budget(text))
    gen_tokens, gen_mask = text_frames(tokenizer, speaker, text, config.audio_num_codebooks)
    window = config.max_seq_len
    available = window - gen_tokens.shape[0] - max_frames
    if available < 0:
        raise CSMError(
            f"text too long for the {window}-position window: {gen_tokens.shape[0]} text tokens + "
            f"{max_frames} audio frames; split the text into shorter sentences or lower --max-audio-length-ms"
        )
    seg = [segment_frames(s) for s in context]
    first = trim_context([t.shape[0] for t, _ in seg], available)
    kept = seg[first:]
    tokens = torch.cat([t for t, _ in kept] + [gen_tokens])
    mask = torch.cat([m for _, m in kept] + [gen_mask])
    return Prompt(tokens=tokens, mask=mask, context_kept=len(kept), max_frames=max_frames)


def prepare_text(text: str) -> str:
    """Validate and tidy the line to speak: collapse whitespace, end with punctuation.

    A line without final punctuation makes the model end early and clip the last word.
    """
    text = " ".join(text.split())
    if not text:
        raise CSMError("nothing to say: the text is empty")
    if text[-1] not in ".!?…":
        text += "."
    return text


class PromptBuilder:
    """``segment_frames`` and ``build_prompt`` for whatever has a ``tokenizer``, a ``config`` and ``segment_codes``.

    The in-process ``Generator`` encodes clips with its own Mimi; the ``--tts-url`` client asks
    the server once per clip. Either way the prompt is built here, the same way.
    """

    tokenizer: TextTokenizer
    config: Any  # CSMConfig, or a client's view of it (max_seq_len, audio_num_codebooks, frame_width)

    def segment_codes(self, segment: Segment) -> Tensor | None:
        """Mimi codes (32, frames) of a segment's audio; None when it has none."""
        raise NotImplementedError

    def segment_frames(self, segment: Segment) -> tuple[Tensor, Tensor]:
        """A context segment's token frames: its text rows, then its audio rows (if any)."""
        return segment_rows(self.tokenizer, segment, self.segment_codes(segment), self.config.audio_num_codebooks)

    def build_prompt(self, text: str, speaker: int, context: Sequence[Segment], max_audio_length_ms: int,
                     runaway_guard: bool = True) -> Prompt:
        """Context + the new line's text rows, trimmed from the oldest segment to fit the window."""
        return assemble_prompt(self.tokenizer, self.config, self.segment_frames, text, speaker, context,
                               max_audio_length_ms, runaway_guard)


# ---------------------------------------------------------------------------------------------
# Mimi codes of context clips, remembered by content
# ---------------------------------------------------------------------------------------------


class ClipCodes:
    """Mimi codes (32, frames) of audio clips by content, the last ``capacity`` used; safe across threads.

    A clip the model itself said is recorded with the codes it was decoded from (``put``), so
    sending it back as context never costs an encoding.
    """

    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self._codes: OrderedDict[bytes, Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(audio: Tensor) -> bytes:
        """A content key for a clip: the same samples give the same key."""
        return hashlib.blake2b(audio.detach().float().cpu().numpy().tobytes(), digest_size=16).digest()

    def get(self, audio: Tensor) -> Tensor | None:
        key = self.key(audio)
        with self._lock:
            codes = self._codes.get(key)
            if codes is not None:
                self._codes.move_to_end(key)
            return codes

    def put(self, audio: Tensor, codes: Tensor) -> Tensor:
        """Record that ``audio`` is the decoding of ``codes`` (kept on the CPU); returns them."""
        codes = codes.detach().cpu()
        key = self.key(audio)
        with self._lock:
            self._codes[key] = codes
            self._codes.move_to_end(key)
            while len(self._codes) > self.capacity:
                self._codes.popitem(last=False)
        return codes

    def get_or_encode(self, audio: Tensor, encode: Callable[[Tensor], Tensor]) -> Tensor:
        """The clip's codes, from ``encode(audio)`` the first time (outside the lock: it may take a while)."""
        codes = self.get(audio)
        return codes if codes is not None else self.put(audio, encode(audio))

    def __len__(self) -> int:
        return len(self._codes)


__all__ = ["ClipCodes", "Prompt", "PromptBuilder", "assemble_prompt", "prepare_text", "segment_rows",
           "text_frame_budget", "trim_context"]
