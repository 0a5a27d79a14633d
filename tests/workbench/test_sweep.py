"""prescope.workbench.sweep: grid files, expansion, checks before anything runs, per-cell reports, summary, resume."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from prescope import cli, files
from prescope.files import Claim, FolderLock, LockedError, write_json
from prescope.workbench import reports, sweep
from prescope.workbench.metrics import MetricsRecord
from prescope.workbench.reports import NotebookResult, ParameterError, output_paths
from prescope.workbench.sweep import CELLS_DIR, Grid, GridError, cell_id, load_grid, run_sweep

PARAMS = "steps = 3  # decode steps\nrate = 0.5  # a float\npolicy = 'lru'  # a string"
BODY = ("from prescope.workbench.metrics import record_metrics\n"
        "record_metrics(source='simulated', profile='test-profile', config={'steps': steps},\n"
        "               work=steps * rate, policy=policy, steps=steps)")


def write_notebook(path: Path, params: str = PARAMS, body: str = BODY) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(body)]
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
            else:  # a finished cell leaves its metrics file, as every executor's does
                record = MetricsRecord({"work": 1.0}, "simulated", "p", job.parameters)
                write_json(output_paths(job.notebook, job.out_dir)["metrics"], record.to_dict())
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
    with pytest.raises(GridError, match="same value"):
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
    write_notebook(tmp_path / "nb.ipynb", body="import plotly.graph_objects as go\ngo.Figure(go.Bar(y=[steps])).show()\n"
                   + BODY)
    grid_file = _write(tmp_path / "grid.yaml", "notebook: nb.ipynb\nparameters:\n  steps: [1, 2]\n"
                                               "fixed:\n  policy: lru\n")
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    assert sweep.run(parser.parse_args([str(grid_file), "--out", str(out)])) == 0
    printed = capsys.readouterr().out
    ids = [cell_id({"policy": "lru", "steps": s}) for s in (1, 2)]
    assert "2 cells, 2 run now, 0 failed" in printed
    assert json.loads(printed.splitlines()[-1]) == {"sweep": str(out), "cells": 2, "ran": ids, "failed": [],
                                                    "missing": []}
    for i in ids:  # each page loads the one copy of plotly.js at the sweep's root
        assert {p.name for p in (out / CELLS_DIR / i).iterdir()} == {"nb.ipynb", "nb.html", "nb.metrics.json"}
        assert f'src="../../{reports.plotly_js_name()}"' in (out / CELLS_DIR / i / "nb.html").read_text()
    assert (out / reports.plotly_js_name()).is_file()
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


def test_grid_resources_are_checked_and_read_from_the_file(tmp_path):
    assert Grid(tmp_path / "nb.ipynb", {"steps": [1]}).resources == {}
    for resources, message in [({"gpus": 1}, r"unknown \['gpus'\]"), ({"num_gpus": -1}, ">= 0"),
                               ({"num_gpus": True}, ">= 0"), ({"num_cpus": "2"}, ">= 0"), ([1], "must map")]:
        with pytest.raises(GridError, match=message):
            Grid(tmp_path / "nb.ipynb", {"steps": [1]}, resources=resources)
    grid = load_grid(_write(tmp_path / "g.yaml", "notebook: nb.ipynb\nparameters: {steps: [1]}\n"
                                                 "resources: {num_gpus: 1, num_cpus: 4}\n"))
    assert grid.resources == {"num_gpus": 1, "num_cpus": 4}


@pytest.mark.parametrize("cell, resources, defaults, expected", [
    ({"steps": 1}, {}, {"steps": 3}, {"num_cpus": 1.0, "num_gpus": 0.0}),
    ({"device": "auto"}, {}, {"device": "auto"}, {"num_cpus": 1.0, "num_gpus": 0.0}),
    ({"device": "cuda"}, {}, {"device": "auto"}, {"num_cpus": 1.0, "num_gpus": 1.0}),
    ({"device": "cuda:1"}, {"num_cpus": 4}, {"device": "auto"}, {"num_cpus": 4.0, "num_gpus": 1.0}),
    ({"steps": 1}, {}, {"device": "cuda"}, {"num_cpus": 1.0, "num_gpus": 1.0}),  # the notebook's default
    ({"device": "cuda"}, {"num_gpus": 0}, {}, {"num_cpus": 1.0, "num_gpus": 0.0}),  # the grid's word wins
    ({"device": "cpu"}, {"num_gpus": 0.5}, {}, {"num_cpus": 1.0, "num_gpus": 0.5}),
])
def test_cell_resources_rule(cell, resources, defaults, expected):
    assert sweep.cell_resources(cell, resources, defaults) == expected


def test_sweep_gives_executors_each_cells_resources_and_records_them(tmp_path):
    grid = Grid(write_notebook(tmp_path / "nb.ipynb"), {"policy": ["a", "b"]}, resources={"num_gpus": 1})

    class Recording(FakeExecutor):
        def run(self, jobs):
            self.resources = [job.resources for job in jobs]
            yield from super().run(jobs)

    executor = Recording()
    run_sweep(grid, tmp_path / "out", executor=executor, progress=False)
    assert executor.resources == [{"num_cpus": 1.0, "num_gpus": 1.0}] * 2
    assert json.loads((tmp_path / "out" / "grid.json").read_text())["resources"] == {"num_gpus": 1}


def test_a_cell_without_a_result_is_reported_failed(tmp_path):
    grid = Grid(write_notebook(tmp_path / "nb.ipynb"), {"policy": ["a", "b"]})

    class Forgetful(FakeExecutor):
        def run(self, jobs):
            yield from super().run(jobs[:1])

    result = run_sweep(grid, tmp_path / "out", executor=Forgetful(), progress=False)
    assert [r.ok for r in result.results] == [True, False]
    assert result.results[1].error == "the executor returned no result for this cell"


def test_local_executor_reports_each_start_before_its_result(tmp_path, monkeypatch):
    calls = []

    def fake_run(notebook, out_dir, parameters, plotly_src=None, cell_timeout_s=None):
        calls.append(parameters)
        return NotebookResult(Path(notebook), parameters, error="RuntimeError: x")

    monkeypatch.setattr(sweep, "run_notebook", fake_run)
    jobs = [sweep.CellJob(tmp_path / "nb.ipynb", tmp_path / str(i), {"steps": i}) for i in (1, 2)]
    events = [(job.parameters["steps"], result is None) for job, result in sweep.LocalExecutor().run(jobs)]
    assert events == [(1, True), (1, False), (2, True), (2, False)] and calls == [{"steps": 1}, {"steps": 2}]


def test_progress_counts_running_done_and_failed():
    with sweep.SweepProgress(total=3, disable=True) as bar:
        bar.started()
        bar.started()
        assert (bar.running, bar.done, bar.failed) == (2, 0, 0)
        bar.finished(ok=True)
        bar.finished(ok=False)
        bar.finished(ok=True)  # an executor that did not report this cell's start
        assert (bar.running, bar.done, bar.failed) == (0, 2, 1)


def test_executors_by_name_and_the_address_option():
    assert sweep.executor_class("local") is sweep.LocalExecutor
    assert isinstance(sweep.EXECUTORS["ray"], str)  # imported on use only: Ray is an optional extra
    with pytest.raises(sweep.ExecutorError, match=r"no executor 'dask'; expected one of \['local', 'ray'\]"):
        sweep.make_executor("dask")
    with pytest.raises(sweep.ExecutorError, match="takes no address"):
        sweep.make_executor("local", address="10.0.0.1:6379")
    assert isinstance(sweep.make_executor("local"), sweep.LocalExecutor)


def test_a_second_sweep_into_a_folder_in_use_is_refused(tmp_path):
    grid = Grid(write_notebook(tmp_path / "nb.ipynb"), {"policy": ["a"]})
    (tmp_path / "out").mkdir()
    with FolderLock(tmp_path / "out", "sweep"):  # another sweep holds the folder
        with pytest.raises(LockedError, match=r"out is in use by another sweep \(pid \d+ on .*\); wait for it"):
            run_sweep(grid, tmp_path / "out", executor=NeverRun(), progress=False)
    assert not (tmp_path / "out" / "grid.json").exists()  # the second one wrote nothing
    run_sweep(grid, tmp_path / "out", executor=FakeExecutor(), progress=False)
    assert not (tmp_path / "out" / ".lock").exists()


def test_local_executor_skips_cells_another_runner_holds_or_has_finished(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(sweep, "run_notebook", lambda nb, out, params, **options: ran.append(params) or
                        NotebookResult(Path(nb), params, error="x"))
    nb = write_notebook(tmp_path / "nb.ipynb")
    jobs = [sweep.CellJob(nb, tmp_path / str(i), {"steps": i}) for i in (1, 2, 3)]
    held = Claim(jobs[0].out_dir / sweep.CLAIM_NAME)
    assert held.acquire()  # a runner elsewhere is running cell 1
    record = MetricsRecord({"work": 1.0}, "simulated", "p")
    write_json(output_paths(nb, jobs[1].out_dir)["metrics"], record.to_dict())  # cell 2 finished meanwhile
    results = {job.parameters["steps"]: r for job, r in sweep.LocalExecutor().run(jobs) if r is not None}
    held.release()
    assert ran == [{"steps": 3}]
    assert "another runner (pid" in results[1].error and results[2].ok and results[3].error == "x"


class StopsAfterOne(FakeExecutor):
    """Finishes one cell, checking the summary on disk already names the new grid, then is interrupted."""

    def __init__(self, out: Path):
        super().__init__()
        self.out = out

    def run(self, jobs):
        table = pd.read_csv(self.out / "summary.csv")
        assert set(table["status"]) == {"missing"} and len(table) == len(jobs)
        yield from super().run(jobs[:1])
        raise KeyboardInterrupt


def test_summary_is_rebuilt_from_the_cells_at_start_and_when_stopped(tmp_path):
    out = tmp_path / "out"
    old = Grid(write_notebook(tmp_path / "nb.ipynb"), {"policy": ["old"]})
    run_sweep(old, out, executor=FakeExecutor(), progress=False)
    grid = Grid(tmp_path / "nb.ipynb", {"policy": ["a", "b", "c"]})
    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid, out, executor=StopsAfterOne(out), progress=False)
    table = pd.read_csv(out / "summary.csv")
    assert list(table["policy"]) == ["a", "b", "c"] and list(table["status"]) == ["ok", "missing", "missing"]
    assert (table["error"].iloc[1:] == sweep.NOT_RUN).all()
    assert "2 of 3 cells missing" in (out / "index.html").read_text()
    assert files.verify(out / "summary.csv") and files.verify(out / "summary.parquet")
    result = run_sweep(grid, out, executor=FakeExecutor(), progress=False)  # resumes: the two missing cells
    assert result.ok and result.ran == [cell_id(c) for c in grid.cells()[1:]] and not result.missing


def test_a_cell_that_never_ends_fails_at_the_timeout_and_the_sweep_goes_on(tmp_path, capfd):
    body = "import time\nif steps == 1:\n    time.sleep(600)\n" + BODY
    grid = Grid(write_notebook(tmp_path / "nb.ipynb", body=body), {"steps": [1, 2]})
    start = time.perf_counter()
    result = run_sweep(grid, tmp_path / "out", progress=False, cell_timeout_s=3)
    assert time.perf_counter() - start < 120
    assert "Timeout" in result.results[0].error and result.results[1].ok
    assert "Traceback" not in capfd.readouterr().err  # the stopped kernel's own log stays quiet


def test_cli_states_the_cell_count_and_asks_for_yes_above_the_threshold(tmp_path, capsys):
    write_notebook(tmp_path / "nb.ipynb")
    values = ", ".join(str(i) for i in range(sweep.LARGE_GRID + 1))
    grid_file = _write(tmp_path / "big.yaml", f"notebook: nb.ipynb\nparameters:\n  steps: [{values}]\n")
    assert cli.main(["sweep", str(grid_file), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert f"{sweep.LARGE_GRID + 1} cells" in captured.out
    assert f"expands to {sweep.LARGE_GRID + 1} cells (more than {sweep.LARGE_GRID}); check the grid, then run it " \
           "again with --yes" in captured.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("notebook: nb.ipynb\nparameters: {steps: [1, 2}\n", r"not valid YAML at line 2, column \d+"),
    ("notebook: nb.ipynb\nparameters:\n  rate: [1, 1.0]\n", r"parameter 'rate' lists 1 and 1.0, the same value"),
    ("notebook: [nb.ipynb]\nparameters: {steps: [1]}\n", r"`notebook` must be a path"),
])
def test_cli_refuses_bad_grids_in_one_line(tmp_path, capsys, text, message):
    write_notebook(tmp_path / "nb.ipynb")
    assert cli.main(["sweep", str(_write(tmp_path / "g.yaml", text)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_checks_the_output_folder_and_timeout_first(tmp_path, capsys):
    write_notebook(tmp_path / "nb.ipynb")
    grid_file = _write(tmp_path / "g.yaml", "notebook: nb.ipynb\nparameters: {steps: [1]}\n")
    (tmp_path / "FILE").write_text("x")
    assert cli.main(["sweep", str(grid_file), "--out", str(tmp_path / "FILE" / "out")]) == 2
    assert "FILE is a file" in capsys.readouterr().err
    assert cli.main(["sweep", str(grid_file), "--cell-timeout-s", "-1"]) == 2
    assert "--cell-timeout-s -1.0: give seconds > 0, or 0 for no limit" in capsys.readouterr().err
def test_the_grid_example_in_the_module_docstring_fits_its_notebook(tmp_path):
    """The example a reader copies names parameters the notebook really has, with their types."""
    doc = sweep.__doc__.split("Grid file, YAML or JSON:\n\n", 1)[1]
    example = "\n".join(line[4:] for line in doc.split("\n\n", 1)[0].splitlines())
    (tmp_path / "grids").mkdir()
    grid_file = tmp_path / "grids" / "example.yaml"
    grid_file.write_text(example)
    notebook = Path(__file__).resolve().parents[2] / "notebooks" / "03_presched.ipynb"
    assert "../notebooks/03_presched.ipynb" in example
    cells = sweep.load_grid(grid_file, notebook=notebook).check()
    assert len(cells) == 4 and all(cell["max_steps"] == 8 for cell in cells)
