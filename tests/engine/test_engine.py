"""The heart of the suite: the offloaded model gives the stock model's output, for every architecture,
policy and cache size; plus invariants of the slot pool under random routings."""

from __future__ import annotations

import copy
import sys
import threading
import time

import pytest
import torch
from conftest import GEN, assert_generation_equal, stock_padded_run, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from prescope.config import EngineConfig
from prescope.engine.engine import Engine
from prescope.engine.streams import CpuStreams
from prescope.engine.transfers import IOWorker
from prescope.layout import ModelLayout
from prescope.models import adapter, twins
from prescope.policies import POLICIES, parse_policy
from prescope.policies.base import OnDemandLRU


def budgets(layout: ModelLayout) -> dict[str, dict]:
    """Smallest feasible (one layer's top-k), a middle one, and everything resident."""
    return {"min": dict(budget_bytes=layout.top_k * layout.expert_bytes),
            "half": dict(budget_share=0.5),
            "all": dict(budget_share=1.0)}


# prescope's gate runs these tiny experts on demand under the default (h200) profile; ungated, it plans
UNGATED = "prescope[gate=False]"
MANY_CPU = "cpu_misses+cpu3"  # three CPU experts at once (a 2-core machine's default pool has one thread)


def generate_offloaded(stock, ids, mask, policy, budget):
    model = copy.deepcopy(stock)
    spec = parse_policy(policy)
    config = EngineConfig(policy=spec.name, device="cpu", **spec.engine_options, **budget)
    with Engine(model, config, policy=spec.build()) as engine:
        out = model.generate(ids, attention_mask=mask, **GEN)
    return out, engine


@pytest.mark.parametrize("policy", [*sorted(POLICIES), UNGATED, MANY_CPU])
def test_offloaded_generate_equals_stock(arch, policy):
    stock, ids, mask, ref = stock_padded_run(arch)
    layout = adapter.describe(stock)
    for name, budget in budgets(layout).items():
        out, engine = generate_offloaded(stock, ids, mask, policy, budget)
        assert_generation_equal(out, ref, f"{arch}/{policy}/{name}")
        stats = engine.cache.stats
        ran_on_cpu = any(row[0] == "cpu" for row in engine.records.rows)
        assert stats.hits + stats.misses > 0 or ran_on_cpu, "no expert ran anywhere"
        if policy == MANY_CPU:
            assert engine.cpu_workers == 3 and (ran_on_cpu or name == "all")
        if name == "all":
            assert stats.loads == 0, "everything resident must not load during generation"


def test_budget_below_one_layer_topk_states_the_minimum():
    model = tiny_model("olmoe")
    layout = adapter.describe(model)
    with pytest.raises(ValueError, match=rf"at least 3 slots \({3 * layout.expert_bytes} bytes"):
        Engine(model, EngineConfig(budget_bytes=2 * layout.expert_bytes, device="cpu"))


def test_unknown_policy_and_model_without_moe():
    import transformers

    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        Engine(tiny_model("olmoe"), EngineConfig(policy="nope", device="cpu"))
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(adapter.UnsupportedModelError, match="LlamaForCausalLM"):
        Engine(transformers.AutoModelForCausalLM.from_config(cfg), EngineConfig(device="cpu"))


def test_timeline_and_steps_are_recorded():
    model = tiny_model("olmoe")
    with Engine(model, EngineConfig(budget_share=0.5, device="cpu")) as engine:
        model.generate(torch.randint(1, 96, (2, 4)), max_new_tokens=3, do_sample=False, pad_token_id=0)
    timeline, steps = engine.timeline(), engine.step_table()
    assert list(steps["phase"]) == ["prefill", "decode", "decode"]
    assert (steps["latency"] > 0).all()
    assert timeline.attrs["source"] == "measured"
    assert set(timeline["lane"]) >= {"gpu", "pcie"}
    loads = timeline[timeline["lane"] == "pcie"]
    assert len(loads) == engine.cache.stats.loads
    assert (timeline["end"] >= timeline["start"]).all()


# ---- invariants under random routings --------------------------------------------------------------------
class Watch:
    """Wraps the engine's cache operations to check the pool's invariants as they happen."""

    def __init__(self, engine: Engine):
        self.engine, self.cpu_computed = engine, []
        cache = engine.cache
        original_use = cache.use

        def use(key, *, hit):
            slot = cache.slot(key)
            assert cache.owner(slot) == key and cache.state(slot).value == "resident"
            for name, host in engine._host[key[0]].items():  # the copy is complete: slot holds the weights
                assert torch.equal(engine.slot_tensors[name][slot], host[key[1]])
            original_use(key, hit=hit)

        cache.use = use


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_routings_keep_pool_invariants(data):
    model = tiny_model("olmoe", seed=3)
    layout = adapter.describe(model)
    E, K, L = layout.num_experts, layout.top_k, layout.num_moe_layers
    slots = data.draw(st.integers(K, L * E), label="slots")
    policy = data.draw(st.sampled_from(sorted(POLICIES)), label="policy")
    engine = Engine(model, EngineConfig(policy=policy, budget_bytes=slots * layout.expert_bytes, device="cpu"))
    watch = Watch(engine)
    layers = adapter.moe_layers(model)
    for step in range(data.draw(st.integers(1, 4), label="steps")):
        engine.records.step = step
        for lay in layers:
            n = data.draw(st.integers(1, 9), label="tokens")
            idx = torch.stack([torch.randperm(E)[:K] for _ in range(n)])  # [N, K]
            weights = torch.rand(n, K)
            hidden = torch.randn(n, layout.hidden_size)
            got = engine.moe_step(lay.ordinal, lay.experts, hidden, idx, weights)
            want = lay.experts.__class__.forward.__wrapped__(lay.experts, hidden, idx, weights) \
                if hasattr(lay.experts.__class__.forward, "__wrapped__") else None
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert len(engine.cache.present_keys()) <= slots
            assert not any(map(engine.cache.is_pinned, range(slots))), "pins must be released when the layer ends"
    cpu_rows = [(r[1], r[2], r[3]) for r in engine.records.rows if r[0] == "cpu"]
    assert len(cpu_rows) == len(set(cpu_rows)), "a CPU expert was computed twice in one layer step"
    assert watch
    engine.close()


def test_summary_has_per_step_latency_bytes_hits_and_idle():
    model = tiny_model("mixtral")
    with Engine(model, EngineConfig(budget_share=0.5, device="cpu")) as engine:
        model.generate(torch.randint(1, 96, (2, 4)), max_new_tokens=3, do_sample=False, pad_token_id=0)
    summary = engine.summary()
    assert list(summary["phase"]) == ["prefill", "decode", "decode"]
    assert summary["bytes"].sum() == engine.cache.stats.loads * engine.layout.expert_bytes
    assert summary["hits"].sum() + summary["misses"].sum() == engine.cache.stats.hits + engine.cache.stats.misses
    assert ((summary["gpu_idle"] >= 0) & (summary["gpu_idle"] <= summary["latency"] + 1e-9)).all()


def test_cpu_worker_failure_surfaces_in_the_caller():
    model = tiny_model("olmoe")
    engine = Engine(model, EngineConfig(policy="cpu_misses", budget_bytes=3 * adapter.describe(model).expert_bytes,
                                        device="cpu"))
    host = engine._host[1]["down_proj"]
    engine._host[1]["down_proj"] = host[:, :, :1]  # a broken host buffer: CPU experts of layer 1 must fail
    with pytest.raises(RuntimeError):
        model.generate(torch.randint(1, 96, (1, 6)), max_new_tokens=4, do_sample=False, pad_token_id=0)
    engine._host[1]["down_proj"] = host
    out = model.generate(torch.randint(1, 96, (1, 6)), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8), "the engine stays usable after a worker failure"
    engine.close()


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
@pytest.mark.parametrize("policy", ["on_demand_lru", "lookahead_prefetch", "prescope"])
def test_async_io_with_small_chunks_keeps_the_stock_output(arch, policy):
    """AsyncIO forced on with chunks of 256 bytes: queued, overtaken, promoted, cancelled and cut copies."""
    stock = tiny_model(arch, seed=4)
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(5))
    ref = stock.generate(ids, attention_mask=torch.ones_like(ids), **GEN)
    layout = adapter.describe(stock)
    for budget in (dict(budget_bytes=layout.top_k * layout.expert_bytes), dict(budget_share=0.5)):
        model = copy.deepcopy(stock)
        config = EngineConfig(policy=policy, device="cpu", async_io=True, io_chunk_bytes=256, io_depth=1, **budget)
        with Engine(model, config) as engine:
            assert engine.io is not None
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **GEN)
            timeline = engine.timeline()
        assert torch.equal(out.sequences, ref.sequences), f"{arch}/{policy}/{budget}: tokens differ"
        pcie = timeline[timeline["lane"] == "pcie"]
        assert (pcie["end"] >= pcie["start"]).all() and engine.cache.stats.loads >= len(pcie)
        if policy == "on_demand_lru":  # every miss loads; the others may run misses on the CPU
            assert len(pcie) > 0


class HeldStreams(CpuStreams):
    """The CPU twin whose I/O worker issues one chunk per layer: after each prefetch chunk it waits until the
    policy plans the next layer (`advance`), so a prefetch is always part-way when the next layer routes."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.layers, self.moved = 0, threading.Condition()

    def advance(self) -> None:
        with self.moved:
            self.layers += 1
            self.moved.notify_all()

    def issue(self, dst, src):
        done = super().issue(dst, src)
        if threading.current_thread().name == "prescope-io":
            with self.moved:
                seen = self.layers
                self.moved.wait_for(lambda: self.layers != seen, timeout=5.0)
        return done


class PrefetchUnrouted(OnDemandLRU):
    """on_demand_lru, plus the next layer's experts that its true routing leaves out, prefetched (all wrong)."""

    name = "prefetch_unrouted_test"
    async_io = True

    def __init__(self, routing: dict, streams: HeldStreams):
        self.routing, self.streams = routing, streams

    def plan(self, view, cache):
        self.streams.advance()
        orders = super().plan(view, cache)
        later = self.routing.get((view.step, view.layer + 1))
        if later is not None:
            orders.prefetch = [(view.layer + 1, e) for e in range(view.num_experts) if e not in later]
        return orders


def test_prefetches_no_layer_uses_are_cut_part_way_and_the_output_stays_stock():
    """AsyncIO: a prefetch the next layer's routing leaves out is cut before its next chunk; its slot, holding
    part of an expert, is freed and never read."""
    stock = tiny_model("olmoe", seed=4)
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(5))
    calls = []
    with adapter.observe_routing(stock, lambda layer, hidden, logits, weights, index: calls.append((layer, index))):
        ref = stock.generate(ids, attention_mask=torch.ones_like(ids), **GEN)
    L = adapter.describe(stock).num_moe_layers
    routing = {(i // L, layer): set(index.reshape(-1).tolist()) for i, (layer, index) in enumerate(calls)}
    model = copy.deepcopy(stock)
    config = EngineConfig(device="cpu", budget_share=0.5, io_chunk_bytes=256, io_depth=1)
    streams = HeldStreams()
    with Engine(model, config, policy=PrefetchUnrouted(routing, streams)) as engine:
        engine.io.close()
        engine.streams, engine.io = streams, IOWorker(streams, 256, 1)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **GEN)
        stopped = dict(engine.records.stopped)
        streams.advance()
    assert stopped["part_way"] > 0
    assert torch.equal(out.sequences, ref.sequences)


class FailingStreams(CpuStreams):
    """The CPU twin whose `at`-th expert copy writes its first tensor, then fails with `error` (a copy
    interrupted half-way: Ctrl-C in a notebook, or a broken link)."""

    def __init__(self, at: int, error: BaseException):
        super().__init__(torch.device("cpu"))
        self.calls, self.at, self.error = 0, at, error

    def copy_many(self, pairs, after=None):
        self.calls += 1
        if self.calls == self.at:
            pairs[0][0].copy_(pairs[0][1])
            raise self.error
        return super().copy_many(pairs, after)


@pytest.mark.parametrize("error, every", [(KeyboardInterrupt(), 1), (OSError("link down"), 3)],
                         ids=["interrupt", "failure"])
def test_a_copy_failing_at_any_point_of_a_step_leaves_the_next_generate_stock(error, every):
    """Every copy of the prefill and the first decode steps, in turn (every third for a failure), fails
    half-way; the same engine's next generate gives the stock tokens and logits (the slot table names a key
    only once its copy was issued; a failed layer resets the pool before the next step)."""
    stock = tiny_model("olmoe", seed=4)
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(5))
    ref = stock.generate(ids, attention_mask=torch.ones_like(ids), **GEN)
    model = copy.deepcopy(stock)
    layout = adapter.describe(stock)
    config = EngineConfig(device="cpu", budget_bytes=layout.top_k * layout.expert_bytes, async_io=False)
    with Engine(model, config) as engine:
        counting = FailingStreams(at=0, error=error)
        engine.streams = counting
        first_steps = {**GEN, "max_new_tokens": 2}
        model.generate(ids, attention_mask=torch.ones_like(ids), **first_steps)
        copies = counting.calls
        assert copies > 10
        for at in range(1, copies + 1, every):
            engine.streams = FailingStreams(at, error)
            with pytest.raises(type(error)):
                model.generate(ids, attention_mask=torch.ones_like(ids), **first_steps)
            engine.streams = CpuStreams(torch.device("cpu"))
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **GEN)
            assert torch.equal(out.sequences, ref.sequences), f"wrong tokens after a copy failed at {at}/{copies}"
            for got, want in zip(out.logits, ref.logits, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", twins.list_twins())
@pytest.mark.parametrize("policy", ["on_demand_lru", UNGATED])
def test_each_tiny_twin_runs_offloaded_equal_to_stock(name, policy):
    """Every twin's structure (gpt-oss's biases, sinks and clamped SwiGLU included) at tiny widths."""
    stock = twins.build_twin(twins.tiny_twin_config(name, num_layers=2), dtype=torch.float32, seed=1)
    ids = torch.randint(1, stock.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ref = stock.generate(ids, attention_mask=mask, **GEN)
    for budget_name, budget in budgets(adapter.describe(stock)).items():
        out, _ = generate_offloaded(stock, ids, mask, policy, budget)
        assert torch.equal(out.sequences, ref.sequences), f"{name}/{policy}/{budget_name}: tokens differ"
        for got, want in zip(out.logits, ref.logits, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class WatchSwitch(OnDemandLRU):
    """on_demand_lru that notes the interpreter's thread switch interval whenever it plans a layer."""

    name = "watch_switch_test"

    def __init__(self):
        super().__init__()
        self.seen: list[float] = []

    def plan(self, view, cache):
        self.seen.append(sys.getswitchinterval())
        return super().plan(view, cache)


def test_the_switch_interval_holds_while_the_engine_generates_and_is_restored_after():
    stock = tiny_model("olmoe", seed=4)
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(5))
    before, outs = sys.getswitchinterval(), []
    for interval in (None, 1e-4):
        watch = WatchSwitch()
        config = EngineConfig(device="cpu", budget_share=0.5, async_io=True, io_chunk_bytes=256,
                              switch_interval_s=interval)
        with Engine(copy.deepcopy(stock), config, policy=watch) as engine:
            outs.append(engine.generate(ids, torch.ones_like(ids), max_new_tokens=3).sequences)
        want = before if interval is None else interval
        assert watch.seen and all(abs(v - want) < 1e-9 for v in watch.seen)  # every layer planned under it
        assert sys.getswitchinterval() == before  # restored
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="switch_interval_s"):
        EngineConfig(switch_interval_s=0.0)


class _WaitingLRU(OnDemandLRU):
    """LRU whose every plan spends a measured ~1 ms 'waiting for the device' (as a GPU forecast's read does)."""

    def plan(self, view, cache):
        import time

        began = time.perf_counter()
        time.sleep(0.001)
        self.forecast_wait_s += time.perf_counter() - began
        return super().plan(view, cache)


def test_the_policys_wait_for_the_device_is_recorded_apart_from_its_host_work():
    model = tiny_model("olmoe")
    policy = _WaitingLRU()
    with Engine(model, EngineConfig(budget_share=0.5, device="cpu", timing="off"), policy=policy) as engine:
        model.generate(torch.randint(1, 96, (2, 4)), max_new_tokens=3, do_sample=False, pad_token_id=0)
    r, L = engine.records, engine.layout.num_moe_layers
    assert set(r.wait_by_step) == set(r.plan_by_step) == {0, 1, 2}
    assert sum(r.wait_by_step.values()) == pytest.approx(policy.forecast_wait_s)
    assert all(w >= 0.001 * L for w in r.wait_by_step.values())  # every layer of every step waited
    assert all(v >= 0 for v in r.plan_by_step.values())
    total = sum(r.plan_seconds) + sum(r.victim_seconds)
    assert sum(r.plan_by_step.values()) + sum(r.wait_by_step.values()) == pytest.approx(total)
    assert sum(r.forecast_wait_seconds) == pytest.approx(policy.forecast_wait_s)
    # the engine's own host time excludes the wait: less than the layers' wall time by at least the wait
    assert sum(r.own_seconds.values()) <= sum(r.host_seconds) - sum(r.sync_seconds) - policy.forecast_wait_s + 1e-9


class _TimedLRU(OnDemandLRU):
    """on_demand_lru that keeps the step times the engine reports, and sleeps a while at each layer."""

    def __init__(self, **options):
        super().__init__(**options)
        self.steps: list[float] = []

    def step_measured(self, seconds: float) -> None:
        self.steps.append(seconds)

    def plan(self, view, cache):
        time.sleep(0.002)
        return super().plan(view, cache)


def test_the_engine_reports_each_steps_time_to_the_policy_but_not_the_pause_between_two_generates():
    model = tiny_model("olmoe")
    policy = _TimedLRU()
    ids = torch.randint(1, 96, (2, 4))
    with Engine(model, EngineConfig(budget_share=0.5, device="cpu", timing="off"), policy=policy) as engine:
        engine.generate(ids, max_new_tokens=4)  # a prefill and 3 decode steps: the last is never followed
        assert len(policy.steps) == 3
        time.sleep(0.5)  # another caller's work between two runs
        engine.generate(ids, max_new_tokens=4)
    L = engine.layout.num_moe_layers
    assert len(policy.steps) == 6
    assert all(0.002 * L <= s < 0.5 for s in policy.steps)  # each holds its layers' plans, none the pause
