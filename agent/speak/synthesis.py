"""Speaking one sentence with CSM in the context of the conversation (used live and by --replay).

``ReplySynthesizer`` builds the context for a sentence (``Conversation.csm_context`` with the
budget the engine leaves: window - the sentence's text rows - its frame budget), checks that the
engine keeps all of it (never relying on the engine's own silent trimming), streams the audio
and keeps the Mimi codes so the sentence is never re-encoded when it becomes context.

A reply of any length speaks to its end: its own earlier sentences are trimmed like the rest of
the context, oldest first and by whole sentences (``recent_sentences``): they may take what the
conversation leaves of the budget, and at least half of it. A sentence too long for the window
on its own is cut at a word, with a logged warning (``fit_text``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.conversation.conversation import CSM_RATE, ContextReport, Conversation
from csm_engine.errors import CSMError

if TYPE_CHECKING:  # torch-heavy: only for annotations
    import torch

    from csm_engine.generator import Generator, Prompt
    from csm_engine.tokens import Segment

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = 1920
FRAME_MS = 80
EARLIER_SHARE = 0.5  # of the budget left after the voice clip: the least a reply's own sentences may use


@dataclass
class SpokenSentence:
    """A sentence as generated: 24 kHz audio and the codes it was decoded from."""

    text: str
    audio: np.ndarray
    codes: torch.Tensor | None  # LongTensor (32, frames)
    context_rows: int = 0
    prompt_rows: int = 0  # context + text rows + frame budget: must fit the window
    report: ContextReport | None = None
    segment: Segment | None = None  # it as context, built once (see VoiceStage)


@dataclass
class SynthesisOptions:
    temperature: float = 0.9
    topk: int = 50
    max_audio_ms: int = 20_000
    seed: int | None = None
    chunk_frames: int = 2


@dataclass
class ReplySynthesizer:
    """Streams sentences for one speaker (the agent, or anyone in --replay --all-turns)."""

    generator: Generator
    conversation: Conversation
    voice: Segment | None = None  # the persona's voice clip, pinned first
    options: SynthesisOptions = field(default_factory=SynthesisOptions)
    on_prompt: Callable[[list, Prompt], None] | None = None  # (context segments, Prompt) for tests/metrics
    _rows: dict = field(default_factory=dict, repr=False)

    @property
    def window(self) -> int:
        return int(self.generator.config.max_seq_len)

    def measure(self, segment: Segment) -> int:
        """Backbone positions a context segment takes (text rows + audio frames + end frame)."""
        key = id(segment)
        hit = self._rows.get(key)
        if hit is not None and hit[0] is segment:
            return hit[1]
        rows = int(self.generator.segment_frames(segment)[0].shape[0])
        if len(self._rows) > 4096:
            self._rows.clear()
        self._rows[key] = (segment, rows)
        return rows

    def budget_s(self, text: str) -> float:
        """The most audio CSM may make for ``text`` (its frame budget), in seconds."""
        from csm_engine.prompt import prepare_text, text_frame_budget  # imports torch

        frames = min(max(1, self.options.max_audio_ms // FRAME_MS), text_frame_budget(prepare_text(text)))
        return frames * FRAME_MS / 1000

    def fit_text(self, text: str, speaker: int) -> str:
        """``text``, cut at a word (logged) when its text rows and frame budget alone overflow the window."""
        def fits(candidate: str) -> bool:
            try:
                self.generator.build_prompt(candidate, speaker, [], self.options.max_audio_ms)
            except CSMError:
                return False
            return True

        if fits(text):
            return text
        words = text.split()
        low, high = 0, len(words)  # the longest prefix of words[:low] fits; words[:high] does not
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(" ".join(words[:middle])) else (low, middle)
        if low == 0:
            raise CSMError(f"cannot speak a sentence: its first word alone overflows the {self.window}-row window")
        log.warning("a sentence of %d words is too long for CSM's %d-row window: speaking its first %d words",
                    len(words), self.window, low)
        return " ".join(words[:low])

    def recent_sentences(self, earlier: Sequence[Segment], budget: int) -> list[Segment]:
        """The newest of a reply's ``earlier`` sentences that fit their share of ``budget`` (whole sentences)."""
        from csm_engine.prompt import trim_context  # imports torch

        earlier = list(earlier)
        rows = [self.measure(s) for s in earlier]
        voice_rows = self.measure(self.voice) if self.voice is not None else 0
        share = budget - voice_rows if voice_rows <= budget else budget
        floor = int(share * EARLIER_SHARE)
        if sum(rows) <= floor:
            return earlier
        # They may also take whatever the conversation does not use (asking trims nothing it would not).
        _, report = self.conversation.csm_context(self.voice, budget, self.measure)
        room = max(floor, budget - report.rows)
        first = trim_context(rows, room)
        if first:
            log.debug("context: %d of a reply's %d earlier sentences kept (%d of %d rows)",
                      len(earlier) - first, len(earlier), sum(rows[first:]), sum(rows))
        return earlier[first:]

    def context_for(self, text: str, speaker: int, earlier: Sequence[Segment] = ()
                    ) -> tuple[list, ContextReport, Prompt]:
        """Context segments for saying ``text`` after ``earlier`` sentences of the same reply."""
        bare = self.generator.build_prompt(text, speaker, [], self.options.max_audio_ms)
        budget = self.window - bare.tokens.shape[0] - bare.max_frames
        earlier = self.recent_sentences(earlier, budget)
        context, report = self.conversation.csm_context(self.voice, budget, self.measure, extra=earlier)
        prompt = self.generator.build_prompt(text, speaker, context, self.options.max_audio_ms)
        if prompt.context_kept != len(context):
            # Our budget said it fits; the engine disagrees (a bug): speak with what it kept, loudly.
            log.warning("CSM kept %d of %d context segments (%d rows for a budget of %d)",
                        prompt.context_kept, len(context), report.rows, budget)
            context = context[len(context) - prompt.context_kept:]
        return context, report, prompt

    def stream(self, text: str, speaker: int, earlier: Sequence[Segment] = (), *,
               cancel: threading.Event | None = None, seed: int | None = None, result: list | None = None
               ) -> Iterator[np.ndarray]:
        """Yield 24 kHz float32 chunks of ``text``; afterwards ``result`` holds one SpokenSentence."""
        import torch  # CSM's codes are torch tensors; torch loads only with CSM

        text = self.fit_text(text, speaker)
        context, report, prompt = self.context_for(text, speaker, earlier)
        if self.on_prompt is not None:
            self.on_prompt(context, prompt)
        frames: list[torch.Tensor] = []
        chunks: list[np.ndarray] = []
        o = self.options
        inner = self.generator.stream(
            text, speaker, context, max_audio_length_ms=o.max_audio_ms, temperature=o.temperature, topk=o.topk,
            seed=seed if seed is not None else o.seed, chunk_frames=o.chunk_frames, cancel=cancel,
            on_frame=lambda _i, codes: frames.append(codes.detach().cpu().clone()),
        )
        try:
            for chunk in inner:
                chunks.append(chunk)
                yield chunk
        finally:
            # Also when the consumer stops early (barge-in): release the engine, keep what was made.
            inner.close()
            audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
            codes = torch.stack(frames, dim=1) if frames else None
            if result is not None:
                result.append(SpokenSentence(text, audio, codes, report.rows,
                                             int(prompt.tokens.shape[0] + prompt.max_frames), report))

    def speak(self, text: str, speaker: int, earlier: Sequence[Segment] = (), **kwargs: Any) -> SpokenSentence:
        """The whole sentence at once (replay)."""
        result: list[SpokenSentence] = []
        for _ in self.stream(text, speaker, earlier, result=result, **kwargs):
            pass
        return result[0]

    def remember(self, audio: np.ndarray, codes: torch.Tensor | None) -> torch.Tensor:
        """Tell the engine ``audio`` decodes ``codes`` (when their lengths agree); returns the tensor to use."""
        import torch  # as in stream()

        tensor = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        if codes is not None and len(audio):
            frames = codes.shape[1]
            # The engine appends the faded end frame's audio after the last sampled frame.
            if len(audio) in (frames * SAMPLES_PER_FRAME, (frames + 1) * SAMPLES_PER_FRAME):
                self.generator.remember_codes(tensor, codes)
        return tensor


def played_prefix(audio: np.ndarray, codes: torch.Tensor | None, played: int
                  ) -> tuple[np.ndarray, torch.Tensor | None]:
    """The part of a sentence actually heard, cut to whole 80 ms frames so codes and audio agree."""
    if played >= len(audio):
        return audio, codes
    frames = max(0, played) // SAMPLES_PER_FRAME
    cut = frames * SAMPLES_PER_FRAME
    return audio[:cut].copy(), (codes[:, :frames].clone() if codes is not None and frames else None)


__all__ = ["ReplySynthesizer", "SpokenSentence", "SynthesisOptions", "played_prefix", "CSM_RATE"]
