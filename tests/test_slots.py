"""The batch engine's slot bookkeeping: busy slots in front, prefix reuse by block digests, sessions."""

from __future__ import annotations

import torch

from csm_engine.batch.slots import BLOCK_ROWS, SlotTable, block_digests, common_blocks


def _rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (n, 33), generator=g), torch.rand(n, 33, generator=g) > 0.5


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def _table(n: int, **kwargs):
    moves: list[tuple[int, int, int]] = []
    table = SlotTable(n, lambda a, b, rows: moves.append((a, b, rows)), clock=Clock(), **kwargs)
    return table, moves


def test_digests_chain_whole_blocks_and_extend():
    tokens, mask = _rows(100, 0)
    full = block_digests(tokens, mask, 100)
    assert len(full) == 100 // BLOCK_ROWS
    assert block_digests(tokens, mask, 64) == full[:2]
    assert block_digests(tokens, mask, 100, full[:1], start=32) == full  # extended from block 1
    other = tokens.clone()
    other[40, 3] += 1  # a change in block 1 changes every digest from there on
    changed = block_digests(other, mask, 100)
    assert changed[0] == full[0] and changed[1] != full[1] and changed[2] != full[2]
    assert common_blocks(full, changed) == 1 and common_blocks(full, full[:2]) == 2 and common_blocks([], full) == 0


def test_busy_slots_stay_in_front_and_moves_carry_their_rows():
    table, moves = _table(4)
    a = table.acquire("a", [], 0).slot
    b = table.acquire("b", [], 0).slot
    c = table.acquire("c", [], 0).slot
    assert [a.index, b.index, c.index] == [0, 1, 2] and table.n_busy == 3
    c.rows = 50
    table.release(a, [])
    # c (the last busy slot) moved into a's place, with its 50 rows.
    assert moves[-1] == (0, 2, 50) and c.index == 0 and a.index == 2 and table.n_busy == 2
    assert all(s.busy for s in table.slots[:2]) and not any(s.busy for s in table.slots[2:])


def test_the_idle_slot_holding_the_longest_prefix_is_reused():
    table, _ = _table(3)
    tokens, mask = _rows(200, 1)
    voice = block_digests(tokens, mask, 100)  # 3 blocks
    s1 = table.acquire("x", [], 0).slot
    table.release(s1, voice)
    s2 = table.acquire("y", [], 0).slot  # some other slot: the empty one is as good for an empty prompt
    table.release(s2, block_digests(*_rows(64, 2), 64))
    lease = table.acquire("z", block_digests(tokens, mask, 200), max_reuse_rows=199)
    assert lease.slot is s1 and lease.reused_rows == 3 * BLOCK_ROWS


def test_reuse_is_capped_to_whole_blocks_below_the_last_prompt_row():
    table, _ = _table(2)
    tokens, mask = _rows(96, 3)
    digests = block_digests(tokens, mask, 96)
    s = table.acquire("a", [], 0).slot
    table.release(s, digests)
    assert table.acquire("b", digests, max_reuse_rows=95).reused_rows == 64


def test_a_session_keeps_its_slot_while_others_come_and_go():
    table, _ = _table(3)
    tokens, mask = _rows(64, 4)
    turn1 = table.acquire("t1", [], 0, session="s").slot
    table.release(turn1, block_digests(tokens, mask, 64), session="s")
    for i in range(5):  # two free slots serve the others; the session's slot is never taken
        lease = table.acquire(f"o{i}", [], 0)
        assert lease.slot is not turn1
        table.release(lease.slot, [])
    lease = table.acquire("t2", block_digests(tokens, mask, 64), max_reuse_rows=63, session="s")
    assert lease.slot is turn1 and lease.reused_rows == 32


def test_the_least_recently_used_session_loses_its_slot_first():
    table, _ = _table(2)
    for name in ("old", "new"):
        slot = table.acquire(name, [], 0, session=name).slot
        table.release(slot, [b"x"], session=name)
    assert set(table.sessions()) == {"old", "new"}
    other = table.acquire("other", [], 0).slot  # every idle slot is pinned: "old" gives way
    assert set(table.sessions()) == {"new"}
    table.release(other, [])


def test_max_sessions_bounds_the_pinned_slots():
    table, _ = _table(4, max_sessions=2)
    for name in ("a", "b", "c"):
        slot = table.acquire(name, [], 0, session=name).slot
        table.release(slot, [], session=name)
    assert set(table.sessions()) == {"b", "c"}


def test_sessions_expire_after_their_ttl():
    table, _ = _table(2, session_ttl_s=3.0)
    slot = table.acquire("a", [], 0, session="a").slot
    table.release(slot, [], session="a")
    for i in range(3):  # the clock moves one second per call
        lease = table.acquire(str(i), [], 0)
        table.release(lease.slot, [])
    assert table.sessions() == {}
