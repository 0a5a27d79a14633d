"""The step arbiter replayed over measured step series (an estimate, not a run): per cell, each step's time under
the arm the arbiter picks is that step's measured time under the fixed policy standing for the arm, in the same
bench file: the gate's decisions `prescope[measured_gate=False]`, every layer planned `prescope[gate=False]`, every
layer on demand `on_demand_lru` (close to prescope's on-demand arm, not the same: its victims differ). The cache
state an arm leaves to the next step is not replayed. Variants: the arbiter as built; larger trials and windows;
step times less what a shadow per-layer LRU's misses would cost on the link (`load_ms` per miss), which removes
the routing's share of an on-demand step's time.

Usage: python reports/h200/routers/arbiter_replay.py FOLDER:LOAD_MS [FOLDER:LOAD_MS ...] (folders holding a
bench.json and routing.npz with those three policies; LOAD_MS the subject's expert load time)."""

from __future__ import annotations

import json
import statistics
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

from prescope.policies.arbiter import DEMAND, GATED, PLANNED, StepArbiter

STANDS_FOR = {GATED: "prescope[measured_gate=False]", PLANNED: "prescope[gate=False]", DEMAND: "on_demand_lru"}


def shadow_misses(route: np.ndarray, slots: int) -> np.ndarray:
    """Per step, the misses of an LRU cache of slots/L experts per layer fed the routing [steps, L, B, K]."""
    per = max(1, slots // route.shape[1])
    caches, out = [OrderedDict() for _ in range(route.shape[1])], []
    for step in route:
        misses = 0
        for cache, experts in zip(caches, step, strict=True):
            for e in sorted({int(x) for x in experts.ravel() if x >= 0}):
                if e in cache:
                    cache.move_to_end(e)
                    continue
                misses += 1
                cache[e] = None
                if len(cache) > per:
                    cache.popitem(last=False)
        out.append(misses)
    return np.array(out)


def arbiter(trials: int = 2, window: int = 4) -> StepArbiter:
    kind = type("Replayed", (StepArbiter,), {"TRIALS": trials, "WINDOW": window})
    replayed = kind()
    replayed.measured = True
    return replayed


def replay(series: dict[str, list[float]], subtract: np.ndarray, chooser: StepArbiter) -> list[float]:
    """The replayed run's step times: each step's under the arm chosen, the arbiter told that time less
    `subtract` of the step."""
    out = []
    for i in range(len(series[GATED])):
        arm = chooser.arm(i + 1, 1)
        out.append(series[arm][i])
        chooser.step_measured(series[arm][i] - subtract[i])
    return out


def main(specs: list[str]) -> None:
    variants = {"as built": (2, 4, False), "trials 3, window 8": (3, 8, False), "less shadow misses": (2, 4, True)}
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    print("| subject | budget | batch | gated | planned | on demand | measured prescope | "
          + " | ".join(f"replayed: {n}" for n in variants) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(variants))
    for spec in specs:
        folder, load = spec.rsplit(":", 1)
        data = json.loads((Path(folder) / "bench.json").read_text())
        routing = np.load(Path(folder) / "routing.npz")
        for cell in data["cells"]:
            if cell["policy"] != "on_demand_lru":
                continue
            same = {c["policy"]: c for c in data["cells"]
                    if c.get("budget") == cell["budget"] and c["batch"] == cell["batch"]}
            if not all(p in same for p in STANDS_FOR.values()):
                continue
            n = min(len(same[p]["decode_ms_steps"]) for p in STANDS_FOR.values())
            series = {arm: same[p]["decode_ms_steps"][-n:] for arm, p in STANDS_FOR.items()}
            misses = shadow_misses(routing[f"{cell['model']}__on_demand_lru__{cell['budget']}__{cell['batch']}"],
                                   cell["slots"])[-n:]
            means = {arm: statistics.mean(s) for arm, s in series.items()}
            row = [Path(folder).name, f"{cell['budget']:.0%}", str(cell["batch"]),
                   *(f"{means[a]:.1f}" for a in (GATED, PLANNED, DEMAND)),
                   f"{statistics.mean(same['prescope']['decode_ms_steps'][-n:]):.1f}" if "prescope" in same else ""]
            for name, (trials, window, shadow) in variants.items():
                subtract = float(load) * misses if shadow else np.zeros(n)
                got = statistics.mean(replay(series, subtract, arbiter(trials, window)))
                ratios[name].append(got / min(means.values()))
                row.append(f"{got:.1f}")
            print("| " + " | ".join(row) + " |")
    print("\nMean step over the best fixed arm's (mean, max): "
          + "; ".join(f"{n} {statistics.mean(r):.3f}, {max(r):.3f}" for n, r in ratios.items() if r))


if __name__ == "__main__":
    main(sys.argv[1:])
