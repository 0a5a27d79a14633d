"""CUDA graphs for small networks run at every MoE layer: a predictor's forecast costs its launches, not
its arithmetic, so it is captured once per shape and replayed (`GraphCache`).

Capture is refused, before anything is captured, for a function that reads the device from the host
(`_NoHostReads` watches for `.item()`, `.tolist()`, `.cpu()` and the like during a warm-up run).
"""

from __future__ import annotations

import torch


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

    def __call__(self, key, fn, *inputs: torch.Tensor, device=None) -> torch.Tensor:
        """`device`: where the graph runs when the inputs are on the host (they are copied into its buffers
        there, and `fn` must move them itself when it runs eagerly); default: the first input's device."""
        device = inputs[0].device if device is None else torch.device(device)
        if not self.enabled or device.type != "cuda":
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
        return self._capture(key, fn, inputs, device)

    def _capture(self, key, fn, inputs, device) -> torch.Tensor:
        static = [x.to(device, copy=True) for x in inputs]
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
