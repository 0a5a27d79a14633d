"""Run one notebook over a parameter grid (`prescope sweep GRID`): a report per cell, a summary, an index.

Grid file, YAML or JSON:

    notebook: ../notebooks/03_presched.ipynb        # relative to the grid file (or --notebook)
    parameters: {budget_share: [0.25, 0.5], profile: [h200, a100-pcie4]}   # Cartesian product
    fixed: {max_steps: 8, batch_sizes: [1]}         # the same in every cell
    resources: {num_cpus: 1}                         # optional: what each cell asks a scheduler for

Every name must be a parameter of the notebook's `parameters` cell and every value must have its
default's type; all of it is checked before any cell runs. The output folder holds

    cells/<cell-id>/<stem>.ipynb, .html, .metrics.json   one run per cell (`reports.run_notebook`)
    summary.csv, summary.parquet                          one row per cell: status, parameters, metrics
    index.html, grid.json                                 links to every cell; the grid as run

What a cell needs (`cell_resources`, used by executors that place cells on machines, e.g. Ray): the
grid's `resources` (keys RESOURCE_KEYS: num_cpus, default 1, and num_gpus); without a `num_gpus` there,
one GPU when the cell's `device` parameter (its swept or fixed value, else the notebook's default) is a
string starting with "cuda", else none. So `device: "auto"` cells ask a cluster for no GPU; ask for one
with `device: cuda` or `resources: {num_gpus: 1}`. The local executor runs every cell here as it is.

cell-id = the first CELL_ID_HEX hex digits of sha256(canonical JSON of the cell's parameters), so a
cell keeps its folder across reruns and edits of the grid. A cell whose metrics file exists is finished
(that file is written last, atomically) and is skipped on a rerun: an interrupted sweep resumes
(delete a cell's folder, or the whole output folder, to run it again after changing the notebook).

One sweep per folder at a time: a sweep holds the folder's lock (`files.FolderLock`) while it runs, and a
second one stops at once with a clear error; the local executor also claims each cell (`files.Claim`)
before running it and runs it only if it is still unfinished, so two runners never run one cell twice.
The summary and index are rebuilt from the cell folders when a sweep starts and when it ends (also when
it is stopped): status ok, failed (this run's error) or missing (not run). Every notebook cell has a
time limit (`cell_timeout_s`, on by default), so a cell that never ends fails instead of hanging the
sweep; a grid of more than LARGE_GRID cells runs from the command line only with `--yes`.

Executors run cells: `LocalExecutor` runs them one after another here; `raysweep.RayExecutor` runs them
as Ray tasks on a cluster (`--executor ray [--address ADDR]`, an optional extra). An executor implements
`run(jobs)`, yielding `(job, None)` when a cell starts (optional, for the progress bar's running count)
and `(job, result)` when it finishes, and registers in EXECUTORS by class or by "module:Class" name (so
this module never imports an executor's optional dependencies).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import itertools
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from prescope.files import Claim, FolderLock, check_output, write_json, write_parquet, write_with_sidecar
from prescope.workbench.reports import (
    DEFAULT_CELL_TIMEOUT_S,
    NotebookResult,
    ParameterError,
    add_limit_arguments,
    cell_timeout,
    load_result,
    notebook_parameters,
    parameter_problems,
    render_index,
    run_notebook,
    write_plotly_js,
)

CELL_ID_HEX = 12
CELLS_DIR = "cells"
GRID_KEYS = ("notebook", "parameters", "fixed", "resources")
RESOURCE_KEYS = ("num_cpus", "num_gpus")
DEFAULT_CELL_CPUS = 1
GPU_DEVICE_PARAMETER = "device"
GPU_DEVICE_PREFIX = "cuda"
SUMMARY_COLUMNS = ("cell", "status", "error", "seconds", "source", "profile", "git_revision")
CLAIM_NAME = ".claim"  # in a cell's folder: held by the runner running it
LARGE_GRID = 1000  # cells above which the command line asks for --yes
NO_RESULT = "the executor returned no result for this cell"
NOT_RUN = "not run: the sweep has not reached this cell or was stopped before it"


class GridError(ValueError):
    """A grid file that cannot be expanded: wrong shape, empty value lists, clashing names."""


class ExecutorError(ValueError):
    """An executor name or option that does not exist (the message lists what does)."""


def cell_id(parameters: Mapping[str, Any]) -> str:
    """Stable id of a cell: sha256 of its parameters as JSON with sorted keys, first CELL_ID_HEX digits."""
    canonical = json.dumps(parameters, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:CELL_ID_HEX]


@dataclass(frozen=True)
class Grid:
    """A notebook, the swept parameters (name -> values), the fixed ones (name -> value) and what each
    cell asks a scheduler for (`resources`, see `cell_resources`)."""

    notebook: Path
    parameters: dict[str, list[Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.parameters, Mapping) or not isinstance(self.fixed, Mapping):
            raise GridError("grid: `parameters` and `fixed` must be mappings of name to values")
        if not isinstance(self.resources, Mapping):
            raise GridError(f"grid: `resources` must map {RESOURCE_KEYS} to amounts, got {self.resources!r}")
        unknown = sorted(set(self.resources) - set(RESOURCE_KEYS))
        if unknown:
            raise GridError(f"grid: `resources` takes keys {RESOURCE_KEYS}, got unknown {unknown}")
        amounts = {k: v for k, v in self.resources.items()
                   if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0}
        if amounts:
            raise GridError(f"grid: resources must be numbers >= 0, got {amounts}")
        bad = sorted(k for k, v in self.parameters.items() if not isinstance(v, list) or not v)
        if bad:
            raise GridError(f"grid: parameters {bad} must each map to a non-empty list of values")
        both = sorted(set(self.parameters) & set(self.fixed))
        if both:
            raise GridError(f"grid: {both} appear both in `parameters` and in `fixed`")

    @property
    def size(self) -> int:
        """The number of cells, without expanding them."""
        return math.prod(len(v) for v in self.parameters.values())

    def cells(self) -> list[dict[str, Any]]:
        """Every combination of the swept values (in file order, last name fastest), plus `fixed`."""
        names = list(self.parameters)
        return [{**dict(zip(names, combo, strict=True)), **self.fixed}
                for combo in itertools.product(*(self.parameters[n] for n in names))]

    def check(self) -> list[dict[str, Any]]:
        """The cells, after checking every name and value against the notebook (ParameterError)."""
        if not self.notebook.is_file():
            raise FileNotFoundError(f"grid: notebook {self.notebook} not found")
        pairs = [(n, v) for n, values in self.parameters.items() for v in values] + list(self.fixed.items())
        problems = parameter_problems(notebook_parameters(self.notebook), pairs)
        if problems:
            raise ParameterError(f"grid for {self.notebook.name}: " + ". ".join(problems))
        for name, values in self.parameters.items():
            seen: dict[Any, Any] = {}
            for value in values:
                key = _frozen(value)
                if key in seen:  # 1 and 1.0 are one value: the cell would run twice
                    raise GridError(f"grid for {self.notebook.name}: parameter {name!r} lists {seen[key]!r} and "
                                    f"{value!r}, the same value; list each value once")
                seen[key] = value
        cells = self.cells()
        if len({cell_id(c) for c in cells}) != len(cells):
            raise GridError(f"grid for {self.notebook.name}: a parameter lists the same value twice")
        return cells


def _frozen(value: Any) -> Any:
    """A hashable stand-in that is equal for equal values (lists as tuples, dicts as sorted pairs)."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    return value


def load_grid(path: str | Path, notebook: str | Path | None = None) -> Grid:
    """Read a YAML or JSON grid; `notebook` (relative to the working directory) overrides the file's."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}  # YAML reads JSON too
    except UnicodeDecodeError as exc:
        raise GridError(f"{path}: not a text file ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise GridError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, Mapping) or set(data) - set(GRID_KEYS):
        extra = sorted(set(data) - set(GRID_KEYS)) if isinstance(data, Mapping) else data
        raise GridError(f"{path}: expected a mapping with keys {GRID_KEYS}, got extra {extra}")
    if notebook is None and not data.get("notebook"):
        raise GridError(f"{path}: no `notebook` in the grid and none given")
    if notebook is None and not isinstance(data["notebook"], str):
        raise GridError(f"{path}: `notebook` must be a path, got {data['notebook']!r}")
    nb = Path(notebook) if notebook is not None else path.parent / data["notebook"]
    return Grid(nb, data.get("parameters") or {}, data.get("fixed") or {}, data.get("resources") or {})


def cell_resources(cell: Mapping[str, Any], resources: Mapping[str, float],
                   defaults: Mapping[str, Any]) -> dict[str, float]:
    """What one cell asks a scheduler for: num_cpus = resources.get("num_cpus", DEFAULT_CELL_CPUS);
    num_gpus = resources["num_gpus"] if given, else 1 when the cell's `device` (or, not swept or fixed,
    the notebook's default `defaults["device"]`) is a string starting with GPU_DEVICE_PREFIX, else 0."""
    device = cell.get(GPU_DEVICE_PARAMETER, defaults.get(GPU_DEVICE_PARAMETER))
    wants_gpu = isinstance(device, str) and device.startswith(GPU_DEVICE_PREFIX)
    return {"num_cpus": float(resources.get("num_cpus", DEFAULT_CELL_CPUS)),
            "num_gpus": float(resources.get("num_gpus", 1 if wants_gpu else 0))}


@dataclass(frozen=True)
class CellJob:
    """What an executor runs: one notebook, into one folder, with one set of parameters; `resources`
    (num_cpus, num_gpus) is what the cell asks a scheduler for (`cell_resources`)."""

    notebook: Path
    out_dir: Path
    parameters: dict[str, Any]
    resources: dict[str, float] = field(default_factory=dict)
    plotly_src: str | None = None  # where the cell's page loads plotly.js (`reports.run_notebook`)
    cell_timeout_s: float | None = DEFAULT_CELL_TIMEOUT_S  # per notebook cell; None: no limit


class Executor(Protocol):
    def run(self, jobs: Sequence[CellJob]) -> Iterator[tuple[CellJob, NotebookResult | None]]:
        """Run every job, yielding (job, None) when a cell starts (optional) and (job, result) when it
        finishes, in any order; every job gets exactly one result."""
        ...


class LocalExecutor:
    """Runs cells one after another in this process's machine, through `reports.run_notebook`; each cell is
    claimed first and run only when no other runner holds it and it is still unfinished."""

    def run(self, jobs: Sequence[CellJob]) -> Iterator[tuple[CellJob, NotebookResult | None]]:
        for job in jobs:
            claim = Claim(job.out_dir / CLAIM_NAME)
            if not claim.acquire():
                yield job, NotebookResult(job.notebook, job.parameters, error=f"not run here: another runner "
                                          f"({claim.holder()}) is running this cell")
                continue
            try:
                finished = load_result(job.notebook, job.out_dir, job.parameters)  # by another runner meanwhile
                yield job, None
                yield job, finished or run_notebook(job.notebook, job.out_dir, job.parameters,
                                                    cell_timeout_s=job.cell_timeout_s, plotly_src=job.plotly_src)
            finally:
                claim.release()


# name -> executor class, or "module:Class" imported on use (optional dependencies stay optional)
EXECUTORS: dict[str, type | str] = {"local": LocalExecutor, "ray": "prescope.workbench.raysweep:RayExecutor"}


def executor_class(name: str) -> type:
    """The executor class registered as `name` in EXECUTORS, importing its module if named by string."""
    if name not in EXECUTORS:
        raise ExecutorError(f"no executor {name!r}; expected one of {sorted(EXECUTORS)}")
    entry = EXECUTORS[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry


def make_executor(name: str, address: str | None = None) -> Executor:
    """An executor by name; `address` (a cluster to use) only for executors that take one."""
    cls = executor_class(name)
    if address is None:
        return cls()
    if "address" not in inspect.signature(cls).parameters:
        raise ExecutorError(f"--address {address!r}: the {name!r} executor runs cells on this machine and "
                            f"takes no address (executors that do: ray)")
    return cls(address=address)


class SweepProgress:
    """A bar over cells (tqdm) showing how many are running, done (ok) and failed; it opens at the first
    event, so an executor's set-up errors (an unreachable cluster) print without an empty bar above them."""

    def __init__(self, total: int, disable: bool = False) -> None:
        self.total, self.disable = total, disable
        self.running = self.done = self.failed = 0
        self._bar: Any = None

    def started(self) -> None:
        self.running += 1
        self._show()

    def finished(self, ok: bool) -> None:
        # Executors need not report starts, so a finish never takes the running count below zero.
        self.running = max(0, self.running - 1)
        self.done, self.failed = self.done + ok, self.failed + (not ok)
        self._show(refresh=False)
        self._bar.update(1)

    def _show(self, refresh: bool = True) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc="cells", unit="cell", disable=self.disable)
        self._bar.set_postfix(running=self.running, done=self.done, failed=self.failed, refresh=refresh)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> SweepProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class SweepResult:
    """Every cell's id and result (in grid order) and the ids that ran this time (the rest were done)."""

    cell_ids: list[str]
    results: list[NotebookResult]
    ran: list[str]
    missing: list[str] = field(default_factory=list)  # cells with no result: not run, or the sweep stopped

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results) and not self.missing


def run_sweep(grid: Grid, out_dir: str | Path, executor: Executor | None = None, progress: bool = True,
              cell_timeout_s: float | None = DEFAULT_CELL_TIMEOUT_S) -> SweepResult:
    """Check the grid, lock the folder, run every unfinished cell; the summary (summary.csv/.parquet) and
    index.html are rebuilt from the cell folders before the first cell and after the last (see the module
    docstring). `cell_timeout_s` limits each notebook cell (None: no limit)."""
    cells = {cell_id(c): c for c in grid.check()}
    defaults = notebook_parameters(grid.notebook)
    out = check_output(out_dir, folder=True, what="sweep folder")
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "sweep"):
        done = {i: load_result(grid.notebook, out / CELLS_DIR / i, c) for i, c in cells.items()}
        write_summary(out, grid, cells, done)  # first: grid.json never describes a grid the summary does not
        as_run = {"notebook": str(grid.notebook), "parameters": grid.parameters, "fixed": grid.fixed,
                  "resources": grid.resources, "cells": cells}
        write_json(out / "grid.json", as_run)
        shared = write_plotly_js(out)  # one copy of plotly.js for every cell's page
        jobs = [CellJob(grid.notebook, out / CELLS_DIR / i, c, cell_resources(c, grid.resources, defaults),
                        plotly_src=os.path.relpath(shared, out / CELLS_DIR / i).replace(os.sep, "/"),
                        cell_timeout_s=cell_timeout_s) for i, c in cells.items() if done[i] is None]
        try:
            with SweepProgress(len(jobs), disable=not progress) as bar:
                for job, result in (executor or LocalExecutor()).run(jobs):
                    if result is None:
                        bar.started()
                        continue
                    done[job.out_dir.name] = result  # a job's folder is named by its cell id
                    bar.finished(result.ok)
            for job in jobs:  # the executor ended without a word about these
                if done[job.out_dir.name] is None:
                    done[job.out_dir.name] = NotebookResult(grid.notebook, job.parameters, error=NO_RESULT)
        finally:  # also when stopped: the summary says what is there, and what is missing
            results, missing = write_summary(out, grid, cells, done)
    return SweepResult(list(cells), results, [job.out_dir.name for job in jobs], missing)


def write_summary(out: Path, grid: Grid, cells: Mapping[str, dict], results: Mapping[str, NotebookResult | None]
                  ) -> tuple[list[NotebookResult], list[str]]:
    """summary.csv, summary.parquet and index.html from what the cell folders hold: a finished cell's metrics
    file, else the error `results` holds for it, else status "missing"; returns (every cell's result, the
    missing cells)."""
    ids, rows, missing = list(cells), [], []
    for i in ids:
        ran, found = results.get(i), load_result(grid.notebook, out / CELLS_DIR / i, cells[i])
        if ran is not None and (not ran.ok or found is not None):
            found = ran  # this run's own result: its error, or its run time
        if found is None:
            missing.append(i)
            found = NotebookResult(grid.notebook, cells[i], error=NOT_RUN)
        rows.append(found)
    table = summary_table(ids, rows, missing)
    write_with_sidecar(out / "summary.csv", table.to_csv(index=False))
    write_parquet(out / "summary.parquet", table)
    title = f"sweep of {grid.notebook.name}" + (f" ({len(missing)} of {len(ids)} cells missing)" if missing else "")
    render_index(rows, out / "index.html", title=title, labels=ids)
    return rows, missing


def _cell_value(value: Any) -> Any:
    """Lists and dicts become JSON text so every column holds scalars (CSV and parquet)."""
    return json.dumps(value) if isinstance(value, list | dict | tuple) else value


def summary_table(cell_ids: Sequence[str], results: Sequence[NotebookResult],
                  missing: Sequence[str] = ()) -> pd.DataFrame:
    """One row per cell: SUMMARY_COLUMNS (status ok, failed, or missing for the cells in `missing`), then
    each parameter, then each metric. A metric named like a parameter or a summary column is stored as
    `metric_<name>`."""
    rows, absent = [], set(missing)
    for cid, r in zip(cell_ids, results, strict=True):
        m = r.metrics
        status = "ok" if r.ok else "missing" if cid in absent else "failed"
        row = {"cell": cid, "status": status, "error": r.error, "seconds": r.seconds,
               "source": m.source if m else None, "profile": m.profile if m else None,
               "git_revision": m.git_revision if m else None}
        row.update({k: _cell_value(v) for k, v in r.parameters.items()})
        for k, v in (m.metrics if m else {}).items():
            row[f"metric_{k}" if k in row else k] = v
        rows.append(row)
    return pd.DataFrame(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", help="grid file (YAML or JSON): notebook, parameters, fixed")
    parser.add_argument("--notebook", help="notebook to run, overriding the grid's `notebook`")
    parser.add_argument("--out", help="output folder (default: reports/sweeps/<grid file stem>)")
    parser.add_argument("--executor", default="local", choices=sorted(EXECUTORS),
                        help="how cells run: local (one after another here) or ray (Ray tasks, an optional extra)")
    parser.add_argument("--address", help="ray: the cluster to use (host:port, ray://host:port or auto; "
                                           "default $RAY_ADDRESS, else a local Ray instance started for the sweep)")
    add_limit_arguments(parser)
    parser.add_argument("--yes", action="store_true", help=f"run a grid of more than {LARGE_GRID} cells")


def run(args: argparse.Namespace) -> int:
    timeout = cell_timeout(args.cell_timeout_s)
    grid = load_grid(args.grid, args.notebook)
    out = check_output(args.out or Path("reports") / "sweeps" / Path(args.grid).stem, folder=True, what="--out")
    executor = make_executor(args.executor, getattr(args, "address", None))
    print(f"{args.grid}: {grid.size} cells of {grid.notebook.name}")
    if grid.size > LARGE_GRID and not args.yes:
        raise GridError(f"{args.grid} expands to {grid.size} cells (more than {LARGE_GRID}); check the grid, "
                        "then run it again with --yes")
    result = run_sweep(grid, out, executor, cell_timeout_s=timeout)
    table = summary_table(result.cell_ids, result.results, result.missing)
    print(table[["cell", "status", *grid.parameters, "error"]].to_string(index=False))
    failed = [i for i, r in zip(result.cell_ids, result.results, strict=True) if not r.ok and i not in result.missing]
    print(f"{len(result.cell_ids)} cells, {len(result.ran)} run now, {len(failed)} failed, "
          f"{len(result.missing)} missing; summary: {out / 'summary.csv'}, index: {out / 'index.html'}")
    print(json.dumps({"sweep": str(out), "cells": len(result.cell_ids), "ran": result.ran, "failed": failed,
                      "missing": result.missing}))
    return 0 if result.ok else 1
