"""Imports point one way: commands import the library, never the reverse; the engine never imports the agent.

Read from the source with ``ast`` (nothing is imported): every ``import`` and ``from ... import``
in agent/ and csm_engine/, at module level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "csm_engine")
# Command modules: console scripts and what only they use. ``agent/echo/check_audio.py`` is
# csm-chat's --check-audio command.
COMMAND_FILES = {"cli.py", "__main__.py", "console.py"}
COMMAND_MODULES = {"agent.echo.check_audio"}
FIXTURE_PACKAGE = "csm_engine.testing"  # random-weight checkpoints for tests, benchmarks and trying things


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_command(module: str, path: Path) -> bool:
    return path.name in COMMAND_FILES or module in COMMAND_MODULES


def is_fixture(module: str) -> bool:
    return module == FIXTURE_PACKAGE or module.startswith(FIXTURE_PACKAGE + ".")


def imported_modules(path: Path, module: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every import in ``path``, relative ones resolved, ``from pkg import sub`` as ``pkg.sub``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
    return found


def forbidden_imports(root: Path) -> list[str]:
    """Every import that points the wrong way, as ``file:line: what``."""
    files = {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}
    problems = []
    for module, path in files.items():
        library = not is_command(module, path) and not is_fixture(module)
        for line, target in imported_modules(path, module, set(files)):
            where = f"{path.relative_to(root)}:{line}"
            if module.startswith("csm_engine") and target.split(".")[0] == "agent":
                problems.append(f"{where}: the engine imports the agent ({target})")
            if not library or target not in files:
                continue
            if is_command(target, files[target]):
                problems.append(f"{where}: library code imports the command module {target}")
            elif is_fixture(target):
                problems.append(f"{where}: library code imports the test fixtures {target}")
    return problems


def test_imports_point_from_commands_to_the_library_and_from_the_agent_to_the_engine():
    assert forbidden_imports(ROOT) == []


@pytest.mark.parametrize("source,expected", [
    ("from csm_engine.cli import run_generate\n", "imports the command module csm_engine.cli"),
    ("def f():\n    from csm_engine import cli\n", "imports the command module csm_engine.cli"),
    ("from ..testing.checkpoints import write_checkpoint\n",
     "imports the test fixtures csm_engine.testing.checkpoints"),
    ("import agent.errors\n", "the engine imports the agent (agent.errors)"),
])
def test_the_check_finds_each_kind_of_wrong_import(tmp_path, source, expected):
    for package, files in {"agent": ["__init__.py", "errors.py"],
                           "csm_engine": ["__init__.py", "cli.py", "generator.py"],
                           "csm_engine/testing": ["__init__.py", "checkpoints.py"],
                           "csm_engine/serve": ["__init__.py", "speech.py"]}.items():
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        for name in files:
            (tmp_path / package / name).write_text("", encoding="utf-8")
    (tmp_path / "csm_engine/serve/speech.py").write_text(source, encoding="utf-8")
    problems = forbidden_imports(tmp_path)
    assert len(problems) == 1 and problems[0].startswith("csm_engine/serve/speech.py:")
    assert problems[0].endswith(expected)
    # Commands may import commands and fixtures.
    (tmp_path / "csm_engine/serve/speech.py").write_text("", encoding="utf-8")
    (tmp_path / "csm_engine/cli.py").write_text(source.replace("..testing", "csm_engine.testing"), encoding="utf-8")
    assert all("command module" not in p and "test fixtures" not in p for p in forbidden_imports(tmp_path))


def test_the_wire_format_and_its_client_import_without_the_server():
    """csm-serve's wire format is one module both sides import; the agent's side needs no FastAPI."""
    import subprocess
    import sys

    code = ("import sys, csm_engine.serve.wire, agent.speak.remote_voice\n"
            "print(sorted({'fastapi', 'pydantic', 'starlette', 'uvicorn'} & set(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"
