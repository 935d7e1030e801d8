"""Tool calling in both LLM backends: the embedded SmolLM2 on llama.cpp (constrained by a grammar)
and the OpenAI tools API (a scripted server streaming tool-call fragments). llama-cpp-python's own
server (constrained by a JSON schema) is driven through the whole agent in test_agent_tools.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from agent.llm.base import Sampling
from agent.llm.server import OpenAICompatibleLLM
from agent.llm.tool_calling import assistant_tool_message, tool_message
from agent.tools.builtin import calculator_tool, clock_tool
from agent.tools.registry import Tool, ToolCall, ToolLimits, ToolRegistry
from agent.tools.turn import ToolEvents, ToolSession, stream_with_tools, system_prompt_with_tools

GREEDY = Sampling(temperature=0.0, max_tokens=40)
FORECAST = "Weather in {city}: 17 degrees Celsius and foggy, wind from the west."


def weather_tool(log=None):
    def forecast(arguments, cancel):
        if log is not None:
            log.append(arguments)
        return FORECAST.format(city=arguments.get("city", "?"))

    return Tool("get_weather", "Get the current weather forecast for a city.",
                {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}, forecast)


def ask(question):
    return [{"role": "system", "content": system_prompt_with_tools("You are a helpful assistant. Answer in one short "
                                                                   "sentence.")},
            {"role": "user", "content": question}]


# ----------------------------------------------------------------------------- llama.cpp, in-process


def test_smollm2_constrained_choice_is_always_a_listed_tool_with_valid_arguments(smollm2_llm):
    tools = [clock_tool(), calculator_tool(), weather_tool()]
    names = {t.name for t in tools}
    for question in ("What time is it in Tokyo?", "What is 17 times 23?", "Hello, how are you?"):
        items = list(smollm2_llm.stream_turn(ask(question), tools, sampling=GREEDY, mode="constrained"))
        calls = [i for i in items if isinstance(i, ToolCall)]
        text = "".join(i for i in items if isinstance(i, str))
        assert bool(calls) != bool(text.strip()), items  # a call, or an answer: never both, never neither
        for call in calls:
            assert call.name in names and call.error is None and isinstance(call.arguments, dict)
            required = next(t for t in tools if t.name == call.name).parameters.get("required", [])
            assert all(key in call.arguments for key in required)


def test_smollm2_calls_the_weather_tool_and_answers_from_its_result(smollm2_llm):
    asked: list[dict] = []
    seen: list = []
    session = ToolSession(ToolRegistry([weather_tool(asked)]))
    events = ToolEvents(on_call=seen.append, on_result=seen.append)
    answer = "".join(stream_with_tools(smollm2_llm, ask("What's the weather in Paris today?"), session,
                                       sampling=GREEDY, events=events))
    assert asked and "paris" in asked[0]["city"].lower()
    assert isinstance(seen[0], ToolCall) and seen[1].ok and seen[1].output.startswith("Weather in Paris")
    assert "17" in answer or "fog" in answer.lower(), answer  # the answer speaks the tool's result


def test_after_the_results_the_model_answers_without_calling_again(smollm2_llm):
    call = ToolCall("c1", "get_weather", {"city": "Oslo"})
    messages = ask("What is the weather in Oslo?") + [assistant_tool_message([call]),
                                                       tool_message("c1", FORECAST.format(city="Oslo"))]
    items = list(smollm2_llm.stream_turn(messages, [weather_tool()], sampling=GREEDY, mode="constrained"))
    assert items and all(isinstance(i, str) for i in items)


def test_a_broken_tool_and_the_call_limit_still_end_in_an_answer(smollm2_llm):
    def broken(arguments, cancel):
        raise OSError("the weather station is on fire")

    tool = Tool("get_weather", "Get the current weather forecast for a city.",
                {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}, broken)
    results = []
    answer = "".join(stream_with_tools(smollm2_llm, ask("What's the weather in Paris today?"),
                                       ToolSession(ToolRegistry([tool]), ToolLimits(max_calls=1)), sampling=GREEDY,
                                       events=ToolEvents(on_result=results.append)))
    assert len(results) <= 1 and all(not r.ok and "on fire" in r.output for r in results)
    assert answer.strip()


# ----------------------------------------------------------------------------- the OpenAI tools API


class _ToolServer(ThreadingHTTPServer):
    """Answers the first chat request with a streamed tool call (in fragments), the next with text."""

    daemon_threads = True

    def __init__(self):
        self.requests: list[dict] = []
        super().__init__(("127.0.0.1", 0), _ToolHandler)


class _ToolHandler(BaseHTTPRequestHandler):
    server: _ToolServer

    def log_message(self, *args):
        pass

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if request["messages"][-1]["role"] == "user":
            fragments = [{"index": 0, "id": "call_7", "type": "function", "function": {"name": "get_weather",
                                                                                        "arguments": ""}},
                         {"index": 0, "function": {"arguments": '{"ci'}}, {"index": 0, "function": {"arguments":
                                                                                                     'ty": "Oslo"}'}}]
            chunks = [{"choices": [{"index": 0, "delta": {"tool_calls": [f]}}]} for f in fragments]
        else:
            result = request["messages"][-1]["content"]
            chunks = [{"choices": [{"index": 0, "delta": {"content": w + " "}}]} for w in f"Here: {result}".split()]
        for chunk in chunks:
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


def test_openai_tools_api_fragments_are_joined_and_results_go_back_as_tool_messages():
    server = _ToolServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        llm = OpenAICompatibleLLM(server.url if hasattr(server, "url") else f"http://127.0.0.1:{server.server_port}",
                                  model="m", timeout_s=5)
        asked: list[dict] = []
        session = ToolSession(ToolRegistry([weather_tool(asked)]))
        answer = "".join(stream_with_tools(llm, ask("Weather in Oslo?"), session, sampling=GREEDY))
    finally:
        server.shutdown()
        server.server_close()
    assert asked == [{"city": "Oslo"}]
    first, second = server.requests
    assert first["tools"][0]["function"]["name"] == "get_weather" and first["tool_choice"] == "auto"
    assert second["messages"][-2]["tool_calls"][0]["id"] == "call_7"
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_7", "content": FORECAST.format(city="Oslo")}
    assert answer.strip() == "Here: " + FORECAST.format(city="Oslo")
