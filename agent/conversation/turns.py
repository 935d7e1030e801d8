"""One turn of a conversation: who spoke, what was said, how it sounded, and its saved JSON form.

A turn keeps its audio (the user's recording at 16 kHz, the agent's speech at 24 kHz with the
Mimi codes it was decoded from) and gives itself to CSM as context segments: one per sentence for
agent turns, built once, so the same tensors appear in every later context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.audio import resample
from agent.errors import AgentError

if TYPE_CHECKING:  # torch-heavy: only for annotations
    import torch

    from csm_engine.tokens import Segment

CSM_RATE = 24_000
ROLES = ("user", "agent")


@dataclass
class Sentence:
    """One sentence of an agent turn: its text and where its audio sits in the turn's audio."""

    text: str
    samples: int  # length of its audio at the turn's sample rate
    codes: torch.Tensor | None = None  # LongTensor (32, frames): Mimi codes the audio was decoded from


@dataclass
class Turn:
    """One turn: who spoke, what they said, and how it sounded.

    ``audio`` is float32 mono at ``sample_rate`` (None once released from memory after saving,
    or for a typed message); ``audio_file`` names its WAV in the saved directory. Agent turns
    list their ``sentences``; their audio is the sentences' audio back to back.
    Times are wall-clock seconds (``time.time()``).
    """

    id: int
    role: str
    text: str
    speaker: int
    audio: np.ndarray | None = None
    sample_rate: int = CSM_RATE
    started_at: float = 0.0
    ended_at: float = 0.0
    interrupted: bool = False
    sentences: list[Sentence] = field(default_factory=list)
    audio_file: str | None = None
    typed: bool = False  # a typed message (no audio by nature)
    timings: dict[str, float | int] = field(default_factory=dict)  # agent turns: latencies (ms), underruns
    tools: list[dict[str, Any]] = field(default_factory=list)  # agent turns: tool calls and results (not spoken)
    _segments: list[Segment] | None = field(default=None, repr=False)  # cached CSM segments (same tensors every turn)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"turn role must be 'user' or 'agent', got {self.role!r}")
        if self.audio is not None:
            self.audio = np.ascontiguousarray(self.audio, dtype=np.float32).reshape(-1)

    @property
    def has_audio(self) -> bool:
        return self.audio is not None and len(self.audio) > 0

    @property
    def duration_s(self) -> float:
        return 0.0 if self.audio is None else len(self.audio) / self.sample_rate

    def default_file_name(self) -> str:
        return f"turn-{self.id:04d}-{self.role}.wav"

    def csm_segments(self, with_audio: bool = True) -> list[Segment]:
        """This turn as CSM context segments (one per sentence for agent turns), 24 kHz audio.

        The segments are built once and reused, so the context tensors are the same objects
        (and bytes) every time this turn appears in a context.
        """
        from csm_engine.tokens import Segment  # imports torch

        if not self.text.strip():
            return []
        if self._segments is None:
            self._segments = self._build_segments()
        if with_audio:
            return list(self._segments)
        return [Segment(s.speaker, s.text, None) for s in self._segments]

    def _build_segments(self) -> list[Segment]:
        import torch  # CSM segments hold torch tensors; torch loads only with CSM

        from csm_engine.tokens import Segment

        if not self.has_audio:
            parts = [(s.text, None) for s in self.sentences if s.text.strip()] or [(self.text, None)]
            return [Segment(self.speaker, text, None) for text, _ in parts]
        audio = self.audio
        if self.sample_rate != CSM_RATE:
            audio = resample(audio, self.sample_rate, CSM_RATE)
        if self.role == "agent" and self.sentences and self.sample_rate == CSM_RATE:
            segments, offset = [], 0
            for sentence in self.sentences:
                piece = audio[offset : offset + sentence.samples]
                offset += sentence.samples
                if sentence.text.strip():
                    tensor = torch.from_numpy(np.ascontiguousarray(piece)) if len(piece) else None
                    segments.append(Segment(self.speaker, sentence.text, tensor))
            return segments
        return [Segment(self.speaker, self.text, torch.from_numpy(np.ascontiguousarray(audio)))]

    def release_audio(self) -> None:
        """Drop the audio from memory (it is on disk); the turn keeps only text in CSM context."""
        self.audio = None
        self._segments = None
        for sentence in self.sentences:
            sentence.codes = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "role": self.role,
            "text": self.text,
            "speaker": self.speaker,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "interrupted": self.interrupted,
            "audio": self.audio_file,
            "sample_rate": self.sample_rate,
        }
        if self.typed:
            data["typed"] = True
        if self.timings:
            data["timings"] = dict(self.timings)
        if self.sentences:
            data["sentences"] = [{"text": s.text, "samples": s.samples} for s in self.sentences]
        if self.tools:
            data["tools"] = [dict(t) for t in self.tools]
        return data


def json_int(data: dict, key: str, where: str, default: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise AgentError(f"{where}: '{key}' must be a whole number, got {value!r}")
    return value


def turn_from_json(item: Any, where: str) -> Turn:
    if not isinstance(item, dict):
        raise AgentError(f"{where} must be an object")
    role = item.get("role")
    if role not in ROLES:
        raise AgentError(f"{where}: 'role' must be 'user' or 'agent', got {role!r}")
    text = item.get("text")
    if not isinstance(text, str):
        raise AgentError(f"{where}: 'text' must be a string")
    audio_file = item.get("audio")
    if audio_file is not None and (not isinstance(audio_file, str) or "/" in audio_file or "\\" in audio_file):
        raise AgentError(f"{where}: 'audio' must be a WAV file name next to conversation.json")
    timings = item.get("timings") or {}
    if not isinstance(timings, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in timings.values()):
        raise AgentError(f"{where}: 'timings' must map names to numbers")
    sentences = []
    for s in item.get("sentences") or []:
        if not isinstance(s, dict) or not isinstance(s.get("text"), str) or not isinstance(s.get("samples"), int):
            raise AgentError(f"{where}: each sentence needs 'text' and 'samples'")
        sentences.append(Sentence(s["text"], s["samples"]))
    tools = item.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        raise AgentError(f"{where}: 'tools' must be a list of calls, each with a 'name'")
    return Turn(
        id=json_int(item, "id", where, 0),
        role=role,
        text=text,
        speaker=json_int(item, "speaker", where, 0),
        sample_rate=json_int(item, "sample_rate", where, CSM_RATE),
        started_at=float(item.get("started_at") or 0.0),
        ended_at=float(item.get("ended_at") or 0.0),
        interrupted=bool(item.get("interrupted", False)),
        sentences=sentences,
        audio_file=audio_file,
        typed=bool(item.get("typed", False)),
        timings=timings,
        tools=tools,
    )

