"""Where the end-of-turn judge's model calls run: when their answer is asked for, or in a thread.

``EndOfTurnJudge`` (``agent.listen.end_of_turn``) hands each model call it may need to its
``start`` and later asks the returned ``Job`` for the result, or cancels it. Two ways to start:

- ``run_when_asked`` (the default): nothing runs until ``result()``; then the call runs on the
  asking thread (the turn stage's), and a job cancelled before that never runs. The judge's
  model calls then happen one after the other, exactly where its rule needs them.
- ``run_in_thread``: the call starts at once in a daemon thread of its own, so it runs ahead
  of the check that needs it and beside the other model's call; ``result()`` waits for it (and
  re-raises its exception). ``cancel()`` stops a job that has not begun; one already running
  finishes and its answer is dropped (an ONNX or llama.cpp call cannot be stopped midway).
  Daemon threads: a call still running never holds the process open at exit.

Neither changes what the judge decides (it decides on stream time); threads only make the
answers arrive earlier in real time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Job(Protocol[T_co]):
    def result(self) -> T_co:
        """The call's answer (waits for it, or runs it now)."""

    def cancel(self) -> bool:
        """Do not run it if it has not begun; True if it never will."""


Start = Callable[[Callable[[], T]], Job[T]]


class _WhenAsked(Generic[T]):
    def __init__(self, work: Callable[[], T]) -> None:
        self._work: Callable[[], T] | None = work
        self._done = False
        self._value: T | None = None

    def result(self) -> T:
        if not self._done:
            if self._work is None:
                raise RuntimeError("the end-of-turn job was cancelled")
            self._value, self._done, self._work = self._work(), True, None
        return self._value  # type: ignore[return-value]

    def cancel(self) -> bool:
        if self._done:
            return False
        self._work = None
        return True


def run_when_asked(work: Callable[[], T]) -> Job[T]:
    """A job that runs ``work`` on the thread that asks for its result, when it asks."""
    return _WhenAsked(work)


def run_in_thread(work: Callable[[], T]) -> Job[T]:
    """A job that runs ``work`` now, in a daemon thread."""
    future: Future[T] = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(work())
        except BaseException as error:  # handed to whoever asks for the result
            future.set_exception(error)

    threading.Thread(target=target, name="turn-judge", daemon=True).start()
    return future
