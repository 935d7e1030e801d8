"""The engine's user-facing error type, and the one way a foreign error becomes one line of ours."""


class CSMError(Exception):
    """A problem the user can fix (missing file, bad input); the message is one line naming the fix.

    CLIs print ``str(error)`` and exit non-zero; anything else that escapes is a bug and keeps
    its traceback.
    """


def first_line(error: object, limit: int | None = 160) -> str:
    """The first line of an error's message (its type's name when it has none), cut to ``limit`` characters.

    For quoting a library's error inside one of ours; ``limit=None`` keeps the whole line.
    """
    lines = str(error).strip().splitlines()
    line = lines[0].strip() if lines else type(error).__name__
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."
