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
