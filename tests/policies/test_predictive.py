"""The common part of the prediction-driven policies: the memory of what was routed, the forecast's
probabilities, and the pair selection the victims use."""

from __future__ import annotations

import pytest
import torch

from prescope.policies.base import LayerView
from prescope.policies.predictive import Memory, _used


def test_memory_estimates_lag1_reuse_and_keeps_last_runs_experts_likely():
    memory = Memory(num_layers=2, num_experts=8, decay=0.5)
    for step, experts in enumerate([(0, 1), (0, 2), (0, 2)]):
        memory.observe(LayerView(step, 0, 2, 8, experts, (1,) * len(experts)))
    # reuse samples 1/2 then 2/2, decayed by 0.5 from 0: 0.25, then 0.625
    assert memory.reuse == pytest.approx(0.625)
    two, five = memory.chances(0, [2, 5], ran=True)
    assert two >= memory.reuse and five == 0.0


def test_used_probabilities_stay_exact_for_unlikely_experts():
    """P(used) = 1 − Π(1 − q) in log space: an expert with q = 1e-9 keeps p ≈ 1e-9 (in float32, 1 − (1 − q)
    is 0) and its expected tokens if used stay within [1, N]."""
    scores = torch.tensor([[[1.0] * 8 + [1e-9] * 56]] * 3).float()  # [D=3, N=1, E=64]
    p, n = _used(scores, 8)
    assert p[0, 8].item() == pytest.approx(1e-9, rel=1e-3) and n[0, 8].item() == pytest.approx(1.0)
    assert p[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    batch = torch.rand(2, 5, 64)  # [D=2, N=5, E]
    _, n = _used(batch, 8)
    assert (n >= 1).all() and (n <= 5).all()


def test_forecast_arrays_equal_the_forecast_lists_from_a_predictor_and_from_the_memory():
    """`Predictive.forecast_arrays` (what PreScope plans from) holds exactly `forecast`'s values, whether a
    predictor's tensor or the memory's previous step gives them, and a Window of no layers past the last."""
    import numpy as np
    from test_peers import COSTS, Fixed, cache_with, layout, view

    from prescope.policies import make_policy

    scores = {(0, 1): [0.9, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.8], (0, 2): [0.0, 0.7, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0]}
    for predictor in (Fixed(layout(4, 8, 2), scores), None):
        policy = make_policy("prescope", predictor=predictor, lookahead=2)
        policy.reset(cache_with(4, 4, [(0, 1)]), 8, COSTS)
        for step, layers in enumerate(([0, 1, 2, 3], [0, 1, 2, 3], [0])):
            for layer in layers:
                v = view(layer, [layer, layer + 2], step=step, tokens=[2, 1])
                policy.memory.observe(v)
                lists, arrays = policy.forecast(v, 2), policy.forecast_arrays(v, 2)
                assert len(arrays) == len(lists) == min(2, 3 - layer)
                assert [(p.tolist(), n.tolist()) for p, n in arrays] == [(list(p), list(n)) for p, n in lists]
                assert arrays.p.dtype == np.float64 and arrays.p.shape == (len(lists), 8)
        assert any(p.any() for p, _ in arrays)


def test_memory_counts_earlier_steps_tokens_and_reuse_as_first_written():
    """`Memory.seen` (tokens per expert of earlier steps, over arrays) and the lag-1 reuse equal the per-expert
    loops they replaced, over random runs where some layers skip steps (history's sequence is `seen`)."""
    import random

    rng = random.Random(2)
    L, E, memory = 4, 16, Memory(num_layers=4, num_experts=16, decay=0.7)
    seen, now, prev, reuse = [[0] * E for _ in range(L)], [{} for _ in range(L)], [{} for _ in range(L)], 0.0
    for step in range(40):
        for layer in sorted(rng.sample(range(L), rng.randint(1, L))):
            experts = tuple(rng.sample(range(E), rng.randint(0, 6)))
            tokens = tuple(rng.randint(1, 9) for _ in experts)
            if step != memory.step:
                for j in range(L):
                    for e, n in now[j].items():
                        seen[j][e] += n
                prev = [a or b for a, b in zip(now, prev, strict=True)]
                now = [{} for _ in range(L)]
            now[layer] = dict(zip(experts, tokens, strict=True))
            if prev[layer] and experts:
                reuse = 0.7 * reuse + (1.0 - 0.7) * (sum(1 for e in experts if e in prev[layer]) / len(experts))
            memory.observe(LayerView(step, layer, L, E, experts, tokens))
            assert memory.seen.tolist() == seen and memory.reuse == reuse
    history = memory.history(LayerView(40, 0, L, E, (), ()), with_truth=False)
    assert history.sequence.tolist() == [seen]
