"""A chat model behind an OpenAI-compatible server (llama.cpp server, Ollama, vLLM), through the ``openai`` client."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator

from agent.errors import AgentError
from agent.llm.base import ChatLLM, Message, Sampling, check_messages
from csm_engine.errors import first_line as _first_line


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
        check_messages(messages)
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

    def stream_turn(self, messages, tools, cancel=None, *, sampling=None, mode="auto"):
        """See ``ChatLLM.stream_turn``; the OpenAI tools API or constrained JSON (``agent.llm.server_tools``)."""
        from agent.llm.server_tools import stream_turn_server

        yield from stream_turn_server(self, messages, tools, cancel, sampling or self.sampling, mode)

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
