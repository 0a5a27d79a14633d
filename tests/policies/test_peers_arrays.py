"""The peers over arrays (`belady`'s next-use table and admission, `activation_matrix`'s priorities by key id,
the lookahead's top-K, victims ranked over the cache's slot arrays) decide as their straightforward definitions,
kept here as the reference (the code they replaced): the same orders, planned victims and victim slots at every
layer of replays of synthetic traces (small pools: full caches, waves, Belady's walk stopping) and of the
shipped Qwen3-30B-A3B and gpt-oss-120b traces."""

from __future__ import annotations

import pytest
from conftest import DATA
from test_peers import Fixed, layout, synthetic_trace

from prescope.policies import limits, make_policy, peers
from prescope.policies.base import Orders
from prescope.policies.predictive import UNPLANNED, fastest_split, planned_slot, ranked_victim
from prescope.predict.predictors import PreviousToken
from prescope.routing.llamacpp import load_llamacpp_trace
from prescope.routing.segments import decode_segments
from prescope.sim.simulator import replay


def reference_walk(walked, held: dict, routed: set, free: int):
    """Belady's walk as first written: for each (key, next use) in order, not held, a free slot or the held key
    no routed one whose next use is latest, if later than the key's; yields (key, its victim or None) until a
    key finds neither. `held` (key -> next use) is updated as it walks."""
    for key, use in walked:
        if key in held:
            continue
        victim = None
        if free:
            free -= 1
        else:
            candidates = [k for k in held if k not in routed]
            if not candidates:
                return
            victim = max(candidates, key=lambda k: (held[k], k))
            if held[victim] <= use:
                return
            del held[victim]
        held[key] = use
        yield key, victim


class ReferenceBelady(limits.Belady):
    """Belady as first written: next uses in a dict, the victim searched per key over every held key."""

    def plan(self, view, cache):
        routed, self.layer = {(view.layer, e) for e in view.experts}, view.layer
        future = view.future or ()
        self.ref_next_use = {k: 0 for k in routed}
        for d, experts in enumerate(future, 1):
            for e in experts:
                self.ref_next_use.setdefault((view.layer + d, e), d)
        gpu, cpu = fastest_split(view, cache, self.costs) if view.future is not None else (list(view.experts), [])
        L = view.num_layers
        held = {k: self.ref_distance(k, view.layer, L) for k in cache.present_keys()}
        misses = [(view.layer, e) for e in gpu if not cache.is_present((view.layer, e))]
        self.planned, prefetch = {}, []
        order = misses + [(view.layer + d, e) for d, experts in enumerate(future, 1) for e in experts]
        walked = ((key, self.ref_next_use[key]) for key in order)
        for key, victim in reference_walk(walked, held, routed, cache.free_count):
            self.planned[key] = victim
            if key[0] != view.layer:
                prefetch.append(key)
        self.ref_protect = routed | set(prefetch)
        return Orders(gpu=gpu, cpu=cpu, prefetch=prefetch)

    def ref_distance(self, key, layer, num_layers):
        return self.ref_next_use.get(key, num_layers - layer + key[0])

    def victim(self, cache, key):
        protect = peers._guarded(self.ref_protect, key, self.layer)
        slot = planned_slot(cache, self.planned.pop(key, UNPLANNED), protect)
        if slot is not None:
            return slot
        L = cache.num_layers
        return ranked_victim(cache, protect, lambda k: -self.ref_distance(k, self.layer, L))


class ReferenceActivationMatrix(peers.ActivationMatrixPolicy):
    """activation_matrix as first written: rows sorted per layer in Python, priorities in a dict."""

    def plan(self, view, cache):
        self.memory.observe(view)
        self.layer = view.layer
        L, K = view.num_layers, self.top_k()
        if self.predictor is None:
            depth = min(self.lookahead, L - 1 - view.layer)
            rows = [self.memory.frequency(view.layer + d) for d in range(1, depth + 1)]
        else:
            rows = [p for p, _ in self.forecast(view, self.lookahead)]
        priority = {}
        for d, row in enumerate(rows, 1):
            decay = 1.0 - d / L
            top = sorted(range(self.num_experts), key=lambda e, row=row: (-row[e], e))[:K]
            priority.update({(view.layer + d, e): row[e] * decay for e in top if row[e] > 0})
        self.ref_priority = priority
        ranked = sorted(priority, key=lambda k: (-priority[k], k))
        prefetch = [k for k in ranked if not cache.is_present(k)][:self.max_prefetch or K]
        self.protect = {(view.layer, e) for e in view.experts} | set(prefetch)
        return Orders(gpu=list(view.experts), prefetch=prefetch)

    def victim(self, cache, key):
        protect = peers._guarded(self.protect, key, self.layer)
        return ranked_victim(cache, protect, lambda k: self.ref_priority.get(k, 0.0))


class ReferenceLookahead(peers.LookaheadPrefetch):
    """lookahead_prefetch's top-K as first written (from `forecast`'s lists, sorted in Python)."""

    def next_layer_top(self, view, cache):
        forecast = self.forecast(view, 1)
        if not forecast:
            return []
        p, _ = forecast[0]
        target = view.layer + 1
        ranked = sorted((e for e in range(self.num_experts) if p[e] > 0), key=lambda e: (-p[e], e))
        return [(target, e) for e in ranked[:self.top_k()] if not cache.is_present((target, e))]


class ReferenceHybrid(peers.Hybrid):
    next_layer_top = ReferenceLookahead.next_layer_top


def decisions(policy, trace, batch: int, budget_share: float, steps: int) -> list:
    """Every plan's (step, layer, gpu, cpu, prefetch, planned victims) and the slot each victim call gave."""
    out, plan, victim = [], policy.plan, policy.victim

    def recorded(view, cache):
        orders = plan(view, cache)
        out.append([view.step, view.layer, orders.gpu, orders.cpu, orders.prefetch,
                    sorted(getattr(policy, "planned", {}).items()), []])
        return orders

    def chosen(cache, key):
        slot = victim(cache, key)
        out[-1][-1].append((key, slot))
        return slot

    policy.plan, policy.victim = recorded, chosen
    cut = decode_segments(trace, batch) if batch > 1 else trace
    replay(cut, policy, "h200", budget_share=budget_share, batch_size=batch, max_steps=steps)
    return out


PAIRS = {"belady": (limits.Belady, ReferenceBelady),
         "activation_matrix": (peers.ActivationMatrixPolicy, ReferenceActivationMatrix),
         "lookahead_prefetch": (peers.LookaheadPrefetch, ReferenceLookahead),
         "hybrid": (peers.Hybrid, ReferenceHybrid)}


def assert_same(name, trace, batch, share, steps, **options):
    fast_type, reference_type = PAIRS[name]
    fast, reference = fast_type(**options), reference_type(**options)
    got, want = decisions(fast, trace, batch, share, steps), decisions(reference, trace, batch, share, steps)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a == b
    return want


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("seed,E,K,share", [(0, 16, 3, 0.2), (1, 16, 4, 0.35), (2, 12, 5, 0.45), (3, 32, 2, 0.1)])
def test_on_synthetic_traces_the_array_peers_decide_as_the_reference(name, seed, E, K, share):
    """L = 6, several prompts decoded together (batch 1 and 3): pools from barely above a layer's top-k to
    nearly half the experts."""
    trace = synthetic_trace(L=6, E=E, K=K, prompts=3, tokens=25, reuse=0.4, seed=seed)
    made = []
    for batch in (1, 3):
        made += assert_same(name, trace, batch, share, 60)
    assert sum(len(d[-1]) for d in made) > 50  # victims were asked for
    assert any(d[4] for d in made)  # and prefetches issued
    if name == "belady":
        assert any(v is not None for d in made for _, v in d[5])  # Belady named victims in its plans


@pytest.mark.parametrize("name", ["activation_matrix", "lookahead_prefetch"])
def test_with_a_predictor_the_array_peers_decide_as_the_reference(name):
    """The forecast read as arrays (`forecast_arrays`) rather than lists: the previous token's experts."""
    trace = synthetic_trace(L=5, E=12, K=3, prompts=2, tokens=20, reuse=0.5, seed=4)
    lay = layout(5, 12, 3)
    made = assert_same(name, trace, 1, 0.3, 30, predictor=lambda: PreviousToken(lay))
    assert any(d[4] for d in made) and sum(len(d[-1]) for d in made) > 20


def test_activation_matrix_with_fixed_scores_and_ties_decides_as_the_reference():
    """Scores with ties and zeros (a predictor's probabilities): the top-K by (−p, expert), zeros never taken."""
    lay = layout(4, 8, 2)
    row = [0.5, 0.0, 0.5, 0.25, 0.25, 0.0, 0.5, 0.1]
    scores = {(layer, d): row for layer in range(4) for d in range(1, 4)}
    trace = synthetic_trace(L=4, E=8, K=2, prompts=2, tokens=20, seed=5)
    made = assert_same("activation_matrix", trace, 1, 0.3, 30, predictor=Fixed(lay, scores))
    assert any(d[4] for d in made)


@pytest.fixture(scope="module")
def real_traces():
    return {name: load_llamacpp_trace(DATA / "routing" / f"{name}.route.csv") for name in ("qwen3-30b-a3b",
                                                                                             "gpt-oss-120b")}


@pytest.mark.parametrize("name", ["belady", "activation_matrix", "hybrid"])
@pytest.mark.parametrize("trace_name,batch,share,steps", [("qwen3-30b-a3b", 1, 0.1, 6), ("qwen3-30b-a3b", 4, 0.25, 3),
                                                           ("qwen3-30b-a3b", 16, 0.25, 2),
                                                           ("gpt-oss-120b", 4, 0.1, 4)])
def test_on_real_traces_the_array_peers_decide_as_the_reference(real_traces, name, trace_name, batch, share, steps):
    made = assert_same(name, real_traces[trace_name], batch, share, steps)
    assert sum(len(d[-1]) for d in made) > 100  # a full pool: victims chosen at many layers


def test_belady_reads_its_next_use_table():
    """`distance` reads the last plan's table: a later layer's key routed this step is d layers ahead, another
    key at its own layer next step."""
    from test_peers import COSTS, cache_with, view

    policy = make_policy("belady")
    cache = cache_with(8, 4, [(2, 5)])
    policy.reset(cache, 8, COSTS)
    policy.plan(view(1, [6], future=((5,), (1, 2))), cache)
    assert [policy.distance(k) for k in [(1, 6), (2, 5), (3, 2), (3, 7), (0, 4)]] == [0, 1, 2, 4 - 1 + 3, 4 - 1 + 0]


def reference_admission(order, use, present, next_use, routed, free):
    """Belady's walk as first written, over key ids."""
    held = {int(k): int(next_use[k]) for k in present.nonzero()[0]}
    walked = zip(order.tolist(), use.tolist(), strict=True)
    made = list(reference_walk(walked, held, set(routed.tolist()), free))
    return [key for key, _ in made], [victim for _, victim in made if victim is not None]


def test_belady_admission_walks_as_the_reference_where_it_evicts_keys_it_reaches_later():
    """Random walks over crowded pools of this step's own later keys (L = 6, E = 5), where victims are keys the
    walk reaches later (and stops at)."""
    import numpy as np

    rng, L, E, stopped_at_victim = np.random.default_rng(0), 6, 5, 0
    for _ in range(400):
        layer = int(rng.integers(0, L - 1))
        routed = layer * E + rng.choice(E, int(rng.integers(1, 4)), replace=False)
        next_use = np.arange(L * E) // E + (L - layer)
        next_use[routed] = 0
        later = [j * E + e for j in range(layer + 1, L) for e in rng.choice(E, int(rng.integers(1, 4)), replace=False)]
        later = np.array(later, dtype=np.int64)
        uses = later // E - layer
        next_use[later] = uses
        present = rng.random(L * E) < 0.3
        present[later] |= rng.random(len(later)) < 0.6  # the pool mostly holds this step's later keys
        misses = routed[~present[routed]]
        order = np.concatenate((misses, later))
        use = np.concatenate((np.zeros(len(misses), dtype=np.int64), uses))
        free = int(rng.integers(0, 3))
        loads, victims = limits._belady_admission(order, use, present, next_use, routed, free)
        want = reference_admission(order, use, present, next_use, routed, free)
        assert (loads.tolist(), victims.tolist()) == want
        stopped_at_victim += any(v in set(order.tolist()) for v in want[1])
    assert stopped_at_victim > 10


@pytest.mark.parametrize("key", [(2, 7), (3, 0), (1, 0)])
def test_belady_ranks_a_load_its_plan_did_not_foresee_as_the_reference(key):
    """A load off the plan with no free slot: the key used farthest ahead goes (for a prefetch, never a routed key
    or one of the plan's prefetches); the running layer's miss may take any evictable key."""
    from test_peers import cache_with, view

    slots = []
    for policy in (limits.Belady(), ReferenceBelady()):
        cache = cache_with(4, 4, [(2, 5), (3, 1), (0, 4), (1, 6)])
        policy.reset(cache, 8, None)
        policy.plan(view(1, [6, 3], future=((5,), (1, 2))), cache)
        slots.append(policy.victim(cache, key))
    assert slots[0] == slots[1] is not None
