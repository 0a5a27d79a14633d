"""Twins driven by their routing models, whole or cut to their first layers (`TWIN[:LAYERS]@router`)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import save_router

from prescope.experiments import routersubject, subjects
from prescope.experiments.bench import BenchConfig
from prescope.experiments.subjects import parse_model


def bench_cfg(tmp_path, spec, **kw) -> BenchConfig:
    np.save(tmp_path / "prompts.npy", np.random.default_rng(0).integers(1, 8000, (2, 8)))
    return BenchConfig(models=(spec,), device="cpu", out=str(tmp_path / "out"), prompts=str(tmp_path / "prompts.npy"),
                       input_len=6, output_len=3, **kw)


def run(subject, replay, ids, policy, budget):
    from prescope.config import EngineConfig
    from prescope.engine.engine import Engine

    model = copy.deepcopy(subject.model)
    built, _ = subject.policy(policy)
    with Engine(model, EngineConfig(policy=policy, device="cpu", **budget), policy=built) as engine:
        engine.set_replay(replay)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out, engine


@pytest.mark.parametrize("spec, moe_layers", [("olmoe-1b-7b-tiny:16@router", 16), ("gpt-oss-20b-tiny:24@router", 24),
                                              ("olmoe-1b-7b-tiny:4@router", 4),
                                              ("deepseek-v2-lite-tiny:3@router", 2)])
def test_a_twin_driven_by_its_routing_model_runs_offloaded_equal_to_its_resident_run(spec, moe_layers, tmp_path,
                                                                                    monkeypatch):
    """Whole or cut: the cut twin replays the first MoE layers of the whole routing model's run (DeepSeek-V2's
    first layer is dense, so its first 3 layers hold 2 MoE layers)."""
    monkeypatch.setenv("PRESCOPE_ROUTERS", str(tmp_path))
    save_router(tmp_path, parse_model(spec)[0].removesuffix("-tiny"))
    cfg = bench_cfg(tmp_path, spec)
    subject = routersubject.build_router_subject(spec, cfg, torch.device("cpu"))
    assert subject.name == spec.split(":")[0] + "@router" and subject.moe_layers == moe_layers
    assert subject.source.config.hidden_size == 16 != subject.model.config.hidden_size
    full, replay = subjects.Subject.replay(subject, 2, cfg), subject.replay(2, cfg)  # the whole model's, the cut
    assert replay.shape[2] == moe_layers <= full.shape[2] == subjects.adapter.describe(subject.source).num_moe_layers
    assert torch.equal(replay.experts, full.experts[:, :, :moe_layers])  # the first layers of the whole model's run
    assert torch.equal(replay.hidden, full.hidden[:, :, :moe_layers]) and replay.hidden.shape[-1] == 16
    gate = subject.gate_lookahead()
    assert gate.layout.num_moe_layers == len(gate.routers) == moe_layers
    ids = subjects.prompt_ids(subject.model, 2, cfg.input_len, cfg.seed)
    ref, _ = run(subject, replay, ids, "on_demand_lru", dict(budget_share=1.0))
    layout = subjects.adapter.describe(subject.model)
    for policy in ("on_demand_lru", "prescope"):  # prescope on gate lookahead: the cut routers
        out, engine = run(subject, replay, ids, policy, dict(budget_bytes=layout.top_k * layout.expert_bytes))
        assert torch.equal(out.sequences, ref.sequences), policy
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-5)
        assert engine.cache.stats.loads > 0  # experts moved: the budget holds one layer's top-k


def test_router_subjects_refuse_a_missing_model_too_many_layers_and_no_prompts(tmp_path, monkeypatch):
    from prescope.models.routers import MissingRouterError
    from prescope.models.twins import UnknownTwinError

    monkeypatch.setenv("PRESCOPE_ROUTERS", str(tmp_path))
    monkeypatch.setattr("prescope.models.routers.COMMITTED_DIR", tmp_path / "none")
    cfg = bench_cfg(tmp_path, "olmoe-1b-7b-tiny:16@router")
    with pytest.raises(MissingRouterError, match="prescope train-tiny --like olmoe-1b-7b"):
        routersubject.build_router_subject("olmoe-1b-7b-tiny:16@router", cfg, torch.device("cpu"))
    save_router(tmp_path, "olmoe-1b-7b")
    with pytest.raises(UnknownTwinError, match="has 16 layers; a twin cut to its first layers takes at most that many"):
        routersubject.build_router_subject("olmoe-1b-7b-tiny:20@router", cfg, torch.device("cpu"))
    with pytest.raises(ValueError, match="needs --prompts"):
        routersubject.build_router_subject("olmoe-1b-7b-tiny:4@router", BenchConfig(device="cpu"), torch.device("cpu"))


def test_a_twin_that_is_not_a_prefix_of_the_routing_model_is_refused(tmp_path, monkeypatch):
    """A routing model of another shape (here: Mixtral's, 8 experts) cannot drive the OLMoE twin."""
    from prescope.models import routers

    monkeypatch.setenv("PRESCOPE_ROUTERS", str(tmp_path))
    save_router(tmp_path, "mixtral-8x7b")
    twin = subjects.build_subject("olmoe-1b-7b-tiny:2", torch.device("cpu"), 0)
    source, _ = routers.load_router("mixtral-8x7b")
    with pytest.raises(routersubject.RouterSubjectError, match="routes top-2 of 8 experts, the twin top-8 of 64"):
        routersubject.cut_count("olmoe-1b-7b-tiny:2@router", twin, source)
    deep = subjects.build_subject("deepseek-v2-lite-tiny:3", torch.device("cpu"), 0)  # layer 0 dense, 1-2 MoE
    from transformers import AutoModelForCausalLM

    cfg = routers.router_config("deepseek-v2-lite", hidden=16, expert=8, num_layers=4)
    cfg.first_k_dense_replace = 0  # the same E and K, MoE layers from layer 0: not the twin's positions
    shifted = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(routersubject.RouterSubjectError, match=r"MoE layers \[1, 2\] are not the routing model's first"):
        routersubject.cut_count("deepseek-v2-lite-tiny:3@router", deep, shifted)
    save_router(tmp_path, "deepseek-v2-lite")
    assert routersubject.cut_count("x", deep, routers.load_router("deepseek-v2-lite")[0]) == 2


def test_cut_layout_and_replay_keep_the_first_layers():
    from prescope.models import adapter
    from prescope.routing.replay import RoutingReplay

    layout = adapter.describe(subjects.build_subject("deepseek-v2-lite-tiny:5", torch.device("cpu"), 0))
    cut = routersubject.cut_layout(layout, 2)
    assert cut.moe_layers == (1, 2) and cut.num_layers == 3 and cut.dense_layers == (0,)
    assert routersubject.cut_layout(layout, layout.num_moe_layers) is layout
    experts = torch.arange(2 * 5 * 4 * 2).reshape(2, 5, 4, 2) % 8
    replay = RoutingReplay(experts, torch.ones(2, 5, 4, 2), 3, torch.randn(2, 5, 4, 6))
    short = routersubject.cut_replay(replay, 3)
    assert short.shape == (2, 5, 3, 2) and short.prompt_len == 3 and short.hidden.shape == (2, 5, 3, 6)
    assert torch.equal(short.experts, experts[:, :, :3])
