"""Built-in offline tools: the date and time (any time zone), and a calculator.

The calculator parses with ``simpleeval`` (Python's own ``ast`` parser with a whitelist of
nodes, operators and functions, and caps on powers and string sizes): arithmetic and a few
math functions, never ``eval``, no names but ``pi``/``e``, no attributes, no calls but the
listed functions. Spoken forms ("17 times 23", "2 to the power of 8") are turned into symbols
first, since the LLM often passes the user's words through.
"""

from __future__ import annotations

import math
import re
import threading
from datetime import datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from agent.tools.registry import Tool, ToolError

# ---------------------------------------------------------------------------------- clock

ZONE_ALIASES = {"utc": "UTC", "gmt": "UTC", "z": "UTC", "zulu": "UTC"}


@lru_cache(maxsize=1)
def _zones_by_city() -> dict[str, str]:
    """'tokyo' -> 'Asia/Tokyo', 'new york' -> 'America/New_York' (the last part of each IANA name)."""
    cities: dict[str, str] = {}
    for name in sorted(available_timezones()):
        if "/" in name and not name.startswith(("Etc/", "SystemV/")):
            cities.setdefault(name.rsplit("/", 1)[1].replace("_", " ").lower(), name)
    return cities


def resolve_zone(text: str | None) -> ZoneInfo | None:
    """An IANA zone from a name ("Europe/Oslo"), a city ("Tokyo", "new york") or UTC; None = local time."""
    if text is None or not str(text).strip() or str(text).strip().lower() in ("local", "here", "now"):
        return None
    raw = " ".join(str(text).split())
    key = raw.lower()
    if key in ZONE_ALIASES:
        return ZoneInfo(ZONE_ALIASES[key])
    try:
        if "/" in raw:
            exact = {z.lower(): z for z in available_timezones()}.get(key.replace(" ", "_"))
            if exact:
                return ZoneInfo(exact)
        else:
            city = key.removesuffix(" time").strip()
            if city in _zones_by_city():
                return ZoneInfo(_zones_by_city()[city])
    except ZoneInfoNotFoundError:
        pass
    raise ToolError(f"unknown time zone {raw!r}: use an IANA name such as Europe/Paris, or a large city")


def describe_time(now: datetime, zone_name: str | None) -> str:
    """'Monday 7 December 2026, 14:05 (Europe/Oslo, UTC+01:00)'."""
    offset = now.strftime("%z")
    utc = f"UTC{offset[:3]}:{offset[3:]}" if offset else "UTC"
    where = f"{zone_name}, {utc}" if zone_name else f"local time, {utc}"
    return f"{now.strftime('%A')} {now.day} {now.strftime('%B %Y, %H:%M')} ({where})"


def _get_time(arguments: dict[str, Any], cancel: threading.Event) -> str:
    zone = resolve_zone(arguments.get("timezone"))
    now = datetime.now(zone) if zone is not None else datetime.now().astimezone()
    return describe_time(now, zone.key if zone is not None else None)


def clock_tool() -> Tool:
    return Tool(
        "get_time", "Get the current date and time, here or in another time zone or city.",
        {"type": "object", "properties": {"timezone": {
            "type": "string", "description": "IANA time zone or city, e.g. Asia/Tokyo or Tokyo; leave out for here"}}},
        _get_time, timeout_s=2.0)


# ---------------------------------------------------------------------------------- calculator

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 1000
_SPOKEN = [  # longest first: "divided by" before "by"
    (r"\bto the power of\b", "**"), (r"\bdivided by\b", "/"), (r"\bmultiplied by\b", "*"), (r"\bsquared\b", "**2"),
    (r"\bcubed\b", "**3"), (r"\btimes\b", "*"), (r"\bplus\b", "+"), (r"\bminus\b", "-"), (r"\bover\b", "/"),
    (r"\bmod(?:ulo)?\b", "%"), (r"(?<=\d)\s*x\s*(?=\d)", "*"), (r"\bpercent of\b", "/100*"), (r"\^", "**"),
    (r"×", "*"), (r"÷", "/"), (r"−", "-"), (r"\bsquare root of\b", "sqrt"),
]


def _power(base: Any, exponent: Any) -> Any:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"exponent {exponent} is too large (at most {MAX_EXPONENT})")
    return base ** exponent


def _evaluator():
    import ast

    try:
        import simpleeval
    except ImportError:
        raise ToolError("the calculator needs the simpleeval package: pip install simpleeval") from None
    operators = dict(simpleeval.DEFAULT_OPERATORS)
    operators[ast.Pow] = _power
    operators.pop(ast.BitXor, None)  # "^" is turned into a power above; xor is no one's arithmetic
    functions = {name: getattr(math, name) for name in (
        "sqrt", "sin", "cos", "tan", "asin", "acos", "atan", "log", "log10", "log2", "exp", "floor", "ceil",
        "factorial", "radians", "degrees")}
    functions.update(abs=abs, round=round, min=min, max=max)
    return simpleeval.SimpleEval(operators=operators, functions=functions, names={"pi": math.pi, "e": math.e})


def format_number(value: Any) -> str:
    """391 -> '391'; 26.25 -> '26.25'; 1/3 -> '0.3333333333'; True/strings refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToolError("the expression does not give a number")
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ToolError("the result is not a finite number")
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.10g}"
    if abs(value) >= 10 ** 30:
        return f"{float(value):.10g}"
    return str(value)


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text; ToolError for anything else."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("give an arithmetic expression, e.g. 17 * 23")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    text = expression.strip().rstrip("?=. ").lower().replace(",", "")
    text = re.sub(r"^(?:what is|what's|calculate|compute)\s+", "", text)
    for pattern, symbol in _SPOKEN:
        text = re.sub(pattern, f" {symbol} ", text)
    text = re.sub(r"sqrt\s+(\d+(?:\.\d+)?)", r"sqrt(\1)", text)
    import simpleeval

    try:
        value = _evaluator().eval(text)
    except ToolError:
        raise
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (simpleeval.InvalidExpression, SyntaxError, TypeError, ValueError, OverflowError) as error:
        raise ToolError(f"cannot calculate {expression!r}: {' '.join(str(error).split())}") from None
    return format_number(value)


def calculator_tool() -> Tool:
    return Tool(
        "calculate", "Calculate an arithmetic expression exactly, e.g. 17 * 23 or sqrt(2) / 3.",
        {"type": "object", "properties": {"expression": {"type": "string", "description": "the arithmetic to do"}},
         "required": ["expression"]},
        lambda arguments, cancel: calculate(arguments.get("expression", "")), timeout_s=2.0)
