"""``csm-chat --replay``: say a saved conversation again with CSM, turn by turn, in context.

Each re-synthesized turn is generated with the running context: the earlier turns as they
now sound (the user's original audio, the agent's re-synthesized audio). Writes one WAV per
re-synthesized turn and ``conversation.wav`` with every turn back to back (24 kHz; user
audio resampled). ``--all-turns`` re-synthesizes the user's turns too (in the user's speaker id).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agent.audio import resample, write_wav
from agent.config.personas import Persona
from agent.conversation.conversation import CSM_RATE, Conversation, Sentence, Turn
from agent.errors import AgentError
from agent.speak.sentences import SentenceSplitter
from agent.speak.speech_text import normalize_for_speech
from agent.speak.synthesis import ReplySynthesizer, SynthesisOptions

if TYPE_CHECKING:  # torch-heavy: only for annotations
    from csm_engine.generator import Generator
    from csm_engine.tokens import Segment

GAP_S = 0.3  # silence between turns in the joined file


@dataclass(frozen=True)
class ReplayResult:
    out_dir: Path
    turn_files: list[Path]
    joined: Path
    turns: int


def _sentences_of(turn: Turn) -> list[str]:
    """What to say for a turn: its spoken sentences, else its text split into sentences."""
    if turn.sentences:
        texts = [s.text for s in turn.sentences if s.text.strip()]
        if texts:
            return texts
    splitter = SentenceSplitter()
    sentences = list(splitter.split([turn.text]))
    return [t for t in (normalize_for_speech(s) for s in sentences) if t.strip()]


def replay_conversation(
    source: str | Path,
    out_dir: str | Path,
    generator: Generator,
    *,
    persona: Persona | None = None,
    voice: Segment | None = None,
    all_turns: bool = False,
    seed: int | None = None,
    max_audio_ms: int | None = None,
    watermark: Callable[[np.ndarray, int], np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ReplayResult:
    """Re-synthesize ``source`` (a conversation dir or its json) into ``out_dir``; see the module docstring."""
    from csm_engine.tokens import Segment  # imports torch

    saved = Conversation.load(source)
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AgentError(f"cannot create {out}: {error.strerror or error} (pass another --out)") from None
    agent_speaker = persona.speaker_id if persona is not None else saved.agent_speaker
    running = Conversation(saved.persona, agent_speaker, saved.user_speaker if saved.user_speaker != agent_speaker
                           else (1 if agent_speaker != 1 else 0))
    options = SynthesisOptions(
        temperature=persona.temperature if persona is not None else 0.9,
        topk=persona.topk if persona is not None else 50,
        max_audio_ms=max_audio_ms or (persona.max_audio_length_ms if persona is not None else 20_000),
        seed=seed,
    )
    synth = ReplySynthesizer(generator, running, voice, options)
    files: list[Path] = []
    joined: list[np.ndarray] = []
    gap = np.zeros(int(GAP_S * CSM_RATE), np.float32)
    for index, turn in enumerate(saved.turns):
        resynthesize = turn.role == "agent" or all_turns
        speaker = running.agent_speaker if turn.role == "agent" else running.user_speaker
        if resynthesize and turn.text.strip():
            texts = _sentences_of(turn)
            earlier: list = []
            sentences: list[Sentence] = []
            parts: list[np.ndarray] = []
            for n, text in enumerate(texts):
                spoken = synth.speak(text, speaker, earlier,
                                     seed=None if seed is None else seed * 1009 + index * 31 + n)
                earlier.append(Segment(speaker, text, synth.remember(spoken.audio, spoken.codes)))
                sentences.append(Sentence(text, len(spoken.audio), spoken.codes))
                parts.append(spoken.audio)
            audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
            if turn.role == "agent":
                new = running.add_agent_turn(sentences, audio, text=turn.text, interrupted=turn.interrupted,
                                             started_at=turn.started_at, ended_at=turn.ended_at)
            else:
                new = running.add_user_turn(turn.text, audio, CSM_RATE, started_at=turn.started_at,
                                            ended_at=turn.ended_at)
                new.sentences = sentences
            path = out / f"turn-{turn.id:04d}-{turn.role}.wav"
            write_wav(path, watermark(audio, CSM_RATE) if watermark else audio, CSM_RATE)
            files.append(path)
            if progress is not None:
                progress(f"{turn.role}: {turn.text}")
            joined.append(audio)
        else:
            audio = turn.audio
            if turn.role == "user":
                running.add_user_turn(turn.text, audio, turn.sample_rate, started_at=turn.started_at,
                                      ended_at=turn.ended_at, typed=turn.typed)
            else:
                running.add_agent_turn(turn.sentences, audio, text=turn.text, interrupted=turn.interrupted)
            if audio is not None and len(audio):
                joined.append(resample(audio, turn.sample_rate, CSM_RATE))
        if joined and len(joined[-1]):
            joined.append(gap)
    total = np.concatenate(joined) if joined else np.zeros(0, np.float32)
    joined_path = out / "conversation.wav"
    # The joined file carries synthetic speech: mark all of it.
    write_wav(joined_path, watermark(total, CSM_RATE) if watermark and len(total) else total, CSM_RATE)
    return ReplayResult(out, files, joined_path, len(files))
