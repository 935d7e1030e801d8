"""The agent's tool and memory parts around the LLM: what the TUI shows, the CLI's --forget and
--memory, config and persona keys, the filler for a slow tool, barge-in during a tool, asking
before a tool that changes things, and old turns folded into a summary instead of dropped."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _stage_helpers import EventLog

from agent.audio import MemorySink
from agent.config.file import load_settings
from agent.config.personas import parse_persona
from agent.config.settings import AgentSettings
from agent.conversation.conversation import Conversation
from agent.errors import AgentError
from agent.events import AgentText, AgentTurnDone, ToolUse
from agent.llm.base import ChatLLM
from agent.memory.store import MemoryStore
from agent.memory.summaries import fold_old_turns
from agent.pipeline import Pipeline
from agent.tools.registry import ToolCall

MCP_SERVER = str(Path(__file__).with_name("_mcp_server.py"))
TIMEOUT_S = 240.0


# ----------------------------------------------------------------------------- TUI


def test_tui_shows_a_tool_call_then_its_result_before_the_answer():
    from agent.tui.app import CsmChatApp
    from agent.tui.messages import PipelineEvent
    from agent.tui.widgets import Transcript

    def broken(settings, emit):
        raise AgentError("no pipeline in this test")

    async def run():
        app = CsmChatApp(AgentSettings(), pipeline_factory=broken, personas=lambda: [])
        async with app.run_test(size=(110, 30)) as pilot:
            app.on_pipeline_event(PipelineEvent(ToolUse(2, 'get_weather(city="Oslo")')))
            await pilot.pause()
            app.on_pipeline_event(PipelineEvent(ToolUse(2, 'get_weather(city="Oslo")', "17 degrees [b]and[/b] fog")))
            app.on_pipeline_event(PipelineEvent(AgentText(2, "It is foggy in Oslo.")))
            await pilot.pause()
            views = app.query_one(Transcript).turns
            assert [v.role for v in views] == ["tool", "agent"]
            assert views[0].plain == 'Tool: get_weather(city="Oslo") -> 17 degrees [b]and[/b] fog'

    asyncio.run(run())


# ----------------------------------------------------------------------------- CLI, config, persona


def test_headless_output_prints_each_tool_result():
    import io

    from agent.cli import TurnPrinter

    out = io.StringIO()
    printer = TurnPrinter(out=out, err=io.StringIO())
    printer(ToolUse(2, 'get_weather(city="Oslo")'))  # started: not printed
    printer(ToolUse(2, 'get_weather(city="Oslo")', "17 degrees\nand fog"))
    printer(ToolUse(2, "crash()", "the MCP server stopped", ok=False))
    assert out.getvalue().splitlines() == ['tool: get_weather(city="Oslo") -> 17 degrees and fog',
                                           "tool: crash() -> error: the MCP server stopped"]


def _cli(*args, env):
    return subprocess.run([str(Path(sys.executable).with_name("csm-chat")), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_forget_all_or_matching(tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    store = MemoryStore(tmp_path / "data" / "csm-chat" / "memory.db")
    for fact in ("my sister's name is Ada", "my brother's name is Tom", "I live in Oslo"):
        store.remember(fact)
    store.close()
    matching = _cli("--forget", "sister", env=env)
    assert matching.returncode == 0 and "forgot 1 memory (matching 'sister')" in matching.stdout, matching.stderr
    everything = _cli("--forget", env=env)
    assert everything.returncode == 0 and "forgot 2 memories (in all)" in everything.stdout
    assert MemoryStore(tmp_path / "data" / "csm-chat" / "memory.db").count() == 0


def test_config_and_persona_keys_for_tools(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('tools = true\ntool-mode = "constrained"\nmemory = "off"\n'
                      '[mcp.weather]\ncommand = ["python", "w.py"]\nconfirm = "never"\n', encoding="utf-8")
    settings = load_settings(config)
    assert settings.tools and settings.tool_mode == "constrained" and settings.memory == "off"
    assert settings.mcp["weather"]["command"] == ["python", "w.py"]
    config.write_text('[mcp.weather]\ncommand = "python w.py"\n', encoding="utf-8")
    with pytest.raises(AgentError, match=r"\[mcp.weather\]: command must be a list"):
        load_settings(config)
    with pytest.raises(AgentError, match="--memory must be on or off"):
        AgentSettings(memory="maybe")
    persona = parse_persona({"name": "P", "system_prompt": "Hi.", "tools": ["clock", "timers"], "mcp": ["weather"]},
                            "p.toml")
    assert persona.tools == ("clock", "timers") and persona.mcp == ("weather",)
    with pytest.raises(AgentError, match="unknown tool 'shell'"):
        parse_persona({"name": "P", "system_prompt": "Hi.", "tools": ["shell"]}, "p.toml")


# ----------------------------------------------------------------------------- in the pipeline


class ScriptLLM(ChatLLM):
    """Calls the scripted tool when offered it, then answers from the result (the tool side is real)."""

    name = "script"

    def __init__(self, calls):
        super().__init__()
        self.calls = list(calls)

    def stream_reply(self, messages, cancel=None, *, sampling=None):
        yield "Okay."

    def stream_turn(self, messages, tools, cancel=None, *, sampling=None, mode="auto"):
        if messages[-1]["role"] == "tool":
            yield f"Done: {messages[-1]['content'][:50]}."
        elif self.calls and tools:
            name, arguments = self.calls.pop(0)
            yield ToolCall("c1", name, arguments)
        else:
            yield "Nothing to do."


def _pipeline(tmp_path, chat_persona, tiny_generator, llm, extra, mcp=None):
    directory = tmp_path / "persona"
    directory.mkdir(exist_ok=True)
    (directory / "voice.wav").write_bytes((chat_persona.parent / "voice.wav").read_bytes())
    head, tail = chat_persona.read_text(encoding="utf-8").split("[llm]")
    persona = directory / "p.toml"
    persona.write_text(f"{head}{extra}\n[llm]{tail}", encoding="utf-8")
    settings = AgentSettings(csm_model="unused", persona=str(persona), save_dir=str(tmp_path / "saved"),
                             headless=True, watermark=False, device="cpu", turn="silence", mcp=mcp)
    events = EventLog()
    pipeline = Pipeline(settings, events, source=False, sink=MemorySink(), generator=tiny_generator, llm=llm)
    pipeline.start()
    pipeline.wait_ready(TIMEOUT_S)
    return pipeline, events


def test_a_slow_tool_makes_the_agent_say_a_filler_and_barge_in_cancels_it(tmp_path, chat_persona, tiny_generator):
    mcp = {"w": {"command": [sys.executable, MCP_SERVER, "--tools", "slow"], "timeout-s": 60}}
    pipeline, events = _pipeline(tmp_path, chat_persona, tiny_generator, ScriptLLM([("slow", {"seconds": 30})]),
                                 'mcp = ["w"]', mcp)
    try:
        pipeline.services.wait_for_servers(60)
        asked = time.monotonic()
        pipeline.submit_text("Take your time.")
        events.wait_for(lambda: any(e.text == "One moment." for e in events.of(AgentText)), "the filler", 30)
        said = time.monotonic() - asked
        pipeline.interrupt()  # barge-in while the tool runs
        events.wait_for(lambda: events.of(AgentTurnDone), "the reply to end", 30)
        ended = time.monotonic() - asked
    finally:
        pipeline.stop()
    assert 0.9 <= said < 5 and ended < 10  # not the tool's 30 s
    assert events.of(AgentTurnDone)[0].interrupted  # (its text: only what had played before the cut)
    results = [e for e in events.of(ToolUse) if e.output is not None]
    assert len(results) == 1 and not results[0].ok and "cancelled" in results[0].output


def test_a_tool_that_changes_things_waits_for_a_yes(tmp_path, chat_persona, tiny_generator):
    mcp = {"notes": {"command": [sys.executable, MCP_SERVER, "--tools", "add_note"]}}
    llm = ScriptLLM([("add_note", {"text": "buy milk"}), ("add_note", {"text": "buy eggs"})])
    pipeline, events = _pipeline(tmp_path, chat_persona, tiny_generator, llm, 'mcp = ["notes"]', mcp)
    try:
        pipeline.services.wait_for_servers(60)
        for i, text in enumerate(["Note that I need milk.", "Yes, go ahead.", "Note that I need eggs.", "No."]):
            pipeline.submit_text(text)
            events.wait_for(lambda i=i: len(events.of(AgentTurnDone)) > i, f"reply {i}", 60)
    finally:
        pipeline.stop()
    said = [e.text for e in events.of(AgentTurnDone)]
    assert said[0] == "Shall I use add note from notes? Say yes to go ahead."
    assert said[1] == "Done: saved note 1."  # ran after the yes
    assert said[2].startswith("Shall I use add note") and said[3] == "Nothing to do."  # "no": not run
    ran = [e for e in events.of(ToolUse) if e.ok and e.output]
    assert [e.output for e in ran] == ["saved note 1"]
    saved = json.loads((tmp_path / "saved" / "conversation.json").read_text())
    assert saved["turns"][1]["tools"][0]["waiting_for_yes"] and saved["turns"][3]["tools"][0]["ok"]


def test_old_turns_are_folded_into_a_summary_not_dropped(smollm2_llm):
    conversation = Conversation()
    conversation.add_user_turn("My dog is called Biscuit and he is three years old.", None, typed=True)
    for i in range(8):
        conversation.add_agent_turn([], None, text=f"That is lovely, tell me more about day {i}. {'la ' * 30}")
        conversation.add_user_turn(f"Here is more about my day number {i}. {'blah ' * 25}", None, typed=True)
    assert fold_old_turns(conversation, smollm2_llm, fold_at=1500, keep_recent=600)
    upto, text = conversation.summary
    messages = conversation.llm_messages("Be brief.")
    assert messages[1]["role"] == "system" and messages[1]["content"].startswith("Earlier in this conversation")
    kept = [m for m in messages if m["role"] != "system"]
    assert kept and sum(len(m["content"]) for m in kept) <= 800 and text
    assert all(t.id > upto for t in conversation.turns if t.text in {m["content"] for m in kept})
    saved = Conversation.load(conversation.save(Path(os.environ["XDG_DATA_HOME"]) / "folded"))
    assert saved.summary == conversation.summary  # the summary is saved with the conversation


def test_memory_off_keeps_nothing_and_offers_no_memory_tools(tmp_path):
    from agent.tools.services import AgentServices

    persona = parse_persona({"name": "P", "system_prompt": "Hi.", "tools": ["clock", "memory"]}, "p.toml")
    notices = []
    off = AgentServices(AgentSettings(memory="off"), persona, lambda level, message: notices.append(message),
                        announce=lambda text: None)
    try:
        assert off.memory is None and [t.name for t in off.session.registry.tools()] == ["get_time"]
    finally:
        off.close()
    on = AgentServices(AgentSettings(), persona, lambda level, message: notices.append(message),
                       announce=lambda text: None)
    try:
        assert {"remember", "recall", "forget"} <= {t.name for t in on.session.registry.tools()}
        assert on.memory.path == Path(os.environ["XDG_DATA_HOME"]) / "csm-chat" / "memory.db"
    finally:
        on.close()
    nothing = AgentServices(AgentSettings(), parse_persona({"name": "P", "system_prompt": "Hi."}, "p.toml"),
                            lambda level, message: None, announce=lambda text: None)
    assert nothing.session is None  # tools are off unless the config or the persona turns them on
    nothing.close()
    assert notices == []
