"""Self-interruption triggers in the loud rooms: replies in several agent voices, no user, at 1x.

    python benchmarks/self_interruption.py [--replies 10] [--json out.json]

Each agent voice (espeak-ng speech; the tiny random CSM's babble; speech-rate noise; chords) speaks
``--replies`` replies of ~4-6 s, 1.5 s apart, into office-loud and living-room-loud, in real time
(the sink plays at 1x on its thread), through the real EchoCanceller and DoubleTalk. Counted: the
double-talk detector's "person talking" onsets (each would pause the reply and start a barge-in)
and Silero VAD turns on the cleaned signal while the agent is not audible. No one speaks, so every
count is a self-interruption trigger. Prints a table and one JSON object with provenance.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _room_helpers import AGENT_RATE, AGENT_TEXTS, play_in_room, replies_one_after_another  # noqa: E402
from _voice_helpers import espeak_24k  # noqa: E402
from provenance import provenance  # noqa: E402

from agent.listen.vad import VoiceActivityDetector  # noqa: E402

ROOMS = ["office-loud", "living-room-loud"]
VOICES = ("espeak", "tiny-csm", "noise", "chords")


def _level(x: np.ndarray, dbfs: float = -20.0) -> np.ndarray:
    return (x / np.sqrt(np.mean(x**2)) * 10 ** (dbfs / 20)).astype(np.float32)


def voices(n: int, wanted: tuple[str, ...] = VOICES) -> dict[str, list[np.ndarray]]:
    """``n`` replies in each ``wanted`` voice (the tiny CSM checkpoint is only loaded when asked for)."""
    rng = np.random.default_rng(0)
    t4, t05 = np.arange(4 * AGENT_RATE) / AGENT_RATE, np.arange(AGENT_RATE // 2) / AGENT_RATE

    def chord() -> np.ndarray:
        root = 110 * 2 ** (rng.integers(0, 12) / 12)
        return sum(np.sin(2 * np.pi * root * r * t05) for r in (1, 1.26, 1.5, 2)) * np.minimum(
            1, np.minimum(t05, 0.5 - t05) / 0.02)

    def babble() -> list[np.ndarray]:
        from csm_engine.generator import load_generator
        from csm_engine.testing.checkpoints import write_checkpoint

        generator = load_generator(str(write_checkpoint(tempfile.mkdtemp(), flavor="tiny", seed=0)), device="cpu",
                                   dtype="float32")
        return [generator.generate(text, 0, max_audio_length_ms=4000, seed=i).numpy().astype(np.float32)
                for i, text in enumerate(AGENT_TEXTS[:n])]

    makers = {
        "espeak": lambda: [espeak_24k(text) for text in AGENT_TEXTS[:n]],
        "tiny-csm": babble,
        "noise": lambda: [_level(rng.standard_normal(len(t4)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t4 + i)))
                          for i in range(n)],
        "chords": lambda: [_level(np.concatenate([chord() for _ in range(8)])) for _ in range(n)],
    }
    return {name: make() for name, make in makers.items() if name in wanted}


def count(room: str, clips: list[np.ndarray]) -> dict:
    replies = replies_one_after_another(clips)
    run = play_in_room(room, replies, None, seconds=replies[-1].start_s + len(clips[-1]) / AGENT_RATE + 2.5,
                       realtime=True)
    vad, block, speaking = VoiceActivityDetector(), len(run.raw) // len(run.user), []
    for i in range(len(run.user)):
        vad.feed(run.cleaned[i * block : (i + 1) * block])
        speaking.append(vad.speaking)
    free = np.array(speaking) & ~run.far
    vad_turns = int(np.sum(free & ~np.concatenate([[False], free[:-1]])))
    return {"room": room, "replies": len(clips), "double_talk_onsets": len(run.onsets_s()),
            "vad_turns_agent_silent": vad_turns, "max_residual_db": round(float(np.nanmax(run.residual_db)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not 1 <= args.replies <= len(AGENT_TEXTS):
        parser.error(f"--replies must be 1 to {len(AGENT_TEXTS)}")
    rows = []
    for voice, clips in voices(args.replies).items():
        for room in ROOMS:
            rows.append({"voice": voice, **count(room, clips)})
            r = rows[-1]
            print(f"{voice:9} {room:17} replies {r['replies']:2}  double-talk onsets {r['double_talk_onsets']:2}  "
                  f"VAD turns (agent silent) {r['vad_turns_agent_silent']:2}  max residual {r['max_residual_db']} dB",
                  flush=True)
    result = {"benchmark": "self_interruption", "rows": rows, "provenance": provenance()}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
