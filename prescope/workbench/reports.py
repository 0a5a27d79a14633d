"""Run notebooks with papermill, render them to self-contained HTML and index them (`prescope report`).

One notebook run (`run_notebook`) writes, in its output folder and always atomically:
`<stem>.ipynb` (the executed notebook), `<stem>.html` (rendered; plotly figures as divs that load the one
shared copy of plotly.js, `plotly-<version>.min.js`, written once into the folder of the reports, so every page
works offline and none carries its own 5 MB copy; a widget output shown by its static HTML, the state it was
drawn in, since widget scripts would come from a CDN) and, last, `<stem>.metrics.json` (what the notebook
recorded with `prescope.workbench.metrics.record_metrics`). The metrics file is written last: its presence means
the run finished. A failing notebook yields a result carrying its error, not an exception, so one
failure never stops the others; `report_all` runs every notebook on its defaults and writes
`index.html`, and the command exits non-zero if any failed.

Every notebook cell runs under a time limit (`cell_timeout_s`, DEFAULT_CELL_TIMEOUT_S unless told
otherwise; `--cell-timeout-s`), so a cell that never ends fails its notebook instead of hanging the run.
The metrics file carries a checksum (`files.write_json`); one that does not match is run again.

Parameters are checked before anything runs against the notebook's cell tagged `parameters`, which must
hold plain assignments of literals (`name = value  # help`).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import html
import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prescope.files import ChecksumError, check_output, read_json, write_atomic, write_json
from prescope.workbench.metrics import MetricsRecord, metrics_in_notebook

if TYPE_CHECKING:
    from nbformat import NotebookNode

KERNEL_NAME = "python3"
# A notebook cell running longer than this fails its notebook (the longest cell of the committed notebooks
# at their defaults takes about a minute on a 2-core machine): a hung cell cannot hang a report or sweep.
DEFAULT_CELL_TIMEOUT_S = 1800.0
PARAMETERS_TAG = "parameters"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
# The kernel emits figures as plotly JSON only; the HTML renderer below turns them into divs.
KERNEL_ENV = {"PLOTLY_RENDERER": "plotly_mimetype"}
# The kernel's own log is not the reader's: stopping a timed-out cell makes it print a traceback of its
# messaging; whatever fails in the notebook comes back in its result.
KERNEL_ARGS = ["--log-level=CRITICAL"]
# A figure div needs a definite height inside nbconvert's output area; plotly's own default is 450 px.
FIGURE_HEIGHT_PX = 450
REPORT_TEMPLATE = "prescope_report.html.j2"
# plotly.js goes before require.js (loaded by the lab template when online): a bundle loaded after
# require.js registers as an anonymous AMD module and never defines window.Plotly.
_TEMPLATE_SOURCE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}
{%- if resources.plotly_src %}<script type="text/javascript" src="{{ resources.plotly_src }}"></script>{% endif -%}
{{ super() }}
{%- endblock html_head_js -%}
"""
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
PLOTLY_DIV = 'class="plotly-graph-div"'  # what a figure rendered as HTML holds
# Types a swept value may take for a default of each type (YAML writes 1 for 1.0, and has no tuples).
_ACCEPTED_TYPES: dict[type, tuple[type, ...]] = {float: (float, int), tuple: (tuple, list)}


class ParameterError(ValueError):
    """Notebook parameters that do not match the notebook's `parameters` cell."""


@dataclass(frozen=True)
class NotebookResult:
    """The outcome of one notebook run: files written, parameters, recorded metrics or the error."""

    notebook: Path
    parameters: dict[str, Any] = field(default_factory=dict)
    executed: Path | None = None
    html: Path | None = None
    metrics: MetricsRecord | None = None
    error: str | None = None
    seconds: float | None = None  # wall time of this run; None for a result read back from an earlier run

    def __post_init__(self) -> None:
        if (self.metrics is None) == (self.error is None):
            raise ValueError(f"{self.notebook}: a result carries either metrics or an error, not both or neither")

    @property
    def name(self) -> str:
        return self.notebook.stem

    @property
    def ok(self) -> bool:
        return self.error is None


def output_paths(notebook: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Where `run_notebook` writes: keys executed, html, metrics."""
    stem, out = Path(notebook).stem, Path(out_dir)
    return {"executed": out / f"{stem}.ipynb", "html": out / f"{stem}.html",
            "metrics": out / f"{stem}.metrics.json"}


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """Names and default values of the notebook's `parameters` cell, parsed with `ast` (never executed)."""
    path = Path(path)
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ParameterError(f"{path}: not a notebook (not JSON: {exc})") from None
    if not isinstance(nb, dict):
        raise ParameterError(f"{path}: not a notebook (a JSON {type(nb).__name__}, not an object)")
    cells = [c for c in nb.get("cells", [])
             if isinstance(c, dict) and PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ParameterError(f"{path}: expected one cell tagged {PARAMETERS_TAG!r}, found {len(cells)}")
    source = cells[0]["source"]
    source = "".join(source) if isinstance(source, list) else source
    defaults: dict[str, Any] = {}
    for node in ast.parse(source, filename=f"{path}:parameters").body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else []
        target = targets[0] if len(targets) == 1 else None
        if not isinstance(target, ast.Name):
            raise ParameterError(f"{path}: line {node.lineno} of the parameters cell is not `name = literal`")
        try:
            defaults[target.id] = ast.literal_eval(node.value)
        except ValueError as exc:
            raise ParameterError(f"{path}: parameter {target.id!r} must be a literal "
                                 f"(number, string, bool, list...), got `{ast.unparse(node.value)}`") from exc
    return defaults


def parameter_problems(defaults: Mapping[str, Any], items: Iterable[tuple[str, Any]]) -> list[str]:
    """What is wrong with the (name, value) pairs: unknown names, and values whose type differs from the
    default's (bool is not int; an int is accepted for a float; a None default accepts anything)."""
    unknown, wrong = set(), []
    for name, value in items:
        if name not in defaults:
            unknown.add(name)
            continue
        if defaults[name] is None:
            continue
        expected = type(defaults[name])
        if type(value) not in _ACCEPTED_TYPES.get(expected, (expected,)):
            wrong.append(f"{name}={value!r} is {type(value).__name__}, "
                         f"default {defaults[name]!r} is {expected.__name__}")
    problems = [f"unknown parameters {sorted(unknown)} (the notebook has {sorted(defaults)})"] if unknown else []
    return problems + ([f"wrong types: {'; '.join(wrong)}"] if wrong else [])


def check_parameters(defaults: Mapping[str, Any], values: Mapping[str, Any], where: str) -> None:
    """Raise ParameterError listing every problem `parameter_problems` finds in `values`."""
    problems = parameter_problems(defaults, values.items())
    if problems:
        raise ParameterError(f"{where}: " + ". ".join(problems))


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for kernels started inside the block (they inherit this process's
    environment; papermill offers no per-kernel env), restoring the previous values after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ensure_kernel(name: str = KERNEL_NAME) -> None:
    """Make sure the Jupyter kernel `name` exists; install `python3` for this interpreter if missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    available = KernelSpecManager().find_kernel_specs()
    if name in available:
        return
    if name != KERNEL_NAME:
        raise FileNotFoundError(f"no Jupyter kernel {name!r}; available: {sorted(available)}")
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", name],
                   check=True, capture_output=True)


def plotly_js_name() -> str:
    """The file name of the shared plotly.js, versioned: pages made by another plotly read their own copy."""
    from plotly.offline import get_plotlyjs_version

    return f"plotly-{get_plotlyjs_version()}.min.js"


def write_plotly_js(folder: str | Path) -> Path:
    """The one copy of plotly.js that the pages under `folder` load (written once, atomically)."""
    from plotly.offline import get_plotlyjs

    path = Path(folder) / plotly_js_name()
    return path if path.is_file() else write_atomic(path, get_plotlyjs())


def run_notebook(path: str | Path, out_dir: str | Path, parameters: Mapping[str, Any] | None = None, *,
                 kernel_name: str = KERNEL_NAME, cell_timeout_s: float | None = DEFAULT_CELL_TIMEOUT_S,
                 plotly_src: str | None = None) -> NotebookResult:
    """Execute `path` with papermill (cwd = its folder), render HTML, read back its metrics.

    The page loads plotly.js from `plotly_src` (a URL relative to the page; default: the copy `write_plotly_js`
    keeps in `out_dir`). Parameter errors raise ParameterError before anything runs; execution errors are
    returned in the result. The metrics file is removed first and written last, so it marks a finished run.
    """
    import nbformat
    import papermill

    path, values = Path(path), dict(parameters or {})
    check_parameters(notebook_parameters(path), values, where=str(path))
    ensure_kernel(kernel_name)
    paths = output_paths(path, out_dir)
    paths["metrics"].parent.mkdir(parents=True, exist_ok=True)
    paths["metrics"].unlink(missing_ok=True)
    partial = paths["executed"].with_name(f".{path.stem}.partial.ipynb")
    partial.unlink(missing_ok=True)
    start, error = time.perf_counter(), None
    with _environment(KERNEL_ENV):
        try:
            papermill.execute_notebook(str(path), str(partial), parameters=values, kernel_name=kernel_name,
                                       cwd=str(path.parent), progress_bar=False, execution_timeout=cell_timeout_s,
                                       extra_arguments=KERNEL_ARGS)
        # Any failure of the kernel or a cell is this notebook's result, reported, not raised.
        except Exception as exc:  # noqa: BLE001
            error = _describe_error(exc)
    seconds = time.perf_counter() - start
    if not partial.exists():
        return NotebookResult(path, values, error=error or "papermill wrote no output notebook",
                              seconds=seconds)
    nb = nbformat.read(partial, as_version=nbformat.NO_CONVERT)
    os.replace(partial, paths["executed"])
    html_path = paths["html"]
    try:
        if plotly_src is None:
            plotly_src = write_plotly_js(out_dir).name
        write_atomic(html_path, notebook_html(nb, plotly_src))
    except Exception as exc:  # noqa: BLE001  (a page that cannot render fails this notebook only)
        error, html_path = error or f"rendering HTML failed: {_describe_error(exc)}", None
    record = metrics_in_notebook(nb) if error is None else None
    if error is None and record is None:
        error = "the notebook ran but recorded no metrics (it must end with record_metrics(...))"
    if error is not None:
        return NotebookResult(path, values, paths["executed"], html_path, error=error, seconds=seconds)
    write_json(paths["metrics"], record.to_dict())
    return NotebookResult(path, values, paths["executed"], html_path, metrics=record, seconds=seconds)


def _describe_error(exc: Exception) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename is not None:
        return f"{ename}: {evalue} (cell {getattr(exc, 'exec_count', '?')})"
    return f"{type(exc).__name__}: {exc}"


def load_result(path: str | Path, out_dir: str | Path, parameters: Mapping[str, Any] | None = None
                ) -> NotebookResult | None:
    """The result of an earlier finished run in `out_dir` (its metrics file exists and reads back), else None
    (a damaged metrics file is said so in a warning, and its notebook runs again)."""
    paths = output_paths(path, out_dir)
    if not paths["metrics"].exists():
        return None
    try:
        record = MetricsRecord.from_dict(read_json(paths["metrics"], "metrics file"))
    except ChecksumError as exc:
        warnings.warn(f"{exc}; it runs again", stacklevel=2)
        return None
    except (ValueError, TypeError):  # not JSON or not a metrics record: an unfinished or foreign file
        return None
    return NotebookResult(Path(path), dict(parameters or {}), paths["executed"], paths["html"], metrics=record)


def _embed_plotly(nb: NotebookNode) -> bool:
    """Give every plotly output a text/html div (no JS), show a widget by the static HTML it carries (the
    widget view is dropped: its scripts would come from a CDN), and drop the widgets' saved state (a plotly
    FigureWidget's holds another copy of plotly.js); True if the notebook has any figure."""
    import plotly.io as pio

    nb.metadata.pop("widgets", None)
    found = False
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_MIME in data and "text/html" in data:
                del data[WIDGET_MIME]
            fig = data.get(PLOTLY_MIME)
            if fig is not None:
                height = (fig.get("layout") or {}).get("height") or FIGURE_HEIGHT_PX
                data["text/html"] = pio.to_html(fig, include_plotlyjs=False, full_html=False,
                                                default_height=f"{height}px", validate=False)
            found = found or PLOTLY_DIV in str(data.get("text/html", ""))
    return found


def notebook_html(nb: NotebookNode, plotly_src: str) -> str:
    """Render an executed notebook to one HTML page that loads plotly.js from `plotly_src` (a URL relative to
    the page) when it has figures (`nb` itself is left unchanged)."""
    import jinja2
    from nbconvert import HTMLExporter

    node = copy.deepcopy(nb)
    has_figures = _embed_plotly(node)
    exporter = HTMLExporter(template_name="lab", template_file=REPORT_TEMPLATE,
                            extra_loaders=[jinja2.DictLoader({REPORT_TEMPLATE: _TEMPLATE_SOURCE})])
    body, _ = exporter.from_notebook_node(node, resources={"plotly_src": plotly_src if has_figures else ""})
    return body


_INDEX_STYLE = """body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;text-align:left}
tr.failed{background:#fee}pre{margin:0;white-space:pre-wrap;max-width:50em}code{font-size:90%}"""


def _pairs(d: Mapping[str, Any]) -> str:
    return "<br>".join(f"<code>{html.escape(str(k))} = {html.escape(_fmt(v))}</code>" for k, v in d.items())


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, list | dict) else str(v)


def _link(target: Path | None, index_dir: Path, text: str) -> str:
    if target is None or not target.exists():
        return html.escape(text)
    return f'<a href="{html.escape(os.path.relpath(target, index_dir))}">{html.escape(text)}</a>'


def render_index(results: Sequence[NotebookResult], path: str | Path, title: str = "prescope reports",
                 labels: Sequence[str] | None = None) -> Path:
    """Write an HTML index: one row per run with links, status, provenance, config and metrics.

    `labels` names the rows (default: each notebook's stem), e.g. by sweep cell id.
    """
    path = Path(path)
    labels = [r.name for r in results] if labels is None else list(labels)
    if len(labels) != len(results):
        raise ValueError(f"render_index: {len(labels)} labels for {len(results)} results")
    rows = []
    for r, label in zip(results, labels, strict=True):
        m = r.metrics
        status = "ok" if r.ok else f"failed<pre>{html.escape(r.error or '')}</pre>"
        provenance = f"{m.source} on {html.escape(m.profile)}" if m else ""
        config = m.config if m and m.config else r.parameters
        rows.append(f'<tr class="{"ok" if r.ok else "failed"}"><td>{_link(r.html, path.parent, label)}</td>'
                    f"<td>{status}</td><td>{provenance}</td>"
                    f"<td><code>{html.escape(m.git_revision[:12]) if m else ''}</code></td>"
                    f"<td>{_pairs(config)}</td><td>{_pairs(m.metrics) if m else ''}</td>"
                    f"<td>{'earlier run' if r.seconds is None else f'{r.seconds:.1f}'}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("report", "status", "measured/simulated on", "git revision",
                                              "config", "metrics", "run time (s)"))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_INDEX_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></body></html>")
    return write_atomic(path, page)


def list_notebooks(notebooks_dir: str | Path) -> list[Path]:
    """The notebooks a report runs: `*.ipynb` in the folder, sorted, skipping hidden and checkpoint files."""
    return sorted(p for p in Path(notebooks_dir).glob("*.ipynb") if not p.name.startswith("."))


def report_all(notebooks_dir: str | Path, reports_dir: str | Path, *, names: Iterable[str] | None = None,
               progress: bool = True, cell_timeout_s: float | None = DEFAULT_CELL_TIMEOUT_S) -> list[NotebookResult]:
    """Run every notebook of `notebooks_dir` (or those whose stem is in `names`) on its defaults into
    `reports_dir`, then write `reports_dir/index.html`."""
    from tqdm.auto import tqdm

    notebooks = list_notebooks(notebooks_dir)
    if names is not None:
        wanted = set(names)
        missing = sorted(wanted - {p.stem for p in notebooks})
        if missing:
            raise FileNotFoundError(f"no notebooks {missing} in {notebooks_dir}")
        notebooks = [p for p in notebooks if p.stem in wanted]
    if not notebooks:
        raise FileNotFoundError(f"no notebooks (*.ipynb) in {notebooks_dir}")
    results = []
    for nb in tqdm(notebooks, desc="notebooks", unit="nb", disable=not progress):
        try:
            results.append(run_notebook(nb, reports_dir, cell_timeout_s=cell_timeout_s))
        except ParameterError as exc:  # a malformed parameters cell fails this notebook, not the report
            results.append(NotebookResult(nb, error=str(exc), seconds=0.0))
    render_index(results, Path(reports_dir) / "index.html")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--notebooks", default="notebooks", help="folder of notebooks to run (default: %(default)s)")
    parser.add_argument("--out", default="reports", help="folder for the reports (default: %(default)s)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these notebooks (file stems)")
    add_limit_arguments(parser)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """--cell-timeout-s, shared by `prescope report` and `prescope sweep`."""
    parser.add_argument("--cell-timeout-s", "--cell_timeout_s", dest="cell_timeout_s", type=float,
                        default=DEFAULT_CELL_TIMEOUT_S,
                        help="seconds one notebook cell may run before its notebook fails (0: no limit; "
                             "default %(default)s)")


def cell_timeout(seconds: float) -> float | None:
    """The --cell-timeout-s value as run_notebook takes it: None for 0 (no limit)."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"--cell-timeout-s {seconds}: give seconds > 0, or 0 for no limit")
    return seconds or None


def run(args: argparse.Namespace) -> int:
    timeout = cell_timeout(args.cell_timeout_s)
    check_output(args.out, folder=True, what="--out")
    results = report_all(args.notebooks, args.out, names=args.only, cell_timeout_s=timeout)
    for r in results:
        print(f"{'ok    ' if r.ok else 'FAILED'} {r.name} ({r.seconds:.1f} s){'' if r.ok else ': ' + str(r.error)}")
    index = Path(args.out) / "index.html"
    print(f"index: {index}")
    print(json.dumps({"report": str(index), "notebooks": len(results),
                      "failed": [r.name for r in results if not r.ok]}))
    return 0 if all(r.ok for r in results) else 1
