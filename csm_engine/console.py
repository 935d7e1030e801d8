"""What every console script shares (csm-generate, csm-serve, csm-finetune, csm-generate-mlx, csm-verify).

One-line errors and exit codes (``run_cli``), the ``--device``/``--dtype`` choices, and the one
name of the CSM checkpoint option (``--csm-model``, as csm-chat spells it beside ``--llm-model``).
Only command modules import this; library code raises ``CSMError`` and never exits.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from csm_engine.errors import CSMError, first_line
from csm_engine.precision import PRECISIONS

DTYPES = ("auto", *PRECISIONS)  # what --dtype accepts
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
CSM_MODEL_HELP = "CSM checkpoint directory or hub repo id (default sesame/csm-1b)"


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run a CLI body: CSMError -> one line on stderr + exit 2; Ctrl-C -> exit 130."""
    try:
        return body()
    except CSMError as e:
        print(f"{prog}: error: {first_line(e, limit=None) or 'unknown error'}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def add_csm_model_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                         help: str = CSM_MODEL_HELP, old_names: Sequence[str] = ()) -> None:
    """``--csm-model DIR|REPO`` (``args.csm_model``, default None); ``old_names`` still work but are not listed."""
    parser.add_argument("--csm-model", dest="csm_model", metavar="DIR|REPO", default=None, help=help)
    for name in old_names:
        parser.add_argument(name, dest="csm_model", metavar="DIR|REPO", default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)


def optional_module(name: str):
    """Import an engine module another part of the project provides; None if it is not installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


__all__ = ["CSM_MODEL_HELP", "DTYPES", "EXIT_INTERRUPTED", "EXIT_USAGE", "add_csm_model_option",
           "optional_module", "run_cli"]
