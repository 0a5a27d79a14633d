"""LLaPor: training on a trace of a tiny random OLMoE, layer groups, checkpoints, the CLI and bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import small_olmoe

from prescope import cli, files
from prescope.layout import LayoutMismatchError
from prescope.predict import llapor
from prescope.predict import predictors as P
from prescope.predict.accuracy import evaluate, mean_by_distance
from prescope.routing.trace import record_trace, save_trace

FAST = llapor.LLaPorConfig(distance=2, pca_dim=8, width=32, max_epochs=12, patience=3, batch_size=128,
                           min_group_layers=1)


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def data():
    """(model, training trace, held-out trace): disjoint random prompts, hidden states and logits kept."""
    model = small_olmoe(layers=5)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 64, 24)) for _ in range(72)]
    trace = record_trace(model, None, prompts, max_new_tokens=4, batch_size=24, keep_hidden=True,
                         keep_logits=True, progress=False)
    heldout, train = trace.split_by_prompt(0.25, seed=1)
    return model, train, heldout


@pytest.fixture(scope="module")
def trained(data):
    _, train, _ = data
    return llapor.train_llapor(train, FAST, progress=False)


def test_training_improves_validation_and_beats_popularity(data, trained):
    _, train, heldout = data
    for h in trained.history:
        assert min(c["valid_loss"] for c in h["curve"]) < h["start_valid_loss"]
    preds = {"llapor": trained, "popularity": P.Popularity().fit(train)}
    means = mean_by_distance(evaluate(preds, heldout, (1, 2), phase=None, batch_sizes=()))
    assert (means.loc["llapor"] > means.loc["popularity"] + 0.1).all()


def test_predictions_and_expected_tokens(data, trained):
    _, _, heldout = data
    hidden = torch.from_numpy(heldout.hidden[:6, 1]).float()
    hist = P.TraceHistory(heldout).at(np.arange(6), 1)
    window = trained.predict_window(1, [1, 2], hidden=hidden, history=hist)
    assert set(window) == {1, 2} and window[1].shape == (6, 8)
    assert ((window[2] >= 0) & (window[2] <= 1)).all()
    torch.testing.assert_close(trained.predict(1, 2, hidden=hidden, history=hist), window[2])
    assert trained.expected_tokens(window[1], 2).sum().item() == pytest.approx(6 * 2)
    # Without history the layer's own routing comes from its router: the same top-K as the trace.
    torch.testing.assert_close(trained.predict(1, 1, hidden=hidden), window[1])


def test_checkpoint_round_trip(tmp_path, data, trained):
    _, train, heldout = data
    path = trained.save(tmp_path / "llapor.pt")
    back = llapor.load(path)
    assert back.config == trained.config and back.layout == trained.layout
    assert back.boundaries == trained.boundaries
    assert back.trace_info["hash"] == llapor.trace_fingerprint(train) != llapor.trace_fingerprint(heldout)
    hidden = torch.from_numpy(heldout.hidden[:5, 0]).float()
    hist = P.TraceHistory(heldout).at(np.arange(5), 0)
    torch.testing.assert_close(back.predict(0, 2, hidden=hidden, history=hist),
                               trained.predict(0, 2, hidden=hidden, history=hist))
    assert not list(tmp_path.glob(".*.tmp"))


def test_corrupt_and_foreign_checkpoints(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        llapor.load(tmp_path / "missing.pt")
    good = trained.save(tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(llapor.LLaPorError, match="corrupt or truncated"):
        llapor.load(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(llapor.LLaPorError, match="not a LLaPor checkpoint"):
        llapor.load(tmp_path / "other.pt")


def test_change_points_find_steps():
    z = np.array([[0, 0], [0, 0], [5, 1], [5, 1], [5, 1], [-3, 2], [-3, 2]], dtype=float)
    assert llapor.change_points(z, 2) == (2, 5)
    assert llapor.change_points(z[:2], 2) == (2, 2)  # too few layers for three groups: one group


def test_groups_derived_or_overridden(data, trained):
    _, train, _ = data
    bounds, table = llapor.derive_groups(train, 1)
    assert bounds == trained.boundaries and 0 < bounds[0] < bounds[1] < 5
    assert list(table.columns) == ["layer", "metric", "value", "zscore", "group"]
    assert set(table["metric"]) == {"adjacent_nmi", "top1_weight", "hot_share"}
    forced = llapor.train_llapor(train, replace(FAST, group_boundaries=(1, 3), max_epochs=1), progress=False)
    kinds = [any(isinstance(m, llapor.GatedResidual) for m in net.modules()) for net in forced.nets[:4]]
    assert forced.boundaries == (1, 3) and kinds == [False, True, True, False]


def test_bad_inputs(data, trained):
    model, train, heldout = data
    hidden = torch.zeros(2, 16)
    with pytest.raises(llapor.LLaPorError, match="needs a trace with hidden states"):
        llapor.train_llapor(replace(train, hidden=None), FAST, progress=False)
    with pytest.raises(llapor.LLaPorError, match="router logits"):
        llapor.train_llapor(replace(train, logits=None), FAST, progress=False)
    with pytest.raises(P.DistanceError, match="beyond the last MoE layer 4"):
        trained.predict(3, 2, hidden=hidden)
    with pytest.raises(P.DistanceError, match="exceeds the 2 layers"):
        trained.predict(0, 3, hidden=hidden)
    with pytest.raises(llapor.LLaPorError, match="trained on H=16"):
        trained.predict(0, 1, hidden=torch.zeros(2, 12))
    with pytest.raises(LayoutMismatchError, match="num_moe_layers"):
        trained.check_model(small_olmoe(layers=4))
    trained.check_model(model)
    with pytest.raises(llapor.LLaPorError, match="valid_fraction"):
        llapor.LLaPorConfig(valid_fraction=1.0)


def test_cli_train_predictor(tmp_path, data, capsys):
    _, train, _ = data
    save_trace(train, tmp_path / "t.parquet")
    code = cli.main(["train-predictor", "--trace", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "p.pt"),
                     "--distance", "1", "--pca-dim", "4", "--width", "16", "--max-epochs", "1",
                     "--group-boundaries", "1,3", "--no-use-routing", "--no-progress"])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["boundaries"] == [1, 3] and line["config"]["use_routing"] is False
    assert llapor.load(tmp_path / "p.pt").config.distance == 1
    assert cli.main(["train-predictor", "--trace", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "q.pt"),
                     "--group-boundaries", "x"]) == 2


def test_flipped_bytes_in_a_checkpoint_are_refused(tmp_path, trained):
    path = trained.save(tmp_path / "ck.pt")
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.choice(len(data) - 200, size=64, replace=False):  # the archive's comment (the checksum) left out
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(files.ChecksumError, match="ck.pt: checksum mismatch"):
        llapor.load(path)


def test_group_boundaries_past_the_trace_are_refused(data):
    _, train, _ = data
    with pytest.raises(llapor.LLaPorError, match=r"group_boundaries \(50, 90\) reach past the trace's 5 MoE layers"):
        llapor.train_llapor(train, replace(FAST, group_boundaries=(50, 90)), progress=False)
    with pytest.raises(llapor.LLaPorError, match="group_boundaries must be"):
        llapor.LLaPorConfig(group_boundaries=(1.5, 3))


def test_cli_checks_the_output_path_before_training(tmp_path, data, capsys, monkeypatch):
    _, train, _ = data
    save_trace(train, tmp_path / "t.parquet")
    (tmp_path / "FILE").write_text("x")
    monkeypatch.setattr(llapor, "read_trace", lambda *_: pytest.fail("the trace was read before the --out check"))
    assert cli.main(["train-predictor", "--trace", str(tmp_path / "t.parquet"),
                     "--out", str(tmp_path / "FILE" / "ck.pt")]) == 2
    assert "FILE is a file, so nothing can be written under it" in capsys.readouterr().err


def test_training_twice_with_one_seed_gives_identical_networks(data):
    """Layer 0's network used to be built from whatever global RNG state the process had reached: the same seed
    then trained different weights (and stopped after a different number of epochs)."""
    _, train, _ = data
    config = replace(FAST, max_epochs=3)
    torch.manual_seed(1)
    first = llapor.train_llapor(train, config, progress=False)
    torch.rand(1000)  # another state of the global RNG, as after loading a model
    state = torch.random.get_rng_state()
    second = llapor.train_llapor(train, config, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state), "training leaves the caller's RNG as it was"
    for a, b in zip(first.nets, second.nets, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    assert [len(h["curve"]) for h in first.history] == [len(h["curve"]) for h in second.history]


def test_the_weights_do_not_depend_on_how_many_processes_train_the_layers(data):
    """Layers train in forked workers when there are cores to spare; each is seeded and single-threaded, so one
    process and three give the same networks, in layer order, and the same history."""
    _, train, _ = data
    config = replace(FAST, max_epochs=3)
    alone = llapor.train_llapor(train, config, progress=False, processes=1)
    pooled = llapor.train_llapor(train, config, progress=False, processes=3)
    assert len(alone.nets) == len(pooled.nets) == train.layout.num_moe_layers
    for a, b in zip(alone.nets, pooled.nets, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    strip = lambda h: {k: v for k, v in h.items() if k != "seconds"}  # noqa: E731
    assert [strip(h) for h in alone.history] == [strip(h) for h in pooled.history]
    with pytest.raises(llapor.LLaPorError, match="processes must be >= 1"):
        llapor.train_llapor(train, config, progress=False, processes=0)


def test_layer_workers_return_results_in_layer_order():
    from prescope.predict.layerpool import default_processes, map_layers

    assert map_layers(pow, (2,), 5, processes=2) == [1, 2, 4, 8, 16] == map_layers(pow, (2,), 5)
    assert default_processes("cuda", 40) == 1 and 1 <= default_processes("cpu", 3) <= 3
