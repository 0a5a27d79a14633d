"""`prescope gpu-inputs --routers`: routing models and their LLaPor in the inputs folder; `bench --inputs` uses them."""

from __future__ import annotations

import json
import warnings

import pytest
from conftest import save_router

from prescope import cli
from prescope.experiments import gpuinputs, routerinputs
from prescope.experiments.gpuinputs import InputsError

SMALL = ["--input-len", "6", "--prompts-per-domain", "1", "--train-per-domain", "3", "--prompt-tokens", "8",
         "--max-new-tokens", "3", "--max-epochs", "1", "--no-predictor", "--llapor-processes", "2",
         "--heldout-per-domain", "1"]


def test_specs_name_twins_and_layer_counts():
    assert routerinputs.parse_specs("mixtral-8x7b:16, qwen3-30b-a3b,mixtral-8x7b") == {
        "mixtral-8x7b": [16, None], "qwen3-30b-a3b": [None]}
    assert set(routerinputs.parse_specs("all")) >= {"mixtral-8x7b", "deepseek-v2-lite", "qwen3-30b-a3b"}
    with pytest.raises(routerinputs.RouterInputsError, match="mixtral-8x7b has 32 decoder layers; LAYERS must be 1..32"):
        routerinputs.parse_specs("mixtral-8x7b:40")
    with pytest.raises(routerinputs.RouterInputsError, match="whole number"):
        routerinputs.parse_specs("mixtral-8x7b:x")
    with pytest.raises(ValueError, match="nope"):
        routerinputs.parse_specs("nope")


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    """An inputs folder with the (cached, tiny) Mixtral routing model's LLaPor for 4 and all 32 MoE layers, and an
    OLMoE routing model trained by the command (its training replaced by a tiny untrained model)."""
    root = tmp_path_factory.mktemp("routers")
    save_router(root / "cache", "mixtral-8x7b")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRESCOPE_ROUTERS", str(root / "cache"))
        trained = []

        def train_in_child(name, path, cfg, progress):
            trained.append((name, cfg.router_time_budget_s, cfg.device))
            save_router(path.parent, name)

        mp.setattr(routerinputs, "train_in_child", train_in_child)
        lines = []
        mp.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
        out = root / "inputs"
        argv = ["gpu-inputs", "--out", str(out), *SMALL, "--cache-dir", str(root / "c"),
                "--routers", "mixtral-8x7b:4,mixtral-8x7b,olmoe-1b-7b:2", "--router-time-budget-s", "30"]
        assert cli.main(argv) == 0
    return root, out, json.loads(lines[-1]), trained


def test_the_folder_records_each_routing_model_and_a_llapor_per_layer_count(built):
    from prescope.predict import llapor

    root, out, record, trained = built
    assert trained == [("olmoe-1b-7b", 30.0, "cpu")]  # the Mixtral one was in the cache, so only OLMoE's trained
    manifest = json.loads((out / "manifest.json").read_text())
    mixtral, olmoe = manifest["routers"]["mixtral-8x7b"], manifest["routers"]["olmoe-1b-7b"]
    assert mixtral["location"] == "cache" and not mixtral["trained_here"]
    assert mixtral["weights_sha256"] == gpuinputs.sha256(root / "cache" / "mixtral-8x7b" / "model.safetensors")
    assert mixtral["llapor"] == {"4": "routers/mixtral-8x7b/llapor-4.pt", "32": "routers/mixtral-8x7b/llapor-32.pt"}
    assert olmoe["location"] == "inputs" and olmoe["path"] == "routers/olmoe-1b-7b"
    assert "routers/olmoe-1b-7b/model.safetensors" in manifest["files"]  # trained here: its files are checksummed
    assert set(record["files"]) == set(manifest["files"]) and "llapor.pt" not in manifest["files"]
    for n, file in {**mixtral["llapor"], **olmoe["llapor"]}.items():
        predictor = llapor.load(out / file)
        assert predictor.layout.num_moe_layers == int(n) and predictor.layout.hidden_size == 16
        assert manifest["files"][file]["trace_hash"] == predictor.trace_info["hash"]
    assert "--routers mixtral-8x7b:4,mixtral-8x7b,olmoe-1b-7b:2" in manifest["command"]
    # each routing model's deepest LLaPor scored against gate lookahead: Mixtral's whole depth, OLMoE's only cut
    assert mixtral["llapor_vs_gate_lookahead"]["file"] == "routers/mixtral-8x7b/llapor-vs-gate-32.json"
    assert olmoe["llapor_vs_gate_lookahead"]["file"] == "routers/olmoe-1b-7b/llapor-vs-gate-2.json"
    assert set(olmoe["llapor_vs_gate_lookahead"]["gain_points_by_distance"]) == {"1"}  # 2 layers: distance 1 only
    assert olmoe["llapor_vs_gate_lookahead"]["llapor_gain_at_least_5_points_from_distance_2"] is None
    assert {"routers/mixtral-8x7b/llapor-vs-gate-32.json", "routers/olmoe-1b-7b/llapor-vs-gate-2.json"} <= set(
        manifest["files"]) and not (out / "routers/mixtral-8x7b/llapor-vs-gate-4.json").exists()


def test_bench_finds_the_routing_model_and_its_llapor_and_refuses_a_changed_one(built, monkeypatch, tmp_path):
    from prescope.experiments.bench import BenchConfig, run_bench

    root, out, _, _ = built
    monkeypatch.setenv("PRESCOPE_ROUTERS", str(root / "cache"))
    prompts, predictor, info = gpuinputs.read_inputs(out, 6)
    assert predictor is None and set(info["routers"]) == {"mixtral-8x7b", "olmoe-1b-7b"}
    found = routerinputs.lookup(info, "mixtral-8x7b")
    assert found.path == root / "cache" / "mixtral-8x7b" and set(found.llapor) == {4, 32}
    assert routerinputs.lookup(info, "qwen3-30b-a3b") is None and routerinputs.lookup(None, "mixtral-8x7b") is None
    cfg = BenchConfig(models=("mixtral-8x7b-tiny:4@router",), batch_sizes=(2,), policies=("on_demand_lru", "prescope"),
                      budgets=(0.5,), input_len=6, output_len=3, timeline_tokens=0, warmup_tokens=1, device="cpu",
                      out=str(tmp_path / "b"), prompts=prompts, accelerate_batches=(), extra={"inputs": info})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = run_bench(cfg)
    by = {r["policy"]: r for r in rows}
    assert by["prescope"]["predictor"] == "llapor" and by["prescope"]["moe_layers"] == 4
    assert by["prescope"]["routing"] == "replayed from router"
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())["config"]["extra"]["inputs"]["routers"]
    assert saved["mixtral-8x7b"]["llapor"]["4"] == "routers/mixtral-8x7b/llapor-4.pt"
    save_router(root / "other", "mixtral-8x7b", hidden=32)  # another model where the recorded one was
    monkeypatch.setenv("PRESCOPE_ROUTERS", str(root / "other"))
    with pytest.raises(routerinputs.RouterInputsError, match="another mixtral-8x7b routing model"):
        routerinputs.lookup(info, "mixtral-8x7b")


def test_bad_router_options_are_refused_before_anything_is_built(tmp_path, capsys):
    assert cli.main(["gpu-inputs", "--out", str(tmp_path / "i"), "--routers", "mixtral-8x7b:99"]) == 2
    assert "LAYERS must be 1..32" in capsys.readouterr().err and not (tmp_path / "i").exists()
    with pytest.raises(InputsError, match="router_time_budget_s and llapor_processes must be >= 0"):
        gpuinputs.InputsConfig(out="x", llapor_processes=-1)


@pytest.mark.parametrize("subject, model, routers", [("mixtral", "mixtral-8x7b:16@router", "mixtral-8x7b:16"),
                                                     ("qwen3", "qwen3-30b-a3b@router", "qwen3-30b-a3b")])
def test_the_comparison_script_runs_gpu_inputs_then_bench_with_options_the_commands_take(subject, model, routers,
                                                                                         tmp_path):
    """reports/h200/comparison-routers.sh with a stand-in python3 that records its arguments: both command lines parse
    with prescope's own parsers, name this subject, and the call's files land in $OUT."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from prescope.experiments.bench import BenchConfig
    from prescope.policies import parse_policy

    root = Path(__file__).resolve().parents[2]
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\n" + """import json, os, sys
from pathlib import Path
argv = sys.argv[3:]  # after -m prescope.cli
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
out = Path(argv[argv.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
(out / ("manifest.json" if argv[0] == "gpu-inputs" else "bench.json")).write_text("{}")
if argv[0] == "gpu-inputs":
    (out / "routers" / "twin").mkdir(parents=True)
    (out / "routers" / "twin" / "llapor-vs-gate-4.json").write_text("{}")
""")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "log"),
           "OUT": str(tmp_path / "out"), "INPUTS": str(tmp_path / "inputs")}
    done = subprocess.run(["bash", str(root / "reports/h200/comparison-routers.sh"), subject], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert [c[0] for c in calls] == ["gpu-inputs", "bench"]
    inputs = cli.build_parser("gpu-inputs").parse_args(calls[0])
    assert inputs.routers == routers and inputs.device == "cuda" and not inputs.predictor
    routerinputs.parse_specs(inputs.routers)
    args = cli.build_parser("bench").parse_args(calls[1])
    assert args.models == [model] and args.inputs == str(tmp_path / "inputs") and 0 < args.deadline_s < 540
    assert args.batch_sizes == [1, 4, 16] and args.budgets == [0.25] and args.stock_implementations == [
        "grouped_mm", "batched_mm"] and args.accelerate_batches == []
    assert "prescope[gate=False]" in args.policies and len(args.policies) == 9
    for name in args.policies:
        parse_policy(name)
    BenchConfig(models=tuple(args.models), policies=tuple(args.policies), deadline_s=args.deadline_s)
    assert (tmp_path / "out" / f"routers-{subject}" / "inputs-manifest.json").is_file()
    assert (tmp_path / "out" / f"routers-{subject}" / "twin-llapor-vs-gate-4.json").is_file()  # the router's score
    assert args.switch_interval_s is None  # Python's own unless SWITCH_S says otherwise
    again = subprocess.run(["bash", str(root / "reports/h200/comparison-routers.sh"), subject], cwd=tmp_path,
                           env={**env, "SWITCH_S": "1e-4", "RUN_NAME": "switch"}, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr
    last = json.loads((tmp_path / "log").read_text().splitlines()[-1])  # the inputs are built: bench alone
    args = cli.build_parser("bench").parse_args(last)
    assert args.switch_interval_s == 1e-4 and args.out == str(tmp_path / "out" / "switch")
    bad = subprocess.run(["bash", str(root / "reports/h200/comparison-routers.sh"), "olmoe"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_a_routing_model_trains_in_a_child_interpreter_and_its_failure_is_a_clear_error(tmp_path, monkeypatch):
    """The parent never runs autograd (LLaPor's forked workers could not use it after): the routing model is
    trained by `prescope train-tiny --like` in a child; a child that fails or writes no model is an error."""
    from types import SimpleNamespace

    calls = []

    def run(command, check):
        calls.append(command)
        return SimpleNamespace(returncode=calls[-1][-1] == "--no-progress" and 0 or 1)

    monkeypatch.setattr(routerinputs.subprocess, "run", run)
    cfg = SimpleNamespace(device="cuda", router_time_budget_s=75.0, cache_dir=str(tmp_path))
    with pytest.raises(routerinputs.RouterInputsError, match="olmoe-1b-7b's routing model failed"):
        routerinputs.train_in_child("olmoe-1b-7b", tmp_path / "olmoe-1b-7b", cfg, progress=False)  # no model written
    assert calls[0][1:] == ["-m", "prescope.cli", "train-tiny", "--like", "olmoe-1b-7b", "--out",
                            str(tmp_path / "olmoe-1b-7b"), "--device", "cuda", "--time-budget-s", "75.0",
                            "--no-progress"]
