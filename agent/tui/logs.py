"""Warnings logged anywhere (any thread) shown in the app as notices.

``NoticeHandler`` is a ``logging.Handler`` on the root logger while the app runs: each WARNING or
worse record becomes a ``Notice`` handed to ``post`` (the app's thread-safe event hand-over), so
a warning from a worker thread reaches the screen the way the pipeline's own notices do.
Records the user has already seen as a notice (``agent.logs.SHOWN``) are not shown twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.events import Notice
from agent.logs import was_shown


class NoticeHandler(logging.Handler):
    """See the module docstring."""

    def __init__(self, post: Callable[[Notice], None], level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.post = post

    def emit(self, record: logging.LogRecord) -> None:
        if was_shown(record):
            return
        try:
            level = "warning" if record.levelno < logging.ERROR else "error"
            self.post(Notice(level, " ".join(record.getMessage().split())))
        except Exception:  # logging must never raise into the caller
            self.handleError(record)

    def install(self) -> NoticeHandler:
        logging.getLogger().addHandler(self)
        return self

    def remove(self) -> None:
        logging.getLogger().removeHandler(self)


__all__ = ["NoticeHandler"]
