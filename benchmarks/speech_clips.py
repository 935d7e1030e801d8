"""Spoken clips for the benchmarks that ask Whisper what it heard: espeak-ng audio and word recall."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np

from agent.audio import load_audio


def espeak(text: str, voice: str, directory: Path, rate: int, wpm: int = 160) -> np.ndarray:
    """``text`` spoken by espeak-ng's ``voice`` at ``wpm`` words a minute, as float audio at ``rate`` Hz."""
    path = directory / f"{abs(hash((text, voice, wpm)))}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(path), text], check=True)
    return load_audio(path, rate)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def recall(said: str, heard: str) -> float:
    """The share of the words said that were heard (each word said counts once per time it was said)."""
    expected, got = words(said), set(words(heard))
    return sum(w in got for w in expected) / len(expected)
