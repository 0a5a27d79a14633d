"""`prescope fidelity`: does the simulator predict what the engine measured?

For every engine cell of a `prescope bench` run it rebuilds the decode routing the GPU actually saw
(kept by the bench), replays it through the same policy and budget on a hardware profile (normally the
one `prescope calibrate` measured on that machine; the policy still decides with the profile the engine
decided with), and compares the simulated per-step decode latency
with the measured one (medians over steps). The table says, per cell, measured, simulated and the
relative error, and the simulator's lower bound on the step (GPU compute, immovable CPU work, and the
bytes an optimal cache must still move over the link, `cost.split_lower_bound`) with the measured step's
distance to it; a final JSON line gives the share of cells within the tolerance.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

from prescope.experiments.benchfile import read_bench
from prescope.experiments.benchrows import RESIDENT
from prescope.files import check_output, verify, write_with_sidecar
from prescope.hardware.profiles import load_profile
from prescope.layout import ModelLayout
from prescope.policies import parse_policy
from prescope.routing.trace import Trace
from prescope.sim.simulator import replay

TOLERANCE = 0.15


def twin_layout(name: str, num_layers: int | None) -> tuple[ModelLayout, int]:
    """The layout and non-expert parameters per MoE layer of a twin, without allocating its weights
    (`twins.twin_layout`; imported when called, so this module loads without torch)."""
    from prescope.models.twins import twin_layout as layout_of

    return layout_of(name, num_layers)


def routing_trace(route: np.ndarray, layout: ModelLayout, first_position: int) -> Trace:
    """A decode-only Trace from routing [steps, L, B, K] as the bench kept it (weights are not kept)."""
    steps, num_layers, batch, top_k = route.shape
    tokens = pd.DataFrame({"prompt": np.tile(np.arange(batch), steps), "row": np.tile(np.arange(batch), steps),
                           "position": np.repeat(first_position + np.arange(steps), batch),
                           "step": np.repeat(1 + np.arange(steps), batch), "phase": "decode", "domain": ""})
    experts = route.transpose(0, 2, 1, 3).reshape(steps * batch, num_layers, top_k).astype(np.int64)
    weights = np.full(experts.shape, 1.0 / top_k, dtype=np.float32)
    return Trace(layout, tokens, experts, weights, meta={"source": "prescope bench routing"})


def cell_key(cell: dict) -> str:
    """A bench cell's key in its routing.npz."""
    return f"{cell['model']}__{cell['policy']}__{cell['budget']}__{cell['batch']}"


def cell_layouts(config: dict) -> dict[str, tuple[ModelLayout, int]]:
    """(layout, dense parameters per MoE layer) of each twin a bench `config` ran, by the name its cells carry
    (NAME, or NAME@SOURCE for a twin driven by other routing); prescope-tiny and tiny twins, which have no
    twin layout to size them by, are left out."""
    from prescope.experiments.subjects import parse_model, routing_source
    from prescope.models import twins

    layouts = {}
    for spec in config["models"]:
        name, layers = parse_model(spec)
        if name in twins.TWINS:
            source = routing_source(spec)
            layouts[name if source is None else f"{name}@{source}"] = twin_layout(name, layers)
    return layouts


def fidelity_table(bench: dict, routing: dict[str, np.ndarray], profile) -> pd.DataFrame:
    rows, layouts = [], cell_layouts(bench["config"])
    for cell in bench["cells"]:
        key = cell_key(cell)
        if key not in routing or cell["model"] not in layouts:
            continue
        spec = parse_policy("on_demand_lru" if cell["policy"] == RESIDENT else cell["policy"])
        if spec.options:
            continue  # (the simulator builds policies by name, without constructor options)
        policy = spec.name
        layout, dense = layouts[cell["model"]]
        route = routing[key]
        if route.ndim != 4 or route.shape[1] != layout.num_moe_layers or route.shape[3] != layout.top_k:
            raise ValueError(f"routing {key}: shape {route.shape}, expected [steps, L={layout.num_moe_layers}, "
                             f"batch, K={layout.top_k}]")
        trace = routing_trace(route, layout, bench["config"]["input_len"])
        # the link the cell ran on: AsyncIO's priority link where the engine had it (bench rows since rev
        # 461845e record it), else one FIFO copy stream
        sim = replay(trace, policy, profile, budget_share=cell["budget"], batch_size=cell["batch"],
                     dense_params=dense, policy_profile=bench["config"]["profile"],
                     async_io=bool(cell.get("async_io", False)))
        simulated = 1e3 * float(sim.summary["latency"].median())
        measured = cell["decode_ms_median"]
        bound = 1e3 * float(sim.summary["lower_bound"].median())  # no policy of this engine can beat it
        rows.append({"model": cell["model"], "policy": cell["policy"], "budget": cell["budget"],
                     "batch": cell["batch"], "measured_ms": measured, "simulated_ms": simulated,
                     "error": simulated / measured - 1, "lower_bound_ms": bound,
                     "measured_over_bound": measured / bound if bound > 0 else None,
                     "regime": cell.get("regime", ""), "async_io": sim.config["async_io"]})
    table = pd.DataFrame(rows)
    table.attrs.update(profile=profile.name, source="simulated vs measured")
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bench", required=True, help="bench.json written by `prescope bench`")
    parser.add_argument("--routing", required=True, help="routing.npz written beside it")
    parser.add_argument("--profile", required=True, help="profile name or JSON (the calibrated one)")
    parser.add_argument("--out", default="", help="CSV to write the table to")


def run(args: argparse.Namespace) -> int:
    if args.out:
        check_output(args.out, what="--out")
    bench = read_bench(args.bench)
    verify(args.routing)
    with np.load(args.routing) as npz:
        routing = {k: npz[k] for k in npz.files}
    table = fidelity_table(bench, routing, load_profile(args.profile))
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    within = float((table["error"].abs() <= TOLERANCE).mean()) if len(table) else 0.0
    if args.out:
        write_with_sidecar(args.out, table.to_csv(index=False))
    print(json.dumps({"fidelity": args.bench, "profile": args.profile, "cells": len(table),
                      "within_15pct": within, "median_abs_error": float(table["error"].abs().median())}))
    return 0
