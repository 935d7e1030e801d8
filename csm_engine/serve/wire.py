"""csm-serve's wire format, written once for the server (``csm_engine.serve``) and its clients.

What goes over HTTP besides OpenAI's own fields: Mimi codes as base64 of little-endian int16
(frame by frame, 32 per frame), 16-bit PCM, the session header and the response headers, and
the server-sent events of ``stream_format: sse``. No FastAPI or pydantic here: the agent's
``--tts-url`` client (``agent/speak/remote_voice.py``) imports this without the server's
dependencies.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

SESSION_HEADER = "X-CSM-Session"  # names the conversation whose backbone cache the server keeps
API_KEY_ENV = "CSM_SERVE_API_KEY"  # the bearer token, on both sides
# Response headers of POST /v1/audio/speech (HTTP header names are case-insensitive).
RESPONSE_ID_HEADER = "x-csm-response-id"
PROMPT_ROWS_HEADER = "x-csm-prompt-rows"
REUSED_ROWS_HEADER = "x-csm-reused-rows"
CONTEXT_KEPT_HEADER = "x-csm-context-kept"
SAMPLE_RATE_HEADER = "x-csm-sample-rate"
# Server-sent event types.
AUDIO_DELTA = "speech.audio.delta"
AUDIO_DONE = "speech.audio.done"
ERROR_EVENT = "error"

MAX_CODE = 2047  # Mimi decodes codes 0..2047


class WireError(ValueError):
    """Bytes that do not follow the format; ``code`` is the API's error code for them."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def b64decode(text: str, name: str = "data") -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"{name} is not valid base64", "invalid_base64") from None


def pcm16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] -> little-endian 16-bit PCM."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def from_pcm16(data: bytes) -> np.ndarray:
    """The float32 samples a client reads back from 16-bit PCM bytes (int16 / 32768, as libsndfile does)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def encode_codes(codes: Tensor) -> str:
    """Mimi codes (32, frames) -> base64 of little-endian int16, frame by frame (frames, 32)."""
    return base64.b64encode(codes.detach().cpu().T.contiguous().numpy().astype("<i2").tobytes()).decode("ascii")


def decode_codes(text: str, num_codebooks: int = 32, name: str = "codes") -> Tensor:
    """The inverse of ``encode_codes``, checked: (32, frames) long; ``WireError`` naming ``name`` otherwise."""
    import torch

    raw = b64decode(text, name)
    if not raw or len(raw) % (2 * num_codebooks):
        raise WireError(f"{name} must be base64 of int16 codes, {num_codebooks} per frame ({len(raw)} bytes is not "
                        "a whole number of frames)", "invalid_codes")
    codes = np.frombuffer(raw, dtype="<i2").reshape(-1, num_codebooks)
    if codes.min() < 0 or codes.max() > MAX_CODE:
        raise WireError(f"{name}: codes must lie in 0..{MAX_CODE}", "invalid_codes")
    return torch.from_numpy(codes.astype(np.int64)).T.contiguous()


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload)}\n\n".encode()


def audio_delta(audio: bytes, codes: Tensor | None = None) -> dict[str, Any]:
    """A ``speech.audio.delta`` event: PCM16 bytes, and the codes (32, frames) sampled since the last one."""
    payload: dict[str, Any] = {"type": AUDIO_DELTA, "audio": base64.b64encode(audio).decode("ascii")}
    if codes is not None and codes.shape[-1]:
        payload["codes"] = encode_codes(codes)
    return payload


def parse_sse_line(line: str) -> dict[str, Any] | None:
    """The event a ``data: {...}`` line carries; None for other lines (comments, blank keep-alives)."""
    if not line.startswith("data: "):
        return None
    try:
        event = json.loads(line[6:])
    except ValueError:
        raise WireError(f"a server-sent event is not JSON: {line[:60]!r}", "invalid_event") from None
    if not isinstance(event, dict):
        raise WireError(f"a server-sent event is not a JSON object: {line[:60]!r}", "invalid_event")
    return event


__all__ = ["API_KEY_ENV", "AUDIO_DELTA", "AUDIO_DONE", "ERROR_EVENT", "MAX_CODE", "SESSION_HEADER", "WireError",
           "audio_delta", "b64decode", "decode_codes", "encode_codes", "from_pcm16", "parse_sse_line", "pcm16",
           "sse_event"]
