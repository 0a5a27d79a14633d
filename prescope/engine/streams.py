"""Streams and events: the only module that touches CUDA streams, with a CPU twin of the same interface.

The engine issues host-to-device copies on a copy stream and expert kernels on the compute stream, and
joins them with events: the compute stream waits only for the copy of the expert it is about to use, and
a copy into a slot waits for the last kernel that read the slot. `CpuStreams` runs the same calls on the
host, synchronously, with wall-clock timestamps as events, so every policy runs in CI without a GPU.

Timing events are optional (`timed=False` records none) because each one costs host time on the hot path.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager

import torch


class Streams(ABC):
    device: torch.device

    @abstractmethod
    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: object | None = None) -> object:
        """Copy `src` (host) into `dst` (device) on the copy stream after event `after`; returns its done event."""

    @abstractmethod
    def wait(self, event: object | None) -> None:
        """Make the compute stream wait for `event` (a copy's done event)."""

    @abstractmethod
    def record(self, on_copy: bool = False, timed: bool | None = None) -> object:
        """An event marking 'now' on the compute stream (or the copy stream); `timed` (default: the streams'
        setting) makes it usable for elapsed times."""

    @abstractmethod
    def seconds(self, start: object, end: object) -> float:
        """Elapsed seconds between two recorded events (synchronises as needed)."""

    @abstractmethod
    def synchronize(self) -> None: ...

    def wait_host(self, event: object | None) -> None:  # noqa: B027 - the CPU twin has nothing to wait for
        """Block the host until `event` has completed."""

    @abstractmethod
    def begin(self, after: object | None) -> object | None:
        """Order the copy stream after `after`; returns a start event (timed) for the transfer that follows."""

    @abstractmethod
    def issue(self, dst: torch.Tensor, src: torch.Tensor) -> object:
        """One chunk copy on the copy stream (the I/O worker's thread); returns its done event."""


class CudaStreams(Streams):
    def __init__(self, device: torch.device | str, timed: bool = True):
        self.device = torch.device(device)
        self.timed = timed
        self.compute = torch.cuda.current_stream(self.device)
        self.copier = torch.cuda.Stream(self.device)

    def copy(self, dst, src, after=None):
        if after is not None:
            self.copier.wait_event(after)
        with torch.cuda.stream(self.copier):
            dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event(enable_timing=self.timed)
        done.record(self.copier)
        return done

    def copy_many(self, pairs, after=None):
        """Several copies as one ordered unit (one expert's tensors); returns (start, done) events."""
        if after is not None:
            self.copier.wait_event(after)
        start = self.record(on_copy=True) if self.timed else None
        with torch.cuda.stream(self.copier):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event(enable_timing=self.timed)
        done.record(self.copier)
        return start, done

    def begin(self, after):
        if after is not None:
            self.copier.wait_event(after)
        return self.record(on_copy=True) if self.timed else None

    def issue(self, dst, src):
        with torch.cuda.stream(self.copier):
            dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event(enable_timing=self.timed)
        done.record(self.copier)
        return done

    def wait(self, event):
        if event is not None:
            self.compute.wait_event(event)

    def record(self, on_copy=False, timed=None):
        event = torch.cuda.Event(enable_timing=self.timed if timed is None else timed)
        event.record(self.copier if on_copy else self.compute)
        return event

    def seconds(self, start, end):
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def synchronize(self):
        torch.cuda.synchronize(self.device)

    def wait_host(self, event):
        if event is not None:
            event.synchronize()


class CpuStreams(Streams):
    """The CPU twin: copies happen at once, events are `time.perf_counter()` readings."""

    def __init__(self, device: torch.device | str = "cpu", timed: bool = True):
        self.device = torch.device(device)
        self.timed = timed

    def copy(self, dst, src, after=None):
        dst.copy_(src)
        return time.perf_counter()

    def copy_many(self, pairs, after=None):
        start = time.perf_counter()
        for dst, src in pairs:
            dst.copy_(src)
        return start, time.perf_counter()

    def begin(self, after):
        return time.perf_counter()

    def issue(self, dst, src):
        dst.copy_(src)
        return time.perf_counter()

    def wait(self, event):
        return None

    def record(self, on_copy=False, timed=None):
        return time.perf_counter()

    def seconds(self, start, end):
        return end - start

    def synchronize(self):
        return None


class Segments:
    """CUDA graphs captured back to back from one pass of Python code, split where the host must act between
    them (`split`), sharing one memory pool so tensors made by one graph stay valid for the next; replayed in
    the order they were captured (`replay`). Capture runs on a side stream; nothing executes while capturing.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(self.device)

    @contextmanager
    def capturing(self):
        """Capture everything issued inside the block (split into graphs by `split`)."""
        current = torch.cuda.current_stream(self.device)
        torch.cuda.synchronize(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            self._begin()
            try:
                yield self
            finally:
                self.graphs[-1].capture_end()
        current.wait_stream(self.stream)
        torch.cuda.synchronize(self.device)

    def split(self) -> int:
        """End the graph being captured and begin the next; returns the index of the one that ended."""
        self.graphs[-1].capture_end()
        self._begin()
        return len(self.graphs) - 2

    def _begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        self.graphs.append(graph)

    def replay(self, index: int) -> None:
        self.graphs[index].replay()

    def __len__(self) -> int:
        return len(self.graphs)


def make_streams(device: torch.device | str, timed: bool = True) -> Streams:
    device = torch.device(device)
    return CudaStreams(device, timed) if device.type == "cuda" else CpuStreams(device, timed)
