"""The simulated PCIe link of the replay, and the optimal cache's bound on what it must carry.

Two disciplines, one interface (`enqueue`, `promote`, `cut`, `advance`, `finish`, `finish_any`, `drain`):

- `FifoLink` (`async_io=False`): one copy stream; transfers run in issue order, so a queued prefetch
  delays a later on-demand load;
- `PriorityLink` (`async_io=True`, AsyncIO's I/O worker): on-demand loads overtake queued prefetches at
  `chunk_bytes` granularity, each chunk costing one transfer time, a prefetch the running layer
  waits for is promoted to on-demand, and one no layer will use is cut before its next chunk.

Every load into a slot starts after the slot's previous occupant finished computing (`Load.ready_at`).
A link reports each transfer through two callbacks: `emit(load, start, end, nbytes)` for a timeline row
(contiguous chunks of one transfer form one row) and `done(load)` once its last byte has landed.

`belady_misses` counts the misses of an optimal cache (Belady) on the same requests: the fewest loads
any policy could make, the simulator's lower bound on link traffic.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence

import numpy as np

PRIORITY = {"on_demand": 0, "prefetch": 1}

TransferTime = Callable[[int], float]  # seconds to move n bytes
Emit = Callable[["Load", float, float, int], None]  # (load, start, end, bytes) of one timeline row
Done = Callable[["Load"], None]  # the load's last byte has landed


class Load:
    """One transfer of an expert into a slot: what, where, why, and how far it has got."""

    __slots__ = ("id", "key", "slot", "kind", "step", "nbytes", "ready_at", "prio", "left", "end")

    def __init__(self, id_, key, slot, kind, step, nbytes, ready_at):
        self.id, self.key, self.slot, self.kind, self.step = id_, key, slot, kind, step
        self.nbytes, self.ready_at, self.prio = nbytes, ready_at, PRIORITY[kind]
        self.left, self.end = nbytes, None


class FifoLink:
    """One copy stream: transfers in issue order, each after the previous one and after its slot is free.
    End times are known when a transfer is queued, so the other methods have nothing to do."""

    def __init__(self, transfer_time: TransferTime, emit: Emit, done: Done):
        self.transfer_time, self.emit, self.done, self.free = transfer_time, emit, done, 0.0

    def enqueue(self, load: Load) -> None:
        start = max(self.free, load.ready_at)
        load.end = self.free = start + self.transfer_time(load.nbytes)
        load.left = 0
        self.emit(load, start, load.end, load.nbytes)
        self.done(load)

    def finish(self, load: Load) -> float:
        return load.end

    def advance(self, t: float) -> None: ...

    def promote(self, load: Load) -> None: ...

    def cut(self, load: Load) -> bool | None:
        return None  # every copy was issued when queued: nothing to stop

    def finish_any(self) -> bool:
        return False

    def drain(self) -> None: ...


class PriorityLink:
    """AsyncIO's I/O worker: on-demand before prefetch (then issue order), chunk by chunk; the link takes
    the best transfer whose slot is free, waiting only when none is. Contiguous chunks of one transfer
    form one timeline row."""

    def __init__(self, transfer_time: TransferTime, emit: Emit, done: Done, chunk_bytes: int):
        self.transfer_time, self.emit, self.done, self.chunk = transfer_time, emit, done, chunk_bytes
        self.now, self.heap, self.seq, self.seg = 0.0, [], itertools.count(), None

    def enqueue(self, load: Load) -> None:
        heapq.heappush(self.heap, (load.prio, next(self.seq), load))

    def promote(self, load: Load) -> None:
        if load.left > 0 and load.prio > PRIORITY["on_demand"]:
            load.prio = PRIORITY["on_demand"]
            heapq.heappush(self.heap, (load.prio, next(self.seq), load))

    def cut(self, load: Load) -> bool | None:
        """Stop a prefetch before its next chunk (AsyncIO's `drop_stale`): None if it already landed (or is
        on demand), else whether part of it moved. Its bytes left are never carried; it never lands."""
        if load.left == 0 or load.prio == PRIORITY["on_demand"]:
            return None
        if self.seg is not None and self.seg[0] is load:
            self._flush()
        started, load.left = load.left < load.nbytes, 0
        return started

    def _prune(self) -> bool:
        """Drop finished transfers and stale entries of promoted ones from the top; False when idle."""
        heap = self.heap
        while heap and (heap[0][2].left == 0 or heap[0][0] != heap[0][2].prio):
            heapq.heappop(heap)
        return bool(heap)

    def _best_ready(self) -> Load | None:
        top = self.heap[0][2]
        if top.ready_at <= self.now:
            return top
        ready = [(p, s, ld) for p, s, ld in self.heap if ld.left > 0 and p == ld.prio and ld.ready_at <= self.now]
        return min(ready)[2] if ready else None

    def _chunk(self, limit: float | None) -> Load | None:
        """Move one chunk that starts before `limit`; returns the transfer it belongs to (None: nothing to do)."""
        if not self._prune():
            return None
        load = self._best_ready()
        if load is None:  # every queued transfer waits for its slot: idle until the first slot is released
            first = min(ld.ready_at for p, _, ld in self.heap if ld.left > 0 and p == ld.prio)
            if limit is not None and first >= limit:
                return None
            self.now = first
            load = self._best_ready()
        if limit is not None and self.now >= limit:
            return None
        n = min(self.chunk, load.left)
        start, end = self.now, self.now + self.transfer_time(n)
        if self.seg is not None and self.seg[0] is load and self.seg[2] == start:
            self.seg[2], self.seg[3] = end, self.seg[3] + n
        else:
            self._flush()
            self.seg = [load, start, end, n]
        load.left -= n
        self.now = end
        if load.left == 0:
            load.end = end
            self._flush()
            self.done(load)
        return load

    def _flush(self) -> None:
        if self.seg is not None:
            self.emit(*self.seg)
            self.seg = None

    def advance(self, t: float) -> None:
        while self._chunk(t) is not None:
            pass

    def finish(self, load: Load) -> float:
        while load.left > 0:
            self._chunk(None)
        return load.end

    def finish_any(self) -> bool:
        while True:
            load = self._chunk(None)
            if load is None:
                return False
            if load.left == 0:
                return True

    def drain(self) -> None:
        while self._chunk(None) is not None:
            pass
        self._flush()


def belady_miss_flags(requests: Sequence[Sequence[int]], num_slots: int, bypass: bool = False) -> np.ndarray:
    """Which requests (flattened, in order) an optimal cache with `num_slots` slots misses (Belady: evict the
    key used farthest ahead), given its first `num_slots` keys for free (the best any preload can do).

    With `bypass` a missed key need not enter the cache: when it is used later than everything held, the cache
    keeps what it has (the key is served from elsewhere, e.g. computed on the CPU). That is the optimum for an
    executor that may compute an absent expert without loading it; without bypass, for one that must load it.
    """
    flat = np.array([k for group in requests for k in group], dtype=np.int64)
    n = len(flat)
    nxt = np.full(n, n, dtype=np.int64)
    order = np.argsort(flat, kind="stable")
    same = flat[order[1:]] == flat[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    missed = np.zeros(n, dtype=bool)
    held: dict[int, int] = {}
    heap: list[tuple[int, int]] = []
    for i in range(n):
        key, nu = int(flat[i]), int(nxt[i])
        if key not in held and len(held) >= num_slots:
            missed[i] = True
            while held.get(heap[0][1]) != -heap[0][0]:  # drop stale heap entries
                heapq.heappop(heap)
            if bypass and nu >= -heap[0][0]:
                continue
            del held[heapq.heappop(heap)[1]]
        held[key] = nu
        heapq.heappush(heap, (-nu, key))
    return missed


def belady_misses(requests: Sequence[Sequence[int]], num_slots: int, bypass: bool = False) -> np.ndarray:
    """Misses per group of requests of an optimal cache (see `belady_miss_flags`)."""
    group_of = np.repeat(np.arange(len(requests)), [len(g) for g in requests])
    flags = belady_miss_flags(requests, num_slots, bypass)
    return np.bincount(group_of, weights=flags, minlength=len(requests)).astype(np.int64)
