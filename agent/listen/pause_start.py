"""Where a pause began: the moment the sound fell, which the VAD's model hears only later.

Silero's speech probability stays high for a few windows after the voice stops wherever the input
keeps something speech-like going: the echo canceller's output in a loud room (a decaying tail,
then its noise floor) held it a median of 88 ms past the fall of the level, where clean speech lets
go within a window or two. A turn's pause counts from where it began, so the end-of-turn rule waited that much longer
in a loud room for the same words. ``LevelHistory`` keeps the level of the last few hundred ms in
8 ms steps; when the VAD first calls a window silence, ``pause_start`` looks back from it for where
the level came down to the pause's own and dates the pause from there.

It only ever moves the start earlier, and only where the level says so plainly: the pause is the
level of the window the VAD called silence (its median 8 ms step, so a last bit of speech in it
does not count), the fall is the last step ``fall_db`` above that, and the sound before the fall
must have been ``contrast_db`` above it (speech clearly above the noise). Otherwise, or where the
level stayed up until the VAD let go (a reverberant tail that decays slowly), the VAD's own start
stands.
"""

from __future__ import annotations

from collections import deque

import numpy as np

STEP = 128  # samples per level step (8 ms at 16 kHz)


class LevelHistory:
    """The level (dB of mean power) of a stream's last ``lookback`` samples and four VAD windows, in
    ``STEP`` steps."""

    def __init__(self, lookback: int, *, fall_db: float = 10.0, contrast_db: float = 20.0) -> None:
        self.lookback, self.fall_db, self.contrast_db = lookback, fall_db, contrast_db
        self._levels: deque[float] = deque(maxlen=(lookback + 4 * 512) // STEP + 1)
        self._end = 0  # stream sample after the last step held

    def reset(self) -> None:
        self._levels.clear()
        self._end = 0

    def push(self, samples: np.ndarray, end: int) -> None:
        """Add ``samples`` (a whole number of steps) that end at stream sample ``end``."""
        steps = samples[: len(samples) // STEP * STEP].reshape(-1, STEP).astype(np.float64)
        self._levels.extend(10.0 * np.log10(np.mean(steps * steps, axis=1) + 1e-12))
        self._end = end

    def pause_start(self, silent_from: int) -> int:
        """Where the pause that the VAD found at stream sample ``silent_from`` (the start of the
        silent window that ends at the last sample pushed) began by the level; never later."""
        levels = np.array(self._levels)
        first = self._end - len(levels) * STEP  # stream sample of levels[0]
        split = (silent_from - first) // STEP  # levels[split:] are the silent window
        if split <= 0 or split >= len(levels):
            return silent_from
        pause = float(np.median(levels[split:]))
        oldest = max(0, split - self.lookback // STEP)
        loud = np.flatnonzero(levels[oldest:split] >= pause + self.fall_db)
        if len(loud) == 0:  # flat back to the look-back's edge: where it fell is not in view
            return silent_from
        fall = oldest + int(loud[-1]) + 1  # the first step at the pause's level
        before = levels[max(0, fall - 8) : fall]  # the 64 ms up to the fall
        if fall >= split or before.max() < pause + self.contrast_db:
            return silent_from
        return first + fall * STEP
