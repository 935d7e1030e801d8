"""A real csm-serve on 127.0.0.1 for tests: the installed console script in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_script(name: str) -> str:
    script = Path(sys.executable).with_name(name)
    if not script.is_file():
        pytest.fail(f"{name} is not installed in {script.parent}; run `make test` (pip install -e .)")
    return str(script)


def write_voices(directory: Path, clip: Path) -> Path:
    """A voices.toml with one voice, ``tester`` (speaker 1), on a local clip."""
    table = directory / "voices.toml"
    table.write_text(f'[voices.tester]\nspeaker = 1\naudio = "{clip}"\ntext = "hello there, this is a short test of '
                     'my voice"\ndescription = "an espeak-ng clip"\n', encoding="utf-8")
    return table


class ServerProcess:
    """``csm-serve ARGS`` on a free port; ``url`` once /health answers."""

    def __init__(self, *args: str, api_key: str | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        command = [console_script("csm-serve"), "--port", str(self.port), *args]
        if api_key:
            command += ["--api-key", api_key]
        self._log = open(log, "wb") if log else subprocess.DEVNULL
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout_s: float = 180.0) -> ServerProcess:
        wait_until_answering(self.process, self.url + "/health", "csm-serve", timeout_s)
        return self

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def wait_idle(self, timeout_s: float = 60.0) -> dict:
        """/health once no stream is active or queued."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.health()
            if state["active_streams"] == 0 and state["queued"] == 0:
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"streams still busy after {timeout_s} s: {state}")
            time.sleep(0.1)

    def __enter__(self) -> ServerProcess:
        """Ready to serve (stopped again if it never gets there)."""
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def wait_until_answering(process: subprocess.Popen, url: str, name: str, timeout_s: float,
                         interval_s: float = 0.3) -> None:
    """Wait until ``url`` answers 200 while the server ``process`` runs; RuntimeError if it exits
    first or does not answer within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before answering")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    raise RuntimeError(f"{name} did not answer {url} within {timeout_s} s")


class LlamaServer:
    """llama-cpp-python's server with the embedded SmolLM2 on 127.0.0.1 (restartable on its port),
    started through ``python -m agent.llm.llama_server``: the same llama.cpp CPU decision as the
    in-process model (no weight repacking on AMX CPUs). Its stderr (llama.cpp's load log and the
    decision) is kept in ``log()``."""

    def __init__(self) -> None:
        import tempfile

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.log_path = Path(tempfile.mkstemp(prefix="llama_server_", suffix=".log")[1])

    def start(self) -> LlamaServer:
        from agent.embedded import smollm2_gguf

        # One thread: two on a busy 2-core machine made every reply about three times slower.
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.llm.llama_server", "--model", str(smollm2_gguf()),
                 "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "1024", "--n_threads", "1", "--seed", "1"],
                stdout=subprocess.DEVNULL, stderr=log)
        wait_until_answering(self.process, self.url + "/v1/models", "agent.llm.llama_server", 60.0, interval_s=0.1)
        return self

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
