"""PreScope's gate checked against the clock: where the executor measures whole steps (the engine), each step
shape tries the gate's per-layer decisions ("gated") against planning every layer ("planned", what
`gate=False` does), runs the faster by measured step time, and tries the other again now and then.

Why: the gate's rule (`Gate.plan_gain`) models a layer from the profile and the measured host time, and where
the model is wrong it runs layers on demand where planning wins. Measured on the H200 at revision afda9cb
(reports/h200/real-traces/qwen3-afda9cb): on the real Qwen3-30B-A3B trace at batch 16 the gate ran 76 % of
the layers on demand and took 324.9 ms per step against 240.9 ms for `prescope[gate=False]`; on the
DeepSeek-V2-Lite twin at 25 %, batch 1, 42.0 ms against 35.8 ms. Elsewhere it wins by as much (batch 1 and 4 on
the same trace: 43.2 and 81.9 ms against 61.6 and 129.3 ms). The gate must never make prescope slower than its
ungated self by more than the spread: what the model cannot settle, measured step times do.

- Per step shape (the step's tokens·K): prefill and decode, and each batch size, learn apart.
- A shape's first SETTLE steps are not counted and run gated (the first decode step runs eagerly and the
  next captures the step's CUDA graphs); the planned arm's first step at a shape is not counted either (the
  forecast graphs of layers it plans for the first time are captured there; the gated arm's first run is
  among the settling steps).
- Trials alternate the arms until each has TRIALS counted steps; then the arm with the lower median of its
  last WINDOW steps runs, and every REPROBE-th step the other, so that a change (the cache settling, another
  host load) is followed. Trials and probes are part of the run: a measured run pays for them.
- Without measurements (the simulator, whose step time is the profile's arithmetic) only "gated" runs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from statistics import median

GATED, PLANNED = "gated", "planned"


@dataclass
class _Shape:
    """What one step shape measured: counted step seconds per arm, and the arms that ran."""

    window: int
    steps: int = 0  # steps begun at this shape
    since_probe: int = 0  # steps of the best arm since the other one last ran
    ran: set[str] = field(default_factory=set)  # arms that ran at this shape (the first run is not counted)
    samples: dict[str, deque] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=lambda: {GATED: 0, PLANNED: 0})  # steps run per arm

    def __post_init__(self) -> None:
        self.samples = {GATED: deque(maxlen=self.window), PLANNED: deque(maxlen=self.window)}


class StepArbiter:
    """The arm of each step ("gated" or "planned") from measured step times (module docstring)."""

    SETTLE = 2  # a shape's first steps, not counted (the eager first decode step, the graphs' capture)
    TRIALS = 2  # counted steps per arm before the faster one is chosen
    WINDOW = 4  # steps per arm whose median counts
    REPROBE = 16  # steps of the faster arm after which the other runs once
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
        tried = {a: len(at.samples[a]) + (a in at.ran) for a in (GATED, PLANNED)}
        if min(len(at.samples[GATED]), len(at.samples[PLANNED])) < self.TRIALS:  # trials: the arm tried less
            return GATED if tried[GATED] <= tried[PLANNED] else PLANNED
        best = self.best(at)
        at.since_probe += 1
        if at.since_probe > self.REPROBE:
            at.since_probe = 0
            return PLANNED if best == GATED else GATED
        return best

    @staticmethod
    def best(at: _Shape) -> str:
        """The arm with the lower median step time (gated on a tie)."""
        return PLANNED if median(at.samples[PLANNED]) < median(at.samples[GATED]) else GATED

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
        if at.steps <= self.SETTLE or arm not in at.ran:  # settling, or the arm's first run at this shape
            at.ran.add(arm)
            return
        at.samples[arm].append(seconds)

    def summary(self) -> dict[int, dict]:
        """Per shape: steps run per arm, counted samples per arm (milliseconds) and the faster arm."""
        return {shape: {"runs": dict(at.runs), "best": self.best(at) if all(at.samples.values()) else None,
                        **{f"{a}_ms": [round(s * 1e3, 3) for s in at.samples[a]] for a in (GATED, PLANNED)}}
                for shape, at in self.shapes.items()}
