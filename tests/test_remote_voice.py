"""The agent's voice stage on a real csm-serve: the same prompts and frames as in-process, barge-in, errors.

In-process and remote both run the tiny checkpoint in float32 on this CPU; greedy sampling makes
the frames comparable bit for bit (see test_batch_engine.py for why sampled frames are compared
within the engine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from _serve_helpers import ServerProcess, console_script, write_voices
from _stage_helpers import EventLog

from agent.audio import MemorySink, load_audio
from agent.config.settings import AgentSettings
from agent.conversation.conversation import Conversation
from agent.errors import AgentError
from agent.events import AgentTurnDone
from agent.pipeline import Pipeline
from agent.speak.remote_voice import RemoteSynthesizer, server_root
from agent.speak.synthesis import ReplySynthesizer, SynthesisOptions
from csm_engine.errors import CSMError
from csm_engine.tokens import Segment

KEY = "voice-key"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, espeak_speech_wav, tmp_path_factory):
    directory = tmp_path_factory.mktemp("remote_voice")
    shutil.copy(espeak_speech_wav, directory / "voice.wav")
    voices = write_voices(directory, directory / "voice.wav")
    with ServerProcess("--csm-model", str(tiny_checkpoint), "--voices", str(voices),
                       "--max-streams", "2", "--dtype", "float32", api_key=KEY, log=directory / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def voice(espeak_speech_wav) -> Segment:
    return Segment(0, "hello there, this is a short test of my voice",
                   torch.from_numpy(load_audio(espeak_speech_wav, 24_000)))


@pytest.fixture(scope="module")
def conversation(espeak_wav) -> Conversation:
    conv = Conversation(agent_speaker=0)
    question = "what is the weather like today"
    conv.add_user_turn(question, load_audio(espeak_wav(question), 16_000))
    return conv


GREEDY = SynthesisOptions(temperature=0.0, topk=1, max_audio_ms=400, seed=3, chunk_frames=2)


def _speak(synth, text: str, earlier) -> tuple[np.ndarray, object, object]:
    prompts, result = [], []
    synth.on_prompt = lambda context, prompt: prompts.append(prompt)
    audio = np.concatenate(list(synth.stream(text, 0, earlier, result=result)))
    return audio, result[0], prompts[0]


def test_remote_sentences_have_the_in_process_prompts_and_frames(server, tiny_generator, voice, conversation):
    local = ReplySynthesizer(tiny_generator, conversation, voice, GREEDY)
    remote = RemoteSynthesizer.connect(server.url + "/v1", conversation, voice, GREEDY, api_key=KEY)
    earlier = {"local": [], "remote": []}
    for text in ("Fine, thanks for asking.", "It is sunny today."):
        tiny_generator.forget_cache()
        a_local, s_local, p_local = _speak(local, text, earlier["local"])
        a_remote, s_remote, p_remote = _speak(remote, text, earlier["remote"])
        assert torch.equal(p_local.tokens, p_remote.tokens) and torch.equal(p_local.mask, p_remote.mask)
        assert torch.equal(s_local.codes, s_remote.codes)
        assert (s_remote.text, s_remote.context_rows, s_remote.prompt_rows) == \
            (s_local.text, s_local.context_rows, s_local.prompt_rows)
        assert a_remote.shape == a_local.shape
        np.testing.assert_allclose(a_remote, a_local, atol=1e-3)  # 16-bit PCM on the wire
        earlier["local"].append(Segment(0, text, local.remember(s_local.audio, s_local.codes)))
        earlier["remote"].append(Segment(0, text, remote.remember(s_remote.audio, s_remote.codes)))
    # The second sentence extends the first one's prompt: the session kept its rows.
    assert remote.generator.last_reused_rows >= 32
    remote.close()


def test_cancel_closes_the_remote_stream_at_once(server, voice, conversation):
    options = SynthesisOptions(max_audio_ms=20_000, chunk_frames=1, seed=1)
    remote = RemoteSynthesizer.connect(server.url, conversation, voice, options, api_key=KEY)
    before = server.health()
    cancel, result = threading.Event(), []
    stream = remote.stream("one two three four five six seven eight nine ten eleven twelve.", 0, [],
                           cancel=cancel, result=result)
    next(stream)
    cancel.set()  # barge-in, from another thread in the pipeline; here between two chunks
    rest = list(stream)
    assert len(rest) <= 1
    state = server.wait_idle(timeout_s=20)
    assert state["finished"] == before["finished"] + 1 and state["frames"] - before["frames"] < 60
    assert len(result) == 1 and len(result[0].audio) > 0  # what was said before the cut is kept
    remote.close()


def test_connection_problems_are_one_line_errors(server, voice, conversation, tiny_checkpoint):
    with pytest.raises(AgentError, match="HTTP 401"):
        RemoteSynthesizer.connect(server.url, conversation, voice, GREEDY, api_key="wrong")
    with pytest.raises(AgentError, match="cannot reach csm-serve at http://127.0.0.1:9"):
        RemoteSynthesizer.connect("http://127.0.0.1:9", conversation, voice, GREEDY)
    with pytest.raises(AgentError, match="must start with http"):
        server_root("localhost:8000")
    remote = RemoteSynthesizer.connect(server.url, conversation, voice, GREEDY, api_key=KEY)
    too_long = SynthesisOptions(temperature=0.0, topk=1, max_audio_ms=10**6)
    remote.options = too_long
    with pytest.raises(CSMError, match="HTTP 400.*max_audio_ms"):
        list(remote.stream("Hello.", 0, []))
    remote.close()


# ---- csm-chat with --tts-url: the whole agent, its voice on the server --------------------------------


@pytest.mark.e2e
def test_headless_chat_through_csm_serve_saves_the_same_turns_as_in_process(tmp_path, server, spoken_turns_wav,
                                                                            tiny_checkpoint, chat_persona):
    mic = spoken_turns_wav(["what is the capital of france", "tell me about the weather today"], gap_s=1.5)
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "CSM_SERVE_API_KEY": KEY}
    runs = {}
    for where, extra in (("remote", ["--tts-url", server.url]), ("local", ["--csm-model", str(tiny_checkpoint)])):
        saved = tmp_path / where
        # Each run its own data directory: a first run's remembered summary would change the second's prompt.
        env["XDG_DATA_HOME"] = str(tmp_path / f"{where}-data")
        args = [console_script("csm-chat"), "--headless", "--mic-file", str(mic), "--fast", "--turn", "silence",
                "--persona", str(chat_persona), "--save", str(saved), "--speaker-file", str(tmp_path / f"{where}.wav"),
                "--no-watermark", "--seed", "5", "--device", "cpu", *extra]
        result = subprocess.run(args, capture_output=True, text=True, timeout=400, env=env)
        assert result.returncode == 0, result.stderr
        runs[where] = json.loads((saved / "conversation.json").read_text())["turns"]
    remote, local = runs["remote"], runs["local"]
    assert [(t["role"], t["text"]) for t in remote] == [(t["role"], t["text"]) for t in local]
    assert [t["role"] for t in remote] == ["user", "agent"] * 2
    assert all(t["audio"] and (tmp_path / "remote" / t["audio"]).is_file() for t in remote)


@pytest.mark.e2e
def test_barge_in_cancels_the_servers_stream_at_once(tmp_path, server, chat_persona, smollm2_llm):
    settings = AgentSettings(tts_url=server.url, persona=str(chat_persona), save_dir=str(tmp_path / "saved"),
                             headless=True, watermark=False, seed=4, device="cpu", max_audio_ms=20_000)
    events = EventLog()
    sink = MemorySink(24_000, speed=1.0)
    pipeline = Pipeline(settings, events, source=False, sink=sink, llm=smollm2_llm, transcriber=object())
    os.environ["CSM_SERVE_API_KEY"] = KEY
    try:
        pipeline.start()
        pipeline.wait_ready(240)
        pipeline.submit_text("Tell me a long story about a dragon.")
        events.wait_for(lambda: sink.played_samples > 24_000 * 0.3, "the remote voice playing")
        assert server.health()["active_streams"] == 1
        pipeline.interrupt()
        cut = time.monotonic()
        server.wait_idle(timeout_s=5.0)
        freed_s = time.monotonic() - cut
        events.wait_for(lambda: events.of(AgentTurnDone), "the interrupted turn")
    finally:
        os.environ.pop("CSM_SERVE_API_KEY", None)
        pipeline.stop()
    assert events.of(AgentTurnDone)[0].interrupted
    assert freed_s < 2.0, f"the server's stream ran on {freed_s:.1f} s after the barge-in"
