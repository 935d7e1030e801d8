"""Modal screens: help (generated from the app's bindings) and settings (devices, persona)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Select, Static

from agent.tui.text import literal

DEFAULT_DEVICE = "(system default)"


class HelpScreen(ModalScreen[None]):
    """Every key of the main screen and what it does; built from BINDINGS so it stays true."""

    BINDINGS = [
        Binding("escape,f1,q", "dismiss", "Close", tooltip="Close the help screen."),
    ]

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        table.add_column("Key", no_wrap=True)
        table.add_column("Action", no_wrap=True)
        table.add_column("What it does")
        for key, name, detail in self.rows:
            table.add_row(Text(key), Text(name), Text(detail))
        with Vertical(id="help-dialog"):
            yield Label("csm-chat keys", id="help-title")
            yield Static(table, id="help-table")
            yield Static(
                "Hands-free mode listens all the time and answers when you pause. "
                "Speaking while the agent talks interrupts it (barge-in).",
                id="help-note",
            )
            yield Label("escape / F1: close", id="help-close")


@dataclass
class SettingsChoice:
    """What the settings screen returns; None for a device means the system default."""

    input_device: str | None
    output_device: str | None
    persona: str


class SettingsScreen(ModalScreen[SettingsChoice | None]):
    """Pick the microphone, the speaker and the persona."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", tooltip="Close without changes.")]

    def __init__(
        self,
        current: SettingsChoice,
        *,
        inputs: list[str],
        outputs: list[str],
        personas: list[str],
    ) -> None:
        super().__init__()
        self.current = current
        self.inputs = inputs
        self.outputs = outputs
        self.personas = personas

    def compose(self) -> ComposeResult:
        with Vertical(id="settings-dialog"):
            yield Label("Settings", id="settings-title")
            yield Label("Input device (microphone)")
            yield Select(
                _options([DEFAULT_DEVICE, *self.inputs]),
                value=self.current.input_device or DEFAULT_DEVICE,
                allow_blank=False,
                id="input-device",
            )
            yield Label("Output device (speaker)")
            yield Select(
                _options([DEFAULT_DEVICE, *self.outputs]),
                value=self.current.output_device or DEFAULT_DEVICE,
                allow_blank=False,
                id="output-device",
            )
            yield Label("Persona")
            personas = self.personas or [self.current.persona]
            if self.current.persona not in personas:
                personas = [self.current.persona, *personas]
            yield Select(
                _options(personas), value=self.current.persona, allow_blank=False, id="persona"
            )
            with Horizontal(id="settings-buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    @on(Button.Pressed, "#apply")
    def _apply(self) -> None:
        def chosen(select_id: str) -> str | None:
            value = self.query_one(f"#{select_id}", Select).value
            return None if value in (DEFAULT_DEVICE, Select.BLANK) else str(value)

        self.dismiss(
            SettingsChoice(
                input_device=chosen("input-device"),
                output_device=chosen("output-device"),
                persona=chosen("persona") or self.current.persona,
            )
        )

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


def _options(names: list[str]) -> list[tuple[Text, str]]:
    # Device names come from the OS and persona names from files: shown literally.
    return [(literal(name), name) for name in dict.fromkeys(names)]
