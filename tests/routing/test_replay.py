"""Routing replay: recorded routing imposed inside the engine, the limits' future, mismatches refused."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_model

from prescope.config import EngineConfig
from prescope.engine.engine import Engine
from prescope.models import adapter
from prescope.routing.replay import ReplayError, RoutingReplay, record_replay

GEN = dict(do_sample=False, pad_token_id=0)


def ids_for(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def recorded(model, ids, new_tokens: int, with_hidden: bool = False) -> RoutingReplay:
    def run():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, **GEN)
    return record_replay(model, run, with_hidden=with_hidden)


def test_recorded_routing_has_every_position_and_matches_the_model():
    model = tiny_model("olmoe", seed=1)
    layout = adapter.describe(model)
    replay = recorded(model, ids_for(3, 6), new_tokens=4, with_hidden=True)
    B, T, L, K = replay.shape
    assert (B, T, L, K) == (3, 6 + 3, layout.num_moe_layers, layout.top_k)
    assert replay.prompt_len == 6 and replay.hidden.shape == (B, T, L, layout.hidden_size)
    replay.check(layout)


def test_replaying_the_models_own_routing_keeps_its_output_and_tells_the_limits_the_future():
    stock = tiny_model("mixtral", seed=2)
    ids = ids_for(2, 5, seed=3)
    ref = stock.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, **GEN)
    replay = recorded(stock, ids, new_tokens=4)
    layout = adapter.describe(stock)
    for policy in ("on_demand_lru", "belady", "ceiling"):
        model = copy.deepcopy(stock)
        with Engine(model, EngineConfig(policy=policy, device="cpu", budget_share=0.5)) as engine:
            engine.set_replay(replay)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a limit warns when it gets no future
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, **GEN)
        assert torch.equal(out, ref), policy
        assert engine.cache.stats.hits + engine.cache.stats.misses >= layout.top_k


def test_another_models_routing_drives_the_experts():
    source, target = tiny_model("olmoe", seed=1), tiny_model("olmoe", seed=7)
    ids = ids_for(2, 4)
    replay = recorded(source, ids, new_tokens=3)
    seen = []
    with Engine(target, EngineConfig(policy="on_demand_lru", device="cpu", budget_share=1.0)) as engine:
        engine.set_replay(replay)
        with adapter.observe_routing(target, lambda *args: None):
            engine.policy.plan, plan = (lambda view, cache: seen.append(view.experts) or plan(view, cache)), \
                engine.policy.plan
            target.generate(ids_for(2, 4, seed=9), attention_mask=torch.ones(2, 4, dtype=torch.long),
                            max_new_tokens=3, **GEN)
    want = [tuple(sorted(set(replay.experts[:, :4, 0].reshape(-1).tolist())))]
    assert tuple(sorted(seen[0])) == want[0], "the first layer's experts come from the replay"


def test_mismatches_are_refused():
    model = tiny_model("olmoe", seed=1)
    replay = recorded(model, ids_for(2, 4), new_tokens=3)
    other = tiny_model("mixtral", seed=1)  # different K or L
    if (adapter.describe(other).num_moe_layers, adapter.describe(other).top_k) != replay.shape[2:]:
        with pytest.raises(ReplayError, match="MoE layers"):
            Engine(other, EngineConfig(device="cpu", budget_share=1.0)).set_replay(replay)
    with Engine(model, EngineConfig(device="cpu", budget_share=1.0)) as engine:
        engine.set_replay(replay)
        with pytest.raises(ReplayError, match="batch size"):
            model.generate(ids_for(3, 4), attention_mask=torch.ones(3, 4, dtype=torch.long), max_new_tokens=2,
                           **GEN)
    with pytest.raises(ReplayError, match=r"\[B, T, L, K\]"):
        RoutingReplay(torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, 4), 1)


@pytest.mark.usefixtures("one_thread")
def test_replaying_a_models_own_routing_gives_exactly_its_own_logits():
    """The recording is a separate run (transformers' generate) whose hidden states differ from the engine's by
    rounding; its weights used to be applied as recorded, which moved prescope-tiny's logits (6.7e-6 → 7.6e-6
    from stock in float32). Where the replayed experts are the model's own choice, its own weights apply."""
    from prescope.models.tiny import load_tiny

    stock = load_tiny()[0]
    ids = ids_for(2, 8)

    def run(model):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, **GEN)

    replay = record_replay(stock, lambda: run(stock))
    for policy in ("on_demand_lru",):
        logits = []
        for rep in (None, replay):
            model = copy.deepcopy(stock)
            with Engine(model, EngineConfig(policy=policy, device="cpu", budget_share=0.25)) as engine:
                engine.set_replay(rep)
                logits.append(torch.stack(engine.generate(ids, max_new_tokens=4, keep_logits=True).logits))
        assert torch.equal(logits[0], logits[1]), policy


def test_replayed_weights_are_the_recorded_ones_where_the_experts_differ():
    from prescope.routing.replay import replayed_weights

    own_index, own = torch.tensor([[0, 1], [2, 3], [1, 0]]), torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3]])
    index, recorded = torch.tensor([[0, 1], [3, 2], [1, 2]]), torch.tensor([[0.61, 0.39], [0.9, 0.1], [0.8, 0.2]])
    out = replayed_weights(own_index, own.to(torch.bfloat16), index, recorded)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float(), torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.8, 0.2]]).to(torch.bfloat16).float())
