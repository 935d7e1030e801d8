"""A simulated room: the agent's own voice comes back into the microphone, as on open speakers.

``SimulatedRoom`` is an ``AudioSource`` (16 kHz mono blocks, like a microphone). What the agent
plays reaches it through the far-end tap of its ``AudioSink``; the room delays it by the sound
card's latency, convolves it with the room's impulse response, scales it, and mixes it with the
user's voice (the ``--mic-file``) and background noise::

    room = open_room("living-room-loud", "user.wav")      # or a RoomSpec, or a .toml path
    stop_hearing = sink.add_listener(room.hear)           # speaker -> room
    room.add_listener(canceller.add_placed_far_end)       # the AEC's reference, as the room placed it
    block = room.read()                                   # user + echo + noise

mic[t] = clip( user_gain * user[t] + echo_gain * (rir * far)[t - device_delay] + noise[t] )

The knobs (``RoomSpec`` fields; a TOML room file sets any of them, dashes or underscores):

- ``preset``: start from a named room, then change what the file lists. Presets:
  ``office`` (4 x 3.5 x 2.6 m, RT60 0.25 s, speaker 0.5 m from the mic, 40 ms device delay),
  ``living-room`` (6 x 4.5 x 3 m, RT60 0.6 s, 0.8 m, 80 ms); both with the echo and the user's
  voice at the same gain (-6 dB). ``office-loud`` / ``living-room-loud``: the echo 10 dB louder
  than the user's voice (echo 0 dB, user -10 dB).
- ``dims_m = [length, width, height]`` (1.5-30 m), ``rt60_s`` (0.05-2 s): the shoebox and its
  reverberation time (the RIR is pyroomacoustics' image-source model, corrected to this RT60).
- ``distance_m``: speaker to mic; the mic sits in the middle of the room, 1 m high, the speaker
  that far along the length. Or place them: ``mic_pos_m``, ``speaker_pos_m`` = [x, y, z].
- ``device_delay_ms`` (0-1000): the sound card's buffering between playing and hearing, which
  the room does not report (as real devices under-report theirs); the echo's direct sound
  arrives ``device_delay_ms`` + distance / 343 m/s after the sink's play time.
- ``echo_gain_db``: the speaker-to-mic level; the RIR has unit energy, so with reverberation
  included, agent speech at -20 dBFS comes in at -20 + echo_gain_db dBFS.
- ``user_gain_db``: the gain on the ``--mic-file``. With the agent and the user speaking at the
  same level, ``echo_gain_db - user_gain_db`` is the echo's level relative to the user's voice.
- ``noise`` (pink | white | none), ``noise_dbfs`` (RMS at the mic), ``seed`` (noise draws).

Example room file::

    preset = "living-room"
    rt60_s = 0.4
    distance_m = 1.2
    device_delay_ms = 120
    noise = "white"
    noise_dbfs = -55

Time: with ``realtime=True`` blocks come at the pace of real time from ``start()`` (like
``WavFileSource`` at 1x), the far-end is placed by the sink's play times as a sound card with a
``SNAP_S`` buffer plays it: a block handed over before the run it continues ran out follows it
sample-exactly, a later one (an underrun) starts ``SNAP_S`` after it came; nothing plays before it
was handed over. (Placing a late block back at the end of its run, up to 30 ms before it came, put
sound in the echo that the echo canceller, which reads the reference in step with the microphone,
had already read as silence: measured with ``benchmarks/echo_residual.py``, 20-60 ms of the far end
in three replies at 1x missing from the reference, and the echo model's residual up to 15 dB over
the leak it expects where paced runs, with an exact reference, stay under 6 dB.) The user speaks on
schedule, over the agent if the file says so. With ``realtime=False`` (paced runs: the pipeline
reads the mic only between replies) the room has its own clock that advances one block per
``read()``; what the agent plays is placed at the room's current time, and the user waits
until the echo has died away before going on with the file (``user_waits``, default: only
when paced; ``user_waits=False`` keeps the file on schedule, for double talk in paced tests).
``clock()`` is that clock, on the scale of ``time.monotonic()``: an echo canceller must use it
with the room's ``add_listener``.
The source ends with the user's file (plus ``trailing_silence_s``); without one it never ends.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.signal import lfilter

from agent.audio import BLOCK_MS, PIPELINE_RATE, AudioSource, FarEndListener, load_audio
from agent.audio.timeline import SNAP_S, PlayedTimeline
from agent.echo.room_spec import PRESETS, RoomSpec, load_room, room_from_mapping, room_impulse_response

__all__ = ["PRESETS", "RoomSpec", "SimulatedRoom", "load_room", "open_room", "room_from_mapping",
           "room_impulse_response"]

FAR_END_WAIT_S = 0.04  # how long a real-time block waits for far-end audio that is due but late


class BlockConvolver:
    """Streaming convolution with a long impulse response, one block in -> one block out.

    Uniformly partitioned overlap-save: the response is cut into block-long parts whose spectra
    multiply the spectra of the last inputs, so a block costs two FFTs of twice its length.
    """

    def __init__(self, response: np.ndarray, block_samples: int) -> None:
        b = self.block_samples = int(block_samples)
        parts = max(1, math.ceil(len(response) / b))
        padded = np.zeros((parts, 2 * b), np.float64)
        padded[:, :b] = np.pad(np.asarray(response, np.float64), (0, parts * b - len(response))).reshape(parts, b)
        self._spectra = np.fft.rfft(padded, axis=1)
        self._history = np.zeros_like(self._spectra)  # spectra of the last `parts` input pairs, newest first
        self._previous = np.zeros(b, np.float64)
        self._silent_blocks = parts + 1  # no input for this long: the output is silence too

    def process(self, block: np.ndarray) -> np.ndarray:
        """The next ``block_samples`` of output for the next ``block_samples`` of input."""
        block = np.asarray(block, np.float64)
        self._silent_blocks = self._silent_blocks + 1 if not block.any() else 0
        if self._silent_blocks > len(self._spectra):  # everything it remembers is silence
            if self._silent_blocks == len(self._spectra) + 1:
                self._history[:] = 0.0
                self._previous[:] = 0.0
            return np.zeros(self.block_samples, np.float32)
        self._history = np.roll(self._history, 1, axis=0)
        self._history[0] = np.fft.rfft(np.concatenate([self._previous, block]))
        self._previous = block
        out = np.fft.irfft(np.einsum("pf,pf->f", self._history, self._spectra), 2 * self.block_samples)
        return out[self.block_samples :].astype(np.float32)


class BackgroundNoise:
    """Stationary noise at a fixed RMS level, drawn block by block (white, or pink: -3 dB/octave)."""

    # A 3-pole, 3-zero filter that turns white noise pink within 0.05 dB over the audio band
    # (the widely used coefficients from Julius O. Smith's notes).
    _PINK_B = (0.049922035, -0.095993537, 0.050612699, -0.004408786)
    _PINK_A = (1.0, -2.494956002, 2.017265875, -0.522189400)

    def __init__(self, kind: str, level_dbfs: float, seed: int) -> None:
        self.kind = kind
        self._rng = np.random.default_rng(seed)
        self._rms = 10.0 ** (level_dbfs / 20.0)
        self._state = np.zeros(len(self._PINK_A) - 1)
        impulse = np.zeros(1 << 16)
        impulse[0] = 1.0
        self._pink_gain = float(np.sqrt(np.sum(lfilter(self._PINK_B, self._PINK_A, impulse) ** 2)))

    def next(self, n: int) -> np.ndarray:
        """The next n samples (float32)."""
        if self.kind == "none":
            return np.zeros(n, np.float32)
        white = self._rng.standard_normal(n)
        if self.kind == "pink":
            white, self._state = lfilter(self._PINK_B, self._PINK_A, white, zi=self._state)
            white /= self._pink_gain
        return (white * self._rms).astype(np.float32)


class SimulatedRoom(AudioSource):
    """A microphone in a simulated room: user voice + the agent's echo + noise (see the module doc)."""

    hears_speaker = True

    def __init__(
        self,
        spec: RoomSpec,
        user_audio: np.ndarray | None = None,
        *,
        realtime: bool = True,
        trailing_silence_s: float = 0.0,
        block_ms: int = BLOCK_MS,
        user_waits: bool | None = None,
    ) -> None:
        self.spec = spec
        self.realtime = realtime
        self.user_waits = (not realtime) if user_waits is None else user_waits
        # Also hold the user's file while this says so (a user who waits for the agent's answer).
        self.user_waits_for: Callable[[], bool] | None = None
        self.block_samples = PIPELINE_RATE * block_ms // 1000
        self.rir = room_impulse_response(spec, PIPELINE_RATE)
        self._delay = int(round(spec.device_delay_ms * PIPELINE_RATE / 1000))
        self._lead = int(round(SNAP_S * PIPELINE_RATE))  # at 1x: the buffer that absorbs the sink's jitter
        self._echo_gain = 10.0 ** (spec.echo_gain_db / 20.0)
        self._convolver = BlockConvolver(self.rir, self.block_samples)
        self._noise = BackgroundNoise(spec.noise, spec.noise_dbfs, spec.seed)
        self._user: np.ndarray | None = None
        if user_audio is not None:
            user = np.asarray(user_audio, np.float32) * np.float32(10.0 ** (spec.user_gain_db / 20.0))
            self._user = np.concatenate([user, np.zeros(int(trailing_silence_s * PIPELINE_RATE), np.float32)])
        self._user_pos = 0
        self._far = PlayedTimeline(PIPELINE_RATE)
        self._far_arrived = threading.Condition()
        self._listeners: tuple[FarEndListener, ...] = ()
        # Diagnostics: called with (far, echo, mic) for each block: what the speaker played that reaches
        # the mic in it (before the room), the echo it became, and the microphone block handed out.
        self.on_mix: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None
        self._origin: int | None = None  # timeline index of the first mic sample
        self._next = 0  # blocks handed out
        self._stopped = threading.Event()
        self._read_lock = threading.Lock()
        self._lock = threading.Lock()

    # -- the speaker side

    def hear(self, samples: np.ndarray, sample_rate: int, play_time: float) -> None:
        """A far-end listener (``sink.add_listener(room.hear)``): the speaker played this block."""
        if self.realtime:  # as a sound card plays it: never before it came (see the module doc)
            start = self._far.add(samples, sample_rate, play_time, lead=self._lead)
        else:  # paced: it plays now on the room's own clock (the sink is drained before the next read)
            start = self._far.add(samples, sample_rate, self.clock(), lead=0)
        with self._far_arrived:
            self._far_arrived.notify_all()
        for listener in self._listeners:
            listener(samples, sample_rate, start / PIPELINE_RATE)

    def add_listener(self, listener: FarEndListener):
        """Pass on every block the room heard, with its play time on the room's ``clock()``: where the
        room placed it (a listener's timeline takes it exactly: ``PlayedTimeline.add(..., lead=0)``)."""
        with self._lock:
            self._listeners = (*self._listeners, listener)
        return lambda: self._remove_listener(listener)

    def _remove_listener(self, listener: FarEndListener) -> None:
        with self._lock:
            self._listeners = tuple(fn for fn in self._listeners if fn is not listener)

    def clock(self) -> float:
        """The room's time in seconds (``time.monotonic()`` scale): the end of the last block read."""
        return (self._started_origin() + self._next * self.block_samples) / PIPELINE_RATE

    # -- the microphone side

    def start(self) -> None:
        self._started_origin()

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        with self._read_lock:
            origin = self._started_origin()
            if self._stopped.is_set():
                return None
            start = origin + self._next * self.block_samples
            if self.realtime:
                delay = (start + self.block_samples) / PIPELINE_RATE - time.monotonic()
                if timeout is not None and delay > timeout:
                    if self._stopped.wait(timeout):
                        return None
                    raise TimeoutError("no audio block within the timeout")
                if delay > 0 and self._stopped.wait(delay):
                    return None
                self._await_far_end(start + self.block_samples - self._delay)
            block = self._mix(start)
            if block is not None:
                self._next += 1
            return block

    def stop(self) -> None:
        self._stopped.set()
        with self._far_arrived:
            self._far_arrived.notify_all()

    @property
    def position_s(self) -> float:
        """Seconds of microphone audio handed out so far."""
        return self._next * self.block_samples / PIPELINE_RATE

    @property
    def user_position_s(self) -> float:
        """Seconds of the user's file spoken into the room so far (held blocks do not count)."""
        return self._user_pos / PIPELINE_RATE

    # -- internals

    def _started_origin(self) -> int:
        with self._lock:
            if self._origin is None:
                self._origin = int(round(time.monotonic() * PIPELINE_RATE))
            return self._origin

    def _await_far_end(self, needed_end: int) -> None:
        """While the agent is speaking, give a late playback thread a moment to deliver."""
        deadline = time.monotonic() + FAR_END_WAIT_S
        with self._far_arrived:
            while not self._stopped.is_set():
                end = self._far.end
                speaking = end is not None and end > needed_end - 2 * self.block_samples - SNAP_S * PIPELINE_RATE
                remaining = deadline - time.monotonic()
                if not speaking or end >= needed_end or remaining <= 0:
                    return
                self._far_arrived.wait(remaining)

    def _mix(self, start: int) -> np.ndarray | None:
        b = self.block_samples
        user = self._user_block(start)
        if user is None:
            return None
        far = self._far.read(start - self._delay, b)
        self._far.discard_before(start - self._delay + b)  # the convolver keeps its own history
        echo = self._convolver.process(far) * np.float32(self._echo_gain)
        mic = np.clip(user + echo + self._noise.next(b), -1.0, 1.0)
        if self.on_mix is not None:
            self.on_mix(far, echo, mic)
        return mic

    def _user_block(self, start: int) -> np.ndarray | None:
        b = self.block_samples
        if self._user is None:
            return np.zeros(b, np.float32)
        end = self._far.end
        if self.user_waits and end is not None and end + self._delay + len(self.rir) > start:
            return np.zeros(b, np.float32)  # the user waits for the agent's voice to die away
        if self.user_waits_for is not None and self.user_waits_for():
            return np.zeros(b, np.float32)
        if self._user_pos >= len(self._user):
            return None
        block = np.zeros(b, np.float32)
        piece = self._user[self._user_pos : self._user_pos + b]
        block[: len(piece)] = piece
        self._user_pos += b
        return block


def open_room(
    spec: RoomSpec | str | Path,
    mic_file: str | Path | None = None,
    *,
    realtime: bool = True,
    trailing_silence_s: float = 0.0,
) -> SimulatedRoom:
    """A SimulatedRoom from a RoomSpec, a preset name or a room file, with the user's WAV if any."""
    room = spec if isinstance(spec, RoomSpec) else load_room(spec)
    user = load_audio(mic_file, PIPELINE_RATE) if mic_file is not None else None
    return SimulatedRoom(room, user, realtime=realtime, trailing_silence_s=trailing_silence_s)
