"""What every stage shares: its thread and inbox, the interruption rule, and the run's context.

A ``Stage`` owns one thread and one inbox (a queue of ``agent.frames`` frames). Its loop takes a
frame, drops it if it is a data frame of a cancelled reply (the one place interruption is
handled), and otherwise hands it to ``process``; ``Stop`` ends the loop after ``on_stop``.
Results go to ``downstream``: another stage, or any object with ``put(frame)`` (a test passes a
``queue.Queue`` and reads what came out).

``StageContext`` is what the stages of one run share: the event callback, the agent's state,
the stop signal, the reply in flight (``ReplyTracker``) and how many user inputs are still
being answered (``Progress``).

A stage never dies of an unexpected exception: ``run`` hands it to ``StageContext.stage_failed``
(the traceback to the log, the reply in flight cancelled, one notice; headless, the run ends
as failed) and then to the stage's own ``after_failure`` (end the turn, record what was said), and
goes on with the next frame.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

from agent.errors import AgentError
from agent.events import AgentState, Event, Notice, StateChanged
from agent.frames import ControlFrame, Frame, Reply, ReplyFrame, Stop
from agent.logs import SHOWN
from csm_engine.errors import first_line

log = logging.getLogger(__name__)


class FrameSink(Protocol):
    """Where a stage sends its output: the next stage's inbox, or a test's queue."""

    def put(self, frame: Frame) -> None: ...


class ReplyTracker:
    """The agent reply in flight (at most one) and the one way to cancel it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: Reply | None = None

    @property
    def current(self) -> Reply | None:
        with self._lock:
            return self._current

    def begin(self, reply: Reply) -> None:
        with self._lock:
            self._current = reply

    def end(self, reply: Reply) -> None:
        with self._lock:
            if self._current is reply:
                self._current = None

    def cancel_current(self) -> Reply | None:
        """Cancel the reply in flight; returns it if this call cancelled it (None: nothing to cancel)."""
        with self._lock:
            reply = self._current
        if reply is None or reply.cancel.is_set():
            return None
        reply.cancel.set()
        return reply


class Progress:
    """User inputs not yet fully answered, and whether the input is over (``finished``).

    Headless runs end when the input is over and every reply is spoken; paced mic files wait
    for ``idle`` before feeding the next block, so each turn waits for the previous reply.
    """

    def __init__(self, max_turns: int | None = None) -> None:
        self.max_turns = max_turns
        self.agent_replies = 0
        self.input_over = threading.Event()
        self.finished = threading.Event()
        self._pending = 0
        self._idle = threading.Condition()

    def begin_input(self) -> None:
        with self._idle:
            self._pending += 1

    def end_input(self) -> None:
        with self._idle:
            self._pending = max(0, self._pending - 1)
            self._idle.notify_all()
        self._check_finished()

    def end_of_input(self) -> None:
        """No more user input will come (end of the mic file, --max-turns reached)."""
        self.input_over.set()
        self._check_finished()

    def reply_recorded(self) -> bool:
        """Count a finished agent reply; True once --max-turns is reached."""
        self.agent_replies += 1
        return self.turns_reached()

    def turns_reached(self) -> bool:
        return self.max_turns is not None and self.agent_replies >= self.max_turns

    @property
    def busy(self) -> bool:
        """A user input is being answered."""
        with self._idle:
            return self._pending > 0

    def wait_idle(self, stopping: threading.Event) -> bool:
        """Block until no user input is in flight; False when stopping."""
        with self._idle:
            while self._pending > 0 and not stopping.is_set():
                self._idle.wait(0.2)
        return not stopping.is_set()

    def wake(self) -> None:
        with self._idle:
            self._idle.notify_all()

    def _check_finished(self) -> None:
        with self._idle:
            if self._pending == 0 and self.input_over.is_set():
                self.finished.set()


class StageContext:
    """What the stages of one run share. ``emit`` is the consumer's callback (any thread)."""

    def __init__(self, emit: Callable[[Event], None], *, headless: bool = False, max_turns: int | None = None,
                 on_fatal: Callable[[AgentError], None] | None = None,
                 on_interrupt: Callable[[], None] | None = None) -> None:
        self._emit_cb = emit
        self.headless = headless
        self.state = AgentState.LOADING
        self.stopping = threading.Event()
        self.replies = ReplyTracker()
        self.progress = Progress(max_turns)
        self._on_fatal = on_fatal
        self._on_interrupt = on_interrupt  # cancels the reply in flight and silences the speaker
        self._threads: list[threading.Thread] = []
        self.failures: list[str] = []  # one line per stage failure, in order (a repeat of the last one is not added)
        self._failure_lock = threading.Lock()

    def emit(self, event: Event) -> None:
        try:
            self._emit_cb(event)
        except Exception:  # a consumer's bug must not kill a stage
            log.exception("the event consumer failed on %s", type(event).__name__)

    def stage_failed(self, name: str, error: BaseException) -> None:
        """An unexpected exception in a stage (a bug, a broken model): see ``turn_failed``."""
        self.turn_failed(f"the {name} stage failed: {type(error).__name__}: {first_line(error)}", error)

    def turn_failed(self, message: str, error: BaseException | None = None) -> None:
        """The turn in flight cannot go on: log it (with the traceback), cancel the reply, tell the user once.

        Headless the run then ends as failed (``on_fatal``: non-zero exit, the conversation
        saved); in the app the conversation goes on with the next turn.
        """
        with self._failure_lock:  # a stage failing on every frame (a broken model) is said once
            repeated = bool(self.failures) and self.failures[-1] == message
            if not repeated:
                self.failures.append(message)
        if repeated:
            log.debug("again: %s", message)
        else:
            exc_info = (type(error), error, error.__traceback__) if error is not None else None
            log.error("%s", message, exc_info=exc_info, extra=SHOWN)
        if self._on_interrupt is not None:
            self._on_interrupt()
        else:
            self.replies.cancel_current()
        if self.headless and self._on_fatal is not None:
            self._on_fatal(AgentError(message))
        elif not repeated:
            self.emit(Notice("error", f"{message} (this turn ended; the log has the details)"))

    def notice(self, level: str, message: str) -> None:
        """A one-line message for the user (whitespace collapsed); warnings and errors go to the log too."""
        text = " ".join(str(message).split())
        if level in ("warning", "error"):
            log.log(logging.ERROR if level == "error" else logging.WARNING, "%s", text, extra=SHOWN)
        self.emit(Notice(level, text))

    def set_state(self, state: AgentState) -> None:
        if state != self.state:
            self.state = state
            self.emit(StateChanged(state))

    def listening_or_current(self) -> AgentState:
        """The state to go back to after a non-turn: listening, unless a reply is in flight."""
        return AgentState.LISTENING if self.replies.current is None else self.state

    def spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        """Run ``target`` on a daemon thread; an AgentError is fatal, any other error a notice."""

        def run() -> None:
            try:
                target()
            except AgentError as error:
                log.debug("fatal error in the %s thread", name, exc_info=True)
                if self._on_fatal is not None:
                    self._on_fatal(error)
            except Exception as error:  # a bug: log it, end the turn, say it in one line
                self.stage_failed(name, error)

        thread = threading.Thread(target=run, name=f"csm-chat-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def threads(self) -> list[threading.Thread]:
        return list(self._threads)


class Stage(ABC):
    """One step of the pipeline on its own thread; see the module docstring."""

    name = "stage"

    def __init__(self, ctx: StageContext, downstream: FrameSink | None = None) -> None:
        self.ctx = ctx
        self.downstream = downstream
        self.inbox: queue.Queue[Frame] = queue.Queue()
        self._thread: threading.Thread | None = None

    def put(self, frame: Frame) -> None:
        self.inbox.put(frame)

    def push(self, frame: Frame) -> None:
        """Send a frame on to the next stage."""
        if self.downstream is not None:
            self.downstream.put(frame)

    def start(self) -> None:
        if self._thread is None:
            self._thread = self.ctx.spawn(self.run, self.name)

    def stop(self) -> None:
        self.inbox.put(Stop())

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        """The stage's loop: frames in order until ``Stop``."""
        while True:
            frame = self.inbox.get()
            if isinstance(frame, Stop):
                self.on_stop()
                return
            if self.dropped(frame):
                continue
            try:
                self.process(frame)
            except Exception as error:  # never die of it: end the turn, tell the user, take the next frame
                self.ctx.stage_failed(self.name, error)
                try:
                    self.after_failure(frame)
                except Exception:
                    log.exception("the %s stage could not recover from its failure", self.name)

    def dropped(self, frame: Frame) -> bool:
        """The interruption rule: data of a cancelled reply, and all data once stopping, is dropped."""
        if isinstance(frame, ControlFrame):
            return False
        if isinstance(frame, ReplyFrame) and frame.reply.cancelled:
            return True
        return self.ctx.stopping.is_set()

    @abstractmethod
    def process(self, frame: Frame) -> None:
        """Handle one frame (runs on the stage's thread)."""

    def after_failure(self, frame: Frame) -> None:  # noqa: B027 (a hook: most stages have nothing to end)
        """After ``process(frame)`` raised (the reply in flight is already cancelled): end the turn cleanly."""

    def on_stop(self) -> None:  # noqa: B027 (a hook: most stages hold nothing to release)
        """Called on the stage's thread when ``Stop`` arrives."""
