"""Soak: 200 requests with random disconnects and bad inputs leave csm-serve answering, memory near its baseline."""

from __future__ import annotations

import io
import random
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import soundfile
from _serve_helpers import ServerProcess, write_voices

pytestmark = pytest.mark.slow

REQUESTS = 200
BAD = [
    {"model": "tts-1"}, {"response_format": "mp3"}, {"speed": 2.0}, {"input": ""}, {"voice": "nobody"},
    {"context": [{"text": "x", "audio": "%%%"}]}, {"context": [{"text": "x", "codes": "AAE="}]},
    {"topk": 0}, {"seed": -1}, {"unknown": 1}, {"context": [{"text": "x", "response_id": "speech-gone"}]},
]
WORDS = "hello there how are you fine thanks and what about the weather today it is sunny".split()


def _one(server: ServerProcess, i: int) -> str:
    rng = random.Random(i)
    body = {"model": "csm-1b", "input": " ".join(rng.choices(WORDS, k=rng.randint(1, 8))) + ".",
            "max_audio_ms": rng.choice([160, 240, 400]), "seed": i + 1000, "voice": rng.choice(["none", "tester"])}
    kind = rng.choice(["bad", "bad", "gone-at-once", "gone-after-audio", "whole", "whole"])
    url = server.url + "/v1/audio/speech"
    if kind == "bad":
        r = httpx.post(url, json={**body, **rng.choice(BAD)}, headers=server.headers, timeout=60)
        assert 400 <= r.status_code < 500 and set(r.json()["error"]) >= {"message", "code"}
        return kind
    if kind == "gone-at-once":  # the client gives up before any byte comes back
        try:
            httpx.post(url, json={**body, "max_audio_ms": 4000}, headers=server.headers, timeout=0.05)
        except httpx.TimeoutException:
            pass
        return kind
    if kind == "gone-after-audio":
        with httpx.stream("POST", url, json={**body, "max_audio_ms": 4000}, headers=server.headers,
                          timeout=60) as r:
            for part in r.iter_raw():
                if len(part) > 44:
                    break
        return kind
    r = httpx.post(url, json=body, headers=server.headers, timeout=120)
    assert r.status_code == 200, r.text
    samples, rate = soundfile.read(io.BytesIO(r.content))
    assert rate == 24_000 and len(samples) > 0
    return kind


def test_soak_leaves_the_server_answering_with_memory_back_near_baseline(tiny_checkpoint, espeak_speech_wav,
                                                                        tmp_path):
    shutil.copy(espeak_speech_wav, tmp_path / "voice.wav")
    voices = write_voices(tmp_path, tmp_path / "voice.wav")
    server = ServerProcess("--csm-model", str(tiny_checkpoint), "--voices", str(voices),
                           "--max-streams", "4", "--max-queue", "64", api_key="soak", log=tmp_path / "server.log")
    try:
        server.wait_ready()
        with ThreadPoolExecutor(8) as pool:  # warm-up: every path once, so lazy allocations are made
            list(pool.map(lambda i: _one(server, i), range(-24, 0)))
        server.wait_idle()
        baseline = server.rss_bytes()
        with ThreadPoolExecutor(8) as pool:
            kinds = list(pool.map(lambda i: _one(server, i), range(REQUESTS)))
        state = server.wait_idle(timeout_s=120)
        after = server.rss_bytes()
        print(f"soak: {len(kinds)} requests ({', '.join(f'{k} {kinds.count(k)}' for k in sorted(set(kinds)))}); "
              f"RSS baseline {baseline / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB; {state}")
        assert set(kinds) == {"bad", "gone-at-once", "gone-after-audio", "whole"}
        assert state["engine_failures"] == 0 and state["status"] == "ok"
        assert after - baseline < 64 * 2**20
        # Still answering, correctly.
        r = httpx.post(server.url + "/v1/audio/speech", json={"model": "csm-1b", "input": "Still here.",
                                                              "max_audio_ms": 240}, headers=server.headers, timeout=60)
        assert r.status_code == 200 and soundfile.read(io.BytesIO(r.content))[1] == 24_000
    finally:
        server.stop()
