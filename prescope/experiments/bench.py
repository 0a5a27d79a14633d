"""`prescope bench`: measure the engine's policies on a GPU, on shape twins, as ratios within one run.

For every model (a shape twin, optionally with fewer layers), batch size, policy and expert budget it
runs a real greedy `generate()` (input `input_len`, output `output_len` tokens) and reports decode
throughput, per-token latency, time to first token, expert loads and bytes per step, hit rate, the
engine's host time per MoE layer (and the policy's share of it: prediction and planning, told apart from the
policy's wait for the device, see "Host time" below), and, from a
second short run with every transfer and kernel timed, the achieved host-to-device bandwidth, the GPU
idle share and the link's busy share. The same model also runs stock (all weights on the GPU,
transformers' own experts), through the engine with every expert resident (the engine's overhead), and
through Hugging Face accelerate's offload at the same GPU budget (`hfoffload`, what a user would
otherwise pick; fewer decode tokens, since it is slow).

Routing: the stock run of each batch records its routing, and every engine cell of that batch replays it
(`replay.RoutingReplay`), so all policies see the same experts and the limits (`belady`, `ceiling`) know the
step's future.
A subject `twin@prescope-tiny` (e.g. `olmoe-1b-7b@prescope-tiny`) is the twin driven by prescope-tiny's
routing on held-out text instead (same L, E, K): its predictors read prescope-tiny's hidden states; `twin@router`
likewise with the routing model trained like the twin (`models.routers`), and `twin:LAYERS@router` with the first
MoE layers of it (`routersubject`; `prescope` there takes the LLaPor `gpu-inputs --routers` trained for that twin
and layer count, from the `--inputs` folder).

Predictors: `lookahead_prefetch` and `hybrid` use gate lookahead (the routers of the model whose routing
runs); `prescope` uses the LLaPor checkpoint given with `--predictor` where its layout matches that model,
else gate lookahead (stated in each row's `predictor`); `activation_matrix` uses its own activation
statistics; `belady` and `ceiling` the replayed future (results before the rename call `belady`
`oracle`: `bench_table` reads them as `belady`). Variants (`prescope.policies.parse_policy`): `NAME[key=value,...]`
(the policy's typed options, e.g. `prescope[calibrate=True]`), `NAME+sync` (AsyncIO off), `NAME+cpuN` (the engine's CPU experts on N threads at once). Each cell records whether its tokens equal the stock run's.
Results carry the config, git revision and device; each file is written atomically; a table is printed,
then one JSON line.

Host time (per MoE layer call): `host_ms_per_layer` is the engine's own host work, every wait for the device
excluded (the layer's routing, `sync_ms_per_layer`, and the policy's forecast read); `policy_ms_per_layer` and
`victim_ms_per_layer` are the wall time in `Policy.plan` (and `Policy.plan_ahead`) and `Policy.victim` over every
call (prefill and graph capture included), the wait included, `forecast_wait_ms_per_layer` that wait. With
`late_prefetch` (prescope, ceiling) most of the planning is in `plan_ahead`, after the layer's kernels are
enqueued, so that part of the policy's host time overlaps the device instead of delaying the layer's launch.
Over the measured decode steps only: `policy_ms_per_layer_decode` is the policy's own host work (plan + plan ahead
+ victims − wait) and
`forecast_wait_ms_per_layer_decode` the host's wait inside them for the device: a forecast computed on the GPU
(LLaPor's CUDA graph) is read back once the device has run it and everything queued before it (about 0 on the
CPU, where the forecast is host work itself). The sum of the two is the policy's whole wall time.
`gate_plan_host_ms` (prescope, ceiling): the planning host time P the gate weighed at the run's end, as the engine
measured it (`policies/hostmeter.py`; None where no planned layer was measured, the gate then reading the
profile's P). `gate_arms` (prescope, ceiling with `measured_gate`): per step shape (tokens·K), the step times the
arbiter counted for the gate's decisions, for planning every layer and for planning none, and the arm it runs
(`policies/arbiter.py`).

Cells run in order of importance and results are flushed after each one, so a run cut short keeps
what it finished. Host-bound cells vary from run to run by tens of percent on a shared host: `repeats`
runs every engine cell that many times in interleaved rounds (each cell's round 1, then each cell's round
2, ...) and each row is the median round's, with every round's decode median (`decode_ms_rounds`) and
their spread (`decode_ms_spread`); after every round of a cell its row is rewritten with the median so
far (`rounds` says how many), so a run cut short keeps every round it finished.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from prescope.config import EngineConfig, check_types
from prescope.experiments import benchrows, bounds
from prescope.experiments.benchfile import write_bench
from prescope.experiments.benchrows import RESIDENT
from prescope.experiments.stock import (
    SEQUENCES,
    STOCK,
    STOCK_EAGER,
    _decode_metrics,
    _free,
    measure_accelerate,
    measure_stocks,
)
from prescope.files import check_output, git_revision, portable_values
from prescope.policies import current_name, parse_policy
from prescope.timeline import host_device

if TYPE_CHECKING:  # torch, the engine and the models load in the functions that measure: `--help` starts fast
    import torch

    from prescope.engine.engine import Engine
    from prescope.routing.replay import RoutingReplay

ALL_POLICIES = ("on_demand_lru", "cpu_misses", "hybrid", "lookahead_prefetch", "activation_matrix", "prescope",
                "belady", "ceiling")


@dataclass(frozen=True)
class BenchConfig:
    """models: twin names, each optionally `name:layers`. budgets: shares of all experts for offloaded
    policies. timeline_tokens: decode tokens of the second, fully timed run (0 to skip it)."""

    models: tuple[str, ...] = ("olmoe-1b-7b", "mixtral-8x7b:8")
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    policies: tuple[str, ...] = ALL_POLICIES
    budgets: tuple[float, ...] = (0.25, 0.5)
    input_len: int = 128
    output_len: int = 32
    timeline_tokens: int = 8
    device: str = "cuda"
    profile: str = "h200"
    out: str = "reports/bench"
    seed: int = 0
    warmup_tokens: int = 4
    predictor: str | None = None  # LLaPor checkpoint for `prescope` where its layout matches
    prompts: str | None = None  # .npy [rows, >= input_len] token ids of prescope-tiny's held-out text
    accelerate_batches: tuple[int, ...] = (1,)
    accelerate_tokens: int = 6
    repeats: int = 1  # rounds over every engine cell, interleaved (round 1 of every cell, then round 2, ...)
    graphs: bool = True  # engine cells decode with engine.generate (static cache, CUDA graphs), not model.generate
    compile_segments: bool = False  # engine.generate's decode steps with compiled decoder layers (EngineConfig)
    switch_interval_s: float | None = None  # the interpreter's thread switch interval while decoding (EngineConfig)
    stock_implementations: tuple[str, ...] = ("grouped_mm", "batched_mm", "eager")  # transformers' to compare
    deadline_s: float = 0.0  # no cell starts this many seconds after the run began (0: none); see `run_bench`
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_types(self)
        if not (self.models and self.policies and self.budgets and self.batch_sizes) or min(self.batch_sizes) < 1 \
                or self.input_len < 1 or self.output_len < 2:
            raise ValueError("models, policies, budgets and batch sizes need a value each; batch sizes and input_len "
                             "must be >= 1 and output_len >= 2")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1 round, got {self.repeats}")
        if self.deadline_s < 0 or not self.stock_implementations:
            raise ValueError("deadline_s must be >= 0 (0: none) and stock_implementations must name at least one")
        for b in self.budgets:
            if not 0 < b <= 1:
                raise ValueError(f"budgets are shares in (0, 1], got {b}")
        for name in self.policies:
            parse_policy(name)  # a clear error for an unknown policy or option


def _over(per_step: dict, steps: set) -> float:
    """The sum of a per-step record over `steps`."""
    return sum(v for k, v in per_step.items() if k in steps)


def measure_engine(engine: Engine, model, batch: int, cfg: BenchConfig, replay: RoutingReplay | None = None,
                   prompts: np.ndarray | None = None, stock: torch.Tensor | None = None) -> tuple[dict, np.ndarray, pd.DataFrame]:
    """One cell: warm up, then a step-timed run (throughput, the engine's host time, routing, and its tokens
    against the stock run's `stock` [B, T]) and a fully timed run (timeline). With `cfg.graphs` the engine
    decodes through `engine.generate` (static cache, CUDA graphs), whose first decode step runs eagerly to
    warm up: the decode metrics are the captured steps'."""
    import torch

    from prescope.models import adapter

    layout = engine.layout
    engine.set_timing("steps")
    engine.set_replay(replay)
    engine.clear_records()  # the replay counts forward calls from the first one of a generate
    _engine_generate(engine, model, batch, cfg, min(cfg.warmup_tokens, cfg.output_len), cfg.seed + 1, prompts)
    engine.reset()
    engine.clear_records()
    routing = []

    def keep(ordinal, hidden, logits, weights, indices):
        if engine.records.phase == "decode":
            routing.append(indices.detach().to(torch.int16))

    with adapter.observe_routing(model, keep if replay is None else lambda *_: None):
        out, mode = _engine_generate(engine, model, batch, cfg, cfg.output_len, cfg.seed, prompts)
    steps = engine.step_table()
    decode_all = steps[steps["phase"] == "decode"]
    decode_rows = decode_all.iloc[1:] if mode != "eager" and len(decode_all) > 1 else decode_all
    decode = decode_rows["latency"].tolist()
    stats = engine.cache.stats
    decode_loads = int(decode_rows["loads"].sum())
    L, K = layout.num_moe_layers, layout.top_k
    calls = max(1, len(decode) * L)
    measured_steps = set(decode_rows["step"])
    own = sum(v for k, v in engine.records.own_seconds.items() if k in measured_steps)
    issue = sum(v for k, v in engine.records.issue_seconds.items() if k in measured_steps)
    if replay is not None:
        route = replay_route(replay, len(decode_all))[len(decode_all) - len(decode):]
    else:
        route = torch.stack(routing).cpu().numpy().reshape(-1, L, batch, K) if routing else np.zeros((0,))
    row = {**_decode_metrics(steps["latency"].iloc[0], decode, batch), "mode": mode,
           "loads_per_step": decode_loads / max(1, len(decode)),
           "bytes_per_step": decode_loads * layout.expert_bytes / max(1, len(decode)),
           "hit_rate": stats.hits / max(1, stats.hits + stats.misses),
           # the engine's own host time per MoE layer (waiting for the device excluded): its layer work where
           # the host drives each layer, the step's whole issue time over L where one graph runs the step
           "host_ms_per_layer": 1e3 * (own if mode != "graph" else issue) / calls,
           "step_issue_ms": 1e3 * issue / max(1, len(decode)),
           "sync_ms_per_layer": 1e3 * sum(engine.records.sync_seconds) / max(1, len(steps) * L),
           "policy_ms_per_layer": 1e3 * sum(engine.records.plan_seconds) / max(1, len(steps) * L),
           "victim_ms_per_layer": 1e3 * sum(engine.records.victim_seconds) / max(1, len(steps) * L),
           "forecast_wait_ms_per_layer": 1e3 * sum(engine.records.forecast_wait_seconds) / max(1, len(steps) * L),
           "prefetches_stopped": dict(engine.records.stopped),
           # over the measured decode steps only (the rows above: every call, prefill and graph capture included);
           # the policy's own host work (plan + victims − the wait), and its wait for the device (the forecast's read)
           "policy_ms_per_layer_decode": 1e3 * _over(engine.records.plan_by_step, measured_steps) / calls,
           "forecast_wait_ms_per_layer_decode": 1e3 * _over(engine.records.wait_by_step, measured_steps) / calls,
           "cpu_experts_per_step": _over(engine.records.cpu_runs, measured_steps) / max(1, len(decode)),
           "cpu_wait_ms_per_layer": 1e3 * _over(engine.records.cpu_wait_by_step, measured_steps) / calls}
    row |= _compiled_metrics(engine, cfg)
    if hasattr(engine.policy, "skipped"):  # prescope: layers with nothing to plan (PreSched not run)
        row["plans_skipped_share"] = engine.policy.skipped / max(1, len(steps) * L)
    if hasattr(engine.policy, "lean"):  # prescope: layers its gate ran on demand (host-bound, no prediction)
        row["plans_lean_share"] = engine.policy.lean / max(1, len(steps) * L)
    if callable(measured := getattr(engine.policy, "measured_plan_host", None)):  # the gate's P as measured
        p_s = measured()
        row["gate_plan_host_ms"] = None if p_s is None else 1e3 * p_s
    if (arbiter := getattr(engine.policy, "arbiter", None)) is not None and arbiter.shapes:
        row["gate_arms"] = {str(shape): at for shape, at in arbiter.summary().items()}  # measured step times
    graphs = getattr(engine.policy, "graphs", None)
    if graphs is not None:  # the forecast's CUDA graphs: keys replayed from a graph, keys left eager
        row["forecast_graphs"] = {"captured": graphs.captured, "refused": graphs.refused}
    if stock is not None and stock.shape == out.shape:  # bf16 kernels may round differently from stock's
        row |= {"tokens_equal_stock": bool(torch.equal(out, stock)),
                "token_match_share": float((out == stock).float().mean())}
    timeline = pd.DataFrame()
    if cfg.timeline_tokens:
        engine.set_timing("full")
        engine.clear_records()
        _engine_generate(engine, model, batch, cfg, min(cfg.timeline_tokens, cfg.output_len), cfg.seed + 2, prompts)
        timeline = engine.timeline()
        steps = engine.step_table()
        timeline = timeline.merge(steps[["step", "phase"]], on="step", how="left")
        row.update(_timeline_metrics(timeline, steps, layout.expert_bytes))
    return row, route, timeline


def _engine_generate(engine: Engine, model, batch: int, cfg: BenchConfig, new_tokens: int, seed: int,
                     prompts: np.ndarray | None) -> tuple[torch.Tensor, str]:
    """(generated ids on the CPU, how the decode steps ran): `engine.generate` with `cfg.graphs`, else
    transformers' `generate` through the engine."""
    from prescope.experiments.subjects import generate, prompt_ids

    if not cfg.graphs:
        return generate(model, batch, cfg.input_len, new_tokens, seed, prompts).cpu(), "eager"
    ids = prompt_ids(model, batch, cfg.input_len, seed, prompts)
    out = engine.generate(ids, max_new_tokens=new_tokens)
    return out.sequences.cpu(), out.mode


def _compiled_metrics(engine: Engine, cfg: BenchConfig) -> dict:
    """compiled_segments true/false (with the reason where it was asked for and did not run), and the graphs
    dynamo compiled for this engine's runs so far, with their wall time (`models.compiled.CompiledLayers`)."""
    compiled = engine.compiled
    if compiled is None:
        return {"compiled_segments": False}
    if not cfg.graphs:
        return {"compiled_segments": False, "compile_reason": "model.generate decodes (graphs off): not compiled"}
    return compiled.summary()


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


def require_device(device: str) -> None:
    """A clear error, before anything is built, when `device` is CUDA and this torch has none."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else "sees no CUDA device"
        raise ValueError(f"--device {device}: this machine's torch {torch.__version__} {built}; `prescope bench` "
                         "measures on a GPU (run it there, or pass --device cpu for the engine's CPU twin; "
                         "`prescope simulate-compare` gives simulated results)")


def run_bench(cfg: BenchConfig) -> list[dict]:
    require_device(cfg.device)
    out = check_output(cfg.out, folder=True, what="--out")
    import torch

    from prescope.engine.engine import Engine
    from prescope.experiments.routersubject import build_router_subject
    from prescope.experiments.subjects import ROUTER, build_bench_subject, routing_source
    from prescope.experiments.tracesubject import build_trace_subject, trace_path
    from prescope.models import adapter

    device = torch.device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": portable_values(asdict(cfg)), "git_revision": os.environ.get("PRESCOPE_GIT_REV") or git_revision(),
            "device": host_device(device),
            "torch": torch.__version__, "source": "measured"}
    rows, routes, timelines, failed = [], {}, [], []
    meta["failed"] = failed
    began, skipped = time.monotonic(), []
    past = lambda: cfg.deadline_s > 0 and time.monotonic() - began > cfg.deadline_s  # noqa: E731
    meta["deadline"] = {"deadline_s": cfg.deadline_s, "not_started": skipped}  # cells the deadline left out
    meta["bandwidths"] = bounds.measure_bandwidths(device)  # what the bounds divide by, measured here
    for spec in cfg.models:
        if past():
            skipped.append(f"{spec}|*")
            continue
        if trace_path(spec):
            subject = build_trace_subject(spec, cfg, device)
        elif routing_source(spec) == ROUTER:
            subject = build_router_subject(spec, cfg, device, cfg.extra.get("inputs"))
        else:
            subject = build_bench_subject(spec, cfg, device)
        name, model = subject.name, subject.model
        layout = adapter.describe(model)
        base = {"model": name, "layers": layout.num_layers, "moe_layers": layout.num_moe_layers,
                "expert_MB": layout.expert_bytes / 2**20}
        replays, stock = {}, {}
        sizes = bounds.model_bytes(model, layout)
        for batch in cfg.batch_sizes:
            replays[batch] = subject.replay(batch, cfg)
            for measured in measure_stocks(model, batch, cfg, device, subject.prompts):
                stock[batch] = measured.pop(SEQUENCES, stock.get(batch))
                route = replay_route(replays[batch], len(measured["decode_ms_steps"]))
                rows.append({**base, "budget": 1.0, "batch": batch, "routing": "native", **measured,
                             "step_bytes": _mean_step_bytes(route, layout, sizes, batch, cfg)})
            write_bench(out, meta, rows, routes, timelines)
        overhead = None
        if subject.llapor is not None and subject.llapor.needs_hidden and subject.source is None \
                and device.type == "cuda":
            overhead = {"model": name, **predictor_overhead(subject.llapor, subject.router_inputs(cfg), device)}
            meta.setdefault("predictor_overhead", []).append(overhead)
        cells = [(RESIDENT, 1.0)] + [(current_name(p), b) for b in cfg.budgets for p in cfg.policies]
        measured: dict[str, list] = {}  # cell -> (about, row, route, timeline) of each round so far
        position: dict[str, int] = {}  # cell -> its row in `rows` (the median of its rounds so far)
        for rnd, (policy_name, budget) in ((r, c) for r in range(cfg.repeats) for c in cells):
            chosen = parse_policy("on_demand_lru" if policy_name == RESIDENT else policy_name)
            policy, predictor = subject.policy(chosen.name, **chosen.options)
            config = EngineConfig(policy=policy.name, budget_share=budget, device=cfg.device, profile=cfg.profile,
                                  compile_segments=cfg.compile_segments, switch_interval_s=cfg.switch_interval_s,
                                  **chosen.engine_options)
            engine = Engine(model, config, policy=policy)
            for batch in cfg.batch_sizes:
                cell = f"{name}|{policy_name}|{budget}|{batch}"
                if past():
                    skipped.append(f"{cell}|round {rnd + 1}")
                    continue
                about = {**base, "policy": policy_name, "budget": budget, "batch": batch, "slots": engine.num_slots,
                         "async_io": engine.io is not None, "cpu_workers": engine.cpu_workers, "predictor": predictor,
                         "routing": getattr(subject, "routing", "") or (
                             f"replayed from {subject.name.partition('@')[2]}" if subject.source is not None
                             else "replayed (stock run)")}
                try:
                    row, route, timeline = measure_engine(engine, model, batch, cfg, replays[batch], subject.prompts,
                                                          stock[batch])
                except Exception as exc:  # one failed cell is reported and the others still run
                    print(f"{cell} failed: {type(exc).__name__}: {exc}", flush=True)
                    failed.append({**about, "error": f"{type(exc).__name__}: {exc}"})
                    engine.close()
                    engine = Engine(model, config, policy=policy)
                    continue
                row["step_bytes"] = _mean_step_bytes(route, layout, sizes, batch, cfg)
                measured.setdefault(cell, []).append((about, row, route, timeline))
                about, row, route, timeline = benchrows.median_round(measured[cell])
                if cell in position:  # a later round: the cell's row is replaced by the median so far
                    rows[position[cell]] = {**about, **row}
                else:
                    position[cell] = len(rows)
                    rows.append({**about, **row})
                routes[cell] = route
                if rnd < cfg.repeats - 1:
                    print(f"[round {rnd + 1}/{cfg.repeats}] {benchrows.line(measured[cell][-1][0] | measured[cell][-1][1])}",
                          flush=True)
                else:
                    if len(timeline):
                        timelines.append(timeline.assign(model=name, policy=policy_name, budget=budget, batch=batch))
                    print(benchrows.line(rows[position[cell]]), flush=True)
                write_bench(out, meta, rows, routes, timelines)
            engine.close()
            del engine, policy
            _free(device)
        _add_ratios_and_bounds(rows, meta)  # the engine's rows are complete: a run killed in accelerate's keeps them
        write_bench(out, meta, rows, routes, timelines)
        if device.type == "cuda" and not past() and cfg.accelerate_batches:
            subject.model = model = None  # accelerate copies the model afresh: the host memory this one holds
            _free(device)
            for row in measure_accelerate(spec, subject, cfg, device, base):
                print(benchrows.line(row), flush=True)
                rows.append(row)
                write_bench(out, meta, rows, routes, timelines)
        del model, subject
        _free(device)
    meta["predictor_overhead"] = [benchrows.overhead_shares(o, rows) for o in meta.get("predictor_overhead", [])]
    _add_ratios_and_bounds(rows, meta)
    write_bench(out, meta, rows, routes, timelines)
    return rows


def _add_ratios_and_bounds(rows: list[dict], meta: dict) -> None:
    benchrows.add_ratios(rows)
    bounds.add_bounds(rows, meta["bandwidths"], RESIDENT, (STOCK, STOCK_EAGER))


def replay_route(replay: RoutingReplay, decode_steps: int) -> np.ndarray:
    """The replay's routing of its first `decode_steps` decode steps, [T', L, B, K] int16."""
    import torch

    span = replay.experts[:, replay.prompt_len:replay.prompt_len + decode_steps]  # [B, T', L, K]
    return span.permute(1, 2, 0, 3).to(torch.int16).cpu().numpy()


def _mean_step_bytes(route: np.ndarray, layout, sizes: dict, batch: int, cfg: BenchConfig) -> float | None:
    if route.ndim != 4 or not len(route):
        return None
    return float(np.mean(bounds.step_bytes(route, layout.expert_bytes, sizes, batch, cfg.input_len)))


def predictor_overhead(predictor, hidden: torch.Tensor, device: torch.device, repeats: int = 50) -> dict:
    """LLaPor's time per layer on `device` for one decode token: one `predict_window` call over all its
    distances, from recorded router inputs `hidden` [L, H], until the host can read the scores (as the
    planner does), median over `repeats`, averaged over layers; eagerly (`us_per_layer`) and replayed from
    a CUDA graph as the prescope policy runs it (`us_per_layer_graph`, predict.graphs.GraphCache)."""
    import torch

    from prescope.predict.graphs import GraphCache

    L, graphs = hidden.shape[0], GraphCache()

    def median_seconds(run, x) -> float:
        per = []
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            run(x).cpu()
            per.append(time.perf_counter() - t)
        return statistics.median(per)

    eager, graphed = [], []
    for layer in range(L - 1):
        d = list(range(1, min(predictor.config.distance, L - 1 - layer) + 1))
        x = hidden[layer].reshape(1, -1).to(device)  # [1, H]

        def window(h, layer=layer, d=d):
            scores = predictor.predict_window(layer, d, hidden=h)
            return torch.stack([scores[j] for j in d])  # [D', 1, E]

        eager.append(median_seconds(window, x))
        graphed.append(median_seconds(functools.partial(graphs, (layer, len(d)), window), x))
    return {"predictor": getattr(predictor, "name", "llapor"), "device": torch.cuda.get_device_name(device),
            "us_per_layer": 1e6 * statistics.fmean(eager), "us_per_layer_graph": 1e6 * statistics.fmean(graphed),
            "graphs_captured": graphs.captured, "graphs_refused": graphs.refused, "layers": L - 1,
            "repeats": repeats}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    parser.add_argument("--models", nargs="+", default=list(d.models),
                        help="shape twins, each NAME or NAME:LAYERS, or TWIN@prescope-tiny / TWIN@router (the twin "
                             "driven by prescope-tiny's or its routing model's routing on held-out text) "
                             "(default: %(default)s)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(d.batch_sizes),
                        help="batch sizes to measure (default: %(default)s)")
    parser.add_argument("--policies", nargs="+", default=list(d.policies),
                        help="policies to measure, each optionally NAME+sync (AsyncIO off), prescope+cal or "
                             "NAME[key=value,...] (default: every policy)")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(d.budgets),
                        help="GPU expert budgets, as shares of all L·E experts (default: %(default)s)")
    helps = {"input_len": "prompt tokens per sequence", "output_len": "generated tokens per sequence",
             "timeline_tokens": "decode tokens of the second, fully timed run that draws the timeline (0 = skip it)",
             "seed": "seed of the random prompts and of the twins' weights",
             "device": "CUDA device to measure on (cpu runs the engine's CPU twin: a smoke test, not a timing)",
             "profile": "hardware profile (built-in name or JSON) the cost-aware policies weigh",
             "out": "folder for bench.json, routing.npz and timelines.parquet"}
    for name in ("input_len", "output_len", "timeline_tokens", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name),
                            help=helps[name] + " (default: %(default)s)")
    for name in ("device", "profile", "out"):
        parser.add_argument(f"--{name}", default=getattr(d, name), help=helps[name] + " (default: %(default)s)")
    parser.add_argument("--predictor", help="LLaPor checkpoint for `prescope` (used where its layout matches)")
    parser.add_argument("--prompts", help="prescope-tiny's prompts: 'heldout' (held-out corpus windows) or a .npy "
                        "[rows, >= input_len] of token ids (subjects.heldout_prompts, saved with np.save)")
    parser.add_argument("--inputs", help="a `prescope gpu-inputs` folder: its held-out prompts and LLaPor checkpoint, "
                        "checked against its manifest (instead of --prompts and --predictor)")
    parser.add_argument("--accelerate-batches", nargs="*", type=int, default=list(d.accelerate_batches),
                        help="batch sizes of the accelerate offload rows (none: skip them)")
    parser.add_argument("--accelerate-tokens", type=int, default=d.accelerate_tokens,
                        help="decode tokens of each accelerate offload row (it is slow) (default: %(default)s)")
    parser.add_argument("--stock-implementations", nargs="+", default=list(d.stock_implementations),
                        help="transformers' experts implementations of the stock rows (eager is slow at large batches) "
                             "(default: %(default)s)")
    parser.add_argument("--deadline-s", type=float, default=d.deadline_s,
                        help="start no cell this many seconds after the run began (0: none); the cells left out are "
                             "listed in bench.json's `deadline` (a device call with a time limit keeps what finished)")
    parser.add_argument("--compile-segments", action="store_true",
                        help="compile every decoder layer's non-expert part (torch.compile, inductor) before the "
                             "decode step's CUDA graphs are captured; rows say compiled_segments and why not")
    parser.add_argument("--switch-interval-s", type=float, default=d.switch_interval_s,
                        help="the interpreter's thread switch interval while the engine decodes (sys.setswitchinterval; "
                             "default: Python's 5 ms): how soon the AsyncIO worker and CPU-expert threads get the GIL "
                             "from the compute thread")
    parser.add_argument("--repeats", type=int, default=d.repeats,
                        help="rounds over every engine cell, interleaved; each row is the median round's, with "
                             "every round's decode median and their spread")


def run(args: argparse.Namespace) -> int:
    extra = {}
    if args.inputs:
        from prescope.experiments.gpuinputs import read_inputs

        if args.prompts or args.predictor:
            raise ValueError("--inputs gives the prompts and the predictor: leave --prompts and --predictor out")
        args.prompts, args.predictor, extra["inputs"] = read_inputs(args.inputs, args.input_len)
    cfg = BenchConfig(models=tuple(args.models), batch_sizes=tuple(args.batch_sizes), policies=tuple(args.policies),
                      budgets=tuple(args.budgets), input_len=args.input_len, output_len=args.output_len,
                      timeline_tokens=args.timeline_tokens, seed=args.seed, device=args.device,
                      profile=args.profile, out=args.out, predictor=args.predictor, prompts=args.prompts,
                      accelerate_batches=tuple(args.accelerate_batches), accelerate_tokens=args.accelerate_tokens,
                      repeats=args.repeats, stock_implementations=tuple(args.stock_implementations),
                      deadline_s=args.deadline_s, compile_segments=args.compile_segments,
                      switch_interval_s=args.switch_interval_s, extra=extra)
    rows = run_bench(cfg)
    table = pd.DataFrame(rows)
    table = table[[c for c in ("model", "policy", "budget", "batch", "decode_tok_s", "decode_ms_median", "vs_resident",
                               "vs_on_demand_lru", "vs_ceiling", "regime") if c in table]]
    print(table.to_string(index=False))
    print(json.dumps({"bench": asdict(cfg), "cells": len(rows)}))
    return 0
