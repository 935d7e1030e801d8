"""Snapshot tests guarding how csm-chat's TUI looks.

The app is driven by a scripted event source that speaks the pipeline's event vocabulary
(fixed text, fixed levels and latencies, no clock values), so the SVGs are identical run
to run. Regenerate after an intended change with
`python -m pytest tests/test_tui_snapshots.py --snapshot-update` and review the diff.
"""

from __future__ import annotations

from pathlib import Path

from textual.widgets import Input  # noqa: E402

from agent.config.settings import AgentSettings  # noqa: E402
from agent.events import (  # noqa: E402
    AgentState,
    AgentText,
    AgentTurnDone,
    LoadProgress,
    MicLevel,
    Notice,
    PartialTranscript,
    StateChanged,
    TurnLatency,
    UserTurn,
)
from agent.tui.app import CsmChatApp  # noqa: E402

SIZE = (120, 36)


class ScriptedPipeline:
    """Emits a fixed script of pipeline events from start(); records every call it gets."""

    def __init__(self, script, emit) -> None:
        self.script = script
        self.emit = emit
        self.calls: list[tuple] = []

    def start(self) -> None:
        for event in self.script:
            self.emit(event)

    def stop(self) -> None:
        self.calls.append(("stop",))

    def submit_text(self, text: str) -> None:
        self.calls.append(("submit_text", text))

    def interrupt(self) -> None:
        self.calls.append(("interrupt",))

    def set_muted(self, muted: bool) -> None:
        self.calls.append(("set_muted", muted))

    def set_mode(self, mode: str) -> None:
        self.calls.append(("set_mode", mode))

    def push_to_talk(self, pressed: bool) -> None:
        self.calls.append(("push_to_talk", pressed))

    def set_persona(self, name: str) -> None:
        self.calls.append(("set_persona", name))

    def save(self, directory=None) -> Path:
        return Path("/tmp/csm-chat-snapshot")

    def replay_last(self) -> None:
        self.calls.append(("replay_last",))


LOADED = [
    StateChanged(AgentState.LOADING),
    LoadProgress("whisper", False),
    LoadProgress("llm", False),
    LoadProgress("csm", False),
    LoadProgress("whisper", True),
    LoadProgress("llm", True),
    LoadProgress("csm", True),
    StateChanged(AgentState.LISTENING),
]

EXCHANGE = [
    *LOADED,
    MicLevel(-35.0),
    StateChanged(AgentState.HEARING),
    PartialTranscript("what is the"),
    StateChanged(AgentState.TRANSCRIBING),
    UserTurn(1, "What is the capital of France?"),
    StateChanged(AgentState.THINKING),
    AgentText(1, "The capital of France is Paris."),
    StateChanged(AgentState.SPEAKING),
    AgentText(1, "It sits on the Seine."),
    AgentTurnDone(1, "The capital of France is Paris. It sits on the Seine.", interrupted=False),
    TurnLatency(1, transcript_ms=312.0, first_token_ms=145.0, first_audio_ms=870.0),
    StateChanged(AgentState.LISTENING),
    UserTurn(2, "Tell me a long story [bold]please[/bold]"),
    StateChanged(AgentState.THINKING),
    AgentText(2, "Once upon a time, in a town by the sea,"),
    StateChanged(AgentState.SPEAKING),
    AgentTurnDone(2, "Once upon a time, in a town by the sea,", interrupted=True),
    TurnLatency(2, transcript_ms=None, first_token_ms=150.0, first_audio_ms=910.0),
    StateChanged(AgentState.LISTENING),
    MicLevel(-18.0),
    StateChanged(AgentState.HEARING),
    PartialTranscript("and then"),
]

NO_WEIGHTS = [
    *LOADED[:-2],
    Notice(
        "error",
        "No CSM weights: sesame/csm-1b is not reachable. Pass --csm-model DIR with a local "
        "checkpoint; continuing text-only.",
    ),
    Notice("warning", "No microphone found: plug one in or pass --mic-file WAV. Typing still works."),
    StateChanged(AgentState.LISTENING),
]


def scripted_app(script) -> CsmChatApp:
    return CsmChatApp(
        AgentSettings(),
        pipeline_factory=lambda settings, emit: ScriptedPipeline(script, emit),
        personas=lambda: ["default", "pirate"],
        devices=lambda: (["USB mic"], ["Headphones"]),
    )


async def settle(pilot) -> None:
    """Wait until the scripted start() has run and every event has been shown."""
    pilot.app.query_one(Input).cursor_blink = False
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


def test_main_screen_during_a_conversation(snap_compare):
    assert snap_compare(scripted_app(EXCHANGE), terminal_size=SIZE, run_before=settle)


def test_loading_screen_shows_progress_per_model(snap_compare):
    script = [StateChanged(AgentState.LOADING), LoadProgress("whisper", True), LoadProgress("llm", False)]
    assert snap_compare(scripted_app(script), terminal_size=SIZE, run_before=settle)


def test_help_screen_lists_every_key(snap_compare):
    async def open_help(pilot) -> None:
        await settle(pilot)
        await pilot.press("f1")
        await pilot.pause()

    assert snap_compare(scripted_app(LOADED), terminal_size=SIZE, run_before=open_help)


def test_error_notification_names_the_fix(snap_compare):
    assert snap_compare(scripted_app(NO_WEIGHTS), terminal_size=SIZE, run_before=settle)
