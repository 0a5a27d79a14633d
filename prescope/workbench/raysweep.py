"""Run sweep cells as Ray tasks on a cluster: `prescope sweep GRID --executor ray [--address ADDR]`.

Ray is an optional extra (`pip install 'prescope[ray]'`); nothing else in prescope imports it, and this
module imports it only when a `RayExecutor` is made. Each unfinished cell becomes one Ray task that

1. reports where it runs (a `Placement`: node id, worker pid, host), so the progress bar counts it as
   running (the task is a Ray generator: each `yield` reaches the driver as soon as it is made);
2. runs the notebook with papermill into a scratch folder of its worker (`reports.run_notebook`);
3. returns the files it rendered (executed notebook, HTML page, metrics JSON) as bytes, with its error.

The driver writes those files atomically into the cell's folder on the driver's machine, the metrics
file last, so the sweep's resume rule (a cell whose metrics file exists is finished) holds whichever
machine ran the cell, and results flow into the same summary table and index as a local sweep. A cell
that fails, or whose worker dies, is reported with its error; the others go on. Tasks are not retried
by default (`max_retries`): re-running the sweep runs exactly the unfinished cells.

Placement: a cell asks Ray for `CellJob.resources` (`sweep.cell_resources`: one CPU, and one GPU only
when the grid's `resources` or the cell's `device` says so); cells are spread over the nodes. Before
anything runs, every cell is compared with the nodes alive now: cells that no single node can hold are
listed in a `RayPlacementError` (a cluster that would add nodes on demand is judged by what it has now).

Where: with no address, `$RAY_ADDRESS` if set (as inside `ray job submit`), else a local Ray instance
started for the sweep and stopped after it; with `host:port` (a head node's GCS address, as printed by
`ray start --head`) or `auto`, that cluster. A process already connected to Ray keeps its connection.
Every node needs prescope installed and the project at the driver's path (the notebook's folder is
its working directory, and notebooks read files relative to it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from prescope.files import ChecksumError, verify_bytes, write_atomic
from prescope.workbench.metrics import MetricsError, MetricsRecord
from prescope.workbench.reports import NotebookResult, output_paths, run_notebook
from prescope.workbench.sweep import DEFAULT_CELL_CPUS, CellJob

RAY_EXTRA = "pip install 'prescope[ray]'"
RAY_ADDRESS_ENV = "RAY_ADDRESS"
LOCAL_ADDRESS = "local"
AUTO_ADDRESS = "auto"
RAY_CLIENT_SCHEME = "ray://"
# A head's GCS port answers at once on a reachable host; waiting longer only delays the error.
CONNECT_TIMEOUT_S = 5.0
# Cells are heavy and independent: spread them over the nodes rather than filling the driver's node first.
SCHEDULING_STRATEGY = "SPREAD"
# CellJob.resources keys -> Ray's resource names in ray.nodes()
RAY_RESOURCE_NAMES = {"num_cpus": "CPU", "num_gpus": "GPU"}
OUTPUT_KEYS = ("executed", "html", "metrics")  # keys of reports.output_paths, in the order they are written


class RayUnavailableError(ImportError, ValueError):
    """Ray is not installed; the message names the extra that installs it."""


class RayClusterError(ValueError):
    """No Ray cluster at the given address, or a malformed address, or a local instance that did not start."""


class RayPlacementError(ValueError):
    """Cells that ask for more (GPUs, CPUs) than any node of the cluster has; nothing was run."""


def import_ray() -> ModuleType:
    """The `ray` module, or RayUnavailableError naming the extra that installs it."""
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(f"the Ray executor needs Ray, an optional extra: {RAY_EXTRA} ({exc})") from exc
    return ray


@dataclass(frozen=True)
class Placement:
    """Where a cell's task runs: Ray node id, worker process id, host name."""

    node_id: str
    pid: int
    host: str


@dataclass(frozen=True)
class CellOutput:
    """What a cell's task sends back: the files it rendered (OUTPUT_KEYS -> bytes), its error or None, and
    the notebook's wall time (None when it did not start)."""

    files: dict[str, bytes]
    error: str | None
    seconds: float | None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.files) - set(OUTPUT_KEYS))
        if unknown:
            raise ValueError(f"cell output: unknown files {unknown}; expected keys among {OUTPUT_KEYS}")


def cluster_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` address, to probe before connecting; None for `auto` and `local`,
    which Ray resolves itself."""
    if address in (AUTO_ADDRESS, LOCAL_ADDRESS):
        return None
    if address.startswith(RAY_CLIENT_SCHEME):
        raise RayClusterError(f"address {address!r}: Ray Client (ray://) is not supported; run the sweep on a "
                              "node of the cluster (e.g. through `ray job submit`) with host:port or auto")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayClusterError(f"address {address!r}: expected host:port of a Ray head (as `ray start --head` "
                              f"prints, e.g. 10.0.0.5:6379), {AUTO_ADDRESS!r} or {LOCAL_ADDRESS!r}")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float) -> None:
    """Raise RayClusterError unless a TCP connection to the address opens within `timeout_s` (Ray's own
    connect retries for a minute or more before giving up)."""
    endpoint = cluster_endpoint(address)
    if endpoint is None:
        return
    try:
        with socket.create_connection(endpoint, timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayClusterError(f"no Ray cluster answers at {address!r} within {timeout_s:g} s ({exc}); start "
                              "one with `ray start --head`, or check the address") from exc


def _needs(job: CellJob) -> dict[str, float]:
    """The Ray resources a cell's task asks for, by Ray's names (CPU, GPU), zero amounts left out."""
    wanted = {"num_cpus": DEFAULT_CELL_CPUS, **job.resources}
    return {RAY_RESOURCE_NAMES[k]: float(v) for k, v in wanted.items() if v > 0}


def unplaceable(jobs: Sequence[CellJob], nodes: Sequence[Mapping[str, float]]) -> list[CellJob]:
    """The jobs that no single node can hold: a job fits a node when node[r] >= the job's need for every
    resource r it asks for (`nodes` are the alive nodes' total resources, as in `ray.nodes()`)."""
    def fits(job: CellJob, node: Mapping[str, float]) -> bool:
        return all(node.get(r, 0.0) >= amount for r, amount in _needs(job).items())

    return [job for job in jobs if not any(fits(job, node) for node in nodes)]


def run_cell(notebook: str, parameters: dict[str, Any], plotly_src: str | None = None,
             cell_timeout_s: float | None = None) -> Iterator[Placement | CellOutput]:
    """The body of a cell's Ray task (a generator): first where it runs, then the files
    `reports.run_notebook` rendered in a scratch folder, as bytes, with the run's error or None; the page
    loads plotly.js from `plotly_src`, the driver's shared copy relative to the cell's folder there;
    `cell_timeout_s` limits each notebook cell (None: no limit)."""
    import ray

    host = socket.gethostname()
    yield Placement(ray.get_runtime_context().get_node_id(), os.getpid(), host)
    if not Path(notebook).is_file():
        yield CellOutput({}, f"notebook {notebook} not found on {host}: every node needs the project at the "
                             "driver's path", None)
        return
    with tempfile.TemporaryDirectory(prefix="prescope-cell-") as scratch:
        try:
            result = run_notebook(notebook, scratch, parameters, plotly_src=plotly_src, cell_timeout_s=cell_timeout_s)
        # Whatever stops the run is this cell's result, reported on the driver, not a failed Ray task.
        except Exception as exc:  # noqa: BLE001
            yield CellOutput({}, f"{type(exc).__name__}: {exc}", None)
            return
        paths = output_paths(notebook, scratch)
        files = {k: paths[k].read_bytes() for k in OUTPUT_KEYS if paths[k].is_file()}
    yield CellOutput(files, result.error, result.seconds)


def write_cell(job: CellJob, output: CellOutput) -> NotebookResult:
    """Write a cell's returned files into its folder here, each atomically, the metrics file last and only
    for a run that finished with readable metrics; the result is what `run_notebook` returns locally."""
    paths = output_paths(job.notebook, job.out_dir)
    error, record = output.error, None
    if error is None:
        try:
            verify_bytes(output.files["metrics"], "the metrics file sent back")  # checksummed where it ran
            record = MetricsRecord.from_dict(json.loads(output.files["metrics"]))
        except (KeyError, json.JSONDecodeError, MetricsError, ChecksumError) as exc:
            error = f"the cell ran but its metrics did not come back readable ({type(exc).__name__}: {exc})"
    written = {k: write_atomic(paths[k], output.files[k]) for k in ("executed", "html") if k in output.files}
    executed, html = written.get("executed"), written.get("html")
    if record is None:
        return NotebookResult(job.notebook, job.parameters, executed, html, error=error, seconds=output.seconds)
    write_atomic(paths["metrics"], output.files["metrics"])
    return NotebookResult(job.notebook, job.parameters, executed, html, metrics=record, seconds=output.seconds)


class RayExecutor:
    """Runs sweep cells as Ray tasks (see the module docstring); `placements` maps each cell's folder name
    (its cell id) to where its task ran.

    `address`: host:port, auto or local (default: $RAY_ADDRESS, else local); `connect_timeout_s`: how long
    to wait for the address to answer; `max_retries`: Ray's retries of a cell whose worker died;
    `init_options`: more keywords for `ray.init` (e.g. num_cpus of a local instance).
    """

    def __init__(self, address: str | None = None, *, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 max_retries: int = 0, init_options: Mapping[str, Any] | None = None) -> None:
        if not connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s={connect_timeout_s}: expected seconds > 0")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries={max_retries!r}: expected an int >= 0")
        if address is not None:
            cluster_endpoint(address)  # a malformed address fails here, before any grid runs
        self.ray = import_ray()
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self.max_retries = max_retries
        self.init_options = dict(init_options or {})
        self.placements: dict[str, Placement] = {}

    def _connect(self) -> bool:
        """Connect to (or start) the cluster; False when this process was connected already (the caller's
        connection is then left open after the sweep)."""
        ray = self.ray
        if ray.is_initialized():
            if self.address is not None:
                raise RayClusterError(f"address {self.address!r}: this process is already connected to Ray; "
                                      "call ray.shutdown() first, or give no address to use that connection")
            return False
        address = self.address or os.environ.get(RAY_ADDRESS_ENV) or LOCAL_ADDRESS
        check_reachable(address, self.connect_timeout_s)
        options = {"logging_level": logging.WARNING, "log_to_driver": False, **self.init_options}
        try:
            ray.init(address=address, **options)
        # Ray reports a failed start or connect as ConnectionError, RuntimeError or a bare Exception.
        except Exception as exc:  # noqa: BLE001
            what = "start a local Ray instance" if address == LOCAL_ADDRESS else f"connect to Ray at {address!r}"
            raise RayClusterError(f"could not {what}: {type(exc).__name__}: {exc}") from exc
        return True

    def _check_placement(self, jobs: Sequence[CellJob]) -> None:
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        stuck = unplaceable(jobs, nodes)
        if not stuck:
            return
        largest = {r: max((n.get(r, 0.0) for n in nodes), default=0.0) for r in RAY_RESOURCE_NAMES.values()}
        cells = "; ".join(f"{job.out_dir.name} {job.parameters} needs {_needs(job)}" for job in stuck)
        raise RayPlacementError(f"{len(stuck)} of {len(jobs)} cells ask for more than any node of the Ray "
                                f"cluster has (the most a node offers: {largest}), so no cell ran: {cells}. "
                                "Add such a node, or change the grid's `resources` or the cells' `device`.")

    def _failure(self, job: CellJob, exc: Exception) -> CellOutput:
        where = self.placements.get(job.out_dir.name)
        at = f" on {where.host} (node {where.node_id[:12]}, pid {where.pid})" if where else ""
        return CellOutput({}, f"Ray task failed{at}: {type(exc).__name__}: {exc}", None)

    def run(self, jobs: Sequence[CellJob]) -> Iterator[tuple[CellJob, NotebookResult | None]]:
        """Submit every job, then yield (job, None) as each starts and (job, result) as each finishes."""
        if not jobs:
            return
        ray = self.ray
        connected_here = self._connect()
        pending: dict[Any, CellJob] = {}
        try:
            self._check_placement(jobs)
            task = ray.remote(run_cell)
            for job in jobs:
                output_paths(job.notebook, job.out_dir)["metrics"].unlink(missing_ok=True)
                needs = {"num_cpus": DEFAULT_CELL_CPUS, "num_gpus": 0, **job.resources}
                ref = task.options(num_cpus=needs["num_cpus"], num_gpus=needs["num_gpus"],
                                   max_retries=self.max_retries, scheduling_strategy=SCHEDULING_STRATEGY
                                   ).remote(str(job.notebook.resolve()), job.parameters, job.plotly_src,
                                            job.cell_timeout_s)
                pending[ref] = job
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                job = pending[ref]
                try:
                    item = ray.get(next(ref))
                except StopIteration:
                    item = CellOutput({}, "the Ray task ended without a result", None)
                except ray.exceptions.RayError as exc:
                    item = self._failure(job, exc)
                if isinstance(item, Placement):
                    self.placements[job.out_dir.name] = item
                    yield job, None
                    continue
                del pending[ref]
                yield job, write_cell(job, item)
        finally:
            for ref in pending:
                # Best effort while unwinding (the connection may be gone): a stopped sweep leaves no task.
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            if connected_here:
                ray.shutdown()
