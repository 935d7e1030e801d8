"""Tool calling with the in-process llama.cpp model (see ``agent.llm.tool_calling`` for the two modes).

``auto`` picks **native** when the GGUF's chat template renders a ``tools`` list (llama-cpp-python
hands ``tools`` to the template; we parse the calls it writes) and **constrained** otherwise
(two short GBNF-constrained passes). Grammars are built once per tool list and kept.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from agent.llm.base import Sampling, check_messages
from agent.llm.tool_calling import (
    NO_TOOL,
    arguments_messages,
    arguments_schema,
    decision_messages,
    has_pending_results,
    name_grammar_text,
    new_call_id,
    parse_arguments,
    results_as_notes,
    split_native_stream,
    template_supports_tools,
)
from agent.tools.registry import Tool, ToolCall

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from agent.llm.local import LocalLLM

DECISION_TOKENS = 24
ARGUMENT_TOKENS = 96


def resolve_mode(llm: LocalLLM, mode: str) -> str:
    if mode != "auto":
        return mode
    template = llm._llama.metadata.get("tokenizer.chat_template")
    return "native" if template_supports_tools(template) else "constrained"


def stream_turn_local(llm: LocalLLM, messages: list[dict[str, Any]], tools: list[Tool],
                      cancel: threading.Event | None, sampling: Sampling, mode: str) -> Iterator[str | ToolCall]:
    check_messages(messages)
    cancel = cancel or threading.Event()
    if not tools:
        yield from llm.stream_reply(results_as_notes(messages), cancel, sampling=sampling)
        return
    if resolve_mode(llm, mode) == "native":
        deltas = _stream_native(llm, messages, tools, cancel, sampling)
        yield from split_native_stream(deltas, {t.name for t in tools})
        return
    if has_pending_results(messages):  # one round of calls per request: now answer from the results
        yield from llm.stream_reply(results_as_notes(messages), cancel, sampling=sampling)
        return
    call = choose_tool(llm, messages, tools, cancel)
    if cancel.is_set():
        return
    if call is None:
        yield from llm.stream_reply(results_as_notes(messages), cancel, sampling=sampling)
    else:
        yield call


def choose_tool(llm: LocalLLM, messages: list[dict[str, Any]], tools: list[Tool],
                cancel: threading.Event) -> ToolCall | None:
    """The constrained passes: a tool name (or none), then its arguments; None when no tool fits."""
    name = _complete(llm, decision_messages(messages, tools), _grammar(llm, name_grammar_text(tools), False),
                     DECISION_TOKENS).strip()
    tool = next((t for t in tools if t.name == name), None)
    if tool is None or name == NO_TOOL or cancel.is_set():
        return None
    if not tool.parameters.get("properties"):
        return ToolCall(new_call_id(), tool.name, {})
    text = _complete(llm, arguments_messages(messages, tool),
                     _grammar(llm, json.dumps(arguments_schema(tool), sort_keys=True), True), ARGUMENT_TOKENS)
    arguments, error = parse_arguments(text, tool)
    return ToolCall(new_call_id(), tool.name, arguments, error=error)


def _grammar(llm: LocalLLM, source: str, from_schema: bool):
    from llama_cpp import LlamaGrammar

    cache: dict[tuple[str, bool], Any] = llm.__dict__.setdefault("_grammars", {})
    key = (source, from_schema)
    if key not in cache:
        if len(cache) > 64:
            cache.clear()
        try:
            cache[key] = (LlamaGrammar.from_json_schema(source, verbose=False) if from_schema
                          else LlamaGrammar.from_string(source, verbose=False))
        except Exception:  # a schema llama.cpp's converter cannot read: any JSON object will do
            log.debug("llama.cpp cannot turn this schema into a grammar; any JSON object will do", exc_info=True)
            from llama_cpp.llama_grammar import JSON_GBNF

            cache[key] = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    return cache[key]


def _complete(llm: LocalLLM, messages: list[dict[str, str]], grammar: Any, max_tokens: int) -> str:
    with llm._lock:
        out = llm._llama.create_chat_completion(messages=llm.fit_messages(messages, max_tokens), grammar=grammar,
                                                temperature=0.0, max_tokens=max_tokens)
    return out["choices"][0]["message"].get("content") or ""


def _stream_native(llm: LocalLLM, messages: list[dict[str, Any]], tools: list[Tool], cancel: threading.Event,
                   sampling: Sampling) -> Iterator[str]:
    """The model's own template with the tools in it; its raw text (calls included) as deltas."""
    templated = [_with_dict_arguments(m) for m in messages]
    with llm._lock:
        chunks = llm._llama.create_chat_completion(
            messages=llm.fit_messages(templated, sampling.max_tokens), tools=[t.openai_schema() for t in tools],
            stream=True, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens)
        try:
            for chunk in chunks:
                if cancel.is_set():
                    break
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    yield delta
        finally:
            chunks.close()


def _with_dict_arguments(message: dict[str, Any]) -> dict[str, Any]:
    """Chat templates (Qwen, Llama 3) write ``arguments | tojson``: give them a dict, not a JSON string."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call["function"])
        try:
            function["arguments"] = json.loads(function["arguments"])
        except (TypeError, json.JSONDecodeError):
            function["arguments"] = {}
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}
