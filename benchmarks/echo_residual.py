"""Why the echo model's residual stands over the leak it expects: the room's own echo against the reference.

    python benchmarks/echo_residual.py [--replies 3] [--voices espeak,tiny-csm,noise,chords] [--modes paced,1x]

Each agent voice speaks ``--replies`` replies into office-loud and living-room-loud (no user), paced
and at 1x, through the real EchoCanceller and DoubleTalk (``tests/_room_helpers.play_in_room``). The
room reports what it convolved for each microphone block (``SimulatedRoom.on_mix``), so the echo's
true source can be set beside the far-end reference the canceller handed AEC3 and DoubleTalk:

- ``ref_mismatch_db``: energy of (what the room played) - (the reference, shifted by the room's
  device delay), over the energy played; ``lost_ms``: 20 ms stretches where the room played sound
  the reference does not hold (or holds elsewhere): echo no linear canceller can predict.
- ``residual_max_db`` / ``residual_p99_db``: DoubleTalk's residual over the residual it expects
  (``residual_db``, during playback); ``over_margin``: blocks above the 9 dB detection margin, and
  ``over_margin_near_loss``: of them, those within 0.5 s after a lost stretch.
- ``clipped``: microphone samples at full scale; ``erle_db``: AEC3's echo removal (mic energy /
  cleaned energy where the agent was audible, from 2 s into the run).
- per room, ``rir_tail_db``: the impulse response's energy after the 0.4 s the echo model covers.

Prints one line per row and one JSON object with provenance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from _room_helpers import play_in_room, replies_one_after_another  # noqa: E402
from provenance import provenance  # noqa: E402
from report import emit  # noqa: E402
from self_interruption import ROOMS, voices  # noqa: E402

from agent.audio import PIPELINE_RATE  # noqa: E402
from agent.echo.double_talk import DoubleTalkSettings  # noqa: E402
from agent.echo.room import SimulatedRoom, load_room, room_impulse_response  # noqa: E402

CHUNK = PIPELINE_RATE // 50  # 20 ms: the sink's playback block
AGENT_RATE = 24_000


class RecordingRoom(SimulatedRoom):
    """A SimulatedRoom that keeps, per microphone block, what it convolved and the echo it made."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.played: list[np.ndarray] = []
        self.echo: list[np.ndarray] = []
        self.on_mix = self._record

    def _record(self, far: np.ndarray, echo: np.ndarray, mic: np.ndarray) -> None:
        self.played.append(far.copy())
        self.echo.append(echo.copy())


def rir_tail_db(room: str) -> float:
    rir = room_impulse_response(load_room(room)).astype(np.float64)
    direct = int(np.argmax(np.abs(rir)))
    covered = direct - 160 + int(DoubleTalkSettings().echo_path_s * PIPELINE_RATE)  # the fit starts 10 ms early
    return round(10 * np.log10(np.sum(rir[covered:] ** 2) / np.sum(rir**2)), 1)


def analyse(room: str, clips: list[np.ndarray], realtime: bool) -> dict:
    replies = replies_one_after_another(clips)
    seconds = replies[-1].start_s + len(clips[-1]) / AGENT_RATE + 2.5
    run = play_in_room(room, replies, None, seconds=seconds, realtime=realtime, room_type=RecordingRoom)
    delay = int(round(load_room(room).device_delay_ms * PIPELINE_RATE / 1000))
    played = np.concatenate(run.room.played).astype(np.float64)
    reference = np.concatenate([np.zeros(delay), run.reference[: len(played) - delay]]).astype(np.float64)
    n = min(len(played), len(reference)) // CHUNK * CHUNK
    played, reference = played[:n], reference[:n]
    miss = (played - reference).reshape(-1, CHUNK)
    power = (played**2).reshape(-1, CHUNK).mean(axis=1)
    lost = np.mean(miss**2, axis=1) > 0.01 * np.maximum(power, 1e-8)  # over 1 % of what played there
    block = len(run.raw) // len(run.user)
    lost_end_s = (np.flatnonzero(lost) + 1) * CHUNK / PIPELINE_RATE
    res = np.asarray(run.residual_db, np.float64)
    ends = (np.arange(len(res)) + 1) * block / PIPELINE_RATE
    valid = ~np.isnan(res)
    over = valid & (np.nan_to_num(res, nan=-99) > DoubleTalkSettings().margin_db)
    near = np.array([bool(np.any((lost_end_s <= t + 0.02) & (lost_end_s > t - 0.5))) for t in ends[over]])
    audible = np.repeat(run.far, block)[: len(run.raw)]
    audible[: 2 * PIPELINE_RATE] = False
    erle = 10 * np.log10(np.sum(run.raw[audible] ** 2) / max(np.sum(run.cleaned[audible] ** 2), 1e-20))
    return {
        "room": room, "mode": "1x" if realtime else "paced", "replies": len(clips),
        "ref_mismatch_db": round(10 * np.log10(max(np.sum(miss**2), 1e-20) / max(np.sum(played**2), 1e-20)), 1),
        "lost_ms": int(lost.sum() * 20),
        "residual_max_db": round(float(np.nanmax(res)), 1) if valid.any() else None,
        "residual_p99_db": round(float(np.nanpercentile(res, 99)), 1) if valid.any() else None,
        "over_margin": int(over.sum()), "over_margin_near_loss": int(near.sum()),
        "onsets": len(run.onsets_s()),
        "clipped": int(np.sum(np.abs(run.raw) >= 0.999)),
        "erle_db": round(float(erle), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=3)
    parser.add_argument("--voices", default="espeak,tiny-csm,noise,chords")
    parser.add_argument("--modes", default="paced,1x")
    parser.add_argument("--rooms", default=",".join(ROOMS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    wanted = args.voices.split(",")
    rooms = args.rooms.split(",")
    tails = {room: rir_tail_db(room) for room in rooms}
    print("RIR energy after the echo model's 0.4 s: " + ", ".join(f"{r} {t} dB" for r, t in tails.items()))
    rows = []
    for voice, clips in voices(args.replies, tuple(wanted)).items():
        for room in rooms:
            for mode in args.modes.split(","):
                rows.append({"voice": voice, **analyse(room, clips, realtime=mode == "1x")})
                print(" ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    result = {"benchmark": "echo_residual", "rir_tail_db": tails, "rows": rows, "provenance": provenance()}
    emit(result, args.json)


if __name__ == "__main__":
    main()
