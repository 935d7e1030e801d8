"""Where csm-chat's log goes: a file a bug report can attach, stderr with ``-v``, the screen for warnings.

Modules log with ``logging.getLogger(__name__)``; ``setup_logging`` (called once by the CLI) sends

- warnings and errors (everything from ``agent``/``csm_engine`` with ``-v``), with tracebacks, to
  ``--log-file`` or ``csm-chat.log`` in the user's log directory (``default_log_path``);
- outside the app (headless, --replay, the one-shot commands), warnings to stderr as one line
  each, or with ``-v`` every debug line; the app owns the terminal, so it shows warnings as
  notices instead (``agent.tui.logs``) and ``-v`` there only makes the log file verbose.

A record logged with ``extra=SHOWN`` was already shown to the user (a notice): the file keeps it,
but the screen and the one-line stderr do not show it twice.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import platformdirs

from agent.errors import AgentError

LOG_NAME = "csm-chat.log"
OUR_LOGGERS = ("agent", "csm_engine")
FILE_FORMAT = "%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"
SHOWN = {"shown": True}  # ``log.warning(..., extra=SHOWN)``: the user has seen it already


def default_log_path() -> Path:
    """``csm-chat.log`` in the user's log directory (on Linux ``~/.local/state/csm-chat/log``)."""
    return Path(platformdirs.user_log_dir("csm-chat")) / LOG_NAME


def was_shown(record: logging.LogRecord) -> bool:
    return bool(getattr(record, "shown", False))


class OneLine(logging.Formatter):
    """``warning: message`` without the traceback (that is in the log file)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {' '.join(record.getMessage().split())}"


class NotShown(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not was_shown(record)


def setup_logging(*, verbose: bool = False, log_file: str | Path | None = None, console: bool = True) -> Path:
    """Install csm-chat's handlers on the root logger (replacing earlier ones of ours); returns the log file.

    Raises AgentError when the log file cannot be opened.
    """
    path = Path(log_file).expanduser() if log_file else default_log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8", delay=False)
    except OSError as error:
        raise AgentError(f"cannot write the log file {path}: {error.strerror or error} "
                         "(pass --log-file PATH)") from None
    file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
    file_handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    handlers: list[logging.Handler] = [file_handler]
    if console and verbose:
        debug = logging.StreamHandler(sys.stderr)
        debug.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handlers.append(debug)
    elif console:
        warnings = logging.StreamHandler(sys.stderr)
        warnings.setLevel(logging.WARNING)
        warnings.setFormatter(OneLine())
        warnings.addFilter(NotShown())
        handlers.append(warnings)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_csm_chat", False)]:
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        handler._csm_chat = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.WARNING)  # other libraries: warnings only
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
    return path


__all__ = ["SHOWN", "default_log_path", "setup_logging", "was_shown"]
