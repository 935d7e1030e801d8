"""Requests -> prompts -> the batch engine, and the engine's events back onto the event loop.

``SpeechService`` owns what a request needs besides HTTP: the voices, the prompt (voice clip,
then the context, then the text; context audio encoded with Mimi once and remembered by
content), the finished responses whose codes later requests may name, and the engine.
Building a prompt may run Mimi: it is blocking work for a worker thread, never the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from csm_engine.batch.engine import BatchEngine
from csm_engine.batch.events import StreamOptions, Utterance
from csm_engine.errors import CSMError
from csm_engine.prompt import Prompt, assemble_prompt, segment_rows
from csm_engine.serve.audio import request_audio, request_codes
from csm_engine.serve.config import ServerConfig
from csm_engine.serve.errors import APIError
from csm_engine.serve.schemas import SpeechRequest
from csm_engine.serve.serial import SerialEngine
from csm_engine.tokens import Segment
from csm_engine.voices import VoicePrompt, load_voice_segment

NO_VOICE = "none"


class VoiceTable:
    """The server's named voices (a voices.toml), each loaded as a context segment on first use."""

    def __init__(self, voices: dict[str, VoicePrompt]):
        self.voices = voices
        self._loaded: dict[str, Segment] = {}
        self._lock = threading.Lock()

    def describe(self) -> list[dict]:
        listed = [{"id": NO_VOICE, "speaker": 0,
                   "description": "no voice clip: the model picks a voice (it may drift)"}]
        listed += [{"id": v.name, "speaker": v.speaker, "description": v.description, "text": v.text}
                   for v in sorted(self.voices.values(), key=lambda v: v.name)]
        return listed

    def speaker(self, name: str) -> int:
        return self.voices[name].speaker if name in self.voices else 0

    def segment(self, name: str) -> Segment | None:
        """The voice's clip as a segment (None for ``none``); 400 for a name this server does not know."""
        if name == NO_VOICE:
            return None
        if name not in self.voices:
            known = ", ".join([NO_VOICE, *sorted(self.voices)])
            raise APIError(400, f"unknown voice {name!r}; this server knows: {known} (GET /v1/audio/voices)",
                           param="voice", code="unknown_voice")
        with self._lock:
            if name not in self._loaded:
                try:
                    self._loaded[name] = load_voice_segment(self.voices[name])
                except CSMError as error:
                    raise APIError(503, f"voice {name!r} cannot be loaded on the server: {error}",
                                   param="voice", code="voice_unavailable") from None
            return self._loaded[name]


@dataclass(frozen=True)
class StoredResponse:
    speaker: int
    text: str
    codes: torch.Tensor  # (32, frames) int16


class ResponseStore:
    """The last ``capacity`` finished responses, by id (their codes: a few kB each)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response_id: str, item: StoredResponse) -> None:
        with self._lock:
            self._items[response_id] = item
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            return self._items.get(response_id)


class EventBridge:
    """Hands engine events (engine thread) to per-request asyncio queues: at most one loop wake-up at a time.

    With hundreds of streams a tick sends hundreds of events; waking the event loop once per
    batch instead of once per event keeps the engine thread's time on the model.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._waiting: deque[tuple[asyncio.Queue, object]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def sink(self, queue: asyncio.Queue) -> Callable[[object], None]:
        def put(event: object) -> None:
            with self._lock:
                self._waiting.append((queue, event))
                if self._scheduled:
                    return
                self._scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: the server is going down, nobody listens
                pass

        return put

    def _drain(self) -> None:
        with self._lock:
            items, self._waiting = self._waiting, deque()
            self._scheduled = False
        for queue, event in items:
            queue.put_nowait(event)


class SpeechService:
    """Everything a speech request needs besides HTTP (see the module docstring)."""

    def __init__(self, engine: BatchEngine | SerialEngine, voices: VoiceTable, config: ServerConfig):
        self.engine, self.voices, self.config = engine, voices, config
        self.generator = engine.generator
        self.responses = ResponseStore(config.response_store)
        self._lock = threading.Lock()  # the generator's remembered codes and Mimi encoder

    # -- prompts (worker threads) -------------------------------------------------------------

    def build_prompt(self, request: SpeechRequest) -> Prompt:
        """The voice clip, the context, then the text; 400 when it does not fit the window."""
        limits = self.config.limits
        voice = self.voices.segment(request.voice_name)
        segments: list[Segment] = [] if voice is None else [voice]
        codes_of: dict[int, torch.Tensor] = {}
        for i, item in enumerate(request.context):
            param = f"context.{i}"
            audio, codes = None, None
            if item.codes is not None:
                codes = request_codes(item.codes, f"{param}.codes", self.generator.config.audio_num_codebooks)
            elif item.response_id is not None:
                stored = self.responses.get(item.response_id)
                if stored is None:
                    raise APIError(400, f"{param}.response_id {item.response_id!r} is not held by this server "
                                   f"(it keeps the last {self.responses.capacity} responses); "
                                   "send its audio or codes instead",
                                   param=f"{param}.response_id", code="unknown_response")
                codes = stored.codes.long()
            if item.audio is not None:
                audio = request_audio(item.audio, f"{param}.audio", limits.max_context_clip_s)
            segment = Segment(item.speaker, item.text, audio)
            if codes is not None:
                codes_of[id(segment)] = codes
            segments.append(segment)
        speaker = request.speaker if request.speaker is not None else self.voices.speaker(request.voice_name)
        max_ms = request.max_audio_ms or limits.default_audio_ms
        rows: list[int] = []

        def frames_of(segment: Segment):
            codes = codes_of.get(id(segment))
            if codes is None:
                codes = self.generator.segment_codes(segment)  # Mimi, once per distinct clip
            tokens, mask = segment_rows(self.generator.tokenizer, segment, codes,
                                        self.generator.config.audio_num_codebooks)
            rows.append(tokens.shape[0])
            return tokens, mask

        with self._lock:
            try:
                prompt = assemble_prompt(self.generator.tokenizer, self.generator.config, frames_of, request.input,
                                         speaker, segments, max_ms)
            except CSMError as error:
                raise APIError(400, str(error), param="input", code="input_too_long") from None
        if prompt.context_kept < len(segments):
            window = self.generator.config.max_seq_len
            text_rows = prompt.tokens.shape[0] - sum(rows[len(segments) - prompt.context_kept:])
            raise APIError(400, f"context too long: the voice and context take {sum(rows)} rows, the "
                           f"{window}-position window leaves {window - text_rows - prompt.max_frames} after the text "
                           "and its audio budget; drop the oldest context segments (or lower max_audio_ms)",
                           param="context", code="context_too_long")
        return prompt

    def encode(self, audio_b64: str) -> torch.Tensor:
        """Mimi codes (32, frames) of a clip (remembered by content, so it is never encoded twice)."""
        audio = request_audio(audio_b64, "audio", self.config.limits.max_context_clip_s)
        with self._lock:
            return self.generator.segment_codes(Segment(0, "", audio))

    def remember(self, response_id: str, speaker: int, text: str, codes: torch.Tensor | None,
                 heard: Sequence[np.ndarray]) -> None:
        """Keep a finished response's codes by id, and by the content of the audio the client got.

        A client that sends that audio back as context then costs no Mimi encoding.
        """
        if codes is None:
            return
        self.responses.put(response_id, StoredResponse(speaker, text, codes.to(torch.int16)))
        audio = np.concatenate(heard) if heard else np.zeros(0, np.float32)
        frames = codes.shape[1]
        samples = self.generator.codec.samples_per_frame
        if len(audio) in (frames * samples, (frames + 1) * samples):
            with self._lock:
                self.generator.remember_codes(torch.from_numpy(audio), codes)

    # -- the engine ----------------------------------------------------------------------------

    def submit(self, prompt: Prompt, request: SpeechRequest, session: str | None,
               sink: Callable[[object], None]) -> Utterance:
        options = StreamOptions(temperature=request.temperature, topk=request.topk, seed=request.seed,
                                chunk_frames=request.chunk_frames, session=session,
                                frame_events=request.stream_format == "sse")
        return self.engine.submit(prompt, options, sink)

    @staticmethod
    def new_response_id() -> str:
        return "speech-" + uuid.uuid4().hex[:24]


__all__ = ["EventBridge", "NO_VOICE", "ResponseStore", "SpeechService", "StoredResponse", "VoiceTable"]
