"""`prescope check-equivalence` on a user's model: a checkpoint folder, or a hub id already cached; never the net."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_model

from prescope import cli
from prescope.experiments.equivalence import is_twin_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Qwen3-MoE checkpoint saved for training (router logits on), as a user would bring one."""
    path = tmp_path_factory.mktemp("user") / "my-moe"
    model = tiny_model("qwen3_moe")
    model.config.output_router_logits = True
    model.save_pretrained(path)
    return path


def _check(capsys, models, out) -> tuple[int, dict | None, str]:
    code = cli.main(["check-equivalence", "--models", *models, "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]) if code == 0 else None, captured.err.strip()


def test_a_checkpoint_folder_is_checked_like_a_twin(checkpoint, tmp_path, capsys, monkeypatch, one_thread):
    from prescope.experiments import equivalence
    from prescope.policies import POLICIES

    monkeypatch.setattr(equivalence, "POLICIES", {n: POLICIES[n] for n in ("on_demand_lru", "hybrid", "prescope")})
    code, record, _ = _check(capsys, [str(checkpoint)], tmp_path / "e.json")
    assert code == 0 and record["engine_runs_agree"]
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {str(checkpoint)} and len(rows) == 3 * 3
    assert all(r["tokens_equal_stock"] for r in rows) and max(r["max_logit_diff_vs_stock"] for r in rows) < 1e-4


PROBE = """
import sys, torch
from prescope.experiments.equivalence import load_subject
for model_id in sys.argv[1:]:
    try:
        model = load_subject(model_id, torch.device("cpu"))
        print(model_id, "loaded", type(model).__name__, model.config.output_router_logits)
    except ValueError as exc:
        print(model_id, "refused", exc)
"""


def test_a_hub_id_is_read_from_the_local_cache_only(checkpoint, tmp_path):
    """In a fresh process (the hub's cache folder is fixed at import), offline: an id not cached is refused in one
    clear line; one in the cache loads (router logits off), as `check-equivalence --models ID` then checks it."""
    repo, revision = tmp_path / "hf" / "hub" / "models--someone--cached-moe", "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(checkpoint, repo / "snapshots" / revision)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", PROBE, "someone/unseen-moe", "someone/cached-moe"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("someone/unseen-moe refused") and "not a hub id in the local Hugging Face cache" in lines[0]
    assert lines[1] == "someone/cached-moe loaded Qwen3MoeForCausalLM False"


def test_unknown_names_and_folders_without_a_model_are_one_line(tmp_path, capsys):
    assert is_twin_spec("olmoe-1b-7b:4") and is_twin_spec("mixtral-8x7b-tiny:2") and not is_twin_spec("my-moe")
    (tmp_path / "empty").mkdir()
    for spec, message in (("not-a-twin", "not a model prescope builds"), (str(tmp_path / "empty"), "without config.json")):
        code, _, err = _check(capsys, [spec], tmp_path / "e.json")
        assert code == 2 and message in err and len(err.splitlines()) == 1
