"""The simulated link on its own: FIFO order, priority overtaking at chunk granularity, promotion, slots
that are not free yet, and the optimal cache's misses, all against hand-computed times (1 s per byte)."""

from __future__ import annotations

import pytest

from prescope.sim.link import FifoLink, Load, PriorityLink, belady_misses


def per_byte(nbytes: int) -> float:
    return float(nbytes)


class Recorder:
    """The link's two callbacks: rows (what, start, end, bytes) and the order transfers landed in."""

    def __init__(self):
        self.rows, self.landed = [], []

    def emit(self, load: Load, start: float, end: float, nbytes: int) -> None:
        self.rows.append((load.key, start, end, nbytes))

    def done(self, load: Load) -> None:
        self.landed.append(load.key)


def load(id_: int, key, kind: str, nbytes: int, ready_at: float = 0.0) -> Load:
    return Load(id_, key, id_, kind, 0, nbytes, ready_at)


def test_fifo_runs_in_issue_order_and_waits_for_the_slot():
    rec = Recorder()
    link = FifoLink(per_byte, rec.emit, rec.done)
    a, b, c = load(0, "a", "prefetch", 2), load(1, "b", "on_demand", 1), load(2, "c", "on_demand", 1, ready_at=5.0)
    for ld in (a, b, c):
        link.enqueue(ld)
    # the on-demand load b waits behind the prefetch a; c waits for its slot until t = 5
    assert rec.rows == [("a", 0.0, 2.0, 2), ("b", 2.0, 3.0, 1), ("c", 5.0, 6.0, 1)]
    assert rec.landed == ["a", "b", "c"] and link.finish(b) == 3.0 and not link.finish_any()


def test_priority_link_lets_on_demand_overtake_a_prefetch_between_chunks():
    rec = Recorder()
    link = PriorityLink(per_byte, rec.emit, rec.done, chunk_bytes=1)
    a = load(0, "a", "prefetch", 3)
    link.enqueue(a)
    link.advance(1.0)  # one chunk of the prefetch has moved
    b = load(1, "b", "on_demand", 1, ready_at=1.0)
    link.enqueue(b)
    assert link.finish(b) == 2.0
    link.drain()
    # the prefetch's last two chunks are contiguous: one row
    assert rec.rows == [("a", 0.0, 1.0, 1), ("b", 1.0, 2.0, 1), ("a", 2.0, 4.0, 2)]
    assert rec.landed == ["b", "a"] and a.end == 4.0


def test_priority_link_promotes_a_prefetch_the_layer_waits_for():
    rec = Recorder()
    link = PriorityLink(per_byte, rec.emit, rec.done, chunk_bytes=4)
    first, second = load(0, "first", "prefetch", 2), load(1, "second", "prefetch", 2)
    link.enqueue(first)
    link.enqueue(second)
    link.promote(second)
    assert link.finish(second) == 2.0 and link.finish(first) == 4.0
    assert rec.landed == ["second", "first"]


def test_priority_link_takes_a_ready_transfer_before_one_whose_slot_is_busy():
    rec = Recorder()
    link = PriorityLink(per_byte, rec.emit, rec.done, chunk_bytes=8)
    busy, free = load(0, "busy", "on_demand", 1, ready_at=3.0), load(1, "free", "prefetch", 1)
    link.enqueue(busy)
    link.enqueue(free)
    assert link.finish_any() and rec.landed == ["free"]
    assert link.finish(busy) == pytest.approx(4.0)  # idle from 1 until its slot is released at 3


def test_belady_evicts_the_key_used_farthest_ahead():
    # 1, 2 are free; 3 evicts 2 (next used after 1), 1 hits, 2 misses: 2 misses where LRU would have 3
    assert belady_misses([[1], [2], [3], [1], [2]], 2).tolist() == [0, 0, 1, 0, 1]
    assert belady_misses([[1, 2, 3]], 3).tolist() == [0]
