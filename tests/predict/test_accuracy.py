"""Accuracy metrics hand-checked on tiny examples; tidy tables, the layer-group effect and overhead."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from prescope.layout import ModelLayout
from prescope.predict import accuracy as A
from prescope.predict import predictors as P
from prescope.predict.llapor import LLaPorConfig
from prescope.routing.trace import MISSING, Trace
from prescope.workbench.viz import accuracy_heatmap

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def toy() -> Trace:
    """One prompt of four tokens (E=4, K=2, L=3); layer l+1 = layer l + 1 mod 4; two decode steps of 1 token."""
    layer0 = np.array([[0, 1], [0, 2], [0, 1], [3, 2]])
    experts = np.stack([layer0, (layer0 + 1) % 4, (layer0 + 2) % 4], axis=1)  # [T, L, K]
    weights = np.tile(np.array([[0.75, 0.25]], dtype=np.float32), (4, 3, 1))
    tokens = pd.DataFrame({"prompt": 0, "row": 0, "position": range(4), "step": [0, 0, 1, 2],
                           "phase": ["prefill", "prefill", "decode", "decode"], "domain": "c4"})
    layout = ModelLayout("Toy", "toy", 3, (0, 1, 2), (), 4, 2, 4, 8, "float32", 96)
    return Trace(layout, tokens, experts, weights)


def test_recall_and_exact_match_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.9, 0.8, 0.0], [0.1, 0.2, 0.3, 0.4]])
    truth = torch.tensor([[0, 1], [0, 1], [3, MISSING]])
    assert A.recall_at(scores, truth, 2).tolist() == [1.0, 0.5, 1.0]  # row 2: one true expert, found
    assert A.exact_match(scores, truth).tolist() == [1.0, 0.0, 1.0]
    assert A.recall_at(scores, truth, 3).tolist() == [1.0, 1.0, 1.0]  # row 1's top-3 {1, 2, 0} holds expert 0


def test_count_error_by_hand():
    # Two tokens in one batch, K=1, E=3. Truth: expert 0 and expert 1, one token each: counts [1, 1, 0].
    scores = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    truth = torch.tensor([[0], [1]])
    # expected tokens: token 0 -> [1, 0, 0]; token 1 -> [0.5, 0.5, 0]; sum [1.5, 0.5, 0]; |diff| = 0.5 + 0.5 = 1
    assert A.count_error(scores, truth, np.array([0, 0])) == pytest.approx(1.0 / 2)
    # one token per batch: errors 0 and 1 (|0.5-0|+|0.5-1|), mean 0.5
    assert A.count_error(scores, truth, np.array([0, 1])) == pytest.approx(0.5)


def test_batch_ids_group_tokens_of_one_step():
    tokens = pd.DataFrame({"prompt": [0, 1, 2, 0, 1, 2], "row": [0, 1, 2, 0, 1, 2], "position": [5, 5, 5, 6, 6, 6],
                           "step": [1, 1, 1, 2, 2, 2], "phase": "decode", "domain": "c4"})
    trace = Trace(ModelLayout("Toy", "toy", 1, (0,), (), 4, 1, 4, 8, "float32", 96), tokens,
                  np.zeros((6, 1, 1), dtype=np.int64), np.ones((6, 1, 1), dtype=np.float32))
    assert A.batch_ids(trace, np.arange(6), 2).tolist() == [0, 0, 1, 2, 2, 3]
    assert A.batch_ids(trace, np.arange(6), 8).tolist() == [0, 0, 0, 1, 1, 1]


def test_evaluate_tidy_table(toy):
    preds = {"oracle": P.Oracle().fit(toy), "previous_token": P.PreviousToken().fit(toy)}
    table = A.evaluate(preds, toy, (1, 2), batch_sizes=(1,))
    assert list(table.columns) == ["predictor", "layer", "distance", "domain", "metric", "value", "tokens"]
    assert set(zip(table["layer"], table["distance"], strict=True)) == {(0, 1), (0, 2), (1, 1)}
    prev = table[(table["predictor"] == "previous_token") & (table["metric"] == "recall_at_k")]
    # decode tokens 2 and 3: layer-1 truth {1,2} and {0,3}; their predecessors chose {1,3} and {1,2}: 1/2 and 0
    assert prev.set_index(["layer", "distance"]).loc[(0, 1), "value"] == pytest.approx(0.25)
    wide = A.heatmap_table(table)
    assert {"recall_at_k", "exact_match", "recall_at_2k", "count_error_b1"} <= set(wide.columns)
    assert len(accuracy_heatmap(wide).data) == 2
    means = A.mean_by_distance(table)
    assert means.loc["oracle"].tolist() == [1.0, 1.0]


def test_group_effect_by_hand():
    rows = [("gate_lookahead", layer, 0.5) for layer in range(4)] + [("llapor", 0, 0.6), ("llapor", 1, 0.7),
                                                                      ("llapor", 2, 0.5), ("llapor", 3, 0.8)]
    df = pd.DataFrame([{"predictor": p, "layer": layer, "distance": 1, "domain": "all", "metric": "recall_at_k",
                        "value": v, "tokens": 10} for p, layer, v in rows])
    effect = A.group_effect(df, (1, 3)).set_index(["group", "predictor"])
    assert effect.loc[("near_input", "llapor"), "gain_points"] == pytest.approx(10)
    assert effect.loc[("middle", "llapor"), "value"] == pytest.approx(0.6)
    assert effect.loc[("middle", "llapor"), "gain_points"] == pytest.approx(10)
    assert effect.loc[("near_output", "gate_lookahead"), "gain_points"] == 0


def test_versus_lookahead_by_hand():
    """Gains in points by distance (source layers weigh the same), the 5-point target from distance 2, and no
    verdict where the table holds no distance >= 2."""
    values = {("gate_lookahead", 1): (0.5, 0.5), ("llapor", 1): (0.6, 0.5), ("gate_lookahead", 2): (0.4, 0.2),
              ("llapor", 2): (0.5, 0.2), ("popularity", 1): (0.1, 0.1)}  # (layer 0, layer 1)
    df = pd.DataFrame([{"predictor": p, "layer": layer, "distance": d, "domain": "all", "metric": "recall_at_k",
                        "value": v[layer], "tokens": 10} for (p, d), v in values.items() for layer in (0, 1)])
    versus = A.versus_lookahead(df, (1, 2))
    assert versus["gain_points_by_distance"] == {"llapor": {1: 5.0, 2: 5.0}}  # popularity is not a learned predictor
    assert versus["mean_recall_at_k"]["gate_lookahead"] == {1: 0.5, 2: 0.3}
    assert versus["target"] == {"llapor_beats_gate_lookahead_at_every_distance": True,
                                "llapor_gain_at_least_5_points_from_distance_2": True}
    assert versus["gain_points_by_group"]["near_input"]["llapor"] == {1: 10.0, 2: 10.0}  # layer 0 only
    near = A.versus_lookahead(df[df["distance"] == 1], (1, 2))["target"]
    assert near == {"llapor_beats_gate_lookahead_at_every_distance": True,
                    "llapor_gain_at_least_5_points_from_distance_2": None}
    cell = (df["predictor"] == "llapor") & (df["distance"] == 2) & (df["layer"] == 0)
    below = A.versus_lookahead(df.assign(value=np.where(cell, 0.44, df["value"])), (1, 2))  # 2 points at d2
    assert below["gain_points_by_distance"]["llapor"][2] == 2.0
    assert below["target"]["llapor_gain_at_least_5_points_from_distance_2"] is False


def test_overhead_is_measured(toy):
    cost = A.overhead({"popularity": P.Popularity().fit(toy)}, toy, (1,), repeats=3)
    assert cost.loc[0, "us_per_layer_step"] > 0 and cost.loc[0, "layers"] == 2


def test_evaluate_rejects_bad_input(toy):
    with pytest.raises(P.PredictorError, match="need hidden states"):
        A.evaluate({"g": P.GateLookahead()}, toy, (1,))
    with pytest.raises(P.PredictorError, match="no decode tokens"):
        A.evaluate({"o": P.Oracle().fit(toy)}, toy.select((toy.tokens["phase"] == "prefill").to_numpy()), (1,))


@pytest.mark.slow
def test_run_report_end_to_end(tmp_path, shipped_data):
    """The reports/llapor pipeline at toy sizes on prescope-tiny: traces, training, tables, summary."""
    config = LLaPorConfig(distance=2, pca_dim=8, width=16, max_epochs=1, calibrate_steps=2, min_group_layers=1)
    summary = A.run_report(tmp_path / "out", tmp_path / "cache", corpus_dir=shipped_data / "corpus",
                           train_per_domain=2, heldout_per_domain=1, prompt_tokens=8, max_new_tokens=3,
                           batch_size=5, config=config, variants=False, progress=False)
    assert summary["source"] == "measured" and summary["hardware"] == "cpu"
    assert summary["mean_recall_at_k"]["oracle"] == {0: 1.0, 1: 1.0, 2: 1.0}
    assert set(summary["mean_recall_at_k"]) >= {"llapor", "gate_lookahead", "previous_token", "popularity",
                                                 "activation_matrix"}
    tables = {"accuracy.csv", "accuracy_all_tokens.csv", "groups.csv", "group_effect.csv", "overhead.csv", "training.csv"}
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "summary.json", *tables, *(f"{t}.sha256" for t in tables)}  # each table's checksum beside it
