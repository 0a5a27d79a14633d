"""The common part of the prediction-driven policies: the memory of what was routed, the forecast's
probabilities, and the pair selection the victims use."""

from __future__ import annotations

import numpy as np
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


def _planned_forecasts(device: str):
    """A prescope policy whose predictor's scores live on `device`, after one step's layers: (policy, the view
    of layer 0 in step 1)."""
    from test_peers import COSTS, Fixed, cache_with, layout, view

    from prescope.policies import make_policy

    class On(Fixed):
        """Scores kept on `device` once made: a copy from pageable host memory would wait for the device
        inside the forecast (CUDA syncs the stream before such a copy), before the read that counts the wait."""

        def predict(self, layer, distance, *, hidden=None, history=None):
            on, key = self.__dict__.setdefault("on", {}), (layer, distance)
            if key not in on:
                on[key] = super().predict(layer, distance, hidden=hidden, history=history).to(device)
            return on[key]

    scores = {(0, 1): [0.9, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.8], (0, 2): [0.0, 0.7, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0]}
    policy = make_policy("prescope", predictor=On(layout(4, 8, 2), scores), lookahead=2)
    policy.reset(cache_with(4, 4, [(0, 1)]), 8, COSTS)
    for layer in range(4):
        policy.memory.observe(view(layer, [layer, layer + 2], step=0))
    v = view(0, [0, 2], step=1)
    policy.memory.observe(v)
    return policy, v


def test_a_forecast_computed_on_the_host_reports_no_wait_for_a_device():
    policy, v = _planned_forecasts("cpu")
    lists, arrays = policy.forecast(v, 2), policy.forecast_arrays(v, 2)
    assert arrays.p[0].tolist() == lists[0][0] and arrays.p[0, 0] > 0
    assert policy.forecast_wait_s == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reading_a_forecast_from_the_gpu_counts_the_wait_for_the_work_queued_before_it():
    """The forecast's read waits for the device: work queued before it (here 0.1-0.2 s of device sleep) is
    counted in `forecast_wait_s`, and the values read are the host's. The sleep is long against the host's own
    work in the call (on the H200 machine a 21-ms sleep left 12 ms of it before the read): a wait hidden before
    the read would still leave the counted one near zero."""
    on_host, v = _planned_forecasts("cpu")
    policy, v = _planned_forecasts("cuda")
    want = on_host.forecast_arrays(v, 2)
    policy.forecast_arrays(v, 2)  # warm-up (CUDA context, kernels)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(200_000_000)  # cycles: 0.1-0.2 s on any current GPU
    end.record()
    before = policy.forecast_wait_s
    got = policy.forecast_arrays(v, 2)
    slept_s = start.elapsed_time(end) / 1e3
    assert policy.forecast_wait_s - before >= 0.5 * slept_s > 0
    np.testing.assert_allclose(got.p, want.p, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.n, want.n, rtol=1e-6, atol=1e-7)
    lists_before = policy.forecast_wait_s
    assert policy.forecast(v, 2)[0][0] == pytest.approx(want.p[0].tolist(), rel=1e-6, abs=1e-7)
    assert policy.forecast_wait_s >= lists_before


def _replayed_forecasts(predictor, use_graphs=True, steps=6, union=False):
    """The prescope policy's forecast arrays at every layer of `steps` random steps (a union of several tokens'
    experts per layer with `union`), from `predictor`."""
    import random

    from test_peers import COSTS, cache_with, view

    from prescope.policies import make_policy

    L, E = 5, 12
    policy = make_policy("prescope", predictor=predictor, lookahead=2)
    policy.use_graphs = use_graphs
    policy.reset(cache_with(8, L, [(0, 1)]), E, COSTS)
    rng, out = random.Random(3), []
    for step in range(steps):
        for layer in range(L):
            experts = rng.sample(range(E), rng.randint(5, 9) if union else 2)
            v = view(layer, experts, L=L, E=E, step=step, tokens=[rng.randint(1, 4) for _ in experts])
            policy.memory.observe(v)
            out.append(policy.forecast_arrays(v, 2))
    return out, policy


@pytest.mark.parametrize("union", [False, True])
def test_a_routing_llapor_forecast_from_the_memory_masks_equals_the_history_path(union):
    """The prescope policy reads a routing-only LLaPor from its memory's [L, E] grids (`predict_masks`, one buffer,
    k as a tensor) and forecasts exactly what the history lists through `predict_window` gave, at batch 1 and for
    unions of more than K experts."""
    from conftest import ByLists, random_routing_llapor
    from test_peers import layout

    model = random_routing_llapor(layout(5, 12, 2), routing_window=3, distance=2)
    fast, _ = _replayed_forecasts(model, union=union)
    slow, _ = _replayed_forecasts(ByLists(model), union=union)
    assert len(fast) == len(slow) == 30
    for a, b in zip(fast, slow, strict=True):
        assert np.array_equal(a.p, b.p) and np.array_equal(a.n, b.n)
    assert any(a.p.size and 0 < a.p.min() < a.p.max() < 1 for a in fast)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("union", [False, True])
def test_a_routing_llapor_forecast_replayed_from_cuda_graphs_equals_the_eager_one(union):
    """On the GPU each layer's forecast (the packed host buffer in, `predict_masks` and `_used` inside) is captured
    once and replayed: the replays equal the eager GPU forecast and the CPU one."""
    from conftest import random_routing_llapor
    from test_peers import layout

    def on(device):
        return random_routing_llapor(layout(5, 12, 2), routing_window=3, distance=2, device=device)

    graphed, policy = _replayed_forecasts(on("cuda"), union=union)
    eager, _ = _replayed_forecasts(on("cuda"), use_graphs=False, union=union)
    host, _ = _replayed_forecasts(on("cpu"), union=union)
    assert policy.graphs.captured >= 4 and policy.graphs.refused == 0  # layers 0..3 forecast; each replayed
    for a, b, c in zip(graphed, eager, host, strict=True):
        np.testing.assert_allclose(a.p, b.p, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a.n, b.n, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.p, c.p, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a.n, c.n, rtol=1e-4, atol=1e-5)


def test_the_mask_forecast_reads_nothing_back_from_the_device():
    """What a CUDA graph captures (predict_masks, then `_used` with k as a tensor) has no host read, checked on
    the CPU with the guard GraphCache runs before any capture."""
    from conftest import random_routing_llapor
    from test_peers import layout

    from prescope.predict.graphs import _NoHostReads

    model = random_routing_llapor(layout(5, 12, 2), routing_window=3, distance=2)
    masks = [(torch.rand(1, 5, 12) < 0.3).float() for _ in range(2)]
    with _NoHostReads():
        for layer in range(4):
            probs = model.predict_masks(layer, *masks, torch.rand(1, 5, 12) * 4)
            used = _used(probs.transpose(0, 1).contiguous(), torch.tensor(2.0))
            assert used.shape == (2, probs.shape[1], 12)
