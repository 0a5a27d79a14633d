"""The host time a policy's own work takes per MoE layer, as the engine measures it, for PreScope's gate.

The gate (`PreScope.plan_gain`) weighs what planning a layer saves against P, the host time planning costs. The
profile's P (`costs.plan`: predict_overhead_s + plan_overhead_s) is one number for every predictor, model and
host; measured on the H200, a routing-only LLaPor run eagerly took 3-4.5 ms per layer against the profile's
0.5 ms, and the gate planned layers where planning cost more than it saved (reports/h200/real-traces, revision
766c7a9: prescope 0.69x on_demand_lru at batch 4). Where the executor measures the policy's host work (the engine
calls `Policy.host_measured` after each MoE layer; the simulator never does: its host time is the profile's), P
is what a planned layer measured over what a layer run on demand measured, medians of the last WINDOW of each.

- Per step shape (the layer's tokens·K: prefill and decode differ): a new shape starts afresh.
- A layer's first planned measurement at a shape is left out: one-off work (a forecast's CUDA graph captured on
  its first call) is not what planning costs.
- While the gate runs layers on demand, every PROBE_EVERY-th of them is planned anyway (`probe`), so that P is
  measured again: the gate follows a host whose cost changed, and never stays on demand only because its first
  estimate was high.
"""

from __future__ import annotations

from collections import deque
from statistics import median


class HostMeter:
    """Measured host seconds per layer of one step shape: planned layers and layers run on demand."""

    WINDOW = 16  # measurements per kind whose median counts
    PROBE_EVERY = 32  # layers run on demand in a row after which one is planned to measure it again

    def __init__(self) -> None:
        self._start(None)

    def _start(self, shape: int | None) -> None:
        """Measure `shape` from nothing."""
        self.shape = shape
        self.samples: dict[bool, deque[float]] = {True: deque(maxlen=self.WINDOW), False: deque(maxlen=self.WINDOW)}
        self.first_seen: set[int] = set()  # layers whose first planned measurement at this shape was left out
        self.on_demand_run = 0  # layers run on demand in a row since the last planned one

    def _at(self, shape: int) -> None:
        if shape != self.shape:
            self._start(shape)

    def record(self, layer: int, shape: int, planned: bool, seconds: float) -> None:
        """One layer's measured host seconds (planned: predicted and planned; else run on demand by the gate)."""
        self._at(shape)
        if planned and layer not in self.first_seen:
            self.first_seen.add(layer)
            return
        self.samples[planned].append(seconds)

    def measuring(self, shape: int) -> bool:
        """Whether the executor measures this shape's layers (any measurement, or a left-out first one)."""
        return self.shape == shape and bool(self.first_seen or self.samples[True] or self.samples[False])

    def plan_host(self, shape: int) -> float | None:
        """P for this shape: the median planned layer's host time less the median on-demand one's (the planned
        median alone before a layer ran on demand), at least 0; None before a planned layer was measured."""
        on, off = self.samples[True], self.samples[False]
        if self.shape != shape or not on:
            return None
        return max(0.0, median(on) - (median(off) if off else 0.0))

    def probe(self, shape: int, pays: bool) -> bool:
        """The gate's decision for a layer (`pays`: plan it), with every PROBE_EVERY-th layer in a row on demand
        planned anyway where the executor measures: True to plan."""
        if pays or not self.measuring(shape):
            self.on_demand_run = 0
            return pays
        self.on_demand_run += 1
        if self.on_demand_run >= self.PROBE_EVERY:
            self.on_demand_run = 0
            return True
        return False
