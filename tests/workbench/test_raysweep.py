"""prescope.workbench.raysweep: sweep cells as Ray tasks on a real Ray cluster started on this machine (a head and a
second node, CPU only), compared with a local run; failures, a killed worker, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_sweep import write_notebook as sweep_notebook

from prescope.workbench import sweep
from prescope.workbench.raysweep import (
    CellOutput,
    RayClusterError,
    RayExecutor,
    RayPlacementError,
    RayUnavailableError,
    unplaceable,
    write_cell,
)
from prescope.workbench.reports import output_paths
from prescope.workbench.sweep import CELLS_DIR, CellJob, Grid, cell_id, run_sweep

PARAMS = ("steps = 3  # decode steps\n"
          "policy = 'lru'  # a string\n"
          "device = 'auto'  # a value starting with 'cuda' makes the cell ask Ray for a GPU\n"
          "role = 'ok'  # 'fails': raise; 'dies': the first run kills its own Ray worker\n"
          "flag_dir = ''  # folder where a 'dies' cell marks that it has died once")
BODY = ("import os, signal\n"
        "from pathlib import Path\n"
        "from prescope.workbench.metrics import record_metrics\n"
        "flag = Path(flag_dir) / f'died-{steps}'\n"
        "if role == 'dies' and not flag.exists():\n"
        "    worker = os.getppid()  # papermill, in the Ray worker, started this kernel\n"
        "    assert 'ray::' in Path(f'/proc/{worker}/cmdline').read_text(), 'not inside a Ray worker'\n"
        "    flag.write_text(str(worker))\n"
        "    os.kill(worker, signal.SIGKILL)\n"
        "    os._exit(1)\n"
        "if role == 'fails':\n"
        "    raise RuntimeError('this cell fails')\n"
        "record_metrics(source='simulated', profile='test-profile', config={'steps': steps},\n"
        "               work=steps * 2.0, policy=policy, steps=steps)")
# Ray's processes each import jsonschema, which imports rfc3987_syntax if installed; that module builds a
# grammar at import, seconds of CPU on a small machine, enough for a raylet to give up waiting for its
# agents (15 s, ray-project/ray#65983). The sweep never validates IRIs, so the tests' Ray goes without it.
IMPORT_STUB = "raise ImportError('left out by prescope tests: slow to import, unused by Ray here')\n"
SHUTDOWN_WAIT_S = 20.0


def write_notebook(path: Path) -> Path:
    return sweep_notebook(path, PARAMS, BODY)


def _descendants(root: int) -> set[int]:
    """Live (not zombie) processes below `root`, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                parents[int(entry.name)] = int(ppid)
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.add(pid)
    return left


def _wait_gone(pids: set[int]) -> set[int]:
    deadline = time.monotonic() + SHUTDOWN_WAIT_S
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _alive(pids)


@pytest.fixture(scope="module")
def ray(tmp_path_factory):
    """The ray module, with the environment every Ray process of these tests inherits: no RAY_ADDRESS,
    the import stub first on PYTHONPATH."""
    ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install 'prescope[ray]'")
    stub = tmp_path_factory.mktemp("ray-pythonpath")
    (stub / "rfc3987_syntax.py").write_text(IMPORT_STUB)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(stub), os.environ.get("PYTHONPATH")])))
        yield ray


@pytest.fixture(scope="module")
def cluster(ray):
    """A real Ray cluster on this machine: a head node and a second node (own raylets and worker
    processes), one CPU each; every process it started is gone after the module."""
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.add_node(num_cpus=1)
        yield c
    finally:
        started = _descendants(os.getpid())
        c.shutdown()
        assert started, "found no Ray process below this one: the check below would prove nothing"
        assert not _wait_gone(started), "Ray processes left running after the cluster was shut down"


@pytest.fixture
def notebook(tmp_path):
    return write_notebook(tmp_path / "nb.ipynb")


def _comparable(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=["seconds"]).reset_index(drop=True)


def test_ray_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(RayUnavailableError, match=r"pip install 'prescope\[ray\]'"):
        RayExecutor()
    with pytest.raises(ValueError, match="optional extra"):  # the CLI reports ValueErrors as one line
        sweep.make_executor("ray")


def test_importing_sweep_does_not_import_ray():
    code = ("import sys, prescope.workbench.sweep as s; import argparse; p = argparse.ArgumentParser(); "
            "s.add_arguments(p); a = p.parse_args(['g.yaml', '--executor', 'ray', '--address', 'h:1']); "
            "print(a.executor, a.address, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["ray", "h:1", "False"]


@pytest.mark.parametrize("address, message", [
    ("nonsense", "expected host:port"),
    ("head:port", "expected host:port"),
    ("ray://head:10001", "Ray Client"),
])
def test_malformed_addresses_fail_at_once(address, message):
    with pytest.raises(RayClusterError, match=message):
        RayExecutor(address)


def test_unreachable_address_fails_fast_with_a_clear_error(notebook, tmp_path, ray):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    grid = Grid(notebook, {"steps": [1]})
    start = time.perf_counter()
    with pytest.raises(RayClusterError, match=f"no Ray cluster answers at '127.0.0.1:{port}'"):
        run_sweep(grid, tmp_path / "out", RayExecutor(f"127.0.0.1:{port}", connect_timeout_s=2.0), progress=False)
    assert time.perf_counter() - start < 2.0 + 1.0
    assert not ray.is_initialized() and not (tmp_path / "out" / CELLS_DIR).exists()


def test_placement_compares_each_cell_with_each_node(tmp_path):
    def job(name, **resources):
        return CellJob(tmp_path / "nb.ipynb", tmp_path / name, {}, resources)

    nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 16.0}]
    jobs = [job("cpu"), job("gpu", num_gpus=1), job("two-gpus", num_gpus=2), job("wide", num_cpus=8, num_gpus=1),
            job("wide-cpu", num_cpus=16)]
    assert [j.out_dir.name for j in unplaceable(jobs, nodes)] == ["two-gpus", "wide"]
    assert [j.out_dir.name for j in unplaceable(jobs, [])] == [j.out_dir.name for j in jobs]


def test_write_cell_writes_metrics_last_and_only_for_a_finished_run(notebook, tmp_path):
    job = CellJob(notebook, tmp_path / "cell", {"steps": 1})
    paths = output_paths(notebook, job.out_dir)
    record = {"metrics": {"work": 1.0}, "source": "simulated", "profile": "p"}
    ok = write_cell(job, CellOutput({"executed": b"{}", "html": b"<p>", "metrics": json.dumps(record).encode()},
                                    None, 1.5))
    assert ok.ok and ok.metrics.metrics == {"work": 1.0} and ok.seconds == 1.5
    assert ok.executed == paths["executed"] and paths["html"].read_bytes() == b"<p>"
    assert paths["metrics"].stat().st_mtime_ns >= paths["html"].stat().st_mtime_ns
    other = CellJob(notebook, tmp_path / "broken", {"steps": 2})
    bad = write_cell(other, CellOutput({"executed": b"{}", "metrics": b"not json"}, None, 1.0))
    assert not bad.ok and "did not come back readable" in bad.error and bad.html is None
    assert not output_paths(notebook, other.out_dir)["metrics"].exists()
    with pytest.raises(ValueError, match=r"unknown files \['log'\]"):
        CellOutput({"log": b""}, None, None)


def test_local_ray_instance_is_started_and_stopped(notebook, tmp_path, ray):
    before = _descendants(os.getpid())
    executor = RayExecutor(init_options={"num_cpus": 1, "include_dashboard": False})
    result = run_sweep(Grid(notebook, {"steps": [4]}), tmp_path / "out", executor, progress=False)
    assert result.ok and result.results[0].metrics.metrics["work"] == 8.0
    assert list(executor.placements) == result.ran and not ray.is_initialized()
    workers = {p.pid for p in executor.placements.values()}
    assert not _wait_gone(workers | (_descendants(os.getpid()) - before)), "the local Ray instance left processes"


def test_cluster_sweep_equals_a_local_sweep_and_resumes(notebook, tmp_path, ray, cluster):
    grid = Grid(notebook, {"steps": [1, 2], "policy": ["lru", "prescope"]})
    start = time.perf_counter()
    local = run_sweep(grid, tmp_path / "local", progress=False)
    local_s = time.perf_counter() - start
    executor = RayExecutor(cluster.address)
    start = time.perf_counter()
    remote = run_sweep(grid, tmp_path / "ray", executor, progress=False)
    ray_s = time.perf_counter() - start
    print(f"\n{len(grid.cells())} cells: local {local_s:.1f} s, Ray cluster of 2 nodes {ray_s:.1f} s")
    assert local.ok and remote.ok and remote.ran == local.ran == remote.cell_ids
    placements = executor.placements.values()
    assert set(executor.placements) == set(remote.ran)
    assert len({p.node_id for p in placements}) == 2 and len({p.pid for p in placements}) >= 2
    tables = [pd.read_parquet(tmp_path / d / "summary.parquet") for d in ("local", "ray")]
    pd.testing.assert_frame_equal(_comparable(tables[0]), _comparable(tables[1]))
    assert list(tables[1]["work"]) == [2.0, 2.0, 4.0, 4.0]
    index = (tmp_path / "ray" / "index.html").read_text()
    for i in remote.cell_ids:
        names = {p.name for p in (tmp_path / "ray" / CELLS_DIR / i).iterdir()}
        assert names == {"nb.ipynb", "nb.html", "nb.metrics.json"}
        assert f'href="{CELLS_DIR}/{i}/nb.html">{i}</a>' in index
    again = run_sweep(grid, tmp_path / "ray", RayExecutor(cluster.address), progress=False)
    assert again.ran == [] and again.ok and not ray.is_initialized()


def test_failed_cells_and_a_killed_worker_lose_no_finished_cell(notebook, tmp_path, cluster):
    grid = Grid(notebook, {"role": ["ok", "fails", "dies"]}, {"steps": 2, "flag_dir": str(tmp_path)})
    out = tmp_path / "out"
    first = run_sweep(grid, out, RayExecutor(cluster.address), progress=False)
    roles = [c["role"] for c in grid.cells()]
    by_role = {r: [res for res, rr in zip(first.results, roles, strict=True) if rr == r] for r in set(roles)}
    assert all(r.ok for r in by_role["ok"])
    assert all("RuntimeError: this cell fails" in r.error for r in by_role["fails"])
    assert all("WorkerCrashedError" in r.error for r in by_role["dies"])
    assert [p.name for p in tmp_path.glob("died-*")] == ["died-2"]
    table = pd.read_csv(out / "summary.csv")
    assert list(table["status"]) == ["ok" if r == "ok" else "failed" for r in roles]
    assert table.loc[table["role"] == "dies", "error"].str.contains("WorkerCrashedError").all()
    finished = {i: output_paths(notebook, out / CELLS_DIR / i)["metrics"].stat().st_mtime_ns
                for i, r in zip(first.cell_ids, roles, strict=True) if r == "ok"}
    assert len(finished) == 1

    again = run_sweep(grid, out, RayExecutor(cluster.address), progress=False)
    assert set(again.ran) == set(first.cell_ids) - set(finished)  # finished cells are skipped
    assert {i: output_paths(notebook, out / CELLS_DIR / i)["metrics"].stat().st_mtime_ns
            for i in finished} == finished
    statuses = pd.read_csv(out / "summary.csv")["status"].tolist()
    assert statuses == ["failed" if r == "fails" else "ok" for r in roles]


def test_cells_asking_for_a_gpu_no_node_has_fail_before_anything_runs(notebook, tmp_path, ray, cluster):
    grid = Grid(notebook, {"device": ["cpu", "cuda:0"], "steps": [1, 2]})
    gpu_cells = [cell_id(c) for c in grid.cells() if c["device"].startswith("cuda")]
    with pytest.raises(RayPlacementError, match="2 of 4 cells ask for more") as err:
        run_sweep(grid, tmp_path / "out", RayExecutor(cluster.address), progress=False)
    assert all(i in str(err.value) for i in gpu_cells) and "'GPU': 1.0" in str(err.value)
    assert not (tmp_path / "out" / CELLS_DIR).exists() and not ray.is_initialized()
    every = Grid(notebook, {"steps": [1]}, resources={"num_gpus": 1})
    with pytest.raises(RayPlacementError, match="1 of 1 cells"):
        run_sweep(every, tmp_path / "out", RayExecutor(cluster.address), progress=False)
