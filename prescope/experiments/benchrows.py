"""The rows of a `prescope bench` run: the median of a cell's rounds, each row's ratios (against stock, the
engine's everything-resident run, LRU, the limits and accelerate) and regime, the prediction time's share of a
layer, the line printed while it runs, and the table readers get (`bench_table`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from prescope.experiments.benchfile import read_bench
from prescope.experiments.stock import ACCELERATE, STOCK
from prescope.policies import LIMITS, current_name
from prescope.timeline import measured_profile

RESIDENT = "resident"
LIMIT_RATIOS = ("on_demand_lru", *LIMITS)  # every cell's throughput against these of its own budget and batch


def median_round(rounds: list[tuple]) -> tuple:
    """The round whose decode median is the median of the rounds' (the lower one of an even count), its row
    extended with every round's decode median and their spread, (max − min) / median."""
    ms = [row["decode_ms_median"] for _, row, _, _ in rounds]
    pick = sorted(range(len(ms)), key=ms.__getitem__)[(len(ms) - 1) // 2]
    about, row, route, timeline = rounds[pick]
    spread = (max(ms) - min(ms)) / ms[pick] if ms[pick] > 0 else 0.0
    return about, {**row, "rounds": len(ms), "decode_ms_rounds": ms, "decode_ms_spread": spread}, route, timeline


def overhead_shares(overhead: dict, rows: list[dict]) -> dict:
    """The prediction time against the batch-1 decode time per MoE layer of the stock and resident runs."""
    shares = dict(overhead)
    for policy in (STOCK, RESIDENT):
        ref = [r for r in rows if r["model"] == overhead["model"] and r["policy"] == policy and r["batch"] == 1]
        if ref:
            per_layer_us = 1e3 * ref[0]["decode_ms_median"] / ref[0]["moe_layers"]
            shares[f"{policy}_decode_us_per_layer"] = per_layer_us
            shares[f"share_of_{policy}_layer"] = overhead["us_per_layer"] / per_layer_us
            if "us_per_layer_graph" in overhead:
                shares[f"graph_share_of_{policy}_layer"] = overhead["us_per_layer_graph"] / per_layer_us
    return shares


def add_ratios(rows: list[dict], link_gbps: float | None = None) -> None:
    """Throughput relative to the stock model and to the engine's everything-resident run of the same
    model and batch, and the regime: link-bound when the bytes a step moves take longer at the link's
    peak than the whole resident step, else host-bound (the copies can hide behind host and GPU work)."""
    from prescope.hardware.profiles import load_profile

    link_gbps = link_gbps or load_profile("h200").pinned_h2d.peak_gbps
    resident = {(r["model"], r["batch"]): r for r in rows if r["policy"] == RESIDENT}
    stock = {(r["model"], r["batch"]): r for r in rows if r["policy"] == STOCK}
    same = {(r["model"], r["policy"], r["budget"], r["batch"]): r for r in rows}
    for r in rows:
        ref, base = resident.get((r["model"], r["batch"])), stock.get((r["model"], r["batch"]))
        if base is not None:
            r["vs_stock"] = r["decode_tok_s"] / base["decode_tok_s"]
        for other in (*LIMIT_RATIOS, ACCELERATE):
            peer = same.get((r["model"], other, r["budget"], r["batch"]))
            if peer is not None and r["policy"] not in (STOCK, RESIDENT):
                r[f"vs_{other}"] = r["decode_tok_s"] / peer["decode_tok_s"]
        if ref is None:
            continue
        r["vs_resident"] = r["decode_tok_s"] / ref["decode_tok_s"]
        link_ms = (r.get("bytes_per_step") or 0) / (link_gbps * 1e9) * 1e3
        r["regime"] = "link-bound" if link_ms > ref["decode_ms_median"] else "host-bound"


def bench_table(path: str | Path) -> pd.DataFrame:
    """The cells of a bench.json with ratios and regimes, for reports and notebooks; policies named as today
    (`policies.current_name`: earlier runs' `oracle` is `belady`)."""
    data = read_bench(path)
    rows = [{**r, "policy": current_name(r["policy"])} for r in data["cells"]]
    add_ratios(rows)
    table = pd.DataFrame(rows)
    table.attrs.update(source=data.get("source", "measured"), profile=measured_profile(data.get("device", "?")),
                       git_revision=data.get("git_revision", "unknown"))
    return table


def line(r: dict) -> str:
    """A row as the bench prints it while it runs."""
    return (f"{r['model']:>14} {r['policy']:>14} {r['budget']:>5.2f} b={r['batch']:<3d} "
            f"{r['decode_tok_s']:9.1f} tok/s {r['decode_ms_median']:8.2f} ms/step loads/step="
            f"{r.get('loads_per_step', 0):6.1f} host/layer={r.get('host_ms_per_layer', 0):.3f} ms "
            f"h2d={r.get('h2d_GBps_median') or 0:.1f} GB/s idle={r.get('gpu_idle_share') or 0:.2f}")
