"""An agent that speaks with espeak-ng: the tiny CSM's plumbing, a real voice's sound.

Echo cancellation and barge-in are about what the microphone hears. The tiny random CSM
babbles noise, which no VAD takes for a person; espeak-ng speech is what a speaker would
really put into the room. Everything but the audio (prompt building, context, the frame
budget) is the real tiny Generator's.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np

from agent.audio import load_audio

CHUNK = 3840  # two 80 ms frames at 24 kHz, as the real generator yields them


def espeak_24k(text: str, voice: str = "en-us", wpm: int = 170) -> np.ndarray:
    """``text`` spoken by espeak-ng, float32 mono at 24 kHz."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "say.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(path), text], check=True)
        return load_audio(path, 24_000)


class EspeakVoice:
    """A Generator whose ``stream`` yields espeak-ng speech of the text, chunk by chunk."""

    def __init__(self, generator, voice: str = "en-us") -> None:
        self._generator = generator
        self.voice = voice
        self._said: dict[str, np.ndarray] = {}
        self.texts: list[str] = []

    def __getattr__(self, name):
        return getattr(self._generator, name)

    def stream(self, text, speaker, context=(), *, cancel=None, **kwargs):
        self.texts.append(text)
        if text not in self._said:
            self._said[text] = espeak_24k(text, self.voice)
        audio = self._said[text]
        for start in range(0, len(audio), CHUNK):
            if cancel is not None and cancel.is_set():
                return
            yield audio[start : start + CHUNK]
