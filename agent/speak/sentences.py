"""Cutting an LLM's streamed text into whole sentences as soon as each one ends.

Speech starts while the LLM is still writing: each sentence goes to CSM the moment its end is
certain, which for a full stop sometimes means waiting for the next character ("Dr. Smith",
"3.5", "No. 5").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

# Abbreviations whose full stop does not end a sentence ...
_NEVER_FINAL = {
    "dr", "mr", "mrs", "ms", "prof", "st", "jr", "sr", "vs", "e.g", "i.e", "approx", "fig", "cf",
    "mt", "gen", "col", "lt", "sgt", "capt", "rev", "hon", "dept", "est", "vol",
}  # fmt: skip
# ... and ones that may end a sentence, when a capital letter follows.
_MAYBE_FINAL = {"etc", "a.m", "p.m", "inc", "ltd", "co", "u.s", "u.k", "jan", "feb", "aug", "sept", "oct", "nov", "dec"}
_BOUNDARY_RE = re.compile(r"(\.{3}|…|[.!?]+)([\"'”’)\]]*)(?=\s)|\n")
_CLAUSE_RE = re.compile(r"[,;:—–](?=\s)")


class SentenceSplitter:
    """Feed LLM text deltas; get whole sentences back as soon as each is complete.

    Knows that "Dr." and "e.g." do not end sentences, that "3.5" is a number, that "..."
    followed by a lower-case word does not end one, and that a newline does. A sentence longer
    than ``max_chars`` is cut at its last comma (else space) so speech can start. ``flush()``
    returns what is left when the reply is over.
    """

    def __init__(self, max_chars: int = 220) -> None:
        if max_chars < 20:
            raise ValueError("max_chars must be at least 20")
        self.max_chars = max_chars
        self._buffer = ""
        self._scan_from = 0

    def feed(self, delta: str) -> list[str]:
        """Add a text delta; returns the sentences it completed (possibly none)."""
        self._buffer += delta
        sentences: list[str] = []
        while True:
            cut = self._next_boundary()
            if cut is None:
                break
            self._emit(cut, sentences)
        while len(self._buffer.strip()) > self.max_chars:
            self._emit(self._long_cut(), sentences)
        return sentences

    def flush(self) -> list[str]:
        """End of the reply: the rest of the text as sentences."""
        sentences: list[str] = []
        while True:
            cut = self._next_boundary(final=True)
            if cut is None:
                break
            self._emit(cut, sentences)
        self._emit(len(self._buffer), sentences)
        return sentences

    def split(self, deltas: Iterable[str]) -> Iterator[str]:
        """Sentences from a stream of deltas, flushed at the end."""
        for delta in deltas:
            yield from self.feed(delta)
        yield from self.flush()

    def _emit(self, cut: int, out: list[str]) -> None:
        sentence = " ".join(self._buffer[:cut].split())
        self._buffer = self._buffer[cut:].lstrip()
        self._scan_from = 0
        if sentence:
            out.append(sentence)

    def _next_boundary(self, final: bool = False) -> int | None:
        """Index just after the first sentence end in the buffer, or None (none yet, or unsure)."""
        for match in _BOUNDARY_RE.finditer(self._buffer, self._scan_from):
            if match.group(0) == "\n":
                if self._buffer[: match.start()].strip():
                    return match.end()
                continue
            verdict = self._is_sentence_end(match, final)
            if verdict is None:  # depends on text that has not arrived yet
                return None
            if verdict:
                return match.end()
            self._scan_from = match.end()
        return None

    def _is_sentence_end(self, match: re.Match[str], final: bool) -> bool | None:
        """True/False, or None when it depends on the next character, which has not arrived."""
        punct = match.group(1)
        following = self._buffer[match.end() :].lstrip(" \t")[:1]
        unknown = not following and not final

        def capital_follows() -> bool | None:
            if unknown:
                return None
            return not following or following.isupper() or following == "\n"

        if punct in ("...", "…"):
            return capital_follows()  # "Well... maybe" goes on; "Well... Maybe" is a new sentence
        if punct != ".":  # ! ? and runs like ?!
            if match.group(2):  # '"Really?" she asked' goes on after the closing quote
                return None if unknown else not following.islower()
            return True
        before = self._buffer[: match.start()]
        word = re.search(r"(\S+)$", before)
        token = word.group(1).lower().lstrip("(\"'") if word else ""
        if before.strip().isdigit():  # "1." opening a numbered list item
            return False
        if token in _NEVER_FINAL or (len(token) == 1 and token.isalpha() and word.group(1).isupper()):
            return False  # "Dr. Smith", "J. R. R. Tolkien"
        if token == "no":  # "No. 5" vs "No. I don't."
            return None if unknown else not following.isdigit()
        if token in _MAYBE_FINAL:
            return capital_follows()
        return True

    def _long_cut(self) -> int:
        """Where to cut a sentence that is running past ``max_chars``."""
        offset = len(self._buffer) - len(self._buffer.lstrip())
        window = self._buffer[: offset + self.max_chars]
        clauses = [m.end() for m in _CLAUSE_RE.finditer(window) if m.end() > offset + self.max_chars // 3]
        if clauses:
            return clauses[-1]
        space = window.rfind(" ", offset + self.max_chars // 3)
        return space if space > 0 else len(window)
