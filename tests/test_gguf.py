"""--llm-model as a hub GGUF: resolution, download with progress into the HF cache, offline reuse.

The hub is ``FakeHub`` on 127.0.0.1 serving local files (the embedded SmolLM2 among them); each
case runs in a fresh interpreter whose ``HF_ENDPOINT``/``HF_HUB_CACHE`` point at it and at a
temporary cache, as a user's shell would.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from _fake_hub import FakeHub

from agent.errors import AgentError
from agent.llm.gguf import HubGGUF, choose_file, parse_model_spec

REPO = "fake/SmolLM2-135M-Instruct-GGUF"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from agent.embedded import smollm2_gguf

    directory = tmp_path_factory.mktemp("hub_files")
    small = directory / "small.bin"
    small.write_bytes(b"GGUF" + bytes(1000))
    slow = directory / "slow.bin"
    slow.write_bytes(b"GGUF" + bytes(3 * 2**20))
    files = {
        "SmolLM2-135M-Instruct-Q4_1.gguf": smollm2_gguf(),
        "SmolLM2-135M-Instruct-Q8_0.gguf": small,
        "big/Big-Q4_K_M-00001-of-00003.gguf": small,
        "big/Big-Q4_K_M-00002-of-00003.gguf": small,
        "big/Big-Q4_K_M-00003-of-00003.gguf": small,
        "Slow-Q2_K.gguf": slow,
        "README.md": small,
    }
    with FakeHub({REPO: files}) as server:
        yield server


def _run(code: str, hub: FakeHub, cache: Path, offline: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` with stderr on a pseudo-terminal, as in a user's shell (progress bars show only on a TTY)."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_OFFLINE": "1" if offline else "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    try:
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=follower, env=env,
                                   text=True)
        os.close(follower)
        err = bytearray()
        while True:
            try:
                block = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not block:
                break
            err += block
        out = process.communicate(timeout=300)[0]
    finally:
        os.close(leader)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err.decode(errors="replace"))


def _resolve(spec: str, hub: FakeHub, cache: Path, offline: bool = False) -> tuple[str, str]:
    """(path or 'AgentError: message', stderr) of resolve_gguf(spec) in a fresh interpreter."""
    code = ("import json\nfrom agent.errors import AgentError\nfrom agent.llm.gguf import resolve_gguf\n"
            f"try:\n    print(json.dumps(str(resolve_gguf({spec!r}))))\n"
            "except AgentError as e:\n    print(json.dumps('AgentError: ' + str(e)))\n")
    result = _run(code, hub, cache, offline)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_a_quant_tag_is_downloaded_with_progress_into_the_cache_and_reused_offline(hub, tmp_path):
    from agent.embedded import smollm2_gguf

    path, stderr = _resolve(f"{REPO}:q4_1", hub, tmp_path)
    assert Path(path).name == "SmolLM2-135M-Instruct-Q4_1.gguf" and str(tmp_path) in path
    assert Path(path).read_bytes()[:64] == smollm2_gguf().read_bytes()[:64]
    assert Path(path).stat().st_size == smollm2_gguf().stat().st_size
    assert hub.downloads.count("SmolLM2-135M-Instruct-Q4_1.gguf") == 1
    # Offline the same reference resolves from the cache, and nothing is fetched again.
    again, _ = _resolve(f"{REPO}:Q4_1", hub, tmp_path, offline=True)
    assert again == path and hub.downloads.count("SmolLM2-135M-Instruct-Q4_1.gguf") == 1


def test_a_download_shows_a_progress_bar(hub, tmp_path):
    path, stderr = _resolve(f"{REPO}:Q2_K", hub, tmp_path)
    assert Path(path).stat().st_size == 3 * 2**20 + 4
    assert "100%" in stderr and "3.15M" in stderr  # tqdm's bar on the terminal: bytes of the file


def test_the_local_llm_loads_a_hub_reference_and_replies(hub, tmp_path):
    code = ("from agent.llm.local import LocalLLM\nfrom agent.llm.base import Sampling\n"
            f"llm = LocalLLM({REPO + ':SmolLM2-135M-Instruct-Q4_1.gguf'!r}, seed=1)\n"
            "print(llm.name, '|', llm.reply([{'role': 'user', 'content': 'Say hi.'}], "
            "sampling=Sampling(temperature=0.0, max_tokens=8)))\n")
    result = _run(code, hub, tmp_path)
    assert result.returncode == 0, result.stderr
    name, reply = result.stdout.strip().splitlines()[-1].split("|")
    assert name.strip() == "SmolLM2-135M-Instruct-Q4_1" and reply.strip()


def test_a_split_model_is_fetched_whole(hub, tmp_path):
    path, _ = _resolve(f"{REPO}:big/Big-Q4_K_M-00001-of-00003.gguf", hub, tmp_path)
    parts = sorted(p.name for p in Path(path).parent.iterdir())
    assert Path(path).name == "Big-Q4_K_M-00001-of-00003.gguf"
    assert parts == [f"Big-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]


@pytest.mark.parametrize("spec,message", [
    (f"{REPO}:Q5_K_S", "has no Q5_K_S file; choose one of"),
    (f"{REPO}:nope.gguf", "has no file nope.gguf"),
    ("fake/missing-repo:Q4_K_M", "neither a local directory nor a hub repo"),
])
def test_hub_references_that_cannot_resolve_are_one_line_errors(hub, tmp_path, spec, message):
    result, _ = _resolve(spec, hub, tmp_path)
    assert result.startswith("AgentError: ") and message in result and "\n" not in result


def test_offline_and_not_cached_says_how_to_fix_it(hub, tmp_path):
    result, _ = _resolve(f"{REPO}:Q4_1", hub, tmp_path, offline=True)
    assert result.startswith("AgentError: cannot fetch") and "not in the Hugging Face cache" in result


def test_model_specs_parse_as_paths_or_hub_references(tmp_path):
    local = tmp_path / "m.gguf"
    local.write_bytes(b"x")
    assert parse_model_spec(str(local)) == local
    assert parse_model_spec("models/missing.gguf") == Path("models/missing.gguf")
    assert parse_model_spec("owner/repo") == HubGGUF("owner/repo", None)
    assert parse_model_spec("owner/repo:Q8_0") == HubGGUF("owner/repo", "Q8_0")
    assert parse_model_spec("owner/Repo-GGUF:file-Q4_K_M.gguf") == HubGGUF("owner/Repo-GGUF", "file-Q4_K_M.gguf")
    with pytest.raises(AgentError, match="neither a file nor a hub reference"):
        parse_model_spec("not a model")


def test_choosing_a_file():
    files = ["a/M-Q4_K_M.gguf", "M-Q4_K_S.gguf", "M-Q8_0.gguf", "mmproj-M-f16.gguf", "README.md"]
    assert choose_file(files, HubGGUF("o/r", None)) == "a/M-Q4_K_M.gguf"  # the default quant
    assert choose_file(files, HubGGUF("o/r", "q8_0")) == "M-Q8_0.gguf"
    assert choose_file(files, HubGGUF("o/r", "M-Q4_K_S.gguf")) == "M-Q4_K_S.gguf"
    assert choose_file(["only-Q3_K_L.gguf", "mmproj-x.gguf"], HubGGUF("o/r", None)) == "only-Q3_K_L.gguf"
    with pytest.raises(AgentError, match="has no .gguf files"):
        choose_file(["README.md"], HubGGUF("o/r", None))
