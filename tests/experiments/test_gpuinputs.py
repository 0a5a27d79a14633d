"""`prescope gpu-inputs` builds the folder a GPU run reads; `prescope bench --inputs` takes it, checked."""

from __future__ import annotations

import json
import shlex
import shutil

import numpy as np
import pytest

from prescope import cli
from prescope.experiments import bench, gpuinputs
from prescope.experiments.gpuinputs import InputsConfig, InputsError, read_inputs

SMALL = ["--input-len", "16", "--prompts-per-domain", "2", "--train-per-domain", "1", "--prompt-tokens", "8",
         "--max-new-tokens", "3", "--max-epochs", "1"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    """A folder built by the command with tiny parameters, and its JSON line."""
    root = tmp_path_factory.mktemp("inputs")
    out = root / "inputs"
    argv = ["gpu-inputs", "--out", str(out), *SMALL, "--cache-dir", str(root / "cache")]
    with pytest.MonkeyPatch.context() as mp:
        lines = []
        mp.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
        assert cli.main(argv) == 0
    return out, json.loads(lines[-1])


def test_the_folder_holds_prompts_predictor_and_a_manifest_that_rebuilds_it(built):
    from prescope.experiments.subjects import heldout_prompts
    from prescope.models.adapter import describe
    from prescope.models.tiny import load_tiny
    from prescope.predict import llapor

    out, record = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {"heldout-16.npy", "llapor.pt"} == set(record["files"])
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == gpuinputs.sha256(out / name) == record["files"][name]
    prompts = np.load(out / "heldout-16.npy")
    assert prompts.shape == (2 * 5, 16) and np.array_equal(prompts, heldout_prompts(16, 2))  # 5 corpus domains
    predictor = llapor.load(out / "llapor.pt")
    describe(load_tiny()[0]).check_compatible(predictor.layout, "predictor")
    assert manifest["files"]["llapor.pt"]["trace_hash"] == predictor.trace_info["hash"]
    # the recorded command parses back into the same configuration
    words = shlex.split(manifest["command"])
    assert words[:2] == ["prescope", "gpu-inputs"]
    args = cli.build_parser("gpu-inputs").parse_args(words[1:])
    parsed = InputsConfig(**{k: getattr(args, k) for k in InputsConfig.__dataclass_fields__})
    assert parsed.out == str(out) and parsed.input_len == 16 and parsed.max_epochs == 1
    assert {k: v for k, v in vars(parsed).items() if k not in ("out", "cache_dir")} == {
        k: v for k, v in manifest["config"].items() if k not in ("out", "cache_dir")}


def _bench_cfg(monkeypatch, *argv) -> bench.BenchConfig:
    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda cfg: seen.setdefault("cfg", cfg) and [{"model": "x"}])
    assert cli.main(["bench", "--device", "cpu", *argv]) == 0
    return seen.get("cfg")


def test_bench_reads_prompts_and_predictor_from_the_folder(built, monkeypatch, capsys):
    out, _ = built
    prompts, predictor, info = read_inputs(out, 16)
    assert prompts == str(out / "heldout-16.npy") and predictor == str(out / "llapor.pt")
    cfg = _bench_cfg(monkeypatch, "--inputs", str(out), "--input-len", "16", "--out", str(out.parent / "b"))
    assert cfg.prompts == prompts and cfg.predictor == predictor and cfg.extra["inputs"] == info
    assert info["sha256"]["llapor.pt"] == gpuinputs.sha256(out / "llapor.pt")
    assert cli.main(["bench", "--device", "cpu", "--inputs", str(out), "--prompts", "heldout"]) == 2
    assert "leave --prompts and --predictor out" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    ("no-folder", "no such folder"), ("no-manifest", "no manifest.json"), ("changed", "changed since"),
    ("missing", "llapor.pt is missing"), ("length", "holds prompts of \\[16\\] tokens, --input-len is 32"),
    ("manifest-edited", "manifest"),
])
def test_a_missing_changed_or_foreign_folder_is_one_clear_error(built, tmp_path, damage, message):
    out, _ = built
    folder = tmp_path / "copy"
    shutil.copytree(out, folder)
    input_len = 16
    if damage == "no-folder":
        shutil.rmtree(folder)
    elif damage == "no-manifest":
        (folder / "manifest.json").unlink()
    elif damage == "changed":
        with open(folder / "llapor.pt", "ab") as f:
            f.write(b"\0")
    elif damage == "missing":
        (folder / "llapor.pt").unlink()
    elif damage == "length":
        input_len = 32
    else:
        text = (folder / "manifest.json").read_text()
        (folder / "manifest.json").write_text(text.replace('"heldout-16.npy"', '"heldout-32.npy"', 1))
    with pytest.raises((InputsError, FileNotFoundError, ValueError), match=message):
        read_inputs(folder, input_len)


def test_bad_options_are_refused_before_work(tmp_path):
    with pytest.raises(InputsError, match="input_len must be >= 1"):
        InputsConfig(out=str(tmp_path), input_len=0)
    (tmp_path / "FILE").write_text("x")
    assert cli.main(["gpu-inputs", "--out", str(tmp_path / "FILE"), *SMALL]) == 2
