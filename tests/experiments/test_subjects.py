"""The bench's subjects: model specs, the prompts that drive them, and what a twin driven by prescope-tiny needs."""

from __future__ import annotations

import pytest
import torch

from prescope.experiments import subjects
from prescope.experiments.bench import BenchConfig
from prescope.experiments.subjects import parse_model, routing_source


def test_model_specs():
    assert parse_model("mixtral-8x7b:8") == ("mixtral-8x7b", 8)
    assert parse_model("olmoe-1b-7b@prescope-tiny") == ("olmoe-1b-7b", None)
    assert routing_source("olmoe-1b-7b@prescope-tiny") == "prescope-tiny"
    assert routing_source("olmoe-1b-7b") is None
    with pytest.raises(ValueError, match="only prescope-tiny.s routing or the twin.s routing model"):
        routing_source("olmoe-1b-7b@mixtral-8x7b")


def test_a_twin_driven_by_prescope_tiny_needs_its_prompts(tmp_path):
    cfg = BenchConfig(models=("olmoe-1b-7b-tiny:16@prescope-tiny",), device="cpu", out=str(tmp_path))
    with pytest.raises(ValueError, match="--prompts"):
        subjects.build_bench_subject(cfg.models[0], cfg, torch.device("cpu"))


def test_heldout_prompts_are_windows_of_every_domain():
    prompts = subjects.load_prompts(subjects.HELDOUT, 32)
    assert prompts.shape[1] == 32 and len(prompts) >= 5 and prompts.max() < 8192


def save_router(root, name, hidden=16, expert=8):
    """An untrained routing model of twin `name` at tiny widths, saved where `load_router` looks."""
    from prescope.models import routers
    from prescope.models.tiny import load_tiny

    model = routers.build_router_model(name, hidden=hidden, expert=expert)
    model.save_pretrained(root / name)
    load_tiny()[1].save_pretrained(root / name)


@pytest.mark.parametrize("spec", ["olmoe-1b-7b-tiny:16@router", "gpt-oss-20b-tiny:24@router"])
def test_a_twin_driven_by_its_routing_model_runs_offloaded_equal_to_its_resident_run(spec, tmp_path, monkeypatch):
    import copy

    import numpy as np

    from prescope.config import EngineConfig
    from prescope.engine.engine import Engine

    monkeypatch.setenv("PRESCOPE_ROUTERS", str(tmp_path))
    save_router(tmp_path, parse_model(spec)[0].removesuffix("-tiny"))
    np.save(tmp_path / "prompts.npy", np.random.default_rng(0).integers(1, 8000, (2, 8)))
    cfg = BenchConfig(models=(spec,), device="cpu", out=str(tmp_path / "out"), prompts=str(tmp_path / "prompts.npy"),
                      input_len=6, output_len=3)
    subject = subjects.build_bench_subject(spec, cfg, torch.device("cpu"))
    assert subject.name == spec.replace(":16", "").replace(":24", "")
    assert subject.source.config.hidden_size == 16 != subject.model.config.hidden_size
    replay = subject.replay(2, cfg)
    assert replay.hidden.shape[-1] == 16  # the routing model's hidden states: what its predictors read
    ids = subjects.prompt_ids(subject.model, 2, cfg.input_len, cfg.seed)

    def run(policy, budget):
        model = copy.deepcopy(subject.model)
        built, _ = subject.policy(policy)
        with Engine(model, EngineConfig(policy=policy, device="cpu", **budget), policy=built) as engine:
            engine.set_replay(replay)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                                 do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        return out, engine

    ref, _ = run("on_demand_lru", dict(budget_share=1.0))
    layout = subjects.adapter.describe(subject.model)
    for policy in ("on_demand_lru", "prescope"):
        out, engine = run(policy, dict(budget_bytes=layout.top_k * layout.expert_bytes))
        assert torch.equal(out.sequences, ref.sequences), policy
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-5)
        assert engine.cache.stats.loads > 0  # experts moved: the budget holds one layer's top-k


def test_router_subjects_refuse_a_missing_model_and_a_cut_twin(tmp_path, monkeypatch):
    import numpy as np

    from prescope.models.routers import MissingRouterError

    monkeypatch.setenv("PRESCOPE_ROUTERS", str(tmp_path))
    monkeypatch.setattr("prescope.models.routers.COMMITTED_DIR", tmp_path / "none")
    np.save(tmp_path / "prompts.npy", np.ones((2, 8), dtype=np.int64))
    cfg = BenchConfig(device="cpu", out=str(tmp_path / "out"), prompts=str(tmp_path / "prompts.npy"), input_len=6)
    with pytest.raises(MissingRouterError, match="prescope train-tiny --like olmoe-1b-7b"):
        subjects.build_bench_subject("olmoe-1b-7b-tiny:16@router", cfg, torch.device("cpu"))
    save_router(tmp_path, "olmoe-1b-7b")
    with pytest.raises(ValueError, match=r"\(16, 64, 8\), the model \(4, 64, 8\)"):
        subjects.build_bench_subject("olmoe-1b-7b-tiny:4@router", cfg, torch.device("cpu"))
