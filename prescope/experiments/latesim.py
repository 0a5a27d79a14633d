"""What PreScope's `late_prefetch` (policies/lateplan.py) changes, simulated: the shipped Qwen3-30B-A3B trace
replayed on its 48-layer twin's layout (9 MiB bf16 experts) through the planned policies with and without the
option, beside `on_demand_lru`, on a hardware profile whose planning cost is the engine's measured one.

    python -m prescope.experiments.latesim [--profile reports/h200/h200-fast-engine.json] [--batches 1,4,16]
                                           [--budget-share 0.25] [--steps N]

prints a table of simulated ms per decode step (every row of the batch gets one token per step) and one JSON
line per cell, each saying "simulated", the profile, the config and the git revision. The numbers are in
policies/lateplan.py's docstring.
"""

from __future__ import annotations

import argparse
import json
import sys

from prescope.files import git_revision

POLICIES = ("on_demand_lru", "ceiling[gate=False]", "ceiling[gate=False,late_prefetch=True]",
            "prescope[gate=False]", "prescope[gate=False,late_prefetch=True]", "prescope",
            "prescope[late_prefetch=True]")
PROFILE = "reports/h200/h200-fast-engine.json"
TWIN = "qwen3-30b-a3b"


def late_rows(trace, profile, *, layout=None, dense_params: int | None = None, policies=POLICIES,
              batches=(1, 4, 16), budget_share: float = 0.25, steps: int | None = None) -> list[dict]:
    """One row per (batch, policy): the replay's simulated ms per decode step, loads, hit rate. A batch B > 1
    decodes B consecutive segments of the trace's decode together (`routing.segments.decode_segments`)."""
    from prescope.policies import parse_policy
    from prescope.routing.segments import decode_segments
    from prescope.sim.simulator import replay

    rows = []
    for batch in batches:
        cut = decode_segments(trace, batch) if batch > 1 else trace
        for spec in policies:
            r = replay(cut, parse_policy(spec).build(), profile, budget_share=budget_share, batch_size=batch,
                       layout=layout, dense_params=dense_params, max_steps=steps)
            t = r.totals
            rows.append({"policy": spec, "batch": batch, "simulated_ms_per_step": 1e3 * t["mean_token_latency_s"],
                         "simulated_tokens_per_s": t["tokens_per_s"], "steps": t["steps"],
                         "loads_on_demand": t["loads_on_demand"], "loads_prefetched": t["loads_prefetched"],
                         "hit_rate": t["hit_rate"], "gpu_idle_share": t["gpu_idle_share"],
                         "profile": r.config["profile"], "budget_share": budget_share,
                         "model_class": r.config["model_class"], "expert_bytes": r.config["expert_bytes"]})
    return rows


def table(rows: list[dict]) -> str:
    """Simulated ms per step by policy (rows) and batch (columns), with the ratio to on_demand_lru's."""
    batches = sorted({r["batch"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    at = {(r["policy"], r["batch"]): r["simulated_ms_per_step"] for r in rows}
    width = max(map(len, policies))
    lines = [f"simulated ms per decode step ({rows[0]['profile']}, budget {rows[0]['budget_share']})",
             " " * width + "".join(f"  {'batch ' + str(b):>20}" for b in batches)]
    for p in policies:
        cells = []
        for b in batches:
            base = at.get(("on_demand_lru", b))
            ratio = f" ({base / at[p, b]:.2f}x)" if base else ""
            cells.append(f"  {at[p, b]:>11.2f}{ratio:>9}")
        lines.append(f"{p:<{width}}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prescope.experiments.latesim", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default=PROFILE, help="hardware profile name or JSON path (default: %(default)s)")
    parser.add_argument("--batches", default="1,4,16", help="batch sizes, comma-separated (default: %(default)s)")
    parser.add_argument("--budget-share", type=float, default=0.25, help="GPU share of all experts (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="forward calls per cell (default: the whole trace)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="policies, separated by ';' or ','")
    args = parser.parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        parser.error(f"--batches takes comma-separated integers, got {args.batches!r}")
    policies = tuple(p for p in _split_policies(args.policies) if p)
    from prescope.data import shipped
    from prescope.models.twins import twin_layout
    from prescope.routing.reader import read_trace

    trace = read_trace(shipped("routing", "qwen3-30b-a3b.route.csv.xz"))
    layout, dense = twin_layout(TWIN)
    try:
        rows = late_rows(trace, args.profile, layout=layout, dense_params=dense, policies=policies,
                         batches=batches, budget_share=args.budget_share, steps=args.steps)
    except (ValueError, OSError) as exc:  # a policy, budget, batch or profile that cannot run: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(rows))
    revision = git_revision()
    for row in rows:
        print(json.dumps({"simulated": True, "trace": "qwen3-30b-a3b.route.csv.xz", "twin": TWIN,
                          "git_revision": revision, **row}))
    return 0


def _split_policies(text: str) -> list[str]:
    """Policy specs separated by ';', or by ',' outside brackets (`ceiling[gate=False,late_prefetch=True]`)."""
    out, depth, part = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch in ",;" and depth == 0:
            out.append(part.strip())
            part = ""
        else:
            part += ch
    return [*out, part.strip()]


if __name__ == "__main__":
    sys.exit(main())
