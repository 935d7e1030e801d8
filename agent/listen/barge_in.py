"""The user's voice during the agent's reply: one rule, in one place.

A person who speaks while the agent talks is either taking the turn ("wait, stop", a question)
or just listening out loud ("mm-hmm", "yeah", a cough). The rule:

1. The moment the user is heard over a reply (``speech_started``), playback pauses: the agent
   falls silent within one block, as a person would, but nothing is thrown away yet.
2. Speech that goes on for ``confirm_s`` is taking the turn: the reply is interrupted.
3. A shorter utterance is judged by its words (``verdict``): nothing, or only backchannel
   words, and the reply resumes where it paused; anything else interrupts it and is answered.

Push-to-talk needs no judgement: pressing the key interrupts at once. What counts as "heard"
(VAD on the echo-cancelled microphone, or the double-talk detector while the agent's voice is
still in the room) is the turn stage's business; this module only decides what it means.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from agent.frames import Reply
from agent.stages.base import ReplyTracker

BACKCHANNELS = frozenset({
    "mm", "mmm", "mhm", "mm-hmm", "mmhmm", "hmm", "hm", "uh-huh", "uhhuh", "uh", "um", "ah", "oh", "yeah", "yes",
    "yep", "yup", "ok", "okay", "right", "sure", "i see", "alright", "cool", "nice", "wow", "got it",
})  # fmt: skip


@dataclass(frozen=True)
class BargeInSettings:
    confirm_s: float = 1.0  # speech over a reply at least this long takes the turn, whatever it says
    backchannels: frozenset[str] = BACKCHANNELS


# A hum however Whisper spells it ("M. M. M." for a short "mm hmm" heard over the agent's voice,
# "Mmmm", "Hmmm", "mhmm", "mm-hmm"): only m and h, with an m.
_HUM = re.compile(r"[mh]*m[mh]*(?:-[mh]*m[mh]*)?")


def is_backchannel(text: str, backchannels: frozenset[str] = BACKCHANNELS) -> bool:
    """True for a transcript made only of listening noises ("Mm-hmm.", "Yeah, yeah.", "M. M. M.", "")."""
    words = re.sub(r"[^\w\s'-]", " ", text.lower()).split()
    if not words:
        return True
    phrase = " ".join(words)
    if phrase in backchannels:
        return True
    return all(w in backchannels or _HUM.fullmatch(w) for w in words)


class BargeIn:
    """See the module docstring. Callbacks: ``pause``/``resume`` the speaker, ``interrupt`` the reply."""

    def __init__(self, replies: ReplyTracker, *, pause: Callable[[], None], resume: Callable[[], None],
                 interrupt: Callable[[], None], settings: BargeInSettings | None = None) -> None:
        self.replies = replies
        self.settings = settings or BargeInSettings()
        self._pause, self._resume, self._interrupt = pause, resume, interrupt
        self._lock = threading.Lock()
        self._held: Reply | None = None  # the reply paused for the user, awaiting the verdict
        self.pauses = 0  # times playback paused because the user was heard over a reply
        self.interruptions = 0
        self.resumed = 0

    @property
    def holding(self) -> bool:
        with self._lock:
            return self._held is not None

    def speech_started(self, *, push_to_talk: bool = False) -> None:
        """The user is heard. During a reply: push-to-talk interrupts, a voice pauses playback."""
        reply = self.replies.current
        if reply is None or reply.cancelled:
            return
        if push_to_talk:
            self._stop()
            return
        with self._lock:
            if self._held is not None:
                return
            self._held = reply
        self.pauses += 1
        self._pause()

    def speech_ongoing(self, speech_s: float) -> None:
        """The user has been speaking for ``speech_s`` seconds of this utterance."""
        if speech_s >= self.settings.confirm_s and self.holding:
            self._stop()

    def verdict(self, text: str) -> bool:
        """A held utterance was transcribed: True if it takes the turn (the reply is interrupted),
        False if it was only a backchannel or noise (the reply resumes)."""
        with self._lock:
            held, self._held = self._held, None
        if held is None:
            return bool(text.strip())
        if is_backchannel(text, self.settings.backchannels) and not held.cancelled:
            self.resumed += 1
            self._resume()
            return False
        self._interrupt()
        self.interruptions += 1
        return True

    def release(self) -> None:
        """Nothing came of it (a burst too short to be a turn): the reply goes on."""
        with self._lock:
            held, self._held = self._held, None
        if held is not None and not held.cancelled:
            self.resumed += 1
            self._resume()

    def _stop(self) -> None:
        with self._lock:
            self._held = None
        self.interruptions += 1
        self._interrupt()
