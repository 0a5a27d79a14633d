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


def test_a_routing_models_subject_is_not_built_here(tmp_path):
    cfg = BenchConfig(device="cpu", out=str(tmp_path), prompts="heldout")
    with pytest.raises(ValueError, match="routersubject.build_router_subject"):
        subjects.build_bench_subject("olmoe-1b-7b-tiny:16@router", cfg, torch.device("cpu"))
