"""Untrusted text (LLM replies, transcripts, notices) made safe to put on screen.

Nothing that comes out of a model is ever handed to Textual or Rich as markup, and no
control character reaches the terminal: escape sequences could recolour, move the
cursor or retitle the window. Control characters are shown as visible symbols instead,
so what the model wrote is what the user sees.
"""

from __future__ import annotations

from rich.style import Style
from rich.text import Text

_KEEP = {"\n", "\t"}


def _visible(char: str) -> str:
    code = ord(char)
    if code < 0x20:
        # C0 controls have Unicode "control pictures" at U+2400 + code (ESC -> U+241B).
        return chr(0x2400 + code)
    if code == 0x7F:
        return "\u2421"  # DEL symbol
    return f"\\x{code:02x}"  # C1 controls (0x80-0x9f), e.g. the 8-bit CSI 0x9b


def _is_control(char: str) -> bool:
    code = ord(char)
    return (code < 0x20 or 0x7F <= code <= 0x9F) and char not in _KEEP


def visible_controls(text: str) -> str:
    """Return text with every control character except newline and tab made visible."""
    if not any(_is_control(char) for char in text):
        return text
    return "".join(_visible(char) if _is_control(char) else char for char in text)


def literal(text: str, style: str | Style = "") -> Text:
    """A Rich Text showing text exactly as written: no markup parsing, no control codes."""
    return Text(visible_controls(text), style=style)
