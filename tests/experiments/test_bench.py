"""prescope bench on the CPU: every policy on one replayed routing, a twin driven by prescope-tiny's routing."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from prescope.experiments import bench, benchfile, benchrows
from prescope.experiments.bench import BenchConfig, run_bench

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_runs_every_policy_on_the_same_replayed_routing(tmp_path):
    prompts = tmp_path / "prompts.npy"
    np.save(prompts, np.random.default_rng(0).integers(1, 8000, (3, 10)))
    # `oracle`, belady's name before, still runs, as belady
    cfg = BenchConfig(models=("olmoe-1b-7b-tiny:16@prescope-tiny",), batch_sizes=(2,),
                      policies=("on_demand_lru", "prescope", "oracle"), budgets=(0.25,), input_len=6, output_len=3,
                      timeline_tokens=2, warmup_tokens=2, device="cpu", out=str(tmp_path / "out"),
                      prompts=str(prompts), repeats=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # belady warns if it ever lacks the future
        rows = run_bench(cfg)
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["failed"] == [] and data["source"] == "measured"
    assert not data["config"]["out"].startswith("/")  # the run's folder, named portably (files.portable_path)
    engine_rows = [r for r in rows if r["policy"] not in (bench.STOCK, bench.STOCK_EAGER)]
    assert {r["policy"] for r in engine_rows} == {benchrows.RESIDENT, "on_demand_lru", "prescope", "belady"}
    assert all(r["routing"] == "replayed from prescope-tiny" for r in engine_rows)
    by = {r["policy"]: r for r in engine_rows}
    # the tiny twin's experts load in far less than 1 ms: prescope leaves AsyncIO off, belady asks for it
    assert not by["prescope"]["async_io"] and by["belady"]["async_io"] and not by["on_demand_lru"]["async_io"]
    assert by["prescope"]["predictor"] == "gate_lookahead"  # no LLaPor checkpoint given
    assert by["on_demand_lru"]["loads_per_step"] > 0
    assert by["prescope"]["vs_on_demand_lru"] > 0 and "vs_belady" in by["prescope"]
    # the tiny twin under the default h200 profile is host-bound: the gate runs its decode layers on demand
    assert 0.5 < by["prescope"]["plans_lean_share"] <= 1.0 and "plans_lean_share" not in by["belady"]
    # the gate's P as the engine measured it (None until a planned layer was measured), the gated policies' only
    p_ms = by["prescope"]["gate_plan_host_ms"]
    assert (p_ms is None or p_ms >= 0.0) and "gate_plan_host_ms" not in by["belady"]
    for r in engine_rows:  # two interleaved rounds: the row is the lower median round's
        assert r["rounds"] == 2 and r["decode_ms_median"] == min(r["decode_ms_rounds"])
    routing = np.load(tmp_path / "out" / "routing.npz")
    assert routing["olmoe-1b-7b-tiny@prescope-tiny__prescope__0.25__2"].shape[1:] == (16, 2, 8)


def test_rows_count_the_cpu_experts_and_the_policys_time_over_the_measured_steps(tmp_path):
    prompts = tmp_path / "prompts.npy"
    np.save(prompts, np.random.default_rng(0).integers(1, 8000, (3, 10)))
    cfg = BenchConfig(models=("olmoe-1b-7b-tiny:16@prescope-tiny",), batch_sizes=(2,),
                      policies=("on_demand_lru", "cpu_misses", "cpu_misses+cpu3", "prescope[gate=False]"), budgets=(0.25,),
                      input_len=6,
                      output_len=4, timeline_tokens=0, warmup_tokens=2, device="cpu", out=str(tmp_path / "out"),
                      prompts=str(prompts), accelerate_batches=())
    by = {r["policy"]: r for r in run_bench(cfg) if r["policy"] not in (bench.STOCK, bench.STOCK_EAGER)}
    assert by["on_demand_lru"]["cpu_experts_per_step"] == 0 and by["on_demand_lru"]["cpu_wait_ms_per_layer"] == 0
    # cpu_misses runs every miss on the CPU: as many CPU experts per step as LRU loads
    assert by["cpu_misses"]["cpu_experts_per_step"] > 0 and by["cpu_misses"]["cpu_wait_ms_per_layer"] > 0
    assert by["cpu_misses"]["loads_per_step"] == 0
    # `+cpu3`: the same CPU experts (the same replayed routing), computed by three threads at once
    assert by["cpu_misses+cpu3"]["cpu_experts_per_step"] == by["cpu_misses"]["cpu_experts_per_step"]
    assert by["cpu_misses+cpu3"]["cpu_workers"] == 3 and by["cpu_misses"]["cpu_workers"] == max(1, os.cpu_count() // 2)
    assert by["cpu_misses+cpu3"]["token_match_share"] == by["cpu_misses"]["token_match_share"]
    planned = by["prescope[gate=False]"]
    assert 0 < planned["policy_ms_per_layer_decode"] and by["on_demand_lru"]["policy_ms_per_layer_decode"] < 1
    # the policy's wait for the device, apart from its host work: none on the CPU, where the forecast is host work
    for r in by.values():
        assert r["forecast_wait_ms_per_layer_decode"] == 0.0 and r["forecast_wait_ms_per_layer"] == 0.0


def test_unknown_policies_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="unknown policy 'lru'"):
        BenchConfig(policies=("lru",))


def test_a_bench_needs_one_round_at_least():
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        BenchConfig(repeats=0)


def test_a_round_that_fails_keeps_the_rounds_before_it(tmp_path, monkeypatch):
    """Rows are rewritten after every round of a cell: a cell whose second round fails keeps its first."""
    real, calls = bench.measure_engine, {}

    def flaky(engine, *args, **kwargs):
        cell = engine.config.budget_share  # resident (1.0) also runs on_demand_lru's engine
        calls[cell] = calls.get(cell, 0) + 1
        if cell == 0.5 and calls[cell] == 2:
            raise RuntimeError("the device went away")
        return real(engine, *args, **kwargs)

    monkeypatch.setattr(bench, "measure_engine", flaky)
    cfg = BenchConfig(models=("olmoe-1b-7b-tiny:2",), batch_sizes=(1,), policies=("on_demand_lru",), budgets=(0.5,),
                      input_len=4, output_len=2, timeline_tokens=0, warmup_tokens=1, device="cpu",
                      out=str(tmp_path), accelerate_batches=(), repeats=2)
    run_bench(cfg)
    data = json.loads((tmp_path / "bench.json").read_text())
    by = {r["policy"]: r for r in data["cells"]}
    assert by["on_demand_lru"]["rounds"] == 1 and by[benchrows.RESIDENT]["rounds"] == 2
    assert [f["policy"] for f in data["failed"]] == ["on_demand_lru"]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["cells"][0].pop("decode_ms_median"), "cell 0 needs 'decode_ms_median' as a number, got None"),
    (lambda d: d["config"].pop("input_len"), "config needs 'input_len' as an int"),
    (lambda d: d["cells"][1].__setitem__("budget", "half"), "cell 1 needs 'budget' as a number, got 'half'"),
    (lambda d: d.__setitem__("cells", {"a": 1}), "`cells` must be a list"),
])
def test_a_bench_json_edited_by_hand_is_refused_naming_the_cell_and_key(tmp_path, edit, message):
    committed = ROOT / "reports" / "h200" / "bench-olmoe.json"
    benchfile.read_bench(committed)  # written before checksums: read under the rule, every key there
    data = json.loads(committed.read_text())
    edit(data)
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        benchrows.bench_table(tmp_path / "b.json")


def test_no_cell_starts_after_the_deadline_and_the_file_says_which_were_left_out(tmp_path, monkeypatch):
    """A device call has a time limit: past `deadline_s` no cell starts, the finished ones are kept, the others
    are listed; the clock here moves 10 s per measured cell."""
    real, clock = bench.measure_engine, {"now": 0.0}

    def slow(*args, **kwargs):
        clock["now"] += 10.0
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "measure_engine", slow)
    monkeypatch.setattr(bench.time, "monotonic", lambda: clock["now"])
    cfg = BenchConfig(models=("olmoe-1b-7b-tiny:2", "mixtral-8x7b-tiny:2"), batch_sizes=(1, 2),
                      policies=("on_demand_lru",), budgets=(0.5,), input_len=4, output_len=2, timeline_tokens=0,
                      warmup_tokens=1, device="cpu", out=str(tmp_path), accelerate_batches=(), deadline_s=25.0,
                      stock_implementations=("eager",))
    run_bench(cfg)
    data = json.loads((tmp_path / "bench.json").read_text())
    engine_cells = [(r["policy"], r["batch"]) for r in data["cells"] if r["policy"] not in (bench.STOCK, bench.STOCK_EAGER)]
    assert engine_cells == [(benchrows.RESIDENT, 1), (benchrows.RESIDENT, 2), ("on_demand_lru", 1)]
    assert data["deadline"] == {"deadline_s": 25.0, "not_started": [
        "olmoe-1b-7b-tiny|on_demand_lru|0.5|2|round 1", "mixtral-8x7b-tiny:2|*"]}
    assert {r["experts_implementation"] for r in data["cells"] if r["policy"] == bench.STOCK} == {"eager"}
    with pytest.raises(ValueError, match="deadline_s must be >= 0"):
        BenchConfig(deadline_s=-1)


def test_compiled_segments_are_asked_for_on_the_command_line_and_said_in_every_engine_row(tmp_path):
    import argparse

    import torch

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert parser.parse_args(["--compile-segments"]).compile_segments and not parser.parse_args([]).compile_segments
    torch._dynamo.reset()  # the count starts from no compiled code
    cfg = BenchConfig(models=("olmoe-1b-7b-tiny:2",), batch_sizes=(1,), policies=("on_demand_lru",), budgets=(0.5,),
                      input_len=4, output_len=3, timeline_tokens=0, warmup_tokens=2, device="cpu",
                      out=str(tmp_path), accelerate_batches=(), stock_implementations=("grouped_mm",),
                      compile_segments=True)
    rows = [r for r in run_bench(cfg) if r["policy"] not in (bench.STOCK, bench.STOCK_EAGER)]
    assert {r["policy"] for r in rows} == {benchrows.RESIDENT, "on_demand_lru"}
    assert all(r["compiled_segments"] is True and r["compile_reason"] is None for r in rows)
    assert rows[0]["compiles"] > 0  # the first engine compiled; later ones of the same shapes reuse its code
    torch._dynamo.reset()


def test_the_switch_interval_is_asked_for_on_the_command_line_and_reaches_every_engine(tmp_path, monkeypatch):
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert parser.parse_args([]).switch_interval_s is None
    assert parser.parse_args(["--switch-interval-s", "1e-4"]).switch_interval_s == 1e-4
    import prescope.engine.engine as engine_module

    configs, make = [], engine_module.Engine

    def engine(model, config, **kw):
        configs.append(config)
        return make(model, config, **kw)

    monkeypatch.setattr(engine_module, "Engine", engine)  # run_bench imports it when it runs
    cfg = BenchConfig(models=("olmoe-1b-7b-tiny:2",), batch_sizes=(1,), policies=("on_demand_lru",), budgets=(0.5,),
                      input_len=4, output_len=3, timeline_tokens=0, warmup_tokens=2, device="cpu",
                      out=str(tmp_path), accelerate_batches=(), stock_implementations=("grouped_mm",),
                      switch_interval_s=1e-4)
    run_bench(cfg)
    assert configs and all(c.switch_interval_s == 1e-4 for c in configs)
