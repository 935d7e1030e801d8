"""Audio in and out: microphones and speakers through sounddevice, and the same interfaces on files.

Sources hand out float32 mono blocks at the pipeline rate (16 kHz, what the VAD and Whisper
want). Sinks take float32 chunks at any rate (CSM speaks at 24 kHz), queue them, and play them
block by block so that ``stop()`` silences playback within one block (barge-in). Every audio
path works without a sound card through ``WavFileSource``, ``WavFileSink`` and ``MemorySink``.

- ``agent.audio.samples``: rates, resampling, WAV files, levels;
- ``agent.audio.sources``: ``AudioSource`` and the file / queue sources;
- ``agent.audio.sinks``: ``AudioSink`` and the in-memory / file sinks;
- ``agent.audio.devices``: the sounddevice microphone and speaker, and device lookup.
"""

from agent.audio.devices import (
                                 MicrophoneSource,
                                 SpeakerSink,
                                 describe_devices,
                                 list_devices,
                                 open_microphone,
                                 open_speaker,
                                 resolve_device,
)
from agent.audio.samples import (
                                 BLOCK_MS,
                                 PIPELINE_RATE,
                                 PLAYBACK_BLOCK_MS,
                                 StreamResampler,
                                 load_audio,
                                 read_wav,
                                 resample,
                                 rms_dbfs,
                                 write_wav,
)
from agent.audio.sinks import AudioSink, FarEndListener, MemorySink, PlayedChunk, WavFileSink
from agent.audio.sources import AudioSource, QueueSource, WavFileSource

__all__ = [
    "AudioSink", "AudioSource", "BLOCK_MS", "FarEndListener", "MemorySink", "MicrophoneSource", "PIPELINE_RATE",
    "PLAYBACK_BLOCK_MS",
    "PlayedChunk", "QueueSource", "SpeakerSink", "StreamResampler", "WavFileSink", "WavFileSource",
    "describe_devices", "list_devices", "load_audio", "open_microphone", "open_speaker", "read_wav", "resample",
    "resolve_device", "rms_dbfs", "write_wav",
]
