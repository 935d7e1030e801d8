"""What a csm-serve instance accepts: its model name, limits and authentication."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Request limits; beyond them the server answers 4xx instead of trying."""

    max_input_chars: int = 4096  # OpenAI's limit for `input`
    max_context_segments: int = 64
    max_context_clip_s: float = 120.0  # one context clip
    max_body_bytes: int = 32 * 2**20  # a request body (base64 context audio included)
    max_audio_ms: int = 60_000  # cap on one utterance's audio
    default_audio_ms: int = 30_000
    max_session_chars: int = 128


@dataclass(frozen=True)
class ServerConfig:
    model_id: str = "csm-1b"  # the name clients pass as `model` (GET /v1/models lists it)
    api_key: str | None = None  # bearer token required on every request but /health; None: no auth
    limits: Limits = Limits()
    response_store: int = 2048  # finished responses whose codes stay referable by id
