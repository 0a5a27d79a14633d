"""Layer l's split (`policies/split.py`) at decode and small-prefill sizes: both of its paths, the bisection
per m and the (m, a) grid over arrays, give exactly the full scan's F0(m) and choices (`reference_split`,
the split as first written), with and without experts in flight and residents the CPU may take."""

from __future__ import annotations

import dataclasses
import random

from test_presched import flat, linear, reference_split

from prescope.policies import split
from prescope.policies.presched import Candidate, Held, Instance


def decode_instance(rng: random.Random) -> Instance:
    """Layer 0 of a batch of up to 64 tokens: K routed experts of E (a share resident, some in flight),
    one later layer's candidates, free slots and evictable keys in any proportion, a flat or linear GPU."""
    E = rng.choice([64, 128])
    K = rng.choice([4, 8, 16, 32, 48])
    experts = tuple(rng.sample(range(E), K))
    tokens = tuple(float(rng.choice([1, 1, 1, 2, 3, rng.randint(1, 64)])) for _ in experts)
    share, late_share = rng.random(), rng.choice([0.0, 0.0, 0.1])
    resident, inflight, tau = set(), {}, rng.uniform(0.05, 2.0)
    for e in experts:
        u = rng.random()
        if u < share:
            resident.add((0, e))
        elif u < share + late_share:
            inflight[(0, e)] = rng.uniform(0, 3 * tau)
    held = tuple(Held((1, e), rng.random()) for e in rng.sample(range(E), rng.randint(0, 40)))
    g0, c0, c1 = rng.uniform(0.01, 0.5), rng.uniform(0.0, 1.0), rng.uniform(0.01, 0.5)
    gpu = flat(g0) if rng.random() < 0.5 else linear(g0, rng.uniform(0.0, c1))
    return Instance(0, experts, tokens, ((Candidate(0, 0.5),),), tau, gpu, linear(c0, c1),
                    resident=frozenset(resident), inflight=inflight, free_slots=rng.choice([0, 2, 10, 500]),
                    evictable=held, link_free=rng.uniform(0, 2 * tau), demand_free=rng.choice([None, 0.0]),
                    cpu_free=rng.choice([0.0, rng.uniform(0, 1)]), resident_on_cpu=rng.random() < 0.8)


def test_split_equals_the_full_scan_at_decode_sizes():
    rng, late, moved = random.Random(17), 0, 0
    for _ in range(400):
        inst = decode_instance(rng)
        for on_cpu in (True, False):
            inst = dataclasses.replace(inst, resident_on_cpu=on_cpu)
            got = split.split_finishes(inst)
            assert (got.finishes, got.offloaded) == reference_split(inst)
            late += any((0, e) in inst.inflight for e in inst.experts)
            moved += any(got.offloaded)
    assert late > 100 and moved > 100, (late, moved)


def test_memoised_costs_keep_their_tables_across_plans():
    """A policy's costs as `Memo`s: each token count is computed once over many instances, the stall table is
    reused while the costs and τ stay, and the split is the same as with plain functions."""
    calls = []

    def gpu(n):
        calls.append(n)
        return 0.1 + 0.01 * n

    memo_gpu, memo_cpu = split.Memo(gpu), split.Memo(linear(0.2, 0.05))
    rng = random.Random(4)
    for _ in range(50):
        inst = decode_instance(rng)
        memo = dataclasses.replace(inst, gpu=memo_gpu, cpu=memo_cpu)
        plain = dataclasses.replace(inst, gpu=gpu, cpu=linear(0.2, 0.05))
        assert split.split_finishes(memo) == split.split_finishes(plain)
        tables = split.CostTables(memo)
        assert tables.gpu is memo_gpu and tables.stall is split.CostTables(memo).stall
        assert tables.stall is not split.CostTables(dataclasses.replace(memo, load=memo.load * 2)).stall
    before = len(calls)
    split.split_finishes(memo)
    assert len(calls) == before  # every count the Memo was asked for is kept
    split.split_finishes(plain)
    assert len(calls) > before  # a plain function is asked again in each plan
    assert memo_gpu.keys() == set(memo_gpu) and all(memo_gpu[n] == gpu(n) for n in memo_gpu)
