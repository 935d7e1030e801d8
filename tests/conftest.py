"""Session fixtures shared by the test suite (append new fixtures; keep them session-scoped)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight checkpoint dir (config, weights, tokenizer.json, Mimi), written once per session."""
    from csm_engine.testing.checkpoints import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), flavor="tiny", seed=0)


@pytest.fixture(scope="session")
def random_watermark_dir(tmp_path_factory) -> Path:
    """A random-init silentcipher 44.1 kHz checkpoint set (enc_c/dec_c/dec_m_0.ckpt + hparams.yaml), written once."""
    from csm_engine.testing.watermark import write_random_watermark_checkpoint

    return write_random_watermark_checkpoint(tmp_path_factory.mktemp("silentcipher_random"), seed=0)


@pytest.fixture(scope="session")
def espeak_speech_wav(tmp_path_factory) -> Path:
    """A real spoken WAV from espeak-ng (22.05 kHz mono, ~2 s), written once."""
    import shutil
    import subprocess

    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed; run `make test` (or apt-get install espeak-ng)")
    path = tmp_path_factory.mktemp("espeak") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "hello there, this is a short test of my voice"], check=True)
    return path


# ---- agent building blocks (audio, VAD, ASR, LLM): real espeak-ng speech and embedded models ----


@pytest.fixture(scope="session")
def espeak_wav(tmp_path_factory):
    """Factory: ``espeak_wav(text, voice="en-us", wpm=160) -> Path`` of a real spoken WAV (22.05 kHz
    mono), made once per distinct arguments per session."""
    import hashlib
    import shutil
    import subprocess

    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed; run `make test` (or apt-get install espeak-ng)")
    directory = tmp_path_factory.mktemp("espeak_clips")
    cache: dict[tuple, Path] = {}

    def make(text: str, voice: str = "en-us", wpm: int = 160) -> Path:
        key = (text, voice, wpm)
        if key not in cache:
            name = hashlib.sha1(repr(key).encode()).hexdigest()[:12]
            path = directory / f"{name}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(path), text], check=True)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def spoken_turns_wav(espeak_wav, tmp_path_factory):
    """Factory: ``spoken_turns_wav(["first turn", "second turn"], gap_s=1.5, lead_s=0.5, tail_s=1.0,
    sample_rate=16000) -> Path``: espeak-ng turns joined by silence in one mono WAV, like a user
    speaking into the microphone. Made once per distinct arguments."""
    import numpy as np

    from agent.audio import load_audio, write_wav

    directory = tmp_path_factory.mktemp("spoken_turns")
    cache: dict[tuple, Path] = {}

    def make(texts, gap_s: float = 1.5, lead_s: float = 0.5, tail_s: float = 1.0, sample_rate: int = 16000) -> Path:
        key = (tuple(texts), gap_s, lead_s, tail_s, sample_rate)
        if key not in cache:
            silence = lambda s: np.zeros(int(round(s * sample_rate)), np.float32)  # noqa: E731
            parts = [silence(lead_s)]
            for i, text in enumerate(texts):
                if i:
                    parts.append(silence(gap_s))
                parts.append(load_audio(espeak_wav(text), sample_rate))
            parts.append(silence(tail_s))
            cache[key] = write_wav(directory / f"turns_{len(cache)}.wav", np.concatenate(parts), sample_rate)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def faster_whisper_tiny():
    """The embedded Whisper tiny.en on faster-whisper (int8 CPU), loaded once."""
    from agent.listen.asr import FasterWhisperTranscriber

    return FasterWhisperTranscriber()


@pytest.fixture(scope="session")
def openai_whisper_tiny_pt(tmp_path_factory) -> Path:
    """The embedded CTranslate2 tiny.en converted to an openai-whisper checkpoint (.pt), once."""
    from _asr_helpers import convert_ct2_whisper_to_openai

    from agent.embedded import whisper_tiny_en_dir

    return convert_ct2_whisper_to_openai(whisper_tiny_en_dir(), tmp_path_factory.mktemp("whisper") / "tiny.en.pt")


# A native library that crashes on this CPU (llama.cpp's AMX kernels did: SIGSEGV on the first
# multi-token prompt) would take the whole pytest process down with it. So before a CPU-sensitive
# native model is loaded in-process, the same load and a real decode run once in a subprocess:
# a crash there is one clear failure of the tests that use the model, not a `Fatal Python error`.
SMOLLM2_PROBE = """
from agent.llm.base import Sampling
from agent.llm.local import LocalLLM
llm = LocalLLM(seed=1234)
prompt = ("I am planning a picnic in the park next Saturday with my family and two friends. We will bring "
          "sandwiches, fruit, lemonade and a big blanket. What else should we remember to pack?")
assert llm.count_tokens(prompt) >= 36
print(llm.repack.reason, "|", llm.reply([{"role": "user", "content": prompt}], sampling=Sampling(max_tokens=4)))
"""


def probe_native_load(what: str, code: str, timeout_s: float = 120.0) -> str:
    """Run ``code`` in a fresh Python; ``pytest.fail`` with one line if it dies (signal, error, hang)."""
    import os
    import signal
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parent.parent)  # this checkout's code, whatever the venv points at
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH")] if p)}
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s,
                                env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: a probe load and decode did not finish in {timeout_s:.0f} s", pytrace=False)
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        pytest.fail(f"{what} crashed with {name} on this CPU (probe subprocess: load + multi-token decode); "
                    "for llama.cpp try CSM_LLAMA_REPACK=off", pytrace=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.fail(f"{what}: the probe subprocess failed: {last}", pytrace=False)
    return result.stdout.strip()


@pytest.fixture(scope="session")
def smollm2_llm():
    """The embedded SmolLM2-135M-Instruct on llama.cpp (fixed seed), loaded once (after a probe in a subprocess)."""
    probe_native_load("llama.cpp (embedded SmolLM2)", SMOLLM2_PROBE)
    from agent.llm.local import LocalLLM

    return LocalLLM(seed=1234)


# ---- csm-chat pipeline: a tiny CSM generator, a test persona with a local voice clip ----


@pytest.fixture(scope="session")
def tiny_generator(tiny_checkpoint):
    """A Generator on the tiny random checkpoint (float32, CPU), loaded once."""
    from csm_engine.generator import load_generator

    return load_generator(str(tiny_checkpoint), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def chat_persona(tmp_path_factory, espeak_wav) -> Path:
    """A persona file for pipeline tests: a local espeak voice clip, short sentences (480 ms of CSM
    audio at most), short deterministic LLM replies."""
    import shutil

    directory = tmp_path_factory.mktemp("chat_persona")
    clip_text = "hello, this is my voice"
    shutil.copy(espeak_wav(clip_text), directory / "voice.wav")
    path = directory / "tester.toml"
    path.write_text(
        'name = "Tester"\n'
        "speaker_id = 0\n"
        f'voice = {{ clip = "voice.wav", transcript = "{clip_text}" }}\n'
        "max_audio_length_ms = 480\n"
        'system_prompt = "You are a helpful assistant. Answer in one short sentence."\n'
        "[llm]\n"
        "max_tokens = 24\n"
        "temperature = 0.0\n",
        encoding="utf-8",
    )
    return path


# ---- csm-finetune: espeak clips with transcripts, a saved conversation ----

TRAIN_CLIP_TEXTS = ("Hello there, how are you doing today?", "The weather is lovely this morning.",
                    "Thank you so much for your help.")


@pytest.fixture(scope="session")
def train_clip_folder(tmp_path_factory, espeak_wav) -> Path:
    """A clip folder as csm-finetune reads it: three espeak clips (NAME.wav) with transcripts (NAME.txt)."""
    import shutil

    folder = tmp_path_factory.mktemp("train_clips")
    for i, text in enumerate(TRAIN_CLIP_TEXTS):
        shutil.copy(espeak_wav(text), folder / f"clip{i}.wav")
        (folder / f"clip{i}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def saved_conversation(tmp_path_factory, espeak_wav) -> Path:
    """A conversation directory written by the agent's own writer (agent.conversation.conversation.Conversation.save),
    for csm-finetune and --replay: a spoken user turn (16 kHz), an agent turn of two sentences and one of one
    (24 kHz), two typed user turns, and last an agent reply with text only (cut off before it was spoken)."""
    import numpy as np

    from agent.audio import load_audio
    from agent.conversation.conversation import Conversation, Sentence

    conversation = Conversation("tester", agent_speaker=0)
    question = "Hi, what is the weather like?"
    conversation.add_user_turn(question, load_audio(espeak_wav(question), 16000), 16000)
    first, second = "It is sunny today.", "Do you want to go for a walk?"
    parts = [load_audio(espeak_wav(t, voice="en-gb"), 24000) for t in (first, second)]
    conversation.add_agent_turn([Sentence(first, len(parts[0])), Sentence(second, len(parts[1]))],
                                np.concatenate(parts), sample_rate=24000)
    conversation.add_user_turn("Yes, that sounds lovely.", None, typed=True)
    reply = "Great, let us go after lunch."
    audio = load_audio(espeak_wav(reply, voice="en-gb"), 24000)
    conversation.add_agent_turn([Sentence(reply, len(audio))], audio, sample_rate=24000)
    conversation.add_user_turn("And tomorrow?", None, typed=True)
    conversation.add_agent_turn([Sentence("It will rain tomorrow.", 0)], None, text="It will rain tomorrow.")
    return conversation.save(tmp_path_factory.mktemp("saved_conversation") / "convo")


# ---- tools and memory: each test gets its own user data dir (memory.db, timers.json) ----


@pytest.fixture(autouse=True)
def _own_user_data_dir(tmp_path_factory, monkeypatch):
    """Keep the memory store and timers of in-process pipelines out of the real user data dir
    and out of each other's way (platformdirs reads XDG_DATA_HOME at each call)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
