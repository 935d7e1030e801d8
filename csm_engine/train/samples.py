"""Training samples: a target utterance in the context of its conversation, as CSM sees it.

A sample is the token frames generation would build (``Generator.build_prompt``): the earlier
turns of the conversation (text rows, then audio rows with the all-zero end frame), then the
target's text rows and its audio rows (with the end frame, so the model learns to stop). Labels
are the target's audio codes on its audio rows and ``IGNORE`` everywhere else: the loss is on
the target only, and the context is what it is conditioned on. Context is trimmed to the window
from the oldest end by whole turns (``csm_engine.prompt.trim_context``), as generation does.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from csm_engine.errors import CSMError
from csm_engine.prompt import prepare_text, trim_context
from csm_engine.tokens import TextTokenizer, audio_frames, text_frames
from csm_engine.train.codes import EncodedUtterance

IGNORE = -100  # label of a position the loss skips (transformers' ignore_index)


@dataclass(frozen=True)
class Sample:
    """Token frames (T, 33), mask (T, 33) and labels (T, 32) of one target utterance in context."""

    tokens: Tensor
    mask: Tensor
    labels: Tensor
    context_turns: int  # earlier turns kept in the window
    conversation: str
    source: str

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def target_frames(self) -> int:
        return int((self.labels[:, 0] != IGNORE).sum())


def segment_rows(tokenizer: TextTokenizer, speaker: int, text: str, codes: Tensor | None,
                 num_codebooks: int = 32) -> tuple[Tensor, Tensor]:
    """An utterance's token frames: its text rows, then (with codes) its audio rows and end frame."""
    tokens, mask = text_frames(tokenizer, speaker, text, num_codebooks)
    if codes is None:
        return tokens, mask
    at, am = audio_frames(codes)
    return torch.cat([tokens, at]), torch.cat([mask, am])


def target_labels(tokens: Tensor, n_text_rows: int, num_codebooks: int = 32) -> Tensor:
    """Labels (T, num_codebooks) for a target's own rows: IGNORE on its text rows, its codes on its audio rows."""
    labels = tokens[:, :num_codebooks].clone()
    labels[:n_text_rows] = IGNORE
    return labels


def build_samples(encoded: list[EncodedUtterance], tokenizer: TextTokenizer, window: int, *,
                  context: bool = True, max_context_turns: int | None = None, num_codebooks: int = 32,
                  skip_long: bool = False, on_skip=None) -> list[Sample]:
    """One sample per target utterance with audio, with the earlier turns of its conversation as context.

    ``window``: positions a sample may take. A target that alone does not fit is a CSMError
    naming the fix (or, with ``skip_long``, reported through ``on_skip`` and left out).
    """
    by_conversation: dict[str, list[EncodedUtterance]] = defaultdict(list)
    for e in encoded:
        by_conversation[e.utterance.conversation].append(e)
    samples = []
    for key, items in by_conversation.items():
        items = sorted(items, key=lambda e: e.utterance.order)
        # A target's text is tidied as generation tidies the line it speaks (prepare_text);
        # context keeps its words as they are, as generation's context does.
        rows = [segment_rows(tokenizer, e.utterance.speaker,
                             prepare_text(e.utterance.text) if e.utterance.target and e.codes is not None
                             else e.utterance.text, e.codes, num_codebooks) for e in items]
        for i, e in enumerate(items):
            u = e.utterance
            if not u.target or e.codes is None:
                continue
            tokens, mask = rows[i]
            if tokens.shape[0] > window:
                problem = (f"{u.source}: {tokens.shape[0] - e.codes.shape[1] - 1} text tokens + {e.codes.shape[1]} "
                           f"audio frames ({e.codes.shape[1] * 0.08:.1f} s) do not fit the {window}-position window")
                if not skip_long:
                    raise CSMError(f"{problem}; split the clip into shorter ones with their own transcripts, raise "
                                   "--max-seq-len (up to 2048), or pass --skip-long to leave such clips out")
                if on_skip is not None:
                    on_skip(u, problem)
                continue
            groups = _context_groups(items[:i], rows[:i]) if context else []
            if max_context_turns is not None:
                groups = groups[len(groups) - max_context_turns:] if max_context_turns > 0 else []
            first = trim_context([sum(t.shape[0] for t, _ in g) for g in groups], window - tokens.shape[0])
            kept = [part for g in groups[first:] for part in g]
            n_text = tokens.shape[0] - (e.codes.shape[1] + 1)
            labels = torch.cat([torch.full((sum(t.shape[0] for t, _ in kept), num_codebooks), IGNORE),
                                target_labels(tokens, n_text, num_codebooks)])
            samples.append(Sample(
                tokens=torch.cat([t for t, _ in kept] + [tokens]),
                mask=torch.cat([m for _, m in kept] + [mask]),
                labels=labels, context_turns=len(groups) - first, conversation=key, source=u.source,
            ))
    return samples


def _context_groups(earlier: list[EncodedUtterance], rows: list[tuple[Tensor, Tensor]]
                    ) -> list[list[tuple[Tensor, Tensor]]]:
    """Earlier utterances grouped by turn, oldest first (the target's own earlier sentences are one group)."""
    groups: list[list[tuple[Tensor, Tensor]]] = []
    last_turn = None
    for e, r in zip(earlier, rows):
        if e.utterance.turn != last_turn:
            groups.append([])
            last_turn = e.utterance.turn
        groups[-1].append(r)
    return groups


def collate(samples: list[Sample]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded batch: tokens (B, T, 33), mask (B, T, 33) and labels (B, T, 32).

    Padding rows have an all-False mask and IGNORE labels; attention is causal, so rows after a
    sample's end change nothing before it.
    """
    t = max(s.rows for s in samples)
    width, n_cb = samples[0].tokens.shape[1], samples[0].labels.shape[1]
    tokens = torch.zeros(len(samples), t, width, dtype=torch.long)
    mask = torch.zeros(len(samples), t, width, dtype=torch.bool)
    labels = torch.full((len(samples), t, n_cb), IGNORE, dtype=torch.long)
    for i, s in enumerate(samples):
        tokens[i, :s.rows], mask[i, :s.rows], labels[i, :s.rows] = s.tokens, s.mask, s.labels
    return tokens, mask, labels


def split_eval(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, eval): whole conversations held out when there are several (no context leaks), else samples.

    At least one sample stays for training; nothing is held out when ``fraction`` of the
    conversations (or samples) rounds to none.
    """
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    g = torch.Generator().manual_seed(seed)
    conversations = sorted({s.conversation for s in samples})
    if len(conversations) >= 2:
        order = [conversations[i] for i in torch.randperm(len(conversations), generator=g).tolist()]
        n = min(len(order) - 1, round(fraction * len(order)))
        held = set(order[:n])
        return [s for s in samples if s.conversation not in held], [s for s in samples if s.conversation in held]
    order = torch.randperm(len(samples), generator=g).tolist()
    n = min(len(samples) - 1, round(fraction * len(samples)))
    held = set(order[:n])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]
