"""The timeline: one row per operation of an offloaded run, measured (engine) or simulated (simulator).

Schema (DESIGN.md §2), one row per operation:

| column | meaning |
|---|---|
| lane | `pcie` (host-to-device link), `gpu` (compute stream), `cpu` (host: CPU experts and host work) |
| step | forward call (token step) the operation belongs to; a transfer belongs to the step that issued it |
| layer | MoE layer ordinal 0..L-1, or -1 for work outside MoE layers (dense decoder layers, step overhead) |
| expert | expert index, or -1 for non-expert work |
| kind | `prefetch`, `on_demand` (pcie); `gpu_expert`, `attention`, `dense` (gpu); `cpu_expert`, `plan` (cpu); `predict` (gpu or cpu); `host` (host work that is neither planning nor prediction: bookkeeping, launches, synchronisation; the bubble cause of the same name) |
| tokens | tokens the operation processes (0 for transfers) |
| bytes | bytes the operation moves over the link (0 for compute) |
| start, end | seconds since the run's time origin |

Optional columns: `slot` (GPU slot a transfer fills or a GPU expert reads, -1 otherwise) and `load`
(transfer id: the segments of one chunked transfer share it; -1 for other rows). A transfer interrupted
at chunk granularity appears as several rows, one per contiguous segment, each with the bytes it moved.
`DataFrame.attrs` holds `source` ("measured" | "simulated"), `profile` and `meta` (the run's config), so
every figure can say what its times are. `profile` names a hardware profile for simulated times ("h200");
for measured ones it is `measured_profile(...)`, the one scheme every result uses: "host:" and the device
they ran on, a CUDA device's name ("host:NVIDIA H200") or the CPU ("host:x86_64-2cpu", `host_device`).

Analyses here are pure pandas/numpy: per-step summaries, GPU bubbles with their causes, prefetch
precision. A step spans from its first to its last operation, prefetches excluded (a prefetch may run
on into the next step, which it then serves).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

LANES = ("pcie", "gpu", "cpu")
KINDS = ("prefetch", "on_demand", "gpu_expert", "cpu_expert", "attention", "dense", "predict", "plan", "host")
# Kinds of timelines written before a kind was renamed, read under their current name ("wait" became "host",
# the name of the bubble cause it explains).
RENAMED_KINDS = {"wait": "host"}
COLUMNS = ("lane", "step", "layer", "expert", "kind", "tokens", "bytes", "start", "end")
OPTIONAL_COLUMNS = ("slot", "load")
INT_COLUMNS = ("step", "layer", "expert", "tokens", "bytes")
SOURCES = ("measured", "simulated")
MEASURED_PREFIX = "host:"  # profile of measured results: this prefix, then the device they ran on
KIND_LANES = {
    "prefetch": ("pcie",), "on_demand": ("pcie",),
    "gpu_expert": ("gpu",), "attention": ("gpu",), "dense": ("gpu",),
    "cpu_expert": ("cpu",), "plan": ("cpu",), "predict": ("gpu", "cpu"), "host": ("gpu", "cpu"),
}
TRANSFER_KINDS = ("prefetch", "on_demand")
# Causes of a GPU bubble, by the kind of operation that ended just when the GPU resumed. Among operations
# ending at the same instant the first listed wins: the GPU needed all of them, the transfer most directly.
CAUSE_OF_KIND = {"on_demand": "on_demand_transfer", "prefetch": "late_prefetch", "cpu_expert": "cpu_expert",
                 "plan": "planning", "predict": "planning", "host": "host"}
CAUSES = ("on_demand_transfer", "late_prefetch", "cpu_expert", "planning", "host")
HOST_GAP = "host"  # nothing ended when the GPU resumed: launch latency or host work nobody recorded
DEFAULT_TOLERANCE_S = 1e-9


class TimelineError(ValueError):
    """A timeline is malformed; the message names the column or rows and what was expected."""


def host_device(device=None) -> str:
    """The device results were measured on, as they name it: a CUDA device's name ("NVIDIA H200"), else the
    CPU as "<machine>-<cores>cpu" ("x86_64-2cpu"). `device`: a torch.device or "cuda[:N]"/"cpu"; None = the
    first CUDA device when torch is loaded and sees one, else the CPU (torch is never imported for this)."""
    torch = sys.modules.get("torch")
    kind = str(getattr(device, "type", device or "")).split(":")[0]
    cuda = torch is not None and torch.cuda.is_available() and kind in ("cuda", "")
    if cuda:
        return torch.cuda.get_device_name(device if kind == "cuda" else 0)
    return f"{platform.machine() or 'cpu'}-{os.cpu_count()}cpu"


def measured_profile(device_name: str | None = None) -> str:
    """The `profile` label of measured results: "host:<device_name>" (default: `host_device()`)."""
    name = host_device() if device_name is None else device_name
    return name if name.startswith(MEASURED_PREFIX) else MEASURED_PREFIX + name


def make_timeline(rows, *, source: str, profile: str, meta: Mapping | None = None) -> pd.DataFrame:
    """A validated timeline DataFrame from rows (tuples in COLUMNS order, optionally followed by the
    OPTIONAL_COLUMNS in order, or dicts), a dict of columns, or a DataFrame; sets attrs source, profile
    and meta (the run's config)."""
    if source not in SOURCES:
        raise TimelineError(f"timeline source must be one of {SOURCES}, got {source!r}")
    if not isinstance(profile, str) or not profile:
        raise TimelineError(f"timeline profile must be a non-empty name, got {profile!r}")
    cols = _columns(rows)
    missing = [c for c in COLUMNS if c not in cols]
    if missing:
        raise TimelineError(f"timeline lacks columns {missing}; expected {list(COLUMNS)}")
    lengths = {len(v) for v in cols.values()}
    if len(lengths) > 1:
        raise TimelineError(f"timeline columns differ in length: { {k: len(v) for k, v in cols.items()} }")
    cols["kind"] = _renamed(cols["kind"])
    _check_labels(cols["lane"], cols["kind"])
    for col in INT_COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if c in cols) + ("start", "end"):
        cols[col] = _numeric(col, cols[col], whole=col not in ("start", "end"))
    if (cols["tokens"] < 0).any() or (cols["bytes"] < 0).any():
        raise TimelineError("timeline tokens and bytes must be >= 0")
    back = np.flatnonzero(cols["end"] < cols["start"])
    if len(back):
        raise TimelineError(f"timeline rows end before they start: rows {back[:5].tolist()}")
    order = list(COLUMNS) + [c for c in cols if c not in COLUMNS]
    frame = pd.DataFrame({c: cols[c] for c in order})
    frame.attrs.update(source=source, profile=profile, meta=dict(meta or {}))
    return frame


def _renamed(kind: np.ndarray) -> np.ndarray:
    kind = np.asarray(kind, dtype=object)
    for old, new in RENAMED_KINDS.items():
        kind = np.where(kind == old, new, kind)
    return kind


def _columns(rows) -> dict[str, np.ndarray]:
    if isinstance(rows, pd.DataFrame):
        return {str(c): rows[c].to_numpy() for c in rows.columns}
    if isinstance(rows, Mapping):
        return {str(k): np.asarray(v) for k, v in rows.items()}
    rows = list(rows)
    if not rows:
        return {c: np.empty(0, dtype=object if c in ("lane", "kind") else float) for c in COLUMNS}
    if isinstance(rows[0], Mapping):
        return _columns(pd.DataFrame(rows))
    width = len(rows[0])
    if not len(COLUMNS) <= width <= len(COLUMNS) + len(OPTIONAL_COLUMNS) or any(len(r) != width for r in rows):
        raise TimelineError(f"timeline rows must all have {len(COLUMNS)} fields {COLUMNS}, optionally followed "
                            f"by {OPTIONAL_COLUMNS}; the first has {width}")
    names = (COLUMNS + OPTIONAL_COLUMNS)[:width]
    return {name: np.array(values, dtype=object if name in ("lane", "kind") else None)
            for name, values in zip(names, zip(*rows, strict=True), strict=False)}


def _check_labels(lane: np.ndarray, kind: np.ndarray) -> None:
    lane_code, kind_code = _codes(lane, LANES), _codes(kind, KINDS)
    if (lane_code < 0).any():
        raise TimelineError(f"timeline lanes must be among {LANES}, got {sorted(set(lane[lane_code < 0].tolist()))}")
    if (kind_code < 0).any():
        raise TimelineError(f"timeline kinds must be among {KINDS}, got {sorted(set(kind[kind_code < 0].tolist()))}")
    allowed = np.array([[lane in KIND_LANES[k] for lane in LANES] for k in KINDS])  # [kinds, lanes]
    wrong = ~allowed[kind_code, lane_code]
    if wrong.any():
        pairs = sorted(set(zip(kind[wrong].tolist(), lane[wrong].tolist(), strict=True)))
        raise TimelineError(f"timeline kinds on the wrong lane {pairs}; allowed: {KIND_LANES}")


def _numeric(name: str, values: np.ndarray, whole: bool) -> np.ndarray:
    try:
        as_float = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TimelineError(f"timeline column {name!r} must be numeric, got {values[:3].tolist()}...") from None
    if not np.isfinite(as_float).all():
        raise TimelineError(f"timeline column {name!r} must be finite with no missing values")
    if not whole:
        return as_float
    if not np.array_equal(as_float, np.round(as_float)):
        raise TimelineError(f"timeline column {name!r} must hold whole numbers")
    return as_float.astype(np.int64)


def _codes(values, labels: tuple[str, ...]) -> np.ndarray:
    """Index of each value in `labels`, -1 for a value not among them."""
    return pd.Index(labels).get_indexer(np.asarray(values, dtype=object)).astype(np.int64)


class _Cols:
    """A timeline's columns as numpy arrays, lane and kind as codes into LANES and KINDS."""

    def __init__(self, timeline: pd.DataFrame):
        self.lane, self.kind = _codes(timeline["lane"], LANES), _codes(timeline["kind"], KINDS)
        for col in ("step", "layer", "expert", "tokens", "bytes"):
            setattr(self, col, timeline[col].to_numpy(np.int64))
        self.start, self.end = timeline["start"].to_numpy(np.float64), timeline["end"].to_numpy(np.float64)
        self.load = timeline["load"].to_numpy(np.int64) if "load" in timeline else None

    def kind_is(self, *kinds: str) -> np.ndarray:
        return np.isin(self.kind, [KINDS.index(k) for k in kinds])

    def lane_is(self, lane: str) -> np.ndarray:
        return self.lane == LANES.index(lane)

    def gpu_busy(self) -> np.ndarray:
        return self.lane_is("gpu") & ~self.kind_is("host")

    def key(self, mask: np.ndarray) -> np.ndarray:
        """(layer, expert) as one integer, for the rows `mask` selects (a boolean mask or row indices)."""
        width = int(self.expert.max(initial=0)) + 2
        return (self.layer[mask] + 1) * width + self.expert[mask] + 1


def _merge(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted disjoint intervals covering the union of [starts, ends)."""
    if len(starts) == 0:
        return np.empty(0), np.empty(0)
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], np.maximum.accumulate(ends[order])
    new = np.r_[True, s[1:] > e[:-1]]
    last = np.r_[np.flatnonzero(new)[1:] - 1, len(s) - 1]
    return s[new], e[last]


def _covered(ms: np.ndarray, me: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of each [a, b] covered by the disjoint sorted intervals (ms, me): F(b) - F(a), where
    F(t) = total length of intervals ending <= t + the covered part of the interval containing t."""
    if len(ms) == 0:
        return np.zeros(len(a))
    prefix = np.r_[0.0, np.cumsum(me - ms)]

    def upto(t: np.ndarray) -> np.ndarray:
        j = np.searchsorted(me, t, side="right")
        part = np.where(j < len(ms), np.clip(t - ms[np.minimum(j, len(ms) - 1)], 0.0, None), 0.0)
        return prefix[j] + part

    return upto(np.asarray(b, float)) - upto(np.asarray(a, float))


def _spans(c: _Cols) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    core = ~c.kind_is("prefetch")
    steps = np.unique(c.step[core])
    where = np.searchsorted(steps, c.step[core])
    start, end = np.full(len(steps), np.inf), np.full(len(steps), -np.inf)
    np.minimum.at(start, where, c.start[core])
    np.maximum.at(end, where, c.end[core])
    return steps, start, end


def _per_step(steps: np.ndarray, step_of: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Sum of `weights` (or a count) per step of `steps`; rows of other steps are ignored."""
    where = np.minimum(np.searchsorted(steps, step_of), max(len(steps) - 1, 0))
    ok = (steps[where] == step_of) if len(steps) else np.zeros(len(step_of), bool)
    w = None if weights is None else np.asarray(weights, float)[ok]
    out = np.bincount(where[ok], weights=w, minlength=len(steps))
    return out if weights is not None else out.astype(np.int64)


def step_spans(timeline: pd.DataFrame) -> pd.DataFrame:
    """Per step: start (first operation) and end (last one to finish), prefetches excluded."""
    steps, start, end = _spans(_Cols(timeline))
    return pd.DataFrame({"step": steps, "start": start, "end": end})


def step_summary(timeline: pd.DataFrame, cache_stats_per_step=None) -> pd.DataFrame:
    """One row per step: start, end, latency (end - start), tokens, bytes moved and loads issued by the
    step (on demand, prefetched), hits and misses, GPU busy and idle time, link busy time, host time
    (host, plan, predict on the host) and CPU expert time.

    GPU busy is the part of the step's span covered by GPU work (explicit `host` rows are idle); link
    busy the part covered by transfers of any step (a prefetch from the step before counts where it
    runs). Without `cache_stats_per_step` (a DataFrame or records with a `step` column and any of
    `hits`, `misses` or other per-step columns, which are joined in) hits are GPU experts with no
    on-demand load of their own in the step and misses are on-demand loads plus CPU experts.
    """
    c = _Cols(timeline)
    steps, a, b = _spans(c)
    compute = c.kind_is("attention", "dense")
    tokens = np.zeros(len(steps), np.int64)
    np.maximum.at(tokens, np.searchsorted(steps, c.step[compute]), c.tokens[compute])
    pcie = c.lane_is("pcie")
    out = {"step": steps, "start": a, "end": b, "latency": b - a, "tokens": tokens,
           "bytes": _per_step(steps, c.step[pcie], c.bytes[pcie]).astype(np.int64)}
    for kind, name in (("on_demand", "loads_on_demand"), ("prefetch", "loads_prefetched")):
        rows = np.flatnonzero(c.kind_is(kind))
        if c.load is not None:
            rows = rows[np.unique(c.load[rows], return_index=True)[1]]
        out[name] = _per_step(steps, c.step[rows])
    out["hits"], out["misses"] = _derived_hits(c, steps)
    busy = c.gpu_busy()
    out["gpu_busy"] = _covered(*_merge(c.start[busy], c.end[busy]), a, b)
    out["gpu_idle"] = out["latency"] - out["gpu_busy"]
    out["link_busy"] = _covered(*_merge(c.start[pcie], c.end[pcie]), a, b)
    host = c.lane_is("cpu") & c.kind_is("host", "plan", "predict")
    out["host"] = _per_step(steps, c.step[host], c.end[host] - c.start[host])
    cpu = c.kind_is("cpu_expert")
    out["cpu_busy"] = _per_step(steps, c.step[cpu], c.end[cpu] - c.start[cpu])
    frame = pd.DataFrame(out)
    if cache_stats_per_step is not None:
        stats = pd.DataFrame(cache_stats_per_step)
        if "step" not in stats:
            raise TimelineError(f"cache_stats_per_step needs a 'step' column, got {list(stats.columns)}")
        stats = stats.set_index("step").reindex(steps)
        for col in stats.columns:
            frame[col] = stats[col].to_numpy()
    return frame


def _derived_hits(c: _Cols, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    width = int(c.key(np.ones(len(c.step), bool)).max(initial=0)) + 1

    def keys(mask):
        return np.unique((c.step[mask] - int(c.step.min(initial=0))) * width + c.key(mask))

    gpu, loaded, cpu = keys(c.kind_is("gpu_expert")), keys(c.kind_is("on_demand")), keys(c.kind_is("cpu_expert"))
    step_of = lambda k: k // width + int(c.step.min(initial=0))  # noqa: E731
    hits = gpu[~np.isin(gpu, loaded)]
    return _per_step(steps, step_of(hits)), _per_step(steps, step_of(loaded)) + _per_step(steps, step_of(cpu))


def bubbles(timeline: pd.DataFrame, tolerance: float = DEFAULT_TOLERANCE_S) -> pd.DataFrame:
    """GPU idle intervals inside each step's span, each attributed to a cause.

    The cause is read from the operation (on the link or the host) that ended last at or before the
    moment the GPU resumed (within `tolerance` seconds), but after the gap began: an on-demand transfer
    (`on_demand_transfer`), a prefetch still in flight (`late_prefetch`), a CPU expert (`cpu_expert`),
    planning or prediction (`planning`), other host work (`host`); if nothing ended in the gap it is a
    launch or host gap (`host`). Operations ending at the same instant are ranked in that order.
    Columns: step, start, end, duration, cause, and the blamed operation's kind, layer and expert
    ("" and -1 when none).
    """
    c = _Cols(timeline)
    steps, a, b = _spans(c)
    busy = c.gpu_busy()
    ms, me = _merge(c.start[busy], c.end[busy])
    parts = []
    for step, lo_t, hi_t in zip(steps, a, b, strict=True):
        lo, hi = np.searchsorted(me, lo_t, side="right"), np.searchsorted(ms, hi_t, side="left")
        ga, gb = np.maximum(np.r_[lo_t, me[lo:hi]], lo_t), np.minimum(np.r_[ms[lo:hi], hi_t], hi_t)
        keep = gb - ga > tolerance
        parts.append((np.full(int(keep.sum()), step), ga[keep], gb[keep]))
    gap_step = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
    ga = np.concatenate([p[1] for p in parts]) if parts else np.empty(0)
    gb = np.concatenate([p[2] for p in parts]) if parts else np.empty(0)
    blamable = c.kind_is(*CAUSE_OF_KIND) & ~busy
    rank_of_kind = np.array([len(CAUSES) - CAUSES.index(CAUSE_OF_KIND[k]) if k in CAUSE_OF_KIND else 0 for k in KINDS])
    idx = np.flatnonzero(blamable)
    idx = idx[np.lexsort((rank_of_kind[c.kind[idx]], c.end[idx]))]  # by end, the most direct cause last
    ends = c.end[idx]
    j = np.searchsorted(ends, gb + tolerance, side="right") - 1
    found = (j >= 0) & (ends[np.maximum(j, 0)] > ga) if len(idx) else np.zeros(len(ga), bool)
    row = idx[np.maximum(j, 0)] if len(idx) else np.zeros(len(ga), np.int64)
    kind = np.where(found, np.asarray(KINDS, dtype=object)[c.kind[row]] if len(idx) else "", "")
    return pd.DataFrame({
        "step": gap_step.astype(np.int64), "start": ga, "end": gb, "duration": gb - ga,
        "cause": [CAUSE_OF_KIND[k] if k else HOST_GAP for k in kind], "kind": kind.astype(str),
        "layer": np.where(found, c.layer[row] if len(idx) else -1, -1).astype(np.int64),
        "expert": np.where(found, c.expert[row] if len(idx) else -1, -1).astype(np.int64),
    })


def prefetch_precision(timeline: pd.DataFrame, by: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Prefetches and how many were used: a prefetch of (layer, expert) is used when the next event of
    that expert after its transfer began is a GPU computation, not another transfer (an expert evicted
    before use needs a new transfer before the GPU can compute it again).

    Returns one row, or one per group of `by` (columns of the issuing transfer: "step", "layer",
    "expert"), with prefetches, used, bytes, bytes_used and precision = bytes_used / bytes (NaN when
    nothing was prefetched).
    """
    c = _Cols(timeline)
    pcie = np.flatnonzero(c.lane_is("pcie"))
    ident = c.load[pcie] if c.load is not None else np.arange(len(pcie))
    order = np.lexsort((c.start[pcie], ident))
    rows, ident = pcie[order], ident[order]
    first = np.flatnonzero(np.r_[True, ident[1:] != ident[:-1]][:len(ident)])  # first segment of each transfer
    load_rows = rows[first]
    load_bytes = np.add.reduceat(c.bytes[rows], first) if len(rows) else np.empty(0, np.int64)
    uses = c.kind_is("gpu_expert")
    key = np.r_[c.key(load_rows), c.key(uses)]
    t = np.r_[c.start[load_rows], c.start[uses]]
    is_use = np.r_[np.zeros(len(load_rows), bool), np.ones(int(uses.sum()), bool)]
    order = np.lexsort((is_use, t, key))
    nxt = np.r_[order[1:], order[-1:]] if len(order) else order
    used_sorted = (key[nxt] == key[order]) & is_use[nxt] & (nxt != order)
    used = np.empty(len(order), bool)
    used[order] = used_sorted
    used = used[:len(load_rows)]
    pf = c.kind[load_rows] == KINDS.index("prefetch")
    table = pd.DataFrame({"step": c.step[load_rows][pf], "layer": c.layer[load_rows][pf],
                          "expert": c.expert[load_rows][pf], "used": used[pf], "bytes": load_bytes[pf]})
    table["bytes_used"] = np.where(table["used"], table["bytes"], 0)
    group = [by] if isinstance(by, str) else list(by or [])
    if group:
        out = table.groupby(group).agg(prefetches=("used", "size"), used=("used", "sum"),
                                       bytes=("bytes", "sum"), bytes_used=("bytes_used", "sum")).reset_index()
    else:
        out = pd.DataFrame({"prefetches": [len(table)], "used": [int(table["used"].sum())],
                            "bytes": [int(table["bytes"].sum())], "bytes_used": [int(table["bytes_used"].sum())]})
    out["precision"] = out["bytes_used"] / out["bytes"].where(out["bytes"] > 0)
    return out
