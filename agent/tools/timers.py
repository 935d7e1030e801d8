"""Timers and reminders that outlive the process, and the scheduler that says when one is due.

Timers live in ``timers.json`` in the user's data directory (plain JSON, rewritten atomically on
every change), so one set before a restart is still there after it; the scheduler fires those
that came due while csm-chat was not running as soon as it starts (marked ``late``). A file that
cannot be read is moved aside (``timers.json.corrupt-<time>``) with one notice, and an empty
list starts; nothing is deleted.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import platformdirs

from agent.tools.registry import Tool, ToolError
from csm_engine.files import write_text_atomic

log = logging.getLogger(__name__)

Notice = Callable[[str, str], None]  # (level, message)
KEEP_FIRED_S = 24 * 3600  # fired timers stay listed (for "did my timer go off?") this long
LATE_S = 5.0  # fired more than this after it was due: it came due while csm-chat was not running
MAX_TIMER_S = 7 * 24 * 3600


def default_timer_path() -> Path:
    return Path(platformdirs.user_data_dir("csm-chat")) / "timers.json"


@dataclass
class Timer:
    """A countdown (``kind`` "timer") or a reminder at a time; times are wall-clock seconds."""

    id: int
    kind: str
    label: str
    due_at: float
    created_at: float
    fired_at: float | None = None

    def announcement(self, late: bool = False) -> str:
        """What the agent says when it is due (short: it interrupts nobody for long)."""
        if self.kind == "reminder":
            text = f"Reminder: {self.label}." if self.label else "This is your reminder."
        else:
            length = spoken_duration(self.due_at - self.created_at, adjective=True)
            what = f"Your {self.label} timer" if self.label else f"Your {length} timer"
            text = f"{what} is done."
        if late:
            text += f" It was due at {datetime.fromtimestamp(self.due_at).strftime('%H:%M')}, while I was off."
        return text


def spoken_duration(seconds: float, adjective: bool = False) -> str:
    """125 -> '2 minutes 5 seconds'; as an adjective ("your 10 minute timer") the units stay singular."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n} {unit}{'' if adjective or n == 1 else 's'}"
             for n, unit in ((hours, "hour"), (minutes, "minute"), (secs, "second")) if n]
    return " ".join(parts) or ("0 second" if adjective else "0 seconds")


class TimerStore:
    """The timers on disk (thread-safe); every change is written at once."""

    def __init__(self, path: Path | None = None, notice: Notice | None = None) -> None:
        self.path = Path(path) if path is not None else default_timer_path()
        self._notice = notice if notice is not None else (lambda level, message: None)
        self._lock = threading.RLock()
        self._timers: list[Timer] = self._load()

    def _load(self) -> list[Timer]:
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            timers = [Timer(**{k: item[k] for k in ("id", "kind", "label", "due_at", "created_at", "fired_at")})
                      for item in data["timers"]]
            for timer in timers:
                if timer.kind not in ("timer", "reminder") or not isinstance(timer.due_at, (int, float)):
                    raise ValueError(f"bad timer {timer}")
            return timers
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            try:
                self.path.replace(aside)
                where = f"moved to {aside}"
            except OSError:
                where = "left in place"
            self._notice("warning", f"timers file {self.path} could not be read ({' '.join(str(error).split())[:80]}); "
                                    f"{where}, starting with no timers")
            return []

    def _save(self) -> None:
        cutoff = time.time() - KEEP_FIRED_S
        self._timers = [t for t in self._timers if t.fired_at is None or t.fired_at > cutoff]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({"timers": [asdict(t) for t in self._timers]}, indent=1))

    def add(self, kind: str, label: str, due_at: float, now: float | None = None) -> Timer:
        with self._lock:
            timer = Timer(max((t.id for t in self._timers), default=0) + 1, kind, label.strip(), float(due_at),
                          float(now if now is not None else time.time()))
            self._timers.append(timer)
            self._save()
            return timer

    def pending(self) -> list[Timer]:
        """Timers not yet fired, soonest first."""
        with self._lock:
            return sorted((t for t in self._timers if t.fired_at is None), key=lambda t: t.due_at)

    def mark_fired(self, timer_id: int, at: float | None = None) -> None:
        with self._lock:
            for timer in self._timers:
                if timer.id == timer_id:
                    timer.fired_at = at if at is not None else time.time()
            self._save()

    def cancel(self, which: str | int | None) -> list[Timer]:
        """Cancel pending timers matching an id or a word of the label (None/'all': every one)."""
        with self._lock:
            pending = [t for t in self._timers if t.fired_at is None]
            key = str(which).strip().lower() if which is not None else "all"
            if key in ("", "all", "every", "everything"):
                chosen = pending
            else:
                chosen = [t for t in pending if str(t.id) == key or (t.label and key in t.label.lower())]
                if not chosen and len(pending) == 1:
                    chosen = pending  # "cancel the timer" with one running
            self._timers = [t for t in self._timers if t not in chosen]
            if chosen:
                self._save()
            return chosen


class TimerScheduler:
    """Calls ``on_due(timer, late)`` on its own thread when each pending timer comes due."""

    def __init__(self, store: TimerStore, on_due: Callable[[Timer, bool], None]) -> None:
        self.store = store
        self.on_due = on_due
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="csm-chat-timers", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """A timer was added or cancelled: look again at what is next."""
        with self._changed:
            self._changed.notify_all()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _loop(self) -> None:
        while True:
            with self._changed:
                if self._stopping:
                    return
                pending = self.store.pending()
                now = time.time()
                due = [t for t in pending if t.due_at <= now]
                if not due:
                    wait = min((t.due_at - now for t in pending), default=3600.0)
                    self._changed.wait(timeout=min(max(wait, 0.01), 3600.0))
                    continue
            for timer in due:
                late = now - timer.due_at > LATE_S
                self.store.mark_fired(timer.id, now)
                try:
                    self.on_due(timer, late)
                except Exception:  # the announcer's bug must not stop the other timers
                    log.exception("announcing timer %s failed", timer.id)


# ---------------------------------------------------------------------------------- the tools


def _number(arguments: dict[str, Any], key: str) -> float:
    value = arguments.get(key) or 0
    if isinstance(value, str):
        value = value.strip() or "0"
        try:
            value = float(value)
        except ValueError:
            raise ToolError(f"{key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ToolError(f"{key} must be a positive number")
    return float(value)


NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "ninety": 90, "a": 1, "an": 1,
                     "half an": 0.5, "half a": 0.5})
UNIT_SECONDS = {"second": 1, "sec": 1, "s": 1, "minute": 60, "min": 60, "m": 60, "hour": 3600, "hr": 3600, "h": 3600}
# What a timer's duration may look like to the grammar that fills tool arguments: an amount (digits or
# number words) and a unit, up to three times ("1 hour 30 minutes"). Left free, a small model wrote an
# empty duration for "set a timer for five seconds" on one CPU's kernels and not on another's.
DURATION_PATTERN = (r"^([0-9]{1,4}|[a-z]{1,9}([ -][a-z]{1,5})?) (seconds?|minutes?|hours?)"
                    r"( (and )?([0-9]{1,4}|[a-z]{1,9}) (seconds?|minutes?|hours?)){0,2}$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?|half an?|(?:twenty|thirty|forty|fifty|sixty|ninety)[ -](?:one|two|three|four|"
                       r"five|six|seven|eight|nine)|[a-z]+)\s*(seconds?|secs?|minutes?|mins?|hours?|hrs?|[smh])(?![a-z])")


def parse_duration(text: str) -> float:
    """'10 minutes', 'ten minutes', 'an hour and a half', '1h30m', '90 s' -> seconds; ToolError if none."""
    raw = " ".join(str(text).lower().replace(",", " ").split())
    total, found = 0.0, False
    for amount, unit in _DURATION.findall(raw):
        if amount.replace(".", "", 1).isdigit():
            value = float(amount)
        elif amount in NUMBER_WORDS:
            value = float(NUMBER_WORDS[amount])
        elif re.fullmatch(r"[a-z]+[ -][a-z]+", amount):
            tens, ones = re.split(r"[ -]", amount)
            value = float(NUMBER_WORDS.get(tens, 0) + NUMBER_WORDS.get(ones, 0))
        else:
            continue
        total += value * UNIT_SECONDS[unit.rstrip("s") if len(unit) > 1 else unit]
        found = True
    if re.search(r"\band a half\b", raw) and found:
        last_unit = _DURATION.findall(raw)[-1][1]
        total += 0.5 * UNIT_SECONDS[last_unit.rstrip("s") if len(last_unit) > 1 else last_unit]
    if not found:
        if re.fullmatch(r"\d+(?:\.\d+)?", raw):
            return float(raw) * 60  # a bare number: minutes, as people say "set a timer for 5"
        raise ToolError(f"cannot read the duration {text!r}: say e.g. 10 minutes or 30 seconds")
    return total


def parse_clock_time(text: str, now: datetime) -> datetime:
    """'17:30', '5:30 pm', '7 am', or an ISO date-time -> the next such moment after ``now`` (local)."""
    raw = " ".join(str(text).lower().replace(".", "").split())
    match = re.fullmatch(r"(\d{1,2})(?::(\d{2}))?\s*(am|pm)?", raw)
    if match:
        hour, minute, half = int(match[1]), int(match[2] or 0), match[3]
        if half == "pm" and hour < 12:
            hour += 12
        if half == "am" and hour == 12:
            hour = 0
        if hour > 23 or minute > 59:
            raise ToolError(f"{text!r} is not a time of day")
        moment = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        return moment if moment > now else moment + timedelta(days=1)
    try:
        moment = datetime.fromisoformat(str(text).strip())
    except ValueError:
        raise ToolError(f"cannot read the time {text!r}: use HH:MM, e.g. 17:30") from None
    return moment.astimezone() if moment.tzinfo else moment.replace(tzinfo=now.tzinfo)


def timer_tools(store: TimerStore, scheduler: TimerScheduler | None = None) -> list[Tool]:
    """set_timer, set_reminder, list_timers, cancel_timer on ``store``."""

    def changed() -> None:
        if scheduler is not None:
            scheduler.wake()

    def set_timer(arguments: dict[str, Any], cancel: threading.Event) -> str:
        if arguments.get("duration") not in (None, ""):
            seconds = parse_duration(str(arguments["duration"]))
        else:
            seconds = (_number(arguments, "hours") * 3600 + _number(arguments, "minutes") * 60
                       + _number(arguments, "seconds"))
        if seconds < 1 or seconds > MAX_TIMER_S:
            raise ToolError("a timer runs from 1 second to 7 days: give hours, minutes or seconds")
        label = str(arguments.get("label") or "").strip()[:60]
        timer = store.add("timer", label, time.time() + seconds)
        changed()
        due = datetime.fromtimestamp(timer.due_at).strftime("%H:%M:%S")
        return f"timer {timer.id} set for {spoken_duration(seconds)}, due at {due}"

    def set_reminder(arguments: dict[str, Any], cancel: threading.Event) -> str:
        text = str(arguments.get("text") or "").strip()[:120]
        if not text:
            raise ToolError("say what to remind about (text)")
        now = datetime.now().astimezone()
        if arguments.get("in_minutes") not in (None, "", 0):
            due = now + timedelta(minutes=_number(arguments, "in_minutes"))
        elif arguments.get("at"):
            due = parse_clock_time(str(arguments["at"]), now)
        else:
            raise ToolError("say when: at (HH:MM) or in_minutes")
        if not 0 < (due - now).total_seconds() <= MAX_TIMER_S:
            raise ToolError("a reminder can be set from now up to 7 days ahead")
        timer = store.add("reminder", text, due.timestamp())
        changed()
        return f"reminder {timer.id} set for {due.strftime('%A %H:%M')}: {text}"

    def list_timers(arguments: dict[str, Any], cancel: threading.Event) -> str:
        pending = store.pending()
        if not pending:
            return "no timers or reminders are running"
        now = time.time()
        return "; ".join(f"{t.kind} {t.id}{' ' + repr(t.label) if t.label else ''}: "
                         f"{spoken_duration(max(0, t.due_at - now))} left" for t in pending)

    def cancel_timer(arguments: dict[str, Any], cancel: threading.Event) -> str:
        gone = store.cancel(arguments.get("which"))
        changed()
        if not gone:
            raise ToolError("no running timer or reminder matches that")
        return "cancelled " + ", ".join(f"{t.kind} {t.id}{' ' + repr(t.label) if t.label else ''}" for t in gone)

    number = {"type": "number", "minimum": 0}
    return [
        # One duration in words ("10 minutes"): small models copy it from the request reliably,
        # where they fill separate hours/minutes/seconds numbers wrongly.
        Tool("set_timer", "Start a countdown timer; it rings when the time is up.",
             {"type": "object", "properties": {"duration": {"type": "string", "description": "e.g. 10 minutes",
                                                            "pattern": DURATION_PATTERN},
                                               "label": {"type": "string", "description": "what it is for"}},
              "required": ["duration"]},
             set_timer, timeout_s=2.0),
        Tool("set_reminder", "Remind the user of something at a time of day or in some minutes.",
             {"type": "object", "properties": {"text": {"type": "string"}, "at": {"type": "string", "description":
                                                                                   "time of day, HH:MM"},
                                               "in_minutes": number}, "required": ["text"]},
             set_reminder, timeout_s=2.0),
        Tool("list_timers", "List the timers and reminders that are running.",
             {"type": "object", "properties": {}}, list_timers, timeout_s=2.0),
        Tool("cancel_timer", "Cancel a running timer or reminder.",
             {"type": "object",
              "properties": {"which": {"type": "string", "description": "its label or number, or all"}}},
             cancel_timer, timeout_s=2.0),
    ]
