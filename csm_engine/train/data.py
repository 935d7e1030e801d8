"""Training data: where utterances come from, before any audio is read.

Four sources, told apart by what a path is:

- a clip folder: ``NAME.wav`` (or .flac/.ogg) with its transcript in ``NAME.txt``; every clip
  stands alone, spoken by ``--speaker``;
- a ``voices.toml`` table (the engine's voice format: ``[voices.NAME]`` with speaker, audio, text);
- a JSONL manifest, one utterance a line: ``{"audio": "a.wav", "text": "...", "speaker": 0,
  "conversation": "c1", "turn": 3}`` (audio relative to the manifest; speaker, conversation and
  turn optional; lines of one conversation are ordered by ``turn``, else by line);
- a csm-chat conversation directory, or a folder of them (what ``csm-chat --save DIR`` writes).

The conversation format read here is the one ``agent/conversation/conversation.py`` writes (read directly:
the engine never imports the agent): ``conversation.json`` =
``{"format": "csm-chat-conversation", "version": 1, "turns": [{"id": 1, "role": "user"|"agent",
"text": "...", "speaker": 1, "audio": "turn-0001-user.wav" | null, "sample_rate": 16000,
"interrupted": false, "typed": false, "sentences": [{"text": "...", "samples": 43200}]}]}``
with each turn's WAV next to it. An agent turn at 24 kHz with sentences is split into one
utterance per sentence (the agent speaks, and keeps context, sentence by sentence). Turns
without audio (typed, or text only) and interrupted turns are context, never targets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from csm_engine.config import SAMPLE_RATE
from csm_engine.errors import CSMError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
CONVERSATION_JSON = "conversation.json"
CONVERSATION_FORMAT = "csm-chat-conversation"
CONVERSATION_VERSION = 1
ROLES = ("user", "agent")


@dataclass(frozen=True)
class AudioRef:
    """Where an utterance's audio is: a file, optionally samples [start, stop) of it at 24 kHz."""

    path: Path | None = None
    start: int = 0
    stop: int | None = None
    voice: object | None = None  # a csm_engine.voices.VoicePrompt (may be a hub clip)

    def describe(self) -> str:
        if self.voice is not None:
            return f"voice {getattr(self.voice, 'name', '?')!r}"
        span = f" [{self.start}:{self.stop}]" if self.start or self.stop is not None else ""
        return f"{self.path}{span}"


@dataclass(frozen=True)
class Utterance:
    """One thing said: its words, who said it, its audio (None: text-only context) and its place."""

    text: str
    speaker: int
    audio: AudioRef | None
    conversation: str  # utterances of one conversation are each other's context
    order: tuple[float, int]  # position in the conversation (turn, sentence)
    turn: str  # context is trimmed by whole turns: the utterances of one turn share this key
    target: bool = True  # trained on (False: context only)
    source: str = ""  # where it was read, for messages


def find_utterances(paths: list[str | os.PathLike], speaker: int = 0, roles: tuple[str, ...] = ROLES
                    ) -> list[Utterance]:
    """Every utterance under ``paths`` (see the module docstring); CSMError naming the first bad one."""
    if not paths:
        raise CSMError("no training data given: pass clip folders, manifest .jsonl files or conversation directories")
    found: list[Utterance] = []
    for raw in paths:
        found.extend(_read_source(Path(raw).expanduser(), speaker, roles))
    if not any(u.target and u.audio is not None for u in found):
        raise CSMError(f"no utterance with audio to train on in {', '.join(map(str, paths))} "
                       "(each needs a recording and its transcript)")
    return found


def _read_source(path: Path, speaker: int, roles: tuple[str, ...]) -> list[Utterance]:
    if not path.exists():
        raise CSMError(f"training data not found: {path} (check the path)")
    if path.is_file():
        if path.suffix == ".jsonl":
            return read_manifest(path, speaker)
        if path.suffix == ".toml":
            return read_voice_table(path)
        if path.name == CONVERSATION_JSON:
            return read_conversation(path.parent, roles)
        raise CSMError(f"{path}: not a training source; pass a clip folder, a .jsonl manifest, a voices.toml "
                       f"or a conversation directory (with {CONVERSATION_JSON})")
    if (path / CONVERSATION_JSON).is_file():
        return read_conversation(path, roles)
    if any(p.suffix.lower() in AUDIO_SUFFIXES for p in path.iterdir() if p.is_file()):
        return read_clip_folder(path, speaker)
    conversations = sorted(p for p in path.iterdir() if (p / CONVERSATION_JSON).is_file())
    if conversations:
        return [u for c in conversations for u in read_conversation(c, roles)]
    raise CSMError(f"{path} holds no clips ({'/'.join(AUDIO_SUFFIXES)} with a .txt transcript each), no "
                   f"{CONVERSATION_JSON} and no conversation directories; pass one of those")


def _check_text(text: str, where: str, fix: str) -> str:
    text = " ".join(text.split())
    if not text:
        raise CSMError(f"{where}: the transcript is empty; {fix}")
    return text


def read_clip_folder(folder: Path, speaker: int) -> list[Utterance]:
    """Each ``NAME.wav`` with ``NAME.txt`` as one stand-alone utterance."""
    out = []
    for clip in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES):
        transcript = clip.with_suffix(".txt")
        if not transcript.is_file():
            raise CSMError(f"clip {clip} has no transcript: write its exact words into {transcript.name} next to it "
                           "(or remove the clip)")
        try:
            text = transcript.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CSMError(f"{transcript} is not UTF-8 text: save it as UTF-8") from None
        text = _check_text(text, str(transcript), "write the clip's words into it")
        key = str(clip)
        out.append(Utterance(text, speaker, AudioRef(clip), key, (0.0, 0), key, True, str(clip)))
    return out


def read_voice_table(path: Path) -> list[Utterance]:
    """Each ``[voices.NAME]`` of a voices.toml as one stand-alone utterance (hub clips are fetched when read)."""
    from csm_engine.voices import load_voice_table

    if not path.is_file():
        raise CSMError(f"voices table not found: {path}")
    voices = load_voice_table(path)
    if not voices:
        raise CSMError(f"{path} lists no [voices.NAME] tables; add clips to it or pass a clip folder")
    out = []
    for name, voice in voices.items():
        text = _check_text(voice.text, f"{path} [voices.{name}]", "set its text to the clip's words")
        key = f"{path}#{name}"
        out.append(Utterance(text, voice.speaker, AudioRef(voice=voice), key, (0.0, 0), key, True, key))
    return out


def read_manifest(path: Path, default_speaker: int) -> list[Utterance]:
    """Utterances of a JSONL manifest (see the module docstring)."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CSMError(f"{path} is not UTF-8 text: save it as UTF-8") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise CSMError(f"{where} is not JSON ({e.msg}); write one object per line") from None
        if not isinstance(item, dict):
            raise CSMError(f"{where} must be a JSON object with \"audio\" and \"text\"")
        audio, text = item.get("audio"), item.get("text")
        if not isinstance(audio, str) or not audio.strip():
            raise CSMError(f"{where}: \"audio\" must name the clip (a path relative to the manifest)")
        if not isinstance(text, str):
            raise CSMError(f"{where}: \"text\" is missing; give the clip's transcript")
        text = _check_text(text, where, "give the clip's exact words in \"text\"")
        speaker = item.get("speaker", default_speaker)
        if isinstance(speaker, bool) or not isinstance(speaker, int) or speaker < 0:
            raise CSMError(f"{where}: \"speaker\" must be a whole number >= 0, got {speaker!r}")
        turn = item.get("turn", number)
        if isinstance(turn, bool) or not isinstance(turn, (int, float)):
            raise CSMError(f"{where}: \"turn\" must be a number (its order in the conversation), got {turn!r}")
        clip = Path(audio).expanduser()
        clip = clip if clip.is_absolute() else path.parent / clip
        conversation = item.get("conversation")
        key = f"{path}#{conversation}" if conversation is not None else f"{path}:{number}"
        out.append(Utterance(text, speaker, AudioRef(clip), key, (float(turn), 0), f"{key}@{turn}", True, where))
    if not out:
        raise CSMError(f"{path} has no utterances; write one JSON object per line")
    return out


def read_conversation(directory: Path, roles: tuple[str, ...] = ROLES) -> list[Utterance]:
    """The turns of one saved csm-chat conversation (format in the module docstring)."""
    json_path = directory / CONVERSATION_JSON
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CSMError(f"{json_path} is not valid JSON ({e}): restore it or leave this conversation out") from None
    if not isinstance(data, dict) or data.get("format") != CONVERSATION_FORMAT:
        raise CSMError(f"{json_path} is not a csm-chat conversation (no \"format\": \"{CONVERSATION_FORMAT}\")")
    version = data.get("version")
    if not isinstance(version, int) or version > CONVERSATION_VERSION:
        raise CSMError(f"{json_path} has format version {version!r}; this engine reads up to "
                       f"{CONVERSATION_VERSION}: upgrade csm-chat")
    turns = data.get("turns")
    if not isinstance(turns, list):
        raise CSMError(f"{json_path}: 'turns' must be a list")
    key = str(directory)
    out = []
    for index, turn in enumerate(turns):
        out.extend(_turn_utterances(turn, index, directory, key, roles, f"{json_path} turn {index + 1}"))
    return out


def _turn_utterances(turn: object, index: int, directory: Path, key: str, roles: tuple[str, ...],
                     where: str) -> list[Utterance]:
    if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("text"), str):
        raise CSMError(f"{where}: each turn needs a 'role' (user|agent) and a 'text'")
    text = " ".join(turn["text"].split())
    if not text:
        return []
    speaker = turn.get("speaker", 0)
    if isinstance(speaker, bool) or not isinstance(speaker, int) or speaker < 0:
        raise CSMError(f"{where}: 'speaker' must be a whole number >= 0")
    turn_key = f"{key}@{index}"
    audio_name = turn.get("audio")
    target = turn["role"] in roles and not turn.get("interrupted", False)
    if not audio_name:
        return [Utterance(text, speaker, None, key, (float(index), 0), turn_key, False, where)]
    if not isinstance(audio_name, str) or "/" in audio_name or "\\" in audio_name:
        raise CSMError(f"{where}: 'audio' must be a WAV file name next to {CONVERSATION_JSON}")
    wav = directory / audio_name
    if not wav.is_file():
        raise CSMError(f"{where}: its audio {audio_name} is missing from {directory}; restore the file or set "
                       "the turn's \"audio\" to null")
    sentences = turn.get("sentences") or []
    if turn["role"] == "agent" and sentences and turn.get("sample_rate", SAMPLE_RATE) == SAMPLE_RATE:
        out, offset = [], 0
        for n, s in enumerate(sentences):
            if not isinstance(s, dict) or not isinstance(s.get("text"), str) or not isinstance(s.get("samples"), int):
                raise CSMError(f"{where}: each sentence needs 'text' and 'samples'")
            words = " ".join(s["text"].split())
            if words and s["samples"] > 0:
                out.append(Utterance(words, speaker, AudioRef(wav, offset, offset + s["samples"]), key,
                                     (float(index), n), turn_key, target, f"{where} sentence {n + 1}"))
            offset += s["samples"]
        return out
    return [Utterance(text, speaker, AudioRef(wav), key, (float(index), 0), turn_key, target, where)]
