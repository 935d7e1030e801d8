"""When to start playing a sentence so that it plays through without a gap, on fast and slow devices.

CSM makes audio at some speed ``g`` (seconds of audio per second of wall time). Where ``g >= 1``
(a GPU, Apple Silicon) a sentence can start with its first chunk, as it always did. Where
``g < 1`` (a small CPU), playback drains the buffer faster than generation refills it. Say that
when playback starts, ``A`` seconds are ready ahead of the listener (what the sink still holds
plus what this sentence has made so far) and ``R`` seconds of the sentence are still to be made:
making them takes ``R / g``, and by then the listener has heard ``R / g`` seconds, so the
sentence plays without a gap exactly when

    A >= R * (1 / g - 1).

``R`` is the expected length of the sentence (from its text, with a margin, and never more than
the frame budget CSM was given) minus what has been made; ``g`` is measured on recent chunks
(``GenerationSpeed``). How many characters a second of speech holds is learnt from the sentences
already spoken, so the estimate follows the voice.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class PlaybackPolicy:
    """Tuning for the start of each sentence (seconds unless named otherwise)."""

    length_margin: float = 1.25  # the expected sentence length is multiplied by this
    lead_s: float = 0.3  # speech a sentence holds besides its characters (onset, final pause)
    chars_per_s: float = 14.0  # first guess of the speaking rate, before any sentence was heard
    learn_rate: float = 0.3  # weight of each finished sentence in the learnt speaking rate
    speed_window: int = 12  # chunks the generation speed is measured over

    def __post_init__(self) -> None:
        if self.length_margin < 1.0 or self.chars_per_s <= 0 or not 0 < self.learn_rate <= 1:
            raise ValueError("length_margin >= 1, chars_per_s > 0 and 0 < learn_rate <= 1")


class GenerationSpeed:
    """Seconds of audio made per second of wall time, over the last few chunks of speech."""

    def __init__(self, window: int = 12) -> None:
        self._chunks: deque[tuple[float, float]] = deque(maxlen=window)  # (audio s, wall s)

    def add(self, audio_s: float, wall_s: float) -> None:
        if audio_s > 0 and wall_s >= 0:
            self._chunks.append((audio_s, max(wall_s, 1e-4)))

    @property
    def speed(self) -> float | None:
        """None until a chunk was measured."""
        if not self._chunks:
            return None
        audio = sum(a for a, _ in self._chunks)
        wall = sum(w for _, w in self._chunks)
        return audio / wall


class SentencePlayback:
    """Holds one sentence's chunks until starting it will not run dry; see the module docstring.

    ``offer(chunk_s, queued_s)`` after each chunk: True once the sentence may start (then every
    later chunk goes straight to the sink). ``expected_s`` is what the sentence is expected to
    last, ``budget_s`` the most it can last (CSM's frame budget for it).
    """

    def __init__(self, planner: PlaybackPlanner, text: str, budget_s: float) -> None:
        self.planner = planner
        self.text = text
        self.expected_s = min(budget_s, planner.expected_length_s(text))
        self.made_s = 0.0
        self.started = False
        self.start_delay_s: float | None = None
        self._t0 = self._last = time.monotonic()

    def offer(self, chunk_s: float, queued_s: float) -> bool:
        """A chunk of ``chunk_s`` seconds arrived; ``queued_s`` is audio the sink still holds."""
        now = time.monotonic()
        # A sentence's first chunk also carries its prompt's prefill: it only counts as a first guess.
        if self.made_s > 0 or self.planner.speed.speed is None:
            self.planner.speed.add(chunk_s, now - self._last)
        self._last = now
        self.made_s += chunk_s
        if not self.started and self._may_start(queued_s):
            self.started = True
            self.start_delay_s = now - self._t0
        return self.started

    def _may_start(self, queued_s: float) -> bool:
        g = self.planner.speed.speed
        if g is None:
            return False
        if g >= 1.0:
            return True
        remaining = max(0.0, self.expected_s - self.made_s)
        return queued_s + self.made_s >= remaining * (1.0 / g - 1.0)

    def finish(self) -> None:
        """The sentence is complete (it plays now if it was still held): learn its speaking rate."""
        if not self.started:
            self.started = True
            self.start_delay_s = time.monotonic() - self._t0
        self.planner.learn(self.text, self.made_s)


class PlaybackPlanner:
    """The speaking rate and generation speed of one conversation, shared by its sentences."""

    def __init__(self, policy: PlaybackPolicy | None = None) -> None:
        self.policy = policy or PlaybackPolicy()
        self.speed = GenerationSpeed(self.policy.speed_window)
        self.chars_per_s = self.policy.chars_per_s

    def expected_length_s(self, text: str) -> float:
        p = self.policy
        return p.length_margin * (p.lead_s + len(text.strip()) / self.chars_per_s)

    def sentence(self, text: str, budget_s: float) -> SentencePlayback:
        return SentencePlayback(self, text, budget_s)

    def learn(self, text: str, spoken_s: float) -> None:
        chars = len(text.strip())
        body_s = spoken_s - self.policy.lead_s
        if chars >= 8 and body_s > 0.2:
            observed = chars / body_s
            self.chars_per_s += self.policy.learn_rate * (observed - self.chars_per_s)
