"""The engine's user-facing error type."""


class CSMError(Exception):
    """A problem the user can fix (missing file, bad input); the message is one line naming the fix.

    CLIs print ``str(error)`` and exit non-zero; anything else that escapes is a bug and keeps
    its traceback.
    """
