"""Session fixtures shared by the test suite (append new fixtures; keep them session-scoped)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight checkpoint dir (config, weights, tokenizer.json, Mimi), written once per session."""
    from csm_engine.testing import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), flavor="tiny", seed=0)


@pytest.fixture(scope="session")
def random_watermark_dir(tmp_path_factory) -> Path:
    """A random-init silentcipher 44.1 kHz checkpoint set (enc_c/dec_c/dec_m_0.ckpt + hparams.yaml), written once."""
    from csm_engine.testing_watermark import write_random_watermark_checkpoint

    return write_random_watermark_checkpoint(tmp_path_factory.mktemp("silentcipher_random"), seed=0)


@pytest.fixture(scope="session")
def espeak_speech_wav(tmp_path_factory) -> Path:
    """A real spoken WAV from espeak-ng (22.05 kHz mono, ~2 s), written once."""
    import shutil
    import subprocess

    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed; run `make test` (or apt-get install espeak-ng)")
    path = tmp_path_factory.mktemp("espeak") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "hello there, this is a short test of my voice"], check=True)
    return path
