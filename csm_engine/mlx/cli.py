"""``csm-generate-mlx``: ``csm-generate`` with the model on MLX.

The options are csm-generate's own (``csm_engine.cli.build_generate_parser``) plus
``--quantize {4,8}`` and ``--mlx-dtype``; everything after loading (context, voices, watermark,
writing the WAV) is csm-generate's own code path, ``csm_engine.cli.run_generate``.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from csm_engine import cli

    parser = cli.build_generate_parser()
    parser.prog = "csm-generate-mlx"
    parser.description = "Generate speech with CSM on MLX (Apple Silicon; mlx[cpu] on Linux)."
    parser.set_defaults(engine="mlx")
    parser.add_argument("--quantize", type=int, choices=(4, 8), default=None,
                        help="quantize the transformer weights to 4 or 8 bits with mlx.nn.quantize")
    parser.add_argument("--mlx-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="MLX weight dtype (default float32, the torch engine's numbers)")
    return parser


def load_mlx_generator(args: argparse.Namespace, device: str = "cpu"):
    """The MLXGenerator named by csm-generate's loading options; ``device`` is where Mimi runs.

    ``--quantize``/``--mlx-dtype`` when given, else ``--dtype`` as an MLX precision (auto: the chip's).
    """
    from csm_engine import cli

    if args.quantize is None and args.mlx_dtype is None:
        args.engine = "mlx"
        return cli.load_generator_for(args, device)
    from csm_engine.mlx import load_generator

    return load_generator(args.csm_model, mimi_path=args.mimi_path, tokenizer_path=args.tokenizer_path,
                          quantize_bits=args.quantize, dtype=args.mlx_dtype,
                          device=device if str(device).startswith("cuda") else "cpu", adapter=args.adapter)


def generate_main(argv: list[str] | None = None) -> int:
    from csm_engine import cli
    from csm_engine.console import run_cli
    from csm_engine.mlx import require_mlx

    args = build_parser().parse_args(argv)

    def body() -> int:
        require_mlx()
        # csm-generate's whole path (checks, context, voice, watermark, WAV), with an MLX model.
        return int(cli.run_generate(args, load_mlx_generator) or 0)

    return run_cli("csm-generate-mlx", body)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(generate_main())
