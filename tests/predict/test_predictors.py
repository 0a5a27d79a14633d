"""Predictor baselines: hand-checked scores on a toy trace, gate lookahead against the live routers, the oracle,
history baselines on the real llama.cpp traces, and the bad-input errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DATA, small_olmoe
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.overrides import TorchFunctionMode

from prescope.layout import LayoutMismatchError, ModelLayout
from prescope.models.adapter import describe, observe_routing
from prescope.predict import predictors as P
from prescope.predict.accuracy import evaluate, mean_by_distance
from prescope.routing.llamacpp import load_llamacpp_trace
from prescope.routing.trace import MISSING, Trace, record_trace

# Published lag-1 decode reuse of the real traces (prescope/assets/data/README.md).
PUBLISHED_REUSE = {"qwen3-30b-a3b": 0.380, "gpt-oss-120b": 0.179}


def _layout(num_layers: int, num_experts: int, top_k: int, hidden: int = 4) -> ModelLayout:
    return ModelLayout("Toy", "toy", num_layers, tuple(range(num_layers)), (), num_experts, top_k, hidden, 8,
                       "float32", 96)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def toy() -> Trace:
    """Two prompts (E=4, K=2, L=2). Prompt 0: positions 0..3; prompt 1: positions 0..1. Layer 1 = layer 0 + 1 mod 4."""
    layer0 = np.array([[0, 1], [0, 2], [0, 1], [3, 2], [2, 3], [3, 1]])
    experts = np.stack([layer0, (layer0 + 1) % 4], axis=1)  # [T, L, K]
    weights = np.tile(np.array([[0.75, 0.25]], dtype=np.float32), (6, 2, 1))
    tokens = pd.DataFrame({"prompt": [0, 0, 0, 0, 1, 1], "row": [0, 0, 0, 0, 1, 1], "position": [0, 1, 2, 3, 0, 1],
                           "step": [0, 0, 1, 2, 0, 1], "phase": ["prefill", "prefill", "decode", "decode", "prefill",
                                                                 "decode"], "domain": "c4"})
    return Trace(_layout(2, 4, 2), tokens, experts, weights)




@pytest.fixture(scope="module")
def recorded():
    model = small_olmoe()
    prompts = [list(np.random.default_rng(i).integers(1, 64, 10)) for i in range(12)]
    trace = record_trace(model, None, prompts, max_new_tokens=3, batch_size=12, keep_hidden=True,
                         keep_logits=True, progress=False)
    return model, trace


def test_inclusion_probs_by_hand():
    p = P.inclusion_probs(torch.tensor([[5.0, 1, 1, 1], [0, 0, 0, 0], [2, 2, 0, 0]]), 2)
    # row 0: 5/8*2 > 1 is capped at 1; the remaining 1 is split evenly over three equal scores.
    torch.testing.assert_close(p, torch.tensor([[1, 1 / 3, 1 / 3, 1 / 3], [0.5] * 4, [1, 1, 0, 0]]))
    assert P.expected_tokens(torch.tensor([[5.0, 1, 1, 1], [2, 2, 0, 0]]), 2).tolist() == pytest.approx(
        [2, 4 / 3, 1 / 3, 1 / 3])
    with pytest.raises(P.PredictorError, match="k must be in 1..4"):
        P.inclusion_probs(torch.ones(1, 4), 5)


def _inclusion_probs_iterative(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The former water-filling loop, kept as the reference: cap experts above 1, rescale the rest, repeat."""
    s = scores.float().clamp_min(0)  # [..., E]
    s = torch.where(s.sum(-1, keepdim=True) > 0, s, torch.ones_like(s))
    capped = torch.zeros_like(s, dtype=torch.bool)  # [..., E]
    p = s
    for _ in range(k + 1):
        room = k - capped.sum(-1, keepdim=True)  # [..., 1]
        free = torch.where(capped, torch.zeros_like(s), s)
        p = torch.where(capped, torch.ones_like(s), free * room / free.sum(-1, keepdim=True).clamp_min(1e-30))
        over = p > 1
        if not over.any():
            break
        capped |= over
    return p.clamp(0, 1)


@st.composite
def _score_batches(draw):
    """Scores [N, E] or [D, N, E] with ties, zeros and negatives; row r keeps only its first m_r entries, so
    rows of all zeros and rows with fewer than k positive scores come up. Positive scores stay above 2^-20: both
    versions guard a row sum with 1e-30, so rows summing below it lose their normalisation alike."""
    E = draw(st.integers(1, 128))
    k = draw(st.integers(1, E))
    shape = draw(st.sampled_from([(), (2,)])) + (draw(st.integers(1, 5)), E)
    value = st.one_of(st.sampled_from([0.0, -1.0, 0.5, 1.0, 3.0]),
                      st.floats(2.0 ** -20, 100, width=32))
    scores = draw(hnp.arrays(np.float32, shape, elements=value))
    kept = draw(hnp.arrays(np.int64, shape[:-1], elements=st.integers(0, E)))  # [..., ] m_r
    return torch.from_numpy(scores * (np.arange(E) < kept[..., None])), k


@settings(max_examples=300, deadline=None)
@given(_score_batches())
def test_inclusion_probs_matches_the_iterative_water_filling(batch):
    scores, k = batch
    p = P.inclusion_probs(scores, k)
    assert p.dtype == torch.float32 and p.shape == scores.shape
    torch.testing.assert_close(p, _inclusion_probs_iterative(scores, k), atol=1e-5, rtol=0)
    positives = (scores > 0).sum(-1)  # [...]
    want = torch.where(positives > 0, positives.clamp_max(k), k).float()  # a row of zeros spreads k evenly
    torch.testing.assert_close(p.sum(-1), want, atol=1e-4, rtol=1e-5)


class _RecordOps(TorchFunctionMode):
    """Records every torch call; raises on the calls that copy a device result to the host."""

    SYNCING = {"any", "item", "tolist", "__bool__", "nonzero"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.SYNCING:
            raise AssertionError(f"host sync through Tensor.{name}")
        self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_inclusion_probs_has_no_host_sync_and_fixed_ops():
    spread = torch.ones(3, 4, 64)  # [D, N, E] nothing capped
    peaked = torch.rand(3, 4, 64, generator=torch.Generator().manual_seed(0)) ** 8  # several capped per row
    with pytest.raises(AssertionError, match="host sync"), _RecordOps():
        _inclusion_probs_iterative(peaked, 8)  # the guard catches the loop it replaces
    runs = []
    for scores in (spread, peaked, torch.zeros(3, 4, 64)):
        with _RecordOps() as ops:
            P.inclusion_probs(scores, 8)
        runs.append(ops.calls)
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inclusion_probs_does_not_sync_on_cuda():
    scores = torch.rand(3, 4, 128, device="cuda") ** 8  # [D, N, E]
    torch.cuda.set_sync_debug_mode("error")
    try:
        p = P.inclusion_probs(scores, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(p.cpu(), _inclusion_probs_iterative(scores.cpu(), 8), atol=1e-5, rtol=0)


def test_trace_history_by_hand(toy):
    hist = P.TraceHistory(toy).at([3, 4, 5], layer=0, with_truth=True)
    assert hist.previous[0, 1].tolist() == [1, 2]  # token 3's predecessor is token 2
    assert (hist.previous[1] == MISSING).all()  # first token of prompt 1
    assert hist.current[0, 0].tolist() == [3, 2] and (hist.current[:, 1] == MISSING).all()
    # token 3 follows tokens 0..2, whose layer-0 experts are {0,1}, {0,2}, {0,1}
    assert hist.sequence[0, 0].tolist() == [3, 2, 1, 0]
    assert hist.sequence[2, 0].tolist() == [0, 0, 1, 1]  # token 5 follows only token 4 ({2, 3})
    assert hist.truth[2, 1].tolist() == [0, 2]


def test_history_baselines_by_hand(toy):
    hist = P.TraceHistory(toy).at([3, 4], layer=0, with_truth=True)
    prev = P.PreviousToken().fit(toy).predict(0, 1, history=hist)
    assert prev[0].tolist() == [0, 1, 1, 0]  # token 2 chose {1, 2} at layer 1
    assert prev[1].tolist() == [0.5] * 4  # no previous token: K/E everywhere
    pop = P.Popularity().fit(toy.select([0])).predict(0, 0, history=hist)
    assert pop.tolist() == [[3 / 4, 2 / 4, 2 / 4, 1 / 4]] * 2  # prompt 0, layer 0: expert 0 thrice, 3 once
    assert P.Oracle(toy.layout).predict(0, 1, history=hist)[0].tolist() == [1, 0, 0, 1]


def test_activation_matrix_matches_the_closest_prompt(toy):
    am = P.ActivationMatrix(matches=1).fit(toy)
    assert am.eam.shape == (2, 2, 4)
    assert am.eam[1, 0].tolist() == [0, 0.5, 0.5, 1]  # prompt 1: experts {2,3} then {3,1}
    # A sequence that so far used only experts 2 and 3 at layer 0 looks like prompt 1.
    hist = P.History(current=torch.tensor([[[2, 3], [MISSING, MISSING]]]), sequence=torch.tensor([[[0, 0, 1.0, 1], [0] * 4]]))
    scores = am.predict(0, 1, history=hist)
    torch.testing.assert_close(scores[0], (1 - 1 / 2) * am.eam[1, 1])  # decayed by 1 - d/L


def test_oracle_has_recall_one(recorded):
    _, trace = recorded
    table = evaluate({"oracle": P.Oracle().fit(trace)}, trace, (0, 1, 2, 3), batch_sizes=(1, 4))
    assert (table.loc[table["metric"].isin(["recall_at_k", "exact_match", "recall_at_2k"]), "value"] == 1).all()
    assert (table.loc[table["metric"].str.startswith("count_error"), "value"].abs() < 1e-6).all()


def test_gate_lookahead_at_distance_zero_is_the_routing(recorded):
    model, _ = recorded
    seen = []
    with observe_routing(model, lambda o, h, lg, w, idx: seen.append((o, h.detach().clone(), idx.clone()))), torch.no_grad():
        model(torch.randint(1, 64, (3, 7)))
    look = P.GateLookahead.from_model(model)
    for ordinal, hidden, indices in seen:
        top = look.predict(ordinal, 0, hidden=hidden).topk(indices.shape[1]).indices
        assert (top.sort(-1).values == indices.sort(-1).values).all()


def test_fitted_routers_match_the_model(recorded):
    model, trace = recorded
    fitted = P.GateLookahead().fit(trace)
    live = P.GateLookahead.from_model(model)
    table = evaluate({"fitted": fitted, "live": live}, trace, (0, 1, 2), phase=None, batch_sizes=())
    means = mean_by_distance(table)
    assert means.loc["live", 0] > 0.99  # fp16 hidden states in the trace may flip near-ties
    assert np.allclose(means.loc["fitted"].to_numpy(), means.loc["live"].to_numpy(), atol=0.02)


@pytest.mark.parametrize("name", sorted(PUBLISHED_REUSE))
def test_history_baselines_on_real_llamacpp_traces(name):
    trace = load_llamacpp_trace(DATA / "routing" / f"{name}.route.csv")
    preds = {p.name: p.fit(trace) for p in (P.PreviousToken(), P.Popularity(), P.ActivationMatrix(), P.Oracle())}
    table = evaluate(preds, trace, (0, 1, 2))
    means = mean_by_distance(table)
    # Previous-token recall at distance 0 is the lag-1 reuse (first decode token's predecessor is a prefill
    # token, hence the tolerance); one layer ahead it stays close to it.
    assert means.loc["previous_token", 0] == pytest.approx(PUBLISHED_REUSE[name], abs=0.01)
    assert means.loc["previous_token", 1] == pytest.approx(PUBLISHED_REUSE[name], abs=0.03)
    assert means.loc["oracle"].min() == 1.0
    assert (means.loc[["popularity", "activation_matrix"]] > trace.layout.top_k / trace.layout.num_experts).all().all()
    with pytest.raises(P.PredictorError, match="need hidden states"):
        evaluate({"gate_lookahead": P.GateLookahead()}, trace, (1,))


def test_bad_inputs(recorded, toy):
    model, trace = recorded
    look = P.GateLookahead.from_model(model)
    with pytest.raises(P.DistanceError, match="beyond the last MoE layer 3"):
        look.predict(2, 2, hidden=torch.zeros(1, 16))
    with pytest.raises(P.PredictorError, match="needs `hidden`"):
        look.predict(0, 1)
    with pytest.raises(P.PredictorError, match="call fit"):
        P.PreviousToken().predict(0, 1, history=P.History(torch.zeros(1, 2, 2, dtype=torch.long)))
    with pytest.raises(P.PredictorError, match="hidden states and router logits"):
        P.GateLookahead().fit(toy)
    with pytest.raises(LayoutMismatchError, match="num_experts"):
        P.Popularity().fit(toy).check_model(model)
    with pytest.raises(LayoutMismatchError, match="num_moe_layers"):
        P.Popularity().fit(trace).check_model(small_olmoe(layers=3))
    P.Popularity().fit(trace).check_model(describe(model))  # same layout: no error


def _inclusion_probs_sliced(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The closed form over the k largest slots only (how it was first written), the reference for the masked
    form that serves a tensor k."""
    s = scores.float().clamp_min(0)
    E = s.shape[-1]
    s = torch.where(s.sum(-1, keepdim=True) > 0, s, 1.0)
    ascending = s.sort(-1).values
    largest, suffix = ascending[..., E - k:], ascending.cumsum(-1)[..., E - k:]
    room = torch.arange(1, k + 1, dtype=s.dtype)
    room, slot = torch.where(largest * room <= suffix, room, 0).max(-1, keepdim=True)
    return (room / suffix.gather(-1, slot).clamp_min(1e-30) * s).clamp(0, 1)


def test_inclusion_probs_of_an_int_or_a_tensor_k_equal_the_sliced_form_bit_for_bit():
    """One graph serves every k: the masked form, with k an int or a 0-d tensor, equals the form over the k
    largest slots for each k, on rows with ties, zeros, fewer positive scores than k, and scores spanning many
    orders of magnitude."""
    g = torch.Generator().manual_seed(0)
    E = 16
    rows = torch.rand(6, E, generator=g) ** 4
    rows[1] = 0.0  # all zeros
    rows[2, 3:] = 0.0  # three positive scores
    rows[3] = torch.tensor([0.5] * 8 + [0.25] * 8)  # ties
    rows[4] = 10.0 ** torch.linspace(-12, 3, E)
    scores = rows.reshape(2, 3, E)  # [D, N, E]
    for k in range(1, E + 1):
        reference = _inclusion_probs_sliced(scores, k)
        assert torch.equal(P.inclusion_probs(scores, k), reference), k
        assert torch.equal(P.inclusion_probs(scores, torch.tensor(float(k))), reference), k
