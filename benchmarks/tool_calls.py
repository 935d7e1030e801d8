"""Which tool does an LLM call for spoken requests? espeak-ng -> Whisper tiny.en -> the LLM with tools.

    python benchmarks/tool_calls.py [--llm-model PATH.gguf] [--mode auto|native|constrained]

Each request is spoken by espeak-ng, transcribed by the embedded Whisper tiny.en, and answered
through the agent's tool loop (``agent.tools.turn.stream_with_tools``) with the built-in tools
(clock, calculator, timers, memory) and a weather tool that stands for an MCP server's. Timers are
written to a temporary file and never ring; memory goes to a temporary store. Prints a Markdown
table (request, heard, tool expected, tool called, answer) and one JSON object with provenance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import provenance  # noqa: E402

from agent.audio import load_audio  # noqa: E402
from agent.llm.base import Sampling  # noqa: E402
from agent.tools.registry import Tool, ToolRegistry  # noqa: E402
from agent.tools.turn import ToolEvents, ToolSession, stream_with_tools, system_prompt_with_tools  # noqa: E402

REQUESTS = [  # (what the user says, the tool that should answer it; "none": just talk)
    ("What time is it?", "get_time"),
    ("What time is it in Tokyo?", "get_time"),
    ("What is seventeen times twenty three?", "calculate"),
    ("How much is two hundred and fifty divided by five?", "calculate"),
    ("Set a timer for ten minutes.", "set_timer"),
    ("Remind me to call my mother at five pm.", "set_reminder"),
    ("What's the weather in Paris today?", "get_weather"),
    ("Is it going to rain in London?", "get_weather"),
    ("Remember that my sister's name is Ada.", "remember"),
    ("What did I tell you about my sister?", "recall"),
    ("Tell me a joke.", "none"),
    ("How are you today?", "none"),
]
SYSTEM = "You are a helpful voice assistant. Answer in one short sentence."


def tools(directory: Path) -> list[Tool]:
    from agent.memory.store import MemoryStore
    from agent.memory.tools import memory_tools
    from agent.tools.builtin import calculator_tool, clock_tool
    from agent.tools.timers import TimerStore, timer_tools

    weather = Tool("get_weather", "Get the current weather forecast for a city.",
                   {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                   lambda a, c: f"Weather in {a.get('city', '?')}: 17 degrees Celsius and foggy.")
    return [clock_tool(), calculator_tool(), *timer_tools(TimerStore(directory / "timers.json")),
            *memory_tools(MemoryStore(directory / "memory.db")), weather]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-model", help="a GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--mode", default="auto", choices=("auto", "native", "constrained"))
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    from agent.listen.asr import FasterWhisperTranscriber
    from agent.llm.local import LocalLLM
    from agent.llm.local_tools import resolve_mode

    info: dict = {"loadavg_start": os.getloadavg()}
    llm = LocalLLM(args.llm_model, seed=1234)
    asr = FasterWhisperTranscriber()
    work = Path(tempfile.mkdtemp(prefix="tool-calls-"))
    session = ToolSession(ToolRegistry(tools(work)), mode=args.mode)
    rows = []
    for text, expected in REQUESTS:
        wav = work / "request.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(wav), text], check=True)
        heard = asr.transcribe(load_audio(wav, 16_000)).text
        calls: list[str] = []
        results: list[str] = []
        events = ToolEvents(on_call=lambda c, calls=calls: calls.append(c.describe()),
                            on_result=lambda r, results=results: results.append(r.for_llm()))
        messages = [{"role": "system", "content": system_prompt_with_tools(SYSTEM)}, {"role": "user", "content": heard}]
        started = time.perf_counter()
        answer = "".join(stream_with_tools(llm, messages, session, sampling=Sampling(temperature=0.0,
                                                                                      max_tokens=args.max_tokens),
                                           events=events)).strip()
        called = calls[0].split("(")[0] if calls else "none"
        seconds = round(time.perf_counter() - started, 2)
        rows.append({"request": text, "heard": heard, "expected": expected, "called": calls, "results": results,
                     "right_tool": called == expected, "answer": answer, "seconds": seconds})
        print(f"| {text} | {heard} | {expected} | {'; '.join(calls) or 'none'} | {answer[:90]} |", flush=True)
    right = sum(r["right_tool"] for r in rows)
    info.update({"model": llm.name, "mode": resolve_mode(llm, args.mode), "right_tool": f"{right}/{len(rows)}",
                 "loadavg_end": os.getloadavg(), "rows": rows})
    info["provenance"] = provenance()
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
