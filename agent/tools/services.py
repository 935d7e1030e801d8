"""Tools, memory and timers of one csm-chat run, built from the settings and the persona.

``AgentServices`` owns the memory store (unless ``--memory off``), the tool registry with the
persona's built-in groups and MCP servers (tools are off unless the config or the persona turns
them on), and the timer scheduler, which hands due timers to ``announce`` (the pipeline speaks
them). Nothing here stops the conversation: a store, a server or a file that fails is a notice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.memory.store import MemoryStore
from agent.tools.config import enabled_groups, parse_mcp_servers
from agent.tools.registry import ToolLimits, ToolRegistry
from agent.tools.turn import ToolSession

if TYPE_CHECKING:
    from agent.config.personas import Persona
    from agent.config.settings import AgentSettings
    from agent.tools.mcp import MCPConnections
    from agent.tools.timers import TimerScheduler, TimerStore

Notice = Callable[[str, str], None]


class AgentServices:
    """See the module docstring; ``close()`` stops the servers and the scheduler."""

    def __init__(self, settings: AgentSettings, persona: Persona, notice: Notice,
                 announce: Callable[[str], None]) -> None:
        self.notice = notice
        self.announce = announce
        self.memory: MemoryStore | None = MemoryStore(notice=notice) if settings.memory == "on" else None
        self.registry = ToolRegistry()
        self.timers: TimerStore | None = None
        self.scheduler: TimerScheduler | None = None
        self.mcp: MCPConnections | None = None
        self.session: ToolSession | None = None
        self._settings = settings
        self.use_persona(persona)

    def use_persona(self, persona: Persona) -> None:
        """The tools of ``persona`` (built-ins by group; its MCP servers are started once, on first use)."""
        from agent.memory.tools import memory_tools
        from agent.tools.builtin import calculator_tool, clock_tool

        settings = self._settings
        self.registry.remove_source("builtin")
        groups = enabled_groups(settings.tools, persona.tools, self.memory is not None)
        if "clock" in groups:
            self.registry.add(clock_tool())
        if "calculator" in groups:
            self.registry.add(calculator_tool())
        if "timers" in groups:
            for tool in self._timer_tools():
                self.registry.add(tool)
        if "memory" in groups and self.memory is not None:
            for tool in memory_tools(self.memory):
                self.registry.add(tool)
        servers = parse_mcp_servers(settings.mcp, settings.config_path or "config.toml")
        unknown = [name for name in persona.mcp if name not in servers]
        if unknown:
            self.notice("warning", f"persona {persona.name}: MCP server {unknown[0]!r} is not in config.toml "
                                   f"([mcp.{unknown[0]}]); going on without it")
        wanted = [servers[name] for name in persona.mcp if name in servers]
        if wanted:
            from agent.tools.mcp import MCPConnections

            if self.mcp is None:
                self.mcp = MCPConnections(self.registry, self.notice)
            started = self.mcp.names()
            self.mcp.connect([spec for spec in wanted if spec.name not in started])
        if groups or wanted:
            sources = {"builtin"} | {spec.source for spec in wanted}
            self.session = ToolSession(self.registry.view(sources), ToolLimits(), mode=settings.tool_mode)
        else:
            self.session = None

    def _timer_tools(self):
        from agent.tools.timers import TimerScheduler, TimerStore, timer_tools

        if self.timers is None:
            self.timers = TimerStore(notice=self.notice)
            self.scheduler = TimerScheduler(self.timers, self._due)
            self.scheduler.start()
        return timer_tools(self.timers, self.scheduler)

    def _due(self, timer, late: bool) -> None:
        self.announce(timer.announcement(late=late))

    @property
    def tools_on(self) -> bool:
        return self.session is not None

    def wait_for_servers(self, timeout_s: float) -> None:
        if self.mcp is not None:
            self.mcp.wait_ready(timeout_s)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.mcp is not None:
            self.mcp.close()
        if self.memory is not None:
            self.memory.close()
