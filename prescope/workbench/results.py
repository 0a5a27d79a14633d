"""The committed GPU results the notebooks render (CI has no GPU): the H200 bench tables and the simulator's
fidelity to them, the peer comparison runs, and a measured per-layer timeline beside the simulator's replay of
the same cell.

Files are what `prescope bench` wrote on the H200 and the project committed under `reports/h200/`: `<run>.json`
(config, device, git revision, one row per cell), `<run>.routing.npz` (the decode routing every cell of a batch
replayed, [steps, L, B, K] per cell) and `<run>.timelines.parquet` (every transfer and kernel of a short, fully
timed run of each cell). Every table carries attrs `source` ("measured" or "simulated") and `profile` (the
device it was measured on, or the hardware profile that timed it), which `viz` requires.

Ratios hold within one run only (host-bound cells vary by tens of percent from run to run), so a model measured
by several runs is shown from one of them: the run holding most of its cells.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from prescope import timeline as tl
from prescope.files import PROJECT_DIR, read_csv, read_json
from prescope.workbench.steps import MS_PER_S, WorkbenchError

CELL_KEYS = ("model", "policy", "budget", "batch")  # a bench cell; the timeline and routing files are keyed by it
COMPARED = ("model", "policy", "budget", "batch", "decode_ms_median", "decode_tok_s", "loads_per_step",
            "policy_ms_per_layer", "vs_on_demand_lru", "vs_belady", "vs_ceiling", "vs_resident", "regime")
REFERENCES = ("stock", "stock-eager", "resident", "accelerate")  # a bench run's reference rows, no contenders
STOCK_ROWS = ("stock", "stock-eager")  # transformers' own model, all on the GPU (bench names the implementation)
STOCK_EXPERTS = "grouped_mm"  # transformers' default experts implementation: what runs that predate the naming ran


# ---- the H200 bench tables ---------------------------------------------------------------------------------

def h200_tables(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The measured H200 bench cells and the fidelity cells of `folder`.

    Bench: `benchrows.bench_table` of every bench-*.json (`run` = the file's stem), each model taken from the run
    holding most of its cells (`one_run_per_model`; attrs `left_out` says what was dropped), with an
    `experts` column naming the experts implementation of the stock rows (as bench records it now, its fastest
    as `stock` and the eager loop as `stock-eager`; runs from before that ran transformers' default,
    STOCK_EXPERTS). Fidelity: every
    fidelity-*.csv (measured_ms, simulated_ms per model, policy, budget, batch; `run` = the file's stem)."""
    from prescope.experiments.benchrows import bench_table

    folder = Path(folder)
    benches = sorted(folder.glob("bench-*.json"))
    if not benches:
        raise FileNotFoundError(f"no bench-*.json in {folder}: the H200 results are committed in reports/h200/")
    tables = [bench_table(p).assign(run=p.stem) for p in benches]
    bench, left_out = one_run_per_model(pd.concat(tables, ignore_index=True))
    if "experts_implementation" not in bench:
        bench["experts_implementation"] = None
    bench["experts"] = np.where(bench["policy"].isin(STOCK_ROWS),
                                bench["experts_implementation"].fillna(f"{STOCK_EXPERTS} (default)"), "")
    devices = sorted({t.attrs.get("profile", "") for t in tables})
    bench.attrs.update(source="measured", profile=", ".join(devices), left_out=left_out,
                       git_revisions=sorted({t.attrs.get("git_revision", "") for t in tables}))
    fidelity = pd.concat([read_csv(p).assign(run=p.stem) for p in sorted(folder.glob("fidelity-*.csv"))],
                         ignore_index=True)
    profile_file = next(iter(sorted(folder.glob("*calibrated*.json"))), None)
    fidelity.attrs.update(measured_on=", ".join(devices),
                          profile=read_json(profile_file).get("name", profile_file.stem)
                          if profile_file else "?")
    return bench, fidelity


def one_run_per_model(bench: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Each model's rows from the run holding most of its cells, and a line per (run, model) left out (e.g. the
    stock rows of a model that a run cut short measured before it stopped, on another day's host)."""
    keep, dropped = [], []
    for model, rows in bench.groupby("model", sort=False):
        main = rows["run"].value_counts().index[0]
        keep.append(rows[rows["run"] == main])
        for run, other in rows[rows["run"] != main].groupby("run"):
            dropped.append(f"{run}: {len(other)} rows of {model} ({', '.join(sorted(set(other['policy'])))}); "
                           f"{model} is shown from {main}")
    return pd.concat(keep).sort_index(), dropped


def measured_scaling(bench: pd.DataFrame, model: str) -> pd.DataFrame:
    """One model's measured cells for `viz.scaling_figure` (by "cell" = policy@budget): tokens_per_s = the
    decode rate, latency_ms = the median decode step. A model measured by several runs is taken from the
    run that holds most of its cells (ratios hold within one run only)."""
    sel = bench[bench["model"] == model]
    if sel.empty:
        raise WorkbenchError(f"no bench cells for {model!r}; models: {sorted(set(bench['model']))}")
    sel = sel[sel["run"] == sel["run"].value_counts().index[0]]
    table = pd.DataFrame({"cell": sel["policy"] + "@" + sel["budget"].map("{:g}".format), "batch_size": sel["batch"],
                          "tokens_per_s": sel["decode_tok_s"], "latency_ms": sel["decode_ms_median"],
                          "regime": sel["regime"]})
    table.attrs.update(source="measured", profile=bench.attrs.get("profile", "?"), run=str(sel["run"].iloc[0]))
    return table


def fidelity_scaling(fidelity: pd.DataFrame, model: str) -> pd.DataFrame:
    """Measured and simulated rows of one model's fidelity cells (from the run with most of them), for
    `viz.scaling_figure` (by "cell" = policy@budget): tokens_per_s = batch / median step, latency_ms = the
    median step, source per row."""
    sel = fidelity[fidelity["model"] == model]
    if sel.empty:
        raise WorkbenchError(f"no fidelity cells for {model!r}; models: {sorted(set(fidelity['model']))}")
    if "run" in sel.columns:  # one run per model, as in `measured_scaling`
        sel = sel[sel["run"] == sel["run"].value_counts().index[0]]
    cell = sel["policy"] + "@" + sel["budget"].map("{:g}".format)
    parts = []
    for source, column in (("measured", "measured_ms"), ("simulated", "simulated_ms")):
        parts.append(pd.DataFrame({"cell": cell, "batch_size": sel["batch"], "latency_ms": sel[column],
                                   "tokens_per_s": sel["batch"] * MS_PER_S / sel[column], "source": source,
                                   "profile": fidelity.attrs.get("measured_on" if source == "measured" else "profile",
                                                                 "?")}))
    return pd.concat(parts, ignore_index=True)


# ---- the comparison runs -----------------------------------------------------------------------------------

def comparison_table(folder: str | Path, runs: Sequence[str]) -> pd.DataFrame:
    """The measured cells of the `prescope bench` runs `runs` (file stems in `folder`): one row per model,
    policy, budget and batch with its ratios to on_demand_lru and the limits (belady, ceiling) of the same run
    where it measured them (policies named as today: earlier runs' `oracle` is `belady`), and `run` and
    `git_revision` columns; attrs say measured and on which device."""
    from prescope.experiments.benchrows import bench_table

    if not runs:
        raise ValueError("comparison_table needs at least one run")
    tables, devices = [], set()
    for run in runs:
        table = bench_table(_run_file(folder, run, ".json"))
        devices.add(table.attrs["profile"])
        tables.append(table[[c for c in COMPARED if c in table.columns]]
                      .assign(run=run, git_revision=table.attrs["git_revision"]))
    out = pd.concat(tables, ignore_index=True)
    out.attrs = {"source": "measured", "profile": ", ".join(sorted(devices))}
    return out


def best_per_cell(table: pd.DataFrame) -> pd.DataFrame:
    """Per run, model, budget and batch: the contending policy with the highest decode throughput, and
    prescope's throughput against it and against on_demand_lru (NaN where prescope did not run). Ablation
    variants (`name[k=v]`, `name+sync`, `prescope+cal`) are not contenders: each is one policy's option."""
    from prescope.policies import parse_policy

    references = set(REFERENCES)
    variant = table["policy"].map(lambda name: name not in references and parse_policy(name).is_variant)
    contenders = table[~table["policy"].isin(REFERENCES) & ~variant]
    rows = []
    for (run, model, budget, batch), cell in contenders.groupby(["run", "model", "budget", "batch"], sort=False):
        best = cell.loc[cell["decode_tok_s"].idxmax()]
        ours = cell[cell["policy"] == "prescope"]
        rate = float(ours["decode_tok_s"].iloc[0]) if len(ours) else float("nan")
        rows.append({"run": run, "model": model, "budget": budget, "batch": batch, "policies": len(cell),
                     "best": best["policy"], "best_tok_s": float(best["decode_tok_s"]),
                     "prescope_vs_best": rate / float(best["decode_tok_s"]),
                     "prescope_vs_on_demand_lru": float(ours["vs_on_demand_lru"].iloc[0]) if len(ours) else float("nan"),
                     "regime": best.get("regime", "")})
    out = pd.DataFrame(rows)
    out.attrs = dict(table.attrs)
    return out


# ---- a measured timeline beside its simulation --------------------------------------------------------------

def _run_file(folder: str | Path, run: str, suffix: str, what: str = "bench run") -> Path:
    path = Path(folder) / f"{run}{suffix}"
    if not path.is_file():
        known = ", ".join(sorted(p.name[:-len(suffix)] for p in Path(folder).glob(f"*{suffix}"))) or "none"
        raise FileNotFoundError(f"no {what} {run!r} in {folder} (runs there: {known})")
    return path


def _project_file(name: str) -> str:
    """A profile path as a bench config names it (relative to the project root), found from anywhere."""
    return name if Path(name).is_file() or not (PROJECT_DIR / name).is_file() else str(PROJECT_DIR / name)


def bench_cell(folder: str | Path, run: str, model: str, policy: str, budget: float, batch: int) -> tuple[dict, dict]:
    """(the run's file: config, device, git revision; the row of one of its cells). Policies are compared by
    today's names (`policies.current_name`), so `belady` finds a cell an earlier run named `oracle`."""
    from prescope.policies import current_name

    data = json.loads(_run_file(folder, run, ".json").read_text())
    want = (model, current_name(policy), float(budget), int(batch))
    for cell in data.get("cells", []):
        if (cell["model"], current_name(cell["policy"]), float(cell["budget"]), int(cell["batch"])) == want:
            return data, cell
    cells = sorted({f"{c['model']} {c['policy']}@{c['budget']:g} b{c['batch']}" for c in data.get("cells", [])})
    raise WorkbenchError(f"run {run!r} has no cell {model} {policy}@{budget:g} b{batch}; its cells: {', '.join(cells)}")


def measured_timeline(folder: str | Path, run: str, *, model: str, policy: str, budget: float,
                      batch: int) -> pd.DataFrame:
    """One cell's timed run (`<run>.timelines.parquet`: every transfer and kernel of a short generate that
    replayed the cell's routing from the cache the cell's main run left; step 0 is the prefill) as a
    `prescope.timeline` table, attrs source "measured", profile = the device, meta = the cell and revision."""
    data, cell = bench_cell(folder, run, model, policy, budget, batch)
    frame = pd.read_parquet(_run_file(folder, run, ".timelines.parquet", "timed run"))
    rows = frame[(frame["model"] == model) & (frame["policy"] == cell["policy"]) & np.isclose(frame["budget"], budget)
                 & (frame["batch"] == batch)]
    if rows.empty:
        raise WorkbenchError(f"run {run!r} kept no timeline of {model} {policy}@{budget:g} b{batch}")
    meta = {"run": run, "git_revision": data.get("git_revision", "unknown"), **{k: cell[k] for k in CELL_KEYS}}
    return tl.make_timeline(rows.drop(columns=list(CELL_KEYS)).reset_index(drop=True), source="measured",
                            profile=tl.measured_profile(data.get("device", "?")), meta=meta)


def simulated_cell(folder: str | Path, run: str, profile, *, model: str, policy: str, budget: float, batch: int,
                   max_steps: int | None = None):
    """The simulator's replay of one cell of a committed run (`prescope fidelity`'s way): the decode routing the
    cell replayed (`<run>.routing.npz`), timed as the run's model (its shape twin) on `profile`, the policy
    deciding with the profile the engine decided with, on the link the cell ran on (AsyncIO's priority link
    where its row says so). The simulator's step s is the cell's decode step s + 1. The replay has no hidden
    states: a predicting policy predicts from the routing it has seen (the engine used gate lookahead)."""
    from prescope.experiments.benchrows import RESIDENT
    from prescope.experiments.fidelity import routing_trace, twin_layout
    from prescope.experiments.subjects import parse_model, routing_source
    from prescope.policies import parse_policy
    from prescope.sim.simulator import replay

    data, cell = bench_cell(folder, run, model, policy, budget, batch)
    specs = {spec.split(":")[0].split("@")[0] + ("@" + routing_source(spec) if routing_source(spec) else ""): spec
             for spec in data["config"]["models"]}  # cell model name -> the spec that built it (name:layers)
    name, layers = parse_model(specs.get(model, model))
    layout, dense = twin_layout(name, layers)
    key = f"{cell['model']}__{cell['policy']}__{cell['budget']}__{cell['batch']}"
    with np.load(_run_file(folder, run, ".routing.npz", "routing of run")) as npz:
        if key not in npz.files:
            raise WorkbenchError(f"run {run!r} kept no routing of {key}")
        route = npz[key]  # [steps, L, B, K]
    spec = parse_policy("on_demand_lru" if policy == RESIDENT else policy)
    trace = routing_trace(route, layout, data["config"]["input_len"])
    return replay(trace, spec.build(), profile, budget_share=float(budget), batch_size=int(batch),
                  max_steps=max_steps, dense_params=dense, async_io=bool(cell.get("async_io", False)),
                  policy_profile=_project_file(data["config"]["profile"]))


def timeline_pair(folder: str | Path, run: str, profile, *, model: str, policy: str, budget: float, batch: int,
                  decode_steps: int = 2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(measured, simulated) timelines of one cell's first `decode_steps` decode steps, numbered alike (1 = the
    first decode step), for `viz.timeline_pair_figure`; the simulated one is `simulated_cell`'s."""
    if decode_steps < 1:
        raise WorkbenchError(f"decode_steps must be >= 1, got {decode_steps}")
    measured = measured_timeline(folder, run, model=model, policy=policy, budget=budget, batch=batch)
    decode = sorted(measured.loc[measured["phase"] == "decode", "step"].unique())[:decode_steps]
    shown = measured[measured["step"].isin(decode)].reset_index(drop=True)
    shown.attrs = dict(measured.attrs)
    sim = simulated_cell(folder, run, profile, model=model, policy=policy, budget=budget, batch=batch,
                         max_steps=len(decode))
    simulated = sim.timeline.assign(step=sim.timeline["step"] + 1)
    simulated.attrs = dict(sim.timeline.attrs)
    return shown, simulated


def pair_summary(measured: pd.DataFrame, simulated: pd.DataFrame) -> pd.DataFrame:
    """Per decode step, measured beside simulated: the step's time, the link's busy time, the GPU's idle time
    (ms) and the transfers issued (on demand, prefetched)."""
    columns = {"latency": "step (ms)", "link_busy": "link busy (ms)", "gpu_idle": "GPU idle (ms)",
               "loads_on_demand": "on-demand loads", "loads_prefetched": "prefetches"}
    parts = {}
    for label, frame in (("measured", measured), ("simulated", simulated)):
        steps = tl.step_summary(frame).set_index("step")[list(columns)]
        for col in ("latency", "link_busy", "gpu_idle"):
            steps[col] = steps[col] * MS_PER_S
        parts[label] = steps.rename(columns=columns)
    table = pd.concat(parts, axis=1).swaplevel(axis=1).sort_index(axis=1, level=0, sort_remaining=False)
    table.index.name = "decode step"
    return table.round(3)


def tables_profile(folder: str | Path) -> str:
    """Where committed measured tables were made: the `hardware` their `summary.json` names, as the
    "measured on" label (`timeline.measured_profile`)."""
    from prescope.timeline import measured_profile

    summary = Path(folder) / "summary.json"
    if not summary.is_file():
        raise FileNotFoundError(f"no summary.json in {folder}: these are not committed measured tables")
    return measured_profile(str(json.loads(summary.read_text()).get("hardware") or "unknown"))
