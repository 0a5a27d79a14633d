"""reports/h200/REPRODUCE.md names, for every committed H200 result, commands rebuilt from the file's own record."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest

from prescope.experiments import bench, reproduce
from prescope.files import read_json, write_json

ROOT = Path(__file__).resolve().parents[2]
H200 = ROOT / "reports" / "h200"


def test_the_committed_page_is_what_the_results_give(monkeypatch):
    monkeypatch.chdir(ROOT)  # the page names files relative to the repository's root
    assert (H200 / reproduce.PAGE).read_text() == reproduce.render(Path("reports/h200")), \
        "reports/h200/REPRODUCE.md is stale: run `python -m prescope.experiments.reproduce`"


def test_every_committed_result_has_its_commands(monkeypatch):
    monkeypatch.chdir(ROOT)
    page = (H200 / reproduce.PAGE).read_text()
    files = reproduce.result_files(Path("reports/h200"))
    assert len(files) >= 40 and any(f.parent.name == "engine" for f in files)
    for path in files:
        section = page.split(f"## `{path.relative_to('reports/h200').as_posix()}`", 1)
        assert len(section) == 2, f"{path} has no section"
        assert "```bash" in section[1].split("\n## ", 1)[0], f"{path} has no commands"


def _config(path: Path) -> dict:
    try:
        return read_json(path).get("config") or {}
    except ValueError:  # a JSON list of measurements, not a record
        return {}


@pytest.mark.parametrize("path", [p for p in reproduce.result_files(H200) if reproduce.is_bench_config(_config(p))],
                         ids=lambda p: p.name)
def test_each_bench_command_parses_back_into_its_recorded_config(path):
    data = read_json(path)
    config = data["config"]
    line = reproduce.bench_command(config, "/tmp/out")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(shlex.split(line)[2:])
    for key, _ in reproduce.BENCH_FLAGS:
        if config.get(key) is not None:
            value = getattr(args, key)
            assert (list(value) if isinstance(value, (list, tuple)) else value) == config[key], key
    if reproduce.router_inputs(config):  # a run on routing models reads its prompts and LLaPor from the folder
        assert args.inputs == reproduce.router_inputs(config)["inputs"] and not (args.prompts or args.predictor)
        return
    assert bool(args.prompts) == bool(config.get("prompts")) and bool(args.predictor) == bool(config.get("predictor"))
    if args.prompts:
        assert args.prompts == f"{reproduce.INPUTS}/heldout-{config['input_len']}.npy"


def test_a_trace_subject_is_rebuilt_with_a_routing_only_llapor_trained_on_its_trace():
    config = {"models": ["gpt-oss-120b:12@trace:T.route.csv.xz"], "batch_sizes": [1], "predictor": "/tmp/x.pt"}
    train, checkpoint = reproduce.trace_predictor_commands(config, "$OUT/r")
    assert train == ['prescope predictor-accuracy --trace T.route.csv.xz --layers 12 --out "$OUT/r-accuracy" '
                     '--save-predictor "$OUT/r-routing-llapor.pt"']
    bench = reproduce.bench_command(config, "$OUT/r", checkpoint)
    assert '--predictor "$OUT/r-routing-llapor.pt"' in bench and "llapor.pt --" not in bench.replace(checkpoint, "")
    assert reproduce.trace_predictor_commands({"models": ["olmoe-1b-7b"]}, "$OUT/r") == ([], None)


def test_a_run_on_routing_models_is_rebuilt_from_its_inputs_folder():
    """A bench with `--inputs` of `gpu-inputs --routers`: the recorded gpu-inputs command (into the recorded folder),
    then bench reading that folder; newer flags only where the run changed their default."""
    inputs = {"inputs": ".cache/device/inputs-routers-qwen3", "routers": {"qwen3-30b-a3b": {"llapor": {"48": "x"}}},
              "command": "prescope gpu-inputs --out /abs/elsewhere --routers qwen3-30b-a3b --routers-time-budget-s 90"}
    config = {"models": ["qwen3-30b-a3b@router"], "batch_sizes": [1, 4], "prompts": "/abs/heldout-128.npy",
              "input_len": 128, "stock_implementations": ["grouped_mm"], "deadline_s": 400.0, "extra": {"inputs": inputs}}
    assert reproduce.inputs_command(config) == [
        "prescope gpu-inputs --out .cache/device/inputs-routers-qwen3 --routers qwen3-30b-a3b --routers-time-budget-s 90"]
    line = reproduce.bench_command(config, "$OUT/r")
    assert "--inputs .cache/device/inputs-routers-qwen3" in line and "--prompts" not in line
    assert "--stock-implementations grouped_mm" in line and "--deadline-s 400.0" in line
    plain = reproduce.bench_command({"models": ["x"], "stock_implementations": list(bench.BenchConfig().stock_implementations),
                                     "deadline_s": 0.0}, "$OUT/r")
    assert "--stock-implementations" not in plain and "--deadline-s" not in plain
    assert reproduce.inputs_command({"models": ["x"]}) == []


def test_the_page_names_every_device_call_script(monkeypatch):
    monkeypatch.chdir(ROOT)
    page = (H200 / reproduce.PAGE).read_text()
    for script in H200.glob("*.sh"):
        assert f"reports/h200/{script.name}" in page


def test_only_bench_configs_get_a_bench_command_and_a_score_beside_a_manifest_gets_the_inputs_command(tmp_path):
    assert reproduce.is_bench_config({"models": ["olmoe-1b-7b", "mixtral-8x7b:16@router"]})
    assert not reproduce.is_bench_config({"models": [["olmoe-1b-7b", 16]]})  # the compile probe's (name, layers)
    assert not reproduce.is_bench_config({"models": []}) and not reproduce.is_bench_config(None)
    folder = tmp_path / "routers" / "x"
    folder.mkdir(parents=True)
    write_json(folder / "inputs-manifest.json", {"command": "prescope gpu-inputs --out D --routers x",
                                                 "git_revision": "abcdef0"})
    write_json(folder / "x-llapor-vs-gate-4.json", {"git_revision": "abcdef0", "gain_points_by_distance": {"1": 3.0}})
    what, commands, _ = reproduce.entry(folder / "x-llapor-vs-gate-4.json", tmp_path)
    assert "gpu-inputs" in what and commands == ["git checkout abcdef0", "prescope gpu-inputs --out D --routers x"]
