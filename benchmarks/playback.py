"""Gaps in playback: the voice stage speaking a 3-sentence reply with CSM-1B (random weights).

Prints, per sentence, how long its audio was held before playing, the shortest hold that would
have had no gap (from when each chunk really arrived), and the underruns the real-time speaker
counted; once with the planner (``agent.speak.playback``) and once starting every sentence with its
first chunk, as before it. On this 2-core CPU CSM-1B runs slower than real time, which is the
case the planner is for; on a GPU both start with the first chunk.

    .venv/bin/python benchmarks/playback.py --threads 2 > playback.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import random_csm_model  # noqa: E402
from provenance import provenance  # noqa: E402

from agent.audio import MemorySink  # noqa: E402
from agent.config.personas import load_persona  # noqa: E402
from agent.conversation.conversation import CSM_RATE, Conversation  # noqa: E402
from agent.events import Event  # noqa: E402
from agent.frames import AgentSentence, EndOfReply, Reply  # noqa: E402
from agent.speak.playback import PlaybackPlanner, PlaybackPolicy  # noqa: E402
from agent.stages.base import StageContext  # noqa: E402
from agent.stages.loading import Models  # noqa: E402
from agent.stages.voice import VoiceStage  # noqa: E402
from csm_engine.codec import MimiCodec  # noqa: E402
from csm_engine.generator import Generator  # noqa: E402
from csm_engine.quantize import apply_precision  # noqa: E402
from csm_engine.testing.checkpoints import build_text_tokenizer  # noqa: E402
from csm_engine.tokens import TextTokenizer  # noqa: E402

REPLY = [
    "Well, the weather up in the mountains has been lovely all week.",
    "It rained a little on Tuesday, but the sun came back in the afternoon.",
    "If you go this weekend, take a warm jacket for the evenings.",
]


class TimedGenerator:
    """A Generator that records when each chunk of each stream arrived."""

    def __init__(self, generator: Generator) -> None:
        self._generator = generator
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._generator, name)

    def stream(self, text, speaker, context=(), **kwargs):
        call = {"called": time.monotonic(), "arrivals": [], "offsets": []}
        self.calls.append(call)
        made = 0.0
        for chunk in self._generator.stream(text, speaker, context, **kwargs):
            call["arrivals"].append(time.monotonic())
            call["offsets"].append(made)
            made += len(chunk) / CSM_RATE
            yield chunk
        call["audio_s"] = made


def speak_reply(generator: TimedGenerator, planner: PlaybackPlanner, max_audio_ms: int) -> dict:
    events: list[Event] = []
    ctx = StageContext(events.append)
    sink = MemorySink(CSM_RATE, speed=1.0)
    conversation = Conversation("default", 0)
    conversation.add_user_turn("What is the weather like up there?", None)
    stage = VoiceStage(ctx, Models(generator=generator, sink=sink).mark_ready(), conversation,
                       load_persona("default"), max_audio_ms=max_audio_ms, seed=5)
    stage.planner = planner
    reply = Reply(2, time.monotonic())
    ctx.replies.begin(reply)
    first = len(generator.calls)
    stage.start()
    for text in REPLY:
        stage.put(AgentSentence(reply, text, text))
    stage.put(EndOfReply(reply))
    reply.done.wait()
    stage.stop()
    stage.join()
    sink.close()
    sentences = []
    for call, delay in zip(generator.calls[first:], stage.start_delays):
        shortest = max(0.0, max(a - call["called"] - o for a, o in zip(call["arrivals"], call["offsets"])))
        sentences.append({"audio_s": round(call["audio_s"], 3), "held_s": round(delay, 3),
                          "shortest_gapless_s": round(shortest, 3),
                          "held_over_shortest": round(delay / shortest, 3) if shortest > 0 else None})
    return {"underruns": sink.underruns, "underrun_s": round(sink.underrun_s, 3),
            "generation_speed": planner.speed.speed, "sentences": sentences,
            "first_audio_ms": reply.first_audio_ms}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--flavor", default="1B")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="a csm_engine.quantize precision (auto: the device default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-audio-ms", type=int, default=3000, help="frame budget of each sentence")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = random_csm_model(args.flavor, seed=0, device=args.device)
    apply_precision(model, args.dtype)
    generator = TimedGenerator(Generator(model, MimiCodec.load(None, device=args.device),
                                         TextTokenizer(build_text_tokenizer())))
    generator.prepare(0.9, 50)
    result: dict = {"flavor": args.flavor, "device": args.device, "threads": args.threads,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    result["planner"] = speak_reply(generator, PlaybackPlanner(), args.max_audio_ms)
    # Starting every sentence with its first chunk: a planner that expects 0 s sentences.
    result["first_chunk"] = speak_reply(generator, PlaybackPlanner(PlaybackPolicy(lead_s=0.0, chars_per_s=1e9)),
                                        args.max_audio_ms)
    result["provenance"] = provenance()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
