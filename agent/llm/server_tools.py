"""Tool calling through an OpenAI-compatible server (see ``agent.llm.tool_calling`` for the modes).

**native** (``auto`` for a server): the OpenAI ``tools`` API; streamed ``tool_calls`` fragments are
joined by index. Servers that parse tool calls: llama.cpp's ``llama-server --jinja``, vLLM with a
tool parser, Ollama, llama-cpp-python's server with a function-calling chat format.
**constrained**: for a server whose model has no tool format (llama-cpp-python's server with the
embedded SmolLM2): the two decision passes as JSON constrained by ``response_format`` with a
schema (llama.cpp turns the schema into a grammar), then the answer with the results as notes.
"""

from __future__ import annotations

import json
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
    new_call_id,
    parse_arguments,
    results_as_notes,
)
from agent.tools.registry import Tool, ToolCall

if TYPE_CHECKING:
    from agent.llm.server import OpenAICompatibleLLM


def stream_turn_server(llm: OpenAICompatibleLLM, messages: list[dict[str, Any]], tools: list[Tool],
                       cancel: threading.Event | None, sampling: Sampling, mode: str) -> Iterator[str | ToolCall]:
    check_messages(messages)
    cancel = cancel or threading.Event()
    if not tools:
        yield from llm.stream_reply(results_as_notes(messages), cancel, sampling=sampling)
    elif mode == "constrained":
        if has_pending_results(messages):
            yield from llm.stream_reply(results_as_notes(messages), cancel, sampling=sampling)
            return
        call = _choose_tool(llm, messages, tools)
        if cancel.is_set():
            return
        if call is None:
            yield from llm.stream_reply(results_as_notes(messages), cancel, sampling=sampling)
        else:
            yield call
    else:
        yield from _stream_native(llm, messages, tools, cancel, sampling)


def _stream_native(llm: OpenAICompatibleLLM, messages: list[dict[str, Any]], tools: list[Tool],
                   cancel: threading.Event, sampling: Sampling) -> Iterator[str | ToolCall]:
    try:
        stream = llm._client.chat.completions.create(
            model=llm._model_name(), messages=messages, stream=True, tools=[t.openai_schema() for t in tools],
            tool_choice="auto", temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens)
    except Exception as error:
        raise llm._error(error, started=False) from None
    parts: dict[int, dict[str, str]] = {}
    try:
        for chunk in stream:
            if cancel.is_set():
                return
            for choice in chunk.choices or []:
                delta = choice.delta
                if delta is None:
                    continue
                if delta.content:
                    yield delta.content
                for fragment in delta.tool_calls or []:
                    part = parts.setdefault(fragment.index or 0, {"id": "", "name": "", "arguments": ""})
                    part["id"] = fragment.id or part["id"]
                    if fragment.function is not None:
                        part["name"] += fragment.function.name or ""
                        part["arguments"] += fragment.function.arguments or ""
    except Exception as error:
        raise llm._error(error, started=True) from None
    finally:
        stream.close()
    for index in sorted(parts):
        part = parts[index]
        arguments, error = parse_arguments(part["arguments"])
        yield ToolCall(part["id"] or new_call_id(), part["name"], arguments, error=error)


def _complete_json(llm: OpenAICompatibleLLM, messages: list[dict[str, str]], schema: dict[str, Any],
                   max_tokens: int) -> str:
    try:
        response = llm._client.chat.completions.create(
            model=llm._model_name(), messages=messages, temperature=0.0, max_tokens=max_tokens,
            response_format={"type": "json_object", "schema": schema})
    except Exception as error:
        raise llm._error(error, started=False) from None
    return (response.choices[0].message.content or "") if response.choices else ""


def _choose_tool(llm: OpenAICompatibleLLM, messages: list[dict[str, Any]], tools: list[Tool]) -> ToolCall | None:
    names = [t.name for t in tools] + [NO_TOOL]
    # A bare JSON string from the list: the same choice the in-process name grammar offers.
    text = _complete_json(llm, decision_messages(messages, tools), {"enum": names}, 16)
    try:
        choice = json.loads(text)
    except json.JSONDecodeError:
        choice = None
    tool = next((t for t in tools if t.name == choice), None)
    if tool is None:
        return None
    if not tool.parameters.get("properties"):
        return ToolCall(new_call_id(), tool.name, {})
    text = _complete_json(llm, arguments_messages(messages, tool), arguments_schema(tool), 128)
    arguments, error = parse_arguments(text, tool)
    return ToolCall(new_call_id(), tool.name, arguments, error=error)

