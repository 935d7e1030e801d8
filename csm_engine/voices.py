"""Voice prompts: a named clip + transcript + speaker id that CSM continues speaking in.

A speaker id alone is not a voice; CSM follows the voice of the audio in its context. A
``VoicePrompt`` names such a clip. Names come from ``prompts/voices.toml`` (shipped) and the
user's ``voices.toml`` in ``platformdirs.user_config_dir("csm-chat")`` (wins on the same name);
a clip path plus its transcript works without any table.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from csm_engine.config import SAMPLE_RATE
from csm_engine.errors import CSMError, first_line

HF_SCHEME = "hf://"
VOICES_FILE_NAME = "voices.toml"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
# prompts/ sits next to the package in the repository (the package is installed editable).
SHIPPED_VOICES_FILE = Path(__file__).resolve().parent.parent / "prompts" / VOICES_FILE_NAME

_CLIP_HINT = 'or pass a clip of your own: --voice CLIP.wav --voice-text "what the clip says"'


@dataclass(frozen=True)
class VoicePrompt:
    """A voice: ``text`` is spoken in the clip at ``audio_ref``, tagged as speaker ``speaker``.

    ``audio_ref`` is ``hf://OWNER/REPO/path/in/repo`` or an absolute local path.
    ``source`` says where the voice was defined (a voices.toml path, or "command line").
    """

    name: str
    speaker: int
    text: str
    audio_ref: str
    description: str = ""
    source: str = ""

    @property
    def is_hub_ref(self) -> bool:
        return self.audio_ref.startswith(HF_SCHEME)


def user_voices_file() -> Path:
    """The user's own voices table (``~/.config/csm-chat/voices.toml`` on Linux)."""
    import platformdirs

    return Path(platformdirs.user_config_dir("csm-chat")) / VOICES_FILE_NAME


def load_voice_table(path: str | Path) -> dict[str, VoicePrompt]:
    """Read one voices.toml (``[voices.NAME]`` tables); a missing file is an empty table."""
    path = Path(path).expanduser()
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise CSMError(f"{path} is not valid TOML ({error}); fix the file") from error
    tables = data.get("voices", {})
    if not isinstance(tables, dict):
        raise CSMError(f"{path}: `voices` must be a table of [voices.NAME] entries; fix the file")
    return {name: _voice_from_table(name, entry, path) for name, entry in tables.items()}


def list_voices() -> dict[str, VoicePrompt]:
    """Every named voice: the shipped table, then the user's (same name: the user's wins)."""
    voices = load_voice_table(SHIPPED_VOICES_FILE)
    voices.update(load_voice_table(user_voices_file()))
    return voices


def resolve_voice(name_or_path: str | Path, *, text: str | None = None,
                  speaker: int | None = None) -> VoicePrompt:
    """A voice by table name, or from a clip path (or ``hf://`` ref) with its transcript.

    For a clip, ``text`` is the transcript (else the clip's sibling ``.txt`` file is read);
    ``speaker`` overrides the speaker id (default: the table's, or 0 for a clip).
    """
    if speaker is not None and (not isinstance(speaker, int) or speaker < 0):
        raise CSMError(f"speaker id must be a non-negative integer, got {speaker!r}")
    if _looks_like_clip(name_or_path):
        return _voice_from_clip(str(name_or_path), text, speaker)
    name = str(name_or_path).strip()
    voices = list_voices()
    if name not in voices:
        known = ", ".join(sorted(voices)) or "none"
        raise CSMError(
            f"unknown voice {name!r}; known voices: {known} (from {SHIPPED_VOICES_FILE} and "
            f"{user_voices_file()}), {_CLIP_HINT}"
        )
    voice = voices[name]
    if text is not None:
        raise CSMError(
            f"--voice-text goes with a clip path, but {name!r} is a named voice with its own "
            f"transcript in {voice.source}; drop --voice-text or pass the clip path instead"
        )
    if speaker is not None and speaker != voice.speaker:
        voice = VoicePrompt(voice.name, speaker, voice.text, voice.audio_ref, voice.description,
                            voice.source)
    return voice


def load_voice_audio(prompt: VoicePrompt, *, download: bool = True) -> torch.Tensor:
    """The voice's clip as a (samples,) float32 tensor, 24 kHz mono.

    Hub refs are fetched with ``hf_hub_download`` (progress bar, Hugging Face cache); with
    ``download=False`` only the cache is used.
    """
    if prompt.is_hub_ref:
        path = _fetch_hub_clip(prompt, download)
    else:
        path = Path(prompt.audio_ref).expanduser()
        if not path.is_file():
            where = f"fix `audio` in {prompt.source}" if prompt.source.endswith(".toml") else "check the path"
            raise CSMError(f"voice {prompt.name!r}: clip {path} not found; {where}, {_CLIP_HINT}")
    return _read_clip_24k(path, prompt.name)


def load_voice_segment(prompt: VoicePrompt, *, download: bool = True):
    """The voice as a context ``Segment`` (speaker, transcript, 24 kHz audio)."""
    from csm_engine.tokens import Segment

    return Segment(speaker=prompt.speaker, text=prompt.text, audio=load_voice_audio(prompt, download=download))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _looks_like_clip(name_or_path: str | Path) -> bool:
    if isinstance(name_or_path, Path):
        return True
    value = str(name_or_path).strip()
    return (
        value.startswith(HF_SCHEME)
        or value.lower().endswith(AUDIO_SUFFIXES)
        or "/" in value
        or "\\" in value
        or value.startswith("~")
    )


def _voice_from_clip(ref: str, text: str | None, speaker: int | None) -> VoicePrompt:
    if ref.startswith(HF_SCHEME):
        _split_hub_ref(ref, name=ref)
        audio_ref, name = ref, Path(ref).stem
    else:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise CSMError(f"voice clip {path} not found; check the path or use a named voice (--voice NAME)")
        audio_ref, name = str(path.resolve()), path.stem
        if text is None:
            sidecar = path.with_suffix(".txt")
            if sidecar.is_file():
                text = sidecar.read_text(encoding="utf-8").strip()
    if text is None or not text.strip():
        raise CSMError(
            f"voice clip {ref} needs its transcript: pass --voice-text \"the words spoken in the clip\""
            " (or put them in a .txt file next to the clip)"
        )
    return VoicePrompt(name=name, speaker=0 if speaker is None else speaker, text=" ".join(text.split()),
                       audio_ref=audio_ref, source="command line")


def _voice_from_table(name: str, entry: object, path: Path) -> VoicePrompt:
    where = f"{path} [voices.{name}]"
    if not isinstance(entry, dict):
        raise CSMError(f"{where} must be a table with speaker, audio and text; fix the file")
    speaker = entry.get("speaker", 0)
    if not isinstance(speaker, int) or isinstance(speaker, bool) or speaker < 0:
        raise CSMError(f"{where}: speaker must be a non-negative integer, got {speaker!r}; fix the file")
    audio = entry.get("audio")
    if not isinstance(audio, str) or not audio.strip():
        raise CSMError(f"{where}: audio must name a clip (a path or hf://OWNER/REPO/FILE); fix the file")
    text = entry.get("text", "")
    if not isinstance(text, str):
        raise CSMError(f"{where}: text must be the clip's transcript as a string; fix the file")
    audio = audio.strip()
    if audio.startswith(HF_SCHEME):
        _split_hub_ref(audio, name=where)
    else:
        clip = Path(audio).expanduser()
        audio = str(clip if clip.is_absolute() else (path.parent / clip).resolve())
    description = entry.get("description", "")
    return VoicePrompt(name=name, speaker=speaker, text=" ".join(text.split()), audio_ref=audio,
                       description=str(description), source=str(path))


def _split_hub_ref(ref: str, *, name: str) -> tuple[str, str]:
    """``hf://OWNER/REPO/path/in/repo`` -> (``OWNER/REPO``, ``path/in/repo``)."""
    parts = ref[len(HF_SCHEME):].strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise CSMError(f"{name}: {ref!r} is not a hub clip reference; write hf://OWNER/REPO/path/to/clip.wav")
    return "/".join(parts[:2]), "/".join(parts[2:])


def _fetch_hub_clip(prompt: VoicePrompt, download: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    repo_id, filename = _split_hub_ref(prompt.audio_ref, name=f"voice {prompt.name!r}")
    from csm_engine.weights import hub_reachable

    try:
        try:
            return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=True))
        except LocalEntryNotFoundError:
            if not download or not hub_reachable():
                raise
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except GatedRepoError as error:
        reason = "the repo is gated and this account has no access"
        cause: Exception = error
    except LocalEntryNotFoundError as error:
        reason = "not in the Hugging Face cache" if not download else "the hub is unreachable and it is not cached"
        cause = error
    except Exception as error:  # noqa: BLE001 - every other hub failure has the same fixes
        reason = first_line(error)
        cause = error
    raise CSMError(
        f"voice {prompt.name!r}: cannot get {filename} from {repo_id} ({reason}); accept the repo's "
        f"terms on huggingface.co, run `hf auth login`, then `hf download {repo_id} {filename}`, "
        f"or point `audio` at a local copy in {prompt.source or 'voices.toml'}, {_CLIP_HINT}"
    ) from cause


def _read_clip_24k(path: Path, voice_name: str) -> torch.Tensor:
    from csm_engine.audio_io import load_audio

    try:
        return load_audio(path, sample_rate=SAMPLE_RATE)
    except CSMError as error:
        raise CSMError(f"voice {voice_name!r}: {error}") from error

