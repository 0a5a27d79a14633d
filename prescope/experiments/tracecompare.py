"""`prescope trace-compare`: every policy replaying a real trace on its shape twin, simulated.

The trace (llama.cpp route trace or prescope parquet; any model) is checked against the twin and cut to its
layers as the engine's trace subjects are (`tracesubject.twin_config_for`), then every policy is replayed by
the simulator on the twin's layout (its expert bytes and compute, its non-expert parameters per MoE layer) with
the trace's top-k, on each hardware profile and budget. Batch b is made of b consecutive decode segments of
the trace (`routing.segments.decode_segments`: stretches of one conversation, not independent users).
`prescope` gets routing-only LLaPor where `--predictor` names one; without it, and for `hybrid` and
`lookahead_prefetch`, prediction comes from the routing the policy has seen (no hidden states exist).
Writes trace_compare.csv and trace_compare.json (source "simulated", profiles, git revision) atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

GATE_POLICIES = ("lookahead_prefetch", "hybrid")  # as `subjects.GATE_POLICIES`; here with no gate to read


def compare_on_twin(trace, twin: str, policies, profiles, budgets, batch_sizes, *, layers: int | None = None,
                    predictor=None, lookahead: int = 3, max_steps: int | None = None) -> list[dict]:
    """Rows (profile, budget, batch, policy, predictor, simulated totals) of every policy replaying `trace` on
    `twin`'s layout; `predictor` (routing-only LLaPor) goes to `prescope`."""
    from prescope.experiments.tracesubject import twin_config_for
    from prescope.hardware.profiles import load_profile
    from prescope.models import twins
    from prescope.policies import PolicyError, make_policy, parse_policy
    from prescope.policies.base import costs_for
    from prescope.routing.segments import decode_segments
    from prescope.sim.simulator import replay

    _, trace = twin_config_for(twin, trace, layers)
    layout, dense = twins.twin_layout(twin, layers)
    layout = dataclasses.replace(layout, top_k=trace.layout.top_k)
    rows = []
    for batch in batch_sizes:
        segments = decode_segments(trace, batch) if batch > 1 else trace
        for profile in profiles:
            for budget in budgets:
                for name in policies:
                    spec = parse_policy(name)
                    if spec.cpu_workers is not None:
                        raise PolicyError(f"{name!r}: +cpuN sets the engine's CPU-expert threads; the simulator "
                                          "runs a layer's CPU experts one after another on all cores")
                    options = dict(spec.options)
                    used = "none"
                    if spec.name == "prescope" and predictor is not None:
                        options |= {"predictor": predictor, "lookahead": min(lookahead, predictor.max_distance)}
                        used = predictor.name
                    elif spec.name in ("prescope", *GATE_POLICIES):
                        used = "routing seen (previous step)"
                    began, chosen = time.perf_counter(), make_policy(spec.name, **options)
                    async_io = spec.async_io and chosen.uses_async_io(costs_for(layout, load_profile(profile)))
                    result = replay(segments, chosen, profile, budget_share=budget, batch_size=batch,
                                    max_steps=max_steps, async_io=async_io, layout=layout, dense_params=dense)
                    t = result.totals
                    rows.append({"twin": twin, "profile": profile, "budget": budget, "batch": batch, "policy": name,
                                 "predictor": used, "ms_per_token": 1e3 * t["mean_token_latency_s"],
                                 "tokens_per_s": t["tokens_per_s"], "loads_on_demand": t["loads_on_demand"],
                                 "loads_prefetched": t["loads_prefetched"], "hit_rate": t["hit_rate"],
                                 "steps": t["steps"], "seconds": round(time.perf_counter() - began, 2)})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prescope.policies import POLICIES

    parser.add_argument("--trace", required=True, help="routing trace: llama.cpp .csv / .csv.xz or prescope .parquet")
    parser.add_argument("--twin", required=True, help="the shape twin of the traced model (same E), e.g. qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=None, help="cut the twin (and the trace) to this many layers")
    parser.add_argument("--policies", nargs="+", default=sorted(POLICIES), help="policies (default: all)")
    parser.add_argument("--profiles", nargs="+", default=["h200", "a100-pcie4", "v100-pcie3"],
                        help="hardware profiles (default: %(default)s)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.5], help="GPU expert budgets (shares)")
    parser.add_argument("--batch-sizes", "--batch_sizes", dest="batch_sizes", nargs="+", type=int, default=[1, 4],
                        help="rows per step: b rows are b decode segments of the trace (default: %(default)s)")
    parser.add_argument("--predictor", default="", help="routing-only LLaPor checkpoint for prescope ('' = it "
                                                        "predicts from the routing it has seen)")
    parser.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None,
                        help="decode steps replayed at most")
    parser.add_argument("--heldout-fraction", "--heldout_fraction", dest="heldout_fraction", type=float, default=0.0,
                        help="replay only the held-out part that `prescope predictor-accuracy` with the same share "
                             "kept out of training (0 = the whole trace)")
    parser.add_argument("--out", required=True, help="folder for trace_compare.csv and trace_compare.json")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from prescope.files import check_output, git_revision, portable_path, write_json, write_with_sidecar
    from prescope.predict.routellapor import heldout_mask, load_predictor
    from prescope.routing.reader import read_trace

    out = check_output(args.out, folder=True, what="--out")
    trace = read_trace(args.trace)
    if args.heldout_fraction:
        trace = trace.select(heldout_mask(trace, args.heldout_fraction, 0))
    from prescope.experiments.tracesubject import TraceSubjectError

    predictor = load_predictor(args.predictor) if args.predictor else None
    if predictor is not None and predictor.needs_hidden:
        raise TraceSubjectError(f"{args.predictor} reads hidden states; train routing-only LLaPor on the trace")
    rows = compare_on_twin(trace, args.twin, args.policies, args.profiles, args.budgets, args.batch_sizes,
                           layers=args.layers, predictor=predictor, max_steps=args.max_steps)
    table = pd.DataFrame(rows)
    write_with_sidecar(Path(out) / "trace_compare.csv", table.to_csv(index=False, float_format="%.6g"))
    summary = {"source": "simulated", "git_revision": git_revision(), "trace": portable_path(args.trace),
               "twin": args.twin, "layers": args.layers, "profiles": args.profiles,
               "predictor": portable_path(args.predictor) if args.predictor else None,
               "trace_top_k": trace.layout.top_k,
               "replayed": f"held-out {args.heldout_fraction:.0%}" if args.heldout_fraction else "whole trace",
               "rows": rows}
    write_json(Path(out) / "trace_compare.json", summary, indent=1)
    print(table.drop(columns=["seconds"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(json.dumps({"command": "trace-compare", "out": str(out), "rows": len(rows)}))
    return 0
