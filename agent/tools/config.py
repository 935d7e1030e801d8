"""Which tools a conversation gets, from ``config.toml`` and the persona.

Tools are off unless enabled. In ``config.toml``::

    tools = true                  # the built-in tools for personas that do not choose
    tool-mode = "auto"            # auto | native | constrained (see agent.llm.tool_calling)

    [mcp.weather]                 # an MCP server: a stdio command ...
    command = ["python", "/opt/weather_server.py"]
    confirm = "auto"              # auto: tools not marked read-only ask first | always | never
    timeout-s = 20
    [mcp.files]                   # ... or a streamable-HTTP URL
    url = "http://127.0.0.1:8931/mcp"

and in a persona file: ``tools = ["clock", "calculator", "timers", "memory"]`` (or ``true`` for
all of them, ``false`` for none) and ``mcp = ["weather"]`` for the servers it may use.
"""

from __future__ import annotations

from typing import Any

from agent.errors import AgentError
from agent.tools.mcp import CONFIRM_MODES, MCPServerSpec

BUILTIN_GROUPS = ("clock", "calculator", "timers", "memory")


def parse_mcp_servers(table: Any, source: str) -> dict[str, MCPServerSpec]:
    """``[mcp.NAME]`` tables -> specs; AgentError naming the key for anything wrong."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise AgentError(f"{source}: 'mcp' must be a table of servers, e.g. [mcp.weather] with command = [...]")
    specs = {}
    for name, entry in table.items():
        where = f"{source}: [mcp.{name}]"
        if not isinstance(entry, dict):
            raise AgentError(f"{where} must be a table with command = [...] or url = \"...\"")
        entry = {k.replace("-", "_"): v for k, v in entry.items()}
        unknown = set(entry) - {"command", "url", "env", "cwd", "confirm", "timeout_s", "start_timeout_s"}
        if unknown:
            raise AgentError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: command, url, env, cwd, confirm, "
                             "timeout-s, start-timeout-s)")
        command = entry.get("command", ())
        if isinstance(command, str):
            raise AgentError(f"{where}: command must be a list of strings, e.g. [\"python\", \"server.py\"] "
                             "(no shell is run)")
        if not isinstance(command, (list, tuple)) or not all(isinstance(c, str) and c for c in command):
            raise AgentError(f"{where}: command must be a list of non-empty strings")
        env = entry.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise AgentError(f"{where}: env must be a table of strings")
        for key in ("timeout_s", "start_timeout_s"):
            value = entry.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise AgentError(f"{where}: {key.replace('_', '-')} must be a positive number of seconds")
        if entry.get("confirm", "auto") not in CONFIRM_MODES:
            raise AgentError(f"{where}: confirm must be one of {', '.join(CONFIRM_MODES)}")
        try:
            specs[name] = MCPServerSpec(
                name, tuple(command), url=entry.get("url"), env=dict(env), cwd=entry.get("cwd"),
                confirm=entry.get("confirm", "auto"), call_timeout_s=float(entry.get("timeout_s", 20.0)),
                start_timeout_s=float(entry.get("start_timeout_s", 30.0)))
        except ValueError as error:
            raise AgentError(f"{where}: {error}") from None
    return specs


def persona_tool_groups(value: Any, source: str) -> tuple[str, ...] | None:
    """A persona's ``tools`` key: None when it does not say, else the built-in groups it wants."""
    if value is None:
        return None
    if value is True:
        return BUILTIN_GROUPS
    if value is False:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AgentError(f"persona {source}: 'tools' must be true, false or a list such as [\"clock\", \"timers\"]")
    unknown = [v for v in value if v not in BUILTIN_GROUPS]
    if unknown:
        raise AgentError(f"persona {source}: unknown tool {unknown[0]!r} (built-in: {', '.join(BUILTIN_GROUPS)}; "
                         "MCP servers go in 'mcp')")
    return tuple(dict.fromkeys(value))


def enabled_groups(config_tools: bool, persona_groups: tuple[str, ...] | None, memory_on: bool) -> tuple[str, ...]:
    """The built-in groups of this conversation: the persona's choice, else all if the config turns tools on.
    Memory tools need memory on."""
    groups = persona_groups if persona_groups is not None else (BUILTIN_GROUPS if config_tools else ())
    return tuple(g for g in groups if g != "memory" or memory_on)
