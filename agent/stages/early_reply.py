"""A reply started on the tentative transcript at the first pause, before the turn is judged over.

When the end-of-turn judge listens on after a pause (the user may not be done), the think stage
starts the LLM on what the user said so far (``EarlyReply.start``), with the prompt built the way
the real reply's will be (``prompt_with``). The deltas are kept, not spoken. Then:

- the user goes on: the turn stage calls ``TextTurn.went_on`` and the early reply is discarded
  (its generation stops at the next token and nothing of it is kept anywhere);
- the turn ends with the same words: the think stage answers through ``EarlyServed``, which
  serves the early reply's deltas when the real prompt and sampling are exactly the early ones,
  so a late "done" costs no LLM time; any difference discards it and the LLM runs as usual.

Not used with tools (the tool loop must see the final transcript) nor for "remember ..."
(memory changes before the reply); see ``ThinkStage._start_early``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from agent.llm.base import ChatLLM, Message, Sampling

_END = object()


def prompt_with(messages: list[Message], text: str) -> list[Message]:
    """``messages`` with the user's ``text`` as the newest turn, as ``Conversation.llm_messages``
    will give it once the turn is added (a user turn after a user turn is merged into it)."""
    out = [dict(m) for m in messages]
    if out and out[-1]["role"] == "user" and len(out) > 1:
        out[-1]["content"] = f"{out[-1]['content']} {text}"
    else:
        out.append({"role": "user", "content": text})
    return out


class EarlyReply:
    """The LLM streaming ``messages`` on its own thread into a buffer, until taken or discarded."""

    def __init__(self, messages: list[Message], sampling: Sampling | None) -> None:
        self.messages = messages
        self.sampling = sampling
        self.cancel = threading.Event()
        self._deltas: queue.Queue = queue.Queue()
        self._taken = False

    @classmethod
    def start(cls, llm: ChatLLM, messages: list[Message], sampling: Sampling | None) -> EarlyReply:
        early = cls(messages, sampling)
        thread = threading.Thread(target=early._run, args=(llm,), name="csm-chat-early-reply", daemon=True)
        thread.start()
        return early

    def _run(self, llm: ChatLLM) -> None:
        try:
            for delta in llm.stream_reply(self.messages, self.cancel, sampling=self.sampling):
                self._deltas.put(delta)
        except Exception as error:  # handed to whoever takes the reply (the think stage reports it)
            self._deltas.put(error)
        finally:
            self._deltas.put(_END)

    @property
    def discarded(self) -> bool:
        return self.cancel.is_set() and not self._taken

    def discard(self) -> None:
        """Stop the generation; its deltas are never used."""
        if not self._taken:
            self.cancel.set()

    def matches(self, messages: list[Message], sampling: Sampling | None) -> bool:
        return not self.cancel.is_set() and messages == self.messages and sampling == self.sampling

    def deltas(self, cancel: threading.Event | None) -> Iterator[str]:
        """The reply's deltas, those made so far first; ``cancel`` (the real reply's) stops it."""
        self._taken = True
        while True:
            try:
                item = self._deltas.get(timeout=0.05)
            except queue.Empty:
                item = None
            if cancel is not None and cancel.is_set():
                self.cancel.set()
                return
            if item is None:
                continue
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item


class EarlyServed(ChatLLM):
    """``llm`` for one reply, answering with ``early`` when asked for exactly its prompt."""

    def __init__(self, llm: ChatLLM, early: EarlyReply) -> None:
        super().__init__(llm.sampling)
        self.llm, self.early = llm, early
        self.name = llm.name
        self.served = False

    def stream_reply(self, messages: list[Message], cancel: threading.Event | None = None, *,
                     sampling: Sampling | None = None) -> Iterator[str]:
        if not self.served and self.early.matches(messages, sampling):
            self.served = True
            yield from self.early.deltas(cancel)
            return
        self.early.discard()
        yield from self.llm.stream_reply(messages, cancel, sampling=sampling)

    def stream_turn(self, messages, tools, cancel=None, *, sampling=None, mode="auto"):
        self.early.discard()
        yield from self.llm.stream_turn(messages, tools, cancel, sampling=sampling, mode=mode)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.llm, name)
