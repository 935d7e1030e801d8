"""The waiting line in front of an engine thread, shared by the batch and the serial engine.

Requests wait in ``_pending`` under the ``_wake`` condition until the engine thread takes them;
``_enqueue`` refuses them in one line when the engine is shutting down or its line is full, and
``_notify`` wakes the thread (an utterance's ``wake``: it was cancelled, say).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from csm_engine.batch.events import Utterance
from csm_engine.errors import CSMError


class EngineBusy(CSMError):
    """Every stream is busy and the queue is full: try again later (HTTP 429)."""


class UtteranceQueue:
    """``_pending``, ``_wake`` and ``_closing`` of an engine, and the one way in."""

    def __init__(self) -> None:
        self._pending: deque[Utterance] = deque()
        self._wake = threading.Condition()
        self._closing = False

    def _enqueue(self, utterance: Utterance, full: Callable[[int], str | None]) -> Utterance:
        """Queue ``utterance`` and wake the engine thread. ``full(waiting)`` says, under the lock, why a
        line of ``waiting`` requests takes no more (None: it does)."""
        with self._wake:
            if self._closing:
                raise CSMError("the engine is shutting down")
            if (why := full(len(self._pending))) is not None:
                raise EngineBusy(why)
            self._pending.append(utterance)
            self._wake.notify_all()
        return utterance

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()
