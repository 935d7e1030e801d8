"""Voice-to-voice latency: the real pipeline, spoken to in real time, turn after turn.

A simulated user speaks espeak-ng questions into the microphone in real time (32 ms blocks at
the pace of speech), waits for the whole answer, pauses a second, and asks the next one. The
agent is the real thing: Silero VAD, the end-of-turn judge, Whisper, the LLM, CSM (random
weights of the chosen shape: speed does not depend on the values) and a real-time speaker.
Prints p50/p95 of each milestone after the end of the user's speech — turn judged over,
transcript, first LLM token, first audio played — and playback gaps.

    .venv/bin/python benchmarks/agent_latency.py --turns 10 > latency-cpu.json           # CPU defaults
    python benchmarks/agent_latency.py --device cuda --turns 10 > latency-gpu.json      # CSM-1B on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import random_csm_model  # noqa: E402
from provenance import provenance  # noqa: E402

from agent.audio import MemorySink, QueueSource, load_audio  # noqa: E402
from agent.config.settings import AgentSettings  # noqa: E402
from agent.events import AgentTurnDone, Event, Notice, TurnLatency  # noqa: E402
from agent.pipeline import Pipeline  # noqa: E402
from csm_engine.codec import MimiCodec  # noqa: E402
from csm_engine.generator import Generator  # noqa: E402
from csm_engine.quantize import apply_precision  # noqa: E402
from csm_engine.testing.checkpoints import build_text_tokenizer  # noqa: E402
from csm_engine.tokens import TextTokenizer  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Can you tell me a joke?", "How are you doing today?",
    "What time is it in Tokyo?", "Who wrote the book Dune?", "Please set a timer for ten minutes.",
    "Where is the nearest train station?", "Why is the sky blue?", "How far away is the moon?",
    "Can you recommend a good book?", "What should I cook for dinner tonight?", "How do I make a cup of tea?",
]
MILESTONES = ("turn_end_ms", "transcript_ms", "first_token_ms", "first_audio_ms")
BLOCK = 512


def espeak(text: str, directory: Path) -> np.ndarray:
    path = directory / f"{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-v", "en-gb", "-w", str(path), text], check=True)
    clip = load_audio(path)
    loud = np.nonzero(np.abs(clip) > 0.02)[0]
    return clip[loud[0] : loud[-1] + 1]


def persona_file(directory: Path, max_tokens: int, max_audio_ms: int) -> Path:
    """Short answers (latency is about the start of the answer) with a local espeak voice clip."""
    subprocess.run(["espeak-ng", "-w", str(directory / "voice.wav"), "hello, this is my voice"], check=True)
    path = directory / "bench.toml"
    path.write_text('name = "Bench"\nspeaker_id = 0\nvoice = { clip = "voice.wav", transcript = "hello, this is my '
                    f'voice" }}\nmax_audio_length_ms = {max_audio_ms}\nsystem_prompt = "You are a helpful assistant. '
                    f'Answer in one short sentence."\n[llm]\nmax_tokens = {max_tokens}\ntemperature = 0.0\n',
                    encoding="utf-8")
    return path


class SpokenUser:
    """Speaks each question in real time into the source, then waits for the answer to end."""

    def __init__(self, source: QueueSource, questions: list[np.ndarray], answered: threading.Semaphore) -> None:
        self.source, self.questions, self.answered = source, questions, answered

    def run(self) -> None:
        silence = np.zeros(BLOCK, np.float32)
        for question in self.questions:
            self._say(np.concatenate([np.zeros(16_000, np.float32), question]))
            stop = time.monotonic() + 120
            while not self.answered.acquire(timeout=BLOCK / 16_000):  # silence while the agent answers
                self.source.push(silence)
                if time.monotonic() > stop:
                    break
            self._say(np.zeros(8_000, np.float32))
        self.source.end()

    def _say(self, audio: np.ndarray) -> None:
        start = time.monotonic()
        for i in range(0, len(audio), BLOCK):
            due = start + (i + BLOCK) / 16_000
            time.sleep(max(0.0, due - time.monotonic()))
            self.source.push(audio[i : i + BLOCK])


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"n": len(values), "p50": round(statistics.median(values), 1), "p95": round(p95, 1),
            "min": round(ordered[0], 1), "max": round(ordered[-1], 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--flavor", default="1B", help="CSM shape with random weights (1B, tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--turn", default="smart", choices=("smart", "silence"))
    p.add_argument("--asr", default="faster-whisper")
    p.add_argument("--asr-model", default=None)
    p.add_argument("--llm-model", default=None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-audio-ms", type=int, default=3000, help="cap on each spoken sentence")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = random_csm_model(args.flavor, seed=0, device=args.device)
    apply_precision(model, args.dtype)
    generator = Generator(model, MimiCodec.load(None, device=args.device), TextTokenizer(build_text_tokenizer()))
    generator.prepare(0.9, 50)
    work = Path(tempfile.mkdtemp(prefix="agent-latency-"))
    questions = [espeak(q, work) for q in (QUESTIONS * 2)[: args.turns]]
    settings = AgentSettings(persona=str(persona_file(work, args.max_tokens, args.max_audio_ms)), headless=True,
                             save_dir=str(work / "saved"), watermark=False, seed=1, device=args.device,
                             turn=args.turn, asr=args.asr, asr_model=args.asr_model, llm_model=args.llm_model,
                             max_turns=args.turns)
    events: list[Event] = []
    answered = threading.Semaphore(0)

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, AgentTurnDone):
            answered.release()

    source = QueueSource(16_000)
    sink = MemorySink(24_000, speed=1.0)
    pipeline = Pipeline(settings, on_event, source=source, sink=sink, generator=generator)
    started = time.monotonic()
    pipeline.start()
    pipeline.wait_ready()
    user = threading.Thread(target=SpokenUser(source, questions, answered).run, daemon=True)
    user.start()
    pipeline.finished.wait()
    pipeline.stop()
    latencies = [e for e in events if isinstance(e, TurnLatency)]
    result: dict = {
        "device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "flavor": args.flavor, "dtype": args.dtype, "turn": args.turn, "asr": args.asr,
        "turns": len(latencies), "wall_s": round(time.monotonic() - started, 1),
        "notices": [f"{e.level}: {e.message}" for e in events if isinstance(e, Notice)],
    }
    for name in MILESTONES:
        result[name] = percentiles([getattr(e, name) for e in latencies if getattr(e, name) is not None])
    result["turn_end_stream_ms"] = percentiles([stream for stream, _ in pipeline.turn.turn_end_ms])
    result["underruns"] = sum(e.underruns for e in latencies)
    result["underrun_s"] = round(sum(e.underrun_s for e in latencies), 3)
    result["provenance"] = provenance()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
