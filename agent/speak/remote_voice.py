"""The agent's voice on a remote csm-serve (``--tts-url``): the same sentences, context and barge-in.

``RemoteCSM`` stands in for the in-process ``Generator`` where ``ReplySynthesizer`` uses one: it
builds every prompt here, with the server's own tokenizer and the Mimi codes of every context
clip (codes the server streamed back for the agent's sentences; ``/v1/audio/encode`` once for
other clips), so context budgets and trimming are exactly the in-process ones. It sends the
context as codes and the conversation's session id (the server keeps the conversation's cache),
and streams the sentence back as server-sent events: PCM and each frame's codes.

``RemoteSynthesizer`` is ``ReplySynthesizer`` on a ``RemoteCSM``: the same
``stream(text, speaker, earlier, *, cancel, seed, result)``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import torch

from agent.errors import AgentError
from agent.speak.synthesis import ReplySynthesizer, SynthesisOptions
from csm_engine.errors import CSMError, first_line
from csm_engine.prompt import ClipCodes, Prompt, PromptBuilder
from csm_engine.serve import wire
from csm_engine.tokens import Segment, TextTokenizer


@dataclass(frozen=True)
class RemoteConfig:
    """What prompt building needs of the served model's config."""

    max_seq_len: int
    audio_num_codebooks: int

    @property
    def frame_width(self) -> int:
        return self.audio_num_codebooks + 1


def server_root(url: str) -> str:
    """``http://host:port``, ``.../v1`` or ``.../v1/audio/speech`` -> ``http://host:port`` (what the paths hang off)."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise AgentError(f"--tts-url must start with http:// or https://, got {url!r}")
    return url.removesuffix("/audio/speech").removesuffix("/v1")


class RemoteCSM(PromptBuilder):
    """A csm-serve with the Generator's prompt side (``PromptBuilder``, so prompts match) and ``stream``."""

    sample_rate = 24_000
    max_codes = 512  # clips whose codes are kept (by content), as the Generator keeps them

    def __init__(self, url: str, *, api_key: str | None = None, session: str | None = None,
                 timeout_s: float = 60.0, connect_timeout_s: float = 5.0):
        self.url = server_root(url)
        self.session = session or f"csm-chat-{uuid.uuid4().hex[:16]}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers,
                                  timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s))
        info = self._get_json("/v1/csm/info")
        self.model_name = str(info["model"])
        self.config = RemoteConfig(int(info["max_seq_len"]), int(info["num_codebooks"]))
        self.max_topk = int(info.get("max_topk", 50))
        try:
            self.tokenizer = TextTokenizer.from_json(self._request("GET", "/v1/csm/tokenizer.json").text)
        except CSMError as error:
            raise AgentError(f"csm-serve at {self.url} sent an unreadable tokenizer: {error}") from None
        self.clip_codes = ClipCodes(self.max_codes)
        self.last_response_id: str | None = None
        self.last_prompt_rows = 0
        self.last_reused_rows = 0  # prompt rows the server's cache already held (the session at work)

    # -- HTTP ---------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise AgentError(f"cannot reach csm-serve at {self.url}: {first_line(error)} (start it, or fix "
                             "--tts-url)") from None
        if response.status_code >= 400:
            raise _status_error(self.url, response)
        return response

    def _get_json(self, path: str) -> dict:
        try:
            return self._request("GET", path).json()
        except ValueError:
            raise AgentError(f"{self.url} answered {path} with something other than JSON; is --tts-url a "
                             "csm-serve?") from None

    def close(self) -> None:
        self._http.close()

    # -- the Generator's prompt side --------------------------------------------------------------

    def segment_codes(self, segment: Segment) -> torch.Tensor | None:
        """Mimi codes (32, frames) of a segment's audio: known ones, else encoded by the server once."""
        if segment.audio is None or segment.audio.numel() == 0:
            return None
        return self.clip_codes.get_or_encode(segment.audio, self._encode)

    def _encode(self, audio: torch.Tensor) -> torch.Tensor:
        """The server's Mimi codes (32, frames) of a clip (``/v1/audio/encode``)."""
        wav = io.BytesIO()
        import soundfile

        soundfile.write(wav, audio.detach().float().cpu().numpy(), self.sample_rate, subtype="FLOAT", format="WAV")
        answer = self._request("POST", "/v1/audio/encode",
                               json={"audio": base64.b64encode(wav.getvalue()).decode("ascii")}).json()
        return self._codes_from(answer["codes"])

    def _codes_from(self, text: str) -> torch.Tensor:
        try:
            return wire.decode_codes(text, self.config.audio_num_codebooks)
        except wire.WireError as error:
            raise CSMError(f"csm-serve at {self.url} sent unreadable codes: {error}") from None

    def remember_codes(self, audio: torch.Tensor, codes: torch.Tensor) -> None:
        """Record that ``audio`` is the decoding of ``codes`` (so it goes back to the server as codes)."""
        self.clip_codes.put(audio, codes)

    # -- speaking ------------------------------------------------------------------------------------

    def stream(self, text: str, speaker: int, context: Sequence[Segment] = (), *, max_audio_length_ms: int = 20_000,
               temperature: float = 0.9, topk: int = 50, seed: int | None = None, chunk_frames: int = 2,
               cancel: threading.Event | None = None, on_frame: Callable[[int, torch.Tensor], None] | None = None,
               **_unused: Any) -> Iterator[np.ndarray]:
        """Yield float32 PCM chunks (24 kHz) as the server decodes them; ``cancel`` closes the stream at once.

        ``on_frame(index, codes)`` gets every sampled frame's codes (the end frame excluded).
        """
        prompt = self.build_prompt(text, speaker, context, max_audio_length_ms)
        body = {"model": self.model_name, "input": text, "voice": "none", "speaker": speaker,
                "response_format": "pcm", "stream_format": "sse", "temperature": temperature, "topk": topk,
                "max_audio_ms": max_audio_length_ms, "chunk_frames": chunk_frames,
                "context": [self._context_item(s) for s in context]}
        if seed is not None:
            body["seed"] = seed
        cancel = cancel or threading.Event()
        finished = threading.Event()
        request = self._http.build_request("POST", "/v1/audio/speech", json=body,
                                           headers={wire.SESSION_HEADER: self.session})
        holder: dict[str, httpx.Response] = {}
        # Barge-in must not wait for the next chunk (or for a queued request's headers): closing
        # the connection from here makes the server drop the utterance at its next frame.
        watcher = threading.Thread(target=_close_on_cancel, args=(cancel, finished, holder),
                                   name="csm-remote-cancel", daemon=True)
        watcher.start()
        try:
            try:
                response = self._http.send(request, stream=True)
            except httpx.HTTPError as error:
                if cancel.is_set():
                    return
                raise CSMError(f"cannot reach csm-serve at {self.url}: {first_line(error)}") from None
            holder["response"] = response
            if cancel.is_set():
                return
            if response.status_code >= 400:
                response.read()
                raise _status_error(self.url, response, CSMError)
            self._check_prompt(response, prompt)
            yield from self._events(response, cancel, on_frame)
        finally:
            finished.set()
            if "response" in holder:
                holder["response"].close()

    def _context_item(self, segment: Segment) -> dict:
        item: dict[str, Any] = {"speaker": segment.speaker, "text": segment.text}
        codes = self.segment_codes(segment)
        if codes is not None:
            item["codes"] = wire.encode_codes(codes)
        return item

    def _check_prompt(self, response: httpx.Response, prompt: Prompt) -> None:
        self.last_response_id = response.headers.get(wire.RESPONSE_ID_HEADER)
        rows = int(response.headers.get(wire.PROMPT_ROWS_HEADER, "-1"))
        self.last_prompt_rows = rows
        self.last_reused_rows = int(response.headers.get(wire.REUSED_ROWS_HEADER, "0"))
        if rows != prompt.tokens.shape[0]:
            raise CSMError(f"csm-serve at {self.url} built a prompt of {rows} rows where this client built "
                           f"{prompt.tokens.shape[0]}; client and server disagree on the model (update one of them)")

    def _events(self, response: httpx.Response, cancel: threading.Event,
                on_frame: Callable[[int, torch.Tensor], None] | None) -> Iterator[np.ndarray]:
        frame_index = 0
        try:
            for line in response.iter_lines():
                if cancel.is_set():
                    return
                event = self._event(line)
                kind = event and event.get("type")
                if kind == wire.AUDIO_DELTA:
                    if event.get("codes") and on_frame is not None:
                        for codes in self._codes_from(event["codes"]).T:
                            on_frame(frame_index, codes.clone())
                            frame_index += 1
                    pcm = wire.from_pcm16(base64.b64decode(event["audio"]))
                    if len(pcm):
                        yield pcm
                elif kind == wire.AUDIO_DONE:
                    return
                elif kind == wire.ERROR_EVENT:
                    raise CSMError(f"csm-serve at {self.url}: {event['error']['message']}")
        except httpx.HTTPError as error:
            if cancel.is_set():
                return  # we closed it
            raise CSMError(f"csm-serve at {self.url} stopped in the middle of a sentence: {first_line(error)}") \
                from None

    def _event(self, line: str) -> dict | None:
        try:
            return wire.parse_sse_line(line)
        except wire.WireError as error:
            raise CSMError(f"csm-serve at {self.url}: {error}") from None


@dataclass
class RemoteSynthesizer(ReplySynthesizer):
    """``ReplySynthesizer`` speaking through a csm-serve: the same ``stream``/``speak``/``remember``."""

    @classmethod
    def connect(cls, url: str, conversation, voice: Segment | None = None, options: SynthesisOptions | None = None,
                *, api_key: str | None = None, session: str | None = None,
                on_prompt: Callable[[list, Any], None] | None = None) -> RemoteSynthesizer:
        """Reach the server now (its model, window and tokenizer); AgentError when it cannot be reached.

        ``api_key`` None: ``CSM_SERVE_API_KEY`` from the environment, if set.
        """
        remote = RemoteCSM(url, api_key=api_key or os.environ.get(wire.API_KEY_ENV) or None, session=session)
        options = options or SynthesisOptions()
        if options.topk > remote.max_topk:
            raise AgentError(f"the persona's topk {options.topk} is above csm-serve's limit of {remote.max_topk}")
        return cls(remote, conversation, voice, options, on_prompt=on_prompt)

    def close(self) -> None:
        self.generator.close()


def _close_on_cancel(cancel: threading.Event, finished: threading.Event, holder: dict) -> None:
    """Once ``cancel`` is set, shut the response's socket: a read blocked on it returns, the server sees the close."""
    while not finished.is_set():
        if cancel.wait(0.05):
            response = holder.get("response")
            stream = response.extensions.get("network_stream") if response is not None else None
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            return


def _status_error(url: str, response: httpx.Response, kind: type[Exception] = AgentError) -> Exception:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.reason_phrase
    return kind(f"csm-serve at {url} answered HTTP {response.status_code}: {first_line(message)}")


__all__ = ["RemoteCSM", "RemoteConfig", "RemoteSynthesizer", "server_root"]
