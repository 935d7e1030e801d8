"""csm-chat's Textual app: shows the conversation and drives the pipeline by keys.

The pipeline runs its stages on its own threads and reports through `emit`; every event
becomes a message posted to the app (post_message is thread-safe, see `agent.tui.messages`),
so widgets only ever change on the event loop; one table says what each event changes. Every
pipeline call that may touch a model or wait on a thread (start, stop, submit_text, set_persona, save,
replay_last) runs in a thread worker; the cheap flag setters (interrupt, mute, mode, push-to-talk) are called
directly so they take effect at once and in key order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from contextlib import suppress

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static

from agent.audio import list_devices
from agent.config.personas import list_personas
from agent.config.settings import AgentSettings
from agent.errors import AgentError
from agent.events import (
    AgentState,
    AgentText,
    AgentTurnDone,
    AudioSetup,
    Event,
    LoadProgress,
    MicLevel,
    Notice,
    PartialTranscript,
    StateChanged,
    ToolUse,
    TurnLatency,
    UserTurn,
)
from agent.pipeline import Pipeline
from agent.tui.logs import NoticeHandler
from agent.tui.messages import MicLevelChanged, PipelineEvent, PipelineFactory, PipelineLike
from agent.tui.screens import HelpScreen, SettingsChoice, SettingsScreen
from agent.tui.text import visible_controls
from agent.tui.widgets import LatencyPanel, LoadPanel, MicMeter, StateIndicator, Transcript

log = logging.getLogger(__name__)
MODE_LABELS = {"vad": "hands-free", "ptt": "push-to-talk"}
SEVERITIES = {"info": "information", "warning": "warning", "error": "error"}
STOP_TIMEOUT_S = 10.0


class CsmChatApp(App):
    """The csm-chat voice conversation in the terminal."""

    CSS_PATH = "app.tcss"
    TITLE = "csm-chat"

    # Function keys and ctrl chords so that none of them is swallowed by the text input.
    BINDINGS = [
        Binding("f1", "help", "Help", tooltip="Show this help screen."),
        Binding(
            "f2",
            "talk",
            "Talk",
            tooltip="Push-to-talk: press once to start speaking, again to stop "
            "(terminals do not report key release). Switches to push-to-talk mode.",
        ),
        Binding("f3", "toggle_mode", "Mode", tooltip="Switch hands-free (VAD) / push-to-talk."),
        Binding("escape", "interrupt", "Interrupt", tooltip="Stop the agent speaking now."),
        Binding("f4", "toggle_mute", "Mute", tooltip="Mute or unmute the microphone."),
        Binding("f5", "replay", "Replay", tooltip="Speak the last agent turn again."),
        Binding("f6", "persona", "Persona", tooltip="Switch to another persona (voice + prompt)."),
        Binding("f7", "settings", "Settings", tooltip="Input/output device and persona."),
        Binding("ctrl+s", "save", "Save", tooltip="Save the conversation (transcript + audio)."),
        Binding("ctrl+q", "quit", "Quit", tooltip="Stop the pipeline and quit.", priority=True),
    ]

    def __init__(
        self,
        settings: AgentSettings,
        *,
        pipeline_factory: PipelineFactory | None = None,
        personas: Callable[[], list[str]] | None = None,
        devices: Callable[[], tuple[list[str], list[str]]] | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self._pipeline_factory = pipeline_factory or Pipeline
        self._list_personas = personas or _installed_personas
        self._list_devices = devices or _audio_devices
        self.pipeline: PipelineLike | None = None
        self.mode = settings.mode
        self.persona = settings.persona or "default"
        self.muted = False
        self.talking = False  # push-to-talk pressed and not yet released
        self.notices: list[Notice] = []  # every Notice received, in order
        self.audio_setup: AudioSetup | None = None  # echo cancellation / room, once the mic is open
        self._handlers = self._event_handlers()
        self._log_notices: NoticeHandler | None = None

    # ---- layout -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(icon="")
        with Horizontal(id="status-bar"):
            yield StateIndicator(id="state")
            yield Static(id="mode")
            yield MicMeter(id="mic")
        yield LoadPanel(id="loading")
        with Horizontal(id="body"):
            yield Transcript(id="transcript")
            yield LatencyPanel(id="latency")
        yield Input(placeholder="Type a message and press Enter", id="message")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"persona: {self.persona}"
        self._show_mode()
        self.query_one("#message", Input).focus()
        self._log_notices = NoticeHandler(self._emit).install()  # warnings from any thread, as notices
        try:
            self.pipeline = self._pipeline_factory(self.settings, self._emit)
        except AgentError as exc:
            self.notify(str(exc), severity="error", markup=False, timeout=30)
            self.query_one(LoadPanel).finish()
            return
        self._start_pipeline()

    async def on_unmount(self) -> None:
        if self._log_notices is not None:
            self._log_notices.remove()
        if self.pipeline is not None:
            pipeline, self.pipeline = self.pipeline, None
            try:
                await asyncio.wait_for(asyncio.to_thread(pipeline.stop), STOP_TIMEOUT_S)
            except (TimeoutError, AgentError):  # quitting anyway: a stuck thread must not keep the terminal
                log.warning("the pipeline did not stop cleanly", exc_info=True)

    # ---- pipeline -> screen ---------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        """Called by pipeline threads: hand the event to the event loop."""
        self.post_message(MicLevelChanged(event) if isinstance(event, MicLevel) else PipelineEvent(event))

    def on_mic_level_changed(self, message: MicLevelChanged) -> None:
        with suppress(NoMatches):  # the app is closing: its widgets are gone before the pipeline's last events
            self.query_one(MicMeter).set_level(message.level.rms_dbfs)

    def on_pipeline_event(self, message: PipelineEvent) -> None:
        try:
            self._handlers[type(message.event)](message.event)
        except NoMatches:  # the app is closing: the pipeline's last events find no widgets to change
            log.debug("%s after the screen was taken down: not shown", type(message.event).__name__)

    def _event_handlers(self) -> dict[type, Callable]:
        """What each kind of pipeline event changes on screen (run on the event loop)."""
        return {
            StateChanged: self._show_state,
            PartialTranscript: lambda e: self.query_one(Transcript).show_partial(e.text),
            UserTurn: lambda e: self.query_one(Transcript).add_user_turn(e.turn_id, e.text),
            AgentText: lambda e: self.query_one(Transcript).add_agent_sentence(e.turn_id, e.text),
            AgentTurnDone: lambda e: self.query_one(Transcript).finish_agent_turn(e.turn_id, e.text, e.interrupted),
            TurnLatency: lambda e: self.query_one(LatencyPanel).add(e),
            LoadProgress: lambda e: self.query_one(LoadPanel).update_stage(e.stage, e.done),
            Notice: self._show_notice,
            AudioSetup: self._show_audio_setup,
            ToolUse: lambda e: self.query_one(Transcript).show_tool(e.turn_id, e.call, e.output, e.ok),
        }

    def _show_audio_setup(self, setup: AudioSetup) -> None:
        self.audio_setup = setup
        self._show_mode()

    def _show_state(self, event: StateChanged) -> None:
        indicator = self.query_one(StateIndicator)
        if event.state != indicator.state or not indicator.history:
            indicator.show_state(event.state)
        if event.state != AgentState.LOADING:
            self.query_one(LoadPanel).finish()

    def _show_notice(self, notice: Notice) -> None:
        self.notices.append(notice)
        if "microphone" in notice.message.lower() and notice.level != "info":
            self.query_one(MicMeter).set_unavailable()
        severity = SEVERITIES.get(notice.level, "information")
        timeout = 30 if severity == "error" else 12 if severity == "warning" else None
        self.notify(visible_controls(notice.message), severity=severity, markup=False, timeout=timeout)

    # ---- workers: every call that may block --------------------------------------------

    @work(thread=True, group="pipeline", exit_on_error=False)
    def _start_pipeline(self) -> None:
        self._call_safely(lambda pipeline: pipeline.start())

    @work(thread=True, group="pipeline", exit_on_error=False)
    def _submit_text(self, text: str) -> None:
        self._call_safely(lambda pipeline: pipeline.submit_text(text))

    @work(thread=True, group="pipeline", exit_on_error=False)
    def _set_persona(self, name: str) -> None:
        if self._call_safely(lambda pipeline: pipeline.set_persona(name)):
            self.call_from_thread(self._persona_switched, name)

    @work(thread=True, group="pipeline", exit_on_error=False)
    def _save(self) -> None:
        saved = self._call_safely(lambda pipeline: pipeline.save())
        if saved:
            self.call_from_thread(
                self.notify, f"Conversation saved to {saved}", markup=False, title="Saved"
            )

    @work(thread=True, group="pipeline", exit_on_error=False)
    def _replay(self) -> None:
        self._call_safely(lambda pipeline: pipeline.replay_last())

    def _call_safely(self, call: Callable[[PipelineLike], object]) -> object:
        """Run call(pipeline) on a worker thread; a user-facing error becomes a notification."""
        pipeline = self.pipeline
        if pipeline is None:
            self.call_from_thread(
                self.notify, "The pipeline is not running (see the error above).", severity="error"
            )
            return None
        try:
            return call(pipeline) or True
        except AgentError as exc:
            self.call_from_thread(self.notify, str(exc), severity="error", markup=False, timeout=30)
            return None

    def _call_now(self, call: Callable[[PipelineLike], None]) -> bool:
        """Run a cheap flag-setting call on the event loop; False when there is no pipeline."""
        if self.pipeline is None:
            self.notify("The pipeline is not running (see the error above).", severity="error")
            return False
        try:
            call(self.pipeline)
        except AgentError as exc:
            self.notify(str(exc), severity="error", markup=False, timeout=30)
            return False
        return True

    # ---- keys -------------------------------------------------------------------------------

    @on(Input.Submitted, "#message")
    def _send_typed_message(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        event.input.clear()
        if text:
            self._submit_text(text)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self._help_rows()))

    def action_talk(self) -> None:
        if self.mode != "ptt":
            self._set_mode("ptt")
        pressed = not self.talking
        if self._call_now(lambda pipeline: pipeline.push_to_talk(pressed)):
            self.talking = pressed
            self._show_mode()

    def action_toggle_mode(self) -> None:
        self._set_mode("vad" if self.mode == "ptt" else "ptt")

    def _set_mode(self, mode: str) -> None:
        if self.talking:
            self._call_now(lambda pipeline: pipeline.push_to_talk(False))
            self.talking = False
        if self._call_now(lambda pipeline: pipeline.set_mode(mode)):
            self.mode = mode
        self._show_mode()

    def action_interrupt(self) -> None:
        self._call_now(lambda pipeline: pipeline.interrupt())

    def action_toggle_mute(self) -> None:
        muted = not self.muted
        if self._call_now(lambda pipeline: pipeline.set_muted(muted)):
            self.muted = muted
            self.query_one(MicMeter).set_muted(muted)

    def action_replay(self) -> None:
        self._replay()

    def action_save(self) -> None:
        self._save()

    def action_persona(self) -> None:
        """Switch to the next installed persona (F7 or the command palette picks one by name)."""
        names = self._list_personas()
        if not names:
            self.notify("No personas found: add a persona file to prompts/.", severity="warning")
            return
        following = names[(names.index(self.persona) + 1) % len(names)] if self.persona in names else names[0]
        self._set_persona(following)

    def action_settings(self) -> None:
        self._open_settings()

    @work(thread=True, exclusive=True, group="settings", exit_on_error=False)
    def _open_settings(self) -> None:
        # Listing audio devices asks PortAudio, which can be slow: do it off the event loop.
        inputs, outputs = self._list_devices()
        personas = self._list_personas()
        current = SettingsChoice(
            input_device=_device_name(self.settings.input_device),
            output_device=_device_name(self.settings.output_device),
            persona=self.persona,
        )
        screen = SettingsScreen(current, inputs=inputs, outputs=outputs, personas=personas)
        self.call_from_thread(self.push_screen, screen, self._apply_settings)

    def _apply_settings(self, choice: SettingsChoice | None) -> None:
        if choice is None:
            return
        if choice.persona and choice.persona != self.persona:
            self._set_persona(choice.persona)
        current = {"input_device": _device_name(self.settings.input_device),
                   "output_device": _device_name(self.settings.output_device)}
        chosen = {"input_device": choice.input_device, "output_device": choice.output_device}
        changed = {name: value for name, value in chosen.items() if value != current[name]}
        if changed:
            self.settings = self.settings.with_changes(**changed)
            self.notify(
                "Audio devices saved in this session's settings; restart csm-chat to use them.",
                title="Devices",
            )

    def _persona_switched(self, name: str) -> None:
        self.persona = name
        self.sub_title = f"persona: {name}"
        self.notify(f"Persona: {name}", markup=False)

    def _show_mode(self) -> None:
        label = f"mode: {MODE_LABELS.get(self.mode, self.mode)}"
        if self.mode == "ptt":
            label += "  (F2: stop talking)" if self.talking else "  (F2: talk)"
        if self.audio_setup is not None:
            label += "  echo cancel: " + ("on" if self.audio_setup.echo_cancellation else "off")
            if self.audio_setup.room:
                label += f"  room: {self.audio_setup.room}"
        mode = self.query_one("#mode", Static)
        mode.update(label)
        mode.set_class(self.talking, "-talking")

    # ---- help and command palette ----------------------------------------------------------

    def _help_rows(self) -> list[tuple[str, str, str]]:
        """(key, name, what it does) for every binding the user can press, from BINDINGS."""
        rows = []
        for binding in Binding.make_bindings(self.BINDINGS):
            rows.append((self.get_key_display(binding), binding.description, binding.tooltip))
        palette = Binding(self.COMMAND_PALETTE_BINDING, "command_palette", "Commands")
        rows.append(
            (self.get_key_display(palette), "Commands", "Command palette: persona, devices, save, replay.")
        )
        rows.append(("enter", "Send", "Send the typed message (same path as speech)."))
        return rows

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Settings", "Input/output device and persona", self.action_settings)
        yield SystemCommand("Input device", "Choose the microphone", self.action_settings)
        yield SystemCommand("Output device", "Choose the speaker", self.action_settings)
        for name in self._list_personas():
            yield SystemCommand(
                f"Persona: {name}", f"Switch to the {name} persona", lambda n=name: self._set_persona(n)
            )
        yield SystemCommand("Save conversation", "Transcript + audio to disk", self.action_save)
        yield SystemCommand("Replay last turn", "Speak the last agent turn again", self.action_replay)
        yield SystemCommand("Toggle hands-free", "Hands-free (VAD) / push-to-talk", self.action_toggle_mode)
        yield SystemCommand("Help", "Keys and what they do", self.action_help)


def _device_name(device: object) -> str | None:
    return None if device in (None, "") else str(device)


def _installed_personas() -> list[str]:
    return list(list_personas())


def _audio_devices() -> tuple[list[str], list[str]]:
    return list_devices()


def run_app(settings: AgentSettings) -> None:
    """Run the TUI until the user quits."""
    CsmChatApp(settings).run()
