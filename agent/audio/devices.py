"""Real sound devices through sounddevice (PortAudio): the microphone, the speaker, and device lookup.

Every failure becomes a one-line ``AgentError`` naming the file-backed alternative.
"""

from __future__ import annotations

import logging

import numpy as np

from agent.audio.samples import BLOCK_MS, PIPELINE_RATE, PLAYBACK_BLOCK_MS
from agent.audio.sinks import AudioSink
from agent.audio.sources import QueueSource
from agent.errors import AgentError
from csm_engine.errors import first_line

log = logging.getLogger(__name__)

NO_MIC_FIX = "use --mic-file IN.wav or plug one in"
NO_SPEAKER_FIX = "use --speaker-file OUT.wav or plug one in"


class MicrophoneSource(QueueSource):
    """Live capture through sounddevice; resampled to 16 kHz mono blocks.

    Opens at 16 kHz when the device allows it, else at the device's own rate and resamples.
    Use ``open_microphone()`` to build one; errors become one-line ``AgentError``s.
    """

    hears_speaker = True

    def __init__(self, device: int | str | None = None, *, block_ms: int = BLOCK_MS) -> None:
        sd = _sounddevice(NO_MIC_FIX)
        self.device = resolve_device(device, "input")
        self.overflows = 0
        self._stream = None
        try:
            rate = PIPELINE_RATE
            try:
                sd.check_input_settings(device=self.device, channels=1, samplerate=rate, dtype="float32")
            except Exception:  # 16 kHz not offered: the device's own rate, resampled
                log.debug("microphone %s: no 16 kHz input", self.device, exc_info=True)
                rate = int(sd.query_devices(self.device, "input")["default_samplerate"])
            super().__init__(rate, block_ms=block_ms)
            self._stream = sd.InputStream(
                device=self.device,
                channels=1,
                samplerate=rate,
                dtype="float32",
                blocksize=rate * block_ms // 1000,
                callback=self._callback,
            )
        except (sd.PortAudioError, ValueError) as error:
            raise AgentError(f"no microphone found: {first_line(error)}; {NO_MIC_FIX}") from None
        self.input_latency_s = float(self._stream.latency)

    def _callback(self, indata: np.ndarray, frames: int, time_info: object, status: object) -> None:
        # PortAudio thread: copy and hand over, nothing else.
        if status:
            self.overflows += 1
        self.push(indata[:, 0].copy())

    def start(self) -> None:
        if self._stream is not None and not self._stream.active and not self._stopped.is_set():
            self._stream.start()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        super().stop()
        if self._stream is not None:
            try:
                self._stream.stop()
                self._stream.close()
            except Exception:  # closing a dead stream must not mask the reason we stop
                log.debug("closing the microphone stream failed", exc_info=True)


class SpeakerSink(AudioSink):
    """Live playback through sounddevice at the device's rate (CSM's 24 kHz when allowed).

    Use ``open_speaker()`` to build one; errors become one-line ``AgentError``s.
    """

    def __init__(self, device: int | str | None = None, *, block_ms: int = PLAYBACK_BLOCK_MS) -> None:
        sd = _sounddevice(NO_SPEAKER_FIX)
        index = resolve_device(device, "output")
        try:
            rate = 24_000
            try:
                sd.check_output_settings(device=index, channels=1, samplerate=rate, dtype="float32")
            except Exception:  # 24 kHz not offered: the device's own rate, resampled
                log.debug("speaker %s: no 24 kHz output", index, exc_info=True)
                rate = int(sd.query_devices(index, "output")["default_samplerate"])
            super().__init__(rate, block_ms=block_ms)
            self.device = index
            self._stream = sd.OutputStream(
                device=index,
                channels=1,
                samplerate=rate,
                dtype="float32",
                blocksize=self.block_samples,
                callback=self._callback,
            )
        except (sd.PortAudioError, ValueError) as error:
            raise AgentError(f"no speaker found: {first_line(error)}; {NO_SPEAKER_FIX}") from None
        self.underflows = 0
        self.output_latency_s = float(self._stream.latency)

    def _callback(self, outdata: np.ndarray, frames: int, time_info: object, status: object) -> None:
        if status:
            self.underflows += 1
        outdata[:, 0] = self._consume(frames)

    def start(self) -> None:
        if not self._stream.active and not self._stream.closed:
            self._stream.start()

    def write(self, chunk: np.ndarray, sample_rate: int) -> None:
        self.start()
        super().write(chunk, sample_rate)

    def close(self) -> None:
        if not self._stream.closed:
            if self._stream.active:
                self.wait_idle(timeout=60.0)
            self._stream.stop()
            self._stream.close()


def _sounddevice(fix: str):
    """Import sounddevice, turning a missing PortAudio library into an AgentError."""
    try:
        import sounddevice
    except OSError as error:  # raised at import when libportaudio is not installed
        raise AgentError(
            f"PortAudio is not installed ({first_line(error)}): install libportaudio2, or {fix}"
        ) from None
    return sounddevice


def _device_table() -> list[dict]:
    sd = _sounddevice(NO_MIC_FIX)
    try:
        return [dict(d) for d in sd.query_devices()]
    except sd.PortAudioError:
        return []


def resolve_device(spec: int | str | None, kind: str) -> int | None:
    """Device index for ``spec``: None/"" (system default), an index, "3: name" or a name substring."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    channels = "max_input_channels" if kind == "input" else "max_output_channels"
    fix = NO_MIC_FIX if kind == "input" else NO_SPEAKER_FIX
    devices = _device_table()
    text = str(spec).strip()
    head = text.split(":", 1)[0].strip()
    if isinstance(spec, int) or head.isdigit():
        index = int(spec) if isinstance(spec, int) else int(head)
        if 0 <= index < len(devices) and devices[index][channels] > 0:
            return index
        raise AgentError(f"no {kind} device with index {index}: see csm-chat --list-devices, or {fix}")
    matches = [i for i, d in enumerate(devices) if d[channels] > 0 and text.lower() in d["name"].lower()]
    if not matches:
        raise AgentError(f"no {kind} device matches {text!r}: see csm-chat --list-devices, or {fix}")
    exact = [i for i in matches if devices[i]["name"].lower() == text.lower()]
    return (exact or matches)[0]


def list_devices() -> tuple[list[str], list[str]]:
    """Input and output devices as ``"INDEX: NAME"`` labels (both empty with no sound card)."""
    try:
        devices = _device_table()
    except AgentError:
        return [], []
    inputs = [f"{i}: {d['name']}" for i, d in enumerate(devices) if d["max_input_channels"] > 0]
    outputs = [f"{i}: {d['name']}" for i, d in enumerate(devices) if d["max_output_channels"] > 0]
    return inputs, outputs


def describe_devices() -> str:
    """A printable table of audio devices for ``csm-chat --list-devices``."""
    try:
        devices = _device_table()
    except AgentError as error:
        return str(error)
    if not devices:
        return f"no audio devices found: {NO_MIC_FIX}; and --speaker-file OUT.wav for output"
    lines = ["index  in  out  rate    name"]
    for i, d in enumerate(devices):
        lines.append(
            f"{i:>5}  {d['max_input_channels']:>2}  {d['max_output_channels']:>3}  "
            f"{int(d['default_samplerate']):>6}  {d['name']}"
        )
    lines.append("pick one with --input-device/--output-device INDEX or a part of its name")
    return "\n".join(lines)


def open_microphone(device: int | str | None = None, *, block_ms: int = BLOCK_MS) -> MicrophoneSource:
    """Open a live microphone (not started); AgentError naming --mic-file if there is none."""
    return MicrophoneSource(device, block_ms=block_ms)


def open_speaker(device: int | str | None = None) -> SpeakerSink:
    """Open a live speaker (not started); AgentError naming --speaker-file if there is none."""
    return SpeakerSink(device)
