"""Routing-only LLaPor: trained on a llama.cpp-style trace with no hidden states, checkpoints, determinism, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import random_routing_llapor, write_structured_route_csv

from prescope import cli, files
from prescope.predict import predictors as P
from prescope.predict import routellapor
from prescope.predict.accuracy import evaluate, mean_by_distance
from prescope.predict.llaporconfig import LLaPorConfig, LLaPorError
from prescope.routing.llamacpp import load_llamacpp_trace
from prescope.routing.trace import MISSING

FAST = LLaPorConfig(distance=2, width=32, max_epochs=40, patience=8, batch_size=64, min_group_layers=1, lr=1e-2,
                    routing_window=2, calibrate_steps=10)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return load_llamacpp_trace(write_structured_route_csv(tmp_path_factory.mktemp("rt") / "toy.route.csv"))


@pytest.fixture(scope="module")
def held(trace):
    return routellapor.position_split(trace, 0.3)


@pytest.fixture(scope="module")
def trained(trace, held):
    return routellapor.train_routing_llapor(trace, FAST, progress=False, exclude=held)


def test_position_split_holds_out_the_last_positions(trace, held):
    positions = trace.tokens["position"].to_numpy()
    assert held.sum() == round(0.3 * trace.num_tokens)
    assert positions[held].min() > positions[~held].max()


def test_it_learns_cross_layer_routing_that_history_cannot_see(trace, held, trained):
    """Each layer routes to its predecessor's experts shifted by one: this token's routing at layer l tells layer
    l+1's exactly, which the previous token and popularity do not."""
    assert trace.hidden is None and not trained.needs_hidden
    train = trace.select(~held)
    preds = {"llapor_routing": trained, "previous_token": P.PreviousToken(trace.layout),
             "popularity": P.Popularity().fit(train)}
    means = mean_by_distance(evaluate(preds, trace, (1, 2), tokens=held, batch_sizes=(), by_domain=False))
    assert (means.loc["llapor_routing"] > means.loc["previous_token"] + 0.2).all()
    assert (means.loc["llapor_routing"] > 0.9).all()


def test_a_union_of_a_batch_reads_as_its_mean_token(trace, trained):
    """A policy's one-row history at batch > 1 holds every routed expert: scores stay finite probabilities."""
    hist = P.TraceHistory(trace).at(np.arange(4), 1)
    union = P.History(hist.current.reshape(1, -1, 2).new_full((1, trace.layout.num_moe_layers, 8), -1))
    union.current[0, :2, :4] = hist.current[:2, :2].permute(1, 0, 2).reshape(2, 4)
    scores = trained.predict(1, 1, history=union)
    assert scores.shape == (1, trace.layout.num_experts) and torch.isfinite(scores).all()


def test_same_seed_same_weights_and_checkpoint_round_trip(tmp_path, trace, held, trained):
    torch.rand(100)  # another global RNG state
    again = routellapor.train_routing_llapor(trace, FAST, progress=False, exclude=held)
    for a, b in zip(trained.nets, again.nets, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    path = trained.save(tmp_path / "r.pt")
    loaded = routellapor.load_predictor(path)
    assert isinstance(loaded, routellapor.RoutingLLaPor) and loaded.layout == trace.layout
    hist = P.TraceHistory(trace).at(np.arange(5), 0)
    for d, v in trained.predict_window(0, [1, 2], history=hist).items():
        assert torch.equal(v, loaded.predict(0, d, history=hist))


def test_bad_input_and_foreign_or_damaged_checkpoints(tmp_path, trace, trained):
    with pytest.raises(P.PredictorError, match="history"):
        trained.predict(0, 1)
    with pytest.raises(P.DistanceError):
        trained.predict(0, 3, history=P.TraceHistory(trace).at([0], 0))
    path = trained.save(tmp_path / "r.pt")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises((files.ChecksumError, LLaPorError)):
        routellapor.load(path)
    torch.save({"format": "other"}, tmp_path / "o.pt")
    with pytest.raises(LLaPorError, match="not a routing-only"):
        routellapor.load(tmp_path / "o.pt")
    with pytest.raises(LLaPorError, match="two tokens"):
        routellapor.train_routing_llapor(trace, FAST, progress=False, exclude=np.ones(trace.num_tokens, bool))


def test_train_predictor_picks_routing_only_for_a_trace_without_hidden_states(tmp_path, capsys):
    csv = write_structured_route_csv(tmp_path / "t.route.csv", layers=3, experts=6, top_k=3, decode=60)
    out = tmp_path / "p.pt"
    assert cli.main(["train-predictor", "--trace", str(csv), "--out", str(out), "--distance", "2", "--width", "16",
                     "--max-epochs", "2", "--no-progress"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["predictor"] == "llapor_routing" and routellapor.load(out).layout.top_k == 3
    assert cli.main(["train-predictor", "--trace", str(csv), "--out", str(tmp_path / "q.pt"), "--model", "x"]) == cli.EXIT_BAD_INPUT
    assert "routing-only" in capsys.readouterr().err


def test_the_prescope_policy_runs_on_it_in_the_simulator(trace, trained):
    from prescope.policies import make_policy
    from prescope.sim.simulator import replay

    result = replay(trace, make_policy("prescope", predictor=trained, lookahead=2, gate=False), "h200", budget_share=0.25,
                    max_steps=20)
    assert result.totals["steps"] == 20 and result.totals["loads_prefetched"] >= 1
    with pytest.raises(LLaPorError):
        replace(FAST, routing_window=0)


def test_training_runs_on_one_thread_whatever_the_caller_runs(trace, held, monkeypatch):
    """The CPU splits float sums over its intra-op threads (one and two threads trained routing-only LLaPor on the
    Qwen3 trace to recall 0.5616 and 0.5617 at d=1): training runs one thread, and the caller's count comes back."""
    seen, train = [], routellapor._train_net
    monkeypatch.setattr(routellapor, "_train_net", lambda *a, **k: seen.append(torch.get_num_threads()) or train(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        routellapor.train_routing_llapor(trace, replace(FAST, max_epochs=1), progress=False, exclude=held)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}


def test_cut_layers_keeps_the_first_layers_and_their_own_expert_sizes(tmp_path):
    trace = load_llamacpp_trace(write_structured_route_csv(tmp_path / "t.route.csv", layers=5, decode=10))
    assert len(set(trace.layout.layer_expert_bytes)) == 2  # the CSV gives alternate layers different sizes
    cut = routellapor.cut_layers(trace, 3)
    assert cut.layout.num_moe_layers == 3 and cut.experts.shape[1] == 3
    assert cut.layout.layer_expert_bytes == trace.layout.layer_expert_bytes[:3]
    assert (cut.experts == trace.experts[:, :3]).all()


def test_load_predictor_refuses_a_foreign_or_newer_checkpoint_by_its_header(tmp_path, trained):
    torch.save({"format": "other"}, tmp_path / "o.pt")
    with pytest.raises(LLaPorError, match="not a LLaPor checkpoint"):
        routellapor.load_predictor(tmp_path / "o.pt")
    torch.save([1, 2], tmp_path / "l.pt")
    with pytest.raises(LLaPorError, match="not a LLaPor checkpoint"):
        routellapor.load_predictor(tmp_path / "l.pt")
    torch.save({"format": routellapor.FORMAT, "version": routellapor.FORMAT_VERSION + 1}, tmp_path / "n.pt")
    with pytest.raises(LLaPorError, match="checkpoint version"):
        routellapor.load_predictor(tmp_path / "n.pt")
    with pytest.raises(LLaPorError, match="checkpoint version"):
        routellapor.load(tmp_path / "n.pt")


def _features_as_first_written(model, layer, history):
    """The features as first written, one multi-hot per part (the reference the vectorised ones must equal)."""
    E, K = model.layout.num_experts, model.layout.top_k

    def scaled_hot(experts):
        hot = P.multi_hot(experts, E)
        return hot * (K / hot.sum(-1, keepdim=True).clamp_min(K))

    current = history.current
    N, L = current.shape[:2]
    previous = history.previous if history.previous is not None else torch.full((N, L, 1), MISSING)
    span = range(layer + 1, layer + 1 + model.targets(layer))
    window = range(layer - model.config.routing_window + 1, layer + 1)
    zero = torch.zeros(N, E)
    parts = [scaled_hot(current[:, j]) if j >= 0 else zero for j in window] + [scaled_hot(previous[:, layer])]
    prev = [scaled_hot(previous[:, t]) for t in span]
    if history.sequence is not None:
        seq = history.sequence.float()
        mean = [seq[:, t] * (K / seq[:, t].sum(-1, keepdim=True).clamp_min(K)) for t in span]
    else:
        mean = [zero for _ in span]
    x = torch.cat(parts + prev + mean, 1)
    prior = torch.stack([p + m for p, m in zip(prev, mean, strict=True)], 1) if prev else None
    return x, prior


def _random_history(L, E, N, width, seed, previous_width=None):
    """A History of N tokens with MISSING entries (rows of fewer than K experts, some empty), previous rows wider
    or narrower than the current ones, and earlier tokens' selection counts."""
    g = torch.Generator().manual_seed(seed)
    current = torch.randint(0, E, (N, L, width), generator=g)
    current[torch.rand(current.shape, generator=g) < 0.25] = MISSING
    previous = torch.randint(0, E, (N, L, previous_width or width), generator=g)
    previous[torch.rand(previous.shape, generator=g) < 0.25] = MISSING
    previous[0, 1] = MISSING  # a layer the previous token did not reach
    sequence = torch.randint(0, 40, (N, L, E), generator=g).float()
    sequence[:, 0] = 0.0  # no earlier selections at a layer
    return current, previous, sequence


@pytest.mark.parametrize("N, width, previous_width", [(1, 2, 2), (1, 9, 3), (3, 2, 5), (4, 11, 11)])
def test_features_equal_the_per_part_formula_bit_for_bit(trace, N, width, previous_width):
    """One scatter into [N, W + 1 + D', E] and one scale give the same x and prior as one multi-hot per part, at
    every layer (windows cut below layer 0, spans cut at the last layer), with unions of more than K experts
    (width > K), MISSING entries, and without the previous token or the earlier tokens."""
    layout = replace(trace.layout, num_experts=12, top_k=2)
    model = random_routing_llapor(layout, routing_window=3, distance=3)
    L = layout.num_moe_layers
    assert L >= 4  # windows cut at 0 and 1, spans cut at L-3 … L-1
    current, previous, sequence = _random_history(L, 12, N, width, seed=N + width, previous_width=previous_width)
    for hist in (P.History(current, previous, sequence), P.History(current), P.History(current, previous),
                 P.History(current, None, sequence)):
        for layer in range(L):
            x, prior = model.features(layer, hist)
            want_x, want_prior = _features_as_first_written(model, layer, hist)
            assert torch.equal(x, want_x), layer
            assert prior.shape == (N, model.targets(layer), 12)
            if want_prior is not None:
                assert torch.equal(prior, want_prior), layer


@pytest.mark.parametrize("N", [1, 3])
def test_predict_masks_equals_predict_window_of_the_same_history(trace, N):
    """The policy's path (the history as [N, L, E] masks of distinct experts) predicts what `predict_window` does
    from the expert lists, bit for bit, at every layer."""
    layout = replace(trace.layout, num_experts=12, top_k=2)
    model = random_routing_llapor(layout, routing_window=3, distance=3)
    L = layout.num_moe_layers
    current, previous, sequence = _random_history(L, 12, N, 6, seed=7)
    for rows in (current, previous):  # distinct experts per row, as a policy's memory holds them
        for n in range(N):
            for j in range(L):
                seen = set()
                for i, e in enumerate(rows[n, j].tolist()):
                    rows[n, j, i] = MISSING if e in seen else e
                    seen.add(e)
    hist = P.History(current, previous, sequence)
    masks = [P.multi_hot(rows.reshape(N * L, -1), 12).reshape(N, L, 12) for rows in (current, previous)]
    assert masks[0].max() == 1.0
    for layer in range(L - 1):
        T = model.targets(layer)
        want = model.predict_window(layer, list(range(1, T + 1)), history=hist)
        got = model.predict_masks(layer, masks[0], masks[1], sequence)
        assert got.shape == (N, T, 12)
        for d in range(1, T + 1):
            assert torch.equal(got[:, d - 1], want[d]), (layer, d)
