"""A Hugging Face hub on 127.0.0.1 serving local files, for downloads without the network.

It answers the two calls hub clients make for a public model repo: the file tree
(``GET /api/models/OWNER/REPO/tree/main``) and the files themselves (``HEAD``/``GET
/OWNER/REPO/resolve/main/PATH`` with the commit, ETag and size headers). Point ``HF_ENDPOINT``
at ``url`` in the process that downloads.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repos: dict[str, dict[str, Path]], slow_s: float = 0.05):
        """``repos``: {"OWNER/REPO": {"path/in/repo.gguf": local file}}; files named ``*slow*`` are sent at
        256 kB per ``slow_s`` seconds (a download long enough to draw a progress bar)."""
        self.repos, self.slow_s = repos, slow_s
        self.downloads: list[str] = []  # GETs of files, in order
        super().__init__(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def _file(self) -> tuple[str, str, Path] | None:
        parts = unquote(urlparse(self.path).path).strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            local = self.server.repos.get(repo, {}).get(name)
            if local is not None:
                return repo, name, local
        return None

    def _not_found(self) -> None:
        body = json.dumps({"error": "Repository not found"}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _file_headers(self, local: Path) -> None:
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", '"' + hashlib.sha1(str(local).encode()).hexdigest() + '"')
        self.send_header("Content-Length", str(local.stat().st_size))
        self.end_headers()

    def do_HEAD(self) -> None:
        found = self._file()
        if found is None:
            return self._not_found()
        self._file_headers(found[2])

    def do_GET(self) -> None:
        path = unquote(urlparse(self.path).path).strip("/").split("/")
        if path[:2] == ["api", "models"] and len(path) >= 6 and path[4] == "tree":
            files = self.server.repos.get("/".join(path[2:4]))
            if files is None:
                return self._not_found()
            body = json.dumps([{"type": "file", "path": name, "size": p.stat().st_size, "oid": COMMIT}
                               for name, p in files.items()]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        found = self._file()
        if found is None:
            return self._not_found()
        self.server.downloads.append(found[1])
        self._file_headers(found[2])
        slow = "slow" in found[1].lower()
        with open(found[2], "rb") as f:
            while block := f.read(1 << 18 if slow else 1 << 20):
                self.wfile.write(block)
                if slow:
                    time.sleep(self.server.slow_s)
