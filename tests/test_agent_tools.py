"""The agent with tools, end to end: espeak-ng questions as the microphone, the real Whisper
tiny.en, the real SmolLM2-135M on llama.cpp (in-process and behind llama-cpp-python's server), a
real MCP server over stdio, a tiny random CSM speaking into an in-memory speaker."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _stage_helpers import EventLog, converse

from agent.audio import MemorySink, load_audio, write_wav
from agent.config.settings import AgentSettings
from agent.conversation.conversation import Conversation
from agent.events import AgentText, AgentTurnDone, Notice, ToolUse
from agent.llm.base import ChatLLM
from agent.pipeline import Pipeline
from agent.tools.registry import ToolCall

pytestmark = pytest.mark.e2e
TIMEOUT_S = 300.0
MCP_SERVER = str(Path(__file__).with_name("_mcp_server.py"))
WEATHER_QUESTION = "What's the weather in Paris today?"


def persona_with(tmp_path: Path, chat_persona: Path, extra: str) -> Path:
    """The test persona (tests/conftest.py) with top-level keys added (before its [llm] table)."""
    directory = tmp_path / "persona"
    directory.mkdir(exist_ok=True)
    shutil.copy(chat_persona.parent / "voice.wav", directory / "voice.wav")
    head, llm = chat_persona.read_text(encoding="utf-8").split("[llm]")
    path = directory / "tools.toml"
    path.write_text(f"{head}{extra}\n[llm]{llm}", encoding="utf-8")
    return path


def settings(tmp_path: Path, persona: Path, **changes) -> AgentSettings:
    values = dict(csm_model="unused", persona=str(persona), save_dir=str(tmp_path / "saved"), headless=True,
                  watermark=False, seed=7, device="cpu", turn="silence", realtime=False)
    values.update(changes)
    return AgentSettings(**values)


def mic(tmp_path: Path, espeak_wav, texts: list[str], tail_s: float = 1.0, name: str = "mic.wav") -> Path:
    silence = lambda s: np.zeros(int(s * 16_000), np.float32)  # noqa: E731
    parts = [silence(0.5)]
    for text in texts:
        parts += [load_audio(espeak_wav(text), 16_000), silence(1.5)]
    parts.append(silence(tail_s))
    return write_wav(tmp_path / name, np.concatenate(parts), 16_000)


def weather_mcp() -> dict:
    return {"weather": {"command": [sys.executable, MCP_SERVER, "--tools", "get_weather"], "timeout-s": 30}}


def run_pipeline(config: AgentSettings, models, events=None, **kwargs) -> tuple[Pipeline, EventLog]:
    events = events or EventLog()
    pipeline = Pipeline(config, events, sink=MemorySink(), generator=models["csm"],
                        llm=kwargs.pop("llm", models["llm"]), transcriber=models["asr"], **kwargs)
    converse(pipeline, events, TIMEOUT_S)
    return pipeline, events


@pytest.fixture(scope="module")
def models(tiny_generator, smollm2_llm, faster_whisper_tiny):
    return {"csm": tiny_generator, "llm": smollm2_llm, "asr": faster_whisper_tiny}


# ----------------------------------------------------------------------------- MCP, spoken


def test_spoken_question_calls_a_real_mcp_server_and_the_answer_speaks_its_result(
        tmp_path, chat_persona, espeak_wav, models):
    persona = persona_with(tmp_path, chat_persona, 'mcp = ["weather"]')
    config = settings(tmp_path, persona, mic_file=str(mic(tmp_path, espeak_wav, [WEATHER_QUESTION])),
                      mcp=weather_mcp(), tool_mode="constrained")
    pipeline, events = run_pipeline(config, models)
    tools = [e for e in events.of(ToolUse) if e.output is not None]
    assert tools and tools[0].call.startswith("get_weather(") and tools[0].ok, events.of(ToolUse)
    assert tools[0].output.startswith("Weather in Paris: 17 degrees")
    answer = events.of(AgentTurnDone)[0].text
    assert "17" in answer or "fog" in answer.lower(), answer
    assert [n for n in events.of(Notice) if n.level != "info"] == []
    saved = json.loads((tmp_path / "saved" / "conversation.json").read_text())
    agent_turn = saved["turns"][1]
    assert agent_turn["tools"][0]["name"] == "get_weather" and "Paris" in agent_turn["tools"][0]["output"]
    assert "tools" not in " ".join(s["text"] for s in agent_turn["sentences"])  # calls are never spoken
    # --replay reads it and speaks only the sentences
    from agent.speak.replay import replay_conversation

    result = replay_conversation(tmp_path / "saved", tmp_path / "replayed", models["csm"], seed=1, max_audio_ms=480)
    assert result.turns == 1


def test_the_same_through_llama_cpp_python_server(tmp_path, chat_persona, espeak_wav, models):
    from test_llm import LlamaServer

    from agent.llm.server import OpenAICompatibleLLM

    server = LlamaServer().start()
    try:
        persona = persona_with(tmp_path, chat_persona, 'mcp = ["weather"]')
        config = settings(tmp_path, persona, mic_file=str(mic(tmp_path, espeak_wav, [WEATHER_QUESTION])),
                          mcp=weather_mcp(), tool_mode="constrained", llm_url=server.url)
        pipeline, events = run_pipeline(config, models, llm=OpenAICompatibleLLM(server.url, timeout_s=120))
    finally:
        server.kill()
    tools = [e for e in events.of(ToolUse) if e.output is not None]
    assert tools and tools[0].call.startswith("get_weather(") and tools[0].output.startswith("Weather in")
    assert events.of(AgentTurnDone)[0].text.strip()


# ----------------------------------------------------------------------------- timers


def test_a_timer_set_by_voice_is_spoken_when_due(tmp_path, chat_persona, espeak_wav, models):
    persona = persona_with(tmp_path, chat_persona, 'tools = ["timers"]')
    question = mic(tmp_path, espeak_wav, ["Set a timer for five seconds."], tail_s=9.0)
    config = settings(tmp_path, persona, mic_file=str(question), realtime=True, tool_mode="constrained")
    events = EventLog()
    stamps: dict[str, float] = {}

    def watch(event):
        events(event)
        if isinstance(event, ToolUse) and event.output and event.call.startswith("set_timer"):
            stamps.setdefault("set", time.monotonic())
        if isinstance(event, AgentTurnDone) and "set" in stamps:
            stamps.setdefault("reply_done", time.monotonic())
        if isinstance(event, AgentText) and "timer is done" in event.text:
            stamps.setdefault("rang", time.monotonic())

    pipeline = Pipeline(config, watch, sink=MemorySink(), generator=models["csm"], llm=models["llm"],
                        transcriber=models["asr"])
    converse(pipeline, events, TIMEOUT_S)
    assert "set" in stamps, [e for e in events.of(ToolUse)]
    assert "rang" in stamps, [e.text for e in events.of(AgentTurnDone)]
    # Never early; on time, or as soon as the reply in flight is over (it is not interrupted).
    assert stamps["rang"] - stamps["set"] >= 4.5
    assert stamps["rang"] <= max(stamps["set"] + 5.0, stamps["reply_done"]) + 2.0
    assert [e.text for e in events.of(AgentTurnDone)][-1] == "Your 5 second timer is done."
    assert [t.role for t in pipeline.conversation.turns][-1] == "agent"


def test_a_timer_set_before_a_restart_fires_after_it(tmp_path, chat_persona, espeak_wav, models):
    import os

    persona = persona_with(tmp_path, chat_persona, 'tools = ["timers"]')
    first = settings(tmp_path, persona, mic_file=str(mic(tmp_path, espeak_wav, ["Set a timer for five seconds."])),
                     tool_mode="constrained", save_dir=str(tmp_path / "one"))
    events, set_done = EventLog(), threading.Event()

    def watch(event):
        events(event)
        if isinstance(event, ToolUse) and event.output and event.call.startswith("set_timer"):
            set_done.set()

    pipeline = Pipeline(first, watch, sink=MemorySink(), generator=models["csm"], llm=models["llm"],
                        transcriber=models["asr"])
    try:
        pipeline.start()
        pipeline.wait_ready(TIMEOUT_S)
        assert set_done.wait(TIMEOUT_S), events.of(ToolUse)
    finally:
        pipeline.stop()  # csm-chat quits right after setting it
    timers = json.loads((Path(os.environ["XDG_DATA_HOME"]) / "csm-chat" / "timers.json").read_text())
    assert [t["fired_at"] for t in timers["timers"]] == [None]
    quiet = write_wav(tmp_path / "quiet.wav", np.zeros(16_000 * 8, np.float32), 16_000)
    second = settings(tmp_path, persona, mic_file=str(quiet), realtime=True, save_dir=str(tmp_path / "two"))
    pipeline, events = run_pipeline(second, models)
    said = [e.text for e in events.of(AgentTurnDone)]
    assert len(said) == 1 and said[0].startswith("Your 5 second timer is done."), said


# ----------------------------------------------------------------------------- memory


def test_remembered_in_one_conversation_in_front_of_the_llm_in_the_next(tmp_path, chat_persona, espeak_wav, models):
    # Typed, because Whisper tiny.en hears espeak's "Ada" as "Aida", "Nader" or "A" (measured); the
    # question in the next conversation is spoken. Memory needs no tools: "remember that ..." is
    # stored in the user's words, and what is relevant is put in front of the LLM.
    persona = chat_persona
    events = EventLog()
    first = Pipeline(settings(tmp_path, persona, save_dir=str(tmp_path / "one")), events,
                     source=False, sink=MemorySink(), generator=models["csm"], llm=models["llm"],
                     transcriber=models["asr"])
    try:
        first.start()
        first.wait_ready(TIMEOUT_S)
        first.submit_text("Remember that my sister's name is Ada.")
        events.wait_for(lambda: events.of(AgentTurnDone), "a reply")
    finally:
        first.stop()
    saved_one = json.loads((tmp_path / "one" / "conversation.json").read_text())
    assert saved_one["turns"][1]["tools"][0]["name"] == "remember"
    second = settings(tmp_path, persona, save_dir=str(tmp_path / "two"),
                      mic_file=str(mic(tmp_path, espeak_wav, ["What is my sister's name?"], name="b.wav")))
    pipeline, events = run_pipeline(second, models)
    given = pipeline.think.assist.last_messages
    notes = [m["content"] for m in given if m["role"] == "system" and "earlier conversations" in m["content"]]
    assert notes and "my sister's name is ada" in notes[0].lower(), given
    answer = events.of(AgentTurnDone)[0].text
    assert "ada" in answer.lower(), answer  # SmolLM2-135M, greedy: "Your sister's name is Ada."


def test_a_corrupt_memory_store_is_one_notice_and_the_conversation_goes_on(tmp_path, chat_persona, models):
    import os

    store = Path(os.environ["XDG_DATA_HOME"]) / "csm-chat" / "memory.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_bytes(b"\x00garbage, not a database" * 100)
    events = EventLog()
    pipeline = Pipeline(settings(tmp_path, chat_persona), events, source=False, sink=MemorySink(),
                        generator=models["csm"], llm=models["llm"], transcriber=models["asr"])
    try:
        pipeline.start()
        pipeline.wait_ready(TIMEOUT_S)
        pipeline.submit_text("Hello there.")
        events.wait_for(lambda: events.of(AgentTurnDone), "a reply")
    finally:
        pipeline.stop()
    warnings = [n.message for n in events.of(Notice) if n.level == "warning" and "memory store" in n.message]
    assert len(warnings) == 1 and "moved to" in warnings[0]
    assert list(store.parent.glob("memory.db.corrupt-*"))
    assert events.of(AgentTurnDone)[0].text


# ----------------------------------------------------------------------------- bad tools, scripted calls


class ToolScriptLLM(ChatLLM):
    """Asks for the scripted tool calls one turn at a time, then answers with the last result it got.

    The real SmolLM2 cannot be made to call a tool that crashes; the failures themselves are real
    (a real MCP server, real tools)."""

    name = "tool-script"

    def __init__(self, calls: list[tuple[str, dict]]) -> None:
        super().__init__()
        self.calls = list(calls)

    def stream_reply(self, messages, cancel=None, *, sampling=None):
        yield "Okay."

    def stream_turn(self, messages, tools, cancel=None, *, sampling=None, mode="auto"):
        if messages[-1]["role"] == "tool":
            yield f"The tool said: {messages[-1]['content'][:60]}."
        elif self.calls and tools:
            name, arguments = self.calls.pop(0)
            yield ToolCall(f"c{len(self.calls)}", name, arguments)
        else:
            yield "Nothing to do."


def test_bad_tools_each_give_one_error_result_and_the_conversation_goes_on(tmp_path, chat_persona, models):
    persona = persona_with(tmp_path, chat_persona, 'mcp = ["weather"]')
    script = [("inject", {}), ("flood", {"megabytes": 1.0}), ("slow", {"seconds": 60}), ("crash", {}),
              ("get_weather", {"city": "Oslo"})]
    events = EventLog()
    config = settings(tmp_path, persona, mcp={"weather": {"command": [sys.executable, MCP_SERVER], "timeout-s": 3}})
    pipeline = Pipeline(config, events, source=False, sink=MemorySink(), generator=models["csm"],
                        llm=ToolScriptLLM(script), transcriber=models["asr"])
    try:
        pipeline.start()
        pipeline.wait_ready(TIMEOUT_S)
        pipeline.services.wait_for_servers(60)
        for i in range(len(script)):
            pipeline.submit_text(f"Question {i}.")
            events.wait_for(lambda i=i: len(events.of(AgentTurnDone)) > i, f"reply {i}")
    finally:
        pipeline.stop()
    results = [e for e in events.of(ToolUse) if e.output is not None]
    assert [r.ok for r in results] == [True, True, False, False]
    assert "<|im_start|>" not in results[0].output and len(results[1].output) <= 2010
    assert "did not answer within 3" in results[2].output and "stopped" in results[3].output
    assert events.of(AgentTurnDone)[4].text == "Nothing to do."  # the dead server's tools are no longer offered
    stopped = [n for n in events.of(Notice) if "MCP server weather" in n.message]
    assert len(stopped) == 1
    saved = Conversation.load(tmp_path / "saved")
    assert [t.role for t in saved.turns] == ["user", "agent"] * 5 and all(t.text for t in saved.turns)
    assert saved.turns[1].tools[0]["name"] == "inject"
    # the system prompt the LLM gets is csm-chat's own, whatever a tool said
    assert all("Ignore all previous" not in m["content"] for m in pipeline.think.assist.last_messages
               if m["role"] == "system")
