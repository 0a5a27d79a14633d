"""Layer l's split for PreSched (`presched`'s docstring, step 1): which of the layer's experts run on the GPU
(present ones, and the m misses loaded on demand) and which on the CPU, with F0(m), the layer's end, for
every m; and the instance's cost functions memoised for one planning call.

One planned layer calls `split_finishes` once (and the policies' on-demand paths do too), so it is written
for few Python objects per expert: one pass sorts the present experts into those in flight and resident,
the search over the residents moved to the CPU is inlined, and the experts moved per (a, b) are sliced
from two lists. `tests/policies/test_presched.py` compares it, float for float, with the full scan as first
written.

Letters: K routed experts of layer l, m on-demand loads, a residents and b experts in flight on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate
from typing import NamedTuple

from prescope.policies.instance import Instance


class Memo(dict):
    """A cost function `fn` memoised by token count: memo[n] and memo(n) compute fn(n) on first use. A policy
    hands its costs to PreSched as Memos, so their tables last across planning calls (`CostTables`), and the
    GPU's keeps the stall table last built with it (`stall`: (cpu, load, table))."""

    __slots__ = ("fn", "stall")

    def __init__(self, fn: Callable[[float], float]):
        super().__init__()
        self.fn, self.stall = fn, None

    def __missing__(self, n: float) -> float:
        t = self[n] = self.fn(n)
        return t

    def __call__(self, n: float) -> float:
        return self[n]


class CostTables:
    """The instance's cost functions memoised by token count (few distinct counts), looked up as gpu[n],
    cpu[n] and stall[n] = min(τ, max(0, cpu(n) − gpu(n))), what a miss of n tokens adds to its layer: the
    instance's own tables where its costs are `Memo`s (the policies' costs: kept across planning calls, the
    stall table too while the costs and τ are the same), else new ones for this call."""

    __slots__ = ("gpu", "cpu", "stall")

    def __init__(self, inst: Instance):
        load = inst.load
        self.gpu = gpu = inst.gpu if isinstance(inst.gpu, Memo) else Memo(inst.gpu)
        self.cpu = cpu = inst.cpu if isinstance(inst.cpu, Memo) else Memo(inst.cpu)
        kept = gpu.stall
        if kept is not None and kept[0] is cpu and kept[1] == load:
            self.stall = kept[2]
        else:
            self.stall = Memo(lambda n: min(load, max(0.0, cpu[n] - gpu[n])))
            gpu.stall = (cpu, load, self.stall)


class Split(NamedTuple):
    """Layer l's split for every m: F0(m) (`finishes`); the present experts as (ready, expert, tokens) by
    readiness; the misses as (expert, tokens), most tokens first (the m first are loaded); and, per m, the
    present experts (in flight, then resident) that run on the CPU (`offloaded[m]`)."""

    finishes: list[float]
    present: list[tuple[float, int, float]]
    misses: list[tuple[int, float]]
    offloaded: list[tuple[int, ...]]


def split_finishes(inst: Instance, costs: CostTables | None = None) -> Split:
    """F0(m) for m = 0 … min(misses, slots): the m misses with most tokens loaded (most first), the rest on
    the CPU, and the present experts that end the layer sooner on the CPU there (`presched`'s docstring,
    step 1). Per b, one pass over the jobs by readiness gives the state after each load; the jobs in flight
    after it are folded on (the additions of a full scan, in its order: the same floats). Per (m, b), the
    GPU's end G(a) never rises with a and the CPU's C(a) never falls (costs are times, >= 0, and
    floating-point rounding is monotone, so this holds for the computed values too): the first a with
    C(a) >= G(a) is walked on from the last m's (one more load only raises G and lowers C), and the first a
    reaching the minimum found by bisection below it."""
    costs = costs or CostTables(inst)
    present, misses = [], []
    layer, resident, inflight = inst.layer, inst.resident, inst.inflight
    for e, n in zip(inst.experts, inst.tokens, strict=True):
        key = (layer, e)
        if key in resident:
            present.append((0.0, e, n))
        elif key in inflight:
            present.append((inflight[key], e, n))
        else:
            misses.append((e, n))
    if len(present) > 1:
        present.sort(key=lambda r: (r[0], -r[2], r[1]))
    if len(misses) > 1:
        misses.sort(key=lambda r: (-r[1], r[0]))
    top = min(len(misses), inst.free_slots + len(inst.evictable))
    tau, start, gpu, cpu = inst.load, inst.demand_start, costs.gpu, costs.cpu
    # the CPU may take: experts in flight, the last to land first (the b first), and resident ones, those with
    # fewest tokens first (the a first); residents the CPU may not take are the GPU's fixed work
    late, held, gpu_fixed, on_cpu = [], [], 0, inst.resident_on_cpu
    for row in present:
        key = (layer, row[1])
        if key in inflight:
            late.append(row)
        if key in resident:
            if on_cpu:
                held.append(row)
            else:
                gpu_fixed += gpu[row[2]]
    if len(late) > 1:
        late.sort(key=lambda r: (-r[0], r[2], r[1]))
    if len(held) > 1:
        held.sort(key=lambda r: (r[2], r[1]))
    held_gpu = [gpu[r[2]] for r in held]
    gpu_held = sum(held_gpu)
    gpu_moved = list(accumulate(held_gpu, initial=0.0))  # T_a
    cpu_moved = list(accumulate([cpu[r[2]] for r in held], initial=0.0))
    cpu_late = list(accumulate([cpu[r[2]] for r in late], initial=0.0))
    # the GPU's other jobs by readiness (j = index of a load, -1 for an expert in flight of rank q, which runs
    # on the CPU when q <= b)
    jobs = [(start + j * tau, j, gpu[misses[j - 1][1]], 0) for j in range(1, top + 1)]
    if late:
        jobs = sorted([(r[0], -1, gpu[r[2]], q) for q, r in enumerate(late, 1)] + jobs)
    cpu_after = [0.0] * (len(misses) + 1)
    for j in range(len(misses) - 1, -1, -1):
        cpu_after[j] = cpu_after[j + 1] + cpu[misses[j][1]]
    gpu_base, last, free, count = gpu_fixed + gpu_held, len(held), inst.cpu_free, len(gpu_moved)
    late_e, held_e = tuple(r[1] for r in late), tuple(r[1] for r in held)
    best = [None] * (top + 1)  # per m: (F0, a, b), the first minimum over b, then a
    for b in range(len(late) + 1):
        # the jobs of this b: every load, and the experts in flight the GPU keeps; per m, the state after the
        # m-th load (end, busy time) and the jobs in flight after it
        prefix, tails = [(0.0, 0.0)], [[]]
        bound = rest = 0.0
        for r, j, t, q in jobs:
            if 0 < q <= b:
                continue
            bound = (bound if bound > r else r) + t
            rest += t
            if j > 0:
                prefix.append((bound, rest))
                tails.append([])
            else:
                for tail in tails:
                    tail.append((r, t))
        cross = 0  # the first a with C(a) >= G(a): with more loads G only rises and C only falls, so it never falls
        for m in range(top + 1):
            bound, rest = prefix[m]
            for r, t in tails[m]:
                bound = (bound if bound > r else r) + t
                rest += t
            cpu_base = free + cpu_after[m] + cpu_late[b]
            if m == len(misses) and not b:  # nothing on the CPU at a = 0: the GPU alone ends the layer
                g = gpu_base - gpu_moved[0] + rest
                f, a = (g if g > bound else bound), 0
                for x in range(1, last + 1):
                    g = gpu_base - gpu_moved[x] + rest
                    g = g if g > bound else bound
                    y = max(g, cpu_base + cpu_moved[x])
                    if y < f:
                        f, a = y, x
            else:  # the first a with C(a) >= G(a), walked on from the last m's, then the first a reaching the minimum
                while cross < count:
                    g = gpu_base - gpu_moved[cross] + rest
                    if cpu_base + cpu_moved[cross] >= (g if g > bound else bound):
                        break
                    cross += 1
                lo = cross
                if lo == 0:
                    f, a = cpu_base + cpu_moved[0], 0
                else:
                    g = gpu_base - gpu_moved[lo - 1] + rest
                    value = g if g > bound else bound
                    if lo < count and cpu_base + cpu_moved[lo] < value:
                        f, a = cpu_base + cpu_moved[lo], lo
                    else:
                        hi, lo = lo - 1, 0  # the first a with G(a) == value (G(a) <= value from there)
                        while lo < hi:
                            mid = (lo + hi) // 2
                            g = gpu_base - gpu_moved[mid] + rest
                            if (g if g > bound else bound) <= value:
                                hi = mid
                            else:
                                lo = mid + 1
                        f, a = value, lo
            if best[m] is None or f < best[m][0]:
                best[m] = (f, a, b)
    return Split([f for f, _, _ in best], present, misses,
                 [late_e[:b] + held_e[:a] for _, a, b in best])
