"""AsyncIO: a dedicated I/O worker that owns the copy stream, with a priority queue and chunked copies.

Without it the engine issues every copy on the copy stream the moment a policy asks, so the stream runs
them first come, first served: an on-demand load of the running layer waits behind every prefetch queued
before it. With it (`EngineConfig.async_io`, or a policy that asks for it, such as `prescope`) the engine
only *submits* transfers; one worker thread issues them, a chunk at a time:

- priority: on-demand loads first (issued at once by the compute thread itself), then prefetches by the
  step and layer that needs them (the nearest first; within one layer, the order the plan ranked them);
- chunks: an expert's tensors are cut into pieces of at most `chunk_bytes`, and at most `depth` chunks are
  issued ahead of the copy engine, so a newly submitted on-demand load overtakes every queued prefetch
  chunk after at most `depth` chunks already handed to the hardware;
- events: a transfer's done event exists once its last chunk is issued; `ready()` promotes a transfer the
  running layer needs to on-demand and blocks until that event exists, and the compute stream then waits
  on the event alone. A copy into a slot first waits for the slot's release event (the last kernel that
  read it), so a slot is never overwritten while a kernel still reads it;
- cancellation: a slot given to another expert cancels the chunks of its old transfer not yet issued; a
  prefetch its layer did not use (the layer ran, or its routing is known and leaves the expert out) is cut
  before its next chunk, so a wrong prediction costs the link only the chunks already issued.

On the CPU (`streams.CpuStreams`) the same worker thread really runs the copies, chunk by chunk, and a
transfer's "issued" means its bytes are in place: CI exercises the queue, the promotion and the
cancellation with real concurrency.

Letters: S slots.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from prescope.engine.streams import Streams

ON_DEMAND, PREFETCH = 0, 1


@dataclass(eq=False)
class Transfer:
    """One expert's copy into one slot. `need` orders prefetches: the global layer index that uses it."""

    key: tuple[int, int]
    slot: int
    chunks: list[tuple[torch.Tensor, torch.Tensor]]  # (dst, src) pieces, in order
    after: object | None  # the slot's release event
    speculative: bool
    need: int
    issued: threading.Event = field(default_factory=threading.Event)
    start: object | None = None  # event at the first chunk (timed streams only)
    done: object | None = None  # event after the last chunk
    next: int = 0  # chunks issued so far
    busy: bool = False  # a chunk is being issued right now
    cancelled: bool = False
    priority: tuple = ()


def chunked(pairs: list[tuple[torch.Tensor, torch.Tensor]], chunk_bytes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(dst, src) pairs of contiguous tensors cut into flat pieces of at most `chunk_bytes` each."""
    pieces = []
    for dst, src in pairs:
        d, s = dst.view(-1), src.view(-1)
        step = max(1, chunk_bytes // max(1, s.element_size()))
        pieces += [(d[i:i + step], s[i:i + step]) for i in range(0, s.numel(), step)]
    return pieces


class IOWorker:
    """The thread that owns the copy stream: submit, promote (`ready`), cancel, drain, close."""

    def __init__(self, streams: Streams, chunk_bytes: int, depth: int):
        if chunk_bytes < 1 or depth < 1:
            raise ValueError(f"AsyncIO needs chunk_bytes >= 1 and depth >= 1, got {chunk_bytes}, {depth}")
        self.streams, self.chunk_bytes, self.depth = streams, chunk_bytes, depth
        self._heap: list[tuple[tuple, Transfer]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._idle = threading.Condition(self._cond)
        self._busy = 0  # transfers submitted and neither fully issued nor cancelled
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="prescope-io", daemon=True)
        self._thread.start()

    # ---- the compute thread's side ---------------------------------------------------------------------
    def submit(self, key, slot: int, pairs, after, speculative: bool, need: int) -> Transfer:
        """Queue a prefetch for the worker; an on-demand load is issued at once on this thread (the copy
        stream takes it behind at most `depth` chunks in flight, ahead of every queued one), because
        handing it to the worker costs two thread switches for a copy the running layer waits on."""
        t = Transfer(key, slot, chunked(pairs, self.chunk_bytes), after, speculative, need)
        with self._cond:
            self._check()
            if speculative:
                self._busy += 1
                self._push(t, PREFETCH)
                self._cond.notify()
                return t
        t.start = self.streams.begin(after)
        for dst, src in t.chunks:
            t.done = self.streams.issue(dst, src)
        t.next = len(t.chunks)
        t.issued.set()
        return t

    def ready(self, t: Transfer) -> object:
        """The done event of `t`: a transfer the running layer needs is taken over from the queue and its
        remaining chunks issued at once on this thread, as an on-demand load is (ahead of every queued
        prefetch, behind at most the chunk the worker is issuing), so the host does not wait for the copy."""
        if t.cancelled:
            raise RuntimeError(f"transfer of {t.key} into slot {t.slot} was cancelled; nothing to wait for")
        if not t.issued.is_set():
            with self._cond:
                self._check()
                while t.busy:  # the worker is issuing one of its chunks: let it finish that one
                    self._idle.wait(0.05)
                    self._check()
                take = not t.issued.is_set()
                if take:
                    first, t.next = t.next, len(t.chunks)  # the worker skips it from now on
                    t.priority = (ON_DEMAND, 0, next(self._seq))
            if take:
                try:
                    if first == 0:
                        t.start = self.streams.begin(t.after)
                    for dst, src in t.chunks[first:]:
                        t.done = self.streams.issue(dst, src)
                except BaseException as exc:  # the copy path is broken: every later call says so
                    with self._cond:
                        self.error, t.cancelled = self.error or exc, True
                        self._busy -= 1
                        self._idle.notify_all()
                    raise
                with self._cond:
                    self._busy -= 1
                    t.issued.set()
                    self._idle.notify_all()
        self._check()
        return t.done

    def cancel(self, t: Transfer) -> bool:
        """Issue no more chunks of `t`; True if none was issued yet (the transfer never started)."""
        with self._cond:
            if t.issued.is_set() or t.cancelled:
                return False
            t.cancelled = True
            self._busy -= 1
            self._idle.notify_all()
            return t.next == 0 and not t.busy

    def drop_stale(self, now: int, routed=None) -> list[Transfer]:
        """Cancel the prefetches that can no longer be used: those whose layer has already run (`need` < `now`)
        and, given `routed` (the running layer's experts), those for the running layer (`need` == `now`) of an
        expert it does not route. One under way is cut before its next chunk (`Transfer.next` > 0: its slot
        holds part of the expert, and the caller must free it). Returns them."""
        with self._cond:
            stale = [t for _, t in self._heap if t.speculative and not t.cancelled and not t.issued.is_set()
                     and t.priority[0] == PREFETCH
                     and (t.need < now or (routed is not None and t.need == now and t.key[1] not in routed))]
            stale = list(dict.fromkeys(stale))
            for t in stale:
                t.cancelled = True
                self._busy -= 1
            if stale:
                self._idle.notify_all()
        return stale

    def drain(self) -> None:
        """Block until every submitted transfer is issued (or cancelled)."""
        with self._cond:
            while self._busy and self.error is None:
                self._idle.wait(0.5)
            self._check()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()

    # ---- the worker ------------------------------------------------------------------------------------
    def _push(self, t: Transfer, cls: int) -> None:
        t.priority = (cls, t.need if cls == PREFETCH else 0, next(self._seq))
        heapq.heappush(self._heap, (t.priority, t))

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the I/O worker failed: {self.error!r}") from self.error

    def _next_chunk(self):
        """Under the lock: the highest-priority live transfer and its next chunk, or None to stop."""
        while True:
            while not self._heap and not self._stop:
                self._cond.wait()
            if not self._heap:
                return None
            priority, t = self._heap[0]
            if t.cancelled or t.issued.is_set() or priority != t.priority or t.next >= len(t.chunks):
                heapq.heappop(self._heap)  # stale entry: cancelled, issued, or taken over by `ready`
                continue
            if t.next == len(t.chunks) - 1:  # its last chunk: the entry leaves the queue
                heapq.heappop(self._heap)
            return t

    def _run(self) -> None:
        in_flight: deque = deque()
        try:
            while True:
                with self._cond:
                    t = self._next_chunk()
                    if t is None:
                        return
                    index, t.busy = t.next, True
                # issued outside the lock; only this thread issues, so a transfer submitted after a cancel()
                # is issued after the one chunk of the cancelled transfer that may be under way
                dst, src = t.chunks[index]
                if index == 0:
                    t.start = self.streams.begin(t.after)
                mark = self.streams.issue(dst, src)
                with self._cond:
                    t.next, t.busy = index + 1, False
                    self._idle.notify_all()  # `ready` may be waiting for this chunk to be issued
                    if t.next == len(t.chunks) and not t.cancelled:
                        t.done = mark
                        self._busy -= 1
                        t.issued.set()
                        self._idle.notify_all()
                in_flight.append(mark)
                if len(in_flight) > self.depth:  # keep at most `depth` chunks ahead of the copy engine
                    self.streams.wait_host(in_flight.popleft())
        except BaseException as exc:  # surfaces in the compute thread at its next call
            with self._cond:
                self.error = exc
                self._idle.notify_all()
