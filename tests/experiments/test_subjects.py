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
