"""How every benchmark hands its result over: one JSON object on stdout, and in ``--out`` when given."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: str | Path | None = None) -> dict:
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")
    return result
