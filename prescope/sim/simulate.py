"""`prescope simulate`: replay one routing trace through one policy on a hardware profile, and print its totals.

The replay is `simulator.replay`; this module reads the trace (`routing.reader`: parquet or llama.cpp, plain or
.xz), the layout that prices it (`--twin`: a shape twin's hidden size, expert bytes and non-expert parameters;
else the trace's own, with a one-line warning when that prices the experts only), the predictor a predicting
policy gets (`--predictor`, checked against the trace), and prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from prescope.config import IO_CHUNK_BYTES, EngineConfig
from prescope.files import check_output, write_parquet, write_with_sidecar
from prescope.policies import POLICIES, make_policy
from prescope.policies.base import Policy
from prescope.routing.trace import Trace
from prescope.sim.simcost import experts_only
from prescope.sim.simulator import SimResult, SimulationError, replay

TIMELINE_SUFFIXES = (".parquet", ".csv")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True,
                        help="routing trace: a prescope .parquet (`prescope trace`) or a llama.cpp .csv (or .csv.xz: "
                             "two ship in prescope/assets/data/routing)")
    parser.add_argument("--policy", default=EngineConfig().policy, choices=sorted(POLICIES),
                        help="offloading policy to replay (default: %(default)s)")
    parser.add_argument("--profile", default="h200", help="built-in profile name or a profile JSON path "
                                                          "(default: %(default)s)")
    parser.add_argument("--twin", default="", help="time the trace with this shape twin's layout: hidden size, "
                        "expert bytes, non-expert parameters (same MoE layers, experts and top-k), e.g. olmoe-1b-7b "
                        "for prescope-tiny's routing, as notebooks 00, 03 and 04 do ('' = the trace's own model)")
    parser.add_argument("--predictor", default="", help="predictor checkpoint (LLaPor, `prescope train-predictor`) "
                        "for a predicting policy; checked against the trace's L, E, K ('' = the policy's own)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-share", "--budget_share", dest="budget_share", type=float, default=None,
                        help=f"share of all L·E experts the GPU holds (default {EngineConfig().budget_share})")
    budget.add_argument("--budget-slots", "--budget_slots", dest="budget_slots", type=int, default=None,
                        help="GPU expert slots, instead of --budget-share")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1,
                        help="prompts of the trace decoded together per step (default: %(default)s)")
    parser.add_argument("--include-prefill", dest="decode_only", action="store_false",
                        help="also replay the prefill steps")
    parser.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None,
                        help="forward calls to replay at most (default: all)")
    parser.add_argument("--async-io", "--async_io", dest="async_io", action="store_true",
                        help="priority link: on-demand loads overtake queued prefetches")
    parser.add_argument("--chunk-bytes", "--chunk_bytes", dest="chunk_bytes", type=int, default=IO_CHUNK_BYTES,
                        help="granularity at which --async-io lets an on-demand load overtake (default: "
                             "%(default)s)")
    parser.add_argument("--per-step", action="store_true", help="also print one row per replayed step")
    parser.add_argument("--timeline", default="", help="write the timeline here (.parquet or .csv)")


def _expert_size(config: dict) -> str:
    per_layer = config.get("expert_bytes_per_layer")
    if not per_layer:
        return f"{config['expert_bytes'] / 2**20:.1f} MiB"
    return f"{min(per_layer) / 2**20:.2f}-{max(per_layer) / 2**20:.2f} MiB by layer"


def totals_table(result: SimResult) -> str:
    """The replay's totals for people: what ran (policy, profile, budget, link) and what it gave."""
    c, t = result.config, result.totals
    precision = "-" if t["prefetch_precision"] is None else f"{t['prefetch_precision']:.3f}"
    rows = [("tokens per second", f"{t['tokens_per_s']:.2f}"),
            ("mean token latency (ms)", f"{1e3 * t['mean_token_latency_s']:.3f}"),
            ("lower bound per step (ms)", f"{1e3 * t['lower_bound_step_s']:.3f} ({t['lower_bound_share']:.1%} of "
                                          "the time)"),
            ("steps / tokens", f"{t['steps']} / {t['tokens']}"),
            ("loads on demand / prefetched", f"{t['loads_on_demand']} / {t['loads_prefetched']}"),
            ("MB moved over the link", f"{t['bytes_moved'] / 1e6:.1f}"),
            ("hit rate", f"{t['hit_rate']:.3f}"), ("GPU idle share", f"{t['gpu_idle_share']:.3f}"),
            ("prefetch precision", precision)]
    head = (f"simulated: {c['policy']} on {c['profile']}, {c['budget_slots']} of {c['num_moe_layers']}x"
            f"{c['num_experts']} experts on the GPU ({c['budget_share']:.0%}), {c['model_class']} "
            f"({_expert_size(c)} per expert), batch {c['batch_size']}, "
            f"{'priority' if c['async_io'] else 'FIFO'} link")
    width = max(len(name) for name, _ in rows)
    return "\n".join([head, *(f"  {name:<{width}}  {value}" for name, value in rows)])


def load_any_trace(path: str | Path, max_decode_steps: int | None = None) -> Trace:
    """A prescope trace (.parquet) or a llama.cpp route trace (.csv), plain or .xz, told apart by content
    (`routing.reader.read_trace`); of the latter only what the first `max_decode_steps` decode steps need is read."""
    from prescope.routing.reader import read_trace

    return read_trace(path, max_decode_steps=max_decode_steps)


def policy_with_predictor(name: str, predictor: str, trace: Trace) -> Policy | str:
    """Policy `name`, given the predictor checkpoint at `predictor` (checked against `trace`) where one is named;
    a SimulationError for a policy that takes none."""
    if not predictor:
        return name
    from prescope.policies.predictive import Predictive
    from prescope.predict.checkpoints import load_for_trace

    if not issubclass(POLICIES[name], Predictive):
        takes = sorted(n for n, cls in POLICIES.items() if issubclass(cls, Predictive))
        raise SimulationError(f"--predictor: policy {name!r} takes no predictor; policies that do: {takes}")
    model = load_for_trace(predictor, trace)
    lookahead = min(POLICIES[name].options_type().lookahead, model.max_distance)
    return make_policy(name, predictor=model, lookahead=lookahead)


def run(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    if args.max_steps is not None and args.max_steps < 1:
        raise SimulationError(f"--max-steps {args.max_steps}: give a number of forward calls >= 1 (leave it out for all)")
    if args.timeline:
        if Path(args.timeline).suffix not in TIMELINE_SUFFIXES:
            raise SimulationError(f"--timeline {args.timeline}: the file must end in one of {TIMELINE_SUFFIXES}")
        check_output(args.timeline, what="--timeline")
    trace = load_any_trace(args.trace, args.max_steps)
    layout, dense = None, None
    if args.twin:
        from prescope.models.twins import twin_layout  # torch: only when a twin's sizes are asked for

        layout, dense = twin_layout(args.twin)
    warning = experts_only(layout or trace.layout, dense)
    if warning:
        print(f"prescope simulate: warning: {warning}", file=sys.stderr, flush=True)
    result = replay(trace, policy_with_predictor(args.policy, args.predictor, trace), args.profile,
                    budget_slots=args.budget_slots, budget_share=args.budget_share, batch_size=args.batch_size,
                    decode_only=args.decode_only, max_steps=args.max_steps, async_io=args.async_io,
                    chunk_bytes=args.chunk_bytes, layout=layout, dense_params=dense)
    if args.per_step:
        table = result.summary[["step", "tokens", "latency", "bytes", "loads_on_demand", "loads_prefetched", "hits",
                                "misses", "gpu_idle", "link_busy", "lower_bound"]].copy()
        for col in ("latency", "gpu_idle", "link_busy", "lower_bound"):
            table[col] = (table[col] * 1e3).round(3)
        table["bytes"] = (table["bytes"] / 1e6).round(2)
        print(table.rename(columns={"latency": "latency_ms", "gpu_idle": "gpu_idle_ms", "link_busy": "link_ms",
                                    "lower_bound": "bound_ms", "bytes": "MB"}).to_string(index=False))
    print(totals_table(result))
    if args.timeline:
        out = Path(args.timeline)
        frame = result.timeline.copy()
        frame.attrs = {}
        if out.suffix == ".csv":
            write_with_sidecar(out, frame.to_csv(index=False))
        else:
            write_parquet(out, frame)
    config = {**result.config, "trace": str(args.trace), "twin": args.twin, "predictor": args.predictor,
              "priced_on": "experts only" if warning else "experts and resident work"}
    print(json.dumps({"command": "simulate", "config": config, "totals": result.totals,
                      "seconds": round(time.perf_counter() - began, 3)}))
    return 0
