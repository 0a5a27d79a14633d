"""Real traces as subjects: a trace's routing replayed on a tiny twin, in the engine and the simulator."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_structured_route_csv

from prescope.config import EngineConfig
from prescope.engine.engine import Engine
from prescope.experiments import tracesubject as ts
from prescope.policies import POLICIES
from prescope.predict.llaporconfig import LLaPorConfig
from prescope.predict.routellapor import cut_layers, train_routing_llapor
from prescope.routing.reader import read_trace

pytestmark = pytest.mark.usefixtures("one_thread")
WORK = SimpleNamespace(input_len=6, output_len=3, seed=0, prompts=None, predictor=None)


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    """Qwen3-30B-A3B's E (128), top-6 as the shipped trace, 5 layers: a tiny qwen3 twin of 4 replays the first 4."""
    return write_structured_route_csv(tmp_path_factory.mktemp("ts") / "q.route.csv", layers=5, experts=128, top_k=6,
                           prefill=5, decode=40, arch="qwen3moe")


def test_the_twin_runs_exactly_the_traces_experts(csv):
    subject = ts.build_trace_subject(f"qwen3-30b-a3b-tiny:4@trace:{csv}", WORK, torch.device("cpu"))
    assert subject.model.config.num_experts_per_tok == 6 and subject.routing.endswith("q.route.csv")
    replay = subject.replay(2, WORK)
    index = ts.windows(subject.trace, 2, 9)
    assert torch.equal(replay.experts, torch.from_numpy(subject.trace.experts[index]))
    assert (np.diff(subject.trace.tokens["position"].to_numpy()[index], axis=1) == 1).all()  # consecutive tokens
    seen = []
    with Engine(subject.model, EngineConfig(policy="on_demand_lru", device="cpu", budget_share=0.25)) as engine:
        engine.set_replay(replay)
        plan = engine.policy.plan
        engine.policy.plan = lambda view, cache: seen.append((view.step, view.layer, set(view.experts))) or plan(view, cache)
        ids = torch.randint(1, 200, (2, 6), generator=torch.Generator().manual_seed(0))
        engine.generate(ids, max_new_tokens=3)
    assert len(seen) == 3 * 4
    for step, layer, experts in seen:
        span = slice(0, 6) if step == 0 else slice(5 + step, 6 + step)
        want = set(replay.experts[:, span, layer].reshape(-1).tolist())
        assert experts == want, (step, layer)


def test_every_policy_runs_on_the_trace_subject_and_prescope_reads_routing_only_llapor(csv, tmp_path):
    trace = cut_layers(read_trace(csv), 4)
    predictor = train_routing_llapor(trace, LLaPorConfig(distance=2, width=16, max_epochs=2, min_group_layers=1),
                                     progress=False)
    path = predictor.save(tmp_path / "r.pt")
    subject = ts.build_trace_subject(f"qwen3-30b-a3b-tiny:4@trace:{csv}", SimpleNamespace(**{**vars(WORK),
                                     "predictor": str(path)}), torch.device("cpu"))
    replay = subject.replay(1, WORK)
    for name in sorted(POLICIES):
        policy, used = subject.policy(name)
        if name == "prescope":
            assert used == "llapor_routing" and policy.predictor_source is subject.llapor
        with Engine(subject.model, EngineConfig(policy=name, device="cpu", budget_share=0.25), policy=policy) as e:
            e.set_replay(replay)
            out = e.generate(torch.randint(1, 200, (1, 6)), max_new_tokens=3)
        assert out.sequences.shape == (1, 9), name


def test_mismatched_traces_are_refused(csv, tmp_path):
    other = write_structured_route_csv(tmp_path / "e.route.csv", layers=4, experts=10, top_k=2, decode=10)
    with pytest.raises(ts.TraceSubjectError, match="10 experts"):
        ts.build_trace_subject(f"qwen3-30b-a3b-tiny:2@trace:{other}", WORK, torch.device("cpu"))
    with pytest.raises(ts.TraceSubjectError, match="at most 5"):
        ts.build_trace_subject(f"qwen3-30b-a3b-tiny:6@trace:{csv}", WORK, torch.device("cpu"))
    subject = ts.build_trace_subject(f"qwen3-30b-a3b-tiny:4@trace:{csv}", WORK, torch.device("cpu"))
    with pytest.raises(ts.TraceSubjectError, match="input-len"):
        subject.replay(1, SimpleNamespace(input_len=40, output_len=10))
