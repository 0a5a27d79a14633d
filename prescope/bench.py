"""`prescope bench`: measure the engine's policies on a GPU, on shape twins, as ratios within one run.

For every model (a shape twin, optionally with fewer layers), batch size, policy and expert budget it
runs a real greedy `generate()` (input `input_len`, output `output_len` tokens) and reports decode
throughput, per-token latency, time to first token, expert loads and bytes per step, hit rate, the
engine's host time per MoE layer, and, from a second short run with every transfer and kernel timed,
the achieved host-to-device bandwidth and the GPU idle share. The same model also runs stock (all
weights on the GPU, transformers' own experts) and through the engine with every expert resident: the
difference is the engine's overhead. The decode routing of every cell is kept so the simulator can
replay it for the fidelity check. Results carry the config, git revision and device; each file is
written atomically; a table is printed, then one JSON line.

Cells run in order of importance and results are flushed after each one, so a run cut short keeps
what it finished.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import adapter, twins
from .config import EngineConfig
from .engine import Engine
from .metrics import git_revision, write_atomic

RESIDENT = "resident"
STOCK = "stock"


@dataclass(frozen=True)
class BenchConfig:
    """models: twin names, each optionally `name:layers`. budgets: shares of all experts for offloaded
    policies. timeline_tokens: decode tokens of the second, fully timed run (0 to skip it)."""

    models: tuple[str, ...] = ("olmoe-1b-7b", "mixtral-8x7b:8")
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    policies: tuple[str, ...] = ("on_demand_lru", "cpu_misses")
    budgets: tuple[float, ...] = (0.25, 0.5)
    input_len: int = 128
    output_len: int = 32
    timeline_tokens: int = 8
    device: str = "cuda"
    profile: str = "h200"
    out: str = "reports/bench"
    seed: int = 0
    warmup_tokens: int = 4
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if min(self.batch_sizes) < 1 or self.input_len < 1 or self.output_len < 2:
            raise ValueError("batch sizes and input_len must be >= 1 and output_len >= 2")
        for b in self.budgets:
            if not 0 < b <= 1:
                raise ValueError(f"budgets are shares in (0, 1], got {b}")


def parse_model(spec: str) -> tuple[str, int | None]:
    name, _, layers = spec.partition(":")
    return name, int(layers) if layers else None


def build_subject(spec: str, device: torch.device, seed: int):
    """A model to benchmark: `prescope-tiny`, a twin `name[:layers]`, or `name-tiny[:layers]` (the twin's
    structure at tiny widths, for CPU smoke runs)."""
    name, layers = parse_model(spec)
    if name == "prescope-tiny":
        from .tiny import load_tiny

        model, _ = load_tiny(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        return model.to(device)
    if name.endswith("-tiny"):
        cfg = twins.tiny_twin_config(name.removesuffix("-tiny"), layers or 2)
        return twins.build_twin(cfg, device=device, seed=seed, dtype=torch.float32)
    return twins.build_twin(name, num_layers=layers, device=device, seed=seed)


def _generate(model, batch: int, input_len: int, new_tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (batch, input_len), generator=gen).to(model.device)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_stock(model, batch: int, cfg: BenchConfig, device: torch.device) -> dict:
    """Stock decode: per-step latency from host timestamps around synchronised forward calls."""
    stamps = []

    def stamp(kind: str):
        def hook(*_):
            _sync(device)
            stamps.append([kind, time.perf_counter()])
        return hook

    hooks = [model.register_forward_pre_hook(stamp("s")), model.register_forward_hook(stamp("e"))]
    try:
        _generate(model, batch, 16, cfg.warmup_tokens, cfg.seed + 1)
        stamps.clear()
        _generate(model, batch, cfg.input_len, cfg.output_len, cfg.seed)
    finally:
        for h in hooks:
            h.remove()
    starts, ends = [t for k, t in stamps if k == "s"], [t for k, t in stamps if k == "e"]
    latencies = [e - s for s, e in zip(starts, ends, strict=True)]
    return _decode_metrics(latencies[0], latencies[1:], batch)


def _decode_metrics(ttft: float, decode: list[float], batch: int) -> dict:
    return {"ttft_s": ttft, "decode_ms_median": 1e3 * statistics.median(decode),
            "decode_ms_mean": 1e3 * statistics.fmean(decode), "decode_tok_s": batch * len(decode) / sum(decode),
            "decode_ms_steps": [round(1e3 * x, 4) for x in decode]}


def measure_engine(engine: Engine, model, batch: int, cfg: BenchConfig) -> tuple[dict, np.ndarray, pd.DataFrame]:
    """One cell: warm up, then a step-timed run (throughput, routing) and a fully timed run (timeline)."""
    layout = engine.layout
    engine.set_timing("steps")
    _generate(model, batch, 16, cfg.warmup_tokens, cfg.seed + 1)
    engine.reset()
    engine.clear_records()
    routing, loads_before = [], []

    def keep(ordinal, hidden, logits, weights, indices):
        if engine.phase == "decode":
            routing.append(indices.detach().to(torch.int16))
            if ordinal == 0:
                loads_before.append(engine.cache.stats.loads)

    with adapter.observe_routing(model, keep):
        _generate(model, batch, cfg.input_len, cfg.output_len, cfg.seed)
    steps = engine.step_table()
    decode = steps[steps["phase"] == "decode"]["latency"].tolist()
    stats = engine.cache.stats
    decode_loads = stats.loads - loads_before[0] if loads_before else 0
    calls = max(1, len(steps) * layout.num_moe_layers)
    L, K = layout.num_moe_layers, layout.top_k
    route = torch.stack(routing).cpu().numpy().reshape(len(decode), L, batch, K) if routing else np.zeros((0,))
    row = {**_decode_metrics(steps["latency"].iloc[0], decode, batch),
           "loads_per_step": decode_loads / max(1, len(decode)),
           "bytes_per_step": decode_loads * layout.expert_bytes / max(1, len(decode)),
           "hit_rate": stats.hits / max(1, stats.hits + stats.misses),
           "step_ms_per_layer": 1e3 * sum(engine.host_seconds) / calls,
           "host_ms_per_layer": 1e3 * (sum(engine.host_seconds) - sum(engine.sync_seconds)) / calls}
    timeline = pd.DataFrame()
    if cfg.timeline_tokens:
        engine.set_timing("full")
        engine.clear_records()
        _generate(model, batch, cfg.input_len, cfg.timeline_tokens, cfg.seed + 2)
        timeline = engine.timeline()
        steps = engine.step_table()
        timeline = timeline.merge(steps[["step", "phase"]], on="step", how="left")
        row.update(_timeline_metrics(timeline, steps, layout.expert_bytes))
    return row, route, timeline


def _timeline_metrics(timeline: pd.DataFrame, steps: pd.DataFrame, expert_bytes: int) -> dict:
    decode_steps = steps[steps["phase"] == "decode"]
    loads = timeline[(timeline["lane"] == "pcie") & (timeline["end"] > timeline["start"])]
    gbps = (loads["bytes"] / (loads["end"] - loads["start"]) / 1e9).tolist()
    busy = 0.0
    for step in decode_steps["step"]:
        gpu = timeline[(timeline["lane"] == "gpu") & (timeline["step"] == step)].sort_values("start")
        end = -1.0
        for s, e in zip(gpu["start"], gpu["end"], strict=True):
            busy += max(0.0, e - max(s, end))
            end = max(end, e)
    total = decode_steps["latency"].sum()
    return {"h2d_GBps_median": statistics.median(gbps) if gbps else None,
            "gpu_idle_share": 1 - busy / total if total else None,
            "link_busy_share": float((loads[loads["step"].isin(decode_steps["step"])]["end"]
                                      - loads[loads["step"].isin(decode_steps["step"])]["start"]).sum() / total)
            if total else None}


def run_bench(cfg: BenchConfig) -> list[dict]:
    device = torch.device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": asdict(cfg), "git_revision": os.environ.get("PRESCOPE_GIT_REV") or git_revision(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "source": "measured"}
    rows, routes, timelines = [], {}, []
    for spec in cfg.models:
        name, _ = parse_model(spec)
        model = build_subject(spec, device, cfg.seed)
        layout = adapter.describe(model)
        base = {"model": name, "layers": layout.num_layers, "expert_MB": layout.expert_bytes / 2**20}
        for batch in cfg.batch_sizes:
            rows.append({**base, "policy": STOCK, "budget": 1.0, "batch": batch,
                         **measure_stock(model, batch, cfg, device)})
            _flush(out, meta, rows, routes, timelines)
        cells = [(RESIDENT, 1.0)] + [(p, b) for b in cfg.budgets for p in cfg.policies]
        for policy, budget in cells:
            engine = Engine(model, EngineConfig(policy="on_demand_lru" if policy == RESIDENT else policy,
                                                budget_share=budget, device=cfg.device, profile=cfg.profile))
            for batch in cfg.batch_sizes:
                row, route, timeline = measure_engine(engine, model, batch, cfg)
                cell = f"{name}|{policy}|{budget}|{batch}"
                rows.append({**base, "policy": policy, "budget": budget, "batch": batch, "slots": engine.num_slots,
                             **row})
                routes[cell] = route
                if len(timeline):
                    timelines.append(timeline.assign(model=name, policy=policy, budget=budget, batch=batch))
                print(_line(rows[-1]), flush=True)
                _flush(out, meta, rows, routes, timelines)
            engine.close()
            del engine
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model
        gc.collect()
    _add_ratios(rows)
    _flush(out, meta, rows, routes, timelines)
    return rows


def _add_ratios(rows: list[dict], link_gbps: float | None = None) -> None:
    """Throughput relative to the stock model and to the engine's everything-resident run of the same
    model and batch, and the regime: link-bound when the bytes a step moves take longer at the link's
    peak than the whole resident step, else host-bound (the copies can hide behind host and GPU work)."""
    from .profiles import load_profile

    link_gbps = link_gbps or load_profile("h200").pinned_h2d.peak_gbps
    resident = {(r["model"], r["batch"]): r for r in rows if r["policy"] == RESIDENT}
    stock = {(r["model"], r["batch"]): r for r in rows if r["policy"] == STOCK}
    for r in rows:
        ref, base = resident.get((r["model"], r["batch"])), stock.get((r["model"], r["batch"]))
        if base is not None:
            r["vs_stock"] = r["decode_tok_s"] / base["decode_tok_s"]
        if ref is None:
            continue
        r["vs_resident"] = r["decode_tok_s"] / ref["decode_tok_s"]
        link_ms = (r.get("bytes_per_step") or 0) / (link_gbps * 1e9) * 1e3
        r["regime"] = "link-bound" if link_ms > ref["decode_ms_median"] else "host-bound"


def bench_table(path: str | Path) -> pd.DataFrame:
    """The cells of a bench.json with ratios and regimes, for reports and notebooks."""
    data = json.loads(Path(path).read_text())
    rows = [dict(r) for r in data["cells"]]
    _add_ratios(rows)
    table = pd.DataFrame(rows)
    table.attrs.update(source=data.get("source", "measured"), profile=data.get("device", ""),
                       git_revision=data.get("git_revision", "unknown"))
    return table


def _line(r: dict) -> str:
    return (f"{r['model']:>14} {r['policy']:>14} {r['budget']:>5.2f} b={r['batch']:<3d} "
            f"{r['decode_tok_s']:9.1f} tok/s {r['decode_ms_median']:8.2f} ms/step loads/step="
            f"{r.get('loads_per_step', 0):6.1f} host/layer={r.get('host_ms_per_layer', 0):.3f} ms "
            f"h2d={r.get('h2d_GBps_median') or 0:.1f} GB/s idle={r.get('gpu_idle_share') or 0:.2f}")


def _flush(out: Path, meta: dict, rows: list[dict], routes: dict, timelines: list[pd.DataFrame]) -> None:
    write_atomic(out / "bench.json", json.dumps({**meta, "cells": rows}, indent=1, default=str))
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k.replace("|", "__"): v for k, v in routes.items()})
    write_atomic(out / "routing.npz", buf.getvalue())
    if timelines:
        buf = io.BytesIO()
        pd.concat(timelines, ignore_index=True).to_parquet(buf)
        write_atomic(out / "timelines.parquet", buf.getvalue())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    parser.add_argument("--models", nargs="+", default=list(d.models))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(d.batch_sizes))
    parser.add_argument("--policies", nargs="+", default=list(d.policies))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(d.budgets))
    for name in ("input_len", "output_len", "timeline_tokens", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("device", "profile", "out"):
        parser.add_argument(f"--{name}", default=getattr(d, name))


def run(args: argparse.Namespace) -> int:
    cfg = BenchConfig(models=tuple(args.models), batch_sizes=tuple(args.batch_sizes), policies=tuple(args.policies),
                      budgets=tuple(args.budgets), input_len=args.input_len, output_len=args.output_len,
                      timeline_tokens=args.timeline_tokens, seed=args.seed, device=args.device,
                      profile=args.profile, out=args.out)
    rows = run_bench(cfg)
    table = pd.DataFrame(rows)[["model", "policy", "budget", "batch", "decode_tok_s", "decode_ms_median",
                                "vs_resident", "regime"]]
    print(table.to_string(index=False))
    print(json.dumps({"bench": asdict(cfg), "cells": len(rows)}))
    return 0
