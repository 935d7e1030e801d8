"""Double talk in the simulated rooms (agent.echo.double_talk): detection latency, false detections, and
Whisper's word recall on the cleaned, recovered and raw microphone; prints a table and JSON.

    python benchmarks/double_talk.py               # paced (deterministic), ~4 min on 2 cores
    python benchmarks/double_talk.py --realtime    # plus live barge-ins at 1x in the loud rooms (~2 min)

Barge-ins: in each room, six user phrases (espeak en-us+f3; the agent speaks en-us) start 3-4.5 s
into a reply; playback stops 300 ms after the voice starts. Detection latency: the voice's start
to the end of the block where ``user_speaking`` turns on. Word recall (Whisper tiny.en) over
200 ms before the voice to 400 ms after the clip: the cleaned signal (AEC3), ``recover()``, the
raw mic, and the user alone with the room's noise (Whisper's own limit); "exact" counts phrases
with every word right. False detections: ten replies (a few seconds each, 1.5 s apart) and no
user, with the echo canceller on, and off (there the VAD hears the agent).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _room_helpers import AGENT_RATE, AGENT_TEXTS, Reply, play_in_room, replies_one_after_another, voice_onset  # noqa: E402
from echo_cancellation import espeak, recall, words  # noqa: E402  (this folder: the script's own)
from provenance import provenance  # noqa: E402

from agent.audio import PIPELINE_RATE  # noqa: E402
from agent.echo.double_talk import DoubleTalkSettings  # noqa: E402
from agent.echo.echo_path import fit_echo_path  # noqa: E402
from agent.echo.room import PRESETS, BackgroundNoise  # noqa: E402

BARGE_INS = [  # (the user's phrase, seconds into the reply, which reply)
    ("Please tell me the weather in Paris tomorrow", 3.0, 0),
    ("What time does the train to London leave", 3.5, 1),
    ("Can you play some jazz music for me", 4.0, 2),
    ("Stop talking and turn on the kitchen lights", 4.5, 3),
    ("How many people live in New York City", 3.0, 4),
    ("Turn the volume down a little please", 4.5, 7),
]
LEAD_S = 1.0


def alone_in_room(room: str, user: np.ndarray, start: int, end: int) -> np.ndarray:
    spec = PRESETS[room]
    noise = BackgroundNoise(spec.noise, spec.noise_dbfs, spec.seed).next(end)[start:end]
    return np.pad(user, (0, max(0, end - len(user))))[start:end] * 10 ** (spec.user_gain_db / 20) + noise


def barge_in_rows(room: str, agent, phrases, asr, realtime: bool) -> list[dict]:
    rows = []
    for (text, into, reply_index), phrase in zip(BARGE_INS, phrases):
        user_at = LEAD_S + into
        onset = user_at + voice_onset(phrase) / PIPELINE_RATE
        user = np.concatenate([np.zeros(int(user_at * PIPELINE_RATE), np.float32), phrase])
        seconds = user_at + len(phrase) / PIPELINE_RATE + 1.0
        if realtime:  # playback stops where DoubleTalk says a person talks, at 1x
            run = play_in_room(room, [Reply(LEAD_S, agent[reply_index])], user, seconds=seconds, realtime=True,
                               stop_on_user=True)
        else:
            reply = Reply(LEAD_S, agent[reply_index], stop_after_s=onset + 0.3 - LEAD_S)
            run = play_in_room(room, [reply], user, seconds=seconds)
        lag = run.double_talk.latency_samples
        start, end = int((onset - 0.2) * PIPELINE_RATE), int((user_at + 0.4) * PIPELINE_RATE) + len(phrase)
        began = time.perf_counter()
        recovered = run.double_talk.recover(start + lag, end + lag)
        recover_s = time.perf_counter() - began
        heard = {"cleaned": asr.transcribe(run.cleaned[start + lag : end + lag]).text,
                 "recovered": asr.transcribe(recovered).text, "raw": asr.transcribe(run.raw[start:end]).text,
                 "alone": asr.transcribe(alone_in_room(room, user, start, end)).text}
        after = [t for t in run.onsets_s() if t > onset - 0.05]
        blocks = len(run.user)
        row = {"room": room, "phrase": text, "into_reply_s": into, "realtime": realtime,
               "detection_ms": int(round(1000 * (after[0] - onset))) if after else None,
               "early_detections": int(sum(t <= onset - 0.05 for t in run.onsets_s())),
               "stop_to_last_sample_ms": int(round(1000 * (run.last_played_s() - onset))) if realtime else None,
               "recover_ms": round(1000 * recover_s, 1), "recover_s_of_audio": round((end - start) / PIPELINE_RATE, 2),
               "double_talk_ms_per_block": round(1000 * (run.process_s - run.aec_s) / blocks, 3),
               "aec3_ms_per_block": round(1000 * run.aec_s / blocks, 3),
               **{f"recall_{k}": round(recall(text, v), 2) for k, v in heard.items()},
               **{f"exact_{k}": words(v) == words(text) for k, v in heard.items()}, "heard": heard}
        rows.append(row)
        print(f"{room:17} {'1x   ' if realtime else 'paced'} {into} s in: detected {row['detection_ms']} ms"
              + (f", speaker quiet {row['stop_to_last_sample_ms']} ms" if realtime else "")
              + f"; recall cleaned {row['recall_cleaned']:.2f} recovered {row['recall_recovered']:.2f} raw "
              f"{row['recall_raw']:.2f} alone {row['recall_alone']:.2f}  {heard['recovered']!r} / {heard['cleaned']!r}",
              flush=True)
    return rows


def false_detection_rows(room: str, agent) -> list[dict]:
    replies = replies_one_after_another(agent)
    seconds = replies[-1].start_s + len(agent[-1]) / AGENT_RATE + 1.5
    rows = []
    for aec in (True, False):
        run = play_in_room(room, replies, seconds=seconds, aec=aec)
        row = {"room": room, "aec": aec, "replies": len(replies), "detections": len(run.onsets_s()),
               "far_end_blocks": int(run.far.sum()), "blocks": len(run.far),
               "max_residual_over_expected_db": None if not aec else round(float(np.nanmax(run.residual_db)), 1),
               "cpu_s": round(run.cpu_s, 1), "audio_s": round(len(run.raw) / PIPELINE_RATE, 1)}
        rows.append(row)
        print(f"{room:17} 10 replies, AEC {'on ' if aec else 'off'}: {row['detections']} detections"
              + (f"; residual over expected at most {row['max_residual_over_expected_db']} dB "
                 f"(margin {DoubleTalkSettings().margin_db:g})" if aec else ""), flush=True)
    return rows


def fit_costs(agent) -> dict:
    """Wall time of the first fit (2 s of echo, 40 steps) and a refit (5 s, 15 steps) on real room audio."""
    run = play_in_room("living-room-loud", [Reply(LEAD_S, agent[0])], seconds=LEAD_S + 6.0)
    history = 8000 + 6400
    out = {}
    for name, seconds, iterations, previous in (("first_fit_ms", 2.0, 40, False), ("refit_ms", 5.0, 15, True)):
        end = int((LEAD_S + 0.5 + seconds) * PIPELINE_RATE)
        start = end - int(seconds * PIPELINE_RATE) - history
        reference, mic = run.reference[start:end], run.raw[start:end]
        weights = (np.arange(len(mic)) >= history).astype(np.float32)
        began = time.perf_counter()
        fit_echo_path(reference, mic, weights, taps=6400, max_delay=8000, iterations=iterations,
                      previous=run.double_talk.echo_path if previous else None)
        out[name] = round(1000 * (time.perf_counter() - began), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--realtime", action="store_true", help="also live barge-ins at 1x in the loud rooms")
    args = parser.parse_args()
    from agent.listen.asr import FasterWhisperTranscriber

    with tempfile.TemporaryDirectory() as tmp:
        agent = [espeak(t, "en-us", Path(tmp), AGENT_RATE) for t in AGENT_TEXTS]
        phrases = [espeak(t, "en-us+f3", Path(tmp), PIPELINE_RATE) for t, _, _ in BARGE_INS]
    asr = FasterWhisperTranscriber()
    settings = DoubleTalkSettings()
    result = {"history_mb": round(settings.history_s * PIPELINE_RATE * (4 + 4 + 4 + 1) / 1e6, 2), **fit_costs(agent),
              "barge_ins": [], "false_detections": []}
    for room in PRESETS:
        result["barge_ins"] += barge_in_rows(room, agent, phrases, asr, realtime=False)
        result["false_detections"] += false_detection_rows(room, agent)
    if args.realtime:
        for room in ("office-loud", "living-room-loud"):
            result["barge_ins"] += barge_in_rows(room, agent, phrases, asr, realtime=True)
    for room, realtime in [(r, False) for r in PRESETS] + ([(r, True) for r in ("office-loud", "living-room-loud")]
                                                          if args.realtime else []):
        sel = [r for r in result["barge_ins"] if r["room"] == room and r["realtime"] == realtime]
        latencies = [r["detection_ms"] for r in sel if r["detection_ms"] is not None]
        mean = lambda key, sel=sel: sum(r[key] for r in sel) / len(sel)  # noqa: E731
        exact = lambda key, sel=sel: sum(r[f"exact_{key}"] for r in sel)  # noqa: E731
        early = sum(r["early_detections"] for r in sel)
        print(f"{room:17} {'1x   ' if realtime else 'paced'}: detection median {np.median(latencies):.0f} ms, max "
              f"{max(latencies)} ms, missed {len(sel) - len(latencies)}, early {early}; "
              f"recall cleaned {mean('recall_cleaned'):.2f} recovered {mean('recall_recovered'):.2f} raw "
              f"{mean('recall_raw'):.2f} alone {mean('recall_alone'):.2f}; every word right: cleaned "
              f"{exact('cleaned')}/{len(sel)}, recovered {exact('recovered')}/{len(sel)}, "
              f"raw {exact('raw')}/{len(sel)}, alone {exact('alone')}/{len(sel)}")
    rows = result["barge_ins"]
    print(f"costs: DoubleTalk {np.median([r['double_talk_ms_per_block'] for r in rows]):.2f} ms per 32 ms block "
          f"(AEC3 {np.median([r['aec3_ms_per_block'] for r in rows]):.2f} ms); recover() of "
          f"{np.median([r['recover_s_of_audio'] for r in rows]):.1f} s: "
          f"median {np.median([r['recover_ms'] for r in rows]):.0f} "
          f"ms, max {max(r['recover_ms'] for r in rows):.0f} ms; first fit {result['first_fit_ms']} ms, refit "
          f"{result['refit_ms']} ms (on the fitting thread); history {result['history_mb']} MB")
    result["provenance"] = provenance()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
