"""`prescope predictor-accuracy` on a trace of a model it never saw: every predictor that can run, held out by position."""

from __future__ import annotations

import json

import pytest
from conftest import write_structured_route_csv

from prescope import cli, files
from prescope.predict import routellapor


@pytest.mark.usefixtures("one_thread")
def test_accuracy_of_every_predictor_on_a_llamacpp_trace(tmp_path, capsys):
    csv = write_structured_route_csv(tmp_path / "m.route.csv", layers=5, experts=10, top_k=3, decode=80, arch="other")
    out = tmp_path / "acc"
    assert cli.main(["predictor-accuracy", "--trace", str(csv), "--out", str(out), "--distance", "3", "--width", "32",
                     "--lr", "0.01", "--max-epochs", "30", "--calibrate-steps", "5", "--no-progress",
                     "--save-predictor", str(tmp_path / "r.pt")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = files.read_json(out / "summary.json")
    assert summary["source"] == "measured" and summary["git_revision"] and summary["trace"].endswith("m.route.csv")
    assert "/tmp/" not in summary["trace"]
    assert summary["split"].startswith("by position") and summary["layout"] == {"moe_layers": 5, "experts": 10,
                                                                                  "top_k": 3}
    assert set(summary["predictors"]) == {"previous_token", "popularity", "activation_matrix", "llapor_routing"}
    assert any("no hidden states" in n for n in summary["notes"])
    recall = summary["mean_recall_at_k"]
    assert set(recall["llapor_routing"]) == {"1", "2", "3"} or set(recall["llapor_routing"]) == {1, 2, 3}
    assert line["llapor_routing_gain_points"]["previous_token"]
    assert min(recall["llapor_routing"].values()) > max(recall["previous_token"].values())  # cross-layer structure
    assert routellapor.load(tmp_path / "r.pt").trace_info["valid_tokens"] < summary["tokens"]
    table = files.read_csv(out / "accuracy.csv")
    assert set(table["layer"]) == {0, 1, 2, 3} and set(table["distance"]) == {1, 2, 3}


def test_bad_input_is_one_line(tmp_path, capsys):
    csv = write_structured_route_csv(tmp_path / "m.route.csv", decode=20)
    assert cli.main(["predictor-accuracy", "--trace", str(csv), "--out", str(tmp_path / "a"), "--model", "x"]) == 2
    assert "leave --model out" in capsys.readouterr().err
    assert cli.main(["predictor-accuracy", "--trace", str(tmp_path / "none.csv"), "--out", str(tmp_path / "a")]) == 2
    assert cli.main(["predictor-accuracy", "--trace", str(csv), "--out", str(tmp_path / "a"), "--layers", "9"]) == 2
    assert "--layers must be in 2..4" in capsys.readouterr().err
