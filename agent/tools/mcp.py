"""csm-chat as an MCP client (the official ``mcp`` SDK): servers' tools join the tool registry.

A server is a stdio command (started as a child process, its stderr in a log file) or a
streamable-HTTP URL. ``MCPConnections`` keeps one asyncio loop on a background thread; each
server lives in one task there for as long as csm-chat runs (``async with mcp.Client(...)``),
and its tools become ``Tool`` objects whose calls are sent to that loop and waited for with a
timeout from the calling thread. A server that fails to start, does not answer in time, or dies
gives one notice; its tools leave the registry and the conversation goes on. A tool the server
does not mark read-only (``readOnlyHint``) asks the user first, unless the server's ``confirm``
setting says otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from agent.tools.registry import NAME_PATTERN, Tool, ToolError, ToolRegistry

logger = logging.getLogger(__name__)  # ``log`` names the servers' log files here

Notice = Callable[[str, str], None]
CONFIRM_MODES = ("auto", "always", "never")  # auto: tools not marked read-only ask first


@dataclass(frozen=True)
class MCPServerSpec:
    """One configured server: ``command`` (argv) for stdio, or ``url`` for streamable HTTP."""

    name: str
    command: tuple[str, ...] = ()
    url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    confirm: str = "auto"
    call_timeout_s: float = 20.0
    start_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ValueError(f"MCP server name {self.name!r} must be letters, digits, _ or -")
        if bool(self.command) == bool(self.url):
            raise ValueError(f"MCP server {self.name}: give either command (stdio) or url (streamable HTTP)")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"MCP server {self.name}: url must start with http:// or https://")
        if self.confirm not in CONFIRM_MODES:
            raise ValueError(f"MCP server {self.name}: confirm must be one of {', '.join(CONFIRM_MODES)}")

    @property
    def source(self) -> str:
        return f"mcp:{self.name}"

    def describe(self) -> str:
        return self.url or shlex.join(self.command)


def mcp_log_dir() -> Path:
    return Path(platformdirs.user_log_dir("csm-chat")) / "mcp"


class MCPConnections:
    """The running MCP servers (see the module docstring). ``close()`` stops them all."""

    def __init__(self, registry: ToolRegistry, notice: Notice | None = None, log_dir: Path | None = None) -> None:
        self.registry = registry
        self._notice = notice if notice is not None else (lambda level, message: None)
        self.log_dir = log_dir or mcp_log_dir()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="csm-chat-mcp", daemon=True)
        self._thread.start()
        self._stop: asyncio.Event | None = None
        self._clients: dict[str, Any] = {}
        self._ready: dict[str, threading.Event] = {}
        self._down: set[str] = set()  # servers already announced as failed (one notice each)
        self._tasks: dict[str, Any] = {}
        self._lock = threading.Lock()

    # ---- starting ---------------------------------------------------------------------------------------

    def connect(self, specs: list[MCPServerSpec]) -> None:
        """Start connecting to each server in the background (their tools appear once listed)."""
        for spec in specs:
            ready = self._ready[spec.name] = threading.Event()
            self._tasks[spec.name] = asyncio.run_coroutine_threadsafe(self._serve(spec, ready), self._loop)
            threading.Thread(target=self._watch_start, args=(spec, ready), daemon=True,
                             name=f"csm-chat-mcp-{spec.name}-start").start()

    def names(self) -> set[str]:
        """Servers asked for so far (started, starting or failed)."""
        return set(self._ready)

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until every server is up or has failed; True when all are up."""
        for ready in list(self._ready.values()):
            ready.wait(timeout_s)
        return all(name in self._clients for name in self._ready)

    def _watch_start(self, spec: MCPServerSpec, ready: threading.Event) -> None:
        if not ready.wait(spec.start_timeout_s):
            self._fail(spec, f"did not start within {spec.start_timeout_s:.0f} s")
            self._tasks[spec.name].cancel()
            ready.set()

    async def _serve(self, spec: MCPServerSpec, ready: threading.Event) -> None:
        from mcp import Client

        if self._stop is None:
            self._stop = asyncio.Event()
        log = None
        try:
            if spec.url:
                target: Any = spec.url
            else:
                from mcp.client.stdio import StdioServerParameters, stdio_client

                self.log_dir.mkdir(parents=True, exist_ok=True)
                log = open(self.log_dir / f"{spec.name}.log", "a", encoding="utf-8")
                params = StdioServerParameters(command=spec.command[0], args=list(spec.command[1:]),
                                               env=dict(spec.env) or None, cwd=spec.cwd)
                target = stdio_client(params, errlog=log)
            async with Client(target, read_timeout_seconds=spec.call_timeout_s) as client:
                tools = await _list_all_tools(client)
                for description in tools:
                    self._register(spec, description)
                with self._lock:
                    self._clients[spec.name] = client
                ready.set()
                await self._stop.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # anyio wraps a dead child's errors in exception groups
            self._fail(spec, _reason(error, log))
        finally:
            with self._lock:
                self._clients.pop(spec.name, None)
            self.registry.remove_source(spec.source)
            ready.set()
            if log is not None:
                log.close()

    def _register(self, spec: MCPServerSpec, description: Any) -> None:
        name = description.name
        if not NAME_PATTERN.match(name):
            self._notice("warning", f"MCP server {spec.name}: tool {name!r} has a name the LLM cannot call; skipped")
            return
        annotations = getattr(description, "annotations", None)
        read_only = bool(annotations is not None and annotations.read_only_hint)
        confirm = spec.confirm == "always" or (spec.confirm == "auto" and not read_only)
        schema = dict(description.input_schema or {"type": "object", "properties": {}})
        schema.pop("title", None)
        try:
            tool = Tool(name, (description.description or description.title or name).strip()[:500], schema,
                        self._caller(spec, name), read_only=read_only, needs_confirmation=confirm,
                        timeout_s=spec.call_timeout_s, source=spec.source)
            self.registry.add(tool)
        except ValueError as error:
            self._notice("warning", f"MCP server {spec.name}: tool {name!r} skipped ({error})")

    # ---- calling ----------------------------------------------------------------------------------------

    def _caller(self, spec: MCPServerSpec, tool_name: str):
        def call(arguments: dict[str, Any], cancel: threading.Event) -> str:
            with self._lock:
                client = self._clients.get(spec.name)
            if client is None:
                raise ToolError(f"the MCP server {spec.name} is not running")
            future = asyncio.run_coroutine_threadsafe(
                client.call_tool(tool_name, arguments, read_timeout_seconds=spec.call_timeout_s), self._loop)
            while True:
                try:
                    result = future.result(timeout=0.05)
                    break
                except FutureTimeout:
                    if cancel.is_set():
                        future.cancel()
                        raise ToolError("cancelled") from None
                except FutureCancelled:
                    raise ToolError("cancelled") from None
                except Exception as error:
                    message = " ".join(str(getattr(error, "error", None) and error.error.message or error).split())
                    if "timed out" in message.lower():
                        raise ToolError(f"{tool_name} did not answer within {spec.call_timeout_s:.1f} s") from None
                    if "closed" in message.lower() or isinstance(error, (BrokenPipeError, EOFError)):
                        self._fail(spec, f"stopped during a call to {tool_name}")
                        raise ToolError(f"the MCP server {spec.name} stopped during the call") from None
                    raise ToolError(f"{spec.name} {tool_name}: {message}") from None
            text = _result_text(result)
            if getattr(result, "is_error", False):
                raise ToolError(text or f"{tool_name} failed")
            return text

        return call

    # ---- failing and stopping -----------------------------------------------------------------------------

    def _fail(self, spec: MCPServerSpec, reason: str) -> None:
        with self._lock:
            if spec.name in self._down:
                return
            self._down.add(spec.name)
        gone = self.registry.remove_source(spec.source)
        lost = f"; its tools ({', '.join(gone)}) are off" if gone else ""
        self._notice("warning", f"MCP server {spec.name} ({spec.describe()}) {reason}{lost}; the conversation goes on")

    def close(self) -> None:
        """Stop every server (stdio children are ended) and the loop."""
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        for task in self._tasks.values():
            try:
                task.result(timeout=5)
            except BaseException:  # closing anyway: a server that does not stop in time is cancelled
                logger.debug("an MCP server task did not end cleanly", exc_info=True)
                task.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


async def _list_all_tools(client: Any) -> list[Any]:
    tools, cursor = [], None
    for _ in range(100):  # a server whose pages never end cannot hang the start
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


def _result_text(result: Any) -> str:
    """The text of a CallToolResult: its text blocks, else its structured content as JSON."""
    parts = [block.text for block in result.content or [] if getattr(block, "type", "") == "text"]
    if not parts and getattr(result, "structured_content", None):
        import json

        return json.dumps(result.structured_content, ensure_ascii=False)
    others = [getattr(block, "type", "?") for block in result.content or [] if getattr(block, "type", "") != "text"]
    if others:
        parts.append(f"[{len(others)} non-text block(s) left out: {', '.join(sorted(set(others)))}]")
    return "\n".join(parts)


def _reason(error: BaseException, log: Any) -> str:
    """One line: why a server could not start or stopped (the innermost error, and its stderr's last line)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, FileNotFoundError):
        text = f"command not found ({error.filename or text})"
    tail = ""
    if log is not None:
        try:
            log.flush()
            lines = [line.strip() for line in Path(log.name).read_text(encoding="utf-8", errors="replace").splitlines()
                     if line.strip()]
            tail = f" (its last words: {lines[-1][:120]})" if lines else ""
        except OSError:  # the reason is still given, without its last words
            logger.debug("cannot read the MCP server's log %s", log.name, exc_info=True)
    return f"could not be used: {text[:160]}{tail}"

