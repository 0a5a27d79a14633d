"""prescope.sweep: grid files, expansion, checks before anything runs, per-cell reports, summary, resume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from prescope import sweep
from prescope.metrics import MetricsRecord
from prescope.reports import NotebookResult, ParameterError
from prescope.sweep import CELLS_DIR, Grid, GridError, cell_id, load_grid, run_sweep

PARAMS = "steps = 3  # decode steps\nrate = 0.5  # a float\npolicy = 'lru'  # a string"
BODY = ("from prescope.metrics import record_metrics\n"
        "record_metrics(source='simulated', profile='test-profile', config={'steps': steps},\n"
        "               work=steps * rate, policy=policy, steps=steps)")


def write_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(PARAMS, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(BODY)]
    nbformat.write(nb, path)
    return path


class NeverRun:
    """An executor that fails the test if any cell reaches it."""

    def run(self, jobs):
        raise AssertionError(f"{len(jobs)} cells ran although the grid is invalid")


class FakeExecutor:
    """Runs no kernel: a result per job, failing the cells whose policy is 'broken'."""

    def __init__(self):
        self.seen = []

    def run(self, jobs):
        for job in jobs:
            self.seen.append(job.parameters)
            if job.parameters["policy"] == "broken":
                yield job, NotebookResult(Path("nb.ipynb"), job.parameters, error="RuntimeError: broken")
            else:
                record = MetricsRecord({"work": 1.0}, "simulated", "p", job.parameters)
                yield job, NotebookResult(Path("nb.ipynb"), job.parameters, metrics=record)


def test_grid_expands_to_the_cartesian_product_with_fixed_values(tmp_path):
    grid = Grid(tmp_path / "nb.ipynb", {"steps": [1, 2], "policy": ["a", "b", "c"]}, {"rate": 0.1})
    cells = grid.cells()
    assert len(cells) == 6
    assert cells[0] == {"rate": 0.1, "steps": 1, "policy": "a"}
    assert cells[-1] == {"rate": 0.1, "steps": 2, "policy": "c"}


def test_cell_id_is_stable_and_distinguishes_values():
    a = cell_id({"steps": 1, "policy": "a"})
    assert a == cell_id({"policy": "a", "steps": 1})  # key order does not matter
    assert a != cell_id({"steps": 2, "policy": "a"}) and a != cell_id({"steps": 1.0, "policy": "a"})
    assert len(a) == sweep.CELL_ID_HEX and int(a, 16) >= 0


@pytest.mark.parametrize("parameters, fixed, message", [
    ({"steps": []}, {}, "non-empty list"),
    ({"steps": 3}, {}, "non-empty list"),
    ({"steps": [1]}, {"steps": 2}, "both in `parameters` and in `fixed`"),
])
def test_grid_shape_errors(tmp_path, parameters, fixed, message):
    with pytest.raises(GridError, match=message):
        Grid(tmp_path / "nb.ipynb", parameters, fixed)


def test_load_grid_yaml_and_json_resolve_the_notebook_beside_the_file(tmp_path):
    (tmp_path / "grids").mkdir()
    (tmp_path / "grids" / "g.yaml").write_text("notebook: ../nb.ipynb\nparameters:\n  steps: [1, 2]\n")
    (tmp_path / "grids" / "g.json").write_text(json.dumps({"notebook": "nb.ipynb", "fixed": {"rate": 1.0},
                                                           "parameters": {"policy": ["a"]}}))
    yaml_grid = load_grid(tmp_path / "grids" / "g.yaml")
    assert yaml_grid.notebook == tmp_path / "grids" / ".." / "nb.ipynb"
    assert yaml_grid.parameters == {"steps": [1, 2]} and yaml_grid.fixed == {}
    json_grid = load_grid(tmp_path / "grids" / "g.json", notebook="other.ipynb")
    assert json_grid.notebook == Path("other.ipynb") and json_grid.fixed == {"rate": 1.0}
    (tmp_path / "bad.yaml").write_text("parameters: {steps: [1]}\nsteps: [2]\n")
    with pytest.raises(GridError, match="extra \\['steps'\\]"):
        load_grid(tmp_path / "bad.yaml")
    with pytest.raises(GridError, match="no `notebook`"):
        load_grid(_write(tmp_path / "nonb.yaml", "parameters: {steps: [1]}\n"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("parameters, fixed, message", [
    ({"stpes": [1, 2]}, {}, r"unknown parameters \['stpes'\]"),
    ({"steps": [1, "2"]}, {}, "steps='2' is str, default 3 is int"),
    ({"steps": [1]}, {"policy": 7}, "policy=7 is int, default 'lru' is str"),
    ({"steps": [1, True]}, {}, "steps=True is bool"),
])
def test_invalid_grids_fail_before_anything_runs(tmp_path, parameters, fixed, message):
    grid = Grid(write_notebook(tmp_path / "nb.ipynb"), parameters, fixed)
    with pytest.raises(ParameterError, match=message):
        run_sweep(grid, tmp_path / "out", executor=NeverRun(), progress=False)
    assert not (tmp_path / "out").exists()


def test_duplicate_cells_are_refused(tmp_path):
    grid = Grid(write_notebook(tmp_path / "nb.ipynb"), {"steps": [1, 1]})
    with pytest.raises(GridError, match="same value twice"):
        run_sweep(grid, tmp_path / "out", executor=NeverRun(), progress=False)


def test_summary_keeps_failed_cells_and_prefixes_clashing_metrics(tmp_path):
    grid = Grid(write_notebook(tmp_path / "nb.ipynb"), {"policy": ["ok", "broken"]}, {"steps": 2})
    executor = FakeExecutor()
    result = run_sweep(grid, tmp_path / "out", executor=executor, progress=False)
    assert not result.ok and executor.seen == grid.cells()
    table = pd.read_parquet(tmp_path / "out" / "summary.parquet")
    assert list(table["status"]) == ["ok", "failed"] and table["error"].iloc[1] == "RuntimeError: broken"
    assert list(table["policy"]) == ["ok", "broken"] and table["work"].iloc[0] == 1.0
    summary = sweep.summary_table(["x"], [NotebookResult(Path("n"), {"work": 2},
                                                         metrics=MetricsRecord({"work": 3}, "measured", "p"))])
    assert summary.loc[0, "work"] == 2 and summary.loc[0, "metric_work"] == 3


def test_sweep_runs_cells_and_resumes_only_unfinished_ones(tmp_path, capsys):
    write_notebook(tmp_path / "nb.ipynb")
    grid_file = _write(tmp_path / "grid.yaml", "notebook: nb.ipynb\nparameters:\n  steps: [1, 2]\n"
                                               "fixed:\n  policy: lru\n")
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    assert sweep.run(parser.parse_args([str(grid_file), "--out", str(out)])) == 0
    printed = capsys.readouterr().out
    ids = [cell_id({"policy": "lru", "steps": s}) for s in (1, 2)]
    assert "2 cells, 2 run now, 0 failed" in printed
    assert json.loads(printed.splitlines()[-1]) == {"sweep": str(out), "cells": 2, "ran": ids, "failed": []}
    for i in ids:
        assert {p.name for p in (out / CELLS_DIR / i).iterdir()} == {"nb.ipynb", "nb.html", "nb.metrics.json"}
    table = pd.read_csv(out / "summary.csv")
    assert list(table["cell"]) == ids and list(table["work"]) == [0.5, 1.0]
    assert list(table["metric_steps"]) == [1, 2] and set(table["source"]) == {"simulated"}
    index = (out / "index.html").read_text()
    assert all(f'href="{CELLS_DIR}/{i}/nb.html">{i}</a>' in index for i in ids)

    kept = (out / CELLS_DIR / ids[0] / "nb.ipynb").stat().st_mtime_ns
    (out / CELLS_DIR / ids[1] / "nb.metrics.json").unlink()  # as if interrupted before cell 2 finished
    again = run_sweep(load_grid(grid_file), out, progress=False)
    assert again.ran == [ids[1]] and again.ok
    assert (out / CELLS_DIR / ids[0] / "nb.ipynb").stat().st_mtime_ns == kept
    assert (out / CELLS_DIR / ids[1] / "nb.metrics.json").exists()
    assert pd.read_parquet(out / "summary.parquet")["work"].tolist() == [0.5, 1.0]
