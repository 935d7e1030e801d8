"""Whisper's encoder window: the 30 s it was trained on against a short window for short turns.

    python benchmarks/asr_window.py [--windows 30,10] [--rooms none,office-loud] [--limit N] [--out F]

The turns: ``benchmarks/turn_end.py``'s two sets (80 complete questions, 40 sentences with a
mid-sentence pause, six espeak-ng voices at 120-190 words a minute), each utterance as the VAD
would hand it over (the speech, 0.2 s before, 0.15 s after), clean and as the capture stage hears
it in a loud room (gain, pink noise, WebRTC's canceller, the double-talk detector). Whisper tiny.en
(the agent's default, faster-whisper int8 on one thread) transcribes each with every window:
``30`` is faster-whisper's own path (the clip padded to 30 s), a number below it the short path
(``FasterWhisperTranscriber(window_s=...)``: the clip plus 2 s, at least that many seconds).

Reported per room and window: mean word recall against the text said, the transcripts that differ
from the 30 s window's (and how), and the median / p90 wall time of a call. The windows take
turns on each clip, so load changes hit them alike; the load average is in the provenance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

from provenance import provenance  # noqa: E402
from speech_clips import recall  # noqa: E402
from turn_end import in_room, streams  # noqa: E402

from agent.audio import PIPELINE_RATE  # noqa: E402
from agent.listen.asr import FasterWhisperTranscriber  # noqa: E402

LEAD_S, TAIL_S = 0.2, 0.15  # what the VAD keeps around a turn (lead-in, tail)


def turns(directory: Path) -> list[dict]:
    """Every utterance of both sets, cut as the VAD cuts a turn, with its text."""
    out = []
    for which in ("tuning", "held-out"):
        for item in streams(directory, which):
            start = int((0.5 - LEAD_S) * PIPELINE_RATE)  # the streams have 0.5 s before the speech
            end = int((item["speech_end_s"] + TAIL_S) * PIPELINE_RATE)
            out.append({"set": which, "kind": item["kind"], "voice": item["voice"], "said": item["said"],
                        "audio": item["audio"], "span": (start, end)})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="30,10", help="seconds; 30 = faster-whisper's own 30 s path")
    parser.add_argument("--rooms", default="none,office-loud")
    parser.add_argument("--limit", type=int, default=None, help="only the first N turns")
    parser.add_argument("--out", default=None, help="write the figures and every transcript as JSON")
    args = parser.parse_args(argv)
    windows = [float(w) for w in args.windows.split(",")]
    models = {w: FasterWhisperTranscriber(cpu_threads=1, window_s=None if w >= 30 else w) for w in windows}
    with tempfile.TemporaryDirectory() as tmp:
        items = turns(Path(tmp))[: args.limit]
    results: dict = {"provenance": {**provenance(), "load_before": os.getloadavg()[0]}, "rooms": {}}
    for room in args.rooms.split(","):
        rows = []
        for item in items:
            start, end = item["span"]
            clip = in_room(room, item["audio"])[start:end]
            row = {"said": item["said"], "voice": item["voice"], "set": item["set"], "heard": {}, "ms": {}}
            for window, model in models.items():
                began = time.perf_counter()
                heard = model.transcribe(clip).text
                row["ms"][window] = (time.perf_counter() - began) * 1000
                row["heard"][window] = heard
            rows.append(row)
        summary = {}
        for window in windows:
            summary[window] = {
                "recall": round(float(np.mean([recall(r["said"], r["heard"][window]) for r in rows])), 4),
                "ms_p50": round(float(np.median([r["ms"][window] for r in rows]))),
                "ms_p90": round(float(np.percentile([r["ms"][window] for r in rows], 90))),
                "differ_from_30s": sum(r["heard"][window] != r["heard"][windows[0]] for r in rows),
            }
            print(f"{room:14s} window {window:4.0f} s  {json.dumps(summary[window])}", file=sys.stderr, flush=True)
        results["rooms"][room] = {"summary": summary, "turns": len(rows),
                                  "differing": [{k: r[k] for k in ("said", "voice", "heard")} for r in rows
                                                if len(set(r["heard"].values())) > 1]}
    results["provenance"]["load_after"] = os.getloadavg()[0]
    print("| room | window | mean word recall | transcripts unlike the 30 s window's | ms per call p50 / p90 |")
    print("|---|---|---|---|---|")
    for room, r in results["rooms"].items():
        for window, s in r["summary"].items():
            print(f"| {room} | {window:.0f} s | {s['recall']:.3f} | {s['differ_from_30s']} of {r['turns']} | "
                  f"{s['ms_p50']} / {s['ms_p90']} ms |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
