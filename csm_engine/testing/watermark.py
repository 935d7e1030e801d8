"""Test helper: a random-init silentcipher 44.1 kHz model written in silentcipher's own layout.

No machine here reaches the hub, so tests build the watermark model from silentcipher's own
module classes with the published 44.1 kHz hyperparameters and random weights, save it as
``enc_c.ckpt``, ``dec_c.ckpt``, ``dec_m_0.ckpt`` + ``hparams.yaml`` and load it back through
``silentcipher.get_model`` — the same loading and encode/decode code a real checkpoint takes.
A random model embeds and decodes *something*; it proves the plumbing, never detection accuracy.

    python -m csm_engine.testing.watermark OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import sys
from argparse import Namespace
from pathlib import Path

import torch
import yaml

# The hyperparameters of sony/silentcipher 44_1_khz/73999_iteration that the inference code
# reads. The layer counts are not in silentcipher's inference code; 3 and 4 are the training
# defaults and match the published checkpoint sizes (enc_c ~185 kB, dec_c ~2.0 MB).
# `model_type` is read into the model but unused at inference.
SILENTCIPHER_44K_HPARAMS: dict = {
    "SR": 44100,
    "N_FFT": 4096,
    "HOP_LENGTH": 2048,
    "message_band_size": 1024,
    "message_dim": 5,
    "message_len": 21,
    "message_sdr": 47,
    "n_messages": 1,
    "model_type": "n_msg",
    "enc_n_layers": 3,
    "dec_c_n_layers": 4,
    "ensure_negative_message": True,
    "ensure_constrained_message": False,
    "frame_level_normalization": False,
    "utterance_level_normalization": True,
    "no_normalization": False,
}


def write_random_watermark_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random-init silentcipher 44.1 kHz checkpoint set into out_dir; returns the dir."""
    from csm_engine.watermark import _import_silentcipher

    _import_silentcipher()  # imports the package quietly (pydub's ffmpeg warning)
    from silentcipher.model import CarrierDecoder, Encoder, MsgDecoder

    hp = dict(SILENTCIPHER_44K_HPARAMS)
    config = Namespace(**hp)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Same constructor arguments silentcipher.server.Model uses, so the state dicts load strictly.
    # fork_rng keeps the caller's global RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc_c = Encoder(
            out_dim=32,
            n_layers=hp["enc_n_layers"],
            message_dim=hp["message_dim"],
            message_band_size=hp["message_band_size"],
            n_fft=hp["N_FFT"],
        )
        dec_c = CarrierDecoder(
            config=config,
            conv_dim=32 * 3,
            n_layers=hp["dec_c_n_layers"],
            message_band_size=hp["message_band_size"],
        )
        dec_m = [
            MsgDecoder(message_dim=hp["message_dim"], message_band_size=hp["message_band_size"])
            for _ in range(hp["n_messages"])
        ]

    # Plain tensor state dicts: loadable with torch.load(weights_only=True), like the real files.
    torch.save(enc_c.state_dict(), out / "enc_c.ckpt")
    torch.save(dec_c.state_dict(), out / "dec_c.ckpt")
    for i, module in enumerate(dec_m):
        torch.save(module.state_dict(), out / f"dec_m_{i}.ckpt")
    (out / "hparams.yaml").write_text(yaml.safe_dump(hp, sort_keys=True))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m csm_engine.testing.watermark",
        description="Write a random-init silentcipher 44.1 kHz checkpoint set (for tests only).",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_random_watermark_checkpoint(args.out_dir, seed=args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
