"""PreScope's gate checked against the clock: where the executor measures whole steps (the engine), each step
shape tries the gate's per-layer decisions ("gated") against planning every layer ("planned", what
`gate=False` does) and against planning none ("demand": every layer on demand), runs the fastest by measured
step time, and tries the others again now and then.

Why: the gate's rule (`Gate.plan_gain`) models a layer from the profile and the measured host time, and where
the model is wrong it runs layers on demand where planning wins. Measured on the H200 at revision afda9cb
(reports/h200/real-traces/qwen3-afda9cb): on the real Qwen3-30B-A3B trace at batch 16 the gate ran 76 % of
the layers on demand and took 324.9 ms per step against 240.9 ms for `prescope[gate=False]`; on the
DeepSeek-V2-Lite twin at 25 %, batch 1, 42.0 ms against 35.8 ms. Elsewhere it wins by as much (batch 1 and 4 on
the same trace: 43.2 and 81.9 ms against 61.6 and 129.3 ms). And where both lose to loading on demand (the Mixtral
twin at 25 %, batch 1: 36.5 and 35.6 ms against 23.1 ms for `on_demand_lru`; the same Qwen3 trace at batch 1 and
4), the gate ran too few layers on demand. The gate must never make prescope slower than its ungated self, nor
than running on demand, by more than the spread: what the model cannot settle, measured step times do.
Measured at f5f7be9 (reports/h200/routers/README.md, real-traces/README.md): the Qwen3 trace at batch 1 32.7 ms
against 36.5 for LRU and 35.5 for the gate alone; DeepSeek 25 % batch 1 33.5 against 41.9 for LRU; the trials
cost up to 17 % in a 31-step run (Mixtral 25 % batch 4), and at Mixtral 25 % batch 1, where a step's time swings
9-99 ms with its routing, a few trial steps per arm compare the routing more than the arms (0.81x LRU).

- Per step shape (the step's tokens·K): prefill and decode, and each batch size, learn apart.
- A shape's first SETTLE steps are not counted and run gated (the first decode step runs eagerly and the
  next captures the step's CUDA graphs); the planned arm's first step at a shape is not counted either (the
  forecast graphs of layers it plans for the first time are captured there; the gated arm's first run is
  among the settling steps; the on-demand arm captures nothing).
- Trials take the arms in turn until each has TRIALS counted steps, or one counted step CLEAR times slower than
  another arm's fastest (a clear loser is not tried twice); then the arm with the lowest median of its last
  WINDOW steps runs, and every REPROBE-th step one of the others, in turn, so that a change (the cache
  settling, another host load) is followed. Trials and probes are part of the run: a measured run pays for
  them (about 9 of a shape's first steps).
- Without measurements (the simulator, whose step time is the profile's arithmetic) only "gated" runs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from statistics import median

GATED, PLANNED, DEMAND = "gated", "planned", "demand"
ARMS = (GATED, PLANNED, DEMAND)


@dataclass
class _Shape:
    """What one step shape measured: counted step seconds per arm, and the arms that ran."""

    window: int
    steps: int = 0  # steps begun at this shape
    since_probe: int = 0  # steps of the best arm since another one last ran
    probes: int = 0  # probes run (which of the others the next one tries)
    ran: set[str] = field(default_factory=set)  # arms that ran at this shape (the planned arm's first not counted)
    samples: dict[str, deque] = field(init=False)  # the last `window` counted step times per arm
    runs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ARMS, 0))  # steps run per arm

    def __post_init__(self) -> None:
        self.samples = {arm: deque(maxlen=self.window) for arm in ARMS}


class StepArbiter:
    """The arm of each step ("gated", "planned" or "demand") from measured step times (module docstring)."""

    SETTLE = 2  # a shape's first steps, not counted (the eager first decode step, the graphs' capture)
    TRIALS = 2  # counted steps per arm before the faster one is chosen
    WINDOW = 4  # steps per arm whose median counts
    REPROBE = 16  # steps of the fastest arm after which another runs once
    CLEAR = 1.25  # a counted step this many times another arm's fastest ends the arm's trials
    SHAPES = 64  # shapes remembered (the oldest forgotten beyond)

    def __init__(self) -> None:
        self.measured = False  # the executor reported a step time (`step_measured`)
        self.shapes: dict[int, _Shape] = {}
        self.running: tuple[int, int, str] | None = None  # (step, shape, arm) of the step in progress

    def arm(self, step: int, shape: int) -> str:
        """The arm of step `step` at `shape`, chosen at its first MoE layer and kept for the others."""
        if self.running is not None and self.running[0] == step and self.running[1] == shape:
            return self.running[2]
        at = self.shapes.get(shape)
        if at is None:
            if len(self.shapes) >= self.SHAPES:
                del self.shapes[next(iter(self.shapes))]
            at = self.shapes[shape] = _Shape(self.WINDOW)
        at.steps += 1
        arm = self._choose(at)
        at.runs[arm] += 1
        self.running = (step, shape, arm)
        return arm

    def _choose(self, at: _Shape) -> str:
        if not self.measured or at.steps <= self.SETTLE:
            return GATED
        trying = [a for a in ARMS if not self._tried(at, a)]
        if trying:  # trials: the arm tried least (the first in ARMS on a tie)
            return min(trying, key=lambda a: len(at.samples[a]) + (a in at.ran))
        best = self.best(at)
        at.since_probe += 1
        if at.since_probe > self.REPROBE:
            at.since_probe, at.probes = 0, at.probes + 1
            others = [a for a in ARMS if a != best]
            return others[at.probes % len(others)]
        return best

    def _tried(self, at: _Shape, arm: str) -> bool:
        """The arm's trials are over: TRIALS counted steps, or one CLEAR times slower than another's fastest."""
        mine = at.samples[arm]
        if len(mine) >= self.TRIALS:
            return True
        others = [min(at.samples[a]) for a in ARMS if a != arm and at.samples[a]]
        return bool(mine) and bool(others) and min(mine) > self.CLEAR * min(others)

    @staticmethod
    def best(at: _Shape) -> str:
        """The arm with the lowest median step time of those measured (the first in ARMS on a tie)."""
        timed = [a for a in ARMS if at.samples[a]]
        return min(timed, key=lambda a: median(at.samples[a])) if timed else GATED

    def step_measured(self, seconds: float) -> None:
        """The executor's measured time of the step that ran last (counted for its shape and arm)."""
        self.measured = True
        if self.running is None:
            return
        _, shape, arm = self.running
        self.running = None
        at = self.shapes.get(shape)
        if at is None:
            return
        if at.steps <= self.SETTLE or (arm == PLANNED and arm not in at.ran):  # settling, or the graphs' capture
            at.ran.add(arm)
            return
        at.samples[arm].append(seconds)

    def summary(self) -> dict[int, dict]:
        """Per shape: steps run per arm, counted samples per arm (milliseconds) and the faster arm."""
        return {shape: {"runs": dict(at.runs), "best": self.best(at) if all(at.samples.values()) else None,
                        **{f"{a}_ms": [round(s * 1e3, 3) for s in at.samples[a]] for a in ARMS}}
                for shape, at in self.shapes.items()}
