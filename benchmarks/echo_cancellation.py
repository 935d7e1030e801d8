"""Echo cancellation in the simulated rooms, with real espeak-ng speech; prints a table and JSON.

    python benchmarks/echo_cancellation.py              # paced (deterministic), ~1 min on 2 cores
    python benchmarks/echo_cancellation.py --realtime   # the same through the 1x threads (~2 min more)

ERLE: the agent's voice (espeak-ng, ~9 s) played through a MemorySink into each room preset;
echo return loss enhancement = mic energy / cleaned energy over the echo-only stretch from 2 s
after the agent starts to its end, and per second of it; with noise suppression on (the
default) and off (AEC3 alone).
Double talk: in each room, a user phrase (another espeak voice) starts 3.5 or 4.5 s into
the reply; either the reply plays on (full overlap) or playback stops 300 ms after the user
starts (a barge-in). Reported: Whisper tiny.en's word recall on the raw and the cleaned mic,
and the cleaned level during the phrase against the residual echo of the same stretch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import provenance  # noqa: E402
from speech_clips import espeak, recall  # noqa: E402

from agent.audio import PIPELINE_RATE  # noqa: E402
from agent.echo.check_audio import record_in_room  # noqa: E402
from agent.echo.measure import erle_db, rms_db  # noqa: E402
from agent.echo.room import PRESETS  # noqa: E402

AGENT_TEXT = ("Hello, I am the agent. I will talk for a while so that the echo canceller has time to learn "
              "the room. The quick brown fox jumps over the lazy dog, and then it runs far away.")
USER_PHRASES = ["Can you play some jazz music for me", "Please tell me the weather in Paris tomorrow",
                "What time does the train to London leave"]
CONVERGENCE_S = 2.0
LEAD_S = 0.5




def erle_rows(agent, realtime: bool) -> list[dict]:
    rows = []
    for name in PRESETS:
        for ns in (True, False):
            rec = record_in_room(name, agent, 24_000, realtime=realtime, noise_suppression=ns)
            window = slice(rec.signal_start + int(CONVERGENCE_S * PIPELINE_RATE), rec.signal_end)
            seconds = [erle_db(rec.mic[a : a + PIPELINE_RATE], rec.cleaned[a : a + PIPELINE_RATE])
                       for a in range(rec.signal_start, rec.signal_end - PIPELINE_RATE + 1, PIPELINE_RATE)]
            rows.append({
                "room": name, "rt60_s": PRESETS[name].rt60_s, "noise_suppression": ns, "realtime": realtime,
                "echo_dbfs": round(rms_db(rec.mic[rec.signal_start : rec.signal_end]), 1),
                "erle_after_2s_db": round(erle_db(rec.mic[window], rec.cleaned[window]), 1),
                "erle_per_second_db": [round(x, 1) for x in seconds],
            })
            print(f"{name:17} RT60 {PRESETS[name].rt60_s:.2f} s  NS {'on ' if ns else 'off'} "
                  f"{'1x   ' if realtime else 'paced'}  echo {rows[-1]['echo_dbfs']:6.1f} dBFS  "
                  f"ERLE after 2 s {rows[-1]['erle_after_2s_db']:5.1f} dB  per s: "
                  + " ".join(f"{x:.0f}" for x in seconds), flush=True)
    return rows


def double_talk_rows(agent, phrases, asr) -> list[dict]:

    rows = []
    for name in PRESETS:
        for text, phrase in phrases:
            for user_at in (3.5, 4.5):
                user = np.concatenate([np.zeros(int(user_at * PIPELINE_RATE), np.float32), phrase])
                span = slice(int(user_at * PIPELINE_RATE), int(user_at * PIPELINE_RATE) + len(phrase))
                wide = slice(span.start - int(0.2 * PIPELINE_RATE), span.stop + int(0.4 * PIPELINE_RATE))
                echo_only = record_in_room(name, agent, 24_000, user_waits=False, lead_s=LEAD_S, tail_s=2.5)
                for barge_in in (False, True):
                    played = agent[: int((user_at - LEAD_S + 0.3) * 24_000)] if barge_in else agent
                    rec = record_in_room(name, played, 24_000, user_audio=user, user_waits=False, lead_s=LEAD_S,
                                         tail_s=2.5)
                    raw, cleaned = asr.transcribe(rec.mic[wide]).text, asr.transcribe(rec.cleaned[wide]).text
                    row = {"room": name, "phrase": text, "user_at_s": user_at, "barge_in": barge_in,
                           "recall_raw": round(recall(text, raw), 2), "recall_cleaned": round(recall(text, cleaned), 2),
                           "cleaned_dbfs": round(rms_db(rec.cleaned[span]), 1),
                           "residual_echo_dbfs": round(rms_db(echo_only.cleaned[span]), 1),
                           "raw": raw, "cleaned": cleaned}
                    rows.append(row)
                    print(f"{name:17} user at {user_at} s {'barge-in 0.3 s' if barge_in else 'full overlap  '} "
                          f"recall raw {row['recall_raw']:.2f} cleaned {row['recall_cleaned']:.2f}  "
                          f"cleaned {row['cleaned_dbfs']:6.1f} vs residual {row['residual_echo_dbfs']:6.1f} dBFS  "
                          f"{cleaned!r}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--realtime", action="store_true", help="also run the ERLE table through the 1x threads")
    parser.add_argument("--skip-erle", action="store_true", help="only the double-talk table")
    args = parser.parse_args()
    from agent.listen.asr import FasterWhisperTranscriber

    with tempfile.TemporaryDirectory() as tmp:
        agent = espeak(AGENT_TEXT, "en-us", Path(tmp), 24_000)
        phrases = [(t, espeak(t, "en-us+f3", Path(tmp), PIPELINE_RATE)) for t in USER_PHRASES]
    result = {"erle": [] if args.skip_erle else erle_rows(agent, realtime=False)}
    if args.realtime:
        result["erle"] += erle_rows(agent, realtime=True)
    result["double_talk"] = double_talk_rows(agent, phrases, FasterWhisperTranscriber())
    dt = result["double_talk"]
    for room, barge_in in [(room, b) for room in PRESETS for b in (False, True)]:
        sel = [r for r in dt if r["barge_in"] == barge_in and r["room"] == room]
        mean = lambda key, sel=sel: sum(r[key] for r in sel) / len(sel)  # noqa: E731
        margin = min(r["cleaned_dbfs"] - r["residual_echo_dbfs"] for r in sel)
        print(f"double talk in {room}, {'barge-in' if barge_in else 'full overlap'}: mean word recall raw "
              f"{mean('recall_raw'):.2f}, cleaned {mean('recall_cleaned'):.2f}; "
              f"cleaned - residual: min {margin:.1f} dB")
    result["provenance"] = provenance()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
