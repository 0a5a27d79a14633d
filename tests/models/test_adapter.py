"""The adapter on every supported architecture: layout, routing, observation and one-expert compute."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_model

from prescope.layout import LayoutMismatchError, ModelLayout
from prescope.models import adapter

EXPECTED = {  # arch: (E, K, dense layers, has shared experts)
    "mixtral": (6, 2, (), False),
    "qwen2_moe": (8, 3, (), True),
    "qwen3_moe": (8, 2, (), False),
    "olmoe": (8, 3, (), False),
    "deepseek_v2": (8, 2, (0,), True),
    "deepseek_v3": (8, 2, (0,), True),
    "phimoe": (6, 2, (), False),
    "granitemoe": (6, 2, (), False),
}


def test_describe(arch):
    model = tiny_model(arch)
    layout = adapter.describe(model)
    num_experts, top_k, dense, shared = EXPECTED[arch]
    assert (layout.num_experts, layout.top_k, layout.dense_layers) == (num_experts, top_k, dense)
    assert layout.moe_layers == tuple(i for i in range(3) if i not in dense)
    assert layout.hidden_size == 32
    assert (layout.shared_expert_bytes > 0) == shared
    intermediate = layout.intermediate_size
    assert layout.expert_bytes == 3 * 32 * intermediate * 4  # gated expert, float32
    assert ModelLayout.from_dict(layout.to_dict()) == layout


def test_route_and_observe_match_experts_input(arch):
    model = tiny_model(arch)
    layers = adapter.moe_layers(model)
    seen = {}

    def callback(ordinal, hidden, logits, weights, indices):
        seen[ordinal] = (hidden.clone(), logits, weights.clone(), indices.clone())

    ids = torch.randint(0, 96, (2, 5))
    with adapter.observe_routing(model, callback), torch.no_grad():
        model(ids)
    assert sorted(seen) == [lay.ordinal for lay in layers]
    for lay in layers:
        hidden, logits, weights, indices = seen[lay.ordinal]
        assert hidden.shape == (10, 32) and indices.shape == weights.shape == (10, model.config.num_experts_per_tok)
        again = adapter.route(lay, hidden)
        assert torch.equal(again.indices, indices)
        torch.testing.assert_close(again.weights, weights)
        assert logits is not None and logits.shape[-1] == adapter.describe(model).num_experts
    # hooks are removed afterwards
    seen.clear()
    with torch.no_grad():
        model(ids)
    assert not seen


def test_expert_forward_reproduces_the_stock_experts(arch):
    model = tiny_model(arch)
    lay = adapter.moe_layers(model)[0]
    hidden = torch.randn(7, 32)
    out = adapter.route(lay, hidden)
    with torch.no_grad():
        stock = lay.experts(hidden, out.indices, out.weights)
        mine = torch.zeros_like(hidden)
        for n in range(hidden.shape[0]):
            for k in range(out.indices.shape[1]):
                e = int(out.indices[n, k])
                y = adapter.expert_forward(lay.experts, hidden[n:n + 1], adapter.expert_params(lay.experts, e))
                mine[n] += out.weights[n, k] * y[0]
    torch.testing.assert_close(mine, stock, rtol=1e-5, atol=1e-6)


def test_unsupported_model_names_class_and_gap():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(adapter.UnsupportedModelError, match="LlamaForCausalLM.*experts"):
        adapter.describe(model)


def test_layout_mismatch_names_fields():
    a = adapter.describe(tiny_model("olmoe"))
    b = adapter.describe(tiny_model("mixtral"))
    with pytest.raises(LayoutMismatchError, match="num_experts: trace has 6, model has 8"):
        a.check_compatible(b, "trace")
    a.check_compatible(a)


def test_load_model_from_local_directory(tmp_path):
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    loaded = adapter.load_model(str(tmp_path))
    assert adapter.describe(loaded) == adapter.describe(model)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_tiny_config_families_are_real_classes(arch):
    assert type(tiny_config(arch)).__module__.startswith("transformers.models.")


def test_router_logits_off_while_dispatch_installed_and_on_load(tmp_path):
    model = tiny_model("mixtral")
    model.config.output_router_logits = True
    dispatch = adapter.install_dispatch(model, lambda experts, h, index, weights: torch.zeros_like(h))
    assert model.config.output_router_logits is False
    dispatch.remove()
    assert model.config.output_router_logits is True
    model.save_pretrained(tmp_path / "m")
    assert adapter.load_model(str(tmp_path / "m")).config.output_router_logits is False
