"""Routing statistics: hand-checked values on a small synthetic trace, and the published real-trace figures."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from prescope.layout import ModelLayout
from prescope.routing import stats as rs
from prescope.routing.llamacpp import load_llamacpp_trace
from prescope.routing.trace import Trace


def _layout(num_layers: int, num_experts: int, top_k: int) -> ModelLayout:
    return ModelLayout("Toy", "toy", num_layers, tuple(range(num_layers)), (), num_experts, top_k, 4, 8,
                       "float32", 96)


@pytest.fixture
def toy() -> Trace:
    """One prompt of four tokens (two prefill, two decode), E=4, K=2, two layers; layer 1 = layer 0 + 1 mod 4."""
    layer0 = np.array([[0, 1], [0, 2], [0, 1], [3, 2]])
    experts = np.stack([layer0, (layer0 + 1) % 4], axis=1)  # [T, L, K]
    weights = np.tile(np.array([[0.75, 0.25]], dtype=np.float32), (4, 2, 1))
    tokens = pd.DataFrame({"prompt": 0, "row": 0, "position": range(4), "step": [0, 0, 1, 2],
                           "phase": ["prefill", "prefill", "decode", "decode"], "domain": "wikipedia"})
    return Trace(_layout(2, 4, 2), tokens, experts, weights)


def test_load_skew_by_hand(toy):
    skew = rs.load_skew(toy)
    # layer 0 counts: expert 0 three times, 1 twice, 2 twice, 3 once (8 selections, 4 tokens)
    p = np.array([3, 2, 2, 1]) / 8
    assert skew.loc[0, "entropy_norm"] == pytest.approx(-(p * np.log(p)).sum() / math.log(4))
    assert skew.loc[0, "entropy_norm"] == pytest.approx(0.95282, abs=1e-5)
    assert skew.loc[0, "max_over_mean"] == pytest.approx(3 / 2)
    assert list(skew["tokens"]) == [4, 4] and list(skew["selections"]) == [8, 8]
    assert rs.count_skew([5, 0, 0, 0]) == {"entropy_norm": 0.0, "max_over_mean": 4.0}
    assert rs.count_skew([2, 2, 2, 2])["entropy_norm"] == pytest.approx(1.0)
    load = rs.expert_load(toy).query("layer == 0")
    assert list(load["count"]) == [3, 2, 2, 1] and list(load["share"]) == [3 / 8, 2 / 8, 2 / 8, 1 / 8]
    assert skew.attrs["model"] == "Toy"


def test_temporal_reuse_by_hand(toy):
    every = rs.temporal_reuse(toy, lags=(1, 2), decode_only=False).set_index(["layer", "lag"])
    # lag 1: {0,2}&{0,1} -> 1, {0,1}&{0,2} -> 1, {3,2}&{0,1} -> 0: (1 + 1 + 0) / (3 pairs * K=2)
    assert every.loc[(0, 1), "reuse"] == pytest.approx(2 / 6) and every.loc[(0, 1), "pairs"] == 3
    # lag 2: {0,1}&{0,1} -> 2, {3,2}&{0,2} -> 1
    assert every.loc[(0, 2), "reuse"] == pytest.approx(3 / 4)
    assert every.loc[(1, 1), "reuse"] == every.loc[(0, 1), "reuse"]  # a relabelling keeps reuse
    decode = rs.temporal_reuse(toy, lags=(1,)).set_index("layer")
    assert decode.loc[0, "pairs"] == 1 and decode.loc[0, "reuse"] == 0.0  # only (token 3, token 2)
    assert decode.loc[0, "random"] == pytest.approx(2 / 4)
    pooled = rs.reuse_by_lag(toy, lags=(1,), decode_only=False)
    assert pooled.loc[0, "reuse"] == pytest.approx(4 / 12)


def test_cross_layer_by_hand(toy):
    table = rs.cross_layer(toy, pairing="rank")
    assert table.loc[0, "nmi"] == pytest.approx(1.0)  # layer 1 is a function of layer 0
    counts = rs.pair_counts(toy, 0, 1, pairing="all")
    assert counts.sum() == 4 * 2 * 2 and counts[0, 1] == 3 and counts[0, 2] == 2  # tokens 0, 1, 2 vs 0, 2
    assert rs.pair_nmi(np.eye(4)) == pytest.approx(1.0)
    assert rs.pair_nmi(np.ones((4, 4))) == pytest.approx(0.0)
    lift = rs.pair_lift(np.array([[2, 0], [0, 2]]))
    assert list(lift["lift"]) == [2.0, 2.0] and set(zip(lift["expert_a"], lift["expert_b"], strict=True)) == {(0, 0), (1, 1)}
    with pytest.raises(ValueError, match="pairing"):
        rs.pair_counts(toy, 0, 1, pairing="diagonal")


def test_gate_weights_by_hand(toy):
    g = rs.gate_weights(toy).set_index("layer")
    ent = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert g.loc[0, "top1_weight"] == pytest.approx(0.75) and g.loc[0, "weight_sum"] == pytest.approx(1.0)
    assert g.loc[0, "weight_entropy"] == pytest.approx(ent)
    assert g.loc[0, "weight_entropy_norm"] == pytest.approx(ent / math.log(2))  # 0.811


def test_summary_has_one_row_per_layer(toy):
    s = rs.routing_summary(toy)
    assert list(s["layer"]) == [0, 1] and s["nmi_next"].isna().tolist() == [False, True]


@pytest.mark.parametrize("name, published", [("qwen3-30b-a3b", 0.380), ("gpt-oss-120b", 0.179)])
def test_real_lag1_decode_reuse_matches_published(shipped_data, name, published):
    tr = load_llamacpp_trace(shipped_data / "routing" / f"{name}.route.csv")
    row = rs.reuse_by_lag(tr, lags=(1,)).iloc[0]
    assert round(row["reuse"], 3) == published
    assert round(row["random"], 3) == {"qwen3-30b-a3b": 0.047, "gpt-oss-120b": 0.016}[name]  # README's K/E
    by_lag = rs.reuse_by_lag(tr)
    assert list(by_lag["lag"]) == list(range(1, 9)) and (by_lag["reuse"] > 2 * by_lag["random"]).all()


def test_aggregates_table(shipped_data, toy):
    path = shipped_data / "routing" / "olmoe-mixtral-routing-aggregates.json"
    ref = rs.aggregate_skew(path)
    assert set(ref["domain"]) == {"arxiv", "book", "c4", "github", "wikipedia", "tulu"}
    assert (ref.loc[ref["domain"] != "tulu", "tokens"] == 208896).all()  # README: about 209K tokens per domain
    table = rs.compare_with_aggregates(toy, path)
    mine = table[table["source"] == "trace"]
    assert list(mine["ref_layer"]) == [0, 7, 15] and list(mine["layer"]) == [0, 0, 1]  # round(7/15 * 1) = 0
    assert mine.iloc[0]["entropy_norm"] == pytest.approx(rs.load_skew(toy).loc[0, "entropy_norm"])
    code = Trace(toy.layout, toy.tokens.assign(domain="github_oss_with_stack"), toy.experts, toy.weights)
    assert set(rs.compare_with_aggregates(code, path).query("source == 'trace'")["domain"]) == {"github"}
    with pytest.raises(ValueError, match="not in"):
        rs.aggregate_skew(path, model="gpt-5")


def test_aggregate_cross_layer(shipped_data):
    table = rs.aggregate_cross_layer(shipped_data / "routing" / "olmoe-mixtral-routing-aggregates.json")
    assert len(table) == 10 and set(zip(table["ref_layer_a"], table["ref_layer_b"], strict=True)) == {(0, 7), (7, 15)}
    assert (table["tokens"] == 208896).all() and table["nmi"].between(0, 1, inclusive="neither").all()
