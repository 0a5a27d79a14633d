"""`prescope train-tiny --like NAME`: a routing model trains, and its card is computed from the model."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from prescope.cli import main
from prescope.experiments import routermodels
from prescope.models import routers, tinytrain
from prescope.models.tinytrain import TinyConfig

FAST = TinyConfig(steps=3, batch_size=2, seq_len=32, warmup_steps=1, lr=3e-3)


@pytest.mark.parametrize("name", ["deepseek-v2-lite", "gpt-oss-20b"])
def test_a_few_training_steps_reduce_the_loss(name):
    """DeepSeek-V2 has no auxiliary loss of its own (the generic one runs); gpt-oss has router and expert biases."""
    torch.manual_seed(0)
    model = routers.build_router_model(name, hidden=16, expert=8, num_layers=3)
    stream = np.tile(np.arange(40, dtype=np.uint16), 100)  # a pattern the model can learn in a few steps
    result = tinytrain.train(model, stream, TinyConfig(steps=8, batch_size=2, seq_len=16, warmup_steps=1, lr=2e-2),
                             progress=False, log_every=0)
    assert np.mean(result.losses[-3:]) < result.losses[0] - 0.5


def test_the_generic_balance_loss_is_k_for_uniform_routing_and_grows_with_imbalance():
    logits = torch.zeros(6, 4)  # [N, E] uniform router probabilities
    balanced = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3], [0, 2], [1, 3]])  # [N, K], each expert 3 times
    skewed = torch.tensor([[0, 1]] * 6)
    assert tinytrain.balance_loss([(logits, balanced)]).item() == pytest.approx(2.0)  # K
    peaked = torch.tensor([[4.0, 4.0, 0.0, 0.0]] * 6)
    assert tinytrain.balance_loss([(peaked, skewed)]).item() > 3.5


def test_train_router_writes_a_model_and_a_card_measured_from_it(tmp_path):
    out = tmp_path / "olmoe-1b-7b"
    card = routermodels.train_router("olmoe-1b-7b", out, FAST, device="cpu", data_dir=tmp_path / "data", hidden=16,
                                     expert=8, eval_tokens=64, valid_every=3, progress=False,
                                     card_prompts=dict(prompts_per_domain=1, prompt_tokens=12, max_new_tokens=3))
    assert card["structure"] == card["twin_structure"] and card["structure"]["num_experts"] == 64
    assert card["architecture"]["hidden_size"] == 16 and card["source"] == "measured"
    assert card["bytes"] == (out / "model.safetensors").stat().st_size
    heldout = {r["domain"]: r for r in card["heldout"]}
    assert len(heldout) == 5 and all(r["loss"] > 0 and r["random_loss"] > 0 for r in heldout.values())
    traces = card["routing"]["traces"]
    assert set(traces) == {"trained", "random init", "OLMoE-1B-7B (published aggregates)"}
    assert traces["trained"]["random_reuse"] == 8 / 64 and 0 <= traces["trained"]["lag1_reuse"] <= 1
    assert card["routing"]["trained_vs_random"]["lag1_reuse"][0] == round(traces["trained"]["lag1_reuse"], 4)
    assert "--like olmoe-1b-7b" in card["command"] and "--steps 3" in card["command"]
    assert "## Routing statistics" in (out / "README.md").read_text()


def test_without_like_the_command_is_prescope_tinys(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(routermodels.tiny, "run", lambda args: seen.setdefault("args", args) and 0)
    assert main(["train-tiny", "--out", str(tmp_path / "t"), "--prepare-only"]) == 0
    assert seen["args"].like is None and seen["args"].steps == TinyConfig().steps


def test_like_takes_the_routing_defaults_unless_a_flag_is_given():
    args = argparse.Namespace(**{f: getattr(TinyConfig(), f) for f in TinyConfig.__dataclass_fields__})
    assert routermodels.router_training(args).steps == routermodels.ROUTER_TRAINING["steps"]
    args.steps = 50
    assert routermodels.router_training(args).steps == 50


def test_an_unknown_twin_is_a_one_line_error(tmp_path, capsys):
    assert main(["train-tiny", "--like", "gpt-5", "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "unknown twin 'gpt-5'" in capsys.readouterr().err


def test_like_all_trains_the_missing_ones_into_one_folder_and_measures_llapor_where_missing(tmp_path, monkeypatch):
    from prescope.files import write_json
    from prescope.models import twins

    card = {"params": {"total": 1}, "bytes": 2, "training": {"wall_s": 3.0},
            "routing": {"trained_vs_random": {"lag1_reuse": [0.5, 0.9]}}}
    write_json(tmp_path / "mixtral-8x7b" / "model_card.json", {**card, "llapor_vs_gate_lookahead": {}})
    trained, measured = [], []
    monkeypatch.setattr(routermodels, "train_router", lambda name, out, config, **kw: trained.append(
        (name, out, kw["data_dir"], config.steps)) or card)
    monkeypatch.setattr(routermodels, "add_llapor", lambda out, cache_dir, progress, device: measured.append(
        (out.name, device)) or card)
    argv = ["train-tiny", "--like", "all", "--out", str(tmp_path), "--device", "cpu", "--llapor"]
    assert main(argv) == 0
    assert [t[0] for t in trained] == [n for n in twins.list_twins() if n != "mixtral-8x7b"]
    assert all(out == tmp_path / name and data == tmp_path / "data" and steps == 400 for name, out, data, steps in trained)
    assert measured == [(t[0], "cpu") for t in trained]  # mixtral-8x7b's card already holds its LLaPor section


def test_the_llapor_section_of_the_card_comes_from_the_report(tmp_path, monkeypatch):
    from prescope.files import write_json

    summary = {"gain_over_gate_lookahead_points": {"llapor": {1: 2.0, 2: 6.0}},
               "group_effect_gain_points": {"middle": {"llapor": {1: 1.0}}}, "mean_recall_at_k": {"llapor": {1: 0.5}},
               "boundaries": [2, 5], "target": {"llapor_gain_at_least_5_points_from_distance_2": True},
               "traces": {"heldout": {"tokens": 99}}, "source": "measured", "hardware": "cpu", "git_revision": "abc",
               "timings": {"train_llapor_s": 1.0}}
    monkeypatch.setattr("prescope.predict.accuracy.run_report", lambda *a, **kw: summary)
    card = {"name": "x routing model", "like": "x", "hub_id": "h", "structure": {"a": 1}, "twin_structure": {"a": 1},
            "architecture": {}, "params": {"total": 1, "experts": 0}, "bytes": 0, "training": {}, "heldout": [],
            "routing": {"traces": {"trained": {"lag1_reuse": 0.5}}, "prompts": 1, "prompt_tokens": 2,
                        "max_new_tokens": 3}, "command": "c"}
    write_json(tmp_path / "model_card.json", card)
    out = routermodels.add_llapor(tmp_path, tmp_path / "cache", progress=False)
    section = out["llapor_vs_gate_lookahead"]
    assert section["gain_points_by_distance"] == {"1": 2.0, "2": 6.0} and section["target_5_points_from_distance_2"]
    assert "≥ 5 points from distance 2: True" in (tmp_path / "README.md").read_text()
