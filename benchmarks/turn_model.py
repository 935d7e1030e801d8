"""Smart Turn v3.2 on this CPU: time per end-of-turn decision, and what it decides on espeak speech.

    python benchmarks/turn_model.py [--repeats 5] [--threads 1,2] [--no-judgements]

Inputs are realistic: espeak-ng questions of 1-4 s and a 9 s ramble (cut to its last 8 s),
each with 200 ms of lead-in and the 192 ms pause at which the judge first asks. Times: the
features (log-mel of the last 8 s), the model on ready features for each runtime (the agent's
default, weights dequantized once at load, on each ``--threads`` count; and the reference
graph that dequantizes them on every run, on one thread), and a whole decision (both, default
runtime, one thread, as the agent runs it). Runtimes take turns on each input, so a change in
the machine's load hits them alike. With ``--judgements`` (default) it also runs the judge
over the test suite's streams (real Silero VAD) and prints each model answer and the
end-of-speech -> turn-ended delays in stream time. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from provenance import provenance  # noqa: E402

from agent.audio import PIPELINE_RATE, load_audio  # noqa: E402
from agent.listen.turn_model import TurnRuntime, load_turn_model, turn_features  # noqa: E402

TIMING_TEXTS = [
    "What time is it?", "Can you tell me a joke?", "What should I cook for dinner tonight?",
    "I was wondering whether you could help me plan a trip to Rome next spring, with a day in Florence.",
    "So yesterday I went to the market and bought apples, pears, some bread, a little cheese and then "
    "I walked home along the river because the weather was lovely.",
]
BARE_CLAUSES = ["I'd like to know", "What is the capital of", "Could you please remind me to", "My favourite colour is"]


def espeak(text: str, directory: Path) -> np.ndarray:
    path = directory / f"{abs(hash(text))}.wav"
    if not path.exists():
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(path), text], check=True)
    return load_audio(path)


def speech_only(clip: np.ndarray) -> np.ndarray:
    loud = np.nonzero(np.abs(clip) > 0.02)[0]
    return clip[loud[0] : loud[-1] + 1]


def stats_ms(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"median_ms": round(float(np.median(ms)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "n": len(ms)}


def timed(call) -> tuple[float, float]:
    """(wall s, CPU s of the whole process) of ``call()``: on a shared machine wall time includes
    waiting for a core, CPU time does not (and counts every ONNX Runtime thread)."""
    w, c = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - w, time.process_time() - c


def timings(models: dict, inputs: list[np.ndarray], repeats: int) -> dict:
    """Features, each runtime's model on ready features, and the agent's whole decision (the first model)."""
    features, decision, decision_cpu = [], [], []
    wall, cpu = ({name: [] for name in models} for _ in range(2))
    agent = next(iter(models.values()))
    for _ in range(repeats):
        for audio in inputs:
            t0 = time.perf_counter()
            x = turn_features(audio)
            features.append(time.perf_counter() - t0)
            for name, model in models.items():
                w, c = timed(lambda: model.probability_of_features(x))  # noqa: B023
                wall[name].append(w)
                cpu[name].append(c)
            w, c = timed(lambda: agent.probability(audio))  # noqa: B023
            decision.append(w)
            decision_cpu.append(c)
    return {"features": stats_ms(features),
            "model": {name: {"wall": stats_ms(wall[name]), "cpu": stats_ms(cpu[name])} for name in models},
            "decision": stats_ms(decision), "decision_cpu": stats_ms(decision_cpu)}


def judgements(directory: Path) -> dict:
    """The test suite's streams through the real VAD and the judge: answers and delays (stream time)."""
    import test_end_of_turn as suite

    from agent.listen.end_of_turn import EndOfTurnJudge, TurnSettings
    from agent.listen.vad import load_silero_model

    silero, judge = load_silero_model(), EndOfTurnJudge(TurnSettings(), load_turn_model())
    clip = lambda text: speech_only(espeak(text, directory))  # noqa: E731
    silence = suite.silence
    questions, delays = {}, []
    for text in suite.QUESTIONS:
        speech = clip(text)
        run = suite.run_stream(np.concatenate([silence(0.5), speech, silence(2.5)]), silero, judge)
        turn = run.turns[0]
        delays.append(turn.ended_t - (0.5 + len(speech) / PIPELINE_RATE))
        questions[text] = {"answers": [round(p, 3) for p in run.answers], "turns": len(run.turns),
                           "ended_by": run.verdicts[-1][1].reason,
                           "speech_end_to_turn_end_ms": round(delays[-1] * 1000)}
    paused = {}
    for i, (first, rest) in enumerate(suite.PAUSED_SENTENCES):
        pause = suite.PAUSES_S[i % len(suite.PAUSES_S)]
        audio = np.concatenate([silence(0.5), clip(first), silence(pause), clip(rest), silence(2.5)])
        run = suite.run_stream(audio, silero, judge)
        paused[f"{first} [{pause} s] {rest}"] = {"turns": len(run.turns), "answers": [round(p, 3) for p in run.answers]}
    bare = {}
    for text in BARE_CLAUSES:
        run = suite.run_stream(np.concatenate([silence(0.5), clip(text), silence(0.5)]), silero, judge)
        bare[text] = [round(p, 3) for p in run.answers]
    d = np.asarray(delays) * 1000
    done_at_first = sum(q["answers"][0] >= 0.5 for q in questions.values())
    return {"questions": questions, "questions_done_at_first_check": done_at_first,
            "speech_end_to_turn_end_ms": {"median": round(float(np.median(d))),
                                          "p25": round(float(np.percentile(d, 25))),
                                          "p75": round(float(np.percentile(d, 75))), "max": round(float(d.max()))},
            "paused_sentences": paused, "bare_clauses_first_answers": bare}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="passes over the timing inputs (default 5)")
    parser.add_argument("--threads", default="1,2", help="ONNX Runtime thread counts to time (default 1,2)")
    parser.add_argument("--no-judgements", dest="judgements", action="store_false",
                        help="only the timings, not the judge over the test streams")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        threads = sorted({int(t) for t in args.threads.split(",")})
    except ValueError:
        parser.error(f"--threads takes thread counts like 1,2, not {args.threads!r}")
    if shutil.which("espeak-ng") is None:
        parser.error("espeak-ng is not installed (apt-get install espeak-ng)")
    models = {f"default_{n}_thread{'s' * (n > 1)}": load_turn_model(runtime=TurnRuntime(threads=n)) for n in threads}
    models["reference_1_thread"] = load_turn_model(runtime=TurnRuntime(fold_weights=False))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        lead, pause = np.zeros(3200, np.float32), np.zeros(3072, np.float32)  # 200 ms, 192 ms
        inputs = [np.concatenate([lead, speech_only(espeak(t, directory)), pause]) for t in TIMING_TEXTS]
        load_before = os.getloadavg()[0]
        result = {"cpu_count": os.cpu_count(), "input_s": [round(len(a) / PIPELINE_RATE, 2) for a in inputs],
                  **timings(models, inputs, args.repeats),
                  "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}}
        if args.judgements:
            result["judgements"] = judgements(directory)
    result["provenance"] = provenance()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
