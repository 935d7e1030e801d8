"""Session fixtures shared by the test suite (append new fixtures; keep them session-scoped)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight checkpoint dir (config, weights, tokenizer.json, Mimi), written once per session."""
    from csm_engine.testing import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), flavor="tiny", seed=0)
