"""The HTTP API (FastAPI): OpenAI's speech endpoint and model list, plus CSM's voices, codes and health.

    POST /v1/audio/speech            text (+ voice, context, session) -> streamed wav / pcm / sse
    GET  /v1/models, /v1/models/ID   the one model this server speaks with
    GET  /v1/audio/voices            the named voices
    POST /v1/audio/encode            a clip -> its Mimi codes (to send as context later)
    GET  /v1/audio/responses/ID      a finished response's codes
    GET  /v1/csm/info, /v1/csm/tokenizer.json   what a client needs to build the same prompt
    GET  /health                     load and state (never behind the API key)
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator

import anyio
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from csm_engine.batch.engine import EngineBusy
from csm_engine.batch.events import Admitted, AudioChunk, Failed, Finished, FrameSampled, Utterance
from csm_engine.config import FRAME_MS, SAMPLE_RATE
from csm_engine.serve.audio import wav_header
from csm_engine.serve.errors import APIError, error_response, install_handlers, validation_message
from csm_engine.serve.schemas import EncodeRequest, SpeechRequest
from csm_engine.serve.speech import EventBridge, SpeechService
from csm_engine.serve.wire import (
    AUDIO_DONE,
    CONTEXT_KEPT_HEADER,
    ERROR_EVENT,
    PROMPT_ROWS_HEADER,
    RESPONSE_ID_HEADER,
    REUSED_ROWS_HEADER,
    SAMPLE_RATE_HEADER,
    SESSION_HEADER,
    audio_delta,
    encode_codes,
    from_pcm16,
    pcm16,
    sse_event,
)

MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm"}
CREATED = int(time.time())


def create_app(service: SpeechService) -> FastAPI:
    """The app around a running service (its engine started by the caller)."""
    app = FastAPI(title="csm-serve", docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)
    config = service.config
    bridge: dict[str, EventBridge] = {}

    def events_bridge() -> EventBridge:
        loop = asyncio.get_running_loop()
        if "loop" not in bridge or bridge["loop"].loop is not loop:
            bridge["loop"] = EventBridge(loop)
        return bridge["loop"]

    expected_authorization = f"Bearer {config.api_key}".encode() if config.api_key is not None else b""

    async def authorized(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "").encode("latin-1")  # the header's own bytes
        if not hmac.compare_digest(given, expected_authorization):  # constant time: no key guessing by timing
            raise APIError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY` with the "
                           "key csm-serve was started with", code="invalid_api_key")

    guarded = [Depends(authorized)]

    @app.get("/health")
    async def health() -> dict:
        engine, stats = service.engine, service.engine.stats
        uptime = time.monotonic() - stats.started_at
        return {"status": "ok" if engine.running else "stopped", "model": config.model_id,
                "device": str(engine.device), "active_streams": engine.active, "queued": engine.queued,
                "max_streams": engine.options.max_streams, "cache_slots": engine.options.slots,
                "sessions": len(engine.slots.sessions()), "frames": stats.frames,
                "frames_per_s": round(stats.frames / uptime, 2) if uptime > 0 else 0.0,
                "finished": stats.finished, "engine_failures": stats.failures, "last_error": stats.last_error,
                "uptime_s": round(uptime, 1)}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(config.model_id)]}

    @app.get("/v1/models/{model_id}", dependencies=guarded)
    async def model(model_id: str) -> dict:
        _check_model(model_id, config.model_id, param=None)
        return _model_card(model_id)

    @app.get("/v1/audio/voices", dependencies=guarded)
    async def voices() -> dict:
        return {"object": "list", "data": service.voices.describe()}

    @app.get("/v1/csm/info", dependencies=guarded)
    async def info() -> dict:
        cfg = service.generator.config
        return {"model": config.model_id, "max_seq_len": cfg.max_seq_len, "num_codebooks": cfg.audio_num_codebooks,
                "sample_rate": SAMPLE_RATE, "frame_ms": FRAME_MS, "max_topk": service.engine.options.max_topk,
                "limits": config.limits.__dict__}

    @app.get("/v1/csm/tokenizer.json", dependencies=guarded)
    async def tokenizer() -> PlainTextResponse:
        return PlainTextResponse(service.generator.tokenizer.to_json(), media_type="application/json")

    @app.post("/v1/audio/encode", dependencies=guarded)
    async def encode(request: Request) -> dict:
        body = _parse(EncodeRequest, await _read_body(request, config.limits.max_body_bytes))
        codes = await anyio.to_thread.run_sync(service.encode, body.audio)
        return {"object": "audio.codes", "frames": codes.shape[1], "codes": encode_codes(codes)}

    @app.get("/v1/audio/responses/{response_id}", dependencies=guarded)
    async def response_codes(response_id: str) -> dict:
        stored = service.responses.get(response_id)
        if stored is None:
            raise APIError(404, f"response {response_id!r} is not held by this server (it keeps the last "
                           f"{service.responses.capacity})", code="unknown_response")
        return {"id": response_id, "object": "audio.response", "speaker": stored.speaker, "text": stored.text,
                "frames": stored.codes.shape[1], "codes": encode_codes(stored.codes)}

    @app.post("/v1/audio/speech", dependencies=guarded)
    async def speech(request: Request) -> Response:
        body = _parse(SpeechRequest, await _read_body(request, config.limits.max_body_bytes))
        session = _check_speech(body, request, service)
        prompt = await anyio.to_thread.run_sync(service.build_prompt, body)
        queue: asyncio.Queue = asyncio.Queue()
        try:
            utterance = service.submit(prompt, body, session, events_bridge().sink(queue))
        except EngineBusy as error:
            raise APIError(429, str(error), code="rate_limit_exceeded", kind="rate_limit_error") from None
        admitted = await _admission(queue, utterance, request)
        if admitted is None:
            return Response(status_code=499)  # the client left while its request waited
        response_id = service.new_response_id()
        headers = {RESPONSE_ID_HEADER: response_id, PROMPT_ROWS_HEADER: str(admitted.prompt_rows),
                   REUSED_ROWS_HEADER: str(admitted.reused_rows), CONTEXT_KEPT_HEADER: str(admitted.context_kept),
                   SAMPLE_RATE_HEADER: str(SAMPLE_RATE), "cache-control": "no-cache"}
        if session is not None:
            headers[SESSION_HEADER] = session
        stream = _speech_stream(queue, utterance, body, response_id, service)
        media = "text/event-stream" if body.stream_format == "sse" else MEDIA_TYPES[body.response_format]
        return StreamingResponse(stream, media_type=media, headers=headers)

    return app


def _model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": CREATED, "owned_by": "csm-serve"}


def _check_model(given: str, served: str, param: str | None = "model") -> None:
    if given != served:
        raise APIError(404, f"the model `{given}` does not exist here; this server serves `{served}` (GET /v1/models)",
                       param=param, code="model_not_found")


def _check_speech(body: SpeechRequest, request: Request, service: SpeechService) -> str | None:
    """400 for what CSM cannot do; returns the session (body field or X-CSM-Session header)."""
    limits = service.config.limits
    _check_model(body.model, service.config.model_id)
    if body.response_format not in MEDIA_TYPES:
        raise APIError(400, f"response_format {body.response_format!r} is not supported by csm-serve; use wav or pcm "
                       "(16-bit mono at 24 kHz)", param="response_format", code="unsupported_value")
    if body.stream_format not in ("audio", "sse"):
        raise APIError(400, f"stream_format {body.stream_format!r} is unknown; use audio or sse",
                       param="stream_format", code="unsupported_value")
    if body.stream_format == "sse" and body.response_format != "pcm":
        raise APIError(400, "stream_format sse carries base64 pcm: set response_format to pcm",
                       param="response_format", code="unsupported_value")
    if body.speed != 1.0:
        raise APIError(400, f"speed {body.speed} is not supported: CSM speaks at its own pace; send 1.0 or leave "
                       "it out", param="speed", code="unsupported_value")
    if body.instructions:
        raise APIError(400, "instructions are not supported: CSM follows the voice clip and the context audio; "
                       "use voice or context instead", param="instructions", code="unsupported_value")
    if len(body.input) > limits.max_input_chars:
        raise APIError(400, f"input is {len(body.input)} characters; at most {limits.max_input_chars} per request "
                       "(split the text into sentences)", param="input", code="string_above_max_length")
    if len(body.context) > limits.max_context_segments:
        raise APIError(400, f"context has {len(body.context)} segments; at most {limits.max_context_segments} "
                       "(drop the oldest)", param="context", code="context_too_long")
    if body.max_audio_ms is not None and body.max_audio_ms > limits.max_audio_ms:
        raise APIError(400, f"max_audio_ms {body.max_audio_ms} is above this server's limit of "
                       f"{limits.max_audio_ms}", param="max_audio_ms", code="unsupported_value")
    max_topk = service.engine.options.max_topk
    if body.topk > max_topk:
        raise APIError(400, f"topk {body.topk} is above this server's limit of {max_topk}", param="topk",
                       code="unsupported_value")
    header = request.headers.get(SESSION_HEADER)
    if header is not None and body.session is not None and header != body.session:
        raise APIError(400, f"session {body.session!r} and header {SESSION_HEADER} {header!r} disagree; send one",
                       param="session", code="invalid_value")
    session = body.session or header
    if session is not None and (len(session) > limits.max_session_chars or not session.strip()):
        raise APIError(400, f"session must be 1-{limits.max_session_chars} characters", param="session",
                       code="invalid_value")
    return session


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {int(length)} bytes is above this server's limit of {limit}; send "
                       "shorter context audio (or codes from /v1/audio/encode)", code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"request body is above this server's limit of {limit} bytes", code="request_too_large")
        parts.append(part)
    return b"".join(parts)


def _parse(model, raw: bytes):
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        message, param = validation_message(error.errors()[0])
        raise APIError(400, message, param=param, code="invalid_value") from None


async def _admission(queue: asyncio.Queue, utterance: Utterance, request: Request) -> Admitted | None:
    """Wait until the engine gives the utterance a stream (None if the client leaves first)."""
    while True:
        try:
            event = await asyncio.wait_for(queue.get(), timeout=0.25)
        except TimeoutError:
            if await request.is_disconnected():
                utterance.cancel()
                return None
            continue
        if isinstance(event, Admitted):
            return event
        if isinstance(event, Failed):
            raise APIError(503, f"speech generation failed: {event.message}", code="engine_error")
        if isinstance(event, Finished):  # cancelled before admission
            return None


async def _speech_stream(queue: asyncio.Queue, utterance: Utterance, body: SpeechRequest, response_id: str,
                         service: SpeechService) -> AsyncIterator[bytes]:
    """The response body as frames decode; a client that goes away cancels the utterance at once."""
    sse = body.stream_format == "sse"
    heard, codes_since = [], []
    try:
        if body.response_format == "wav" and not sse:
            yield wav_header()
        while True:
            event = await queue.get()
            if isinstance(event, FrameSampled):
                codes_since.append(event.codes)
            elif isinstance(event, AudioChunk):
                data = pcm16(event.pcm)
                heard.append(from_pcm16(data))
                yield _sse_delta(data, codes_since) if sse else data
                codes_since = []
            elif isinstance(event, Finished):
                if sse:
                    if codes_since:
                        yield _sse_delta(b"", codes_since)
                    yield sse_event({"type": AUDIO_DONE, "response_id": response_id, "frames": event.frames,
                                "reason": event.reason, "usage": {"input_tokens": 0, "output_tokens": event.frames,
                                                                  "total_tokens": event.frames}})
                speaker = body.speaker if body.speaker is not None else service.voices.speaker(body.voice_name)
                await anyio.to_thread.run_sync(service.remember, response_id, speaker, body.input, event.codes, heard)
                return
            elif isinstance(event, Failed):
                if sse:
                    error = {"message": f"speech generation failed: {event.message}", "type": "server_error"}
                    yield sse_event({"type": ERROR_EVENT, "error": error})
                return
    finally:
        if not utterance.done.is_set():
            utterance.cancel()  # the client disconnected: free the stream now


def _sse_delta(audio: bytes, codes: list) -> bytes:
    return sse_event(audio_delta(audio, torch.stack(codes, dim=1) if codes else None))


__all__ = ["create_app", "error_response"]
