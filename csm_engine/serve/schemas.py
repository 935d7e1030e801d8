"""Request bodies. ``SpeechRequest`` is OpenAI's speech request plus CSM's context, speaker and session."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SESSION_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


class VoiceRef(BaseModel):
    """OpenAI's custom-voice form: ``{"id": "NAME"}``."""

    model_config = ConfigDict(extra="forbid")
    id: str


class ContextItem(BaseModel):
    """One earlier segment of the conversation: who said what, and how it sounded (at most one of the three)."""

    model_config = ConfigDict(extra="forbid")
    speaker: int = Field(0, ge=0, le=1000)
    text: str = Field(..., max_length=4096)
    audio: str | None = None  # base64 of a WAV/FLAC/OGG file
    codes: str | None = None  # base64 of int16 Mimi codes, 32 per frame (as /v1/audio/encode returns)
    response_id: str | None = Field(None, max_length=64)  # a response of this server (its codes)

    @model_validator(mode="after")
    def _one_source(self) -> ContextItem:
        given = [name for name in ("audio", "codes", "response_id") if getattr(self, name) is not None]
        if len(given) > 1 and set(given) != {"audio", "codes"}:
            raise ValueError(f"give at most one of audio, codes and response_id (got {', '.join(given)})")
        return self


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # OpenAI's fields
    model: str
    input: str = Field(..., min_length=1)
    voice: str | VoiceRef = "none"
    instructions: str | None = None
    response_format: str = "wav"
    speed: float = 1.0
    stream_format: str = "audio"
    # CSM's
    speaker: int | None = Field(None, ge=0, le=1000)
    context: list[ContextItem] = Field(default_factory=list)
    session: str | None = Field(None, pattern=SESSION_PATTERN)
    seed: int | None = Field(None, ge=0, le=2**62)
    temperature: float = Field(0.9, ge=0.0, le=2.0)
    topk: int = Field(50, ge=1)
    max_audio_ms: int | None = Field(None, ge=80)
    chunk_frames: int = Field(1, ge=1, le=25)

    @field_validator("input")
    @classmethod
    def _has_words(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("input is blank; send the text to speak")
        return value

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


class EncodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    audio: str  # base64 of a WAV/FLAC/OGG file
