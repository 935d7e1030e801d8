"""``csm-generate-mlx``: ``csm-generate`` with the model on MLX.

The options are csm-generate's own (``csm_engine.cli.build_generate_parser``) plus
``--quantize {4,8}`` and ``--mlx-dtype``; everything after loading (context, voices, watermark,
writing the WAV) is csm-generate's code path when ``csm_engine.cli`` offers it as
``run_generate(args, generator)``.
"""

from __future__ import annotations

import argparse
import sys

from csm_engine.errors import CSMError


def build_parser() -> argparse.ArgumentParser:
    from csm_engine import cli

    parser = cli.build_generate_parser()
    parser.prog = "csm-generate-mlx"
    parser.description = "Generate speech with CSM on MLX (Apple Silicon; mlx[cpu] on Linux)."
    parser.add_argument("--quantize", type=int, choices=(4, 8), default=None,
                        help="quantize the transformer weights to 4 or 8 bits with mlx.nn.quantize")
    parser.add_argument("--mlx-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="MLX weight dtype (default float32, the torch engine's numbers)")
    return parser


def load_mlx_generator(args: argparse.Namespace):
    """The MLXGenerator named by csm-generate's loading options (``--model-path`` etc.)."""
    from csm_engine.mlx import load_generator

    return load_generator(getattr(args, "model_path", None), mimi_path=getattr(args, "mimi_path", None),
                          tokenizer_path=getattr(args, "tokenizer_path", None), quantize_bits=args.quantize,
                          dtype=args.mlx_dtype, device=getattr(args, "device", None) or "cpu")


def _run_plain(args: argparse.Namespace, generator) -> int:
    """Minimal generate-and-write, used only when csm_engine.cli has no shared ``run_generate``."""
    import soundfile as sf

    pcm = generator.generate(args.text, args.speaker, max_audio_length_ms=args.max_audio_length_ms,
                             temperature=args.temperature, topk=args.topk, seed=getattr(args, "seed", None))
    sf.write(args.output, pcm.numpy(), generator.sample_rate, subtype="PCM_16")
    print(f"wrote {args.output} ({pcm.numel() / generator.sample_rate:.2f} s)")
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    from csm_engine.mlx import require_mlx

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        require_mlx()
        from csm_engine import cli

        generator = load_mlx_generator(args)
        run = getattr(cli, "run_generate", None)
        return int(run(args, generator) or 0) if run is not None else _run_plain(args, generator)
    except CSMError as e:
        print(f"csm-generate-mlx: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(generate_main())
