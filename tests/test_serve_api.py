"""csm-serve against a real uvicorn on 127.0.0.1 (tiny random checkpoint, the installed console script).

Clients are real: httpx streaming, and the official ``openai`` package unchanged.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import threading

import httpx
import numpy as np
import pytest
import soundfile
from _serve_helpers import ServerProcess, console_script, write_voices

from csm_engine.config import SAMPLES_PER_FRAME
from csm_engine.tokens import TextTokenizer

KEY = "test-key-123"
TEXT = "hello there how are you today."  # ends a sentence as prepare_text would: turns reuse their rows


@pytest.fixture(scope="module")
def server(tiny_checkpoint, espeak_speech_wav, tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve")
    shutil.copy(espeak_speech_wav, directory / "voice.wav")
    voices = write_voices(directory, directory / "voice.wav")
    with ServerProcess("--csm-model", str(tiny_checkpoint), "--voices", str(voices), "--max-streams", "2",
                       "--cache-slots", "4", "--max-queue", "1", "--max-audio-ms", "20000",
                       api_key=KEY, log=directory / "server.log") as server:
        yield server


def _speech(server, timeout=120, **fields) -> httpx.Response:
    body = {"model": "csm-1b", "input": TEXT, "max_audio_ms": 400, "seed": 1, **fields}
    return httpx.post(server.url + "/v1/audio/speech", json=body, headers=server.headers, timeout=timeout)


def _wav(data: bytes) -> np.ndarray:
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == 24_000 and samples.ndim == 1
    return samples


def _wav_b64(samples: np.ndarray) -> str:
    out = io.BytesIO()
    soundfile.write(out, samples, 24_000, subtype="FLOAT", format="WAV")
    return base64.b64encode(out.getvalue()).decode()


# ---- streaming ----------------------------------------------------------------------------


def test_chunks_arrive_while_the_utterance_is_generated_and_join_into_a_wav(server):
    body = {"model": "csm-1b", "input": TEXT, "voice": "tester", "max_audio_ms": 1200, "seed": 3}
    parts, busy_when_first_audio = [], None
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, headers=server.headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        for part in r.iter_raw():
            parts.append(part)
            if busy_when_first_audio is None and sum(map(len, parts)) > 44:
                busy_when_first_audio = server.health()["active_streams"]
    # When the first audio reached us, the utterance was still being generated.
    assert busy_when_first_audio == 1
    samples = _wav(b"".join(parts))
    assert len(samples) % SAMPLES_PER_FRAME == 0 and 0 < len(samples) <= 16 * SAMPLES_PER_FRAME
    assert len(parts) > 2


def test_the_openai_client_streams_speech_unchanged(server, tmp_path):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list()] == ["csm-1b"]
    with client.audio.speech.with_streaming_response.create(
            model="csm-1b", voice="tester", input="Hello there.", response_format="wav",
            extra_body={"max_audio_ms": 400, "seed": 5}) as response:
        chunks = list(response.iter_bytes())
        response_id = response.headers["x-csm-response-id"]
    assert len(chunks) >= 1 and response_id.startswith("speech-")
    assert len(_wav(b"".join(chunks))) >= SAMPLES_PER_FRAME
    # pcm: raw 16-bit samples, the same utterance for the same seed
    with client.audio.speech.with_streaming_response.create(
            model="csm-1b", voice={"id": "tester"}, input="Hello there.", response_format="pcm",
            extra_body={"max_audio_ms": 400, "seed": 5}) as response:
        pcm = np.frombuffer(response.read(), "<i2").astype(np.float32) / 32768
    np.testing.assert_array_equal(pcm, _wav(b"".join(chunks)))


def test_sse_carries_audio_and_the_frames_codes(server):
    body = {"model": "csm-1b", "input": TEXT, "max_audio_ms": 480, "seed": 2, "response_format": "pcm",
            "stream_format": "sse"}
    events = []
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, headers=server.headers, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    deltas, done = events[:-1], events[-1]
    assert done["type"] == "speech.audio.done" and all(e["type"] == "speech.audio.delta" for e in deltas)
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    codes = b"".join(base64.b64decode(e.get("codes", "")) for e in deltas)
    frames = len(codes) // 64
    assert frames == done["frames"] - (done["reason"] == "end") and frames > 0
    assert len(audio) // 2 in (frames * SAMPLES_PER_FRAME, (frames + 1) * SAMPLES_PER_FRAME)
    stored = httpx.get(f"{server.url}/v1/audio/responses/{done['response_id']}", headers=server.headers).json()
    assert base64.b64decode(stored["codes"]) == codes and stored["text"] == TEXT


# ---- context and sessions -----------------------------------------------------------------


def _rows(server, speaker: int, text: str) -> int:
    tokenizer = TextTokenizer.from_json(httpx.get(server.url + "/v1/csm/tokenizer.json", headers=server.headers).text)
    return len(tokenizer.encode(f"[{speaker}]{text}"))


def test_context_changes_the_prompt_as_specified(server, espeak_speech_wav):
    plain = _speech(server)
    clip, _ = soundfile.read(espeak_speech_wav, dtype="float32")
    encoded = httpx.post(server.url + "/v1/audio/encode", json={"audio": base64.b64encode(
        espeak_speech_wav.read_bytes()).decode()}, headers=server.headers, timeout=60).json()
    item = {"speaker": 1, "text": "hello there", "codes": encoded["codes"]}
    with_codes = _speech(server, context=[item])
    # The prompt grows by the segment's text rows, its audio frames and the end frame.
    added = _rows(server, 1, "hello there") + encoded["frames"] + 1
    assert int(with_codes.headers["x-csm-prompt-rows"]) == int(plain.headers["x-csm-prompt-rows"]) + added
    assert with_codes.headers["x-csm-context-kept"] == "1"
    assert with_codes.content != plain.content  # same seed, other prompt: other speech
    # The same clip as audio (encoded by the server) gives the same prompt and the same speech.
    with_audio = _speech(server, context=[{"speaker": 1, "text": "hello there",
                                           "audio": base64.b64encode(espeak_speech_wav.read_bytes()).decode()}])
    assert with_audio.headers["x-csm-prompt-rows"] == with_codes.headers["x-csm-prompt-rows"]
    assert with_audio.content == with_codes.content
    # An earlier response by id, or its audio sent back, stand for its codes.
    previous = plain.headers["x-csm-response-id"]
    by_id = _speech(server, context=[{"speaker": 0, "text": TEXT, "response_id": previous}])
    heard = _wav(plain.content)
    by_audio = _speech(server, context=[{"speaker": 0, "text": TEXT, "audio": _wav_b64(heard)}])
    assert by_id.headers["x-csm-prompt-rows"] == by_audio.headers["x-csm-prompt-rows"]
    assert by_id.content == by_audio.content


def test_a_session_keeps_its_cache_while_other_requests_come_and_go(server):
    first = _speech(server, session="chat-42", max_audio_ms=2000, seed=7)
    turn1_rows = int(first.headers["x-csm-prompt-rows"]) + len(_wav(first.content)) // SAMPLES_PER_FRAME - 1
    for i in range(4):  # more requests than the server has free slots
        assert _speech(server, input=f"something else entirely number {i}", seed=i).status_code == 200
    context = [{"speaker": 0, "text": TEXT, "response_id": first.headers["x-csm-response-id"]}]
    turn2 = _speech(server, input="and now the second turn", context=context, session="chat-42")
    assert turn2.headers["x-csm-session"] == "chat-42"
    assert int(turn2.headers["x-csm-reused-rows"]) >= 32 and int(turn2.headers["x-csm-reused-rows"]) <= turn1_rows
    # Without the session the same request prefills everything, and says exactly the same.
    alone = _speech(server, input="and now the second turn", context=context)
    assert alone.headers["x-csm-reused-rows"] == "0"
    assert alone.content == turn2.content
    # The session also travels as a header (for load balancers with session affinity).
    turn3 = httpx.post(server.url + "/v1/audio/speech", json={"model": "csm-1b", "input": "third", "max_audio_ms": 160},
                       headers={**server.headers, "X-CSM-Session": "chat-42"}, timeout=120)
    assert turn3.headers["x-csm-session"] == "chat-42"


# ---- limits, errors, cancellation -----------------------------------------------------------


BAD_REQUESTS = [
    ({"model": "tts-1"}, 404, "model_not_found"),
    ({"response_format": "mp3"}, 400, "unsupported_value"),
    ({"speed": 1.5}, 400, "unsupported_value"),
    ({"instructions": "speak like a pirate"}, 400, "unsupported_value"),
    ({"stream_format": "sse"}, 400, "unsupported_value"),
    ({"input": "   "}, 400, "invalid_value"),
    ({"input": "word " * 1000}, 400, "string_above_max_length"),
    ({"voice": "alloy"}, 400, "unknown_voice"),
    ({"topk": 500}, 400, "unsupported_value"),
    ({"max_audio_ms": 10**6}, 400, "unsupported_value"),
    ({"temperatur": 0.5}, 400, "invalid_value"),
    ({"context": [{"text": "x", "audio": "not base64!"}]}, 400, "invalid_base64"),
    ({"context": [{"text": "x", "audio": base64.b64encode(b"RIFF1234 not a wav").decode()}]}, 400, "invalid_audio"),
    ({"context": [{"text": "x", "codes": base64.b64encode(b"\x01\x02\x03").decode()}]}, 400, "invalid_codes"),
    ({"context": [{"text": "x", "codes": base64.b64encode(np.full(32, 4000, "<i2").tobytes()).decode()}]}, 400,
     "invalid_codes"),
    ({"context": [{"text": "x", "response_id": "speech-nope"}]}, 400, "unknown_response"),
    ({"context": [{"text": "x", "response_id": "a", "codes": "AAAA"}]}, 400, "invalid_value"),
    ({"context": [{"text": "y", "codes": base64.b64encode(np.ones((2040, 32), "<i2").tobytes()).decode()}]}, 400,
     "context_too_long"),
    ({"context": [{"text": "x"}] * 65}, 400, "context_too_long"),
    ({"session": "no spaces allowed"}, 400, "invalid_value"),
]


@pytest.mark.parametrize("fields,status,code", BAD_REQUESTS, ids=[c for _, _, c in BAD_REQUESTS])
def test_bad_requests_answer_4xx_json(server, fields, status, code):
    response = _speech(server, **fields)
    assert response.status_code == status, response.text[:300] if "json" in response.headers["content-type"] else ""
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert error["message"] and "\n" not in error["message"]


def test_transport_level_errors_are_json_too(server):
    url = server.url + "/v1/audio/speech"
    cases = [
        httpx.post(url, content=b"{not json", headers={**server.headers, "content-type": "application/json"}),
        httpx.post(url, content=b"x" * (33 * 2**20), headers=server.headers),
        httpx.post(url, json={"model": "csm-1b", "input": "hi"}),  # no key
        httpx.post(url, json={"model": "csm-1b", "input": "hi"}, headers={"Authorization": "Bearer wrong"}),
        httpx.post(url, json={"model": "csm-1b", "input": "hi", "session": "a"},
                   headers={**server.headers, "X-CSM-Session": "b"}),
        httpx.get(server.url + "/v1/nothing-here", headers=server.headers),
    ]
    assert [r.status_code for r in cases] == [400, 413, 401, 401, 400, 404]
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in cases)
    assert server.health()["status"] == "ok"  # /health needs no key


def test_api_key_must_match_whole_and_exactly(server):
    """The key is compared as bytes in constant time (hmac.compare_digest): near misses and odd bytes are 401s."""
    url = server.url + "/v1/models"
    near_misses = [f"Bearer {KEY[:-1]}x", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"bearer {KEY}", KEY,
                   f"Bearer  {KEY}", f"Bearer {KEY.upper()}", ""]
    codes = [httpx.get(url, headers={"Authorization": value}).status_code for value in near_misses]
    odd_bytes = httpx.get(url, headers={"Authorization": f"Bearer {KEY}\u00e9".encode()})  # not latin-1 text
    assert codes == [401] * len(near_misses) and odd_bytes.status_code == 401
    assert odd_bytes.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url, headers=server.headers).status_code == 200


def test_busy_server_answers_429_and_recovers(server):
    long = {"model": "csm-1b", "input": "one two three four five six seven eight nine ten", "max_audio_ms": 20000}
    stop = threading.Event()

    def hold_a_stream():
        with httpx.stream("POST", server.url + "/v1/audio/speech", json=long, headers=server.headers,
                          timeout=120) as response:
            for _part in response.iter_raw():
                if stop.is_set():
                    return

    holders = [threading.Thread(target=hold_a_stream, daemon=True) for _ in range(3)]
    for thread in holders:  # two streams and one queued request fill this server
        thread.start()
    try:
        for _ in range(600):
            state = server.health()
            if state["active_streams"] == 2 and state["queued"] == 1:
                break
            stop.wait(0.05)
        busy = _speech(server)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        stop.set()
        for thread in holders:
            thread.join(60)
    server.wait_idle()
    assert _speech(server).status_code == 200


def test_a_client_that_disconnects_mid_stream_frees_its_stream(server):
    body = {"model": "csm-1b", "input": "one two three four five six seven eight nine ten eleven twelve",
            "max_audio_ms": 20000, "seed": 9}
    before = server.health()
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, headers=server.headers, timeout=120) as r:
        for part in r.iter_raw():
            if len(part) > 44:
                break
    # The connection is closed: the server cancels the utterance at its next frame.
    state = server.wait_idle(timeout_s=30)
    assert state["finished"] == before["finished"] + 1
    frames_after_close = state["frames"]
    assert server.health()["frames"] == frames_after_close  # nothing runs on for the gone client
    assert frames_after_close - before["frames"] < 100  # far from the 250 frames it was allowed


def test_models_voices_info_and_health(server):
    get = lambda path: httpx.get(server.url + path, headers=server.headers).json()  # noqa: E731
    assert get("/v1/models")["data"][0]["id"] == "csm-1b"
    assert get("/v1/models/csm-1b")["object"] == "model"
    assert get("/v1/models/tts-1")["error"]["code"] == "model_not_found"
    voices = {v["id"]: v for v in get("/v1/audio/voices")["data"]}
    assert set(voices) == {"none", "tester"} and voices["tester"]["speaker"] == 1
    info = get("/v1/csm/info")
    assert info["sample_rate"] == 24_000 and info["max_seq_len"] == 2048 and info["num_codebooks"] == 32
    health = server.health()
    assert health["max_streams"] == 2 and health["cache_slots"] == 4 and health["device"] == "cpu"


def test_listening_beyond_loopback_needs_a_key(tiny_checkpoint):
    result = subprocess.run([console_script("csm-serve"), "--csm-model", str(tiny_checkpoint), "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("csm-serve: error: --host 0.0.0.0") and "--api-key" in lines[0]
