"""Test and benchmark helper: agent replies played into a simulated room while the user talks, the
microphone read block by block through the real EchoCanceller (or PassThrough) and DoubleTalk.

Paced: the room's clock advances one block per read and a reply plays all at once at its start
time (the room places it there), so runs are deterministic and faster than real time. A barge-in
is a reply cut short (``stop_after_s``): in a paced room the sink has nothing left to play.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from agent.audio import PIPELINE_RATE, MemorySink
from agent.echo.canceller import EchoCanceller, PassThrough
from agent.echo.double_talk import DoubleTalk
from agent.echo.room import SimulatedRoom, load_room

AGENT_RATE = 24_000  # CSM's rate: replies are played at it
AGENT_TEXTS = [  # ten replies of a few seconds each (espeak-ng en-us)
    "Hello, I am the agent. I will talk for a while so that the echo canceller has time to learn the room.",
    "The weather today is mild, with a light breeze from the west and a few clouds in the afternoon.",
    "I found three recipes for dinner: a vegetable curry, a lemon pasta, and a simple tomato soup.",
    "Your next meeting starts at half past two, in the small room on the second floor.",
    "Trains to the city leave every twenty minutes, and the journey takes about forty minutes.",
    "The library opens at nine in the morning and closes at six in the evening on weekdays.",
    "A good night's sleep helps memory, mood, and concentration, so try to keep a regular schedule.",
    "The museum has a new exhibition about ancient ships, and tickets are free on Sundays.",
    "Remember to water the plants on the balcony, they have not had any rain this week.",
    "I can set a timer, play some music, or read the news headlines for you if you like.",
]


@dataclass(frozen=True)
class Reply:
    """``audio`` (24 kHz) starts playing ``start_s`` seconds into the run; ``stop_after_s``: cut there."""

    start_s: float
    audio: np.ndarray
    stop_after_s: float | None = None


@dataclass
class RoomRun:
    raw: np.ndarray  # the microphone (16 kHz)
    cleaned: np.ndarray  # what DoubleTalk.process returned
    user: np.ndarray  # per block: DoubleTalk.user_speaking
    far: np.ndarray  # per block: DoubleTalk.far_end_active
    residual_db: np.ndarray  # per block: DoubleTalk.residual_db (nan where None)
    double_talk: DoubleTalk
    cpu_s: float  # process CPU time of the whole run (room, AEC3, DoubleTalk)
    process_s: float  # wall time inside DoubleTalk.process, AEC3 included
    aec_s: float  # of which inside the canceller
    reference: np.ndarray | None = None  # what the canceller was handed as the far end, in step with ``raw``
    stopped_s: float | None = None  # stop_on_user: when playback was stopped (end of the block, seconds)
    room: SimulatedRoom | None = None  # the room it ran in

    def last_played_s(self) -> float:
        """Where the far end last played anything (seconds of stream)."""
        return float(np.flatnonzero(self.reference)[-1] + 1) / PIPELINE_RATE

    def block_time(self, index: int) -> float:
        """Seconds of stream at the end of block ``index``."""
        return (index + 1) * len(self.raw) / len(self.user) / PIPELINE_RATE

    def onsets_s(self) -> list[float]:
        """Where ``user_speaking`` turned on (end of the block, seconds)."""
        on = np.flatnonzero(self.user & ~np.concatenate([[False], self.user[:-1]]))
        return [float(self.block_time(i)) for i in on]


def play_in_room(room: str, replies: list[Reply], user_audio: np.ndarray | None = None, *, seconds: float,
                 aec: bool = True, realtime: bool = False, stop_on_user: bool = False,
                 room_type: type[SimulatedRoom] = SimulatedRoom, **options) -> RoomRun:
    """Run the room for ``seconds`` with these replies and the user's audio (16 kHz, from time 0).
    ``realtime``: the sink plays at 1x on its thread and the room keeps the clock's pace;
    ``stop_on_user``: stop playback (a barge-in) at the first block where ``user_speaking`` turns on;
    ``room_type``: a SimulatedRoom subclass (e.g. one that records what it mixed)."""
    spec = load_room(room)
    source = room_type(spec, user_audio, realtime=realtime, user_waits=False, trailing_silence_s=seconds)
    sink = MemorySink(AGENT_RATE, speed=1.0 if realtime else None)
    unhear = sink.add_listener(source.hear)
    canceller = EchoCanceller.attach(source, sink) if aec else PassThrough()
    double_talk = DoubleTalk(canceller, PIPELINE_RATE, **options)
    reference: list[np.ndarray] = []
    if aec:
        canceller.add_reference_listener(reference.append)
    clock = {"aec": 0.0, "all": 0.0}
    inner = canceller.process

    def timed_canceller(block: np.ndarray) -> np.ndarray:  # the time AEC3 takes, to tell DoubleTalk's own
        began = time.perf_counter()
        out = inner(block)
        clock["aec"] += time.perf_counter() - began
        return out

    canceller.process = timed_canceller
    starts = {int(round(r.start_s * PIPELINE_RATE / source.block_samples)): r for r in replies}
    raw, cleaned, user, far, residual = [], [], [], [], []
    stopped = None
    cpu = time.process_time()
    try:
        source.start()
        sink.start()
        for i in range(int(seconds * PIPELINE_RATE / source.block_samples)):
            if (reply := starts.get(i)) is not None:
                cut = len(reply.audio) if reply.stop_after_s is None else int(reply.stop_after_s * AGENT_RATE)
                sink.write(reply.audio[:cut], AGENT_RATE)
                sink.flush()
                if not realtime:
                    sink.wait_idle(timeout=10.0)
            block = source.read(timeout=5.0)
            raw.append(block)
            began = time.perf_counter()
            cleaned.append(double_talk.process(block))
            clock["all"] += time.perf_counter() - began
            user.append(double_talk.user_speaking)
            far.append(double_talk.far_end_active)
            residual.append(np.nan if double_talk.residual_db is None else double_talk.residual_db)
            if stop_on_user and stopped is None and double_talk.user_speaking:
                sink.stop()
                stopped = (i + 1) * source.block_samples / PIPELINE_RATE
    finally:
        double_talk.close()
        canceller.close()
        unhear()
        sink.close()
        source.stop()
    return RoomRun(np.concatenate(raw), np.concatenate(cleaned), np.array(user), np.array(far), np.array(residual),
                   double_talk, time.process_time() - cpu, clock["all"], clock["aec"],
                   np.concatenate(reference) if reference else None, stopped, source)


def voice_onset(audio: np.ndarray) -> int:
    """First sample of a clip louder than 2 % of its peak (espeak leads with ~50 ms of silence)."""
    return int(np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())[0])


def replies_one_after_another(clips: list[np.ndarray], first_s: float = 1.0, gap_s: float = 1.5) -> list[Reply]:
    """Each clip a reply, ``gap_s`` after the previous one ends."""
    replies, t = [], first_s
    for clip in clips:
        replies.append(Reply(t, clip))
        t += len(clip) / AGENT_RATE + gap_s
    return replies
