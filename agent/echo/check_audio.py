"""``csm-chat --check-audio``: does the agent's voice come back into the microphone, and can it go?

Plays a test signal (pink noise in syllable-like bursts, 3.5 s) through the speaker, records the
microphone meanwhile, and reports:

- the echo delay: play time -> echo at the mic, by cross-correlation (GCC-PHAT) of what the
  sink handed to the device with what the microphone heard;
- the echo level: its RMS at the mic (dBFS) and relative to the signal played (dB);
- what the echo canceller removes (ERLE, dB) once it has had 2 s to converge;
- a verdict: hands-free will work, or use headphones / push-to-talk.

With ``--room SPEC`` it runs against the simulated room instead of the sound card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.audio import PIPELINE_RATE, AudioSink, AudioSource, MemorySink, list_devices, open_microphone, open_speaker
from agent.audio.timeline import PlayedTimeline, time_to_index
from agent.echo.canceller import EchoCanceller, PassThrough, aec_unavailable_reason, far_end_tap, open_echo_canceller
from agent.echo.measure import echo_delay_samples, erle_db, rms_db
from agent.echo.room_spec import RoomSpec
from agent.errors import AgentError

SIGNAL_RATE = 24_000  # Hz, CSM's rate: the test plays what the agent would
SIGNAL_S = 3.5
SIGNAL_DBFS = -20.0  # RMS of the test signal
LEAD_S = 0.5  # quiet before the signal: the noise floor
TAIL_S = 0.6  # after it: the echo's tail and up to this much delay
CONVERGENCE_S = 2.0  # ERLE is measured after this much of the signal
MAX_DELAY_S = 0.5  # the longest echo delay searched for
HANDS_FREE_ERLE_DB = 20.0  # at least this much echo removed for hands-free to work
AUDIBLE_ECHO_DB = 6.0  # an echo less than this above the noise floor does not matter
NO_DEVICES_FIX = ("plug in a speaker and a microphone (see csm-chat --list-devices), or try the check "
                  "against a simulated room: csm-chat --check-audio --room office")


@dataclass(frozen=True)
class AudioCheck:
    """What ``--check-audio`` found (levels in dB; ``delay_ms`` None when no echo was heard)."""

    delay_ms: float | None  # the sink's play time -> the echo's direct sound at the mic
    echo_dbfs: float  # echo RMS at the mic while the signal played
    echo_level_db: float  # echo relative to the signal played (negative: quieter)
    noise_dbfs: float  # the mic before the signal
    erle_db: float | None  # echo removed by the canceller after convergence; None without one
    aec: str  # "on", "off" or why it is unavailable
    hands_free: bool
    verdict: str


@dataclass(frozen=True)
class Recording:
    """One check's signals on the microphone's 16 kHz timeline (the same length each)."""

    reference: np.ndarray  # what the speaker played, placed by play time
    mic: np.ndarray  # what the microphone heard
    cleaned: np.ndarray | None  # the echo canceller's output, realigned (None without one)
    signal_start: int  # sample where the signal starts playing
    signal_end: int  # sample where it stops


def check_signal(seconds: float = SIGNAL_S, sample_rate: int = SIGNAL_RATE, seed: int = 0) -> np.ndarray:
    """Pink noise in 4 Hz syllable-like bursts at ``SIGNAL_DBFS`` RMS (float32): broadband for
    a sharp cross-correlation, speech-like in rhythm for the echo canceller."""
    from agent.echo.room import BackgroundNoise

    n = int(seconds * sample_rate)
    noise = BackgroundNoise("pink", 0.0, seed).next(n)
    t = np.arange(n) / sample_rate
    rng = np.random.default_rng(seed)
    levels = rng.uniform(0.3, 1.0, int(seconds * 4) + 2)  # one level per syllable
    envelope = np.sin(np.pi * (t * 4 % 1.0)) ** 2 * levels[(t * 4).astype(int)]
    signal = noise * envelope
    return (signal * 10 ** (SIGNAL_DBFS / 20) / np.sqrt(np.mean(signal**2))).astype(np.float32)


def record_echo(
    source: AudioSource,
    sink: AudioSink,
    canceller: EchoCanceller | PassThrough,
    signal: np.ndarray,
    sample_rate: int = SIGNAL_RATE,
    *,
    lead_s: float = LEAD_S,
    tail_s: float = TAIL_S,
    stop_after_s: float | None = None,
) -> Recording:
    """Play ``signal`` through ``sink`` after ``lead_s`` of listening, while reading ``source``
    through ``canceller``, until ``tail_s`` after its end; ``stop_after_s``: cut playback
    (``sink.stop()``, a barge-in) that long after it started.

    The reference is recorded from the same far-end tap as the canceller's (a room relays the
    sink on its own clock), so the delay found is the one the canceller has to bridge.
    """
    tap, clock = far_end_tap(source, sink)
    reference = PlayedTimeline(PIPELINE_RATE)
    exact = tap is not sink  # a room reports where it placed each block: take that as it is
    detach = tap.add_listener(lambda x, rate, at: reference.add(x, rate, at, lead=0 if exact else None))
    mic, cleaned = [], []
    blocks = lambda seconds: math.ceil(seconds * PIPELINE_RATE / source.block_samples)  # noqa: E731
    lead_blocks = blocks(lead_s)
    total = lead_blocks + blocks(len(signal) / sample_rate + tail_s)
    stop_block = None if stop_after_s is None else lead_blocks + blocks(stop_after_s)
    paced = getattr(source, "realtime", True) is False  # a paced room: let the sink catch up first
    anchor = None
    try:
        source.start()
        sink.start()
        for i in range(total):
            if i == lead_blocks:
                sink.write(signal, sample_rate)
                sink.flush()
                if paced:
                    sink.wait_idle(timeout=10.0)
            if i == stop_block:
                sink.stop()
            block = source.read(timeout=5.0)
            if block is None:
                raise AgentError("the microphone stopped during --check-audio: check the input device")
            if anchor is None:
                anchor = time_to_index(clock() - len(block) / PIPELINE_RATE - source.input_latency_s)
            mic.append(block)
            cleaned.append(canceller.process(block))
    finally:
        detach()
    mic_audio = np.concatenate(mic)
    latency = int(round(canceller.latency_ms * PIPELINE_RATE / 1000))
    out = np.concatenate(cleaned)[latency:]
    out = np.concatenate([out, np.zeros(len(mic_audio) - len(out), np.float32)])
    played = reference.read(anchor, len(mic_audio))
    heard = np.flatnonzero(played)
    if len(heard) == 0:
        raise AgentError("the speaker played nothing during --check-audio: check the output device")
    return Recording(played, mic_audio, out if canceller.enabled else None, int(heard[0]), int(heard[-1]) + 1)


def record_in_room(
    room: str | RoomSpec,
    agent_audio: np.ndarray,
    sample_rate: int,
    *,
    user_audio: np.ndarray | None = None,
    realtime: bool = False,
    user_waits: bool | None = None,
    aec: bool = True,
    noise_suppression: bool = True,
    stream_delay_ms: float = 0.0,
    **timing,
) -> Recording:
    """``record_echo`` in a simulated room, with everything it needs built and closed: a
    MemorySink (1x or instant) feeding the room, the room relaying to an EchoCanceller
    (or a PassThrough: ``aec=False``). ``timing``: ``lead_s``, ``tail_s``, ``stop_after_s``."""
    from agent.echo.room import SimulatedRoom, load_room

    spec = room if isinstance(room, RoomSpec) else load_room(room)
    source = SimulatedRoom(spec, user_audio, realtime=realtime, user_waits=user_waits, trailing_silence_s=30.0)
    sink = MemorySink(sample_rate, speed=1.0 if realtime else None)
    unhear = sink.add_listener(source.hear)
    options = {"noise_suppression": noise_suppression, "stream_delay_ms": stream_delay_ms}
    canceller = EchoCanceller.attach(source, sink, **options) if aec else PassThrough()
    try:
        return record_echo(source, sink, canceller, agent_audio, sample_rate, **timing)
    finally:
        canceller.close()
        unhear()
        sink.close()
        source.stop()


def analyse(recording: Recording, *, aec: str) -> AudioCheck:
    """The numbers and the verdict of one recording."""
    start, end = recording.signal_start, recording.signal_end
    noise_dbfs = rms_db(recording.mic[:start])
    echo = recording.mic[start : end + int(0.1 * PIPELINE_RATE)]
    echo_power = max(10 ** (rms_db(echo) / 10) - 10 ** (noise_dbfs / 10), 1e-12)
    echo_dbfs = 10 * math.log10(echo_power)
    echo_level_db = echo_dbfs - rms_db(recording.reference[start:end])
    lag, prominence = echo_delay_samples(recording.reference, recording.mic, int(MAX_DELAY_S * PIPELINE_RATE))
    audible = echo_dbfs - noise_dbfs >= AUDIBLE_ECHO_DB
    delay_ms = 1000.0 * lag / PIPELINE_RATE if audible and prominence > 10 else None
    erle = None
    if recording.cleaned is not None:
        window = slice(start + int(CONVERGENCE_S * PIPELINE_RATE), end)
        erle = erle_db(recording.mic[window], recording.cleaned[window])
    hands_free, verdict = _verdict(audible, echo_dbfs, erle, aec)
    return AudioCheck(delay_ms, echo_dbfs, echo_level_db, noise_dbfs, erle, aec, hands_free, verdict)


def _verdict(audible: bool, echo_dbfs: float, erle: float | None, aec: str) -> tuple[bool, str]:
    if not audible:
        return True, "hands-free will work: hardly any of the speaker's sound reaches the microphone"
    if erle is not None and erle >= HANDS_FREE_ERLE_DB:
        return True, f"hands-free will work: the echo canceller removes {erle:.0f} dB of the agent's voice"
    if erle is not None:
        return False, (f"use headphones or push-to-talk (--mode ptt): the echo canceller removes only "
                       f"{erle:.0f} dB of an echo at {echo_dbfs:.0f} dBFS; turn the speaker down or move it away")
    return False, (f"use headphones or push-to-talk (--mode ptt): the agent's voice reaches the microphone at "
                   f"{echo_dbfs:.0f} dBFS and no echo canceller runs ({aec})")


def format_report(check: AudioCheck) -> str:
    """The lines ``csm-chat --check-audio`` prints."""
    delay = "not measurable (no echo heard)" if check.delay_ms is None else f"{check.delay_ms:.1f} ms"
    erle = "-" if check.erle_db is None else f"{check.erle_db:.1f} dB"
    return "\n".join([
        f"echo delay:      {delay}",
        f"echo level:      {check.echo_dbfs:.1f} dBFS at the mic ({check.echo_level_db:+.1f} dB of what was played)",
        f"noise floor:     {check.noise_dbfs:.1f} dBFS",
        f"echo canceller:  {check.aec}; removes {erle} after {CONVERGENCE_S:g} s",
        f"verdict:         {check.verdict}",
    ])


def run_check_audio(settings, notice=None) -> AudioCheck:
    """``--check-audio`` for these settings: the sound card, or ``settings.room`` when set."""
    if settings.room:
        from agent.echo.room import open_room

        source = open_room(settings.room, realtime=settings.realtime)
        sink = MemorySink(SIGNAL_RATE, speed=1.0 if settings.realtime else None)
        unhear = sink.add_listener(source.hear)
    else:
        source, sink = _open_devices(settings)
        unhear = lambda: None  # noqa: E731
    try:
        canceller = open_echo_canceller(settings.aec, source, sink, notice=notice)
        try:
            recording = record_echo(source, sink, canceller, check_signal())
        finally:
            canceller.close()
    finally:
        unhear()
        source.stop()
        sink.close()
    aec = ("on (WebRTC AEC3)" if canceller.enabled else "off" if settings.aec == "off"
           else f"unavailable: {aec_unavailable_reason()}")
    return analyse(recording, aec=aec)


def _open_devices(settings) -> tuple[AudioSource, AudioSink]:
    inputs, outputs = list_devices()
    if not inputs or not outputs:
        missing = " and ".join(kind for kind, found in (("speaker", outputs), ("microphone", inputs)) if not found)
        raise AgentError(f"--check-audio found no {missing}: {NO_DEVICES_FIX}")
    try:
        sink = open_speaker(settings.output_device)
    except AgentError as error:
        raise AgentError(f"--check-audio cannot open the speaker ({error}): {NO_DEVICES_FIX}") from None
    try:
        source = open_microphone(settings.input_device)
    except AgentError as error:
        sink.close()
        raise AgentError(f"--check-audio cannot open the microphone ({error}): {NO_DEVICES_FIX}") from None
    return source, sink
