"""What one short forward teaches the adapter: routers wherever they sit and however their block calls them,
shared experts beside the block, and refusals that name the class, the layer and what is missing."""

from __future__ import annotations

import pytest
import torch

from prescope.engine.engine import Engine
from prescope.experiments.families import check_routes
from prescope.models import adapter, families
from prescope.models.probe import probe


def tiny(model_type: str, seed: int = 0):
    return families.tiny_model(families.family(model_type), seed=seed)


def test_gemma4_router_is_found_by_what_it_does_not_by_an_E_by_H_weight():
    """Gemma 4: the router's weight sits in `.proj`, the experts hang off the decoder layer, and the per-layer
    input gate is a Linear [E, H] (E = hidden_size_per_layer_input here) that shape matching once took."""
    model = tiny("gemma4_text")
    layer = model.model.layers[0]
    assert tuple(layer.per_layer_input_gate.weight.shape) == (6, 32)  # the trap is armed
    for lay in adapter.moe_layers(model):
        assert type(lay.router).__name__ == "Gemma4TextRouter" and lay.block is model.model.layers[lay.layer]
        assert lay.shared == (model.model.layers[lay.layer].mlp,)  # the dense MLP beside the experts
    assert check_routes(model) == "all layers"
    with pytest.raises(adapter.UnsupportedModelError, match="not a linear map"):
        adapter.linear_router(adapter.moe_layers(model)[0])


def test_a_router_that_needs_its_blocks_bias_is_called_with_it():
    """MiniMax-M2's router takes the block's e_score_correction_bias: a bias that favours expert 3 must route
    every token there, through the model and through route()."""
    model = tiny("minimax_m2")
    lay = adapter.moe_layers(model)[0]
    with torch.no_grad():
        lay.block.e_score_correction_bias[3] = 10.0
    out = adapter.route(lay, torch.randn(5, 32))
    assert (out.indices == 3).any(dim=-1).all()
    assert check_routes(model) == "all layers"


@pytest.mark.parametrize("model_type", ["jamba", "dbrx"])
def test_top_k_taken_in_the_block_is_routed_by_running_the_block(model_type):
    model = tiny(model_type)
    lay = adapter.moe_layers(model)[0]
    assert lay.probed.outputs.index_at is None  # the router returns logits only
    assert check_routes(model) == "all layers"
    out = adapter.route(lay, torch.randn(3, 32))
    assert out.logits.shape == (3, 6) and out.indices.shape == out.weights.shape == (3, 2)
    weight, _ = adapter.linear_router(lay)  # a bare Linear: its weights are the logits' map
    assert weight.shape == (6, 32)


def test_routers_that_need_more_than_hidden_states_are_refused_by_route_only():
    """DeepSeek-V4's hash layers route by token id, ZAYA's later layers by the previous layer's router state:
    route() says so (class, layer, argument); the engine needs no router and runs them (test_families)."""
    for model_type, layer, what in (("deepseek_v4", 0, "DeepseekV4HashRouter also takes a tensor"),
                                    ("zaya", 1, "ZayaRouter also takes a tensor")):
        model = tiny(model_type)
        lay = adapter.moe_layers(model)[layer]
        with pytest.raises(adapter.UnsupportedModelError,
                           match=rf"{type(model).__name__}: layer {lay.layer} .*{what}.*cannot be applied"):
            adapter.route(lay, torch.randn(2, 32))


def test_shared_experts_beside_the_block_count_and_norms_never_do():
    model = tiny("granitemoeshared")
    layout = adapter.describe(model)
    shared_mlp = model.model.layers[0].shared_mlp
    assert layout.shared_expert_bytes == sum(p.numel() * p.element_size() for p in shared_mlp.parameters())
    for model_type in ("granitemoeshared", "granitemoe_swa", "granitemoehybrid", "qwen2_moe", "deepseek_v3",
                       "hunyuan_v1_moe", "llama4_text", "inkling_text"):
        for lay in adapter.moe_layers(tiny(model_type)):
            assert lay.shared, f"{model_type} layer {lay.layer}: its shared experts were missed"
            for m in lay.shared:
                assert sum(p.dim() >= 2 for p in m.parameters()) >= 2, f"{model_type}: {type(m).__name__} counted"


def test_encoder_decoder_models_are_refused_by_describe_and_load_model(tmp_path):
    model = families.tiny_model(families.family("switch_transformers"))
    with pytest.raises(adapter.UnsupportedModelError, match="SwitchTransformers.*encoder-decoder models are not supported"):
        adapter.describe(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(adapter.UnsupportedModelError, match="encoder-decoder models are not supported"):
        adapter.load_model(str(tmp_path))


@pytest.mark.parametrize(("model_type", "says"), [
    ("aria_text", r"AriaTextForCausalLM .*split across modules .*layers\.0"),
    ("jetmoe", r"JetMoeForCausalLM .*split across modules .*layers\.0"),
    ("doge", r"DogeForCausalLM .*num_experts.*no module holds per-expert weight matrices"),
    ("longcat_flash", r"LongcatFlashForCausalLM: layer 0 .*zero-computation \(identity\) experts"),
])
def test_refusals_name_the_class_the_layer_and_what_is_missing(model_type, says):
    model = tiny(model_type)
    with pytest.raises(adapter.UnsupportedModelError, match=says):
        adapter.describe(model)
    with pytest.raises(adapter.UnsupportedModelError, match=says):
        Engine(model)


def test_the_probe_runs_once_per_model_and_leaves_it_as_it_was():
    model = tiny("mixtral")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    model.train()
    first = probe(model)
    assert probe(model) is first and model.training
    assert "forward" not in adapter.moe_layers(model)[0].experts.__dict__
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_a_meta_device_model_is_learned_block_by_block():
    """Twins built on the meta device have sizes but no values: each MoE block runs alone there."""
    for model_type in ("mixtral", "deepseek_v3", "jamba", "dbrx"):
        family = families.family(model_type)
        with torch.device("meta"):
            meta = family.model_class(families.tiny_config(family))
        assert adapter.describe(meta) == adapter.describe(families.tiny_model(family)), model_type
    family = families.family("llama4_text")
    with torch.device("meta"):
        meta = family.model_class(families.tiny_config(family))
    with pytest.raises(adapter.UnsupportedModelError, match="meta-device model .*describe a model with weights"):
        adapter.describe(meta)
