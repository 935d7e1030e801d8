"""A GGUF chat model in-process with llama-cpp-python (default: the embedded SmolLM2-135M-Instruct)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.llm.base import ChatLLM, Message, Sampling, check_messages
from agent.llm.llama_cpu import decide_repack, repack_setting
from csm_engine.errors import first_line as _first_line

log = logging.getLogger(__name__)


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
        repack: str | None = None,
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
        # Weight repacking off on AMX CPUs, where llama.cpp crashes on multi-token prompts
        # (agent.llm.llama_cpu; repack: auto | on | off, default $CSM_LLAMA_REPACK or auto).
        self.repack = decide_repack(repack)
        log.info("llama.cpp weight repacking for %s: %s", path.name, self.repack.reason)
        try:
            with repack_setting(self.repack.enabled):
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

    @contextmanager
    def locked_llama(self, timeout: float = -1) -> Iterator[Any]:
        """The llama object, held under the reply lock (None if not free within ``timeout`` s): for
        reading its logits (``agent.listen.text_turn``) without a reply running on it at the same time."""
        got = self._lock.acquire(timeout=timeout)
        try:
            yield self._llama if got else None
        finally:
            if got:
                self._lock.release()

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def fit_messages(self, messages: list[Message], reply_tokens: int) -> list[Message]:
        """Drop the oldest non-system messages until the prompt leaves ``reply_tokens`` free."""
        budget = self.n_ctx - reply_tokens - 16
        cost = [self.count_tokens(m.get("content") or "") + 6 for m in messages]  # + role markers
        keep = list(range(len(messages)))
        while sum(cost[i] for i in keep) > budget:
            droppable = [i for i in keep if messages[i]["role"] != "system" and i != len(messages) - 1]
            if not droppable:
                break
            keep.remove(droppable[0])
        return [messages[i] for i in keep]

    def stream_turn(self, messages, tools, cancel=None, *, sampling=None, mode="auto"):
        """See ``ChatLLM.stream_turn``; how llama.cpp calls tools is in ``agent.llm.local_tools``."""
        from agent.llm.local_tools import stream_turn_local

        yield from stream_turn_local(self, messages, tools, cancel, sampling or self.sampling, mode)

    def stream_reply(
        self,
        messages: list[Message],
        cancel: threading.Event | None = None,
        *,
        sampling: Sampling | None = None,
    ) -> Iterator[str]:
        check_messages(messages)
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
