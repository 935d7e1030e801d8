"""The engine's user-facing error type."""


class CSMError(Exception):
    """A problem the user can fix (missing file, bad input); the message is one line naming the fix.

    CLIs print ``str(error)`` and exit non-zero; anything else that escapes is a bug and keeps
    its traceback.
    """


def first_line(error: object, limit: int = 160) -> str:
    """The first line of an error's message (its type's name when it has none), cut to ``limit`` characters."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
