"""What the engine measured: one row per transfer and kernel, one entry per forward call, and the host's
own time per MoE layer.

Rows are events on the device's streams (CUDA events, or host clock readings on the CPU twin) turned into
seconds since the first step only when asked (`timeline`), so the decode loop records without waiting.
Timing modes (`EngineConfig.timing`): "full" records every operation, "steps" only step boundaries, "off"
nothing but the host-time counters.

Letters: L MoE layers.
"""

from __future__ import annotations

import time

import pandas as pd

from prescope.policies.protocol import LayerRun
from prescope.timeline import make_timeline, step_summary

TIMELINE_COLUMNS = ("lane", "step", "layer", "expert", "kind", "tokens", "bytes", "start", "end")


class Records:
    """The engine's measurements; `streams` records its events, `stats` gives the cache's counters."""

    def __init__(self, streams, num_layers: int, timing: str, stats, about: dict):
        self.streams, self.num_layers, self.timing, self.stats, self.about = streams, num_layers, timing, stats, about
        self.clear()

    def clear(self) -> None:
        L = self.num_layers
        self.rows: list[list] = []
        self.steps: list[dict] = []
        self.step, self.phase = -1, "prefill"
        self.t0 = None  # (first event, host clock) of the first step
        self.last_exit = None  # event after the last MoE layer's host work
        self.host_seconds = [0.0] * L  # wall time of the engine's own work per MoE layer
        self.sync_seconds = [0.0] * L  # of which waiting for the device (the layer's routing)
        self.plan_seconds = [0.0] * L  # of which in the policy: prediction, planning (`plan` and `plan_ahead`)
        self.victim_seconds = [0.0] * L  # and in the policy's victim choices
        self.forecast_wait_seconds = [0.0] * L  # of those two, waiting for the device (reading the forecast)
        self.stopped = {"queued": 0, "part_way": 0}  # AsyncIO prefetches no layer used, stopped
        # per step: the host's own time in the engine (all its layers, waiting for the device excluded), and
        # the wall time of issuing the whole step where it is replayed from CUDA graphs
        self.own_seconds: dict[int, float] = {}
        self.issue_seconds: dict[int, float] = {}
        # per step: the policy's own host work (prediction, planning, victims; waiting for the device excluded),
        # the policy's wait for the device (reading its forecast), CPU experts started, and the host's wait for
        # their results (the layer's combine needs them)
        self.plan_by_step: dict[int, float] = {}
        self.wait_by_step: dict[int, float] = {}
        self.cpu_runs: dict[int, int] = {}
        self.cpu_wait_by_step: dict[int, float] = {}

    # ---- steps ---------------------------------------------------------------------------------------
    def begin_step(self, tokens: int, phase: str) -> None:
        self.step += 1
        self.phase = phase
        if self.timing != "off":
            if self.t0 is None:
                self.t0 = (self.streams.record(timed=True), time.perf_counter())
            stats = self.stats()
            self.steps.append({"step": self.step, "phase": phase, "tokens": tokens,
                               "start": self.streams.record(timed=True), "end": None,
                               "counts": (stats.hits, stats.misses, stats.loads)})

    def end_step(self) -> None:
        if self.timing != "off" and self.steps:
            self.steps[-1]["end"] = self.streams.record(timed=True)
            stats, before = self.stats(), self.steps[-1]["counts"]
            self.steps[-1]["counts"] = (stats.hits - before[0], stats.misses - before[1], stats.loads - before[2])
            if self.last_exit is not None:
                self.row("gpu", -1, -1, "dense", 0, 0, self.last_exit, self.steps[-1]["end"])
        self.last_exit = None

    # ---- rows ----------------------------------------------------------------------------------------
    def mark(self):
        """An event now on the compute stream, when every operation is timed."""
        return self.streams.record() if self.timing == "full" else None

    def row(self, lane, layer, expert, kind, tokens, nbytes, start, end) -> None:
        if self.timing == "full" and start is not None:
            self.rows.append([lane, self.step, layer, expert, kind, tokens, nbytes, start, end])

    def cpu_row(self, layer, expert, tokens, start, end) -> None:
        if self.timing == "full":  # host clock, converted to the device clock in timeline()
            self.rows.append(["cpu", self.step, layer, expert, "cpu_expert", tokens, 0, ("host", start), ("host", end)])

    def synced(self, layer: int, seconds: float) -> None:
        """`seconds` of the running layer's host time went into waiting for the device."""
        self.sync_seconds[layer] += seconds
        self.own_seconds[self.step] = self.own_seconds.get(self.step, 0.0) - seconds

    def planned(self, layer: int, run: LayerRun) -> None:
        """The policy's time in the running layer (`run`: plan, plan ahead and victims, of which its wait for the
        device, the forecast's read, is not host work: `LayerRun.host_s`)."""
        host_s = run.host_s
        wait_s = run.plan_s + run.ahead_s + run.victim_s - host_s
        self.plan_seconds[layer] += run.plan_s + run.ahead_s
        self.victim_seconds[layer] += run.victim_s
        self.forecast_wait_seconds[layer] += wait_s
        self.plan_by_step[self.step] = self.plan_by_step.get(self.step, 0.0) + host_s
        self.wait_by_step[self.step] = self.wait_by_step.get(self.step, 0.0) + wait_s
        self.own_seconds[self.step] = self.own_seconds.get(self.step, 0.0) - wait_s

    def cpu_started(self, count: int) -> None:
        self.cpu_runs[self.step] = self.cpu_runs.get(self.step, 0) + count

    def cpu_waited(self, seconds: float) -> None:
        self.cpu_wait_by_step[self.step] = self.cpu_wait_by_step.get(self.step, 0.0) + seconds

    def layer_done(self, layer: int, began: float, entry) -> None:
        """Host time in the engine's own code; the GPU span since the last MoE layer is attention and dense work."""
        spent = time.perf_counter() - began
        self.host_seconds[layer] += spent
        self.own_seconds[self.step] = self.own_seconds.get(self.step, 0.0) + spent
        if self.timing == "full" and entry is not None:
            kind = "attention" if self.last_exit is not None else "dense"
            step_start = self.steps[-1]["start"] if self.steps else entry
            self.row("gpu", layer, -1, kind, 0, 0, self.last_exit or step_start, entry)
            self.last_exit = self.mark()

    # ---- tables --------------------------------------------------------------------------------------
    def timeline(self, spans) -> pd.DataFrame:
        """Every recorded operation, seconds since the first step began (DESIGN.md §2 schema); `spans(start,
        end)` resolves a row's two events (or AsyncIO transfer) into event pairs, None when it never ran."""
        self.streams.synchronize()
        if self.t0 is None:
            return pd.DataFrame(columns=TIMELINE_COLUMNS)
        t0, host0 = self.t0

        def at(event) -> float:
            if isinstance(event, tuple):
                return event[1] - host0
            return self.streams.seconds(t0, event)

        records = []
        for r in self.rows:
            pair = spans(r[7], r[8])
            if pair is not None:
                records.append(dict(zip(TIMELINE_COLUMNS, [*r[:7], at(pair[0]), at(pair[1])], strict=True)))
        return make_timeline(pd.DataFrame(records, columns=TIMELINE_COLUMNS), source="measured",
                             profile=self.about["device"], meta={k: v for k, v in self.about.items() if k != "device"})

    def step_table(self) -> pd.DataFrame:
        """One row per forward call: phase, tokens, start, end, latency, and the cache's hits, misses and loads."""
        self.streams.synchronize()
        t0 = self.t0[0] if self.t0 else None
        rows = [{"step": s["step"], "phase": s["phase"], "tokens": s["tokens"],
                 "start": self.streams.seconds(t0, s["start"]), "end": self.streams.seconds(t0, s["end"]),
                 "hits": s["counts"][0], "misses": s["counts"][1], "loads": s["counts"][2]}
                for s in self.steps if s["end"] is not None]
        frame = pd.DataFrame(rows, columns=["step", "phase", "tokens", "start", "end", "hits", "misses", "loads"])
        frame["latency"] = frame["end"] - frame["start"]
        return frame

    def summary(self, timeline: pd.DataFrame) -> pd.DataFrame:
        """Per step: latency, bytes moved, loads, hits, misses, GPU busy and idle time (timing "full")."""
        steps = self.step_table()
        table = step_summary(timeline, steps[["step", "hits", "misses"]])
        return table.merge(steps[["step", "phase"]], on="step", how="left")
