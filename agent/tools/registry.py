"""Tools the LLM may call: what a tool is, the registry of the enabled ones, and how a call runs.

A ``Tool`` is a name, a description and a JSON-schema for its arguments (what the LLM sees),
plus how it behaves: read-only or not, whether the user must say "yes" first, how long it may
take and how much text it may return. ``ToolRunner`` runs the calls of one user turn under
per-turn limits (``ToolLimits``): a call that raises, times out, returns too much or asks for
a tool that is not there becomes an error *result* the LLM reads — never an exception that
ends the conversation. Tool output is data: it goes back to the LLM as a tool message (with
chat-template control tokens taken out, so it cannot open a system turn of its own) and it
can neither change the system prompt nor enable tools; nothing here runs a shell.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ToolFunction = Callable[[dict[str, Any], threading.Event], str]  # (arguments, cancel) -> text
Confirm = Callable[["Tool", "ToolCall"], bool]  # asks the user; True = go ahead

NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
# Strings that chat templates give a meaning (ChatML, Llama 3, Gemma, Mistral, Phi): a tool's
# text that carries them could close its own message and open a system one.
_CONTROL_TOKENS = re.compile(
    r"<\|[a-z_]{2,20}\|>|<\|(?:start|end)_header_id\|>|<\|eot_id\|>|<(?:start|end)_of_turn>|\[/?INST\]"
    r"|\[/?TOOL_(?:CALLS|RESULTS)\]|</?s>|</?tool_(?:call|response)>",
    re.IGNORECASE)


class ToolError(Exception):
    """A tool could not do what was asked; the message goes back to the LLM as the result."""


@dataclass(frozen=True)
class Tool:
    """One callable tool. ``parameters`` is a JSON schema of type object."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: ToolFunction = field(repr=False, compare=False)
    read_only: bool = True  # changes nothing outside csm-chat
    needs_confirmation: bool = False  # the user must say yes before each call
    timeout_s: float = 5.0
    max_output_chars: int = 2000
    source: str = "builtin"  # "builtin" or "mcp:SERVER"

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ValueError(f"tool name {self.name!r} must be letters, digits, _ or - (at most 64)")
        if not isinstance(self.parameters, dict) or self.parameters.get("type", "object") != "object":
            raise ValueError(f"tool {self.name}: parameters must be a JSON schema of type object")

    def openai_schema(self) -> dict[str, Any]:
        """The tool as the OpenAI chat API (and llama.cpp) takes it in ``tools=[...]``."""
        parameters = {"type": "object", "properties": {}, **self.parameters}
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": parameters}}


@dataclass(frozen=True)
class ToolCall:
    """The LLM asks for ``name`` with ``arguments``; ``id`` pairs the call with its result."""

    id: str
    name: str
    arguments: dict[str, Any]
    error: str | None = None  # the model's arguments could not be read (the call fails with this)

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def describe(self) -> str:
        """``name(key=value, ...)`` for the screen and the log."""
        args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in self.arguments.items())
        return f"{self.name}({args})"


@dataclass(frozen=True)
class ToolResult:
    """What a call gave back: its text (an error's message when ``ok`` is False)."""

    call: ToolCall
    output: str
    ok: bool = True
    elapsed_s: float = 0.0
    truncated: bool = False

    def for_llm(self) -> str:
        """The text the LLM reads for this result."""
        return self.output if self.ok else f"error: {self.output}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.call.id, "name": self.call.name, "arguments": self.call.arguments, "output": self.output,
                "ok": self.ok, "elapsed_s": round(self.elapsed_s, 3), "truncated": self.truncated}


@dataclass(frozen=True)
class ToolLimits:
    """Per user turn: how many calls, how long they may run all together, how much text each returns."""

    max_calls: int = 4
    max_turn_s: float = 30.0
    max_output_chars: int = 2000  # one result, whatever the tool's own limit says

    def __post_init__(self) -> None:
        if self.max_calls < 1 or self.max_turn_s <= 0 or self.max_output_chars < 100:
            raise ValueError("tool limits: max_calls >= 1, max_turn_s > 0, max_output_chars >= 100")


def clean_tool_text(text: str, limit: int) -> tuple[str, bool]:
    """``text`` without chat-template control tokens, cut to ``limit`` characters; (text, truncated)."""
    truncated = len(text) > limit * 4
    text = text[: limit * 4]  # bound the regex work on a 10 MB answer
    text = _CONTROL_TOKENS.sub(" ", text).replace("\x00", "")
    if len(text) > limit:
        text, truncated = text[:limit].rstrip() + " [...]", True
    return text, truncated


class ToolRegistry:
    """The tools enabled for this conversation, by name (thread-safe)."""

    def __init__(self, tools: list[Tool] | None = None) -> None:
        self._lock = threading.Lock()
        self._tools: dict[str, Tool] = {}
        for tool in tools or []:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        with self._lock:
            if tool.name in self._tools and self._tools[tool.name].source != tool.source:
                raise ValueError(f"tool {tool.name!r} from {tool.source} clashes with one from "
                                 f"{self._tools[tool.name].source}")
            self._tools[tool.name] = tool

    def remove_source(self, source: str) -> list[str]:
        """Take out every tool from ``source`` (an MCP server that died); returns their names."""
        with self._lock:
            gone = [name for name, tool in self._tools.items() if tool.source == source]
            for name in gone:
                del self._tools[name]
            return gone

    def get(self, name: str) -> Tool | None:
        with self._lock:
            return self._tools.get(name)

    def tools(self) -> list[Tool]:
        with self._lock:
            return list(self._tools.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._tools)

    def __bool__(self) -> bool:
        return len(self) > 0

    def openai_schemas(self) -> list[dict[str, Any]]:
        return [tool.openai_schema() for tool in self.tools()]

    def view(self, sources: set[str]) -> RegistryView:
        """The tools of some sources only (a persona's built-ins and its MCP servers)."""
        return RegistryView(self, frozenset(sources))


@dataclass(frozen=True)
class RegistryView:
    """A live, filtered look at a registry: tools that arrive later (an MCP server starting) show up."""

    registry: ToolRegistry
    sources: frozenset[str]

    def get(self, name: str) -> Tool | None:
        tool = self.registry.get(name)
        return tool if tool is not None and tool.source in self.sources else None

    def tools(self) -> list[Tool]:
        return [t for t in self.registry.tools() if t.source in self.sources]


class ToolRunner:
    """Runs the tool calls of one user turn under ``limits``; each call gives one ``ToolResult``.

    ``confirm(tool, call)`` is asked before a tool that needs confirmation; without it such a
    call is refused. ``cancel`` (the reply's barge-in signal) abandons a running call at once.
    """

    def __init__(self, registry: ToolRegistry | RegistryView, limits: ToolLimits | None = None, *,
                 confirm: Confirm | None = None, cancel: threading.Event | None = None,
                 on_slow: Callable[[ToolCall], None] | None = None, slow_after_s: float = 1.0) -> None:
        self.registry = registry
        self.limits = limits or ToolLimits()
        self.confirm = confirm
        self.cancel = cancel or threading.Event()
        self.on_slow = on_slow  # called once per call still running after ``slow_after_s`` (say a filler)
        self.slow_after_s = slow_after_s
        self.calls = 0
        self.spent_s = 0.0  # time spent in tools this turn (the LLM's own time does not count)
        self.results: list[ToolResult] = []

    @property
    def time_left_s(self) -> float:
        return self.limits.max_turn_s - self.spent_s

    @property
    def exhausted(self) -> bool:
        return self.calls >= self.limits.max_calls or self.time_left_s <= 0

    def run(self, call: ToolCall) -> ToolResult:
        """Run one call (never raises for the tool's faults)."""
        result = self._run(call)
        self.results.append(result)
        return result

    def _run(self, call: ToolCall) -> ToolResult:
        tool = self.registry.get(call.name)
        if tool is None:
            known = ", ".join(t.name for t in self.registry.tools()) or "none"
            return ToolResult(call, f"there is no tool named {call.name!r} (tools: {known})", ok=False)
        if call.error:
            return ToolResult(call, call.error, ok=False)
        if self.calls >= self.limits.max_calls:
            return ToolResult(call, f"the limit of {self.limits.max_calls} tool calls per turn is reached; "
                                    "answer with what you have", ok=False)
        if self.time_left_s <= 0:
            return ToolResult(call, "the time for tools in this turn is used up; answer with what you have", ok=False)
        self.calls += 1
        if tool.needs_confirmation:
            if self.confirm is None or not self.confirm(tool, call):
                return ToolResult(call, "the user did not allow this call", ok=False)
            if self.cancel.is_set():
                return ToolResult(call, "cancelled", ok=False)
        timeout_s = max(0.05, min(tool.timeout_s, self.time_left_s))
        started = time.monotonic()
        slow = (lambda: self.on_slow(call)) if self.on_slow is not None else None
        outcome = _call_with_timeout(tool, call.arguments, timeout_s, self.cancel, slow, self.slow_after_s)
        elapsed = time.monotonic() - started
        self.spent_s += elapsed
        ok, text = outcome
        limit = min(tool.max_output_chars, self.limits.max_output_chars)
        if not isinstance(text, str):
            text = json.dumps(text, ensure_ascii=False, default=str) if text is not None else ""
        text, truncated = clean_tool_text(text, limit)
        return ToolResult(call, text, ok=ok, elapsed_s=elapsed, truncated=truncated)


def _call_with_timeout(tool: Tool, arguments: dict[str, Any], timeout_s: float, cancel: threading.Event,
                       on_slow: Callable[[], None] | None = None, slow_after_s: float = 1.0) -> tuple[bool, Any]:
    """Run ``tool`` on its own thread; (ok, text). A call still running after ``timeout_s`` or a
    cancel is abandoned (its thread is told through its cancel event and left to finish)."""
    box: dict[str, Any] = {}
    done = threading.Event()
    stop = threading.Event()

    def work() -> None:
        try:
            box["value"] = tool.function(dict(arguments), stop)
        except ToolError as error:
            box["error"] = str(error)
        except Exception as error:  # a tool's bug is the LLM's error result, not the conversation's end
            box["error"] = f"{type(error).__name__}: {error}"
        finally:
            done.set()

    threading.Thread(target=work, name=f"csm-chat-tool-{tool.name}", daemon=True).start()
    started = time.monotonic()
    deadline = started + timeout_s
    while not done.wait(0.02):
        if on_slow is not None and time.monotonic() - started >= slow_after_s:
            on_slow()
            on_slow = None
        if cancel.is_set():
            stop.set()
            return False, "cancelled: the user interrupted"
        if time.monotonic() > deadline:
            stop.set()
            return False, f"{tool.name} did not answer within {timeout_s:.1f} s"
    if "error" in box:
        return False, " ".join(str(box["error"]).split()) or "failed"
    return True, box.get("value")
