"""PreScope's gate in decision replay: which layers it would run on demand on a committed bench cell's routing.

A bench run (`prescope bench`) keeps each cell's decode routing (routing.npz, [steps, L, B, K]). This replays a
`prescope` cell's routing through the simulator (`sim.simulator.replay`, the cell's budget, batch and link) with
the policy deciding on the costs the engine decided with (`policy_profile`: the bench's profile, where the host
hides the device: `Costs.host_hides_device`), and counts the layers the gate ran on demand (`PreScope.lean`), for
the gate as it is (`plan_gain`) and as it was (`prescope[layer_gate=True]`: a layer's own `device_slack` against
the planning cost), beside the share the engine measured (`plans_lean_share`).

It is a replay of decisions, not a timing: the cache evolves on the simulator's clock, which is not the engine's,
and the forecast is the memory's (no predictor: LLaPor needs the hidden states the bench did not keep), so the
prefetches, and with them later misses, differ from the engine's. The replay starts from the policy's own reset
state, not from the state the prefill left: the first steps miss more than the engine's did, so the share over
the second half of the steps (`lean_late`) is given beside the whole run's.

Command (writes reports/h200/routers/gate-replay.md, from DEFAULT_BENCHES): `python -m
prescope.experiments.gatereplay --out reports/h200/routers/gate-replay.md`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from prescope.experiments.benchfile import read_bench
from prescope.experiments.fidelity import cell_key, cell_layouts, routing_trace
from prescope.files import check_output, source_revision, verify, write_with_sidecar
from prescope.policies.cache import ExpertCache
from prescope.policies.peers import PreScope
from prescope.policies.protocol import LayerView
from prescope.sim.simulator import replay

# the learned-routing runs on the fast engine (h200-fast-engine), then the runs where the gate was first measured
# (h200-engine, the engine launching experts from Python; reports/h200/comparison/README.md) and the engine table
DEFAULT_BENCHES = ("reports/h200/routers/deepseek", "reports/h200/routers/mixtral16",
                   "reports/h200/routers/mixtral16-b64", "reports/h200/routers/qwen3-prescope",
                   "reports/h200/comparison/olmoe-tiny-routing-b1-955bd65.json",
                   "reports/h200/comparison/olmoe-tiny-routing-5f83609.json",
                   "reports/h200/comparison/olmoe-tiny-routing-50pct-7b9d049.json",
                   "reports/h200/comparison/qwen3-8-bec855b.json", "reports/h200/comparison/mixtral4-bec855b.json",
                   "reports/h200/engine/bench.json")


class GateReplayError(ValueError):
    """A bench folder that cannot be replayed (no routing for a cell, an unknown subject)."""


# gate -> PreScope options: the gate as it is, and as it was (`layer_gate`: each layer's own device_slack
# against the planning cost, the rule at e06fbff and before)
GATES = {"plan_gain": {}, "layer_slack": {"layer_gate": True}}


def read_cells(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A bench run's bench.json and routing: a folder holding bench.json and routing.npz, or a bench JSON file
    with `<stem>.routing.npz` (or routing.npz) beside it; both verified against their checksums."""
    path = Path(path)
    bench = path / "bench.json" if path.is_dir() else path
    routing_path = next((p for p in (bench.with_name(f"{bench.stem}.routing.npz"), bench.with_name("routing.npz"))
                         if p.is_file()), None)
    if not bench.is_file() or routing_path is None:
        raise GateReplayError(f"{path}: not a bench run with its routing (bench.json and routing.npz, or "
                              f"NAME.json and NAME.routing.npz)")
    data = read_bench(bench)
    verify(routing_path)
    with np.load(routing_path) as npz:
        return data, {k: npz[k] for k in npz.files}


def replay_gate(route: np.ndarray, layout, dense: int, budget: float, batch: int, profile: str, *,
                gate: str = "plan_gain", async_io: bool = False, first_position: int = 0,
                max_steps: int | None = None) -> dict:
    """One cell's routing [steps, L, B, K] replayed through PreScope with `gate` (a key of GATES), deciding on
    `profile`'s engine costs: the share of its MoE layers run on demand over the whole replay (`lean`) and over
    its second half (`lean_late`), the misses per layer the gate saw, the layers replayed."""
    if gate not in GATES:
        raise GateReplayError(f"unknown gate {gate!r}; known: {', '.join(GATES)}")
    policy, seen = PreScope(**GATES[gate]), []
    judge = policy.speculation_pays

    def recorded(view: LayerView, cache: ExpertCache) -> bool:
        misses = sum(not cache.is_warm((view.layer, e)) for e in view.experts)
        pays = judge(view, cache)
        seen.append((not pays, misses))
        return pays

    policy.speculation_pays = recorded
    trace = routing_trace(route, layout, first_position)
    replay(trace, policy, profile, budget_share=budget, batch_size=batch, dense_params=dense, max_steps=max_steps,
           policy_profile=profile, async_io=async_io)
    if not seen:
        raise GateReplayError("the replay made no decision (no decode step)")
    lean, misses = np.array(seen, dtype=float).T
    return {"lean": float(lean.mean()), "lean_late": float(lean[len(lean) // 2:].mean()),
            "misses_per_layer": float(misses.mean()), "layers": len(seen)}


def gate_table(folders=DEFAULT_BENCHES, gates: tuple[str, ...] = tuple(GATES), max_steps: int | None = None,
               profile: str | None = None) -> pd.DataFrame:
    """Per `prescope` cell of each bench folder: what the engine measured (lean share, decode ms gated and
    ungated, on_demand_lru's) and, per gate, the replayed lean shares. `profile`: the costs the policy weighs
    (default: the bench's own `config.profile`)."""
    rows = []
    for folder in folders:
        data, routing = read_cells(folder)
        cfg = data["config"]
        weigh = profile or cfg["profile"]
        layouts = cell_layouts(cfg)
        ms = {(c["model"], c["policy"], c["budget"], c["batch"]): c["decode_ms_median"] for c in data["cells"]}
        for cell in data["cells"]:
            if cell["policy"] != "prescope":
                continue
            key = cell_key(cell)
            if cell["model"] not in layouts:
                raise GateReplayError(f"{folder}: {cell['model']} is not a twin this replay can size")
            if key not in routing:
                raise GateReplayError(f"{folder}: no routing for cell {key}")
            layout, dense = layouts[cell["model"]]
            at = (cell["model"], cell["budget"], cell["batch"])
            run = Path(folder).stem if Path(folder).suffix == ".json" and Path(folder).stem != "bench" else \
                Path(folder).name if Path(folder).is_dir() else Path(folder).parent.name
            row = {"bench": str(folder), "run": run, "revision": data.get("git_revision", ""), "model": cell["model"],
                   "budget": cell["budget"], "batch": cell["batch"],
                   "measured_lean": cell.get("plans_lean_share"), "measured_ms": cell["decode_ms_median"],
                   "measured_ungated_ms": ms.get((at[0], "prescope[gate=False]", *at[1:])),
                   "measured_lru_ms": ms.get((at[0], "on_demand_lru", *at[1:])), "profile": weigh}
            for gate in gates:
                got = replay_gate(routing[key], layout, dense, cell["budget"], cell["batch"], weigh, gate=gate,
                                  async_io=bool(cell.get("async_io", False)), first_position=cfg["input_len"],
                                  max_steps=max_steps)
                row |= {f"{gate}_lean": got["lean"], f"{gate}_lean_late": got["lean_late"],
                        f"{gate}_misses_per_layer": got["misses_per_layer"]}
            rows.append(row)
    return pd.DataFrame(rows)


def report(table: pd.DataFrame, command: str) -> str:
    """The table as markdown, saying what it is (a simulated decision replay) and which code made it."""
    rev, dirty = source_revision()

    def f(x, digits=2):
        return "" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"

    lines = [
        "# PreScope's gate in decision replay (simulated; not a timing)",
        "",
        f"Simulated, not measured: each `prescope` cell's decode routing (routing.npz of the bench folders below) "
        f"replayed through the simulator with PreScope deciding on the engine's costs (profile "
        f"{', '.join(sorted(set(table['profile'])))}, `host_hides_device`), counting the MoE layers its gate runs on "
        f"demand. The forecast is the memory's (no LLaPor: the bench keeps no hidden states) and the cache starts "
        f"from the policy's reset state, not from the prefill's: the shares are the gate's decisions on this "
        f"routing, not the engine's, and say nothing about speed. `plan_gain`: the gate at this revision; "
        f"`layer_slack`: the gate before it (a layer's own device_slack against the planning cost). Lean: share "
        f"of layers run on demand over all replayed steps / over their second half. Measured columns: the bench "
        f"cells (most of one round; rounds of one cell differed by up to ~10-15 % there; runs before bec855b "
        f"decided with earlier gates, so their measured lean is those gates'; an empty ms column: no such cell).",
        "",
        f"Code revision {rev}{' (uncommitted changes: ' + ', '.join(dirty) + ')' if dirty else ''}; command: "
        f"`{command}`.",
        "",
        "| run | subject | budget | batch | measured lean | measured ms gated / ungated / LRU | replay lean, layer_slack "
        "(all / late) | replay lean, plan_gain (all / late) | misses per layer (plan_gain) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.run} | {r.model} | {r.budget:g} | {r.batch} | {f(r.measured_lean)} | {f(r.measured_ms, 1)} / "
                     f"{f(r.measured_ungated_ms, 1)} / {f(r.measured_lru_ms, 1)} | {f(r.layer_slack_lean)} / "
                     f"{f(r.layer_slack_lean_late)} | {f(r.plan_gain_lean)} / {f(r.plan_gain_lean_late)} | "
                     f"{f(r.plan_gain_misses_per_layer)} |")
    benches = sorted(set(zip(table["bench"], table["revision"], strict=True)))
    lines += ["", "Bench folders (revision measured): " + "; ".join(f"`{b}` ({v})" for b, v in benches) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prescope.experiments.gatereplay",
                                     description="PreScope's gate in decision replay on committed bench routing")
    parser.add_argument("--bench", nargs="+", default=list(DEFAULT_BENCHES), help="bench folders (bench.json and "
                        "routing.npz)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps replayed per cell (default: all)")
    parser.add_argument("--out", default="", help="markdown file for the table")
    args = parser.parse_args(argv)
    try:
        if args.out and not Path(args.out).is_file():  # an existing file is rewritten
            check_output(args.out, what="--out")
        table = gate_table(args.bench, max_steps=args.steps)
    except (GateReplayError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    command = "python -m prescope.experiments.gatereplay --bench " + " ".join(args.bench) + (
        f" --steps {args.steps}" if args.steps else "") + (f" --out {args.out}" if args.out else "")
    text = report(table, command)
    print(text)
    if args.out:
        write_with_sidecar(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
