"""prescope.workbench.reports and prescope.workbench.metrics: parameter parsing and checks, papermill runs rendered to HTML
with plotly embedded, the index, failures reported without stopping the others, atomic metrics files."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import nbformat
import pytest

from prescope.files import write_atomic
from prescope.workbench import metrics, reports
from prescope.workbench.metrics import MetricsError, MetricsRecord, record_metrics
from prescope.workbench.reports import ParameterError, check_parameters, notebook_parameters

PARAMS = "steps = 3  # decode steps\nrate: float = 0.5  # a float\nname = 'x'  # a string\nflag = False  # a bool"
FIGURE_AND_METRICS = ("import plotly.graph_objects as go\nfrom prescope.workbench.metrics import record_metrics\n"
                      "go.Figure(go.Bar(x=[1, 2], y=[steps, rate])).show()\n"
                      "record_metrics(source='simulated', profile='test-profile', config={'steps': steps},\n"
                      "               doubled=2 * steps, name=name)")


def write_notebook(path: Path, params: str, *body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# test notebook"),
                nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                *(nbformat.v4.new_code_cell(src) for src in body)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_notebook_parameters_reads_literals_without_running(tmp_path):
    nb = write_notebook(tmp_path / "a.ipynb", PARAMS + "\nsizes = [1, 2]  # a list\nnothing = None")
    assert notebook_parameters(nb) == {"steps": 3, "rate": 0.5, "name": "x", "flag": False, "sizes": [1, 2],
                                       "nothing": None}


@pytest.mark.parametrize("params, message", [("steps = 2 * 3", "must be a literal"),
                                             ("import os", "not `name = literal`"),
                                             ("a = b = 1", "not `name = literal`")])
def test_notebook_parameters_rejects_non_literals(tmp_path, params, message):
    with pytest.raises(ParameterError, match=message):
        notebook_parameters(write_notebook(tmp_path / "a.ipynb", params))


def test_notebook_parameters_needs_exactly_one_tagged_cell(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("a = 1")]
    nbformat.write(nb, tmp_path / "a.ipynb")
    with pytest.raises(ParameterError, match="one cell tagged 'parameters', found 0"):
        notebook_parameters(tmp_path / "a.ipynb")


def test_check_parameters_lists_unknown_names_and_wrong_types():
    defaults = {"steps": 3, "rate": 0.5, "name": "x", "flag": False, "sizes": [1], "any": None}
    check_parameters(defaults, {"steps": 4, "rate": 1, "flag": True, "sizes": [], "any": "y"}, "nb")
    with pytest.raises(ParameterError) as err:
        check_parameters(defaults, {"stpes": 4, "steps": True, "rate": "fast", "bogus": 1}, "nb")
    text = str(err.value)
    assert "unknown parameters ['bogus', 'stpes']" in text
    assert "steps=True is bool" in text and "rate='fast' is str" in text


def test_record_metrics_writes_env_path_and_validates(tmp_path, monkeypatch, capsys):
    target = tmp_path / "sub" / "m.json"
    monkeypatch.setenv(metrics.METRICS_PATH_ENV, str(target))
    record_metrics(source="measured", config={"path": tmp_path, "n": 2}, tokens=5, ratio=0.25)
    record = MetricsRecord.from_dict(json.loads(target.read_text()))
    assert record.metrics == {"tokens": 5, "ratio": 0.25} and record.source == "measured"
    assert record.config == {"path": str(tmp_path), "n": 2}
    assert record.profile.startswith("host:") and record.git_revision
    assert "tokens = 5" in capsys.readouterr().out  # outside IPython the summary is printed
    with pytest.raises(MetricsError, match="source='guessed'"):
        record_metrics(source="guessed", x=1)
    with pytest.raises(MetricsError, match="metric 'xs' is a list"):
        record_metrics(source="measured", xs=[1, 2])
    with pytest.raises(MetricsError, match="metric 'x' is nan"):
        record_metrics(source="measured", x=float("nan"))


def test_write_atomic_leaves_only_the_target(tmp_path):
    path = write_atomic(tmp_path / "a.txt", "one")
    write_atomic(path, b"two")
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert path.stat().st_mode & 0o044  # group/other may read it, unlike a mkstemp file


def test_read_metrics_on_a_notebook_that_recorded_none(tmp_path):
    with pytest.raises(MetricsError, match="no recorded metrics"):
        metrics.read_metrics(write_notebook(tmp_path / "a.ipynb", "a = 1"))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One `prescope report` run over a good notebook (plotly figure + metrics), a failing one, one that
    runs but records nothing and one whose parameters cell is not literals (never runs)."""
    root = tmp_path_factory.mktemp("report")
    write_notebook(root / "nbs" / "good.ipynb", PARAMS, FIGURE_AND_METRICS)
    write_notebook(root / "nbs" / "bad.ipynb", PARAMS, "raise RuntimeError('boom')", FIGURE_AND_METRICS)
    write_notebook(root / "nbs" / "silent.ipynb", PARAMS, "steps + 1")
    write_notebook(root / "nbs" / "unparameterised.ipynb", "steps = 2 * 3")
    parser = argparse.ArgumentParser()
    reports.add_arguments(parser)
    code = reports.run(parser.parse_args(["--notebooks", str(root / "nbs"), "--out", str(root / "out")]))
    return root / "out", code


def test_report_runs_every_notebook_and_fails_the_exit_code(report):
    out, code = report
    assert code == 1  # three notebooks failed
    assert {p.name for p in out.iterdir()} == {"good.ipynb", "good.html", "good.metrics.json", "bad.ipynb",
                                               "bad.html", "silent.ipynb", "silent.html", "index.html",
                                               reports.plotly_js_name()}
    record = MetricsRecord.from_dict(json.loads((out / "good.metrics.json").read_text()))
    assert record.metrics == {"doubled": 6, "name": "x"} and record.source == "simulated"
    assert metrics.read_metrics(out / "good.ipynb") == record


def test_report_pages_load_one_shared_copy_of_plotly_js(report):
    out, _ = report
    page = (out / "good.html").read_text()
    shared = out / reports.plotly_js_name()
    assert "plotly.js v" in shared.read_text()[:1000] and "plotly.js v" not in page  # the library: once, beside
    assert len(re.findall(r'class="plotly-graph-div"', page)) == 1 and "Plotly.newPlot" in page
    scripts = re.findall(r'<script[^>]*src="([^"]+)"', page)
    assert scripts[0] == shared.name and page.index(shared.name) < page.index("require.min.js")  # before require.js
    assert shared.name not in (out / "bad.html").read_text()  # no figure ran: no library
    assert page.count("recorded_at") == 0  # the record shows as its summary, not echoed as a repr


def test_a_widget_shows_its_static_html_and_its_state_is_dropped():
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"x": {"big": "0" * 1000}}}}
    cell = nbformat.v4.new_code_cell("dashboard")
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        reports.WIDGET_MIME: {"model_id": "x", "version_major": 2, "version_minor": 0},
        "text/html": "<p>the dashboard as drawn</p><div class=\"plotly-graph-div\"></div>",
        "text/plain": "Dashboard(...)"})]
    nb.cells = [cell]
    page = reports.notebook_html(nb, "plotly-shared.min.js")
    assert "the dashboard as drawn" in page and '"model_id"' not in page and "0" * 1000 not in page
    assert "@jupyter-widgets/html-manager" not in page  # no widget scripts from a CDN
    assert 'src="plotly-shared.min.js"' in page  # its figure needs plotly.js: the page loads the shared copy
    assert reports.WIDGET_MIME in nb.cells[0].outputs[0].data and "widgets" in nb.metadata  # input unchanged


def test_index_links_every_report_with_provenance_and_errors(report):
    out, _ = report
    index = (out / "index.html").read_text()
    assert 'href="good.html"' in index and 'href="bad.html"' in index
    assert "simulated on test-profile" in index and "doubled = 6" in index and "steps = 3" in index
    assert "RuntimeError: boom" in index and "ran but recorded no metrics" in index
    assert "parameter &#x27;steps&#x27; must be a literal" in index
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_run_notebook_rejects_bad_parameters_before_running(tmp_path):
    nb = write_notebook(tmp_path / "a.ipynb", PARAMS, "raise SystemExit('must not run')")
    with pytest.raises(ParameterError, match="unknown parameters"):
        reports.run_notebook(nb, tmp_path / "out", {"stepz": 1})
    assert not (tmp_path / "out").exists()


def test_render_index_relative_links(tmp_path):
    html_file = write_atomic(tmp_path / "cells" / "abc" / "nb.html", "<html></html>")
    result = reports.NotebookResult(Path("nb.ipynb"), {"a": 1}, html=html_file, error="E: x")
    page = reports.render_index([result], tmp_path / "index.html", labels=["abc"]).read_text()
    assert f'href="{os.path.join("cells", "abc", "nb.html")}">abc</a>' in page
    with pytest.raises(ValueError, match="1 labels for 2 results"):
        reports.render_index([result, result], tmp_path / "i.html", labels=["abc"])


def test_report_checks_its_output_folder_and_passes_the_cell_timeout(tmp_path, monkeypatch, capsys):
    from prescope import cli

    write_notebook(tmp_path / "nbs" / "a.ipynb", PARAMS, FIGURE_AND_METRICS)
    (tmp_path / "FILE").write_text("x")
    assert cli.main(["report", "--notebooks", str(tmp_path / "nbs"), "--out", str(tmp_path / "FILE")]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(reports, "run_notebook", lambda nb, out, cell_timeout_s=None: seen.append(cell_timeout_s)
                        or reports.NotebookResult(Path(nb), error="x", seconds=0.0))
    cli.main(["report", "--notebooks", str(tmp_path / "nbs"), "--out", str(tmp_path / "out")])
    cli.main(["report", "--notebooks", str(tmp_path / "nbs"), "--out", str(tmp_path / "out"), "--cell-timeout-s", "0"])
    assert seen == [reports.DEFAULT_CELL_TIMEOUT_S, None]


def test_a_damaged_metrics_file_is_said_and_its_notebook_runs_again(tmp_path):
    from prescope.files import write_json

    record = MetricsRecord({"work": 1.0}, "simulated", "p")
    path = write_json(reports.output_paths("nb.ipynb", tmp_path)["metrics"], record.to_dict())
    assert reports.load_result("nb.ipynb", tmp_path).metrics == record
    path.write_text(path.read_text().replace('"work": 1.0', '"work": 9.0'))
    with pytest.warns(UserWarning, match=r"nb.metrics.json: checksum mismatch .*; it runs again"):
        assert reports.load_result("nb.ipynb", tmp_path) is None


def test_a_notebook_that_is_not_json_is_named(tmp_path):
    (tmp_path / "nb.ipynb").write_text("not json")
    with pytest.raises(ParameterError, match=r"nb.ipynb: not a notebook \(not JSON"):
        notebook_parameters(tmp_path / "nb.ipynb")
    (tmp_path / "nb.ipynb").write_text("[1, 2]")
    with pytest.raises(ParameterError, match="not a notebook"):
        notebook_parameters(tmp_path / "nb.ipynb")
