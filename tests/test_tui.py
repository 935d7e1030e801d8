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

from agent.config.settings import AgentSettings  # noqa: E402
from agent.errors import AgentError  # noqa: E402
from agent.events import AgentState, AgentText, AgentTurnDone  # noqa: E402
from agent.tui.app import CsmChatApp  # noqa: E402
from agent.tui.text import literal, visible_controls  # noqa: E402
from agent.tui.widgets import LatencyPanel, MicMeter, StateIndicator, Transcript, TurnView  # noqa: E402

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


def _broken_pipeline(settings, emit):
    raise AgentError("Unknown LLM 'nope': pass --llm-model PATH to a .gguf file.")


@pilot_test
async def test_pipeline_error_is_a_notification_and_the_app_stays_up():
    app = CsmChatApp(AgentSettings(), pipeline_factory=_broken_pipeline, personas=lambda: [])
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
    app = CsmChatApp(AgentSettings(), pipeline_factory=_broken_pipeline, personas=lambda: [])
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
    app = CsmChatApp(AgentSettings(), pipeline_factory=_broken_pipeline, personas=lambda: [])
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


# ---- a whole exchange through the real pipeline ----------------------------------------------

E2E_TIMEOUT_S = 120.0


def _real_settings(tmp_path, tiny_checkpoint, mic_file=None, max_audio_ms=480):
    return AgentSettings(
        csm_model=str(tiny_checkpoint),
        mic_file=str(mic_file) if mic_file else None,
        speaker_file=str(tmp_path / "agent.wav"),
        save_dir=str(tmp_path / "saved"),
        mode="vad",
        seed=0,
        max_audio_ms=max_audio_ms,
        watermark=False,  # the watermark needs silentcipher weights; not what these tests are about
        turn="silence",  # nor is judging turns
    )


async def _wait_until(pilot, condition, what: str, timeout_s: float = E2E_TIMEOUT_S) -> None:
    """Let the app run until condition() holds; fail naming what never happened."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            history = pilot.app.query_one(StateIndicator).history
            raise AssertionError(f"timed out waiting for {what}; states shown: {[s.value for s in history]}")
        await pilot.pause(0.1)


def _is_subsequence(wanted, seen) -> bool:
    remaining = iter(seen)
    return all(any(item == step for item in remaining) for step in wanted)


def _turns(app, role):
    return [view for view in app.query_one(Transcript).turns if view.role == role]


def _agent_done(app) -> bool:
    return any(view.done for view in _turns(app, "agent"))


def _state(app) -> AgentState:
    return app.query_one(StateIndicator).state


@pytest.mark.e2e
@pilot_test
async def test_spoken_exchange_shows_both_turns_and_the_state_cycle(tmp_path, tiny_checkpoint, espeak_speech_wav):
    app = CsmChatApp(_real_settings(tmp_path, tiny_checkpoint, mic_file=espeak_speech_wav))
    async with app.run_test(size=(120, 36)) as pilot:
        await _wait_until(
            pilot, lambda: _agent_done(app) and _state(app) == AgentState.LISTENING, "a finished agent turn"
        )
        heard = " ".join(view.text for view in _turns(app, "user")).lower()
        assert any(word in heard for word in ("hello", "test", "voice")), heard
        assert _turns(app, "agent")[0].text.strip()
        history = app.query_one(StateIndicator).history
        cycle = [
            AgentState.LISTENING,
            AgentState.HEARING,
            AgentState.TRANSCRIBING,
            AgentState.THINKING,
            AgentState.SPEAKING,
            AgentState.LISTENING,
        ]
        assert _is_subsequence(cycle, history), [s.value for s in history]
        assert app.query_one(LatencyPanel).latencies  # the turn's latencies were shown


@pytest.mark.e2e
@pilot_test
async def test_typed_message_with_markup_is_sent_and_shown_literally(tmp_path, tiny_checkpoint):
    app = CsmChatApp(_real_settings(tmp_path, tiny_checkpoint))
    async with app.run_test(size=(120, 36)) as pilot:
        await _wait_until(pilot, lambda: _state(app) == AgentState.LISTENING, "the models to load")
        box = app.query_one("#message", Input)
        await pilot.press(*"[bold red]x[/] ")
        box.insert_text_at_cursor("\x1b[31m")  # an escape code can only arrive pasted
        await pilot.press("enter")
        await _wait_until(pilot, lambda: bool(_turns(app, "agent")), "the reply to a typed message")
        (user,) = _turns(app, "user")
        assert user.text == "[bold red]x[/] \x1b[31m"
        assert user.plain == "You: [bold red]x[/] \u241b[31m"
        assert "[bold red]x[/]" in str(user.render())

        # SmolLM2 will not write markup on demand: a reply carrying some arrives as events.
        app._emit(AgentText(99, INJECTION))
        app._emit(AgentTurnDone(99, INJECTION, interrupted=False))
        await pilot.pause()
        reply = _turns(app, "agent")[-1]
        assert reply.plain == "Agent: [bold red]x[/] \u241b[31m"
        rendered = str(reply.render())
        assert "\x1b" not in rendered and "[bold red]x[/]" in rendered


@pytest.mark.e2e
@pilot_test
async def test_interrupt_key_stops_the_agent_speaking(tmp_path, tiny_checkpoint):
    # A random tiny CSM rarely ends a sentence by itself: with a long cap it speaks until stopped.
    app = CsmChatApp(_real_settings(tmp_path, tiny_checkpoint, max_audio_ms=60_000))
    async with app.run_test(size=(120, 36)) as pilot:
        await _wait_until(pilot, lambda: _state(app) == AgentState.LISTENING, "the models to load")
        await pilot.press(*"tell me a story", "enter")
        await _wait_until(pilot, lambda: _state(app) == AgentState.SPEAKING, "the agent to speak")
        await pilot.press("escape")
        await _wait_until(pilot, lambda: _agent_done(app), "the interrupted turn to end", timeout_s=10)
        (reply,) = _turns(app, "agent")
        assert reply.interrupted and reply.plain.endswith("(interrupted)")
        await _wait_until(pilot, lambda: _state(app) == AgentState.LISTENING, "listening again", timeout_s=10)
