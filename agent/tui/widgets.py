"""Widgets of the csm-chat main screen. Each one owns its state; the app only feeds it events."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import ProgressBar, Static

from agent.events import AgentState, TurnLatency
from agent.tui.text import literal

METER_FLOOR_DBFS = -60.0  # the meter is empty at this level and full at 0 dBFS


class StateIndicator(Static):
    """The agent's state as a coloured label: listening, hearing you, thinking, ..."""

    def __init__(self, state: AgentState = AgentState.LOADING, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state: AgentState = state
        self.history: list[AgentState] = []  # every state shown, in order (tests read it)

    def on_mount(self) -> None:
        self.show_state(self.state)

    def show_state(self, state: AgentState) -> None:
        self.remove_class(f"state-{self.state.name.lower()}")
        self.state = state
        self.history.append(state)
        self.add_class(f"state-{state.name.lower()}")
        self.update(Text(f"\u25cf {state.value}"))


def meter_cells(rms_dbfs: float, width: int = 20) -> int:
    """How many of `width` cells a level in dBFS fills (-60 dBFS none, 0 dBFS all)."""
    clamped = max(METER_FLOOR_DBFS, min(0.0, rms_dbfs))
    return round((clamped - METER_FLOOR_DBFS) / -METER_FLOOR_DBFS * width)


class MicMeter(Static):
    """Live microphone level, or why there is none (muted, no microphone)."""

    COMPONENT_CLASSES = {"mic-meter--level", "mic-meter--empty"}
    WIDTH_CELLS = 20

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rms_dbfs: float | None = None
        self.muted = False
        self.unavailable = False

    def on_mount(self) -> None:
        self._render_level()

    def set_level(self, rms_dbfs: float) -> None:
        self.rms_dbfs = rms_dbfs
        self.unavailable = False
        self._render_level()

    def set_muted(self, muted: bool) -> None:
        self.muted = muted
        self.set_class(muted, "-muted")
        self._render_level()

    def set_unavailable(self) -> None:
        self.unavailable = True
        self.add_class("-unavailable")
        self._render_level()

    def _render_level(self) -> None:
        label = Text("mic ")
        if self.unavailable:
            label.append("no microphone (type below)", style="bold")
        elif self.muted:
            label.append("muted", style="bold")
        elif self.rms_dbfs is None:
            label.append("\u2591" * self.WIDTH_CELLS, self.get_component_rich_style("mic-meter--empty"))
            label.append("    -- dBFS")
        else:
            filled = meter_cells(self.rms_dbfs, self.WIDTH_CELLS)
            label.append("\u2588" * filled, self.get_component_rich_style("mic-meter--level"))
            label.append(
                "\u2591" * (self.WIDTH_CELLS - filled),
                self.get_component_rich_style("mic-meter--empty"),
            )
            label.append(f" {self.rms_dbfs:5.0f} dBFS")
        self.update(label)


class TurnView(Static):
    """One turn of the conversation: who spoke and what was said (shown literally)."""

    COMPONENT_CLASSES = {"turn-view--speaker", "turn-view--interrupted"}
    SPEAKERS = {"user": "You", "agent": "Agent", "partial": "You (speaking)", "tool": "Tool"}

    def __init__(self, role: str, text: str = "", **kwargs) -> None:
        super().__init__(classes=f"turn {role}", **kwargs)
        self.role = role
        self.text = text
        self.interrupted = False
        self.done = role == "user"  # an agent turn is done when the pipeline says so

    def on_mount(self) -> None:
        self._refresh_text()

    def set_text(self, text: str, *, interrupted: bool = False) -> None:
        self.text = text
        self.interrupted = interrupted
        self.set_class(interrupted, "-interrupted")
        self._refresh_text()

    @property
    def plain(self) -> str:
        """What the turn shows, as plain text."""
        return self._content().plain

    def _content(self, styled: bool = False) -> Text:
        style = self.get_component_rich_style if styled else (lambda name: "")
        content = Text(f"{self.SPEAKERS[self.role]}: ", style=style("turn-view--speaker"))
        content.append_text(literal(self.text))
        if self.interrupted:
            content.append("  (interrupted)", style=style("turn-view--interrupted"))
        return content

    def _refresh_text(self) -> None:
        self.update(self._content(styled=True))


class Transcript(VerticalScroll):
    """The conversation so far, with the user's words appearing while they speak."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._user_turns: dict[int, TurnView] = {}
        self._agent_turns: dict[int, TurnView] = {}
        self._tool_calls: dict[tuple[int, str], TurnView] = {}
        self._partial = TurnView("partial", id="partial")

    def compose(self) -> ComposeResult:
        yield self._partial

    def on_mount(self) -> None:
        self._partial.display = False

    @property
    def turns(self) -> list[TurnView]:
        """The finished and in-progress turns in screen order (without the partial line)."""
        return [view for view in self.query(TurnView) if view.role != "partial"]

    def show_partial(self, text: str) -> None:
        self._partial.set_text(text)
        self._partial.display = bool(text)
        self.scroll_end(animate=False)

    def add_user_turn(self, turn_id: int, text: str) -> None:
        self.show_partial("")
        view = self._user_turns.get(turn_id)
        if view is None:
            view = self._user_turns[turn_id] = TurnView("user", text)
            self.mount(view, before=self._partial)
        else:
            view.set_text(text)
        self.scroll_end(animate=False)

    def add_agent_sentence(self, turn_id: int, sentence: str) -> None:
        view = self._agent_turns.get(turn_id)
        if view is None:
            self._agent_turns[turn_id] = TurnView("agent", sentence)
            self.mount(self._agent_turns[turn_id], before=self._partial)
        else:
            joined = f"{view.text} {sentence}" if view.text else sentence
            view.set_text(joined)
        self.scroll_end(animate=False)

    def show_tool(self, turn_id: int, call: str, output: str | None, ok: bool) -> None:
        """A tool call of reply ``turn_id``: shown when it starts, then with its result."""
        text = call if output is None else f"{call} -> {'' if ok else 'error: '}{' '.join(output.split())[:300]}"
        key = (turn_id, call)
        view = self._tool_calls.get(key)
        if view is None:
            view = self._tool_calls[key] = TurnView("tool", text)
            self.mount(view, before=self._agent_turns.get(turn_id, self._partial))
        else:
            view.set_text(text)
        self.scroll_end(animate=False)

    def finish_agent_turn(self, turn_id: int, text: str, interrupted: bool) -> None:
        view = self._agent_turns.get(turn_id)
        if view is None:
            view = self._agent_turns[turn_id] = TurnView("agent", text)
            self.mount(view, before=self._partial)
        view.done = True
        view.set_text(text, interrupted=interrupted)
        self.scroll_end(animate=False)


def _ms(value: float | None) -> str:
    return "  --" if value is None else f"{value:4.0f}"


class LatencyPanel(Static):
    """Per-turn latencies from the end of the user's speech, newest last, and playback gaps.

    Columns (ms after the end of speech): ``end`` the turn judged over, ``asr`` the transcript,
    ``llm`` the LLM's first token, ``play`` the first audio played; ``gaps``: times playback ran
    dry inside a sentence.
    """

    MAX_ROWS = 12

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.latencies: dict[int, TurnLatency] = {}

    def on_mount(self) -> None:
        self.border_title = "latency (ms)"
        self._refresh_rows()

    def add(self, latency: TurnLatency) -> None:
        self.latencies[latency.turn_id] = latency
        self._refresh_rows()

    def _refresh_rows(self) -> None:
        rows = Text(" ".join(f"{h:>4}" for h in ("turn", "end", "asr", "llm", "play", "gaps")) + "\n", style="bold")
        for turn_id in sorted(self.latencies)[-self.MAX_ROWS :]:
            lat = self.latencies[turn_id]
            rows.append(
                f"{turn_id:4d} {_ms(lat.turn_end_ms)} {_ms(lat.transcript_ms)} {_ms(lat.first_token_ms)} "
                f"{_ms(lat.first_audio_ms)} {lat.underruns:4d}\n",
                style="bold red" if lat.underruns else "",
            )
        if not self.latencies:
            rows.append("no turns yet", style="dim")
        rows.rstrip()
        self.update(rows)


class LoadPanel(Vertical):
    """Model loading progress, one line per stage; hides itself once everything is ready."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stages: dict[str, bool] = {}

    def compose(self) -> ComposeResult:
        yield Static(Text("Starting..."), id="load-stages")
        yield ProgressBar(total=None, show_eta=False, id="load-bar")

    def update_stage(self, stage: str, done: bool) -> None:
        self.stages[stage] = done
        line = Text("Loading models: ")
        for name, ready in self.stages.items():
            line.append_text(literal(name))
            line.append(" \u2713  " if ready else " ...  ", style="bold" if ready else "dim")
        self.query_one("#load-stages", Static).update(line)
        bar = self.query_one("#load-bar", ProgressBar)
        bar.update(total=len(self.stages), progress=sum(self.stages.values()))

    def finish(self) -> None:
        """Loading is over (the pipeline left the loading state): hide the panel."""
        self.display = False
