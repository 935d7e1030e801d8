"""Which cache slot holds what: the bookkeeping of the batch engine's backbone caches.

Every utterance in flight owns a slot of backbone keys/values. Busy slots are kept at the front
(0..n_busy-1) so a batch is a contiguous range of slots; a slot that falls idle is swapped
behind them. An idle slot keeps what its cache holds: a later prompt that starts with the same
rows (the same voice clip, the same conversation so far) reuses them instead of prefilling
them. Rows are matched in whole blocks by chained digests (``block_digests``), so finding the
best slot costs a comparison of short lists, not of tokens.

A conversation session pins its idle slot: other requests do not take it while free slots
exist; the least recently used session loses its slot first, and at most ``max_sessions`` are
pinned. Losing a slot costs speed only (the next turn prefills its whole prompt).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

BLOCK_ROWS = 32  # rows per digest: reuse and prefill are aligned to it (Generator.prefill_block on CPU)


def block_digests(tokens: Tensor, mask: Tensor, n_rows: int, previous: Sequence[bytes] = (),
                  start: int = 0) -> list[bytes]:
    """Chained digests of the whole blocks of rows [0, n_rows): digest j stands for rows [0, 32 (j + 1)).

    ``previous`` holds the digests of the blocks before ``start`` (a block boundary) in the same
    rows, so a longer record is hashed from where the shorter one stopped.
    """
    digests = list(previous[: start // BLOCK_ROWS])
    chain = digests[-1] if digests else b""
    t, m = tokens.numpy(), mask.numpy()
    for a in range(len(digests) * BLOCK_ROWS, n_rows // BLOCK_ROWS * BLOCK_ROWS, BLOCK_ROWS):
        chain = hashlib.blake2b(chain + t[a:a + BLOCK_ROWS].tobytes() + m[a:a + BLOCK_ROWS].tobytes(),
                                digest_size=16).digest()
        digests.append(chain)
    return digests


def common_blocks(a: Sequence[bytes], b: Sequence[bytes]) -> int:
    """How many leading blocks two digest lists share (the last digests equal means all before are)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # chained digests: equality is monotone, so bisect
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(eq=False)
class Slot:
    """One slot of the cache; ``index`` moves when slots are swapped."""

    index: int
    digests: list[bytes] = field(default_factory=list)  # whole blocks its cache holds, from position 0
    session: str | None = None
    last_used: float = 0.0
    owner: Any = None  # the utterance using it, None when idle
    rows: int = 0  # positions that hold data (for moving a busy slot)

    @property
    def busy(self) -> bool:
        return self.owner is not None


@dataclass(frozen=True)
class Lease:
    """A slot given to an utterance, and how many of its prompt's rows the slot already holds."""

    slot: Slot
    reused_rows: int


class SlotTable:
    """Hands out slots to utterances and takes them back; ``swap(a, b, rows)`` moves cache data.

    Not thread-safe: the engine thread alone calls it.
    """

    def __init__(self, n_slots: int, swap: Callable[[int, int, int], None], *, max_sessions: int | None = None,
                 session_ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        self.slots = [Slot(i) for i in range(n_slots)]
        self.n_busy = 0
        self._swap = swap
        self.max_sessions = n_slots if max_sessions is None else max_sessions
        self.session_ttl_s = session_ttl_s
        self._clock = clock

    # -- queries ----------------------------------------------------------------------------

    def sessions(self) -> dict[str, Slot]:
        return {s.session: s for s in self.slots if s.session is not None}

    def has_free_slot(self) -> bool:
        return self.n_busy < len(self.slots)

    # -- lending ----------------------------------------------------------------------------

    def acquire(self, owner: Any, digests: Sequence[bytes], max_reuse_rows: int, session: str | None = None) -> Lease:
        """A slot for ``owner`` (moved to index n_busy) and the rows of its prompt it already holds.

        ``digests``: the prompt's block digests; at most ``max_reuse_rows`` rows are reused.
        """
        if not self.has_free_slot():
            raise RuntimeError("no free slot: the engine admits at most as many utterances as it has slots")
        self._expire_sessions()
        idle = self.slots[self.n_busy:]
        chosen = next((s for s in idle if session is not None and s.session == session), None)
        if chosen is None:
            unpinned = [s for s in idle if s.session is None]
            if not unpinned:  # every idle slot is pinned: the least recently used session loses its slot
                unpinned = [min(idle, key=lambda s: s.last_used)]
                unpinned[0].session = None
            chosen = max(unpinned, key=lambda s: (common_blocks(s.digests, digests), -s.last_used))
        blocks = min(common_blocks(chosen.digests, digests), max(0, max_reuse_rows) // BLOCK_ROWS)
        self._move(chosen, self.n_busy)
        self.n_busy += 1
        chosen.owner, chosen.session = owner, None  # a busy slot is nobody's session until released
        chosen.digests = list(chosen.digests[:blocks])
        chosen.rows = blocks * BLOCK_ROWS
        chosen.last_used = self._clock()
        return Lease(chosen, blocks * BLOCK_ROWS)

    def release(self, slot: Slot, digests: Sequence[bytes], session: str | None = None) -> None:
        """``slot``'s utterance is over; its cache now holds the blocks ``digests`` (pinned to ``session``)."""
        slot.owner = None
        slot.digests = list(digests)
        slot.rows = len(slot.digests) * BLOCK_ROWS
        slot.last_used = self._clock()
        if session is not None:
            for other in self.slots:
                if other.session == session:
                    other.session = None  # the newest turn of a session wins
            slot.session = session
            pinned = sorted((s for s in self.slots if s.session is not None), key=lambda s: s.last_used)
            for old in pinned[: max(0, len(pinned) - self.max_sessions)]:
                old.session = None
        self._move(slot, self.n_busy - 1)
        self.n_busy -= 1

    def forget(self) -> None:
        """Every idle slot's content is unknown (after a failed step): nothing is reused from them."""
        for s in self.slots[self.n_busy:]:
            s.digests, s.rows, s.session = [], 0, None

    # -- internals --------------------------------------------------------------------------

    def _move(self, slot: Slot, index: int) -> None:
        other = self.slots[index]
        if other is slot:
            return
        self._swap(slot.index, index, max(slot.rows, other.rows))
        self.slots[slot.index], self.slots[index] = other, slot
        other.index, slot.index = slot.index, index

    def _expire_sessions(self) -> None:
        now = self._clock()
        for s in self.slots[self.n_busy:]:
            if s.session is not None and now - s.last_used > self.session_ttl_s:
                s.session = None


__all__ = ["BLOCK_ROWS", "Lease", "Slot", "SlotTable", "block_digests", "common_blocks"]
