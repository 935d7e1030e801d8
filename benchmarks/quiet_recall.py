"""Whisper's word recall for questions asked while the agent is silent, in the loud rooms, per signal.

    python benchmarks/quiet_recall.py [--questions 8] [--json out.json]

In office-loud and living-room-loud the agent speaks one reply (espeak-ng, ~9 s), then, once its
echo has died away, the user asks ``--questions`` questions 1.5 s apart in each of four espeak-ng
voices and rates, through the real room (RIR, noise) and EchoCanceller (paced). Whisper tiny.en
(the agent's default) transcribes each question from three signals of the same microphone:

- ``ns``: AEC3 with noise suppression and high-pass (the default canceller: what the turn stage
  hands the transcriber today);
- ``aec``: AEC3 with the high-pass only (noise suppression off: a second canceller);
- ``raw``: the microphone as it is, which is what ``DoubleTalk.recover`` returns where nothing was
  played (the AEC3 binding in the livekit wheel offers no linear-filter output: only
  ``process_stream`` / ``process_reverse_stream`` and the on/off flags).

Reported: mean word recall per room, voice and signal, and every transcript that missed a word.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from provenance import provenance  # noqa: E402
from report import emit  # noqa: E402
from speech_clips import espeak, recall  # noqa: E402

from agent.audio import PIPELINE_RATE  # noqa: E402
from agent.echo.check_audio import record_in_room  # noqa: E402

ROOMS = ["office-loud", "living-room-loud"]
AGENT_TEXT = ("Hello, I am the agent. I will talk for a while so that the echo canceller has time to learn "
              "the room. The quick brown fox jumps over the lazy dog, and then it runs far away.")
QUESTIONS = ["Which planet is closest to the sun?", "What is the capital of France?", "Can you tell me a joke?",
             "Who wrote the book Dune?", "Why is the sky blue?", "How far away is the moon?",
             "Where do penguins live?", "What time does the train to London leave?"]
VOICES = [("en-us", 145), ("en-gb", 160), ("en-us+f3", 175), ("en-us+m3", 130)]  # voice, words per minute
LEAD_S, AFTER_REPLY_S, GAP_S = 0.5, 1.5, 1.5
SIGNALS = ("ns", "aec", "raw")




def questions_after_reply(clips: list[np.ndarray], reply_s: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The user's file: silence through the reply and its echo, then each clip, ``GAP_S`` apart; and
    each clip's span in it (samples at 16 kHz)."""
    at = int((LEAD_S + reply_s + AFTER_REPLY_S) * PIPELINE_RATE)
    parts, spans = [np.zeros(at, np.float32)], []
    for clip in clips:
        spans.append((at, at + len(clip)))
        parts += [clip, np.zeros(int(GAP_S * PIPELINE_RATE), np.float32)]
        at += len(clip) + int(GAP_S * PIPELINE_RATE)
    return np.concatenate(parts), spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=len(QUESTIONS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from agent.listen.asr import FasterWhisperTranscriber

    asr = FasterWhisperTranscriber()
    texts = QUESTIONS[: args.questions]
    with tempfile.TemporaryDirectory() as tmp:
        agent = espeak(AGENT_TEXT, "en-us", Path(tmp), 24_000)
        asked = {v: [espeak(t, v[0], Path(tmp), PIPELINE_RATE, wpm=v[1]) for t in texts] for v in VOICES}
    rows, misses = [], []
    for room in ROOMS:
        for (voice, wpm), clips in asked.items():
            user, spans = questions_after_reply(clips, len(agent) / 24_000)
            tail = (len(user) - int(LEAD_S * PIPELINE_RATE)) / PIPELINE_RATE - len(agent) / 24_000 + 0.5
            signals = {}
            for ns in (True, False):
                rec = record_in_room(room, agent, 24_000, user_audio=user, user_waits=False, lead_s=LEAD_S,
                                     tail_s=tail, noise_suppression=ns)
                signals["ns" if ns else "aec"] = rec.cleaned
                signals["raw"] = rec.mic
            scores = {s: [] for s in SIGNALS}
            for text, (a, b) in zip(texts, spans):
                wide = slice(a - int(0.2 * PIPELINE_RATE), b + int(0.4 * PIPELINE_RATE))
                for name in SIGNALS:
                    heard = asr.transcribe(signals[name][wide]).text
                    scores[name].append(recall(text, heard))
                    if scores[name][-1] < 1.0:
                        misses.append({"room": room, "voice": f"{voice} {wpm}", "signal": name, "said": text,
                                       "heard": heard})
            row = {"room": room, "voice": voice, "wpm": wpm, "questions": len(texts),
                   **{f"recall_{s}": round(float(np.mean(v)), 3) for s, v in scores.items()},
                   **{f"perfect_{s}": int(sum(x == 1.0 for x in v)) for s, v in scores.items()}}
            rows.append(row)
            print(" ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    for room in ROOMS:
        sel = [r for r in rows if r["room"] == room]
        print(f"{room}: mean recall " + ", ".join(f"{s} {np.mean([r[f'recall_{s}'] for r in sel]):.3f}"
                                                 for s in SIGNALS))
    for miss in misses:
        print(f"missed: {miss['room']} {miss['voice']} {miss['signal']}: {miss['said']!r} -> {miss['heard']!r}")
    result = {"benchmark": "quiet_recall", "rows": rows, "misses": misses, "provenance": provenance()}
    emit(result, args.json)


if __name__ == "__main__":
    main()
