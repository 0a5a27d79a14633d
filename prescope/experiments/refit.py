"""Refit a profile's host and GPU-expert terms to the fast engine's own bench measurements, and say how well
the simulator then predicts each measured cell.

The fast engine (`engine.generate`: static KV cache, CUDA graphs, one grouped expert kernel per wave over the
slot pool) costs differently from the engine the `h200` profile was measured for (one GEMM pair per expert
launched from Python, ~1.6 ms of host time per layer). `refit_profile` keeps the base profile's link, CPU
and per-expert models and fits, from the resident and host-driven cells of `prescope bench` runs
(bench.json + routing.npz):

- `gpu_grouped` (`hardware.profiles.GroupedKernelModel`): every resident cell (`policy == "resident"`, one
  CUDA graph per decode step) gives one equation: the measured median decode step minus the modelled
  non-expert work of its L layers (`cost.dense_time`, the base profile's `gpu_dense`) and the host's issue
  time (`host_ms_per_layer`, measured in the same row) equals L·wave_fixed + k·expert_fixed + k·bytes / HBM,
  with k the distinct experts each layer routes, summed over layers and averaged over the cell's steps (from
  its routing). Fitted by `profiles.fit_grouped_kernel` (non-negative, relative error). The FLOP rate
  cannot be told from decode steps (FLOPs never bind at 1-64 tokens): the base's expert rate is kept.
- `host_device_driven_per_layer_s`: the median `host_ms_per_layer` of the resident cells (the step's issue
  time over L where one graph runs the step).
- `host_overhead_per_layer_s` (host-driven layers): the host's *effective serial* time per MoE layer: for
  each host-bound `on_demand_lru` cell, (measured step − the simulated step with no host time) / L, the
  median over cells. It is larger than the host's own time per layer (`host_ms_per_layer`, 81-86 µs at batch 1
  at bf46dd9): the host learns each layer's routing from the device, so the device idles from the router's end
  until the host has woken, run the protocol and launched the layer's expert graph. (Runs before 186a73c let a
  replaying host run ahead of the device; fitted to them this term came out at 39 µs.)

`fidelity_compare` replays every engine cell of the bench files (their routing.npz) through the simulator on
two profiles (`fidelity.fidelity_table`) and puts measured and simulated decode ms side by side.

Command (rewrites the built-in profile and the table; both written atomically; `prescope refit` is the same):
`python -m prescope.experiments.refit --bench reports/h200/engine/bf46dd9/bench.json reports/h200/engine/b64/bench.json
--date 2026-12-03 --profile-out prescope/assets/profiles/h200-graphs.json --table-out reports/h200/engine/fidelity.csv`
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from prescope.experiments.benchfile import read_bench
from prescope.experiments.benchrows import RESIDENT
from prescope.experiments.fidelity import cell_key, fidelity_table, routing_trace, twin_layout
from prescope.files import check_output, portable_path, source_revision, verify, write_with_sidecar
from prescope.hardware import cost
from prescope.hardware.profiles import HardwareProfile, fit_grouped_kernel, load_profile, save_profile
from prescope.sim.simulator import replay

MS = 1e-3
HOST_FIT_POLICY = "on_demand_lru"  # no prediction or planning of its own: its extra time is the host's
DEFAULT_BENCHES = ("reports/h200/engine/bench.json", "reports/h200/engine/b64/bench.json")


class RefitError(ValueError):
    """Bench files that cannot be refitted from (no resident cell, no routing for it, an unknown model)."""


@dataclasses.dataclass(frozen=True)
class Bench:
    """One bench run: its file (as named in the results), its contents and its decode routing per cell."""

    path: str
    data: dict
    routing: dict[str, np.ndarray]

    @property
    def revision(self) -> str:
        return str(self.data.get("git_revision", ""))


def read_bench_run(path: str | Path) -> Bench:
    """bench.json and the routing.npz beside it (checked against their checksums)."""
    path = Path(path)
    data = read_bench(path)
    routing_path = path.with_name("routing.npz")
    if not routing_path.is_file():
        raise RefitError(f"{path}: no routing.npz beside it (the bench keeps each cell's decode routing there)")
    verify(routing_path)
    with np.load(routing_path) as npz:
        routing = {k: npz[k] for k in npz.files}
    return Bench(portable_path(path), data, routing)


def _layouts(bench: Bench) -> dict:
    from prescope.experiments.subjects import parse_model

    out = {}
    for spec in bench.data["config"]["models"]:
        name, layers = parse_model(spec)
        if "@" not in spec:
            out[name] = twin_layout(name, layers)
    return out


def distinct_experts(route: np.ndarray) -> np.ndarray:
    """[L] distinct experts each layer routes per step, averaged over steps, of routing [steps, L, B, K]."""
    steps, num_layers = route.shape[:2]
    flat = route.reshape(steps, num_layers, -1)
    return np.array([[len(np.unique(flat[s, o][flat[s, o] >= 0])) for o in range(num_layers)]
                     for s in range(steps)], dtype=float).mean(axis=0)


def resident_points(benches: list[Bench], base: HardwareProfile) -> pd.DataFrame:
    """One row per resident (one graph per step) cell: what the grouped kernels must explain."""
    rows = []
    for bench in benches:
        layouts = _layouts(bench)
        for cell in bench.data["cells"]:
            if cell["policy"] != RESIDENT or cell.get("mode") != "graph" or cell["model"] not in layouts:
                continue
            key = cell_key(cell)
            if key not in bench.routing:
                raise RefitError(f"{bench.path}: no routing for resident cell {key}")
            layout, dense = layouts[cell["model"]]
            k = distinct_experts(bench.routing[key])  # [L]
            nbytes = np.array([layout.bytes_of(o) for o in range(layout.num_moe_layers)], dtype=float)
            _, _, b = _dims(layout)
            n, L = int(cell["batch"]), layout.num_moe_layers
            dense_s = L * cost.dense_time(n, dense, b, base)
            host_s = L * cell["host_ms_per_layer"] * MS
            step_s = cell["decode_ms_median"] * MS
            rows.append({"bench": bench.path, "revision": bench.revision, "model": cell["model"], "batch": n,
                         "layers": L, "step_s": step_s, "dense_s": dense_s, "host_s": host_s,
                         "waves": float(L), "experts": float(k.sum()), "expert_bytes": float((k * nbytes).sum()),
                         "tokens": float(n * layout.top_k * L), "expert_params": float(nbytes.mean() / b)})
    if not rows:
        raise RefitError("no resident cell (policy 'resident', mode 'graph') in the bench files: nothing to fit "
                         "the grouped kernel to")
    return pd.DataFrame(rows)


def _dims(layout) -> tuple[int, int, int]:
    from prescope.sim.simcost import expert_dims

    return expert_dims(layout)


def host_points(benches: list[Bench], profile: HardwareProfile) -> pd.DataFrame:
    """One row per host-bound `on_demand_lru` cell: its measured step and the simulated one with no host time
    (on `profile`, whose GPU terms are already refitted), so the difference over L is the host's serial share."""
    no_host = dataclasses.replace(profile, host_overhead_per_layer_s=0.0, host_device_driven_per_layer_s=0.0)
    rows = []
    for bench in benches:
        layouts = _layouts(bench)
        for cell in bench.data["cells"]:
            key = cell_key(cell)
            if (cell["policy"] != HOST_FIT_POLICY or cell.get("regime") != "host-bound" or key not in bench.routing
                    or cell["model"] not in layouts):
                continue
            layout, dense = layouts[cell["model"]]
            trace = routing_trace(bench.routing[key], layout, bench.data["config"]["input_len"])
            sim = replay(trace, HOST_FIT_POLICY, no_host, budget_share=cell["budget"], batch_size=cell["batch"],
                         dense_params=dense, policy_profile=bench.data["config"]["profile"],
                         async_io=bool(cell.get("async_io", False)))
            simulated = float(sim.summary["latency"].median())
            rows.append({"bench": bench.path, "revision": bench.revision, "model": cell["model"],
                         "batch": cell["batch"], "budget": cell["budget"], "layers": layout.num_moe_layers,
                         "step_s": cell["decode_ms_median"] * MS, "simulated_no_host_s": simulated,
                         "host_own_s": cell["host_ms_per_layer"] * MS,
                         "serial_host_s": max(0.0, (cell["decode_ms_median"] * MS - simulated)
                                              / layout.num_moe_layers)})
    return pd.DataFrame(rows)


def refit_profile(benches: list[Bench], base: HardwareProfile | str = "h200", name: str = "h200-graphs",
                  date: str | None = None) -> HardwareProfile:
    """The base profile with its GPU expert and host terms refitted to the bench runs (module docstring);
    `date`: the day of the measurements (bench files carry none; default today)."""
    base = load_profile(base)
    points = resident_points(benches, base)
    target = points["step_s"] - points["dense_s"] - points["host_s"]
    grouped, err = fit_grouped_kernel(points["waves"].tolist(), points["experts"].tolist(),
                                      points["expert_bytes"].tolist(), target.tolist(),
                                      tflops=base.gpu_expert.tflops)
    device_driven = statistics.median((points["host_s"] / points["layers"]).tolist())
    profile = dataclasses.replace(base, gpu_grouped=grouped, host_device_driven_per_layer_s=device_driven)
    hosts = host_points(benches, profile)
    if hosts.empty:
        raise RefitError(f"no host-bound {HOST_FIT_POLICY!r} cell in the bench files: nothing to fit the host to")
    serial = statistics.median(hosts["serial_host_s"].tolist())
    profile = dataclasses.replace(profile, host_overhead_per_layer_s=serial)
    fitted_steps = (points["dense_s"] + points["host_s"] + points["waves"] * grouped.wave_fixed_s
                    + points["experts"] * grouped.expert_fixed_s + points["expert_bytes"] / (grouped.mem_gbps * 1e9))
    points["fitted_step_s"] = fitted_steps
    revisions = sorted({b.revision for b in benches})
    files = [b.path for b in benches]
    return dataclasses.replace(
        profile, name=name, source="measured", date=date or datetime.date.today().isoformat(),
        description=("One NVIDIA H200 running the fast engine (CUDA graphs, one grouped expert kernel per wave): the "
                     f"`{base.name}` profile's link and CPU, GPU expert and host terms refitted to `prescope bench`."),
        citation=(f"Fitted by prescope.experiments.refit to {', '.join(files)} (revisions {', '.join(revisions)}): "
                  f"{len(points)} resident cells (grouped kernel, device-driven host time) and {len(hosts)} "
                  f"host-bound {HOST_FIT_POLICY} cells (host time per layer); link, CPU and dense models from "
                  f"`{base.name}` ({base.date})."),
        source_files=tuple(files) + tuple(base.source_files),
        notes=(f"gpu_grouped: decode step = L·dense_time(N) + L·host + L·wave_fixed + k·expert_fixed + k·bytes/HBM "
               f"fitted to the resident cells (k: distinct experts per layer from routing.npz); tflops "
               f"({grouped.tflops:.0f}) is `{base.name}`'s expert rate, not fitted (FLOPs never bind at decode).",
               "host_device_driven_per_layer_s: median host_ms_per_layer of the resident cells (issue time of the "
               "one-graph step over L).",
               f"host_overhead_per_layer_s: the effective serial host time per MoE layer of the host-bound "
               f"{HOST_FIT_POLICY} cells, (measured − simulated without host) / L, median; the host's own time per "
               f"layer in those cells was {', '.join(f'{1e6 * v:.0f}' for v in hosts['host_own_s'])} µs, most of it "
               "overlapping the device (routing replayed: no synchronisation per layer).",
               f"gpu_expert, gpu_dense, link and CPU models: unchanged from `{base.name}`; policies deciding with "
               "policies.base.costs_for weigh gpu_grouped (an expert's share of its wave's kernel).",
               "The fit's residual per cell, and every cell simulated on this and the base profile: "
               "reports/h200/engine/fidelity.csv."),
        fit={"gpu_grouped_rms_log_error": round(err, 4),
             "resident_cells": points.round(9).to_dict(orient="records"),
             "host_cells": hosts.round(9).to_dict(orient="records")},
        measurements={"bench_files": {b.path: {"git_revision": b.revision, "bandwidths": b.data.get("bandwidths"),
                                                "device": b.data.get("device"), "torch": b.data.get("torch")}
                                      for b in benches}})


def fidelity_compare(benches: list[Bench], old: HardwareProfile | str, new: HardwareProfile | str) -> pd.DataFrame:
    """Every engine cell of the bench runs, measured and simulated on `old` and on `new` (decode ms per step,
    medians over steps; error = simulated / measured − 1)."""
    old, new = load_profile(old), load_profile(new)
    frames = []
    for bench in benches:
        a = fidelity_table(bench.data, bench.routing, old)
        b = fidelity_table(bench.data, bench.routing, new)
        keys = ["model", "policy", "budget", "batch"]
        table = a[keys + ["measured_ms", "simulated_ms", "error", "regime"]].merge(
            b[keys + ["simulated_ms", "error", "lower_bound_ms"]], on=keys, suffixes=(f"_{old.name}", f"_{new.name}"))
        table.insert(0, "revision", bench.revision)
        table.insert(0, "bench", bench.path)
        table["fit_point"] = [fit_role(cell) for cell in table.to_dict(orient="records")]
        frames.append(table)
    table = pd.concat(frames, ignore_index=True)
    table.attrs.update(source="measured vs simulated", profiles=[old.name, new.name])
    return table


def fit_role(cell: dict) -> str:
    """Which part of `refit_profile` a cell of the table was a data point of ('' for a cell it only predicts)."""
    if cell["policy"] == RESIDENT:
        return "gpu_grouped"
    if cell["policy"] == HOST_FIT_POLICY and cell.get("regime") == "host-bound":
        return "host_overhead"
    return ""


def table_csv(table: pd.DataFrame, old: str, new: str) -> str:
    """The table as CSV under comment lines that say what it is."""
    head = (f"# measured (bench.json decode_ms_median, NVIDIA H200) vs simulated (prescope.sim.replay of each cell's "
            f"routing.npz, same policy, budget, batch and link) decode ms per step, on profiles {old} and {new}; "
            f"error = simulated / measured - 1; revisions: {', '.join(sorted(set(table['revision'])))}\n"
            f"# written by prescope.experiments.refit (python -m prescope.experiments.refit) at code revision "
            f"{source_revision()[0]}; fit_point: the cell was a data point of that part of the refit\n")
    return head + table.to_csv(index=False, float_format="%.4g")


ENGINE_TERMS = ("cpu_expert", "host_per_transfer_s", "predict_overhead_s", "plan_overhead_s")


def with_engine_terms(profile: HardwareProfile, source: HardwareProfile | str) -> HardwareProfile:
    """`profile` with the terms measured inside the engine rather than by microbenchmarks (`ENGINE_TERMS`: the
    CPU expert model of the engine's own CPU experts, the host time to issue one transfer, and the prediction
    and planning overheads) taken from `source`, and a note saying so."""
    source = load_profile(source)
    return dataclasses.replace(
        profile, **{name: getattr(source, name) for name in ENGINE_TERMS},
        notes=tuple(profile.notes) + (f"{', '.join(ENGINE_TERMS)}: from `{source.name}` ({source.date}), measured "
                                      "inside the engine; its notes: " + " ".join(source.notes),),
        source_files=tuple(profile.source_files) + tuple(f for f in source.source_files
                                                         if f not in profile.source_files))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bench", nargs="+", default=list(DEFAULT_BENCHES), help="bench.json files (routing.npz beside)")
    parser.add_argument("--base", default="h200", help="profile whose link, CPU and dense models are kept")
    parser.add_argument("--name", default="h200-graphs", help="name of the refitted profile")
    parser.add_argument("--date", default=None, help="day of the measurements (default today)")
    parser.add_argument("--profile-out", default="", help="where to write the refitted profile JSON")
    parser.add_argument("--table-out", default="", help="CSV of measured vs simulated per cell, base vs refit")
    parser.add_argument("--engine-terms-from", default=None,
                        help="profile whose terms measured inside the engine (CPU experts, host per transfer, "
                             "prediction and planning overheads) replace the base's in the written profile")


def run(args: argparse.Namespace) -> int:
    """Refit, write what was asked for, print the table and one JSON line; bad input raises ValueError."""
    for out in (args.profile_out, args.table_out):
        if out and not Path(out).is_file():  # (an existing file is replaced)
            check_output(out, what="output")
    benches = [read_bench_run(p) for p in args.bench]
    base = load_profile(args.base)
    profile = refit_profile(benches, base, args.name, args.date)
    if args.engine_terms_from:
        profile = with_engine_terms(profile, args.engine_terms_from)
    table = fidelity_compare(benches, base, profile)
    if args.profile_out:
        save_profile(profile, args.profile_out)
    if args.table_out:
        write_with_sidecar(args.table_out, table_csv(table, base.name, profile.name))
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    g = profile.gpu_grouped
    print(json.dumps({"profile": profile.name, "wave_fixed_us": 1e6 * g.wave_fixed_s,
                      "expert_fixed_us": 1e6 * g.expert_fixed_s, "mem_gbps": g.mem_gbps,
                      "host_per_layer_us": 1e6 * profile.host_overhead_per_layer_s,
                      "host_device_driven_us": 1e6 * profile.host_device_driven_per_layer_s,
                      "fit_rms_log_error": profile.fit["gpu_grouped_rms_log_error"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m prescope.experiments.refit` (the same as `prescope refit`)."""
    parser = argparse.ArgumentParser(prog="python -m prescope.experiments.refit", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
