"""csm-serve --engine mlx: the real console script on 127.0.0.1, real HTTP clients, the tiny checkpoint.

The MLX engine has no batched step: requests run one at a time through the MLX generator's own
frame loop (``csm_engine.serve.serial``). What a client gets must be what the in-process MLX
engine says for the same prompt, and a request that continues the previous one must prefill
only its new rows (the conversation cache) and still say exactly the same.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import threading

import httpx
import numpy as np
import pytest
import soundfile
import torch
from _serve_helpers import ServerProcess, console_script

from csm_engine.config import SAMPLES_PER_FRAME
from csm_engine.tokens import Segment

NO_MLX = "MLX is not importable here: pip install 'mlx[cpu]' (Linux) or mlx (macOS)"

TEXT = "hello there how are you today."
# Over 32 text rows: the cache is reused in whole prefill blocks of 32 rows.
LONG = "well hello there my friend, it is good to hear from you again after such a long time, how have you " \
       "been and what have you been doing with your days since we last spoke about the garden?"
GREEDY = {"temperature": 0.0, "topk": 1}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("mlx.core", reason=NO_MLX)
    log = tmp_path_factory.mktemp("serve_mlx") / "server.log"
    with ServerProcess("--csm-model", str(tiny_checkpoint), "--engine", "mlx", "--dtype", "float32",
                       "--max-queue", "2", "--max-audio-ms", "20000", log=log) as server:
        yield server


@pytest.fixture(scope="module")
def local_mlx(tiny_checkpoint):
    pytest.importorskip("mlx.core", reason=NO_MLX)
    from csm_engine.speech import load_speech_generator

    return load_speech_generator("mlx", tiny_checkpoint, dtype="float32")


def _sse(server, **fields) -> tuple[list[dict], dict]:
    """(deltas, done) of a streamed sse request."""
    body = {"model": "csm-1b", "input": TEXT, "max_audio_ms": 640, "response_format": "pcm", "stream_format": "sse",
            **fields}
    events = []
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()[:300]
        headers = dict(r.headers)
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events[:-1], {**events[-1], "headers": headers}


def _codes(deltas: list[dict]) -> torch.Tensor:
    raw = b"".join(base64.b64decode(e.get("codes", "")) for e in deltas)
    return torch.from_numpy(np.frombuffer(raw, "<i2").reshape(-1, 32).astype(np.int64))


def _local_frames(gen, text: str, context, max_ms: int) -> torch.Tensor:
    gen.forget_cache()
    prompt = gen.build_prompt(text, 0, context, max_ms)
    frames = [f.clone() for f in gen.frames(prompt, **GREEDY)]
    return torch.stack([f for f in frames if f.any()])


def test_health_says_mlx_one_stream(server):
    state = server.health()
    assert state["status"] == "ok" and state["device"] == "mlx" and state["max_streams"] == 1


def test_greedy_codes_are_the_in_process_mlx_engines(server, local_mlx):
    deltas, done = _sse(server, **GREEDY)
    got = _codes(deltas)
    want = _local_frames(local_mlx, TEXT, [], 640)
    assert done["type"] == "speech.audio.done" and len(got) >= 2
    assert len({tuple(f) for f in got.tolist()}) > 1  # a trajectory, not one frame repeated
    assert torch.equal(got, want[:len(got)])
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(audio) // 2 in (len(got) * SAMPLES_PER_FRAME, (len(got) + 1) * SAMPLES_PER_FRAME)


def test_a_continued_conversation_prefills_only_its_new_rows_and_says_the_same(server, local_mlx):
    deltas, first = _sse(server, input=LONG, **GREEDY)
    context = [{"speaker": 0, "text": LONG, "response_id": first["response_id"]}]
    turn2 = dict(input="and now the second turn.", context=context, **GREEDY)
    deltas2, continued = _sse(server, **turn2)
    rows = int(continued["headers"]["x-csm-prompt-rows"])
    reused = int(continued["headers"]["x-csm-reused-rows"])
    assert 32 <= reused < rows  # the first turn's rows came from the cache
    _sse(server, input="something else entirely.", max_audio_ms=160)  # the cache now holds another prompt
    deltas3, alone = _sse(server, **turn2)
    assert int(alone["headers"]["x-csm-reused-rows"]) < reused
    assert torch.equal(_codes(deltas2), _codes(deltas3))
    # ... and both are what the in-process engine says for that conversation.
    local_mlx.remember_codes(torch.zeros(len(_codes(deltas)) * SAMPLES_PER_FRAME), _codes(deltas).T.contiguous())
    spoken = Segment(0, LONG, torch.zeros(len(_codes(deltas)) * SAMPLES_PER_FRAME))
    want = _local_frames(local_mlx, "and now the second turn.", [spoken], 640)
    assert torch.equal(_codes(deltas2), want[:len(_codes(deltas2))])


def test_the_openai_client_streams_a_wav_and_the_seed_repeats_it(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    takes = []
    for _ in range(2):
        with client.audio.speech.with_streaming_response.create(
                model="csm-1b", voice="none", input="Hello there.", response_format="wav",
                extra_body={"max_audio_ms": 400, "seed": 5}) as response:
            takes.append(b"".join(response.iter_bytes()))
    samples, rate = soundfile.read(io.BytesIO(takes[0]), dtype="float32")
    assert rate == 24_000 and len(samples) >= SAMPLES_PER_FRAME and len(samples) % SAMPLES_PER_FRAME == 0
    assert takes[0] == takes[1]


def test_a_client_that_leaves_mid_stream_frees_the_one_stream(server):
    body = {"model": "csm-1b", "input": TEXT, "max_audio_ms": 20000, "seed": 3}
    first_audio = threading.Event()

    def leave_early():
        with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, timeout=120) as r:
            for _ in r.iter_raw():
                first_audio.set()
                return  # closes the connection mid-utterance

    worker = threading.Thread(target=leave_early)
    worker.start()
    assert first_audio.wait(120)
    worker.join(60)
    state = server.wait_idle(60)
    assert state["finished"] >= 1
    short = httpx.post(server.url + "/v1/audio/speech", json={**body, "max_audio_ms": 160}, timeout=120)
    assert short.status_code == 200 and len(short.content) > 44


def test_without_mlx_engine_mlx_is_one_line_naming_the_install(tiny_checkpoint, tmp_path):
    """Where MLX cannot import (a package named mlx that fails, as plain ``mlx`` does on Linux)."""
    broken = tmp_path / "site" / "mlx"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('no MLX on this machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([console_script("csm-serve"), "--engine", "mlx", "--csm-model", str(tiny_checkpoint),
                          "--port", "9"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "MLX backend not available: pip install 'mlx[cpu]'" in lines[0], run.stderr
