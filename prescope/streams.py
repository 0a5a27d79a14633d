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
    def record(self, on_copy: bool = False) -> object:
        """An event marking 'now' on the compute stream (or the copy stream)."""

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

    def record(self, on_copy=False):
        event = torch.cuda.Event(enable_timing=True)
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

    def record(self, on_copy=False):
        return time.perf_counter()

    def seconds(self, start, end):
        return end - start

    def synchronize(self):
        return None


def make_streams(device: torch.device | str, timed: bool = True) -> Streams:
    device = torch.device(device)
    return CudaStreams(device, timed) if device.type == "cuda" else CpuStreams(device, timed)


class _HostRead(RuntimeError):
    pass


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Raises _HostRead at any tensor operation that waits for the device (this thread only)."""

    READS = frozenset({"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__",
                       "masked_select", "unique", "repeat_interleave", "synchronize"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu"
                                       for a in (*args[1:], *kwargs.values()))
        if name in self.READS or to_host:
            raise _HostRead(name)
        return func(*args, **kwargs)


class GraphCache:
    """`fn(*inputs) -> Tensor` replayed from CUDA graphs, one per key (the shapes of a repeating call).

    A small network run at every MoE layer (the prescope policy's forecast: LLaPor and its post-processing,
    ~40 kernels for one decode token) costs its kernel launches, not its arithmetic; a CUDA graph launches
    them as one. A key is captured the second time it is seen (one-off shapes such as a prefill stay eager),
    the captured graph is replayed once and checked against the eager result of the same inputs, and a key
    whose capture fails or disagrees stays eager. Inputs are copied into the graph's own buffers; the output
    is the graph's buffer, overwritten by the next replay of that key, so read it before calling again.
    Tensors off CUDA (the CPU twin) always run eagerly. `fn` must be free of host synchronisation.
    """

    TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.entries: dict[object, object] = {}  # key -> seen count | (graph, inputs, output) | "eager"
        self.pool = None
        self.captured = self.refused = 0

    def __call__(self, key, fn, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not inputs[0].is_cuda:
            return fn(*inputs)
        entry = self.entries.get(key, 0)
        if isinstance(entry, tuple):
            graph, static, output = entry
            for buf, x in zip(static, inputs, strict=True):
                buf.copy_(x, non_blocking=True)
            graph.replay()
            return output
        if entry == 0 or entry == "eager":
            self.entries[key] = entry if entry == "eager" else 1
            return fn(*inputs)
        return self._capture(key, fn, inputs)

    def _capture(self, key, fn, inputs) -> torch.Tensor:
        device = inputs[0].device
        static = [x.clone() for x in inputs]
        side, current = torch.cuda.Stream(device), torch.cuda.current_stream(device)
        side.wait_stream(current)
        try:
            # warm-up off the capture, as CUDA graphs ask (lazy inits, workspaces), watching for host reads:
            # a capture that fails part-way can leave CUDA's random generator unusable, so none is attempted
            with torch.cuda.stream(side), _NoHostReads():
                expected = fn(*static)
        except _HostRead:
            self.entries[key], self.refused = "eager", self.refused + 1
            return fn(*inputs)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the I/O worker keeps issuing copies on its own stream while this thread captures
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                output = fn(*static)
            graph.replay()
            agrees = output.shape == expected.shape and torch.allclose(output, expected, **self.TOLERANCE)
        except RuntimeError:
            agrees = False
        if not agrees:
            self.entries[key], self.refused = "eager", self.refused + 1
            return expected
        self.pool = self.pool or graph.pool()
        self.entries[key], self.captured = (graph, static, output), self.captured + 1
        return output
