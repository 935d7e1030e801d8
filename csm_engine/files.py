"""Durable file writes: a reader never sees half a file, and a crash keeps the old one.

Everything the project writes for keeps (WAVs, transcripts, checkpoints, adapters, caches)
goes through ``atomic_path``: write a temp file (or directory) next to the target, fsync it,
rename it over the target, fsync the directory that holds it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, which races with other threads.
_UMASK = _read_umask()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's data to disk (a no-op where the OS refuses, e.g. some network mounts)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """A temp path next to ``path`` to write; on success it replaces ``path`` durably, on error it is removed.

    The temp name keeps ``path``'s suffix (libraries that pick a format or append an extension
    by it see the right one). With ``directory=True`` the temp path is an empty directory, and
    ``path`` must be absent or an empty directory.
    """
    path = Path(path)
    parent = path.parent
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # mkstemp/mkdtemp make 0600/0700: give the result the mode a plain open() would.
        os.chmod(tmp, (0o777 if directory else 0o666) & ~_UMASK)
        if directory:
            for child in tmp.rglob("*"):
                if child.is_file():
                    fsync_path(child)
        fsync_path(tmp)
        if directory and path.is_dir():
            path.rmdir()  # only an empty one: rmdir refuses anything else
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    fsync_path(parent)


def cache_dir(name: str, env: str) -> Path:
    """``$env`` if set, else csm-chat's user cache folder ``name`` (``~/.cache/csm-chat/NAME`` on Linux)."""
    value = os.environ.get(env)
    if value:
        return Path(value)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("csm-chat")) / name


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Create or replace ``path`` with what ``write(binary_handle)`` writes, atomically and durably."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


__all__ = ["atomic_path", "cache_dir", "fsync_path", "write_atomic", "write_bytes_atomic", "write_text_atomic"]
