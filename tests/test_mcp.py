"""csm-chat as an MCP client, against a real MCP server (tests/_mcp_server.py on the ``mcp`` SDK)
over stdio and streamable HTTP: tools join the registry, calls work, and a server that fails to
start, hangs or dies gives one notice while the rest goes on."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from _serve_helpers import free_port

from agent.errors import AgentError
from agent.tools.builtin import clock_tool
from agent.tools.config import parse_mcp_servers
from agent.tools.mcp import MCPConnections, MCPServerSpec
from agent.tools.registry import ToolCall, ToolLimits, ToolRegistry, ToolRunner

SERVER = str(Path(__file__).with_name("_mcp_server.py"))


class Notices(list):
    def __call__(self, level, message):
        self.append((level, message))


def connect(tmp_path, *specs, tools=()):
    registry, notices = ToolRegistry(list(tools)), Notices()
    connections = MCPConnections(registry, notices, log_dir=tmp_path / "mcp-logs")
    connections.connect(list(specs))
    return registry, notices, connections


@pytest.fixture(scope="module")
def stdio_server(tmp_path_factory):
    registry, notices, connections = connect(tmp_path_factory.mktemp("mcp"),
                                             MCPServerSpec("test", (sys.executable, SERVER), call_timeout_s=30))
    assert connections.wait_ready(60), notices
    yield registry, notices
    connections.close()


def run(registry, name, confirm=None, turn_s=30.0, **arguments):
    limits = ToolLimits(max_output_chars=4000, max_turn_s=turn_s)
    return ToolRunner(registry, limits, confirm=confirm).run(ToolCall("1", name, arguments))


def test_stdio_server_tools_join_the_registry_with_their_read_only_marks(stdio_server):
    registry, notices = stdio_server
    tools = {t.name: t for t in registry.tools()}
    assert {"get_weather", "add_note", "slow", "crash", "flood", "inject"} <= set(tools)
    assert tools["get_weather"].read_only and not tools["get_weather"].needs_confirmation
    assert not tools["add_note"].read_only and tools["add_note"].needs_confirmation
    assert tools["get_weather"].source == "mcp:test" and "city" in tools["get_weather"].parameters["properties"]
    assert notices == []


def test_stdio_tool_call_returns_the_server_text(stdio_server):
    result = run(stdio_server[0], "get_weather", city="oslo")
    assert result.ok and result.output == "Weather in Oslo: 17 degrees Celsius and foggy, wind from the west."


def test_a_tool_that_changes_things_asks_first(stdio_server):
    registry, _ = stdio_server
    assert "did not allow" in run(registry, "add_note", confirm=lambda t, c: False, text="buy milk").output
    assert run(registry, "add_note", confirm=lambda t, c: True, text="buy milk").output == "saved note 1"


def test_ten_megabytes_and_orders_from_a_server_are_data(stdio_server):
    registry, _ = stdio_server
    flood = run(registry, "flood", megabytes=1.0)  # 10 MB through the registry: test_tools.py (MCP's JSON costs ~10 s)
    assert flood.ok and flood.truncated and len(flood.output) < 4100
    inject = run(registry, "inject")
    assert "<|im_start|>" not in inject.output and "<|im_end|>" not in inject.output


def test_a_call_that_hangs_times_out_and_the_server_still_answers(stdio_server):
    registry, notices = stdio_server
    started = time.monotonic()
    result = run(registry, "slow", turn_s=2.0, seconds=60)
    assert not result.ok and "did not answer within 2.0 s" in result.output and time.monotonic() - started < 4
    assert run(registry, "get_weather", city="Rome").ok and notices == []


def test_a_server_that_dies_mid_call_gives_one_notice_and_the_rest_goes_on(tmp_path):
    registry, notices, connections = connect(tmp_path, MCPServerSpec("fragile", (sys.executable, SERVER)),
                                             tools=[clock_tool()])
    try:
        assert connections.wait_ready(60)
        result = run(registry, "crash")
        assert not result.ok and "stopped" in result.output
        time.sleep(0.5)
        assert len(notices) == 1 and "MCP server fragile" in notices[0][1] and "goes on" in notices[0][1]
        assert [t.name for t in registry.tools()] == ["get_time"]  # its tools are off, the built-ins stay
        assert run(registry, "get_time").ok
        assert not run(registry, "get_weather", city="Oslo").ok and len(notices) == 1
    finally:
        connections.close()


def test_servers_that_cannot_start_or_hang_give_one_notice_each(tmp_path):
    hang = MCPServerSpec("sleepy", (sys.executable, "-c", "import time; time.sleep(60)"), start_timeout_s=2)
    missing = MCPServerSpec("missing", ("/nonexistent/mcp-server",))
    exits = MCPServerSpec("exits", (sys.executable, "-c", "import sys; print('no config', file=sys.stderr); "
                                                          "sys.exit(1)"))
    started = time.monotonic()
    registry, notices, connections = connect(tmp_path, hang, missing, exits, tools=[clock_tool()])
    try:
        assert not connections.wait_ready(30)
        assert time.monotonic() - started < 15
        by_server = {name: [m for _, m in notices if f"MCP server {name} " in m]
                     for name in ("sleepy", "missing", "exits")}
        assert all(len(found) == 1 for found in by_server.values()), notices
        assert "did not start within 2 s" in by_server["sleepy"][0]
        assert "command not found" in by_server["missing"][0]
        assert "no config" in by_server["exits"][0]  # its last words on stderr
        assert [t.name for t in registry.tools()] == ["get_time"]
    finally:
        connections.close()


def test_streamable_http_server(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, SERVER, "--http", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/mcp", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        registry, notices, connections = connect(tmp_path, MCPServerSpec("web", url=f"http://127.0.0.1:{port}/mcp"))
        try:
            assert connections.wait_ready(30), notices
            assert run(registry, "get_weather", city="Lima").output.startswith("Weather in Lima:")
        finally:
            connections.close()
    finally:
        process.kill()
        process.wait()


def test_mcp_config_tables_are_checked():
    specs = parse_mcp_servers({"weather": {"command": ["python", "w.py"], "confirm": "never", "timeout-s": 5},
                               "web": {"url": "http://127.0.0.1:9/mcp"}}, "config.toml")
    assert specs["weather"].command == ("python", "w.py") and specs["weather"].call_timeout_s == 5
    assert specs["web"].url.endswith("/mcp")
    for table, problem in [({"x": {"command": "python w.py"}}, "list of strings"),
                           ({"x": {"command": ["a"], "url": "http://h"}}, "either command"),
                           ({"x": {}}, "either command"), ({"x": {"command": ["a"], "confirm": "maybe"}}, "confirm"),
                           ({"x": {"command": ["a"], "shell": True}}, "unknown key 'shell'")]:
        with pytest.raises(AgentError, match=problem):
            parse_mcp_servers(table, "config.toml")
