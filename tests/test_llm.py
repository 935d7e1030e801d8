"""The LLM stage: real llama.cpp SmolLM2, OpenAI-compatible servers over HTTP, sentence splitting.

Servers: llama-cpp-python's own (``python -m llama_cpp.server`` with the embedded SmolLM2, killed
mid-reply and restarted), and a tiny scripted one for exact replies and error statuses. The
client is the official ``openai`` package in both.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from _serve_helpers import LlamaServer

from agent.errors import AgentError
from agent.llm.base import Sampling, make_llm
from agent.llm.llama_cpu import (
    REPACK_ENV,
    RepackDecision,
    cpu_flags,
    decide_repack,
    install_repack_setting,
    llama_log,
)
from agent.llm.local import LocalLLM
from agent.llm.server import OpenAICompatibleLLM, api_base_url
from agent.speak.sentences import SentenceSplitter

QUESTION = [
    {"role": "system", "content": "You are a helpful assistant. Answer in two short sentences."},
    {"role": "user", "content": "What is the capital of France?"},
]


# ----------------------------------------------------------------------------- llama.cpp


def test_smollm2_streams_a_reply_in_several_deltas(smollm2_llm):
    started = time.perf_counter()
    deltas = list(smollm2_llm.stream_reply(QUESTION, sampling=Sampling(temperature=0.0, max_tokens=40)))
    assert len(deltas) > 3 and all(isinstance(d, str) for d in deltas)
    assert len("".join(deltas).split()) >= 3
    assert time.perf_counter() - started < 20


def test_cancel_stops_the_stream(smollm2_llm):
    cancel = threading.Event()
    received = []
    for delta in smollm2_llm.stream_reply(QUESTION, cancel, sampling=Sampling(max_tokens=100)):
        received.append(delta)
        if len(received) == 2:
            cancel.set()
    assert len(received) == 2
    # The model is free again right away.
    assert smollm2_llm.reply(QUESTION, sampling=Sampling(max_tokens=5))


def test_long_history_is_trimmed_to_the_context_window(smollm2_llm):
    history = [QUESTION[0]]
    for i in range(60):
        history.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "blah " * 150})
    history.append({"role": "user", "content": "Say hello."})
    kept = smollm2_llm.fit_messages(history, reply_tokens=100)
    assert kept[0] == history[0] and kept[-1] == history[-1] and len(kept) < len(history)
    assert sum(smollm2_llm.count_tokens(m["content"]) + 6 for m in kept) <= smollm2_llm.n_ctx - 100
    # Only whole old turns go: the kept ones are the most recent, in order.
    assert kept[1:-1] == history[len(history) - len(kept) + 1 : -1]


def test_missing_gguf_is_a_one_line_agent_error(tmp_path):
    with pytest.raises(AgentError) as info:
        LocalLLM(tmp_path / "nope.gguf")
    message = str(info.value)
    assert message.startswith("LLM model not found:") and "--llm-model PATH.gguf" in message


def test_corrupt_gguf_is_an_agent_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(AgentError, match="cannot load LLM model"):
        LocalLLM(bad, warmup=False)


# ----------------------------------------------------------------------------- llama.cpp on this CPU

# /proc/cpuinfo of a 2-vCPU Intel Xeon Platinum 8573C (Emerald Rapids, AMX) cloud VM, and of the
# AMD EPYC (Zen 3, AVX2) this suite was written on: the lines the decision reads.
XEON_AMX_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: INTEL(R) XEON(R) PLATINUM 8573C
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht \
syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology tsc_reliable nonstop_tsc cpuid aperfmperf \
tsc_known_freq pni pclmulqdq vmx ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave \
avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch tpr_shadow ept vpid ept_ad fsgsbase tsc_adjust bmi1 hle avx2 \
smep bmi2 erms invpcid rtm avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw \
avx512vl xsaveopt xsavec xgetbv1 xsaves user_shstk avx_vnni avx512_bf16 vnmi avx512vbmi umip waitpkg avx512_vbmi2 \
gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq la57 rdpid cldemote movdiri movdir64b fsrm \
serialize tsxldtrk ibt amx_bf16 avx512_fp16 amx_tile amx_int8 arch_capabilities
"""
EPYC_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht \
syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid extd_apicid \
tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx \
f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext cpuid_fault \
vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec \
xgetbv1 xsaves clzero xsaveerptr arat umip vaes vpclmulqdq rdpid fsrm
bugs\t\t: sysret_ss_attrs null_seg spectre_v1 spectre_v2 spec_store_bypass srso spectre_v2_user tsa
"""
# A prompt of several dozen tokens: the AMX crash needs more than one token in a batch.
LONG_PROMPT = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
    {"role": "user", "content": "I am planning a picnic in the park next Saturday with my family and two friends. "
                                "We will bring sandwiches, fruit, lemonade and a big blanket. What else should we "
                                "remember to pack so that the afternoon goes well?"},
]


def test_repack_decision_reads_the_cpu_flags(monkeypatch):
    monkeypatch.delenv(REPACK_ENV, raising=False)
    assert "amx_int8" in cpu_flags(XEON_AMX_CPUINFO) and "avx2" in cpu_flags(EPYC_CPUINFO)
    amx = decide_repack(cpuinfo=XEON_AMX_CPUINFO, machine="x86_64")
    assert not amx.enabled and "amx_bf16/amx_int8/amx_tile" in amx.reason and "\n" not in amx.reason
    assert decide_repack(cpuinfo=EPYC_CPUINFO, machine="x86_64").enabled
    assert decide_repack(cpuinfo="", machine="x86_64").enabled  # no /proc/cpuinfo: nothing says AMX
    assert decide_repack(cpuinfo=XEON_AMX_CPUINFO, machine="arm64").enabled  # macOS / arm64: no AMX there
    assert decide_repack(cpuinfo="Features\t: fp asimd aes pmull sha1 sha2 crc32 atomics", machine="aarch64").enabled


def test_repack_override_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv(REPACK_ENV, raising=False)
    assert decide_repack("on", cpuinfo=XEON_AMX_CPUINFO, machine="x86_64").enabled
    assert not decide_repack("OFF", cpuinfo=EPYC_CPUINFO, machine="x86_64").enabled
    monkeypatch.setenv(REPACK_ENV, "off")
    decision = decide_repack(cpuinfo=EPYC_CPUINFO, machine="x86_64")
    assert not decision.enabled and REPACK_ENV in decision.reason
    monkeypatch.setenv(REPACK_ENV, "sometimes")
    with pytest.raises(AgentError, match=f"unknown llama.cpp repack mode {REPACK_ENV}='sometimes': use one of auto"):
        decide_repack()


# What llama.cpp logs at load when extra buffer types are in play: the tensors it repacks (or
# could not repack) for CPU_REPACK / AMX. With use_extra_bufts off it never names them.
EXTRA_BUFTS_LOG = re.compile(r"buffer type (CPU_REPACK|AMX)|(CPU_REPACK|AMX) model buffer")


def load_with_llama_log(build=None, **kwargs):
    """``build()`` (default: a LocalLLM of the embedded model with ``kwargs``), and what llama.cpp
    logged while it ran."""
    with llama_log() as lines:
        llm = build() if build else LocalLLM(seed=1, warmup=False, **kwargs)
    return llm, "".join(lines)


def test_the_live_llama_loads_with_the_decision_in_force(smollm2_llm, monkeypatch):
    """The embedded model's llama.cpp parameters carry the decision, and llama.cpp itself follows it."""
    import llama_cpp

    monkeypatch.delenv(REPACK_ENV, raising=False)
    this_cpu = decide_repack()
    assert smollm2_llm.repack == this_cpu
    assert smollm2_llm._llama.model_params.use_extra_bufts is this_cpu.enabled
    off, log = load_with_llama_log(repack="off")
    assert off._llama.model_params.use_extra_bufts is False
    assert "load_tensors" in log and not EXTRA_BUFTS_LOG.search(log)  # no tensor went near a repack buffer
    assert off.reply(LONG_PROMPT, sampling=Sampling(temperature=0.0, max_tokens=12))
    on, log = load_with_llama_log(repack="on")
    assert on._llama.model_params.use_extra_bufts is True and EXTRA_BUFTS_LOG.search(log)
    # Only the constructions saw the setting: llama-cpp-python's defaults are its own again.
    assert llama_cpp.llama_model_default_params().use_extra_bufts is True


def test_the_server_launcher_refuses_a_bad_repack_mode_in_one_line():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "agent.llm.llama_server", "--model", "m.gguf"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, REPACK_ENV: "maybe"})
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"llama_server: unknown llama.cpp repack mode {REPACK_ENV}='maybe': use one of auto, on, off"]


def test_a_native_crash_while_probing_is_one_clear_failure():
    """What the smollm2_llm fixture does before loading llama.cpp in-process: a crash in its probe
    subprocess (here a real SIGSEGV) fails with one line instead of killing pytest."""
    from conftest import probe_native_load

    crash = "import ctypes; ctypes.string_at(0)"  # reads address 0: SIGSEGV, as the AMX kernels did
    with pytest.raises(pytest.fail.Exception, match=r"^llama.cpp \(test\) crashed with SIGSEGV on this CPU .*"
                                                    r"CSM_LLAMA_REPACK=off$"):
        probe_native_load("llama.cpp (test)", crash)
    assert probe_native_load("llama.cpp (test)", "print('fine')") == "fine"


def test_a_prompt_of_several_dozen_tokens_gets_an_answer(smollm2_llm):
    prompt_tokens = sum(smollm2_llm.count_tokens(m["content"]) for m in LONG_PROMPT)
    assert prompt_tokens >= 40
    answer = smollm2_llm.reply(LONG_PROMPT, sampling=Sampling(temperature=0.0, max_tokens=24))
    assert len(answer.split()) >= 3


# ----------------------------------------------------------------------------- HTTP server


class _FakeChatServer(ThreadingHTTPServer):
    """A tiny OpenAI-compatible server on 127.0.0.1 that streams a fixed reply word by word."""

    daemon_threads = True

    def __init__(self, reply: str, status: int = 200, delay_s: float = 0.0) -> None:
        self.reply, self.status, self.delay_s = reply, status, delay_s
        self.requests: list[dict] = []
        self.sent = 0
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _FakeChatServer

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        body = json.dumps({"data": [{"id": "fake-model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(request)
        if self.server.status != 200:
            body = json.dumps({"error": {"message": "model 'x' not found"}}).encode()
            self.send_response(self.server.status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            for word in self.server.reply.split(" "):
                chunk = {"choices": [{"index": 0, "delta": {"content": word + " "}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                self.server.sent += 1
                time.sleep(self.server.delay_s)
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def chat_server(request):
    reply, status, delay = getattr(request, "param", ("Paris is the capital. It is lovely.", 200, 0.0))
    server = _FakeChatServer(reply, status, delay)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_openai_compatible_client_streams_deltas_from_a_server(chat_server):
    llm = OpenAICompatibleLLM(chat_server.url, timeout_s=5)
    deltas = list(llm.stream_reply(QUESTION, sampling=Sampling(temperature=0.2, max_tokens=30)))
    assert "".join(deltas).strip() == "Paris is the capital. It is lovely."
    assert len(deltas) == 7
    sent = chat_server.requests[0]
    assert sent["stream"] is True and sent["messages"] == QUESTION and sent["max_tokens"] == 30
    assert sent["model"] == "fake-model"  # asked /v1/models since none was given


@pytest.mark.parametrize("chat_server", [("one two three four five six seven eight", 200, 0.05)], indirect=True)
def test_openai_compatible_client_cancel_stops_reading(chat_server):
    cancel = threading.Event()
    llm = OpenAICompatibleLLM(chat_server.url + "/v1", model="m", timeout_s=5)
    got = []
    for delta in llm.stream_reply(QUESTION, cancel):
        got.append(delta)
        cancel.set()
    assert got == ["one "]


@pytest.mark.parametrize("chat_server", [("", 404, 0.0)], indirect=True)
def test_server_errors_are_one_line_agent_errors(chat_server):
    with pytest.raises(AgentError) as info:
        list(OpenAICompatibleLLM(chat_server.url, model="x", timeout_s=5).stream_reply(QUESTION))
    assert "HTTP 404" in str(info.value) and "model 'x' not found" in str(info.value)


def test_unreachable_server_is_an_agent_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = make_llm(url=f"http://127.0.0.1:{port}", model="m")
    with pytest.raises(AgentError, match="cannot reach the LLM server"):
        list(llm.stream_reply(QUESTION))


def test_api_base_url_forms():
    assert api_base_url("http://h:8080") == "http://h:8080/v1"
    assert api_base_url("http://h:8080/v1/") == "http://h:8080/v1"
    assert api_base_url("https://h/v1/chat/completions") == "https://h/v1"
    with pytest.raises(AgentError, match="http://"):
        api_base_url("localhost:8080")


# ----------------------------------------------------------------------------- llama.cpp's server


@pytest.fixture(scope="module")
def llama_server():
    server = LlamaServer().start()
    yield server
    server.kill()


LONG = [{"role": "user", "content": "Write a long story about a cat who travels around the world."}]


def test_llama_cpp_server_streams_a_reply(llama_server):
    llm = make_llm(url=llama_server.url)
    deltas = list(llm.stream_reply(QUESTION, sampling=Sampling(temperature=0.0, max_tokens=40)))
    assert len(deltas) > 3 and len("".join(deltas).split()) >= 3
    assert llm.model.endswith(".gguf")  # the name the server lists at /v1/models
    sentences = list(SentenceSplitter().split(llm.stream_reply(QUESTION, sampling=Sampling(max_tokens=40))))
    assert sentences and all(s.strip() for s in sentences)


def test_llama_cpp_server_answers_a_long_prompt_with_the_cpu_decision_in_force(llama_server, monkeypatch):
    monkeypatch.delenv(REPACK_ENV, raising=False)
    llm = make_llm(url=llama_server.url)
    assert len(llm.reply(LONG_PROMPT, sampling=Sampling(temperature=0.0, max_tokens=24)).split()) >= 3
    log, decision = llama_server.log(), decide_repack()
    assert f"llama.cpp weight repacking: {decision.reason} (use_extra_bufts={decision.enabled})" in log
    assert bool(EXTRA_BUFTS_LOG.search(log)) is decision.enabled  # the server's llama.cpp followed it


def test_the_servers_process_wide_setting_holds_for_every_later_llama(monkeypatch):
    """What agent.llm.llama_server installs before the server builds its Llama, forced off (the AMX case)."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    from agent.embedded import smollm2_gguf

    monkeypatch.setattr(low, "llama_model_default_params", low.llama_model_default_params)  # undone after
    install_repack_setting(RepackDecision(False, "off (test)"))
    install_repack_setting(RepackDecision(False, "off (test)"))  # twice: still one wrap of the real defaults
    llama, log = load_with_llama_log(lambda: llama_cpp.Llama(str(smollm2_gguf()), n_ctx=256, verbose=False))
    assert llama.model_params.use_extra_bufts is False
    assert "load_tensors" in log and not EXTRA_BUFTS_LOG.search(log)


def test_llama_cpp_server_killed_mid_reply_gives_one_error_and_keeps_the_text(llama_server):
    llm = OpenAICompatibleLLM(llama_server.url, timeout_s=20)
    said, errors = [], []
    try:
        for delta in llm.stream_reply(LONG, sampling=Sampling(temperature=0.0, max_tokens=400)):
            said.append(delta)
            if len(said) == 5:
                llama_server.kill()  # the server dies in the middle of the reply
    except AgentError as error:
        errors.append(error)
    assert len(said) >= 5 and "".join(said).strip()
    assert len(errors) == 1 and "stopped in the middle of the reply" in str(errors[0])
    assert "kept" in str(errors[0]) and "\n" not in str(errors[0])
    # While it is down: one clear error, before any text.
    with pytest.raises(AgentError, match="cannot reach the LLM server"):
        list(llm.stream_reply(QUESTION, sampling=Sampling(max_tokens=5)))
    # Once it is back, the same client answers the next turn.
    llama_server.start()
    assert "".join(llm.stream_reply(QUESTION, sampling=Sampling(temperature=0.0, max_tokens=20))).strip()


def test_llama_cpp_server_cancel_stops_the_stream(llama_server):
    llm = OpenAICompatibleLLM(llama_server.url + "/v1", timeout_s=20)
    cancel = threading.Event()
    got = []
    for delta in llm.stream_reply(LONG, cancel, sampling=Sampling(max_tokens=300)):
        got.append(delta)
        if len(got) == 3:
            cancel.set()
    assert len(got) == 3
    # The server is free for the next request right away.
    assert llm.reply(QUESTION, sampling=Sampling(temperature=0.0, max_tokens=10))


# ----------------------------------------------------------------------------- sentences


def split(text: str, step: int = 3, **kwargs) -> list[str]:
    """Feed ``text`` in small deltas, as an LLM streams it."""
    return list(SentenceSplitter(**kwargs).split(text[i : i + step] for i in range(0, len(text), step)))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Hello there. How are you? I'm fine!", ["Hello there.", "How are you?", "I'm fine!"]),
        ("Dr. Smith paid 3.5 dollars, e.g. for tea. Ok.", ["Dr. Smith paid 3.5 dollars, e.g. for tea.", "Ok."]),
        ("Well... maybe not. Wait... Really?", ["Well... maybe not.", "Wait...", "Really?"]),
        ("We sell pears etc. But not plums.", ["We sell pears etc.", "But not plums."]),
        ("Steps:\n1. Mix it\n2. Bake it", ["Steps:", "1. Mix it", "2. Bake it"]),
        ("No. Try No. 5 instead.", ["No.", "Try No. 5 instead."]),
        ("J. R. R. Tolkien wrote it.", ["J. R. R. Tolkien wrote it."]),
        ('"Really?" she asked. "Yes."', ['"Really?" she asked.', '"Yes."']),
        ("No punctuation at the end", ["No punctuation at the end"]),
        ("  ", []),
    ],
)
def test_sentence_splitter_cases(text, expected):
    assert split(text) == expected


def test_first_sentence_comes_out_before_the_reply_ends():
    splitter = SentenceSplitter()
    assert splitter.feed("Sure thing") == []
    assert splitter.feed("! Let me") == ["Sure thing!"]
    assert splitter.feed(" think about it") == []
    assert splitter.flush() == ["Let me think about it"]


def test_long_sentence_is_cut_at_a_comma():
    text = ("This runs on and on without stopping, listing apples, pears, plums and cherries, "
            "and then it goes further still")
    pieces = split(text, max_chars=60)
    assert len(pieces) > 1 and all(len(p) <= 60 for p in pieces)
    assert pieces[0].endswith(",")
    assert " ".join(pieces) == text


def test_splitter_with_smollm2_gives_whole_sentences(smollm2_llm):
    messages = [QUESTION[0], {"role": "user", "content": "Tell me two facts about cats."}]
    deltas = smollm2_llm.stream_reply(messages, sampling=Sampling(temperature=0.0, max_tokens=60))
    sentences = list(SentenceSplitter().split(deltas))
    assert sentences and all(s == s.strip() and s for s in sentences)
