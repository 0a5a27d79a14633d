"""AsyncIO's I/O worker on the CPU twin: real thread, real queue, real copies (slowed to build a queue)."""

from __future__ import annotations

import time

import pytest
import torch

from prescope.engine.streams import CpuStreams
from prescope.engine.transfers import IOWorker, chunked

CHUNK = 64  # bytes: 16 float32 values per chunk


class SlowStreams(CpuStreams):
    """The CPU twin, with each chunk taking `delay` seconds and the order of chunks logged by transfer."""

    def __init__(self, delay: float = 0.002):
        super().__init__()
        self.delay, self.log = delay, []

    def issue(self, dst, src):
        time.sleep(self.delay)
        self.log.append(int(src[0]))  # every source tensor is filled with its transfer's id
        return super().issue(dst, src)


def pairs(tag: int, values: int = 64):
    src, dst = torch.full((values,), float(tag)), torch.zeros(values)
    return [(dst, src)], dst


def test_chunks_cover_every_byte_in_pieces_of_at_most_chunk_bytes():
    a, b = torch.arange(50.0), torch.arange(7.0).reshape(7, 1)
    da, db = torch.zeros(50), torch.zeros(7, 1)
    pieces = chunked([(da, a), (db, b)], CHUNK)
    assert all(s.numel() * s.element_size() <= CHUNK for _, s in pieces)
    assert len(pieces) == 4 + 1
    for d, s in pieces:
        d.copy_(s)
    assert torch.equal(da, a) and torch.equal(db, b)


def test_on_demand_overtakes_queued_prefetch_chunks():
    streams = SlowStreams()
    io = IOWorker(streams, CHUNK, depth=1)
    with io._cond:  # the worker waits for its lock while the queue fills
        prefetches = [io.submit((1, i), i, pairs(i + 1)[0], None, speculative=True, need=1) for i in range(3)]
    demand_pairs, dst = pairs(9)
    time.sleep(0.01)  # a few prefetch chunks go out first
    demand = io.submit((0, 9), 9, demand_pairs, None, speculative=False, need=0)
    io.ready(demand)
    assert torch.equal(dst, torch.full((64,), 9.0))
    issued_before = streams.log.index(9)
    io.drain()
    assert streams.log.count(9) == 4
    assert issued_before < len(streams.log) - 4, "the on-demand load waited for every prefetch"
    assert all(t.issued.is_set() for t in prefetches)
    io.close()


def test_ready_promotes_a_queued_prefetch_ahead_of_the_others():
    streams = SlowStreams()
    io = IOWorker(streams, CHUNK, depth=1)
    with io._cond:
        queued = [io.submit((1, i), i, pairs(i + 1)[0], None, speculative=True, need=1 + i) for i in range(4)]
    io.ready(queued[-1])  # the layer needs the last one now
    first_done = [int(t.issued.is_set()) for t in queued]
    assert first_done[-1] == 1 and sum(first_done) <= 2
    io.drain()
    io.close()


def test_cancel_stops_a_transfer_and_drop_stale_forgets_passed_prefetches():
    streams = SlowStreams()
    io = IOWorker(streams, CHUNK, depth=1)
    p, dst = pairs(5)
    with io._cond:
        t = io.submit((2, 5), 5, p, None, speculative=True, need=2)
        stale = io.submit((1, 6), 6, pairs(6)[0], None, speculative=True, need=1)
        fresh = io.submit((3, 7), 7, pairs(7)[0], None, speculative=True, need=3)
        assert io.cancel(t) is True
        assert io.drop_stale(now=2) == [stale]
    io.drain()
    assert torch.equal(dst, torch.zeros(64)) and 5 not in streams.log and 6 not in streams.log
    assert fresh.issued.is_set() and streams.log.count(7) == 4
    with pytest.raises(RuntimeError, match="cancelled"):
        io.ready(t)
    io.close()


def test_drop_stale_cuts_a_prefetch_part_way_and_keeps_the_routed_one():
    streams = SlowStreams(delay=0.005)
    io = IOWorker(streams, CHUNK, depth=1)
    wrong, wrong_dst = pairs(3)
    with io._cond:
        cut = io.submit((4, 3), 3, wrong, None, speculative=True, need=4)
        kept = io.submit((4, 2), 2, pairs(2)[0], None, speculative=True, need=4)
    while 3 not in streams.log:  # its first chunk is on the link
        time.sleep(0.001)
    assert io.drop_stale(now=4, routed={2}) == [cut]  # layer 4 routes expert 2, not 3
    io.drain()
    assert cut.cancelled and not cut.issued.is_set() and 0 < cut.next < 4 and streams.log.count(3) == cut.next
    assert kept.issued.is_set() and streams.log.count(2) == 4
    assert not torch.equal(wrong_dst, torch.full((64,), 3.0))  # part of it only: the caller frees the slot
    io.close()


def test_a_failing_copy_surfaces_in_the_caller():
    class Broken(CpuStreams):
        def issue(self, dst, src):
            raise OSError("link down")

    io = IOWorker(Broken(), CHUNK, depth=2)
    with pytest.raises(OSError, match="link down"):  # on demand: issued by the caller itself
        io.submit((0, 1), 1, pairs(1)[0], None, speculative=False, need=0)
    t = io.submit((1, 1), 1, pairs(1)[0], None, speculative=True, need=1)  # a prefetch: the worker's
    with pytest.raises((RuntimeError, OSError), match="link down"):  # failed in the worker, or taken over
        io.ready(t)
    with pytest.raises(RuntimeError, match="I/O worker failed"):
        io.submit((0, 2), 2, pairs(2)[0], None, speculative=False, need=0)
    io.close()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="chunk_bytes"):
        IOWorker(CpuStreams(), 0, 1)
