"""Acoustic echo cancellation: the agent's own voice taken back out of the microphone signal.

``EchoCanceller`` wraps WebRTC's audio processing module (AEC3 echo canceller, noise
suppression, high-pass filter) as shipped in the ``livekit`` wheel
(``livekit.rtc.AudioProcessingModule``; binary wheels for Linux x86_64/arm64, macOS, Windows).
It is fed two streams:

- the far-end reference: every block the sink hands to the device, with its play time
  (``sink.add_listener(canceller.add_far_end)``; with a ``SimulatedRoom``, the room's
  ``add_listener`` and its ``clock``), at any rate. Blocks are placed on a 16 kHz timeline by
  play time, so a sink that goes quiet between replies leaves silence, not a shift.
- the near-end: 16 kHz microphone blocks (512 samples) through ``process(block)``, which
  returns the cleaned block, same size; ``latency_ms`` later: 8 ms of framing (the module
  takes 10 ms frames) plus the module's own delay (measured: AEC3 8 ms, noise suppression 6 ms).

For each 10 ms microphone frame the canceller hands the module the reference frame that played
at the same moment, then the microphone frame: the echo then arrives in the microphone after its
reference by the unreported part of the delay (sound card buffering + air), which AEC3 finds
itself up to ~400 ms. Play times include the sink's reported output latency and capture times
the source's input latency; ``stream_delay_ms`` adds a known extra delay (e.g. measured by
``csm-chat --check-audio``), of which all but 30 ms is taken out before AEC3 sees the signals.

Where the library cannot be loaded, ``open_echo_canceller(mode="auto")`` says so once and
passes audio through; ``mode="on"`` is then an ``AgentError`` naming the fix.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from agent.audio import PIPELINE_RATE, AudioSink, AudioSource
from agent.audio.timeline import PlayedTimeline, time_to_index
from agent.errors import AgentError

FRAME = PIPELINE_RATE // 100  # 10 ms: the only frame size the audio processing module takes
AEC_FIX = "pip install livekit (WebRTC's echo canceller), or use --aec off with headphones or --mode ptt"
AEC_MODES = ("auto", "on", "off")
DELAY_MARGIN_MS = 30.0  # of a known delay, leave this much for AEC3 to find (it must not see echo first)
MAX_HINT_MS = 500  # the module refuses larger stream delays

_notice_lock = threading.Lock()
_noticed = False


def aec_unavailable_reason() -> str | None:
    """None if WebRTC's audio processing module loads here, else why not (one line)."""
    try:
        from livekit import rtc  # noqa: F401  (a native library: may fail on exotic platforms)
    except (ImportError, OSError) as error:
        return f"{type(error).__name__}: {' '.join(str(error).split())}"
    return None


class EchoCanceller:
    """WebRTC AEC3 + noise suppression + high-pass on 16 kHz mic blocks (see the module doc).

    ``clock`` is the clock of the far-end play times and of the microphone's samples; the first
    ``process()`` call anchors the microphone stream on it (now minus the block and the input
    latency), after which blocks are taken as contiguous.
    """

    enabled = True

    def __init__(
        self,
        *,
        stream_delay_ms: float = 0.0,
        noise_suppression: bool = True,
        high_pass_filter: bool = True,
        clock: Callable[[], float] = time.monotonic,
        input_latency_s: float = 0.0,
    ) -> None:
        reason = aec_unavailable_reason()
        if reason is not None:
            raise AgentError(f"echo cancellation is not available here ({reason}): {AEC_FIX}")
        from livekit import rtc  # a native library with its own threads: only loaded when used

        self._apm = rtc.AudioProcessingModule(
            echo_cancellation=True, noise_suppression=noise_suppression, high_pass_filter=high_pass_filter
        )
        self._module_delay = _module_delay_samples(noise_suppression, high_pass_filter)
        self._near_frame = rtc.AudioFrame.create(PIPELINE_RATE, 1, FRAME)
        self._far_frame = rtc.AudioFrame.create(PIPELINE_RATE, 1, FRAME)
        self._near_pcm = np.frombuffer(self._near_frame.data, np.int16)  # views into the frames
        self._far_pcm = np.frombuffer(self._far_frame.data, np.int16)
        shift_ms = max(0.0, stream_delay_ms - DELAY_MARGIN_MS)
        self._shift = int(round(shift_ms * PIPELINE_RATE / 1000))
        self._hint_ms = int(min(MAX_HINT_MS, max(0.0, stream_delay_ms - shift_ms)))
        self.clock = clock
        self.input_latency_s = input_latency_s
        self._far = PlayedTimeline(PIPELINE_RATE)
        self._anchor: int | None = None  # timeline index of the first microphone sample
        self._frames = 0  # 10 ms microphone frames processed
        self._pending = np.zeros(0, np.float32)  # microphone samples short of a whole frame
        self._out = np.zeros(0, np.float32)  # cleaned samples not handed out yet
        self._detach: Callable[[], None] | None = None
        self._reference_listeners: tuple[Callable[[np.ndarray], None], ...] = ()

    @classmethod
    def attach(cls, source: AudioSource, sink: AudioSink, **options) -> EchoCanceller:
        """A canceller listening to ``sink``'s output on ``source``'s clock (see ``far_end_tap``)."""
        tap, clock = far_end_tap(source, sink)
        canceller = cls(clock=clock, input_latency_s=source.input_latency_s, **options)
        canceller._detach = tap.add_listener(canceller.add_far_end if tap is sink else canceller.add_placed_far_end)
        return canceller

    def close(self) -> None:
        """Stop listening to the far end (if ``attach`` connected it)."""
        if self._detach is not None:
            self._detach()
            self._detach = None

    def add_reference_listener(self, listener: Callable[[np.ndarray], None]) -> Callable[[], None]:
        """Call ``listener(reference)`` with each 10 ms far-end frame handed to AEC3 (16 kHz float32),
        in step with the microphone: the n-th reference sample is the one given alongside the n-th
        microphone sample (``stream_delay_ms`` beyond the margin already taken out). Returns a detach."""
        self._reference_listeners = (*self._reference_listeners, listener)

        def detach() -> None:
            self._reference_listeners = tuple(fn for fn in self._reference_listeners if fn is not listener)

        return detach

    @property
    def latency_ms(self) -> float:
        """How much later a sound comes out of ``process`` than it went in, in ms (known after
        the first block: framing depends on the block size)."""
        framing = self._prefill if self._anchor is not None else 0
        return 1000.0 * (framing + self._module_delay) / PIPELINE_RATE

    def add_far_end(self, samples: np.ndarray, sample_rate: int, play_time: float) -> None:
        """A far-end listener: ``samples`` at ``sample_rate`` Hz started playing at ``play_time``."""
        self._far.add(samples, sample_rate, play_time)

    def add_placed_far_end(self, samples: np.ndarray, sample_rate: int, play_time: float) -> None:
        """A far-end listener for a device that reports where it placed each block itself (a
        ``SimulatedRoom``): taken exactly as placed, a new run wherever the device started one."""
        self._far.add(samples, sample_rate, play_time, lead=0)

    def process(self, block: np.ndarray) -> np.ndarray:
        """Cleaned microphone audio for a 16 kHz float32 block; same length, ``latency_ms`` behind."""
        block = np.asarray(block, np.float32).reshape(-1)
        if self._anchor is None:
            start = self.clock() - len(block) / PIPELINE_RATE - self.input_latency_s
            self._anchor = time_to_index(start, PIPELINE_RATE)
            # Enough leading silence that every call can return a whole block.
            self._prefill = FRAME - math.gcd(len(block), FRAME) if len(block) else 0
            self._out = np.zeros(self._prefill, np.float32)
        self._pending = np.concatenate([self._pending, block])
        whole = len(self._pending) // FRAME
        cleaned = [self._process_frame(self._pending[i * FRAME : (i + 1) * FRAME]) for i in range(whole)]
        self._pending = self._pending[whole * FRAME :]
        self._out = np.concatenate([self._out, *cleaned])
        if len(self._out) < len(block):  # block sizes changed mid-stream: pad rather than stall
            self._out = np.concatenate([np.zeros(len(block) - len(self._out), np.float32), self._out])
        out, self._out = self._out[: len(block)], self._out[len(block) :]
        return out

    def _process_frame(self, near: np.ndarray) -> np.ndarray:
        at = self._anchor + self._frames * FRAME - self._shift
        reference = self._far.read(at, FRAME)
        self._far_pcm[:] = _to_pcm16(reference)
        self._far.discard_before(at)
        for listener in self._reference_listeners:
            listener(reference)
        self._apm.process_reverse_stream(self._far_frame)
        self._near_pcm[:] = _to_pcm16(near)
        self._apm.set_stream_delay_ms(self._hint_ms)
        self._apm.process_stream(self._near_frame)
        self._frames += 1
        return self._near_pcm.astype(np.float32) / 32768.0


class PassThrough:
    """What runs where there is no echo canceller: the microphone as it is."""

    enabled = False
    latency_ms = 0.0

    def add_far_end(self, samples: np.ndarray, sample_rate: int, play_time: float) -> None:
        pass

    def process(self, block: np.ndarray) -> np.ndarray:
        return np.asarray(block, np.float32)

    def close(self) -> None:
        pass


def check_aec_mode(mode: str) -> None:
    """AgentError (one line, naming the fix) for an unknown mode, or ``on`` where the library is missing."""
    if mode not in AEC_MODES:
        raise AgentError(f"unknown --aec mode {mode!r}: use on, off or auto")
    if mode == "on" and (reason := aec_unavailable_reason()) is not None:
        raise AgentError(f"--aec on: echo cancellation is not available here ({reason}): {AEC_FIX}")


def far_end_tap(source: AudioSource, sink: AudioSink) -> tuple[Any, Callable[[], float]]:
    """Where to listen for the far end, and the clock its play times and the mic share.

    A real speaker and microphone share ``time.monotonic``: listen to the sink. A simulated room
    (it has ``clock`` and ``add_listener``) relays what it heard from the sink on its own clock.
    """
    clock = getattr(source, "clock", None)
    if callable(clock) and callable(getattr(source, "add_listener", None)):
        return source, clock
    return sink, time.monotonic


def open_echo_canceller(
    mode: str,
    source: AudioSource,
    sink: AudioSink,
    *,
    notice: Callable[[str], None] | None = None,
    **options,
) -> EchoCanceller | PassThrough:
    """``--aec`` ``on`` (AgentError if the library is missing), ``off``, or ``auto`` (on where it
    loads; elsewhere ``notice`` gets one line, once per process, and audio passes through)."""
    check_aec_mode(mode)
    if mode == "off":
        return PassThrough()
    reason = aec_unavailable_reason()
    if reason is None:
        return EchoCanceller.attach(source, sink, **options)
    global _noticed
    with _notice_lock:
        first, _noticed = not _noticed, True
    if first and notice is not None:
        notice(f"echo cancellation is off: its library did not load ({reason}); {AEC_FIX}")
    return PassThrough()


@functools.lru_cache(maxsize=4)
def _module_delay_samples(noise_suppression: bool, high_pass_filter: bool) -> int:
    """The module's own delay for these settings, measured once: noise in, where it comes out."""
    from livekit import rtc

    apm = rtc.AudioProcessingModule(echo_cancellation=True, noise_suppression=noise_suppression,
                                    high_pass_filter=high_pass_filter)
    probe = _to_pcm16(np.random.default_rng(0).standard_normal(50 * FRAME) * 0.1)
    silence = rtc.AudioFrame.create(PIPELINE_RATE, 1, FRAME)
    out = []
    for i in range(50):
        apm.process_reverse_stream(silence)
        frame = rtc.AudioFrame(probe[i * FRAME : (i + 1) * FRAME].tobytes(), PIPELINE_RATE, 1, FRAME)
        apm.set_stream_delay_ms(0)
        apm.process_stream(frame)
        out.append(np.frombuffer(frame.data, np.int16).astype(np.float64))
    heard, sent = np.concatenate(out)[10 * FRAME :], probe[10 * FRAME : 30 * FRAME].astype(np.float64)
    return int(np.argmax(np.correlate(heard, sent, mode="valid")))  # heard[n + lag] ~ sent[n]


def _to_pcm16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
