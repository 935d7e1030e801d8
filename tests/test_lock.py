"""The lock (.ci/lock/): each platform's file pins every requirement of pyproject.toml that applies
there, and the install's check tells an installed set that differs from it in one line."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".ci" / "lock"))

import check  # noqa: E402  (.ci/lock/check.py)

# The environment each lock is resolved for (`make lock`: --python-platform, Python 3.11).
PLATFORMS = {
    "linux-x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
    "linux-aarch64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
    "macos-arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
}


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_every_requirement_is_pinned_within_its_range(platform):
    pins = check.read_lock(ROOT / ".ci" / "lock" / f"{platform}.txt")
    environment = {"python_version": "3.11", "python_full_version": "3.11.0", "implementation_name": "cpython",
                   "os_name": "posix", "extra": "dev", **PLATFORMS[platform]}
    missing, outside = [], []
    for requirement in _requirements():
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        pinned = pins.get(check.canonical(requirement.name))
        if pinned is None:
            missing.append(requirement.name)
        elif not requirement.specifier.contains(pinned, prereleases=True):
            outside.append(f"{requirement} (lock: {pinned})")
    assert not missing and not outside, f"run `make lock`: missing {missing}, outside the range {outside}"
    nodeps = check.read_lock(ROOT / ".ci" / "lock" / "nodeps.txt")
    assert nodeps and all(pins.get(name) == version for name, version in nodeps.items())


def test_the_check_names_each_difference():
    pins = {"torch": "2.13.0", "numpy": "2.4.6", "pip": "26.3"}
    assert check.differences({"torch": "2.13.0+cpu", "numpy": "2.4.6", "csm-chat": "0.1.0"}, pins) == []
    assert check.differences({"numpy": "2.5.0", "rich": "14.0", "pip": "26.3"}, pins) == [
        "numpy 2.5.0 (lock: 2.4.6)", "rich 14.0 (not in the lock)"]
    assert check.canonical("Typing_Extensions") == check.canonical("typing.extensions") == "typing-extensions"


def test_this_venv_matches_its_lock_or_says_why_in_one_line(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==0.0.1\n")
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "lock" / "check.py"), str(lock)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "numpy" in result.stderr and "(lock: 0.0.1)" in result.stderr and "make lock" in result.stderr
