"""Saving the running conversation after every turn, without ever stopping the conversation.

A failed save (disk full, a directory that vanished) is one error notice; the next turn tries
again. Agent audio is watermarked on its way to disk when a watermarker is loaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import platformdirs

from agent.conversation.conversation import Conversation
from agent.errors import AgentError


def default_save_dir() -> Path:
    """Where conversations go without --save: the user's data dir, one folder per start time."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(platformdirs.user_data_dir("csm-chat")) / "conversations" / stamp


class ConversationSaver:
    """Writes ``conversation`` to ``save_dir`` (atomically, see ``Conversation.save``)."""

    def __init__(self, conversation: Conversation, save_dir: Path,
                 watermark: Callable[[np.ndarray, int], np.ndarray], notice: Callable[[str, str], None]) -> None:
        self.conversation = conversation
        self.save_dir = save_dir
        self._watermark = watermark
        self._notice = notice

    def save(self, directory: str | Path | None = None) -> Path:
        """Save now (to ``directory``, or the conversation's own); AgentError when it cannot."""
        if not self.conversation.turns and directory is None:
            return self.save_dir
        target = directory if directory is not None else self.save_dir
        return self.conversation.save(target, watermark=self._watermark)

    def save_quietly(self) -> None:
        """Save now; a failure is an error notice, not an exception."""
        try:
            self.save()
        except AgentError as error:
            self._notice("error", str(error))
