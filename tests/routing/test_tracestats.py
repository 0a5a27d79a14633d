"""`prescope trace-stats`: a trace's shape and routing statistics, table then one JSON line, for any format."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import write_route_csv

from prescope import cli
from prescope.layout import ModelLayout
from prescope.routing.trace import Trace, save_trace
from prescope.routing.tracestats import trace_stats


def _stats(capsys, path, *extra) -> tuple[list[str], dict]:
    assert cli.main(["trace-stats", str(path), *extra]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_hand_made_trace_gives_hand_computed_figures(tmp_path, capsys):
    """Every decode token picks experts {0, 1} of 4 at both layers: lag-1 reuse 1, load entropy ln2/ln4 = 0.5."""
    layout = ModelLayout("HandMoe", "hand", 2, (0, 1), (), 4, 2, 8, 4, "float32", 192)
    T = 5
    tokens = pd.DataFrame({"prompt": 0, "row": 0, "position": range(T), "step": range(1, T + 1), "call": 0,
                           "phase": "decode", "domain": ""})
    experts = np.tile(np.array([0, 1]), (T, 2, 1))
    weights = np.tile(np.array([0.6, 0.4], dtype=np.float32), (T, 2, 1))
    path = save_trace(Trace(layout, tokens, experts, weights), tmp_path / "hand.trace.parquet")
    lines, record = _stats(capsys, path, "--csv", str(tmp_path / "layers.csv"))
    assert lines[0].startswith(f"{path} (parquet): HandMoe, L=2 MoE layers of 2, E=4, K=2")
    assert (record["moe_layers"], record["num_experts"], record["top_k"], record["tokens"]) == (2, 4, 2, T)
    assert record["reuse_lag1_decode"] == 1.0 and record["reuse_random"] == 0.5
    assert record["entropy_norm_mean"] == pytest.approx(0.5, abs=1e-4)
    assert record["per_layer"]["reuse_lag1"] == [1.0, 1.0] and record["expert_bytes_per_layer"] == [192, 192]
    assert len(pd.read_csv(tmp_path / "layers.csv")) == 2


def test_llamacpp_trace_with_per_layer_sizes_and_the_same_figures_as_its_parquet(tmp_path, capsys):
    csv = write_route_csv(tmp_path / "t.route.csv", [100, 0, 400, 100], tokens=12)
    _, from_csv = _stats(capsys, csv)
    assert from_csv["format"] == "llama.cpp" and from_csv["num_layers"] == 4 and from_csv["moe_layers"] == 3
    assert from_csv["expert_bytes_per_layer"] == [100, 400, 100] and from_csv["expert_bytes_all_layers"] == 600 * 8
    assert from_csv["hidden_states"] is False and len(from_csv["per_layer"]["entropy_norm"]) == 3
    from prescope.routing.reader import read_trace

    parquet = save_trace(read_trace(csv), tmp_path / "t.trace.parquet")
    _, from_parquet = _stats(capsys, parquet)
    same = ("tokens", "reuse_lag1_decode", "entropy_norm_mean", "nmi_next_mean", "expert_bytes_per_layer", "per_layer")
    assert {k: from_parquet[k] for k in same} == {k: from_csv[k] for k in same}


def test_the_shipped_qwen3_trace(shipped_data):
    """The real Qwen3-30B-A3B trace: 48 layers of 128 experts, top-6; lag-1 decode reuse 0.380; half its layers
    carry larger experts."""
    from prescope.routing.reader import read_trace

    table, pooled = trace_stats(read_trace(shipped_data / "routing" / "qwen3-30b-a3b.route.csv"))
    assert (pooled["moe_layers"], pooled["num_experts"], pooled["top_k"]) == (48, 128, 6)
    assert round(pooled["reuse_lag1_decode"], 3) == 0.380
    assert sorted(set(pooled["expert_bytes_per_layer"])) == [2654208, 3059712] and len(table) == 48


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    for path, message in ((tmp_path / "none.parquet", "does not exist"), (tmp_path / "x.csv", "neither")):
        assert cli.main(["trace-stats", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
