"""Check that the packages installed in this Python equal the lock: ``python .ci/lock/check.py LOCK``.

Every installed distribution but the project itself must be pinned in LOCK at the installed
version (a local build tag such as torch's ``+cpu`` satisfies an untagged pin, as it does for
pip). Prints one line and exits 1 when they differ, so ``make`` stops with the reason.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

PROJECT = "csm-chat"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def differences(installed: dict[str, str], pins: dict[str, str]) -> list[str]:
    problems = []
    for name, version in sorted(installed.items()):
        if name == PROJECT:
            continue
        pinned = pins.get(name)
        if pinned is None:
            problems.append(f"{name} {version} (not in the lock)")
        elif version != pinned and ("+" in pinned or version.split("+")[0] != pinned):
            problems.append(f"{name} {version} (lock: {pinned})")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python .ci/lock/check.py LOCK.txt", file=sys.stderr)
        return 2
    lock = Path(argv[0])
    if not lock.is_file():
        print(f"lock check: no lock file {lock} (run `make lock`)", file=sys.stderr)
        return 1
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    problems = differences(installed, read_lock(lock))
    if problems:
        print(f"lock check: {len(problems)} installed package(s) differ from {lock}: {'; '.join(problems)} "
              "(rebuild the venv with `make clean install`, or refresh the lock with `make lock`)", file=sys.stderr)
        return 1
    print(f"lock check: {len(installed)} installed packages match {lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
