"""What travels between the pipeline's threads and the app's event loop.

``PipelineEvent`` carries any ``agent.events`` event; ``MicLevelChanged`` carries the mic level
(20 a second) and is superseded by a newer one still waiting in the queue, so a busy screen
shows the latest level instead of working through a backlog. ``PipelineLike`` is what the app
calls on a pipeline (tests pass a scripted stand-in).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from textual.message import Message

from agent.config.settings import AgentSettings
from agent.events import Event, MicLevel


class PipelineLike(Protocol):
    """What the app needs from agent.pipeline.Pipeline (tests may pass a scripted stand-in)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def submit_text(self, text: str) -> None: ...
    def interrupt(self) -> None: ...
    def set_muted(self, muted: bool) -> None: ...
    def set_mode(self, mode: str) -> None: ...
    def push_to_talk(self, pressed: bool) -> None: ...
    def set_persona(self, name_or_path: str) -> None: ...
    def save(self, directory: str | Path | None = None) -> Path: ...
    def replay_last(self) -> None: ...


PipelineFactory = Callable[[AgentSettings, Callable[[Event], None]], PipelineLike]


class PipelineEvent(Message):
    """An agent.events event, carried from a pipeline thread to the event loop."""

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


class MicLevelChanged(Message):
    """The latest mic level; a newer one waiting in the queue supersedes it (20 a second)."""

    def __init__(self, level: MicLevel) -> None:
        super().__init__()
        self.level = level

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, MicLevelChanged)
