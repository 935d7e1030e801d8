"""Turn end on complete questions and on sentences with a mid-sentence pause, per rule and room.

    python benchmarks/turn_end.py [--set tuning|held-out] [--rooms none,office-loud,living-room-loud]
                                  [--modes silence,audio,smart] [--out benchmarks/results-turn-end.json]
                                  [--limit N] [--real-time [--sequential]]

The user: espeak-ng in three voices (en-us, en-gb, en-us+f3) at 130-175 words per minute, 40
complete questions and 20 sentences with a 0.8-1.2 s pause after an unfinished clause ("...
because", "... or", "um"), each after 0.5 s of silence and followed by 2.5 s. That is the
``tuning`` set (the judge's thresholds were chosen on it); ``--set held-out`` is a disjoint one
for checking them: 40 other questions and 20 other paused sentences in three other voices
(en-gb-scotland, en-029, en-us+m3) at 120-190 words per minute. In a room
(``agent/echo/room.py``, paced) the clip is what the microphone hears (reverberation, the loud
rooms' -10 dB user gain, pink noise) after WebRTC's echo canceller and the double-talk
detector, as the capture stage hands it on; "none" is the clean clip. Then the real Silero VAD
and the end-of-turn judge in each mode: ``silence`` (600 ms), ``audio`` (Smart Turn alone),
``smart`` (the transcript's P(end) from Whisper tiny.en + SmolLM2, then Smart Turn).

Reported per room and mode: for complete questions, end of speech (the clip's last audible
sample) -> turn judged over, p50/p90, in stream time (what the judge waited for) and as it would
land in real time on this machine (stream time plus the judge's compute on the turn thread:
each model call starts when its check is due or when the previous call ends, whichever is later;
a model of the sequential judge). ``--real-time`` measures it instead: the stream is fed at its
real pace (one 32 ms block when it would have been heard, late blocks as soon as the thread is
free) to the judge as the app builds it (model calls in threads, ``run_in_thread``; with
``--sequential`` on the feeding thread), and the turn end is the wall clock when the verdict
came out minus when the last speech sample was due; per item the end of the VAD's speech
(``vad_end_ms``, relative to the clip's) and the pause that ended the turn (``pause_ms``);
how many questions were cut in two; for the paused sentences, the share kept whole (no turn
ended before the rest of the sentence began). Prints a table and writes JSON with provenance.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _clips import QUESTIONS as SUITE_QUESTIONS  # noqa: E402 (the suite's 20, then 20 more)
from provenance import provenance  # noqa: E402

from agent.audio import PIPELINE_RATE, load_audio  # noqa: E402
from agent.listen.end_of_turn import EndOfTurnJudge, TurnSettings  # noqa: E402
from agent.listen.turn_jobs import run_in_thread, run_when_asked  # noqa: E402
from agent.listen.vad import VoiceActivityDetector  # noqa: E402

QUESTIONS = [*SUITE_QUESTIONS,
    "Which planet is closest to the sun?", "How long should I boil an egg?", "What does a koala eat?",
    "Can you explain how a rainbow forms?", "Who painted the Mona Lisa?", "How tall is Mount Everest?",
    "What year did the first person walk on the moon?", "Is a tomato a fruit or a vegetable?",
    "How do you say thank you in Spanish?", "What is the longest river in the world?",
    "Could you remind me to call my sister tomorrow?", "Why do cats purr?",
    "What is the best way to learn to play the guitar?", "How many legs does a spider have?",
    "Where do penguins live?", "What is the speed of light?", "Tell me something interesting about octopuses.",
    "How much water should I drink every day?", "Can dogs see colours?", "What time does the sun set today?",
]
PAUSED = [
    ("I stayed at home because", "it was raining all day."), ("I'd like to know, um", "the capital of France."),
    ("We could go to the beach, or", "we could stay here."),
    ("I called you because", "I need some help with my car."),
    ("Can you tell me, um", "how far away the moon is?"), ("I was going to say that", "the movie was great."),
    ("My plan for tomorrow is, uh", "to visit my parents."),
    ("The reason I am late is because", "the bus broke down."),
    ("I want to make a cake with", "chocolate and strawberries."),
    ("Could you tell me if", "the museum is open today?"),
    ("My sister lives in", "a small town near the coast."), ("I think we should buy", "a new table for the kitchen."),
    ("What I really need is, uh", "a good night's sleep."), ("The best thing about summer is", "the long evenings."),
    ("I was wondering whether", "you could help me with my homework."),
    ("Tomorrow I have to go to", "the dentist."), ("If it rains this afternoon then", "we will stay inside."),
    ("Can you find me a recipe for, um", "vegetable soup?"),
    ("The train to London leaves at", "half past eight."), ("I forgot to tell you that", "the meeting was moved."),
]
VOICES = [("en-us", 145), ("en-gb", 160), ("en-us+f3", 130), ("en-us", 175), ("en-gb", 130), ("en-us+f3", 160)]
# The held-out set: no phrase, voice or rate above (nor in the tests).
HELD_OUT_QUESTIONS = [
    "What is the tallest building in the world?", "How do airplanes stay in the air?",
    "Can you turn off the kitchen lights?", "What is the population of Canada?", "Who invented the telephone?",
    "How many days are there in a leap year?", "What should I wear to a job interview?",
    "Is there a pharmacy open near here?", "What is the difference between a virus and a bacterium?",
    "How do I reset my password?", "Could you read me the news?", "What's a good name for a puppy?",
    "How old is the universe?", "Why do leaves change colour in autumn?", "Where can I buy fresh bread?",
    "What is the square root of eighty one?", "Can you suggest a movie for tonight?",
    "How do you make pancakes?", "What language do they speak in Brazil?", "When was the printing press invented?",
    "Will I need an umbrella this afternoon?", "How many minutes are in a day?",
    "Can you add milk to my shopping list?", "What is the biggest animal on earth?", "Why is the ocean salty?",
    "How far is it from Paris to Berlin?", "What do bees do in winter?", "Who was the first president of France?",
    "How can I sleep better at night?", "What is the boiling point of water?",
    "Could you wake me up at seven?", "Which country has the most islands?", "How do I get rid of hiccups?",
    "What is the main ingredient in guacamole?", "Is it safe to swim after eating?",
    "What are the rules of chess?", "How much does an elephant weigh?", "Can you call my brother?",
    "What is the weather in Madrid right now?", "Why do we dream?",
]
HELD_OUT_PAUSED = [
    ("I was thinking that maybe", "we could order pizza tonight."), ("She told me that, er", "the shop was closed."),
    ("I need to buy some", "eggs and a loaf of bread."), ("Do you remember when, uh", "we went to the lake?"),
    ("The problem with my laptop is that", "it keeps freezing."), ("We should leave before", "the traffic gets bad."),
    ("Could you check whether", "my flight is on time?"), ("My favourite kind of music is, um", "old jazz."),
    ("I would rather walk than", "take the crowded bus."), ("He said he would come unless", "it snowed."),
    ("I'm looking for a book about", "the history of Rome."), ("Last weekend we went to, uh", "my uncle's farm."),
    ("The thing I like most about my job is", "the people."), ("Remind me to send an email to", "my landlord."),
    ("Can you play a song by, um", "the Beatles?"), ("I was about to call you when", "the doorbell rang."),
    ("It would be nice if", "we had more time."), ("My daughter wants to become, er", "a veterinarian."),
    ("Tell me how long it takes to", "drive to the airport."), ("We ran out of", "coffee this morning."),
]
HELD_OUT_VOICES = [("en-gb-scotland", 120), ("en-029", 190), ("en-us+m3", 150), ("en-gb-scotland", 175),
                   ("en-029", 140), ("en-us+m3", 185)]
SETS = {"tuning": (QUESTIONS, PAUSED, VOICES), "held-out": (HELD_OUT_QUESTIONS, HELD_OUT_PAUSED, HELD_OUT_VOICES)}
PAUSES_S = (0.8, 1.0, 1.2)
LEAD_S, TAIL_S = 0.5, 2.5
LOUD = 0.02  # espeak's padding is below this


def espeak(text: str, voice: str, wpm: int, directory: Path) -> np.ndarray:
    path = directory / f"{abs(hash((text, voice, wpm)))}.wav"
    if not path.exists():
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(path), text], check=True)
    clip = load_audio(path, PIPELINE_RATE)
    loud = np.flatnonzero(np.abs(clip) > LOUD)
    return clip[loud[0] : loud[-1] + 1]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * PIPELINE_RATE)), np.float32)


def streams(directory: Path, which: str = "tuning") -> list[dict]:
    """Each utterance of set ``which`` as one clean stream, with where its speech ends (and, paused,
    where the rest begins)."""
    questions, paused, voices = SETS[which]
    out = []
    for i, text in enumerate(questions):
        voice, wpm = voices[i % len(voices)]
        speech = espeak(text, voice, wpm, directory)
        out.append({"kind": "question", "text": text, "said": text, "voice": f"{voice} {wpm}",
                    "audio": np.concatenate([silence(LEAD_S), speech, silence(TAIL_S)]),
                    "speech_end_s": LEAD_S + len(speech) / PIPELINE_RATE})
    for i, (clause, rest) in enumerate(paused):
        voice, wpm = voices[(i + 1) % len(voices)]
        first, second = espeak(clause, voice, wpm, directory), espeak(rest, voice, wpm, directory)
        pause = PAUSES_S[i % len(PAUSES_S)]
        rest_s = LEAD_S + len(first) / PIPELINE_RATE + pause
        out.append({"kind": "paused", "text": f"{clause} [{pause} s] {rest}", "said": f"{clause} {rest}",
                    "voice": f"{voice} {wpm}",
                    "audio": np.concatenate([silence(LEAD_S), first, silence(pause), second, silence(TAIL_S)]),
                    "rest_s": rest_s, "speech_end_s": rest_s + len(second) / PIPELINE_RATE})
    return out


def in_room(room: str, audio: np.ndarray) -> np.ndarray:
    """What the turn stage gets from ``audio`` spoken in ``room`` (no agent voice): mic -> AEC3 -> DoubleTalk.
    ``ROOM+reverb``: the user's voice reverberates in it too (the room's impulse response, as its echo
    does), which the presets alone do not do."""
    if room == "none":
        return audio
    from _room_helpers import play_in_room

    if room.endswith("+reverb"):
        from agent.echo.room_spec import load_room, room_impulse_response

        room = room.removesuffix("+reverb")
        audio = np.convolve(audio, room_impulse_response(load_room(room)))[: len(audio)].astype(np.float32)
    return play_in_room(room, [], audio, seconds=len(audio) / PIPELINE_RATE).cleaned[: len(audio)]


def run(audio: np.ndarray, silero, judge: EndOfTurnJudge | None, end_silence_ms: int = 600,
        real_time: bool = False, stop_s: float | None = None, pause_lookback_ms: int | None = None) -> dict:
    """The VAD and ``judge`` over one stream: turns (speech end s, judged over s) and model calls.
    ``real_time``: each block is fed when it would have been heard (or as soon as the feeding thread
    is free), and ``wall`` says when each turn's verdict came out (seconds after the stream began);
    feeding stops once a turn has ended at or after ``stop_s``."""
    from agent.listen.vad import VadSettings

    dating = {} if pause_lookback_ms is None else {"pause_lookback_ms": pause_lookback_ms}
    vad = VoiceActivityDetector(VadSettings(end_silence_ms=end_silence_ms, **dating), model=silero, end_of_turn=judge)
    turns, calls, wall, last = [], [], [], None
    began = time.perf_counter()
    for i in range(0, len(audio), 512):
        if real_time:
            time.sleep(max(0.0, began + (i + 512) / PIPELINE_RATE - time.perf_counter()))
        for event in vad.feed(audio[i : i + 512]):
            if event.kind == "speech_end":
                turns.append((event.t, event.ended_t))
                wall.append(time.perf_counter() - began)
        verdict = vad.last_verdict
        if verdict is not None and verdict is not last:
            last = verdict
            compute = (verdict.model_ms or 0.0) + (verdict.text_ms or 0.0)
            if compute:
                calls.append({"t": vad.time_s, "ms": compute, "p": verdict.probability,
                              "text_p": verdict.text_probability, "reason": verdict.reason})
        if real_time and stop_s is not None and turns and turns[-1][1] >= stop_s:
            break
    turns += [(e.t, e.ended_t) for e in vad.flush()]
    return {"turns": turns, "calls": calls, "wall": wall if real_time else None}


def real_time_end(ended_t: float, calls: list[dict]) -> float:
    """When the judge's verdict at stream time ``ended_t`` lands in real time: each call starts when
    due or when the turn thread is free again, and the blocks that came meanwhile wait for it."""
    free = 0.0
    for call in calls:
        if call["t"] > ended_t + 1e-9:
            break
        free = max(free, call["t"]) + call["ms"] / 1000
    return max(ended_t, free)


def measure(stream: dict, result: dict) -> dict:
    turns = result["turns"]
    if stream["kind"] == "paused":
        cuts = [ended for _, ended in turns if ended < stream["rest_s"]]
        cut_by = [{k: c[k] for k in ("reason", "p", "text_p")} for c in result["calls"]
                  if any(abs(c["t"] - ended) < 0.033 for ended in cuts)]
        return {"whole": not cuts, "turns": len(turns), **({"cut_by": cut_by} if cuts else {})}
    after = [(t, ended) for t, ended in turns if ended >= stream["speech_end_s"]]
    if not after:
        return {"turn_end_ms": None, "split": True}
    t, ended = after[0]
    calls = [c for c in result["calls"] if c["t"] <= ended + 1e-9]
    wall = result.get("wall")
    landed = wall[turns.index(after[0])] if wall and turns.index(after[0]) < len(wall) else real_time_end(ended, calls)
    return {"turn_end_ms": round((ended - stream["speech_end_s"]) * 1000, 1),
            "real_time_ms": round((landed - stream["speech_end_s"]) * 1000, 1),
            "vad_end_ms": round((t - stream["speech_end_s"]) * 1000, 1), "pause_ms": round((ended - t) * 1000, 1),
            "split": len([1 for _, e in turns if e < stream["speech_end_s"]]) > 0,
            "ended_by": calls[-1]["reason"] if calls and calls[-1]["t"] >= ended - 0.033 else "limit",
            "p": calls[-1]["p"] if calls and calls[-1]["t"] >= ended - 0.033 else None,
            "text_p": next((c["text_p"] for c in calls if c["text_p"] is not None), None)}


def summary(rows: list[dict]) -> dict:
    ends = [r["turn_end_ms"] for r in rows if r.get("turn_end_ms") is not None]
    real = [r["real_time_ms"] for r in rows if r.get("real_time_ms") is not None]
    whole = [r["whole"] for r in rows if "whole" in r]
    pct = lambda xs, q: round(float(np.percentile(xs, q))) if xs else None  # noqa: E731
    return {"questions": len(ends), "p50_ms": pct(ends, 50), "p90_ms": pct(ends, 90),
            "real_time_p50_ms": pct(real, 50), "real_time_p90_ms": pct(real, 90),
            "questions_split": sum(bool(r.get("split")) for r in rows if "turn_end_ms" in r),
            "paused": len(whole), "kept_whole": sum(whole),
            "kept_whole_share": round(sum(whole) / len(whole), 3) if whole else None}


def judge_for(mode: str, turn_model, text_turn, start=run_when_asked, **settings) -> EndOfTurnJudge | None:
    if mode == "silence":
        return None
    judge = EndOfTurnJudge(TurnSettings(mode=mode, **settings), turn_model, start=start)
    judge.use_text(text_turn)
    return judge


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", default="none,office-loud,living-room-loud")
    parser.add_argument("--modes", default="silence,audio,smart")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results-turn-end.json"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions and N paused sentences")
    parser.add_argument("--first-check-ms", type=int, default=None,
                        help="the judge's first check, with and without the text evidence (default: its own)")
    parser.add_argument("--pause-lookback-ms", type=int, default=None,
                        help="the VAD dates a pause from where the level fell up to this far back (default: its "
                             "own; 0: from the window Silero first called silence, as before)")
    parser.add_argument("--set", default="tuning", choices=sorted(SETS), help="the utterances (see above)")
    parser.add_argument("--real-time", action="store_true", help="feed at the stream's pace, measure the wall clock")
    parser.add_argument("--sequential", action="store_true",
                        help="the judge's model calls one after the other on the feeding thread (as before threads)")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := set(modes) - {"silence", "audio", "smart"}:
        parser.error(f"unknown modes {sorted(unknown)}: use silence, audio, smart")
    for tool in ("espeak-ng",):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (apt-get install {tool})")
    from agent.listen.asr import FasterWhisperTranscriber
    from agent.listen.text_turn import TextTurn
    from agent.listen.turn_model import load_turn_model
    from agent.listen.vad import load_silero_model
    from agent.llm.local import LocalLLM

    prov = {**provenance(), "load_before": os.getloadavg()[0], "set": args.set, "real_time": args.real_time,
            "judge_calls": "threads" if args.real_time and not args.sequential else "sequential", "limit": args.limit}
    start = run_when_asked if args.sequential or not args.real_time else run_in_thread
    silero, turn_model = load_silero_model(), load_turn_model()
    transcriber, llm = FasterWhisperTranscriber(), LocalLLM(seed=1234)
    text_turn = TextTurn(lambda: transcriber, lambda: llm)
    checks = args.first_check_ms
    changes = {"first_check_ms": checks} if checks else {}
    from agent.listen.vad import VadSettings

    lookback = VadSettings().pause_lookback_ms if args.pause_lookback_ms is None else args.pause_lookback_ms
    settings = {**TurnSettings(**changes).__dict__, "pause_lookback_ms": lookback}
    results: dict = {"provenance": prov, "settings": settings, "rooms": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        items = streams(Path(tmp), args.set)
    if args.limit:
        qs = [s for s in items if s["kind"] == "question"][: args.limit]
        items = qs + [s for s in items if s["kind"] == "paused"][: args.limit]
    for room in args.rooms.split(","):
        heard = [in_room(room, s["audio"]) for s in items]
        results["rooms"][room] = {}
        for mode in modes:
            rows = []
            for stream, audio in zip(items, heard):
                judge = judge_for(mode, turn_model, text_turn, start, **changes)
                result = run(audio, silero, judge, real_time=args.real_time, stop_s=stream["speech_end_s"],
                             pause_lookback_ms=lookback)
                row = measure(stream, result)
                rows.append({"text": stream["text"], "voice": stream["voice"], **row})
            results["rooms"][room][mode] = {"summary": summary(rows), "items": rows}
            print(f"{room:18s} {mode:8s} {json.dumps(summary(rows))}", file=sys.stderr, flush=True)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    results["provenance"]["load_after"] = __import__("os").getloadavg()[0]
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print("| room | rule | questions p50 / p90 (stream) | p50 / p90 (real time, this CPU) | questions cut | "
          "paused kept whole |")
    print("|---|---|---|---|---|---|")
    for room, by_mode in results["rooms"].items():
        for mode, r in by_mode.items():
            s = r["summary"]
            print(f"| {room} | {mode} | {s['p50_ms']} / {s['p90_ms']} ms | {s['real_time_p50_ms']} / "
                  f"{s['real_time_p90_ms']} ms | {s['questions_split']} of {s['questions']} | "
                  f"{s['kept_whole']} of {s['paused']} ({s['kept_whole_share']:.0%}) |")
    return results


if __name__ == "__main__":
    main()
