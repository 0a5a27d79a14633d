"""Expert weight layouts: one expert's math and per-expert views reproduce each family's own experts."""

from __future__ import annotations

import pytest
import torch

from prescope.models import adapter, families
from prescope.models import experts as layouts

FOUND = families.discover()
BUILT = [f for f in FOUND if not f.skip and not f.encoder_decoder]


def _one_by_one(lay, hidden, index, weights, inputs_weighted=False):
    """Σ_k w[n, k] · expert_{index[n, k]}(x[n]) with adapter.expert_forward (the input scaled instead, if asked)."""
    out = torch.zeros_like(hidden)
    for n in range(hidden.shape[0]):
        for k in range(index.shape[1]):
            e, w = int(index[n, k]), weights[n, k]
            x = hidden[n:n + 1] * w if inputs_weighted else hidden[n:n + 1]
            y = adapter.expert_forward(lay.experts, x, adapter.expert_params(lay.experts, e))[0]
            out[n] += y if inputs_weighted else w * y
    return out


@pytest.mark.families
@pytest.mark.parametrize("family", BUILT, ids=[f.model_type for f in BUILT])
def test_one_expert_at_a_time_reproduces_the_family_experts(family):
    model = families.tiny_model(family, seed=2)
    try:
        lay = adapter.moe_layers(model)[-1]
    except adapter.UnsupportedModelError:
        pytest.skip(f"{family.model_type} is refused (tests/experiments/test_families.py checks why)")
    if lay.input_weighted:
        pytest.skip("input-weighted experts: test_llama4_experts_run_on_router_scaled_inputs")
    hidden = torch.randn(5, lay.probed.layout.hidden_size, generator=torch.Generator().manual_seed(0))
    index = torch.stack([torch.randperm(lay.num_experts, generator=torch.Generator().manual_seed(n))[:lay.top_k]
                         for n in range(5)])  # [N, K]
    weights = torch.rand(5, lay.top_k, generator=torch.Generator().manual_seed(1))  # [N, K]
    with torch.no_grad():
        stock = lay.experts(hidden.unsqueeze(0), index, weights).reshape(hidden.shape) \
            if family.model_type == "dbrx" else lay.experts(hidden, index, weights)
        mine = _one_by_one(lay, hidden, index, weights)
    torch.testing.assert_close(mine, stock, rtol=1e-5, atol=1e-6)


def test_dbrx_rows_are_viewed_per_expert_without_a_copy():
    model = families.tiny_model(families.family("dbrx"))
    experts = adapter.moe_layers(model)[0].experts
    layout = layouts.find_layout(experts)
    assert (layout.math, layout.num_experts, layout.rows, layout.hidden_size) == ("split", 6, 16, 32)
    w1 = experts.get_parameter("mlp.w1")  # [E·I, H]
    assert adapter.expert_param_names(experts) == {n: torch.Size([16, 32]) for n in ("mlp.w1", "mlp.v1", "mlp.w2")}
    params = adapter.expert_params(experts, 4)
    assert params["mlp.w1"].data_ptr() == w1[4 * 16].data_ptr() and torch.equal(params["mlp.w1"], w1[64:80])
    host = adapter.relocate_experts(experts, lambda t: t.clone())  # what the engine does with pinned copies
    assert host["mlp.w1"].shape == (6, 16, 32) and experts.get_parameter("mlp.w1").data_ptr() == host["mlp.w1"].data_ptr()


def test_llama4_experts_run_on_router_scaled_inputs():
    """Llama 4 runs every expert on x · sigmoid(score) and sums: one expert at a time with the input scaled by
    the routing weight gives the same, and the layer is marked input-weighted."""
    model = families.tiny_model(families.family("llama4_text"), seed=3)
    lay = adapter.moe_layers(model)[0]
    layout = lay.probed.layout
    assert lay.input_weighted and (layout.hidden_size, layout.intermediate_size) == (32, 32)  # [E, H, 2I] read right
    hidden = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = adapter.route(lay, hidden)
        scores = torch.zeros(4, lay.num_experts).scatter(1, out.indices, out.weights)  # [N, E]
        routed_in = hidden.repeat(lay.num_experts, 1) * scores.T.reshape(-1, 1)  # the block's own input
        stock = lay.experts(routed_in).reshape(lay.num_experts, 4, 32).sum(0)
        mine = _one_by_one(lay, hidden, out.indices, out.weights, inputs_weighted=True)
    torch.testing.assert_close(mine, stock, rtol=1e-5, atol=1e-6)
    assert torch.equal(adapter.scaled_inputs(hidden, out.weights).reshape(4, lay.top_k, 32)[:, 1],
                       hidden * out.weights[:, 1:])


def test_experts_whose_math_is_not_reproduced_are_refused():
    """A family whose experts compute something else than gated-up, activation, down (here: one added to every
    output) must be refused when described, not offloaded with wrong outputs."""
    model = families.tiny_model(families.family("mixtral"))
    experts = model.model.layers[1].mlp.experts
    stock = type(experts)

    class Shifted(stock):
        def forward(self, hidden, index, weights):
            return stock.forward(self, hidden, index, weights) + 1.0

    experts.__class__ = Shifted
    with pytest.raises(adapter.UnsupportedModelError, match=r"layer 1 \(Shifted\): .*does not reproduce"):
        adapter.describe(model)
