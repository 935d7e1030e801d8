"""The agent's user-facing error type."""


class AgentError(Exception):
    """A problem the user can fix (missing model, bad WAV, no microphone); one line naming the fix.

    ``csm-chat`` prints ``str(error)`` and exits non-zero; anything else that escapes is a bug
    and keeps its traceback.
    """

    def __init__(self, message: str) -> None:
        # Keep the promise of one line even when a library's message brings newlines along.
        super().__init__(" ".join(str(message).split()))
