"""Shaping espeak-ng clips for tests: espeak pads its WAVs with silence, these cut it off."""

from __future__ import annotations

import numpy as np

LOUD = 0.02  # above espeak's padding, below any spoken sound

# Complete spoken questions for the end-of-turn tests (benchmarks/turn_end.py adds more of them).
QUESTIONS = [
    "What is the capital of France?", "Can you tell me a joke?", "How are you doing today?",
    "What time is it in Tokyo?", "Who wrote the book Dune?", "Please set a timer for ten minutes.",
    "Where is the nearest train station?", "Why is the sky blue?", "What's the weather like tomorrow?",
    "How far away is the moon?", "Can you recommend a good book?", "What should I cook for dinner tonight?",
    "How do I make a cup of tea?", "Is it going to rain this weekend?", "What is your name?",
    "Could you play some music for me?", "How many people live in London?", "When does the store close?",
    "Do you know any good restaurants nearby?", "What is two plus two?",
]


def audible_span(clip: np.ndarray, threshold: float = LOUD) -> tuple[int, int]:
    """(first, last + 1): the samples between the first and the last one louder than ``threshold``."""
    loud = np.nonzero(np.abs(clip) > threshold)[0]
    return int(loud[0]), int(loud[-1]) + 1


def speech_only(clip: np.ndarray, threshold: float = LOUD) -> np.ndarray:
    """The audible part of an espeak clip."""
    start, end = audible_span(clip, threshold)
    return clip[start:end]
