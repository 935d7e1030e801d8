"""The README is a user's guide that matches the tree: its "Where things are" table names every
package folder (and nothing that is gone), its local links resolve, it stays short, and no
library module grows past what a reader can hold (400 lines)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TOP_LEVEL_FOLDERS = {"prompts", "benchmarks", "tests"}
MAX_MODULE_LINES = 400


def where_things_are() -> dict[str, str]:
    """folder -> job, from the README's "Where things are" table."""
    section = README.read_text().split("## Where things are", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)/` \| (.+) \|$", section, flags=re.MULTILINE)
    return dict(rows)


def package_folders() -> set[str]:
    folders = {"agent", "csm_engine"} | TOP_LEVEL_FOLDERS
    for package in ("agent", "csm_engine"):
        for init in (ROOT / package).rglob("__init__.py"):
            folders.add(init.parent.relative_to(ROOT).as_posix())
    return folders


def test_where_things_are_names_every_folder_and_only_those():
    table = where_things_are()
    assert set(table) == package_folders()
    assert all(job.strip() for job in table.values())


def test_readme_is_short_and_its_local_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) < 300
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert links, "the README links to the detailed guides"
    missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert missing == []


def test_guides_link_to_files_that_exist():
    for guide in [*ROOT.glob("agent/**/README.md"), *ROOT.glob("csm_engine/**/README.md")]:
        for link in re.findall(r"\]\(([^)#]+)\)", guide.read_text()):
            if "://" not in link:
                assert (guide.parent / link).exists(), f"{guide.relative_to(ROOT)} links to a missing {link}"


def test_no_library_module_is_longer_than_a_reader_can_hold():
    long = {p.relative_to(ROOT).as_posix(): n for package in ("agent", "csm_engine")
            for p in (ROOT / package).rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}
