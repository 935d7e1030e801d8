"""Pilot tests of csm-chat's TUI.

The conversation tests drive the real Pipeline: an espeak-ng WAV as the microphone, the
embedded faster-whisper tiny.en and SmolLM2, and a tiny random-weight CSM checkpoint.
"""

from __future__ import annotations

import asyncio
import functools

import pytest
from rich.text import Text
from textual.widgets import Input

pytest.importorskip("agent.events", reason="agent/events.py (pipeline events) not written yet")

from agent.errors import AgentError  # noqa: E402
from agent.tui.app import CsmChatApp  # noqa: E402
from agent.tui.text import literal, visible_controls  # noqa: E402
from agent.tui.widgets import MicMeter, Transcript, TurnView  # noqa: E402

INJECTION = "[bold red]x[/] \x1b[31m"


def pilot_test(test):
    """Run an async Pilot test on a fresh event loop (no async pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(test(*args, **kwargs))

    return run


# ---- literal text --------------------------------------------------------------------------


def test_literal_keeps_markup_brackets_as_text():
    shown = literal("[bold red]x[/] and [link=http://e.x]y[/link]")
    assert isinstance(shown, Text)
    assert shown.plain == "[bold red]x[/] and [link=http://e.x]y[/link]"
    assert not shown.spans and not shown.style


def test_visible_controls_shows_escape_sequences_as_symbols():
    assert visible_controls("\x1b[31mred\x07") == "\u241b[31mred\u2407"
    assert visible_controls("a\x9b2Jb\x7f") == "a\\x9b2Jb\u2421"
    assert visible_controls("two\nlines\tand tab") == "two\nlines\tand tab"


# ---- app without models ---------------------------------------------------------------------


class _Settings:
    mode = "vad"
    persona = "default"
    input_device = None
    output_device = None


def _broken_pipeline(settings, emit):
    raise AgentError("Unknown LLM 'nope': pass --llm-model PATH to a .gguf file.")


@pilot_test
async def test_pipeline_error_is_a_notification_and_the_app_stays_up():
    app = CsmChatApp(_Settings(), pipeline_factory=_broken_pipeline, personas=lambda: [])
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await pilot.pause()
        messages = [n.message for n in app._notifications]
        assert any("--llm-model PATH" in m for m in messages)
        assert app.query_one("#message", Input).has_focus
        await pilot.press("h", "i", "enter")  # no pipeline: explains instead of crashing
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.is_running
        assert any("not running" in n.message for n in app._notifications)


@pilot_test
async def test_help_screen_lists_every_binding():
    app = CsmChatApp(_Settings(), pipeline_factory=_broken_pipeline, personas=lambda: [])
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("f1")
        await pilot.pause()
        shown = {row[1] for row in app.screen.rows}
        for binding in app.BINDINGS:
            assert binding.description in shown
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is app.screen_stack[0]


@pilot_test
async def test_turn_view_shows_injected_markup_literally():
    app = CsmChatApp(_Settings(), pipeline_factory=_broken_pipeline, personas=lambda: [])
    async with app.run_test(size=(100, 30)) as pilot:
        transcript = app.query_one(Transcript)
        transcript.add_agent_sentence(7, INJECTION)
        await pilot.pause()
        view = transcript.turns[-1]
        assert view.plain == "Agent: [bold red]x[/] \u241b[31m"
        rendered = view.render()
        assert "\x1b" not in str(rendered) and "[bold red]x[/]" in str(rendered)
        assert isinstance(app.query_one(MicMeter), MicMeter)
        assert isinstance(view, TurnView)
