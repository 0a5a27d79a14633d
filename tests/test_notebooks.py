"""The notebooks in notebooks/: thin and stored clean (STYLE.md rule 12), run through papermill with small
parameters asserting the metrics they record, and run as-is by nbval in lax mode (rule 13)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from prescope import metrics, reports

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = reports.list_notebooks(ROOT / "notebooks")
SANITIZE = Path(__file__).resolve().parent / "nbval_sanitize.cfg"
NBVAL_TIMEOUT_S = 600
BF16_BYTES = 2

# notebook stem -> (small parameters for the smoke run, metrics it must record with them)
SMOKE = {
    "00_quickstart": (
        dict(num_hidden_layers=2, hidden_size=64, intermediate_size=32, num_experts=8, num_experts_per_tok=2),
        # one expert = gate_up [2I, H] + down [H, I] in bf16 = 3·H·I·2 bytes
        dict(num_moe_layers=2, num_experts=8, top_k=2, expert_bytes=3 * 64 * 32 * BF16_BYTES),
    ),
}


def code_cells(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_every_notebook_has_a_smoke_test():
    assert NOTEBOOKS, "no notebooks found"
    assert {p.stem for p in NOTEBOOKS} == set(SMOKE)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_thin_and_stored_clean(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.kernelspec.name == reports.KERNEL_NAME
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    assert all("  # " in line for line in params[0].source.splitlines() if line.strip()), "a help comment each"
    assert reports.notebook_parameters(path)  # typed literals only
    calls, defs = 0, []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [] and cell.execution_count is None, "store notebooks with outputs cleared"
        for node in ast.walk(ast.parse(cell.source)):
            defs += [node.name] if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) else []
            calls += isinstance(node, ast.Call) and getattr(node.func, "id", None) == "record_metrics"
    assert defs == [], "logic belongs in prescope/, not in notebooks"
    assert calls == 1, "one record_metrics(...) call per notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_smoke_run_records_its_metrics(path, tmp_path, monkeypatch):
    parameters, expected = SMOKE[path.stem]
    metrics_file = tmp_path / "from-env.json"
    monkeypatch.setenv(metrics.METRICS_PATH_ENV, str(metrics_file))  # the kernel inherits it
    result = reports.run_notebook(path, tmp_path / "out", parameters)
    assert result.ok, result.error
    assert {k: result.metrics.metrics.get(k) for k in expected} == expected
    assert {k: result.metrics.config.get(k) for k in parameters} == parameters  # the config it ran with
    assert json.loads(metrics_file.read_text()) == result.metrics.to_dict()
    assert metrics.read_metrics(result.executed) == result.metrics


def test_notebooks_pass_nbval_lax():
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
           "--nbval-sanitize-with", str(SANITIZE), f"--nbval-cell-timeout={NBVAL_TIMEOUT_S}",
           *[str(p) for p in NOTEBOOKS]]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=NBVAL_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"{sum(len(code_cells(p)) for p in NOTEBOOKS)} passed" in done.stdout
