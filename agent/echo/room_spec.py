"""Simulated rooms: what they are (``RoomSpec``), the named presets, the TOML room file, the RIR.

A room is a shoebox with a reverberation time, a loudspeaker and a microphone in it, and the
sound card's hidden delay. ``room_impulse_response(spec)`` computes the speaker-to-mic impulse
response with pyroomacoustics' image-source method (absorption from Sabine's formula for the
RT60, corrected until the measured RT60 is within 3 % of the asked one), at 16 kHz, scaled to
unit energy so that ``echo_gain_db`` alone sets the echo's level, reverberation included.
The knobs are documented in ``agent/echo/room.py``.
"""

from __future__ import annotations

import functools
import math
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.audio import PIPELINE_RATE
from agent.errors import AgentError

SPEED_OF_SOUND = 343.0  # m/s
NOISE_KINDS = ("pink", "white", "none")
WALL_MARGIN_M = 0.1  # a speaker or mic closer to a wall than this is refused

# (low, high, unit) for each numeric knob: one place for validation and for the messages
_RANGES: dict[str, tuple[float, float, str]] = {
    "rt60_s": (0.05, 2.0, "seconds"),
    "distance_m": (0.05, 10.0, "metres"),
    "device_delay_ms": (0.0, 1000.0, "milliseconds"),
    "echo_gain_db": (-60.0, 20.0, "dB"),
    "user_gain_db": (-60.0, 20.0, "dB"),
    "noise_dbfs": (-120.0, -10.0, "dBFS"),
}
_DIM_RANGE = (1.5, 30.0)


@dataclass(frozen=True)
class RoomSpec:
    """A simulated room (see ``agent/echo/room.py`` for what each knob does); validated on creation."""

    name: str = "custom"  # a preset name or the room file's path, used in messages
    dims_m: tuple[float, float, float] = (4.0, 3.5, 2.6)  # shoebox length, width, height
    rt60_s: float = 0.25  # reverberation time: 60 dB of decay
    distance_m: float = 0.5  # speaker -> mic, used when the positions are not given
    mic_pos_m: tuple[float, float, float] | None = None  # default: room centre, 1 m high
    speaker_pos_m: tuple[float, float, float] | None = None  # default: distance_m from the mic along x
    device_delay_ms: float = 40.0  # sound card buffering between playing and hearing, not reported
    echo_gain_db: float = -6.0  # speaker -> mic level (RIR of unit energy, reverberation included)
    user_gain_db: float = -6.0  # gain applied to the --mic-file (the user's voice at the mic)
    noise: str = "pink"  # background noise: pink | white | none
    noise_dbfs: float = -60.0  # background noise RMS at the mic
    seed: int = 0  # background noise draws

    def __post_init__(self) -> None:
        where = f"room {self.name}"
        if len(self.dims_m) != 3 or not all(_DIM_RANGE[0] <= d <= _DIM_RANGE[1] for d in self.dims_m):
            raise AgentError(f"{where}: dims_m = {list(self.dims_m)} is out of range: use three lengths "
                             f"of {_DIM_RANGE[0]:g} to {_DIM_RANGE[1]:g} metres [length, width, height]")
        for key, (low, high, unit) in _RANGES.items():
            value = getattr(self, key)
            if not low <= value <= high:
                raise AgentError(f"{where}: {key} = {value:g} is out of range: use {low:g} to {high:g} {unit}")
        if self.noise not in NOISE_KINDS:
            raise AgentError(f"{where}: noise = {self.noise!r} is unknown: use one of {', '.join(NOISE_KINDS)}")
        if self.seed < 0:
            raise AgentError(f"{where}: seed = {self.seed} is negative: use 0 or more")
        for key, pos in (("mic_pos_m", self.mic_position), ("speaker_pos_m", self.speaker_position)):
            inside = all(WALL_MARGIN_M <= p <= d - WALL_MARGIN_M for p, d in zip(pos, self.dims_m))
            if len(pos) != 3 or not inside:
                raise AgentError(f"{where}: {key} = {[round(p, 3) for p in pos]} is not inside the room "
                                 f"{list(self.dims_m)}: move it at least {WALL_MARGIN_M:g} m from every wall")
        if math.dist(self.mic_position, self.speaker_position) < 0.05:
            raise AgentError(f"{where}: the speaker and the mic are at the same place: move them 0.05 m apart or more")

    @property
    def mic_position(self) -> tuple[float, float, float]:
        """The microphone's (x, y, z) in metres."""
        if self.mic_pos_m is not None:
            return tuple(float(p) for p in self.mic_pos_m)
        return (self.dims_m[0] / 2, self.dims_m[1] / 2, min(1.0, self.dims_m[2] / 2))

    @property
    def speaker_position(self) -> tuple[float, float, float]:
        """The loudspeaker's (x, y, z) in metres."""
        if self.speaker_pos_m is not None:
            return tuple(float(p) for p in self.speaker_pos_m)
        x, y, z = self.mic_position
        return (x + self.distance_m, y, z)

    @property
    def echo_delay_ms(self) -> float:
        """Delay from the sink's play time to the echo's direct sound at the mic: device + air."""
        return self.device_delay_ms + 1000.0 * math.dist(self.mic_position, self.speaker_position) / SPEED_OF_SOUND


PRESETS: dict[str, RoomSpec] = {
    spec.name: spec
    for spec in (
        # A small furnished office; desk speakers half a metre from the mic.
        RoomSpec(name="office", dims_m=(4.0, 3.5, 2.6), rt60_s=0.25, distance_m=0.5, device_delay_ms=40.0),
        # A bare living room; speakers 0.8 m away, a slower sound card.
        RoomSpec(name="living-room", dims_m=(6.0, 4.5, 3.0), rt60_s=0.6, distance_m=0.8, device_delay_ms=80.0),
    )
}
# The "-loud" variants: the agent's voice reaches the mic 10 dB louder than the user's (same
# speech level in, e.g. a laptop turned up, the user across the desk).
PRESETS.update({
    f"{name}-loud": replace(spec, name=f"{name}-loud", echo_gain_db=0.0, user_gain_db=-10.0)
    for name, spec in list(PRESETS.items())
})

_TUPLE_KEYS = ("dims_m", "mic_pos_m", "speaker_pos_m")


def load_room(spec: str | Path) -> RoomSpec:
    """A preset by name, or a TOML room file; AgentError (one line, naming the fix) otherwise."""
    text = str(spec).strip()
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text).expanduser()
    if path.suffix.lower() != ".toml" or not path.is_file():
        raise AgentError(f"unknown room {text!r}: use a preset ({', '.join(PRESETS)}) or the path of a .toml "
                         "room file (its keys: README, 'Simulated rooms')")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise AgentError(f"cannot read room file {path}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise AgentError(f"room file {path} is not valid TOML ({error}): fix it") from None
    return room_from_mapping(data, str(path))


def room_from_mapping(data: dict[str, Any], name: str) -> RoomSpec:
    """A RoomSpec from a room file's keys (``preset`` = base room, then knobs; dashes or underscores)."""
    base = PRESETS["office"]
    values: dict[str, Any] = {}
    known = {f.name: f for f in fields(RoomSpec) if f.name != "name"}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key == "preset":
            if value not in PRESETS:
                raise AgentError(f"room file {name}: preset = {value!r} is unknown: use one of {', '.join(PRESETS)}")
            base = PRESETS[value]
        elif key not in known:
            names = ", ".join(["preset", *known])
            raise AgentError(f"room file {name}: unknown key {raw_key!r}: known keys are {names}")
        else:
            values[key] = _checked_value(name, raw_key, key, value)
    return replace(base, name=name, **values)


def _checked_value(name: str, raw_key: str, key: str, value: Any) -> Any:
    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if key in _TUPLE_KEYS:
        if not (isinstance(value, list) and len(value) == 3 and all(is_number(v) for v in value)):
            raise AgentError(f"room file {name}: {raw_key} = {value!r} must be three numbers in metres, "
                             "e.g. [4.0, 3.5, 2.6]")
        return tuple(float(v) for v in value)
    if key == "noise":
        if not isinstance(value, str):
            raise AgentError(f"room file {name}: noise = {value!r} must be one of {', '.join(NOISE_KINDS)} (a string)")
        return value
    if key == "seed":
        if not isinstance(value, int) or isinstance(value, bool):
            raise AgentError(f"room file {name}: seed = {value!r} must be a whole number, e.g. 0")
        return value
    if not is_number(value):
        raise AgentError(f"room file {name}: {raw_key} = {value!r} must be a number")
    return float(value)


# ----------------------------------------------------------------------------- impulse response


def room_impulse_response(spec: RoomSpec, sample_rate: int = PIPELINE_RATE) -> np.ndarray:
    """Speaker -> mic impulse response of the room (float32, unit energy, direct sound at its air delay)."""
    return _cached_rir(_acoustic_key(spec), sample_rate).copy()


def _acoustic_key(spec: RoomSpec) -> tuple:
    # Only what shapes the RIR: rooms that differ in gains, delay or noise share one computation.
    return (tuple(spec.dims_m), spec.rt60_s, spec.mic_position, spec.speaker_position)


@functools.lru_cache(maxsize=8)
def _cached_rir(key: tuple, sample_rate: int) -> np.ndarray:
    import pyroomacoustics as pra  # slow to import (1-5 s): only when a room is built

    dims, rt60, mic, speaker = key
    target = rt60
    for _ in range(4):  # Sabine's formula misjudges the image-source RT60; correct it
        try:
            absorption, max_order = pra.inverse_sabine(target, list(dims))
        except ValueError:
            raise AgentError(f"a room of {list(dims)} m cannot reverberate for {rt60:g} s: use a shorter "
                             "rt60_s or a larger room") from None
        room = pra.ShoeBox(list(dims), fs=sample_rate, materials=pra.Material(absorption), max_order=max_order)
        room.add_source(list(speaker))
        room.add_microphone(list(mic))
        room.compute_rir()
        rir = np.asarray(room.rir[0][0], dtype=np.float64)
        measured = float(pra.experimental.measure_rt60(rir, fs=sample_rate))
        if abs(measured - rt60) <= 0.03 * rt60:
            break
        target *= rt60 / measured
    # pyroomacoustics centres each reflection's fractional-delay filter: drop that fixed lead
    rir = rir[pra.constants.get("frac_delay_length") // 2 :]
    return (rir / np.sqrt(np.sum(rir**2))).astype(np.float32)
