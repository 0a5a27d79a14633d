"""Reliability harness: bad inputs and faults tried as a new user would, each outcome classified.

Run from the repository root with the project's Python (no network, temporary folders only):

    python reports/reliability/cases.py [--out reports/reliability] [--jobs 2] [--only ID ...]

It builds real inputs once (a prescope-tiny routing trace with hidden states and logits, a LLaPor
checkpoint, a profile, a bench result with its routing and timelines, a fidelity table, a simulated
comparison, an equivalence check, a sweep and a llama.cpp trace), then runs every case in its own
process with a time limit (CASE_TIMEOUT_S): command lines as `python -m prescope.cli ...`, API calls as
small Python programs. Each case expects either a refusal (bad input) or a handled fault (an interrupted
or concurrent run, a hang) and is classified as

    clear error           refused with one error line that names the file or value
    unclear error         refused, but the message names neither
    handled fault         the fault left correct, complete output (checked), or the run recovered
    raw traceback         a Python traceback reached the user
    hang                  still running at the time limit
    silently wrong/accepted   the bad input was taken, or the result differs from the right one
    lost output           output that looks complete but is not

and written to cases.csv (one row per case) and, with the tally, the command, the machine and the git
revision, to README.md.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASE_TIMEOUT_S = 150  # any case still running after this is a hang
HANG_TIMEOUT_S = 20  # cases that probe a hang: the timeout under test is a few seconds
OUTCOMES = ("clear error", "unclear error", "handled fault", "raw traceback", "hang", "silently wrong/accepted",
            "lost output")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}


# ---- running one thing -------------------------------------------------------------------------------------

@dataclass
class Run:
    rc: int | None
    out: str
    err: str
    seconds: float
    timed_out: bool
    argv: list = field(default_factory=list)


def run(argv: list[str], cwd: Path, timeout: float = CASE_TIMEOUT_S, env: dict | None = None) -> Run:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return Run(proc.returncode, out, err, time.perf_counter() - start, False, argv)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the case and whatever it started (kernels)
        out, err = proc.communicate()
        return Run(None, out, err, time.perf_counter() - start, True, argv)


def cli(*args: str, cwd: Path, timeout: float = CASE_TIMEOUT_S) -> Run:
    return run([sys.executable, "-m", "prescope.cli", *map(str, args)], cwd, timeout)


API_WRAPPER = """
import sys
try:
{body}
except (ValueError, OSError) as exc:  # what the CLI reports as one line; anything else is a traceback
    print(f"error: {{type(exc).__name__}}: {{exc}}", file=sys.stderr)
    sys.exit(2)
"""


def api(code: str, cwd: Path, timeout: float = CASE_TIMEOUT_S) -> Run:
    body = textwrap.indent(textwrap.dedent(code).strip(), "    ")
    return run([sys.executable, "-c", API_WRAPPER.format(body=body)], cwd, timeout)


# ---- the inputs --------------------------------------------------------------------------------------------

FIXTURES = r"""
import json, shutil, sys
from pathlib import Path
import numpy as np, pandas as pd, torch
from prescope import files
from prescope.experiments import benchfile
from prescope.hardware.profiles import load_profile, save_profile
from prescope.models.tiny import load_tiny
from prescope.predict import llapor
from prescope.routing.recording import record_trace
from prescope.routing.trace import save_trace

fx, root = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model, tok = load_tiny()
rng = np.random.default_rng(0)
prompts = [list(map(int, rng.integers(5, 8000, 24))) for _ in range(12)]
trace = record_trace(model, None, prompts, max_new_tokens=6, batch_size=4, keep_hidden=True, keep_logits=True,
                     progress=False)
save_trace(trace, fx / "tiny.trace.parquet")
save_trace(trace.select(range(4)), fx / "small.trace.parquet")
cfg = llapor.LLaPorConfig(distance=1, pca_dim=4, width=8, max_epochs=1, calibrate_steps=1, min_group_layers=1)
llapor.train_llapor(trace, cfg, progress=False).save(fx / "llapor.pt")
save_profile(load_profile("h200"), fx / "profile.json")
# a bench result as `prescope bench` writes it (three cells of the committed H200 run), its routing, a timeline
src = root / "reports/h200/comparison/olmoe-tiny-routing-a616ad2"
data = json.loads(Path(f"{src}.json").read_text())
data["config"]["profile"] = str(root / data["config"]["profile"])  # relative to the repository
keep = [c for c in data["cells"] if c["batch"] == 1 and c["policy"] in ("stock", "resident", "on_demand_lru")]
with np.load(f"{src}.routing.npz") as z:
    routes = {k.replace("__", "|"): z[k] for k in z.files if k.endswith("__1") and ("resident" in k or "on_demand_lru" in k)}
timeline = pd.read_parquet(root / "reports/h200/comparison/mixtral4.timelines.parquet").head(2000)
(fx / "bench").mkdir()
benchfile.write_bench(fx / "bench", {k: v for k, v in data.items() if k != "cells"}, keep, routes, [timeline])
"""

TINY_NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "execution_count": None, "metadata": {"tags": ["parameters"]}, "outputs": [],
         "source": "steps = 3  # a count\nrate = 0.5  # a share\nsleep_s = 0.0  # seconds the cell waits"},
        {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
         "source": "import time\ntime.sleep(sleep_s)\nfrom prescope.workbench.metrics import record_metrics\n"
                   "record_metrics(source='simulated', profile='harness', config={'steps': steps}, work=steps * rate)"},
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def llamacpp_csv(path: Path, tokens: int, layers: int = 8, experts: int = 16, top_k: int = 4, seed: int = 0) -> Path:
    """A well-formed llama.cpp route trace: two prefill tokens (the first skips the last layer, as llama.cpp
    does), then decode tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    head = ["# route_trace v1", f"# model=/m.gguf arch=toy n_layer={layers} n_expert={experts} n_expert_used={top_k}"]
    head += [f"# layer={i} expert_bytes=1000000 dense_bytes=1000" for i in range(layers)]
    head.append("turn,phase,step,layer,slot,expert,weight,residency,expert_bytes")
    with open(path, "w") as f:
        f.write("\n".join(head) + "\n")
        for step in range(tokens):
            rows = []
            for layer in range(layers):
                if step == 0 and layer == layers - 1:
                    continue
                chosen = rng.choice(experts, top_k, replace=False)
                weights = np.sort(rng.dirichlet(np.ones(top_k)))[::-1]
                rows += [f"0,{int(step > 1)},{step},{layer},{k},{e},{w:.6f},0,1000000\n"
                         for k, (e, w) in enumerate(zip(chosen, weights, strict=True))]
            f.write("".join(rows))
    return path


@dataclass
class Fixtures:
    root: Path

    def __getattr__(self, name: str) -> Path:
        return self.root / {"trace": "tiny.trace.parquet", "small": "small.trace.parquet", "ckpt": "llapor.pt",
                            "profile": "profile.json", "csv": "toy.route.csv", "big_csv": "big.route.csv",
                            "notebook": "nb.ipynb", "sweep": "sweep", "fidelity": "fidelity-h.csv",
                            "compare": "compare", "equivalence": "equivalence.json"}[name]


def build_fixtures(root: Path) -> Fixtures:
    fx = Fixtures(root)
    steps = [
        ([sys.executable, "-c", FIXTURES, str(root), str(ROOT)], "trace, checkpoint, profile, bench"),
        ([sys.executable, "-m", "prescope.cli", "fidelity", "--bench", str(root / "bench/bench.json"), "--routing",
          str(root / "bench/routing.npz"), "--profile", str(ROOT / "reports/h200/h200-engine.json"),
          "--out", str(root / "fidelity-h.csv")], "fidelity"),
        ([sys.executable, "-m", "prescope.cli", "simulate-compare", "--trace", str(root / "small.trace.parquet"),
          "--twin", "", "--profiles", "h200", "--policies", "on_demand_lru", "--budgets", "0.5", "--batch-sizes", "1",
          "--prompts", "0", "--max-steps", "2", "--predictor", "", "--routers", "fit", "--measured", "",
          "--host-of", "", "--out", str(root / "compare")], "simulate-compare"),
        ([sys.executable, "-m", "prescope.cli", "check-equivalence", "--models", "prescope-tiny", "--device", "cpu",
          "--out", str(root / "equivalence.json")], "check-equivalence"),
    ]
    (root / "nb.ipynb").write_text(json.dumps(TINY_NOTEBOOK))
    (root / "grid.yaml").write_text("notebook: nb.ipynb\nparameters:\n  steps: [1, 2]\n")
    steps.append(([sys.executable, "-m", "prescope.cli", "sweep", str(root / "grid.yaml"), "--out", str(root / "sweep")],
                  "sweep"))
    llamacpp_csv(root / "toy.route.csv", 12)
    llamacpp_csv(root / "big.route.csv", 5000, layers=48, experts=128, top_k=6)  # about 50 MB
    for argv, what in steps:
        done = run(argv, root, timeout=900)
        # check-equivalence exits 1 when runs of one policy differ bit for bit across budgets; its file is the input
        if done.rc != 0 and not (what == "check-equivalence" and done.rc == 1 and (root / "equivalence.json").exists()):
            raise SystemExit(f"building the {what} fixture failed:\n{done.err[-3000:]}")
        print(f"fixture: {what} ({done.seconds:.0f} s)", flush=True)
    return fx


# ---- changing files ----------------------------------------------------------------------------------------

def copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    side = src.with_name(src.name + ".sha256")
    if side.exists():
        shutil.copy(side, dst.with_name(dst.name + ".sha256"))
    return dst


def flip(src: Path, dst: Path, where: float, bit: int = 3) -> Path:
    """A copy of `src` (and its checksum sidecar) with one bit flipped at a share `where` of its length (moved
    off the checksum token's marker, where a flip leaves the data intact by design)."""
    data = bytearray(src.read_bytes())
    i = min(int(where * len(data)), len(data) - 1)
    marker = data.find(b"prescope-sha256:")
    if marker >= 0 and marker <= i < marker + 16:
        i = marker + 20  # into the digits: the stored checksum itself is damaged
    data[i] ^= 1 << bit
    copy(src, dst)
    dst.write_bytes(bytes(data))
    return dst


def edit_text(src: Path, dst: Path, old: str, new: str, count: int = 1) -> Path:
    text = src.read_text(encoding="utf-8", errors="surrogateescape")
    assert old in text, (src, old)
    dst.write_text(text.replace(old, new, count), encoding="utf-8", errors="surrogateescape")
    return dst


# rewriting a trace as another tool would (pyarrow, no checksum): the content checks must still hold
REWRITE = """
import json, numpy as np, pyarrow as pa, pyarrow.parquet as pq
from prescope import files
from prescope.routing.trace import METADATA_KEY
table = pq.read_table({src!r})
meta = {{k: v for k, v in table.schema.metadata.items() if k != files.PARQUET_KEY}}
header = json.loads(meta[METADATA_KEY])
def column(name, fn):
    global table
    col = table[name].combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False).copy()
    fn(values, col.type.list_size)
    new = pa.FixedSizeListArray.from_arrays(pa.array(values, col.type.value_type), col.type.list_size)
    table = table.set_column(table.column_names.index(name), name, new)
{body}
pq.write_table(table.replace_schema_metadata({{**meta, METADATA_KEY: json.dumps(header)}}), {dst!r})
"""


def rewrite(fx: Fixtures, dst: Path, body: str, src: Path | None = None) -> Path:
    done = api(REWRITE.format(src=str(src or fx.trace), dst=str(dst), body=textwrap.dedent(body)), dst.parent)
    if done.rc != 0:
        raise RuntimeError(done.err)
    return dst


# ---- cases -------------------------------------------------------------------------------------------------

@dataclass
class Case:
    """`act(fx, tmp)` runs the case in the fresh folder `tmp`; `expect` is "refuse" (bad input: a clear error
    naming `names`) or "handle" (a fault: `check(fx, tmp, run)` returns None when the outcome is right, else
    the outcome it is)."""

    id: str
    category: str
    name: str
    command: str
    act: Callable
    expect: str = "refuse"
    names: str = ""
    check: Callable | None = None
    timeout: float = CASE_TIMEOUT_S
    extra: dict = field(default_factory=dict)


CASES: list[Case] = []


def case(category: str, name: str, command: str, expect: str = "refuse", names: str = "",
         check: Callable | None = None, timeout: float = CASE_TIMEOUT_S):
    def register(act: Callable) -> Callable:
        CASES.append(Case(f"{len(CASES) + 1:03d}", category, name, command, act, expect, names, check, timeout))
        return act
    return register


def refuse_cli(category: str, name: str, args: Callable[[Fixtures, Path], list], names: str = "",
               timeout: float = CASE_TIMEOUT_S) -> None:
    """A command line that must be refused with one line naming `names`."""
    def act(fx, tmp):
        argv = args(fx, tmp)
        return cli(*argv, cwd=tmp, timeout=timeout)
    CASES.append(Case(f"{len(CASES) + 1:03d}", category, name, "", act, "refuse", names, None, timeout))


def refuse_api(category: str, name: str, code: Callable[[Fixtures, Path], str], names: str = "") -> None:
    def act(fx, tmp):
        return api(code(fx, tmp), tmp)
    CASES.append(Case(f"{len(CASES) + 1:03d}", category, name, "", act, "refuse", names))


def read_cli(category: str, name: str, args: Callable[[Fixtures, Path], list], shows: str,
             timeout: float = CASE_TIMEOUT_S) -> None:
    """A command line that must succeed on input prescope reads by its content whatever its name says (one trace
    reader for every command), its output showing `shows` (what it read it as); else silently wrong."""
    def act(fx, tmp):
        return cli(*args(fx, tmp), cwd=tmp, timeout=timeout)

    def check(fx, tmp, done):
        return None if done.rc == 0 and shows in done.out else "silently wrong/accepted"
    CASES.append(Case(f"{len(CASES) + 1:03d}", category, name, "", act, "handle", shows, check, timeout))


def simulate(trace: Path, *extra) -> list:
    """A replay of the first two steps of a prescope trace, or of all of a (small) llama.cpp trace: with
    --max-steps the import stops reading after the steps it needs, before later rows."""
    steps = [] if str(trace).endswith(".csv") else ["--max-steps", "2"]
    return ["simulate", "--trace", trace, "--budget-share", "0.5", *steps, *extra]


# A. structural trace corruption (prescope simulate on a prescope trace)
def _trace_cases() -> None:
    cat = "structural trace"
    def cut(share):
        def make(fx, tmp):
            data = fx.trace.read_bytes()
            (tmp / "t.parquet").write_bytes(data[: int(share * len(data))])
            return simulate(tmp / "t.parquet")
        return make
    refuse_cli(cat, "truncated to half", cut(0.5), "t.parquet")
    refuse_cli(cat, "footer cut off (last 100 bytes)", lambda fx, tmp: (
        (tmp / "t.parquet").write_bytes(fx.trace.read_bytes()[:-100]), simulate(tmp / "t.parquet"))[1], "t.parquet")
    refuse_cli(cat, "empty file", lambda fx, tmp: ((tmp / "t.parquet").write_bytes(b""),
                                                   simulate(tmp / "t.parquet"))[1], "t.parquet")
    refuse_cli(cat, "text file named .parquet", lambda fx, tmp: ((tmp / "t.parquet").write_text("hello"),
                                                                 simulate(tmp / "t.parquet"))[1], "t.parquet")
    refuse_cli(cat, "a parquet file that is not a trace", lambda fx, tmp: (
        api(f"import pandas as pd; pd.DataFrame({{'a': [1]}}).to_parquet({str(tmp / 't.parquet')!r})", tmp),
        simulate(tmp / "t.parquet"))[1], "not a prescope trace")
    refuse_cli(cat, "trace path does not exist", lambda fx, tmp: simulate(tmp / "none.parquet"), "none.parquet")
    # read by content (one trace reader for every command): taken as what it is, whatever its name says
    read_cli(cat, "a llama.cpp CSV renamed .parquet: read as llama.cpp", lambda fx, tmp: simulate(
        copy(fx.csv, tmp / "t.parquet")), '"model_class": "llama.cpp:')
    read_cli(cat, "a trace parquet renamed .csv: read as a prescope trace", lambda fx, tmp: simulate(
        copy(fx.small, tmp / "t.csv")), '"model_class": "OlmoeForCausalLM"')
    read_cli(cat, "train-predictor on a trace without hidden states: routing-only LLaPor", lambda fx, tmp: [
        "train-predictor", "--trace", rewrite(fx, tmp / "t.parquet", "table = table.drop(['hidden'])"),
        "--out", tmp / "ck.pt"], '"predictor": "llapor_routing"')
    refuse_cli(cat, "trace path is a folder", lambda fx, tmp: simulate(tmp), "is a folder")
    refuse_cli(cat, "header says E=99 on 64-expert data (bytes edited in place)", lambda fx, tmp: simulate(
        edit_text(fx.trace, tmp / "t.parquet", '"num_experts": 64,', '"num_experts": 99,')), "t.parquet")
    refuse_cli(cat, "header says E=128 on 64-expert data (rewritten with pyarrow)", lambda fx, tmp: simulate(api(
        f"import json, pyarrow.parquet as pq\nt = pq.read_table({str(fx.trace)!r})\nm = dict(t.schema.metadata)\n"
        f"h = json.loads(m[b'prescope.routing.trace'])\nh['layout']['num_experts'] = 128\n"
        f"m[b'prescope.routing.trace'] = json.dumps(h)\npq.write_table(t.replace_schema_metadata(m), "
        f"{str(tmp / 't.parquet')!r})", tmp) and tmp / "t.parquet"), "t.parquet")
    content = [
        ("header E=128, no checksum, logits 64 wide", "header['layout']['num_experts'] = 128", "logits"),
        ("header version 99", "header['version'] = 99", "version 99"),
        ("header num_tokens off by one", "header['num_tokens'] += 1", "rows, expected"),
        ("header K=9 on top-8 data", "header['layout']['top_k'] = 9", "experts"),
        ("header hidden_size 256 on 128-wide states", "header['layout']['hidden_size'] = 256", "hidden"),
        ("a row dropped", "table = table.slice(1)", "rows"),
        ("expert id 64 (E=64)", "column('experts', lambda v, k: v.__setitem__(0, 64))", "expert 64"),
        ("negative expert id -3", "column('experts', lambda v, k: v.__setitem__(0, -3))", "expert"),
        ("negative router weight", "column('weights', lambda v, k: v.__setitem__(k - 1, -0.1))", "negative"),
        ("NaN router weight", "column('weights', lambda v, k: v.__setitem__(0, np.nan))", "finite"),
        ("an expert repeated in a token's top-k", "column('experts', lambda v, k: v.__setitem__(1, v[0]))", "repeated"),
        ("weights not sorted highest first", "column('weights', lambda v, k: v.__setitem__(k - 1, 5.0))", "sorted"),
        ("one MISSING among routed slots", "column('experts', lambda v, k: v.__setitem__(0, -1))", "MISSING"),
        ("phase 'decoding'", "i = table.column_names.index('phase'); table = table.set_column(i, 'phase', "
                             "pa.array(['decoding'] * table.num_rows))", "phase"),
        ("prompt ids as floats", "i = table.column_names.index('prompt'); table = table.set_column(i, 'prompt', "
                                 "pa.array(table['prompt'].to_numpy().astype(float) + 0.5))", "prompt"),
        ("experts column removed", "table = table.drop(['experts'])", "experts"),
        ("a NaN in the hidden states", "column('hidden', lambda v, k: v.__setitem__(5, np.nan))", "hidden holds nan"),
        ("a NaN in the router logits", "column('logits', lambda v, k: v.__setitem__(5, np.nan))", "logits holds nan"),
    ]
    for name, body, names in content:
        refuse_cli(cat, name + " (no checksum: a foreign writer)",
                   lambda fx, tmp, body=body: simulate(rewrite(fx, tmp / "t.parquet", body)), names)


# B. structural llama.cpp CSV corruption
def _csv_cases() -> None:
    cat = "structural llama.cpp CSV"
    row = "0,1,5,3,2,"  # the start of the decode row of step 5, layer 3, slot 2
    edits = [  # (name, field of that row to set, its new text) or (name, text to replace, its replacement)
        ("wrong magic line", ("# route_trace v1", "# route_trace v2"), "route_trace v2"),
        ("model line lacks n_expert", (" n_expert=16", ""), ":2:"),
        ("n_expert_used above n_expert", ("n_expert_used=4", "n_expert_used=40"), ":2:"),
        ("a layer line missing", ("# layer=3 expert_bytes=1000000 dense_bytes=1000\n", ""), ":6:"),
        ("column line renamed", ("weight,residency", "gate,residency"), "column line"),
        ("expert id out of range", (5, "99"), "expert=99"),
        ("layer out of range", (3, "30"), "layer=30"),
        ("expert not an integer", (5, "x"), "expert must be an integer"),
        ("expert written 1e0", (5, "1e0"), "expert must be an integer"),
        ("expert written 7.", (5, "7."), "expert must be an integer"),
        ("weight above 1", (6, "1.7"), "weight=1.7"),
        ("weight negative", (6, "-0.1"), "weight=-0.1"),
        ("weight NaN", (6, "nan"), "weight=nan"),
        ("nine fields become eight", (8, None), "8 fields"),
        ("slot repeated", (4, "1"), "slot 1 repeated"),
        ("decode step marked prefill", (1, "0"), "phase"),
        ("rows after the header removed", None, "no routing rows"),
        ("a byte that is not UTF-8", (5, "\udcff"), "not UTF-8"),
        ("a NUL byte in a row", (5, "\x00"), "must be an integer"),
    ]
    for name, change, names in edits:
        def make(fx, tmp, change=change):
            lines = fx.csv.read_text().splitlines(keepends=True)
            first = next(i for i, line in enumerate(lines) if line.startswith("0,"))
            if change is None:
                lines = lines[:first]
            elif isinstance(change[0], str):
                lines = "".join(lines).replace(change[0], change[1], 1).splitlines(keepends=True)
            else:
                i = next(i for i, line in enumerate(lines) if line.startswith(row))
                fields = lines[i].rstrip("\n").split(",")
                if change[1] is None:
                    del fields[change[0]]
                else:
                    fields[change[0]] = change[1]
                lines[i] = ",".join(fields) + "\n"
            (tmp / "t.route.csv").write_text("".join(lines), encoding="utf-8", errors="surrogateescape")
            return simulate(tmp / "t.route.csv")
        refuse_cli(cat, name, make, names)

    def group(fx, tmp, drop_slot=False, repeat=False, rising=False):
        lines = fx.csv.read_text().splitlines(keepends=True)
        i = next(i for i, line in enumerate(lines) if line.startswith("0,1,5,3,1,"))
        parts = lines[i].split(",")
        if drop_slot:
            del lines[i]
        if repeat:
            parts[5] = lines[i - 1].split(",")[5]
            lines[i] = ",".join(parts)
        if rising:
            parts[6] = "0.999"
            lines[i] = ",".join(parts)
        (tmp / "t.route.csv").write_text("".join(lines))
        return simulate(tmp / "t.route.csv")
    refuse_cli(cat, "a token's slot missing", lambda fx, tmp: group(fx, tmp, drop_slot=True), "missing slot")
    refuse_cli(cat, "an expert repeated in a token's top-k", lambda fx, tmp: group(fx, tmp, repeat=True), "repeats")
    refuse_cli(cat, "weights rising with the slot", lambda fx, tmp: group(fx, tmp, rising=True), "weights must fall")
    refuse_cli(cat, "prefill step after a decode step", lambda fx, tmp: (
        (tmp / "t.route.csv").write_text(re.sub(r"(?m)^0,1,11,", "0,0,11,", fx.csv.read_text())),
        simulate(tmp / "t.route.csv"))[1], "prefill step after a decode step")
    refuse_cli(cat, "empty file", lambda fx, tmp: ((tmp / "t.route.csv").write_text(""),
                                                   simulate(tmp / "t.route.csv"))[1], "empty file")

    def late_big(fx, tmp):  # ~50 MB, bad line early, bytes that are not UTF-8 at the end
        path = tmp / "big.route.csv"
        with open(fx.big_csv, "rb") as src, open(path, "wb") as dst:
            head = b"".join(src.readline() for _ in range(53))
            dst.write(head + b"0,0,0,0,0,500,0.5,0,1000000\n")
            src.readline()
            shutil.copyfileobj(src, dst)
            dst.write(b"\xff\xfe\n")
        return simulate(path)
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "a 50 MB trace malformed at line 54 is refused within 20 s",
                      "prescope simulate --trace big.route.csv (bad line 54)",
                      lambda fx, tmp: cli(*late_big(fx, tmp), cwd=tmp), "refuse", "big.route.csv:54: expert=500",
                      check=None, timeout=CASE_TIMEOUT_S, extra={"max_seconds": 20}))


# C. profile corruption
def _profile_cases() -> None:
    cat = "structural profile"
    def prof(body: str):
        return lambda fx, tmp: (api(f"""
            import json
            from prescope.hardware.profiles import load_profile
            d = load_profile('h200').to_dict()
            {body}
            open({str(tmp / 'p.json')!r}, 'w').write(d if isinstance(d, str) else json.dumps(d))
            """, tmp), simulate(fx.small, "--profile", tmp / "p.json"))[1]
    for name, body, names in [
        ("not JSON", "d = '{\"name\": '", "not valid JSON"),
        ("a JSON list", "d = [d]", "object"),
        ("a field missing", "del d['gpu_dense']", "gpu_dense"),
        ("an unknown field", "d['colour'] = 'blue'", "colour"),
        ("a bandwidth given as a string", "d['pinned_h2d'][0][1] = '55'", "'55'"),
        ("a bandwidth given as true", "d['pinned_h2d'][0][1] = True", "True"),
        ("a negative transfer latency", "d['transfer_latency_s'] = -1e-6", "transfer_latency_s"),
        ("mem_gbps NaN", "d['gpu_expert']['mem_gbps'] = float('nan')", "mem_gbps"),
        ("curve sizes not increasing", "d['pinned_h2d'] = [[4e6, 50.0], [1e6, 51.0]]", "strictly increase"),
        ("source 'guessed'", "d['source'] = 'guessed'", "source"),
        ("cpu_expert empty", "d['cpu_expert'] = {}", "cpu_expert"),
        ("cpu_expert a list", "d['cpu_expert'] = ['bfloat16']", "cpu_expert"),
        ("notes a string", "d['notes'] = 'a note'", "notes"),
        ("a curve point with three numbers", "d['pinned_h2d'][0] = [1e6, 50.0, 3.0]", "pinned_h2d"),
    ]:
        refuse_cli(cat, name, prof(body), names)
    refuse_cli(cat, "a saved profile edited by hand (checksum present)", lambda fx, tmp: simulate(
        fx.small, "--profile", edit_text(fx.profile, tmp / "p.json", '"gpu": "NVIDIA H200"', '"gpu": "NVIDIA H100"')),
        "p.json: checksum mismatch")
    refuse_cli(cat, "the profile is a checkpoint (binary)", lambda fx, tmp: simulate(
        fx.small, "--profile", copy(fx.ckpt, tmp / "p.json")), "p.json")
    refuse_cli(cat, "calibrate --from-measurements that is not JSON", lambda fx, tmp: (
        (tmp / "m.json").write_text("{"), ["calibrate", "--from-measurements", tmp / "m.json", "--out",
                                           tmp / "p.json"])[1], "m.json")
    refuse_cli(cat, "an unknown built-in name", lambda fx, tmp: simulate(fx.small, "--profile", "h300"), "h300")
    refuse_cli(cat, "the profile path is a folder", lambda fx, tmp: simulate(fx.small, "--profile", tmp),
               "profile")


# D. grid corruption
def _grid_cases() -> None:
    cat = "structural grid"
    def grid(text: str, *extra):
        def make(fx, tmp):
            shutil.copy(fx.notebook, tmp / "nb.ipynb")
            (tmp / "g.yaml").write_text(text)
            return ["sweep", tmp / "g.yaml", "--out", tmp / "out", *extra]
        return make
    for name, text, names in [
        ("not valid YAML", "notebook: nb.ipynb\nparameters: {steps: [1, 2}\n", "not valid YAML at line 2"),
        ("an unknown top-level key", "notebook: nb.ipynb\nparams: {steps: [1]}\n", "params"),
        ("an unknown parameter", "notebook: nb.ipynb\nparameters: {stpes: [1]}\n", "stpes"),
        ("a string for an int", "notebook: nb.ipynb\nparameters: {steps: [1, '2']}\n", "steps='2'"),
        ("true for an int", "notebook: nb.ipynb\nparameters: {steps: [1, true]}\n", "steps=True"),
        ("an empty value list", "notebook: nb.ipynb\nparameters: {steps: []}\n", "steps"),
        ("a value that is not a list", "notebook: nb.ipynb\nparameters: {steps: 3}\n", "steps"),
        ("[1, 1.0]: the same cell twice", "notebook: nb.ipynb\nparameters: {rate: [1, 1.0]}\n", "'rate' lists 1 and 1.0"),
        ("a value listed twice", "notebook: nb.ipynb\nparameters: {steps: [2, 2]}\n", "'steps' lists 2 and 2"),
        ("a name both swept and fixed", "notebook: nb.ipynb\nparameters: {steps: [1]}\nfixed: {steps: 2}\n", "steps"),
        ("negative resources", "notebook: nb.ipynb\nparameters: {steps: [1]}\nresources: {num_gpus: -1}\n", "num_gpus"),
        ("an unknown resource", "notebook: nb.ipynb\nparameters: {steps: [1]}\nresources: {gpus: 1}\n", "gpus"),
        ("the notebook does not exist", "notebook: none.ipynb\nparameters: {steps: [1]}\n", "none.ipynb"),
        ("the notebook is a list", "notebook: [nb.ipynb]\nparameters: {steps: [1]}\n", "notebook"),
        ("no notebook", "parameters: {steps: [1]}\n", "notebook"),
        ("250,000 cells without --yes",
         "notebook: nb.ipynb\nparameters:\n  steps: [" + ", ".join(map(str, range(500))) + "]\n  rate: ["
         + ", ".join(f"{i / 1000}" for i in range(500)) + "]\n", "250000 cells"),
    ]:
        refuse_cli(cat, name, grid(text), names)
    refuse_cli(cat, "the notebook is not JSON", lambda fx, tmp: (
        grid("notebook: nb.ipynb\nparameters: {steps: [1]}\n")(fx, tmp), (tmp / "nb.ipynb").write_text("not json"),
        ["sweep", tmp / "g.yaml", "--out", tmp / "out"])[2], "nb.ipynb")
    refuse_cli(cat, "the grid file does not exist", lambda fx, tmp: ["sweep", tmp / "none.yaml"], "none.yaml")
    refuse_cli(cat, "a binary grid file", lambda fx, tmp: ((tmp / "g.yaml").write_bytes(b"\x00\xff\xfe" * 20),
                                                          ["sweep", tmp / "g.yaml"])[1], "g.yaml")
    refuse_cli(cat, "--out is a file", lambda fx, tmp: ((tmp / "FILE").write_text("x"), grid(
        "notebook: nb.ipynb\nparameters: {steps: [1]}\n")(fx, tmp)[:2] + ["--out", tmp / "FILE"])[1], "FILE")
    refuse_cli(cat, "--cell-timeout-s -1", grid("notebook: nb.ipynb\nparameters: {steps: [1]}\n",
                                                 "--cell-timeout-s", "-1"), "--cell-timeout-s")


# E. bit flips in every file type
def _flip_cases() -> None:
    cat = "bit flip"
    targets = [
        ("trace parquet", lambda fx: fx.trace, lambda p: simulate(p), "t.parquet"),
        ("LLaPor checkpoint", lambda fx: fx.ckpt, None, "t.pt"),
        ("profile JSON", lambda fx: fx.profile, lambda p: simulate(Path("SMALL"), "--profile", p), "t.json"),
        ("bench JSON", lambda fx: fx.root / "bench/bench.json", None, "t.json"),
        ("bench routing npz", lambda fx: fx.root / "bench/routing.npz", None, "t.npz"),
        ("bench timelines parquet", lambda fx: fx.root / "bench/timelines.parquet", None, "t.parquet"),
        ("fidelity CSV", lambda fx: fx.fidelity, None, "t.csv"),
        ("simulated comparison CSV", lambda fx: fx.compare / "comparison.csv", None, "t.csv"),
        ("simulated comparison JSON", lambda fx: fx.compare / "comparison.json", None, "t.json"),
        ("equivalence JSON", lambda fx: fx.equivalence, None, "t.json"),
        ("sweep summary CSV", lambda fx: fx.sweep / "summary.csv", None, "t.csv"),
        ("sweep summary parquet", lambda fx: fx.sweep / "summary.parquet", None, "t.parquet"),
        ("sweep grid.json", lambda fx: fx.sweep / "grid.json", None, "t.json"),
    ]
    loaders = {  # the project's reader of each file
        "LLaPor checkpoint": "from prescope.predict import llapor; llapor.load({p!r})",
        "bench JSON": "from prescope.experiments.benchrows import bench_table; bench_table({p!r})",
        "bench routing npz": None,
        "equivalence JSON": "from prescope import files; files.read_json({p!r})",
        "simulated comparison JSON": "from prescope import files; files.read_json({p!r})",
        "sweep grid.json": "from prescope import files; files.read_json({p!r})",
        "simulated comparison CSV": "from prescope import files; files.read_csv({p!r})",
        "sweep summary CSV": "from prescope import files; files.read_csv({p!r})",
        "sweep summary parquet": "from prescope import files; files.verify({p!r})",
        "bench timelines parquet": "from prescope import files; files.verify({p!r})",
    }
    for what, source, command, dst in targets:
        for where in (0.1, 0.5, 0.97):
            def act(fx, tmp, source=source, command=command, dst=dst, where=where, what=what):
                path = flip(source(fx), tmp / dst, where)
                if command is not None:
                    return cli(*[fx.small if a == Path("SMALL") else a for a in command(path)], cwd=tmp)
                if what == "bench routing npz":
                    copy(fx.root / "bench/bench.json", tmp / "b.json")
                    return cli("fidelity", "--bench", tmp / "b.json", "--routing", path, "--profile",
                               ROOT / "reports/h200/h200-engine.json", cwd=tmp)
                if what == "fidelity CSV":
                    copy(fx.root / "bench/bench.json", tmp / "bench-x.json")
                    path.rename(tmp / "fidelity-x.csv")
                    (tmp / "t.csv.sha256").rename(tmp / "fidelity-x.csv.sha256")
                    return api(f"from prescope.workbench.results import h200_tables; h200_tables({str(tmp)!r})", tmp)
                return api(loaders[what].format(p=str(path)), tmp)
            names = "fidelity-x.csv" if what == "fidelity CSV" else dst
            CASES.append(Case(f"{len(CASES) + 1:03d}", cat, f"{what}, one bit at {where:.0%} of the file",
                              f"load a {what} with a flipped bit", act, "refuse", names))

    def many(fx, tmp):
        data = bytearray(fx.ckpt.read_bytes())
        import random
        rng = random.Random(1)
        for i in rng.sample(range(len(data) - 200), 64):
            data[i] ^= 0xFF
        (tmp / "t.pt").write_bytes(bytes(data))
        return api(f"from prescope.predict import llapor; llapor.load({str(tmp / 't.pt')!r})", tmp)
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "LLaPor checkpoint, 64 bytes flipped", "llapor.load(t.pt)",
                      many, "refuse", "t.pt"))

    def metrics_flip(fx, tmp):  # a finished cell's metrics damaged: the rerun says so and runs it again
        shutil.copytree(fx.sweep, tmp / "sweep")
        shutil.copy(fx.notebook, tmp / "nb.ipynb")
        shutil.copy(fx.root / "grid.yaml", tmp / "grid.yaml")
        metrics = sorted((tmp / "sweep/cells").glob("*/nb.metrics.json"))[0]
        flip(metrics, metrics.with_name("x"), 0.5).rename(metrics)
        return cli("sweep", tmp / "grid.yaml", "--out", tmp / "sweep", cwd=tmp)

    def metrics_check(fx, tmp, done):
        table = _read_summary(tmp / "sweep")
        ok = done.rc == 0 and "checksum mismatch" in done.err and "runs again" in done.err
        return None if ok and list(table["status"]) == ["ok", "ok"] else "silently wrong/accepted"
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "a sweep cell's metrics JSON, one bit: said, and the cell runs again",
                      "prescope sweep grid.yaml (a cell's metrics flipped)", metrics_flip, "handle", check=metrics_check))


def _read_summary(folder: Path):
    import pandas as pd

    return pd.read_csv(folder / "summary.csv")


def _bench_cases() -> None:
    cat = "structural bench result"
    edits = [
        ("a cell without decode_ms_median", "del [c for c in d['cells'] if c['policy'] == 'on_demand_lru'][0]"
                                            "['decode_ms_median']", "decode_ms_median"),
        ("config without input_len", "del d['config']['input_len']", "input_len"),
        ("a budget written 'half'", "d['cells'][0]['budget'] = 'half'", "budget"),
        ("cells an object, not a list", "d['cells'] = {'a': 1}", "cells"),
        ("a batch of 1.5", "d['cells'][1]['batch'] = 1.5", "batch"),
    ]
    for name, body, names in edits:
        def act(fx, tmp, body=body):
            api(f"import json\nd = json.load(open({str(fx.root / 'bench/bench.json')!r}))\nd.pop('checksum')\n"
                f"{body}\njson.dump(d, open({str(tmp / 'b.json')!r}, 'w'))", tmp)
            return cli("fidelity", "--bench", tmp / "b.json", "--routing", fx.root / "bench/routing.npz",
                       "--profile", "h200", cwd=tmp)
        CASES.append(Case(f"{len(CASES) + 1:03d}", cat, f"bench JSON edited by hand: {name}", "", act, "refuse", names))

    def reshaped(fx, tmp):
        api(f"import numpy as np\nz = np.load({str(fx.root / 'bench/routing.npz')!r})\n"
            f"np.savez({str(tmp / 'r.npz')!r}, **{{k: z[k][:, :, 0] for k in z.files}})", tmp)
        return cli("fidelity", "--bench", fx.root / "bench/bench.json", "--routing", tmp / "r.npz", "--profile",
                   "h200", cwd=tmp)
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "routing npz of the wrong shape (no checksum)", "", reshaped,
                      "refuse", "expected [steps, L=16"))

    def foreign_checkpoint(fx, tmp):
        return api(f"""
            import torch
            from prescope.predict import llapor
            blob = torch.load({str(fx.ckpt)!r}, weights_only=True)
            blob['nets'][0]['bias'] = torch.zeros(3)  # a tensor of the wrong shape, saved without a checksum
            torch.save(blob, {str(tmp / 'ck.pt')!r})
            llapor.load({str(tmp / 'ck.pt')!r})
            """, tmp)
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "LLaPor checkpoint with a tensor of the wrong shape (no checksum)",
                      "", foreign_checkpoint, "refuse", "ck.pt"))


# F. wrong values
def _value_cases() -> None:
    cat = "wrong value"
    for code, names in [
        ("EngineConfig(budget_share='0.5')", "budget_share"), ("EngineConfig(budget_bytes=1.5e6)", "budget_bytes"),
        ("EngineConfig(io_depth=float('nan'))", "io_depth"), ("EngineConfig(pin_memory=1)", "pin_memory"),
        ("EngineConfig(device='tpu')", "device"), ("EngineConfig(budget_share=0)", "budget_share"),
        ("EngineConfig(cpu_workers=-1)", "cpu_workers"), ("EngineConfig(async_io='yes')", "async_io"),
    ]:
        refuse_api(cat, code, lambda fx, tmp, code=code: f"from prescope.config import EngineConfig\n{code}", names)
    for code, names in [
        ("LLaPorConfig(group_boundaries=(1.5, 3))", "group_boundaries"),
        ("LLaPorConfig(dropout=float('nan'))", "dropout"),
    ]:
        refuse_api(cat, code, lambda fx, tmp, code=code: f"from prescope.predict.llapor import LLaPorConfig\n{code}",
                   names)
    refuse_api(cat, "BenchConfig(budgets=('0.5',))", lambda fx, tmp: "from prescope.experiments.bench import "
               "BenchConfig\nBenchConfig(budgets=('0.5',))", "budgets")
    refuse_api(cat, "TraceConfig(prompts_per_domain=0)", lambda fx, tmp: "from prescope.routing.recording import "
               "TraceConfig\nTraceConfig(prompts_per_domain=0)", "prompts_per_domain")
    refuse_api(cat, "replay(max_steps=-1)", lambda fx, tmp: f"from prescope.routing.trace import load_trace\n"
               f"from prescope.sim.simulator import replay\nreplay(load_trace({str(fx.small)!r}), 'on_demand_lru', "
               f"'h200', max_steps=-1)", "max_steps")
    refuse_cli(cat, "train-predictor --group-boundaries 50,90 on a 16-layer trace", lambda fx, tmp: [
        "train-predictor", "--trace", fx.trace, "--out", tmp / "ck.pt", "--group-boundaries", "50,90",
        "--max-epochs", "1", "--no-progress"], "(50, 90)")
    refuse_cli(cat, "train-predictor --group-boundaries x", lambda fx, tmp: [
        "train-predictor", "--trace", fx.trace, "--out", tmp / "ck.pt", "--group-boundaries", "x"], "'x'")
    refuse_cli(cat, "trace --name ../../x", lambda fx, tmp: ["trace", "--name", "../../x", "--out-dir", tmp], "../../x")
    refuse_cli(cat, "trace --dtype float99", lambda fx, tmp: ["trace", "--dtype", "float99", "--out-dir", tmp], "float99")
    refuse_cli(cat, "trace --device cuda (machine without CUDA)", lambda fx, tmp: [
        "trace", "--device", "cuda", "--out-dir", tmp], "cuda")
    refuse_cli(cat, "trace --prompts-per-domain 0", lambda fx, tmp: [
        "trace", "--prompts-per-domain", "0", "--out-dir", tmp], "prompts_per_domain")
    refuse_cli(cat, "bench on a machine without CUDA", lambda fx, tmp: ["bench", "--out", tmp / "b"], "cuda")
    refuse_cli(cat, "bench --budgets 1.5", lambda fx, tmp: ["bench", "--budgets", "1.5", "--out", tmp / "b"], "1.5")
    refuse_cli(cat, "check-equivalence on a machine without CUDA", lambda fx, tmp: [
        "check-equivalence", "--out", tmp / "e.json"], "cuda")
    refuse_cli(cat, "simulate --max-steps -1", lambda fx, tmp: ["simulate", "--trace", fx.small, "--max-steps", "-1"],
               "--max-steps -1")
    refuse_cli(cat, "simulate --max-steps 0", lambda fx, tmp: ["simulate", "--trace", fx.small, "--max-steps", "0"],
               "--max-steps 0")
    refuse_cli(cat, "simulate --max-steps 0 on a llama.cpp trace", lambda fx, tmp: [
        "simulate", "--trace", fx.csv, "--max-steps", "0"], "--max-steps 0")
    refuse_cli(cat, "simulate --budget-share 1.5", lambda fx, tmp: ["simulate", "--trace", fx.small,
                                                                    "--budget-share", "1.5"], "budget_share")
    refuse_cli(cat, "simulate --budget-slots 3 (below top-k 8)", lambda fx, tmp: [
        "simulate", "--trace", fx.small, "--budget-slots", "3"], "below the minimum")
    refuse_cli(cat, "simulate --batch-size 0", lambda fx, tmp: ["simulate", "--trace", fx.small, "--batch-size", "0"],
               "batch_size")
    refuse_cli(cat, "simulate --chunk-bytes 0", lambda fx, tmp: ["simulate", "--trace", fx.small, "--async-io",
                                                                 "--chunk-bytes", "0"], "chunk_bytes")
    refuse_cli(cat, "simulate --policy unknown", lambda fx, tmp: ["simulate", "--trace", fx.small, "--policy", "lfu"],
               "lfu")
    refuse_cli(cat, "simulate --budget-share 0.5x", lambda fx, tmp: ["simulate", "--trace", fx.small,
                                                                     "--budget-share", "0.5x"], "0.5x")
    refuse_cli(cat, "simulate-compare --budgets 1.5", lambda fx, tmp: [
        "simulate-compare", "--trace", fx.small, "--budgets", "1.5", "--profiles", "h200", "--host-of", "",
        "--predictor", "", "--measured", "", "--out", tmp / "c"], "1.5")
    refuse_cli(cat, "fidelity --bench that does not exist", lambda fx, tmp: [
        "fidelity", "--bench", tmp / "none.json", "--routing", tmp / "none.npz", "--profile", "h200"], "none.json")
    refuse_cli(cat, "trace --model that does not exist", lambda fx, tmp: ["trace", "--model", tmp / "none",
                                                                          "--out-dir", tmp], "none")
    refuse_cli(cat, "simulate-compare with its defaults outside the repository", lambda fx, tmp: [
        "simulate-compare", "--out", tmp / "c"], "h200-engine.json")
    refuse_cli(cat, "report --notebooks that does not exist", lambda fx, tmp: [
        "report", "--notebooks", tmp / "none", "--out", tmp / "r"], "none")


# G. outputs checked before the work
def _output_cases() -> None:
    cat = "output path"
    def blocked(args):
        def make(fx, tmp):
            (tmp / "FILE").write_text("x")
            return args(fx, tmp)
        return make
    for name, args, limit, names in [
        ("train-predictor --out FILE/ck.pt", lambda fx, tmp: ["train-predictor", "--trace", fx.trace, "--out",
                                                               tmp / "FILE/ck.pt", "--no-progress"], 25, "FILE"),
        ("trace --out-dir FILE/x", lambda fx, tmp: ["trace", "--out-dir", tmp / "FILE/x"], 25, "FILE"),
        ("simulate --timeline FILE/t.csv", lambda fx, tmp: ["simulate", "--trace", fx.trace, "--timeline",
                                                            tmp / "FILE/t.csv"], 25, "FILE"),
        ("simulate --timeline t.txt (unknown format)", lambda fx, tmp: ["simulate", "--trace", fx.trace,
                                                                        "--timeline", tmp / "t.txt"], 25, "t.txt"),
        ("sweep --out FILE/s", lambda fx, tmp: (shutil.copy(fx.notebook, tmp / "nb.ipynb"), shutil.copy(
            fx.root / "grid.yaml", tmp / "g.yaml"), ["sweep", tmp / "g.yaml", "--out", tmp / "FILE/s"])[2], 25, "FILE"),
        ("report --out FILE", lambda fx, tmp: ["report", "--notebooks", ROOT / "notebooks", "--out", tmp / "FILE"], 25,
         "FILE"),
        ("fidelity --out FILE/f.csv", lambda fx, tmp: ["fidelity", "--bench", fx.root / "bench/bench.json",
                                                       "--routing", fx.root / "bench/routing.npz", "--profile",
                                                       "h200", "--out", tmp / "FILE/f.csv"], 25, "FILE"),
        ("calibrate --out FILE/p.json", lambda fx, tmp: ["calibrate", "--cpu-only", "--out", tmp / "FILE/p.json"],
         25, "FILE"),
        ("train-tiny --out FILE/x", lambda fx, tmp: ["train-tiny", "--out", tmp / "FILE/x"], 25, "FILE"),
        ("simulate-compare --out FILE", lambda fx, tmp: ["simulate-compare", "--trace", fx.small, "--profiles", "h200",
                                                         "--host-of", "", "--predictor", "", "--measured", "",
                                                         "--out", tmp / "FILE"], 25, "FILE"),
    ]:
        CASES.append(Case(f"{len(CASES) + 1:03d}", cat, name + " is refused before any work", "",
                          lambda fx, tmp, args=args: cli(*blocked(args)(fx, tmp), cwd=tmp),
                          "refuse", names, extra={"max_seconds": limit}))


# H. interrupted runs
SWEEP_GRID = "notebook: nb.ipynb\nparameters:\n  steps: [1, 2, 3, 4]\nfixed:\n  sleep_s: 2.0\n"


def _sweep_dir(fx: Fixtures, tmp: Path, grid: str = SWEEP_GRID) -> Path:
    shutil.copy(fx.notebook, tmp / "nb.ipynb")
    (tmp / "g.yaml").write_text(grid)
    return tmp / "g.yaml"


def _start_sweep(tmp: Path, grid: Path, out: str = "out", *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prescope.cli", "sweep", str(grid), "--out", str(tmp / out),
                             *extra], cwd=tmp, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(path_glob: Callable[[], list], timeout: float = 90) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if path_glob():
            return True
        time.sleep(0.2)
    return False


def _interrupted_cases() -> None:
    cat = "interrupted run"

    def killed_sweep(fx, tmp, sig=signal.SIGKILL):
        grid = _sweep_dir(fx, tmp)
        proc = _start_sweep(tmp, grid)
        _wait_for(lambda: list((tmp / "out/cells").glob("*/nb.metrics.json")))
        os.killpg(proc.pid, sig)
        out, err = proc.communicate()
        finished = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp / "out/cells").glob("*/nb.ipynb")
                    if p.with_name("nb.metrics.json").exists()}
        (tmp / "finished.json").write_text(json.dumps(finished))
        (tmp / "first.rc").write_text(f"{proc.returncode}\n{err}")
        return cli("sweep", grid, "--out", tmp / "out", cwd=tmp)

    def resumed(fx, tmp, done):
        kept = json.loads((tmp / "finished.json").read_text())
        table = _read_summary(tmp / "out")
        if done.rc != 0 or list(table["status"]) != ["ok"] * 4:
            return "lost output"
        same = all(hashlib.sha256(Path(p).read_bytes()).hexdigest() == h for p, h in kept.items())
        return None if kept and same else "lost output"
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "sweep killed (kill -9) after a cell, then run again",
                      "prescope sweep g.yaml; kill -9; prescope sweep g.yaml", killed_sweep, "handle", check=resumed))

    def ctrl_c(fx, tmp):
        grid = _sweep_dir(fx, tmp)
        proc = _start_sweep(tmp, grid)
        _wait_for(lambda: list((tmp / "out/cells").glob("*/nb.metrics.json")))
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        return Run(proc.returncode, out, err, 0.0, False)

    def ctrl_c_check(fx, tmp, done):
        table = _read_summary(tmp / "out")
        missing = (table["status"] == "missing").sum()
        ok = done.rc == 130 and "interrupted" in done.err and missing >= 1 and (table["status"] == "ok").sum() >= 1
        return None if ok else "lost output"
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "sweep stopped with Ctrl-C: summary names the missing cells",
                      "prescope sweep g.yaml; SIGINT", ctrl_c, "handle", check=ctrl_c_check))

    def regrid(fx, tmp):  # a sweep killed, then a new grid in the same folder killed at once
        grid = _sweep_dir(fx, tmp)
        proc = _start_sweep(tmp, grid)
        _wait_for(lambda: list((tmp / "out/cells").glob("*/nb.metrics.json")))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        grid2 = _sweep_dir(fx, tmp, SWEEP_GRID.replace("[1, 2, 3, 4]", "[7, 8, 9]"))
        proc = _start_sweep(tmp, grid2)
        _wait_for(lambda: (tmp / "out/summary.csv").exists() and 7 in _read_summary(tmp / "out")["steps"].tolist())
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return Run(0, "", "", 0.0, False)

    def regrid_check(fx, tmp, done):
        grid = json.loads((tmp / "out/grid.json").read_text())
        table = _read_summary(tmp / "out")
        same = sorted(table["steps"]) == sorted(grid["parameters"]["steps"])
        honest = (table["status"] != "ok").sum() >= 1 or all(
            (tmp / "out/cells" / c / "nb.metrics.json").exists() for c in table["cell"])
        return None if same and honest else "lost output"
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "new grid in a killed sweep's folder, killed again: summary "
                      "describes the new grid", "prescope sweep g1; kill -9; prescope sweep g2; kill -9",
                      regrid, "handle", check=regrid_check))

    def killed_write(what: str, code: str):
        def act(fx, tmp):
            return api(code.format(fx=fx, tmp=tmp), tmp)

        def check(fx, tmp, done):
            return None if done.rc == 0 and "intact" in done.out else "lost output"
        CASES.append(Case(f"{len(CASES) + 1:03d}", cat, f"{what} interrupted mid-write: the previous file intact",
                          f"{what} interrupted", act, "handle", check=check))
    killed_write("save_trace", """
        import shutil
        import pyarrow.parquet as pq
        from prescope.routing import trace as T
        shutil.copy('{fx.trace}', '{tmp}/t.parquet')
        tr = T.load_trace('{tmp}/t.parquet')
        def dies(table, where, **kw):
            open(where, 'wb').write(b'half a file')
            raise KeyboardInterrupt
        real, pq.write_table = pq.write_table, dies
        try:
            T.save_trace(tr, '{tmp}/t.parquet')
        except KeyboardInterrupt:
            pass
        pq.write_table = real
        back = T.load_trace('{tmp}/t.parquet')
        import os
        assert (back.experts == tr.experts).all() and os.listdir('{tmp}') == ['t.parquet']
        print('intact')
        """)
    killed_write("a CSV with its checksum beside it", """
        from prescope import files
        p = files.write_with_sidecar('{tmp}/f.csv', 'a\\n1\\n')
        real = files.write_atomic
        def dies(target, data):
            if str(target).endswith('f.csv'):
                raise KeyboardInterrupt
            return real(target, data)
        files.write_atomic = dies
        try:
            files.write_with_sidecar(p, 'a\\n2\\n')
        except KeyboardInterrupt:
            pass
        files.write_atomic = real
        assert files.read_csv(p)['a'].tolist() == [1]
        print('intact')
        """)
    killed_write("LLaPor save", """
        import os, torch
        from prescope.predict import llapor
        m = llapor.load('{fx.ckpt}')
        m.save('{tmp}/ck.pt')
        real = torch.save
        def dies(obj, f, *a, **k):
            open(f, 'wb').write(b'PK')
            raise KeyboardInterrupt
        torch.save = dies
        try:
            m.save('{tmp}/ck.pt')
        except KeyboardInterrupt:
            pass
        torch.save = real
        llapor.load('{tmp}/ck.pt')
        assert os.listdir('{tmp}') == ['ck.pt']
        print('intact')
        """)

    def train_interrupted(fx, tmp):
        proc = subprocess.Popen([sys.executable, "-m", "prescope.cli", "train-predictor", "--trace", str(fx.trace),
                                 "--out", str(tmp / "ck.pt"), "--max-epochs", "200", "--no-progress"], cwd=tmp,
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(12)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        return Run(proc.returncode, out, err, 0.0, False)

    def no_partial(fx, tmp, done):
        left = [p.name for p in tmp.iterdir()]
        if done.rc == 0:  # it finished before the signal: then its file must load
            return None if "ck.pt" in left else "lost output"
        return None if done.rc == 130 and not left else "lost output"
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "train-predictor stopped with Ctrl-C: no partial checkpoint",
                      "prescope train-predictor ...; SIGINT", train_interrupted, "handle", check=no_partial))

    def report_killed(fx, tmp):
        nbs = tmp / "nbs"
        nbs.mkdir()
        nb = json.loads(fx.notebook.read_text())
        nb["cells"][0]["source"] = nb["cells"][0]["source"].replace("sleep_s = 0.0", "sleep_s = 30.0")
        for name in ("a", "b"):
            (nbs / f"{name}.ipynb").write_text(json.dumps(nb))
        proc = subprocess.Popen([sys.executable, "-m", "prescope.cli", "report", "--notebooks", str(nbs), "--out",
                                 str(tmp / "r")], cwd=tmp, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        time.sleep(15)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return Run(0, "", "", 0.0, False)

    def no_false_metrics(fx, tmp, done):
        out = tmp / "r"
        metrics = list(out.glob("*.metrics.json")) if out.exists() else []
        return None if not metrics else "lost output"
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "report killed mid-notebook: no metrics file for an unfinished "
                      "notebook", "prescope report; kill -9", report_killed, "handle", check=no_false_metrics))


# I. concurrent sweeps
def _concurrent_cases() -> None:
    cat = "concurrent sweep"

    def two(fx, tmp, second_grid: str | None = None):
        grid = _sweep_dir(fx, tmp)
        first = _start_sweep(tmp, grid)
        _wait_for(lambda: (tmp / "out/.lock").exists())
        other = grid
        if second_grid:
            other = tmp / "g2.yaml"
            other.write_text(second_grid)
        second = cli("sweep", other, "--out", tmp / "out", cwd=tmp)
        out, err = first.communicate(timeout=CASE_TIMEOUT_S)
        (tmp / "first.txt").write_text(f"{first.returncode}\n{err}")
        return second

    def check_two(fx, tmp, done):
        rc = int((tmp / "first.txt").read_text().split("\n", 1)[0])
        table = _read_summary(tmp / "out")
        runs = len(list((tmp / "out/cells").glob("*/nb.ipynb")))
        ok = (done.rc == 2 and "is in use by another sweep" in done.err and rc == 0
              and list(table["status"]) == ["ok"] * 4 and runs == 4)
        return None if ok else "silently wrong/accepted"
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "two sweeps of one grid into one folder: the second refused",
                      "prescope sweep g.yaml & prescope sweep g.yaml", two, "handle", check=check_two))
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "two sweeps of different grids into one folder: the second "
                      "refused, the first's summary kept", "prescope sweep g1.yaml & prescope sweep g2.yaml",
                      lambda fx, tmp: two(fx, tmp, SWEEP_GRID.replace("[1, 2, 3, 4]", "[5, 6]")), "handle",
                      check=check_two))

    def runners(fx, tmp):
        shutil.copy(fx.notebook, tmp / "nb.ipynb")
        code = f"""
            import sys
            from pathlib import Path
            from prescope.workbench import sweep
            from prescope.workbench.reports import NotebookResult
            def counted(nb, out, params, **options):
                import time
                with open(Path(out) / 'runs', 'a') as f:
                    f.write('x')
                time.sleep(0.3)
                from prescope.files import write_json
                from prescope.workbench.metrics import MetricsRecord
                from prescope.workbench.reports import output_paths
                record = MetricsRecord({{'work': 1.0}}, 'simulated', 'p')
                write_json(output_paths(nb, out)['metrics'], record.to_dict())
                return NotebookResult(Path(nb), params, metrics=record)
            sweep.run_notebook = counted
            jobs = [sweep.CellJob(Path({str(tmp / 'nb.ipynb')!r}), Path({str(tmp)!r}) / 'cells' / str(i), {{'steps': i}})
                    for i in range(12)]
            for job in jobs:
                job.out_dir.mkdir(parents=True, exist_ok=True)
            list(sweep.LocalExecutor().run(jobs))
            """
        procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp, env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        errs = [p.communicate(timeout=CASE_TIMEOUT_S)[1] for p in procs]
        rcs = [p.returncode for p in procs]
        return Run(max(rcs), "", "\n".join(errs), 0.0, False)

    def once_each(fx, tmp, done):
        counts = [len((tmp / "cells" / str(i) / "runs").read_text()) if (tmp / "cells" / str(i) / "runs").exists()
                  else 0 for i in range(12)]
        return None if done.rc == 0 and counts == [1] * 12 else "silently wrong/accepted"
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "three runners on the same cells: each cell runs once",
                      "3 x LocalExecutor().run(same jobs)", runners, "handle", check=once_each))

    def holder_killed(fx, tmp):
        grid = _sweep_dir(fx, tmp, SWEEP_GRID.replace("[1, 2, 3, 4]", "[1, 2]"))
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom prescope.files import FolderLock\n"
                                   f"with FolderLock({str(tmp / 'out')!r}, 'sweep'):\n    print('held', flush=True)\n"
                                   "    time.sleep(600)"], cwd=tmp, env=ENV, stdout=subprocess.PIPE, text=True)
        holder.stdout.readline()
        refused = cli("sweep", grid, "--out", tmp / "out", cwd=tmp)
        holder.kill()
        holder.wait()
        (tmp / "refused.txt").write_text(f"{refused.rc}\n{refused.err}")
        return cli("sweep", grid, "--out", tmp / "out", cwd=tmp)

    def after_holder(fx, tmp, done):
        rc, err = (tmp / "refused.txt").read_text().split("\n", 1)
        ok = rc == "2" and "in use by another sweep" in err and done.rc == 0
        return None if ok and list(_read_summary(tmp / "out")["status"]) == ["ok", "ok"] else "lost output"
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "a sweep whose folder's holder was killed runs: no stale lock",
                      "hold the lock; prescope sweep; kill -9 the holder; prescope sweep", holder_killed, "handle",
                      check=after_holder))


# J. hangs
def _hang_cases() -> None:
    cat = "hang"

    def never_ends(fx, tmp):
        grid = _sweep_dir(fx, tmp, "notebook: nb.ipynb\nparameters:\n  sleep_s: [0.0, 3600.0, 0.5]\n")
        return cli("sweep", grid, "--out", tmp / "out", "--cell-timeout-s", "4", cwd=tmp, timeout=CASE_TIMEOUT_S)

    def timed_out(fx, tmp, done):
        table = _read_summary(tmp / "out")
        ok = (list(table["status"]) == ["ok", "failed", "ok"] and "Timeout" in str(table["error"].iloc[1])
              and done.rc == 1)
        return None if ok else "lost output"
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "a sweep cell that never ends fails at --cell-timeout-s; the "
                      "others run", "prescope sweep g.yaml --cell-timeout-s 4", never_ends, "handle", check=timed_out))

    def report_never_ends(fx, tmp):
        nbs = tmp / "nbs"
        nbs.mkdir()
        nb = json.loads(fx.notebook.read_text())
        (nbs / "a.ipynb").write_text(json.dumps(nb))
        nb["cells"][0]["source"] = nb["cells"][0]["source"].replace("sleep_s = 0.0", "sleep_s = 3600.0")
        (nbs / "b.ipynb").write_text(json.dumps(nb))
        return cli("report", "--notebooks", nbs, "--out", tmp / "r", "--cell-timeout-s", "4", cwd=tmp)

    def report_timed_out(fx, tmp, done):
        ok = done.rc == 1 and "FAILED b" in done.out and "ok     a" in done.out and "Timeout" in done.out
        return None if ok else "lost output"
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "a report notebook that never ends fails at --cell-timeout-s",
                      "prescope report --cell-timeout-s 4", report_never_ends, "handle", check=report_timed_out))

    def default_on(fx, tmp):
        return api("""
            import argparse
            from prescope.workbench import reports, sweep
            for module in (sweep, reports):
                p = argparse.ArgumentParser()
                module.add_arguments(p)
                args = p.parse_args(['g.yaml'] if module is sweep else [])
                assert args.cell_timeout_s == reports.DEFAULT_CELL_TIMEOUT_S > 0
            import inspect
            assert inspect.signature(reports.run_notebook).parameters['cell_timeout_s'].default > 0
            print('on')
            """, tmp)
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "the cell timeout is on by default (sweep, report, run_notebook)",
                      "parse defaults", default_on, "handle",
                      check=lambda fx, tmp, done: None if done.rc == 0 and "on" in done.out else "silently wrong/accepted"))
    refuse_cli(cat, "a Ray cluster address that does not answer fails fast", lambda fx, tmp: (
        _sweep_dir(fx, tmp), ["sweep", tmp / "g.yaml", "--out", tmp / "out", "--executor", "ray", "--address",
                              "127.0.0.1:9"])[1], "127.0.0.1:9", timeout=HANG_TIMEOUT_S * 3)


# K. streaming a large llama.cpp trace
def _stream_cases() -> None:
    cat = "large llama.cpp CSV"

    def peak(fx, tmp, steps: str | None):
        extra = "" if steps is None else f", max_decode_steps={steps}"
        return api(f"""
            import resource, time
            from prescope.routing.llamacpp import load_llamacpp_trace
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = time.perf_counter()
            tr = load_llamacpp_trace({str(fx.big_csv)!r}{extra})
            grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
            kept = tr.experts.nbytes + tr.weights.nbytes
            import os
            print(tr.num_tokens, grew, kept, os.path.getsize({str(fx.big_csv)!r}), time.perf_counter() - start)
            """, tmp)

    def lean(fx, tmp, done):
        tokens, grew, kept, size, seconds = (float(x) for x in done.out.split())
        # all of it, the process growing by less than twice the file (13x before: 660 MB for this file)
        return None if done.rc == 0 and tokens == 5000 and grew < 2 * size else "silently wrong/accepted"

    def few(fx, tmp, done):
        tokens, grew, kept, size, seconds = (float(x) for x in done.out.split())
        return None if done.rc == 0 and tokens == 5 and seconds < 5 else "silently wrong/accepted"
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "a 50 MB trace imports with the process growing by < 2x its size",
                      "load_llamacpp_trace(big.route.csv)", lambda fx, tmp: peak(fx, tmp, None), "handle", check=lean))
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "max_decode_steps=3 reads only the first steps",
                      "load_llamacpp_trace(big.route.csv, max_decode_steps=3)", lambda fx, tmp: peak(fx, tmp, "3"),
                      "handle", check=few))

    def cli_three(fx, tmp):
        return cli("simulate", "--trace", fx.big_csv, "--max-steps", "3", "--budget-share", "0.5", cwd=tmp)

    def three_steps(fx, tmp, done):
        try:
            record = json.loads(done.out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return "silently wrong/accepted"
        return None if done.rc == 0 and record["totals"]["steps"] == 3 else "silently wrong/accepted"
    CASES.append(Case(f"{len(CASES) + 1:03d}", cat, "simulate --max-steps 3 on a 50 MB trace replays 3 steps",
                      "prescope simulate --trace big.route.csv --max-steps 3", cli_three, "handle", check=three_steps))


for build in (_trace_cases, _csv_cases, _profile_cases, _grid_cases, _bench_cases, _flip_cases, _value_cases, _output_cases,
              _interrupted_cases, _concurrent_cases, _hang_cases, _stream_cases):
    build()


# ---- classifying -------------------------------------------------------------------------------------------

def classify(c: Case, fx: Fixtures, tmp: Path, done: Run) -> tuple[str, str]:
    err = done.err.strip()
    last = err.splitlines()[-1] if err else ""
    if done.timed_out:
        return "hang", f"still running after {done.seconds:.0f} s"
    if "Traceback (most recent call last)" in err:
        return "raw traceback", last[:300]
    if c.expect == "refuse":
        if done.rc == 0:
            return "silently wrong/accepted", (done.out.strip().splitlines() or [""])[-1][:300]
        if "error" not in last.lower():
            return "unclear error", last[:300]
        if c.extra.get("max_seconds") and done.seconds > c.extra["max_seconds"]:
            return "unclear error", f"refused only after {done.seconds:.0f} s: {last[:200]}"
        return ("clear error" if c.names in last else "unclear error"), last[:300]
    failure = c.check(fx, tmp, done)
    return (failure or "handled fault"), (last or (done.out.strip().splitlines() or [""])[-1])[:300]


def _command(done: Run) -> str:
    """What the case ran, as a user would type it."""
    argv = [str(a) for a in done.argv]
    if argv[1:3] == ["-m", "prescope.cli"]:
        return "prescope " + " ".join(argv[3:])
    if argv[1:2] == ["-c"]:
        code = argv[2].split("try:", 1)[-1].split("except (ValueError, OSError)")[0]
        return "python: " + " ".join(code.split())[:200]
    return " ".join(argv)


def run_case(c: Case, fx: Fixtures, base: Path) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"case{c.id}-", dir=base))
    start = time.perf_counter()
    command = c.command
    try:
        done = c.act(fx, tmp)
        command = command or _command(done)
        outcome, detail = classify(c, fx, tmp, done)
    except Exception as exc:  # noqa: BLE001 - a harness step that broke is reported, not hidden
        outcome, detail = "harness error", f"{type(exc).__name__}: {exc}"[:300]
    seconds = time.perf_counter() - start
    shown = "" if outcome in ("clear error", "handled fault") else f"\n      {_clean(detail, tmp, fx)}"
    print(f"{c.id} {outcome:<24} {seconds:6.1f}s  {c.category}: {c.name}{shown}", flush=True)
    return {"id": c.id, "category": c.category, "case": c.name, "expected": c.expect, "outcome": outcome,
            "seconds": round(seconds, 1), "command": _clean(command, tmp, fx), "detail": _clean(detail, tmp, fx)}


def _clean(text: str, tmp: Path, fx: Fixtures) -> str:
    """No machine's paths in the table: the case's folder is TMP, the inputs' FX, the repository '.'."""
    return text.replace(str(tmp), "TMP").replace(str(fx.root), "FX").replace(str(ROOT), ".").replace(sys.executable, "python")


def machine() -> str:
    import torch

    return (f"{platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
            f"{torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}")


def revision() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "prescope"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() + ("+wip" if dirty.stdout.strip() else "")


def write_results(rows: list[dict], out: Path, command: str, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (out / "cases.csv").write_text(buffer.getvalue())
    tally = Counter(r["outcome"] for r in rows)
    by_category = {}
    for r in rows:
        by_category.setdefault(r["category"], Counter())[r["outcome"]] += 1
    lines = [f"| {o} | {tally.get(o, 0)} |" for o in (*OUTCOMES, "harness error") if tally.get(o) or o in OUTCOMES]
    cats = [f"| {cat} | {sum(c.values())} | " + ", ".join(f"{k} {v}" for k, v in c.most_common()) + " |"
            for cat, c in by_category.items()]
    readme = out / "README.md"
    head = readme.read_text().split("<!-- results -->")[0] if readme.exists() else "# Reliability cases\n\n"
    readme.write_text(head + "<!-- results -->\n" + "\n".join([
        f"Last run: `{command}` ({seconds / 60:.0f} min), revision `{revision()}`, on {machine()}.", "",
        f"{len(rows)} cases:", "", "| outcome | cases |", "|---|---|", *lines, "",
        "| category | cases | outcomes |", "|---|---|---|", *cats, "",
        "Every case, its command and the first line the user saw: [cases.csv](cases.csv).", ""]))


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "reports" / "reliability"))
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (each in its own processes)")
    parser.add_argument("--only", nargs="*", help="case ids to run (default: all; results are not written)")
    parser.add_argument("--fixtures", help="keep the built inputs in this folder and reuse them (default: built "
                                           "afresh in a temporary folder)")
    args = parser.parse_args()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prescope-reliability-") as base:
        fixtures = Path(args.fixtures) if args.fixtures else Path(base) / "fixtures"
        fx = Fixtures(fixtures) if (fixtures / "sweep").is_dir() else build_fixtures(_fresh(fixtures))
        chosen = [c for c in CASES if not args.only or c.id in args.only]
        # the hang and concurrency cases time their own waits: run them alone, after the others
        alone = [c for c in chosen if c.category in ("hang", "concurrent sweep", "interrupted run", "large llama.cpp CSV")
                 or c.extra.get("max_seconds")]
        shared = [c for c in chosen if c not in alone]
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            rows = list(pool.map(lambda c: run_case(c, fx, Path(base)), shared))
        rows += [run_case(c, fx, Path(base)) for c in alone]
    rows.sort(key=lambda r: r["id"])
    tally = Counter(r["outcome"] for r in rows)
    print(json.dumps({"cases": len(rows), **tally}))
    if not args.only:
        command = "python reports/reliability/cases.py" + (f" --jobs {args.jobs}" if args.jobs != 2 else "")
        write_results(rows, Path(args.out), command, time.perf_counter() - began)
    bad = sum(tally[o] for o in ("raw traceback", "hang", "silently wrong/accepted", "lost output", "unclear error",
                                 "harness error"))
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
