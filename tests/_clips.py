"""Shaping espeak-ng clips for tests: espeak pads its WAVs with silence, these cut it off."""

from __future__ import annotations

import numpy as np

LOUD = 0.02  # above espeak's padding, below any spoken sound


def audible_span(clip: np.ndarray, threshold: float = LOUD) -> tuple[int, int]:
    """(first, last + 1): the samples between the first and the last one louder than ``threshold``."""
    loud = np.nonzero(np.abs(clip) > threshold)[0]
    return int(loud[0]), int(loud[-1]) + 1


def speech_only(clip: np.ndarray, threshold: float = LOUD) -> np.ndarray:
    """The audible part of an espeak clip."""
    start, end = audible_span(clip, threshold)
    return clip[start:end]
