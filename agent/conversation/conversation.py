"""The conversation: turns with their text and audio, CSM context, LLM history, save and load.

Every turn keeps what was said and how it sounded: the user's recorded audio (16 kHz from
the microphone) and the agent's generated audio (24 kHz, with the Mimi codes it was decoded
from, so it is never re-encoded). An agent turn is spoken sentence by sentence; each sentence
stays a separate CSM segment, so the context for the next reply is the previous context plus
the new segments, unchanged (the engine's conversation cache reuses such a prefix).

Context trimming rule (``Conversation.csm_context``), applied only when the context does not
fit the window the engine has left for it:
1. the persona's voice clip is pinned first and never trimmed (it *is* the voice);
2. the oldest turns lose their audio first (their text stays, so the model still knows what
   was said); 3. if text alone still does not fit, the oldest turns are dropped entirely.
When trimming is needed it trims down to ``LOW_WATER`` of the budget, and the cut points only
ever move forward, so the context stays an unchanged prefix for several turns in a row instead
of shifting (and missing the conversation cache) every turn.

Saved form: a directory with ``conversation.json`` and one WAV per turn
(``turn-0001-user.wav``), written atomically after every turn (temp file, fsync, rename; the
JSON last), so a crash loses at most the turn in flight.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.audio import read_wav, write_wav
from agent.conversation.turns import CSM_RATE, Sentence, Turn, json_int, turn_from_json
from agent.errors import AgentError
from csm_engine.files import write_text_atomic

if TYPE_CHECKING:  # torch-heavy: only for annotations
    from csm_engine.tokens import Segment

__all__ = ["CSM_RATE", "ContextReport", "Conversation", "Sentence", "Turn"]

FORMAT_NAME = "csm-chat-conversation"
FORMAT_VERSION = 1
JSON_NAME = "conversation.json"
LOW_WATER = 0.75  # after trimming, the context fills at most this share of its budget


@dataclass(frozen=True)
class ContextReport:
    """What ``csm_context`` kept: turns with audio, turns as text only, turns left out, rows used."""

    with_audio: tuple[int, ...]
    text_only: tuple[int, ...]
    dropped: tuple[int, ...]
    voice_kept: bool
    rows: int
    budget: int


class Conversation:
    """Turns in order, with the rules for CSM context and LLM history, and transcript files.

    Thread-safe: the pipeline's stages add turns from their threads and the UI may save.
    """

    def __init__(self, persona: str = "default", agent_speaker: int = 0, user_speaker: int | None = None) -> None:
        self.persona = persona
        self.agent_speaker = int(agent_speaker)
        self.user_speaker = int(user_speaker) if user_speaker is not None else (1 if agent_speaker != 1 else 0)
        self.turns: list[Turn] = []
        self.created_at = time.time()
        self.directory: Path | None = None
        self._lock = threading.RLock()
        self._written: set[str] = set()  # WAV files already on disk in ``directory``
        # Context cut points (turn ids): turns before ``_audio_from`` are text-only,
        # turns before ``_text_from`` are left out. They only move forward.
        self._audio_from = 0
        self._text_from = 0
        self.last_context: ContextReport | None = None
        # Turns up to ``summary[0]`` reach the LLM as the text ``summary[1]`` (agent.memory.summaries).
        self.summary: tuple[int, str] | None = None

    # ---- turns ------------------------------------------------------------------------

    def set_persona(self, persona: str, agent_speaker: int) -> None:
        """The agent becomes ``persona`` speaking as ``agent_speaker`` (the user moves off that id)."""
        with self._lock:
            self.persona = persona
            self.agent_speaker = int(agent_speaker)
            if self.agent_speaker == self.user_speaker:
                self.user_speaker = 1 if self.agent_speaker != 1 else 0

    def next_id(self) -> int:
        with self._lock:
            return self.turns[-1].id + 1 if self.turns else 1

    def add_user_turn(self, text: str, audio: np.ndarray | None = None, sample_rate: int = 16_000, *,
                      started_at: float | None = None, ended_at: float | None = None, typed: bool = False) -> Turn:
        """Record what the user said (audio: float32 mono at ``sample_rate``; None for typed text)."""
        now = time.time()
        with self._lock:
            turn = Turn(self.next_id(), "user", text.strip(), self.user_speaker, audio, sample_rate,
                        started_at if started_at is not None else now, ended_at if ended_at is not None else now,
                        typed=typed)
            self.turns.append(turn)
            return turn

    def add_agent_turn(self, sentences: Sequence[Sentence], audio: np.ndarray | None, *, text: str | None = None,
                       interrupted: bool = False, started_at: float | None = None, ended_at: float | None = None,
                       sample_rate: int = CSM_RATE, timings: dict[str, float | int] | None = None,
                       tools: list[dict] | None = None) -> Turn:
        """Record what the agent said: the sentences it started, and the audio actually played.

        ``text`` is the reply as the LLM wrote it (default: the sentences as spoken); ``timings``
        its latencies and playback gaps (``TurnLatency.as_record``); ``tools`` the tool calls made for
        it and their results (saved, shown, never spoken or replayed).
        """
        now = time.time()
        if text is None:
            text = " ".join(s.text for s in sentences if s.text.strip())
        with self._lock:
            turn = Turn(self.next_id(), "agent", text, self.agent_speaker, audio, sample_rate,
                        started_at if started_at is not None else now, ended_at if ended_at is not None else now,
                        interrupted=interrupted, sentences=list(sentences), timings=dict(timings or {}),
                        tools=list(tools or []))
            self.turns.append(turn)
            return turn

    def __len__(self) -> int:
        return len(self.turns)

    def last_agent_turn(self) -> Turn | None:
        with self._lock:
            return next((t for t in reversed(self.turns) if t.role == "agent" and t.text), None)

    def audio_turns_in_memory(self) -> int:
        """How many turns hold audio in memory (bounded by ``release_old_audio``)."""
        with self._lock:
            return sum(1 for t in self.turns if t.audio is not None)

    # ---- CSM context ----------------------------------------------------------------------

    def csm_context(self, voice: Segment | None, budget: int, measure: Callable[[Segment], int],
                    extra: Sequence[Segment] = ()) -> tuple[list[Segment], ContextReport]:
        """Segments for the next utterance: the voice clip, the turns that fit, then ``extra``.

        ``budget`` is the number of backbone positions the context may take; ``measure(segment)``
        gives a segment's positions (``Generator.segment_frames(seg)[0].shape[0]``). ``extra``
        (the sentences of the reply in progress) is always kept. See the module docstring for
        the trimming rule; the report says what was kept.
        """
        with self._lock:
            turns = [t for t in self.turns if t.text.strip()]
            voice_segments = [voice] if voice is not None else []
            pinned_rows = sum(measure(s) for s in voice_segments) + sum(measure(s) for s in extra)
            if pinned_rows > budget:
                # The voice clip alone overflows: keep the voice out rather than the conversation.
                voice_segments = []
                pinned_rows = sum(measure(s) for s in extra)
            room = budget - pinned_rows

            def rows_of(audio_from: int, text_from: int) -> tuple[int, list]:
                segments, rows = [], 0
                for turn in turns:
                    if turn.id < text_from:
                        continue
                    for seg in turn.csm_segments(with_audio=turn.id >= audio_from):
                        rows += measure(seg)
                        segments.append(seg)
                return rows, segments

            rows, segments = rows_of(self._audio_from, self._text_from)
            if rows > room:
                target = int(room * LOW_WATER)
                ids = [t.id for t in turns]
                # 2. oldest turns lose their audio, one turn at a time.
                audio_from = self._audio_from
                for turn_id in ids:
                    if rows <= target:
                        break
                    if turn_id < audio_from:
                        continue
                    audio_from = turn_id + 1
                    rows, segments = rows_of(audio_from, self._text_from)
                # 3. then oldest turns go entirely.
                text_from = self._text_from
                for turn_id in ids:
                    if rows <= target:
                        break
                    if turn_id < text_from:
                        continue
                    text_from = turn_id + 1
                    rows, segments = rows_of(audio_from, text_from)
                self._audio_from, self._text_from = max(audio_from, text_from), text_from
                rows, segments = rows_of(self._audio_from, self._text_from)
            report = ContextReport(
                with_audio=tuple(t.id for t in turns if t.id >= self._audio_from and t.has_audio),
                text_only=tuple(t.id for t in turns
                                if t.id >= self._text_from and (t.id < self._audio_from or not t.has_audio)),
                dropped=tuple(t.id for t in turns if t.id < self._text_from),
                voice_kept=bool(voice_segments),
                rows=rows + pinned_rows,
                budget=budget,
            )
            self.last_context = report
            return voice_segments + segments + list(extra), report

    def release_old_audio(self) -> int:
        """Free the audio of turns the CSM context no longer uses, once it is on disk; returns how many."""
        with self._lock:
            released = 0
            for turn in self.turns:
                if turn.id >= self._audio_from:
                    break
                if turn.audio is not None and turn.audio_file and turn.audio_file in self._written:
                    turn.release_audio()
                    released += 1
            return released

    # ---- LLM history ------------------------------------------------------------------------

    def llm_messages(self, system_prompt: str, max_chars: int = 12_000) -> list[dict[str, str]]:
        """Chat messages: the system prompt, then the newest turns whose text fits ``max_chars``.

        Consecutive turns of one role (a reply cut off before it said anything) are merged so
        chat templates see alternating roles.
        """
        with self._lock:
            history: list[dict[str, str]] = []
            used = 0
            upto = self.summary[0] if self.summary else 0
            for turn in reversed(self.turns):
                if not turn.text.strip() or turn.id <= upto:
                    continue
                if used + len(turn.text) > max_chars and history:
                    break
                used += len(turn.text)
                role = "user" if turn.role == "user" else "assistant"
                if history and history[0]["role"] == role:
                    history[0]["content"] = f"{turn.text} {history[0]['content']}"
                else:
                    history.insert(0, {"role": role, "content": turn.text})
            while history and history[0]["role"] == "assistant" and len(history) > 1:
                history.pop(0)  # the window starts mid-exchange: begin at a user turn
            earlier = ([{"role": "system", "content": f"Earlier in this conversation (a summary): {self.summary[1]}"}]
                       if self.summary else [])
            return [{"role": "system", "content": system_prompt.strip()}] + earlier + history

    # ---- save / load ----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "persona": self.persona,
                "agent_speaker": self.agent_speaker,
                "user_speaker": self.user_speaker,
                "created_at": self.created_at,
                "turns": [t.to_json() for t in self.turns],
                **({"summary": {"upto": self.summary[0], "text": self.summary[1]}} if self.summary else {}),
            }

    def save(
        self, directory: str | Path | None = None, *, watermark: Callable[[np.ndarray, int], np.ndarray] | None = None
    ) -> Path:
        """Write the conversation directory: new turns' WAVs, then ``conversation.json`` (all atomic).

        ``watermark(audio, sample_rate)`` marks agent audio before it is written (the audio kept
        in memory for CSM context stays as generated).
        """
        with self._lock:
            target = Path(directory).expanduser() if directory is not None else self.directory
            if target is None:
                raise AgentError("no conversation directory: pass --save DIR")
            if target.exists() and not target.is_dir():
                raise AgentError(f"cannot save the conversation to {target}: it is a file, pass a directory")
            try:
                target.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise AgentError(
                    f"cannot create {target}: {error.strerror or error} (pass another --save DIR)"
                ) from None
            if target != self.directory:
                if self.directory is None:
                    self.directory = target
                    self._written = set()
                else:
                    return self._save_copy(target, watermark)
            for turn in self.turns:
                name = turn.audio_file or turn.default_file_name()
                if name in self._written or not turn.has_audio:
                    continue
                audio = turn.audio
                if watermark is not None and turn.role == "agent":
                    audio = watermark(audio, turn.sample_rate)
                write_wav(target / name, audio, turn.sample_rate)
                turn.audio_file = name
                self._written.add(name)
            write_text_atomic(target / JSON_NAME, json.dumps(self.to_json(), indent=1, ensure_ascii=False))
            return target

    def _save_copy(self, target: Path, watermark) -> Path:
        """Save everything into another directory (audio released from memory comes from the first)."""
        copy = Conversation(self.persona, self.agent_speaker, self.user_speaker)
        copy.created_at = self.created_at
        for turn in self.turns:
            audio = turn.audio
            if audio is None and turn.audio_file and self.directory is not None:
                audio = read_wav(self.directory / turn.audio_file)[0]
            copy.turns.append(Turn(turn.id, turn.role, turn.text, turn.speaker, audio, turn.sample_rate,
                                   turn.started_at, turn.ended_at, turn.interrupted,
                                   [Sentence(s.text, s.samples) for s in turn.sentences], typed=turn.typed,
                                   timings=dict(turn.timings), tools=list(turn.tools)))
        copy.directory = target
        copy.save(target, watermark=watermark)
        return target

    @classmethod
    def load(cls, path: str | Path, *, with_audio: bool = True) -> Conversation:
        """Read a saved conversation (its directory or its ``conversation.json``); AgentError if broken."""
        path = Path(path).expanduser()
        json_path = path / JSON_NAME if path.is_dir() else path
        if not json_path.is_file():
            raise AgentError(f"no saved conversation at {path}: pass a directory written by csm-chat --save "
                             f"or its {JSON_NAME}")
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise AgentError(f"{json_path} is not valid JSON ({error}): the transcript is corrupt, "
                             "restore it or pass another one") from None
        where = str(json_path)
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise AgentError(f"{where} is not a csm-chat conversation (no \"format\": \"{FORMAT_NAME}\")")
        version = data.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise AgentError(f"{where} has format version {version!r}; this csm-chat reads up to "
                             f"{FORMAT_VERSION}: upgrade csm-chat")
        turns_data = data.get("turns")
        if not isinstance(turns_data, list):
            raise AgentError(f"{where}: 'turns' must be a list")
        conversation = cls(str(data.get("persona") or "default"), json_int(data, "agent_speaker", where, 0),
                           json_int(data, "user_speaker", where, 1))
        conversation.created_at = float(data.get("created_at") or 0.0)
        summary = data.get("summary")
        if isinstance(summary, dict) and isinstance(summary.get("upto"), int) and isinstance(summary.get("text"), str):
            conversation.summary = (summary["upto"], summary["text"])
        base = json_path.parent
        for index, item in enumerate(turns_data):
            turn = turn_from_json(item, f"{where} turn {index + 1}")
            if turn.audio_file:
                wav = base / turn.audio_file
                if not wav.is_file():
                    raise AgentError(f"{where}: turn {turn.id} audio {turn.audio_file} is missing next to it; "
                                     "restore the file or remove its \"audio\" entry")
                if with_audio:
                    turn.audio, turn.sample_rate = read_wav(wav)
                conversation._written.add(turn.audio_file)
            conversation.turns.append(turn)
        conversation.directory = base
        return conversation
