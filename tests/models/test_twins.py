"""Shape twins: real configurations, tiny forwards of every family, and size accounting that agrees
exactly with a meta-device instantiation."""

import json
import re
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from prescope.data import read_text, shipped
from prescope.models import twins

HARDWARE = shipped("hardware")  # the H200 measurements shipped with the package

# (field, value) pairs each twin's config must have, from DESIGN.md section 3 and the hub configs.
EXPECTED = {
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_local_experts=8, num_experts_per_tok=2, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000),
    "olmoe-1b-7b": dict(model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                        num_experts=64, num_experts_per_tok=8, num_attention_heads=16, vocab_size=50304),
    "qwen1.5-moe-a2.7b": dict(model_type="qwen2_moe", hidden_size=2048, moe_intermediate_size=1408,
                              num_hidden_layers=24, num_experts=60, num_experts_per_tok=4,
                              shared_expert_intermediate_size=5632, vocab_size=151936),
    "deepseek-v2-lite": dict(model_type="deepseek_v2", hidden_size=2048, moe_intermediate_size=1408,
                             num_hidden_layers=27, first_k_dense_replace=1, intermediate_size=10944,
                             n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, q_lora_rank=None,
                             kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             num_attention_heads=16, vocab_size=102400),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, moe_intermediate_size=768,
                          num_hidden_layers=48, num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936),
    "gpt-oss-20b": dict(model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                        num_local_experts=32, num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8,
                        head_dim=64, vocab_size=201088, attention_bias=True, sliding_window=128),
    "gpt-oss-120b": dict(model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                         num_local_experts=128, num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8,
                         head_dim=64, vocab_size=201088, attention_bias=True, sliding_window=128),
}
# Published total parameter counts (billions, rounded as their model cards state them).
# gpt-oss: OpenAI's model card gives 20.91 B / 3.61 B active and 116.83 B / 5.13 B active.
PUBLISHED_TOTAL_B = {"mixtral-8x7b": 46.7, "olmoe-1b-7b": 6.9, "qwen1.5-moe-a2.7b": 14.3,
                     "deepseek-v2-lite": 15.7, "qwen3-30b-a3b": 30.5, "gpt-oss-20b": 20.9, "gpt-oss-120b": 116.8}


def test_list_twins():
    assert twins.list_twins() == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_twin_config_has_the_real_numbers(name):
    cfg = twins.twin_config(name)
    for field, value in EXPECTED[name].items():
        assert getattr(cfg, field) == value, field
    assert twins.twin_config(name, num_layers=3).num_hidden_layers == 3


def meta_counts(cfg):
    """(total, routed-expert, per-layer non-expert) parameter counts of a meta-device instantiation."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    per_layer, total, experts = Counter(), 0, 0
    for key, p in model.named_parameters():
        total += p.numel()
        if ".mlp.experts." in key:
            experts += p.numel()
        elif m := re.search(r"\.layers\.(\d+)\.", key):
            per_layer[int(m.group(1))] += p.numel()
    return total, experts, per_layer


@pytest.mark.parametrize("name", list(EXPECTED))
def test_sizes_agree_exactly_with_a_meta_device_instantiation(name):
    sizes, layers = twins.twin_sizes(name), twins.twin_layer_sizes(name)
    total, experts, per_layer = meta_counts(twins.twin_config(name))
    assert sizes["total_params"] == total
    assert sizes["expert_params"] == experts
    assert list(layers["non_expert"]) == [per_layer[i] for i in range(len(layers))]
    assert sizes["total_bytes"] == 2 * total
    assert round(total / 1e9, 1) == PUBLISHED_TOTAL_B[name]
    cut = twins.twin_sizes(name, num_layers=2)
    assert cut["total_params"] == meta_counts(twins.twin_config(name, 2))[0]


def test_mixtral_expert_is_336_mib():
    sizes = twins.twin_sizes("mixtral-8x7b")
    assert sizes["bytes_per_expert"] == 3 * 4096 * 14336 * 2 == 352_321_536 == 336 * 2**20
    assert sizes["num_moe_layers"] == 32 and sizes["top_k"] == 2
    assert twins.twin_sizes("mixtral-8x7b", dtype=torch.float32)["bytes_per_expert"] == 672 * 2**20


@pytest.mark.parametrize("name, total_b, active_b", [("gpt-oss-20b", 20.91, 3.61), ("gpt-oss-120b", 116.83, 5.13)])
def test_gpt_oss_matches_the_published_counts_and_reports_its_mxfp4_experts(name, total_b, active_b):
    sizes = twins.twin_sizes(name)
    assert round(sizes["total_params"] / 1e9, 2) == total_b
    # the model card's active count leaves out the input embedding (a lookup, no compute)
    active = sizes["active_params_per_token"] - sizes["hidden_size"] * twins.twin_config(name).vocab_size
    assert round(active / 1e9, 2) == active_b
    per_expert = 3 * 2880 * 2880 + 2 * 2880 + 2880  # gate, up, down + gate_up bias [2I] + down bias [H]
    assert sizes["params_per_expert"] == per_expert and sizes["bytes_per_expert"] == 2 * per_expert
    assert sizes["published_expert_format"] == "mxfp4"
    assert sizes["published_bytes_per_expert"] == 3 * 2880 * 2880 * 17 // 32 + 2 * (3 * 2880)
    layers = twins.twin_layer_sizes(name)
    assert set(layers["kind"]) == {"moe"} and layers["router"][0] == EXPECTED[name]["num_local_experts"] * 2881
    assert twins.twin_config(name).layer_types[:2] == ["sliding_attention", "full_attention"]
    assert twins.twin_sizes("mixtral-8x7b")["published_expert_format"] == "bf16"


def test_deepseek_first_layer_is_dense():
    layers = twins.twin_layer_sizes("deepseek-v2-lite")
    assert list(layers["kind"][:2]) == ["dense", "moe"]
    assert layers["dense_mlp"][0] == 3 * 2048 * 10944 and layers["experts"][0] == 0
    assert layers["shared_experts"][1] == 3 * 2048 * 1408 * 2
    assert twins.twin_sizes("deepseek-v2-lite")["num_moe_layers"] == 26
    with pytest.raises(twins.UnknownTwinError, match="num_layers > 1"):
        twins.twin_config("deepseek-v2-lite", num_layers=1)


def test_olmoe_size_matches_the_twin_measured_on_the_h200():
    probe = json.loads(read_text(HARDWARE / "h200-olmoe-twin-resident-and-accelerate-2026-11-28.json"))
    assert twins.twin_sizes("olmoe-1b-7b")["total_params"] / 1e9 == pytest.approx(probe["params_B"], abs=1e-9)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_a_tiny_two_layer_twin_of_each_family_runs_a_forward(name):
    cfg = twins.tiny_twin_config(name, num_layers=2)
    assert cfg.model_type == EXPECTED[name]["model_type"]
    model = twins.build_twin(cfg, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 7, 9]])  # [batch 1, 4 tokens]
    with torch.no_grad():
        logits = model(ids).logits  # [1, 4, V]
    assert logits.shape == (1, 4, cfg.vocab_size) and torch.isfinite(logits).all()
    assert twins.config_sizes(cfg)["total_params"] == sum(p.numel() for p in model.parameters())


def test_build_twin_is_seeded_and_leaves_the_global_rng_alone():
    cfg = twins.tiny_twin_config("olmoe-1b-7b", num_layers=2)
    state = torch.get_rng_state()
    a, b = (twins.build_twin(cfg, seed=3) for _ in range(2))
    c = twins.build_twin(cfg, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    wa, wb, wc = (m.model.layers[0].mlp.experts.down_proj for m in (a, b, c))
    assert wa.dtype == torch.bfloat16 and torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_unknown_twin_names_the_known_ones():
    with pytest.raises(twins.UnknownTwinError, match="known twins: .*mixtral-8x7b"):
        twins.twin_sizes("gpt-5")
