"""Personas: who the agent is (system prompt) and how it sounds (speaker, voice clip, sampling).

A persona is a plain TOML file (format in prompts/README.md). Built-in ones live in the
repository's ``prompts/`` directory; users add their own to ``<config dir>/csm-chat/personas/``
or pass a path. Every mistake in a file is an ``AgentError`` naming the file and the key.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import platformdirs

from agent.errors import AgentError
from agent.llm.base import Sampling
from agent.tools.config import persona_tool_groups

LLMSettings = Sampling  # a persona's [llm] table is exactly the LLM's sampling settings

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "prompts"
DEFAULT_PERSONA = "default"
HUB_PREFIX = "hf://"
NOT_PERSONAS = {"voices.toml"}  # the engine's voice table shares prompts/


def user_persona_dir() -> Path:
    """Where a user's own persona files go (searched before the built-in ones)."""
    return Path(platformdirs.user_config_dir("csm-chat")) / "personas"


@dataclass(frozen=True)
class PersonaVoice:
    """The voice a persona speaks in: a named voice, or a clip plus what is said in it.

    Written in the file either as ``voice = "NAME"`` (a voice from ``prompts/voices.toml`` or
    the user's voices.toml) or as ``voice = { clip = ..., transcript = ... }``. ``clip`` is kept
    as written: a path (relative to the persona file) or a hub file ``hf://OWNER/REPO/PATH``.
    Nothing is read or downloaded here; ``resolve()`` hands it to ``csm_engine.voices``.
    """

    name: str | None = None
    clip: str | None = None
    transcript: str | None = None
    base_dir: Path | None = None  # the persona file's directory, for relative clip paths

    @property
    def is_hub(self) -> bool:
        return self.clip is not None and self.clip.startswith(HUB_PREFIX)

    def hub_file(self) -> tuple[str, str]:
        """``(repo_id, filename)``: hf://sesame/csm-1b/prompts/a.wav -> ("sesame/csm-1b", "prompts/a.wav")."""
        if not self.is_hub:
            raise ValueError(f"{self.clip!r} is not a hub clip")
        owner, repo, filename = self.clip[len(HUB_PREFIX) :].split("/", 2)
        return f"{owner}/{repo}", filename

    def local_path(self) -> Path | None:
        """Absolute path of a local clip (relative to the persona file); None for hub clips and names."""
        if self.clip is None or self.is_hub:
            return None
        path = Path(self.clip).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        return path.resolve()

    def resolve(self, speaker: int):
        """The engine's ``csm_engine.voices.VoicePrompt`` for this voice, tagged as ``speaker``.

        Raises ``csm_engine.errors.CSMError`` (one line with the fix) for an unknown name or a
        missing local clip; hub clips are only fetched later, by ``load_voice_audio``.
        """
        from csm_engine.voices import resolve_voice  # imports torch

        if self.name is not None:
            return resolve_voice(self.name, speaker=speaker)
        ref = self.clip if self.is_hub else str(self.local_path())
        return resolve_voice(ref, text=self.transcript, speaker=speaker)


@dataclass(frozen=True)
class Persona:
    """Everything a persona file sets; defaults fill what it leaves out."""

    name: str
    system_prompt: str
    description: str = ""
    speaker_id: int = 0
    voice: PersonaVoice | None = None
    temperature: float = 0.9  # CSM sampling
    topk: int = 50
    max_audio_length_ms: int = 20_000  # per sentence
    llm: Sampling = field(default_factory=Sampling)  # pass as stream_reply(..., sampling=persona.llm)
    adapter: str | None = None  # a csm-finetune output dir, as written (relative to the persona file)
    path: Path | None = None  # the file it came from
    tools: tuple[str, ...] | None = None  # built-in tool groups (agent.tools.config); None: the config decides
    mcp: tuple[str, ...] = ()  # names of config.toml's [mcp.NAME] servers this persona may use

    def adapter_path(self) -> str | None:
        """The adapter directory to pass as ``load_generator(..., adapter=)``; None without one."""
        if self.adapter is None:
            return None
        path = Path(self.adapter).expanduser()
        if not path.is_absolute() and self.path is not None:
            path = self.path.parent / path
        return str(path)


# ----------------------------------------------------------------------------- validation


class _Fields:
    """Reads typed values out of one TOML table, naming the file and key in every error."""

    def __init__(self, source: str, table: dict[str, Any], prefix: str = "") -> None:
        self.source, self.table, self.prefix = source, table, prefix

    def fail(self, key: str, problem: str) -> AgentError:
        return AgentError(f"persona {self.source}: '{self.prefix}{key}' {problem}")

    def reject_unknown(self, allowed: set[str]) -> None:
        for key in self.table:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.fail(key, f"is not a persona setting (known: {known})")

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        if key not in self.table:
            if required:
                raise self.fail(key, "is missing: add it as a string")
            return default
        value = self.table[key]
        if not isinstance(value, str):
            raise self.fail(key, "must be a string")
        if required and not value.strip():
            raise self.fail(key, "must not be empty")
        return value.strip()

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, "must be a number")
        if not low <= value <= high:
            raise self.fail(key, f"must be between {low:g} and {high:g}, got {value}")
        return float(value)

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "must be a whole number")
        if not low <= value <= high:
            raise self.fail(key, f"must be between {low} and {high}, got {value}")
        return value

    def table_of(self, key: str) -> _Fields | None:
        if key not in self.table:
            return None
        value = self.table[key]
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, e.g. {key} = {{ ... }}")
        return _Fields(self.source, value, f"{self.prefix}{key}.")


def parse_persona(data: dict[str, Any], source: str, base_dir: Path | None = None) -> Persona:
    """Build a Persona from parsed TOML; ``source`` names the file in error messages."""
    top = _Fields(source, data)
    top.reject_unknown(
        {"name", "description", "system_prompt", "speaker_id", "voice", "temperature", "topk",
         "max_audio_length_ms", "llm", "adapter", "tools", "mcp"}  # fmt: skip
    )
    voice = None
    if isinstance(data.get("voice"), str):
        name = top.text("voice", required=True)
        if not re.fullmatch(r"[\w.-]+", name):
            raise top.fail(
                "voice", 'must name a voice from voices.toml, or be a table { clip = "...", transcript = "..." }'
            )
        voice = PersonaVoice(name=name)
    elif (voice_fields := top.table_of("voice")) is not None:
        voice_fields.reject_unknown({"clip", "transcript"})
        clip = voice_fields.text("clip", required=True)
        if clip.startswith(HUB_PREFIX) and clip[len(HUB_PREFIX) :].count("/") < 2:
            raise voice_fields.fail("clip", "must look like hf://OWNER/REPO/PATH.wav")
        voice = PersonaVoice(clip=clip, transcript=voice_fields.text("transcript", required=True), base_dir=base_dir)
    llm = Sampling()
    if (llm_fields := top.table_of("llm")) is not None:
        llm_fields.reject_unknown({"temperature", "max_tokens", "top_p"})
        llm = Sampling(
            temperature=llm_fields.number("temperature", llm.temperature, 0.0, 2.0),
            max_tokens=llm_fields.integer("max_tokens", llm.max_tokens, 1, 8192),
            top_p=llm_fields.number("top_p", llm.top_p, 0.0, 1.0),
        )
    return Persona(
        name=top.text("name", required=True),
        system_prompt=top.text("system_prompt", required=True),
        description=top.text("description", ""),
        speaker_id=top.integer("speaker_id", 0, 0, 31),
        voice=voice,
        temperature=top.number("temperature", 0.9, 0.01, 2.0),
        topk=top.integer("topk", 50, 1, 2051),
        max_audio_length_ms=top.integer("max_audio_length_ms", 20_000, 80, 90_000),
        llm=llm,
        adapter=top.text("adapter"),
        path=None,
        tools=persona_tool_groups(data.get("tools"), source),
        mcp=_names(top, "mcp"),
    )


def _names(fields: _Fields, key: str) -> tuple[str, ...]:
    value = fields.table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and re.fullmatch(r"[\w-]+", v) for v in value):
        raise fields.fail(key, 'must be a list of names, e.g. ["weather"]')
    return tuple(value)


# ----------------------------------------------------------------------------- files


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_persona_file(path: str | Path) -> Persona:
    """Load one persona TOML file."""
    path = Path(path).expanduser()
    source = _display(path)
    if not path.is_file():
        raise AgentError(f"persona file not found: {source} (see csm-chat --list-personas)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise AgentError(f"persona {source} is not UTF-8 text: save it as UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        # tomllib says e.g. "Expected '=' after a key in a key/value pair (at line 3, column 7)".
        raise AgentError(f"persona {source}: TOML syntax error: {error} (fix that line)") from None
    return replace(parse_persona(data, source, path.resolve().parent), path=path.resolve())


def persona_dirs() -> list[Path]:
    """Directories searched for persona names, first match wins: the user's, then built-in."""
    return [user_persona_dir(), BUILTIN_DIR]


def list_personas() -> list[str]:
    """Names of the installed personas (file stems, what ``--persona NAME`` takes), sorted."""
    names: set[str] = set()
    for directory in persona_dirs():
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*.toml") if p.is_file() and p.name not in NOT_PERSONAS)
    return sorted(names)


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.endswith(".toml") or "/" in name_or_path or "\\" in name_or_path


def load_persona(name_or_path: str | Path | None = None) -> Persona:
    """Load a persona by name (a file stem in ``persona_dirs()``) or by path; None: the default."""
    name = str(name_or_path) if name_or_path not in (None, "") else DEFAULT_PERSONA
    if isinstance(name_or_path, Path) or _looks_like_path(name):
        return load_persona_file(name)
    if not re.fullmatch(r"[\w.-]+", name):
        raise AgentError(f"persona name {name!r} is not valid: pass a name from --list-personas or a .toml path")
    for directory in persona_dirs():
        candidate = directory / f"{name}.toml"
        if candidate.is_file() and candidate.name not in NOT_PERSONAS:
            return load_persona_file(candidate)
    known = ", ".join(list_personas()) or "none installed"
    raise AgentError(f"unknown persona {name!r} (known: {known}): pass one of those or a path to a .toml file")
