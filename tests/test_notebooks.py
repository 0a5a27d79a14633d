"""The notebooks in notebooks/: thin and stored clean (STYLE.md rule 12), and each run once: papermill
injects small parameters, nbval executes the notebook in lax mode in the kernel a user would get, and the
metrics it records are asserted (rule 13). `make report` runs them on their defaults."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from prescope.workbench import metrics, reports

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = reports.list_notebooks(ROOT / "notebooks")
SANITIZE = Path(__file__).resolve().parent / "nbval_sanitize.cfg"
NBVAL_TIMEOUT_S = 900
FLOAT32_BYTES = 4
H200 = ROOT / "reports" / "h200"
EQUIVALENCE = json.loads((H200 / "equivalence.json").read_text())["rows"]
FIDELITY_CELLS = sum(len(p.read_text().splitlines()) - 1 for p in H200.glob("fidelity-*.csv"))
TIMED = pd.read_parquet(H200 / "comparison" / "mixtral4.timelines.parquet").query(
    "model == 'mixtral-8x7b' and policy == 'prescope' and budget == 0.25 and batch == 4 and phase == 'decode'")
TIMED_STEPS = TIMED[TIMED["step"].isin(sorted(TIMED["step"].unique())[:2])]  # 06 draws the first two decode steps
# Small parameters force a fresh recording ("" trace path) so each smoke run is the same everywhere.
FRESH_TRACE = dict(tiny_trace_path="", num_prompts=2, max_new_tokens=6)

# notebook stem -> (small parameters for the smoke run, metrics it must record with them)
SMOKE = {
    "00_quickstart": (
        dict(max_new_tokens=3, policy="cpu_misses", budget_share=0.5, show_steps=1),
        # prescope-tiny: 16 MoE layers of 64 experts, top-8; one expert = 3·H·I float32 numbers (H 128, I 32)
        dict(same_tokens=True, new_tokens=3, num_moe_layers=16, num_experts=64, top_k=8,
             expert_bytes=3 * 128 * 32 * FLOAT32_BYTES, budget_slots=512),
    ),
    "01_routing": (
        dict(FRESH_TRACE, lags=[1]),
        # previous-token reuse of the real traces, as the shared data's README measured it
        {"models": 3, "tiny_trace_from": "recorded now", "reuse_lag1_qwen3-30b-a3b": 0.38,
         "reuse_lag1_gpt-oss-120b": 0.179},
    ),
    "02_llapor": (
        dict(tables_dir="", num_prompts=4, max_new_tokens=4, distance=1, max_epochs=1),
        # gate lookahead, LLaPor, previous token, popularity, oracle; the oracle is exact
        dict(origin="trained here", predictors=5, distances=1, recall_at_k_d1_oracle=1.0),
    ),
    "03_presched": (
        dict(FRESH_TRACE, policies=["on_demand_lru", "prescope", "ceiling"], batch_sizes=[1, 2], max_steps=4,
             mode="simulate", show_batch=2, host_bound_policies=["on_demand_lru", "belady"]),
        dict(mode="simulate", policies=3, rows=6, show_batch=2),
    ),
    "04_whatif": (
        dict(FRESH_TRACE, num_prompts=1, data_dir="", batch_size=1, max_steps=4, link_sweep=[8.0, 64.0],
             sweep_policies=["on_demand_lru"], sweep_batch_sizes=[1]),
        dict(traces=2, steps_replayed=4, sweep_rows=2),  # prescope-tiny and its OLMoE-sized twin
    ),
    "05_h200_report": (
        dict(model="olmoe-1b-7b"),
        # bench-mixtral.json's OLMoE rows are left out: OLMoE is shown from bench-olmoe.json alone
        dict(models=2, equivalence_runs=len(EQUIVALENCE), bench_rows_left_out=1,
             equivalence_equal=sum(r["tokens_equal_stock"] for r in EQUIVALENCE), fidelity_cells=FIDELITY_CELLS),
    ),
    "06_comparison": (
        dict(runs=["mixtral4-5f83609"]),
        # the Mixtral twin at 25 %, batch 1 and 4: belady (the run's `oracle`) wins batch 1, prescope batch 4 (1.59x LRU); the
        # timeline drawn is the committed H200 one of prescope at batch 4, every transfer and prefetch of it
        dict(runs=1, models=1, cells=2, prescope_best_cells=1, prescope_vs_lru_max=1.592,
             timeline_transfers_measured=int((TIMED_STEPS["lane"] == "pcie").sum()),
             timeline_prefetches_measured=int((TIMED_STEPS["kind"] == "prefetch").sum())),
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
def test_papermill_sees_every_parameter(path):
    """papermill warns "Passed unknown parameter" for any name its own reader of the parameters cell misses
    (it skips a line holding more than one '=', e.g. `x = 0  # 0 = off`), although it injects the value."""
    import papermill

    assert set(papermill.inspect_notebook(str(path))) == set(reports.notebook_parameters(path))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_under_nbval_and_records_its_metrics(path, tmp_path, request):
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    parameters, expected = SMOKE[path.stem]
    reports.check_parameters(reports.notebook_parameters(path), parameters, where=str(path))
    nb = parameterize_notebook(load_notebook_node(str(path)), parameters)  # injects them, runs nothing
    runnable = path.with_name(f".nbval-{path.name}")  # beside the original: the kernel starts in its folder
    nbformat.write(nb, runnable)
    request.addfinalizer(lambda: runnable.unlink(missing_ok=True))
    metrics_file = tmp_path / "metrics.json"
    env = {**os.environ, **reports.KERNEL_ENV, metrics.METRICS_PATH_ENV: str(metrics_file)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
           "--nbval-sanitize-with", str(SANITIZE), f"--nbval-cell-timeout={NBVAL_TIMEOUT_S}", str(runnable)]
    done = subprocess.run(cmd, cwd=path.parent, env=env, capture_output=True, text=True, timeout=NBVAL_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"{len(code_cells(runnable))} passed" in done.stdout
    record = metrics.MetricsRecord.from_dict(json.loads(metrics_file.read_text()))
    assert {k: record.metrics.get(k) for k in expected} == expected
    assert {k: record.config.get(k) for k in parameters} == parameters  # the config it ran with
