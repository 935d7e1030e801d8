"""Driving one agent stage alone: feed its inbox, collect what it sends on, stand in for the model.

Only the model behind a stage is scripted (a transcriber that returns given texts, an LLM that
streams given deltas); the stage code under test is the real one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from agent.events import Event, Notice
from agent.frames import EndOfReply, Frame
from agent.listen.asr import Transcriber
from agent.llm.base import ChatLLM, Message, Sampling
from agent.stages.base import Stage, StageContext


def wait_on(changed: threading.Condition, condition, what: str, timeout: float, recent) -> None:
    """Wait (holding ``changed``) until ``condition()`` holds; fail naming ``what`` and ``recent()``."""
    deadline = time.monotonic() + timeout
    with changed:
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; last seen: {recent()}")
            changed.wait(min(remaining, 0.1))


class RecordingGenerator:
    """The real Generator, recording every stream call: text, context segments, start and end."""

    def __init__(self, generator) -> None:
        self._generator = generator
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._generator, name)

    @property
    def texts(self) -> list[str]:
        return [call["text"] for call in self.calls]

    def stream(self, text, speaker, context=(), **kwargs):
        call = {"text": text, "speaker": speaker, "context": list(context), "started": time.monotonic(),
                "ended": None}
        self.calls.append(call)
        yield from self._generator.stream(text, speaker, context, **kwargs)
        call["ended"] = time.monotonic()


class Collector:
    """A downstream that keeps every frame; like the voice stage, it marks a reply done at its end."""

    def __init__(self, finish_replies: bool = True) -> None:
        self.frames: list[Frame] = []
        self.finish_replies = finish_replies
        self._changed = threading.Condition()

    def put(self, frame: Frame) -> None:
        with self._changed:
            self.frames.append(frame)
            self._changed.notify_all()
        if self.finish_replies and isinstance(frame, EndOfReply):
            frame.reply.done.set()

    def of(self, kind: type) -> list:
        with self._changed:
            return [f for f in self.frames if isinstance(f, kind)]

    def wait_for(self, condition, what: str, timeout: float = 30.0) -> None:
        wait_on(self._changed, condition, what, timeout, lambda: self.frames[-10:])


class EventLog:
    """The events a stage or pipeline emitted (from its threads), in order; waits for conditions on them."""

    def __init__(self) -> None:
        self.items: list[Event] = []
        self._changed = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._changed:
            self.items.append(event)
            self._changed.notify_all()

    def of(self, kind: type) -> list:
        with self._changed:
            return [e for e in self.items if isinstance(e, kind)]

    def wait_for(self, condition, what: str, timeout: float = 240.0) -> None:
        wait_on(self._changed, condition, what, timeout, lambda: self.items[-15:])


def run_stage(stage: Stage, frames_to_send: Iterable[Frame], timeout: float = 60.0) -> None:
    """Start ``stage``, send it ``frames_to_send`` then ``Stop``, and wait for its loop to end."""
    stage.start()
    for frame in frames_to_send:
        stage.put(frame)
    stage.stop()
    stage.join(timeout)
    assert not stage.alive, f"the {stage.name} stage did not stop within {timeout} s"


def context(**kwargs) -> tuple[StageContext, EventLog]:
    log = EventLog()
    return StageContext(log, **kwargs), log


class ScriptedTranscriber(Transcriber):
    """Returns the given texts in order, one per call; records the audio lengths it was given."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__()
        self.texts = list(texts)
        self.heard: list[int] = []

    def _segments(self, audio: np.ndarray) -> tuple[list[tuple[str, float, float]], str | None]:
        self.heard.append(len(audio))
        text = self.texts.pop(0) if self.texts else ""
        return ([(text, 0.0, 0.0)] if text else []), "en"  # (text, no_speech_prob, avg_logprob)


class ScriptedLLM(ChatLLM):
    """Streams the given deltas; ``hold_after`` deltas in, it waits for ``release`` (or cancel)."""

    name = "scripted"

    def __init__(self, deltas: list[str], hold_after: int | None = None) -> None:
        super().__init__(Sampling())
        self.deltas = deltas
        self.hold_after = hold_after
        self.release = threading.Event()
        self.sent = 0
        self.saw_cancel = False
        self.messages: list[list[Message]] = []

    def stream_reply(self, messages: list[Message], cancel: threading.Event | None = None, *,
                     sampling: Sampling | None = None) -> Iterator[str]:
        self.messages.append(messages)
        for i, delta in enumerate(self.deltas):
            if i == self.hold_after:
                while not self.release.wait(0.02):
                    if cancel is not None and cancel.is_set():
                        break
            if cancel is not None and cancel.is_set():
                self.saw_cancel = True
                return
            self.sent += 1
            yield delta


def drain(q: queue.Queue) -> list:
    items = []
    while not q.empty():
        items.append(q.get_nowait())
    return items


def converse(pipeline, events, timeout: float, finally_: Callable[[], None] | None = None) -> None:
    """Start ``pipeline``, wait until it has finished its input, stop it (then ``finally_``), and
    check that no error was shown on the way."""
    try:
        pipeline.start()
        pipeline.wait_ready(timeout)
        assert pipeline.finished.wait(timeout), "the conversation did not finish"
    finally:
        pipeline.stop()
        if finally_ is not None:
            finally_()
    assert not [n for n in events.of(Notice) if n.level == "error"]
