"""Discovery of the MoE families of the installed transformers and their tiny instances."""

from __future__ import annotations

import pytest
import transformers

from prescope.models import families

FOUND = {f.model_type: f for f in families.discover()}


def test_discovery_finds_families_from_their_config_classes():
    # the families the adapter's seams were built for, found without being listed anywhere in prescope
    named = {"mixtral", "qwen3_moe", "gemma4_text", "hunyuan_v1_moe", "minimax_m2", "jamba", "llama4_text", "dbrx",
             "granitemoeshared", "granitemoe_swa", "granitemoehybrid", "switch_transformers", "nllb-moe"}
    assert named <= set(FOUND), sorted(named - set(FOUND))
    assert FOUND["dbrx"].config_class is transformers.DbrxConfig  # experts declared by a sub-config (ffn_config)
    assert "llama4" not in FOUND and "gemma4" not in FOUND  # wrappers whose text config is a family of its own
    assert FOUND["qwen3_vl_moe_text"].wrapper_class is transformers.Qwen3VLMoeConfig  # built inside its wrapper
    assert FOUND["switch_transformers"].encoder_decoder


def test_every_skip_and_quirk_names_a_discovered_family_and_says_why():
    assert set(families.SKIP) <= set(FOUND) and set(families.QUIRKS) <= set(FOUND)
    assert all(reason.strip() for reason in families.SKIP.values())
    assert all(why.strip() for _, why in families.QUIRKS.values())
    for f in FOUND.values():
        assert bool(f.skip) == (f.model_class is None), f.model_type


def test_tiny_instances_are_small_real_models():
    model = families.tiny_model(FOUND["mixtral"])
    assert type(model) is transformers.MixtralForCausalLM
    assert model.config.hidden_size == families.HIDDEN and model.config.num_local_experts == families.EXPERTS
    assert sum(p.numel() for p in model.parameters()) < 100_000
    again = families.tiny_model(FOUND["mixtral"])
    assert all(a.equal(b) for a, b in zip(model.parameters(), again.parameters(), strict=True))  # seeded


def test_unknown_family_and_skipped_family_say_what_to_do():
    with pytest.raises(ValueError, match="not a MoE family.*choose from"):
        families.family("llama")
    skipped = next(f for f in FOUND.values() if f.skip)
    with pytest.raises(ValueError, match="is not built"):
        families.tiny_config(skipped)
