"""Routing models: every twin's structure at narrow widths, where they live, and the error when one is missing."""

from __future__ import annotations

import pytest
import torch

from prescope.models import adapter, routers, twins


@pytest.mark.parametrize("name", twins.list_twins())
def test_a_routing_model_has_its_twins_structure_at_narrow_widths(name):
    cfg = routers.router_config(name)
    assert routers.structure(cfg) == routers.structure(twins.twin_config(name))
    assert cfg.model_type == twins.twin_config(name).model_type
    assert cfg.hidden_size == routers.ROUTER_WIDTHS[name][0] < twins.twin_config(name).hidden_size
    assert cfg.vocab_size == routers.VOCAB and cfg.tie_word_embeddings


@pytest.mark.parametrize("name", twins.list_twins())
def test_a_built_routing_model_routes_like_its_twin(name):
    model = routers.build_router_model(name, hidden=16, expert=8)
    layout, twin = adapter.describe(model), routers.structure(twins.twin_config(name))
    assert (layout.num_moe_layers, layout.num_experts, layout.top_k) == (
        len(twin["moe_layers"]), twin["num_experts"], twin["top_k"])
    assert [lay.layer for lay in adapter.moe_layers(model)] == twin["moe_layers"]
    assert bool(adapter.moe_layers(model)[0].shared) == bool(twin["shared_experts"])
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits  # [1, 3, V]
    assert logits.shape == (1, 3, routers.VOCAB) and torch.isfinite(logits).all()


def test_widths_keep_the_twins_proportions():
    qwen = routers.router_config("qwen1.5-moe-a2.7b", hidden=64, expert=32)
    assert qwen.shared_expert_intermediate_size == 4 * 32  # 5632 / 1408 in the real model
    deepseek = routers.router_config("deepseek-v2-lite", hidden=64, expert=32)
    assert deepseek.intermediate_size == round(32 * 10944 / 1408) and deepseek.n_shared_experts == 2
    assert routers.router_config("qwen3-30b-a3b", hidden=64).num_key_value_heads == 1  # 32 heads : 4 kv
    with pytest.raises(twins.UnknownTwinError, match="divide by 4"):
        routers.router_config("mixtral-8x7b", hidden=30)


def test_a_missing_routing_model_names_the_command_that_builds_it(tmp_path, monkeypatch):
    monkeypatch.setenv(routers.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(routers, "COMMITTED_DIR", tmp_path / "committed")
    assert routers.router_dir("qwen3-30b-a3b") == tmp_path / "cache" / "qwen3-30b-a3b"
    with pytest.raises(routers.MissingRouterError, match="prescope train-tiny --like qwen3-30b-a3b --out .*cache"):
        routers.load_router("qwen3-30b-a3b")
    committed = tmp_path / "committed" / "qwen3-30b-a3b"
    committed.mkdir(parents=True)
    (committed / "config.json").write_text("{}")
    assert routers.router_dir("qwen3-30b-a3b") == committed
    rebuilt = tmp_path / "cache" / "qwen3-30b-a3b"
    rebuilt.mkdir(parents=True)
    (rebuilt / "config.json").write_text("{}")
    assert routers.router_dir("qwen3-30b-a3b") == rebuilt  # a rebuilt model takes precedence
    with pytest.raises(twins.UnknownTwinError, match="known twins"):
        routers.router_dir("gpt-5")


def test_the_committed_mixtral_routing_model_loads_with_a_card_measured_from_it(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv(routers.CACHE_ENV, str(tmp_path))  # nothing rebuilt: the committed copy
    model, tokenizer = routers.load_router("mixtral-8x7b")
    path = routers.router_dir("mixtral-8x7b")
    assert path == routers.COMMITTED_DIR / "mixtral-8x7b"
    card = json.loads((path / "model_card.json").read_text())
    assert card["structure"] == card["twin_structure"] == routers.structure(twins.twin_config("mixtral-8x7b"))
    assert card["params"]["total"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert card["bytes"] == (path / "model.safetensors").stat().st_size
    assert card["source"] == "measured" and tokenizer.vocab_size == routers.VOCAB
    trained = card["routing"]["traces"]["trained"]
    assert trained["random_reuse"] == 2 / 8 < trained["lag1_reuse"]  # experts are reused above chance ...
    assert all(r["loss"] < r["random_loss"] - 1.0 for r in card["heldout"])  # ... and it learned the text
