"""`gpu-inputs --routers` scores the routing models' LLaPor against gate lookahead on held-out text (routerscores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import save_router

from prescope import cli
from prescope.experiments import gpuinputs, routerscores
from prescope.timeline import host_device

CPU = host_device("cpu")

SMALL = ["--input-len", "6", "--prompts-per-domain", "1", "--train-per-domain", "3", "--prompt-tokens", "8",
         "--max-new-tokens", "4", "--max-epochs", "1", "--no-predictor", "--llapor-processes", "2",
         "--heldout-per-domain", "2"]


def build(root: Path, routers: str, *extra: str) -> tuple[Path, list[str]]:
    """A gpu-inputs folder of the cached tiny Mixtral routing model under `root`, and the lines the command printed."""
    if not (root / "cache" / "mixtral-8x7b").is_dir():
        save_router(root / "cache", "mixtral-8x7b")
    out, lines = root / f"inputs{len(extra)}", []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRESCOPE_ROUTERS", str(root / "cache"))
        mp.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
        assert cli.main(["gpu-inputs", "--out", str(out), *SMALL, "--cache-dir", str(root / "c"),
                         "--routers", routers, *extra]) == 0
    return out, lines


@pytest.fixture(scope="module")
def scored(tmp_path_factory, one_thread):
    """Two cut counts of the Mixtral routing model (4 and 8 of its 32 MoE layers): the deeper one is scored."""
    root = tmp_path_factory.mktemp("scores")
    out, lines = build(root, "mixtral-8x7b:4,mixtral-8x7b:8")
    return root, out, lines


def test_the_deepest_llapor_is_scored_into_a_file_the_manifest_records(scored):
    root, out, lines = scored
    manifest = json.loads((out / "manifest.json").read_text())
    file = "routers/mixtral-8x7b/llapor-vs-gate-8.json"
    assert not (out / "routers/mixtral-8x7b/llapor-vs-gate-4.json").exists()
    score = json.loads((out / file).read_text())
    assert score["source"] == "measured" and score["hardware"] == f"held-out trace on {CPU}, evaluation on {CPU}" and score["git_revision"]
    assert score["moe_layers"] == 8 and score["llapor_checkpoint"] == "routers/mixtral-8x7b/llapor-8.pt"
    assert score["config"]["heldout_per_domain"] == 2 and score["config"]["routers"] == "mixtral-8x7b:4,mixtral-8x7b:8"
    held = score["heldout"]
    assert held["prompts"] == 2 * len(held["domains"]) and held["tokens"] == held["prompts"] * (8 + 4 - 1)
    assert held["decode_tokens"] == held["prompts"] * 3  # the last new token is never fed back
    assert set(score["gain_points_by_distance"]) == {"1", "2", "3", "4"}
    assert set(score["mean_recall_at_k"]) == {"llapor", "gate_lookahead"}
    assert set(score["gain_points_by_group"]) and all(set(g) == {"llapor"} for g in score["gain_points_by_group"].values())
    far = [v for d, v in score["gain_points_by_distance"].items() if int(d) >= 2]
    assert score[routerscores.TARGET] == all(v >= 5 for v in far) == score["target"][routerscores.TARGET]
    record = manifest["files"][file]
    assert record["sha256"] == gpuinputs.sha256(out / file) and record["heldout_tokens"] == held["tokens"]
    entry = manifest["routers"]["mixtral-8x7b"]["llapor_vs_gate_lookahead"]
    assert entry["file"] == file and entry["gain_points_by_distance"] == score["gain_points_by_distance"]
    assert entry[routerscores.TARGET] == score[routerscores.TARGET]
    assert "--router-scores --heldout-per-domain 2" in manifest["command"]
    summary = [line for line in lines if line.startswith("mixtral-8x7b: LLaPor vs gate lookahead")]
    assert len(summary) == 1 and "8 MoE layers" in summary[0] and "d2 " in summary[0]


def test_the_gains_are_the_shared_evaluation_of_that_checkpoint_on_the_held_out_trace(scored, monkeypatch):
    """Recomputed with accuracy.score_llapor (what run_report reports) from the saved checkpoint, the routing
    model's own routers and the cached held-out trace: the file holds the same numbers."""
    from prescope.models import corpus, routers
    from prescope.predict import accuracy, llapor, predictors
    from prescope.predict.routellapor import cut_layers

    root, out, _ = scored
    monkeypatch.setenv("PRESCOPE_ROUTERS", str(root / "cache"))
    manifest = json.loads((out / "manifest.json").read_text())
    score = json.loads((out / "routers/mixtral-8x7b/llapor-vs-gate-8.json").read_text())
    model, tokenizer = routers.load_router("mixtral-8x7b")
    weights = manifest["routers"]["mixtral-8x7b"]["weights_sha256"]
    heldout, _ = accuracy.cached_trace(model, tokenizer, corpus.card_spec({}), "heldout", 2, 8, 4, 8,
                                       root / "c" / "routers" / "mixtral-8x7b", f"mixtral-8x7b:{weights}")
    assert heldout.meta["split"] == "heldout"
    cut = cut_layers(heldout, 8)
    linear = predictors.LinearRouters.from_model(model)
    lookahead = predictors.GateLookahead(predictors.LinearRouters(linear.weight[:8], None), cut.layout)
    predictor = llapor.load(out / "routers/mixtral-8x7b/llapor-8.pt")
    again = accuracy.score_llapor(predictor, lookahead, cut)
    assert json.loads(json.dumps(again["gain_points_by_distance"]["llapor"])) == score["gain_points_by_distance"]
    assert json.loads(json.dumps(again["gain_points_by_group"])) == score["gain_points_by_group"]
    assert json.loads(json.dumps(again["mean_recall_at_k"])) == score["mean_recall_at_k"]
    wide = accuracy.mean_by_distance(accuracy.evaluate({"llapor": predictor, "gate_lookahead": lookahead}, cut,
                                                       range(1, 5), batch_sizes=(), by_domain=False))
    assert score["gain_points_by_distance"]["2"] == pytest.approx(
        100 * (wide.loc["llapor", 2] - wide.loc["gate_lookahead", 2]), abs=0.01)


def test_bench_inputs_reads_a_scored_folder(scored, monkeypatch):
    root, out, _ = scored
    monkeypatch.setenv("PRESCOPE_ROUTERS", str(root / "cache"))
    _, _, info = gpuinputs.read_inputs(out, 6)  # every file's checksum, the score's included
    assert "routers/mixtral-8x7b/llapor-vs-gate-8.json" in info["sha256"]
    assert info["routers"]["mixtral-8x7b"]["llapor_vs_gate_lookahead"]["moe_layers"] == 8


def test_no_router_scores_records_and_writes_none(scored):
    root, _, _ = scored
    out, lines = build(root, "mixtral-8x7b:4", "--no-router-scores")
    manifest = json.loads((out / "manifest.json").read_text())
    assert not list(out.glob("routers/*/llapor-vs-gate-*.json")) and (out / "routers/mixtral-8x7b/llapor-4.pt").is_file()
    assert "llapor_vs_gate_lookahead" not in manifest["routers"]["mixtral-8x7b"]
    assert "--no-router-scores" in manifest["command"] and not any("gate lookahead on" in line for line in lines)


def test_the_summary_line_says_when_the_target_cannot_be_judged():
    entry = {"gain_points_by_distance": {"1": 2.5}, "heldout_tokens": 40, "moe_layers": 2, routerscores.TARGET: None}
    line = routerscores.summary_line("olmoe-1b-7b", entry)
    assert "d1 +2.5" in line and "not judged" in line
    with pytest.raises(gpuinputs.InputsError, match="heldout_per_domain must be >= 1"):
        gpuinputs.InputsConfig(out="x", heldout_per_domain=0)
