"""PreSched: the cross-layer prefetch planner, a pure function from what MoE layer l knows to its orders.

No tensors and no engine state: an `Instance` of plain numbers and tuples goes in, a `Plan` comes out.
Time 0 is the moment layer l's orders are issued; τ = `load` is one expert's transfer.

The model (what `objective.expected_window_latency` computes, and what `plan` minimises)
----------------------------------------------------------------------------------------
Layer l (routing known). Every routed expert may run on the CPU from host memory. One resident runs on the
GPU unless the CPU, beside the GPU, ends the layer sooner (small experts, few tokens: the two lanes work in
parallel; `resident_on_cpu` False keeps residents on the GPU). One in flight is either waited for (the GPU
runs it at its ETA) or run on the CPU while its copy lands for later use (a late prefetch must not hold its
layer up longer than the CPU would). Each miss is either loaded on demand and run on the GPU, or run on the
CPU. The m on-demand loads go first on the link, the j-th landing at demand_free + j·τ (demand_free = link_free for
a FIFO link; earlier for AsyncIO's priority queue, where on-demand loads overtake queued prefetches).
The GPU runs its experts in the plan's order, each at max(GPU free, ready) for gpu(n); the CPU lane runs
its experts one after another from cpu_free for cpu(n) each (cpu(n) is one expert on all the cores).

    F0 = max(GPU finish, CPU finish)

Layers l+1 … l+D (routing predicted). Candidate e of layer l+d is used with probability p_e, by n_e tokens
if used. If used while absent it stalls its layer by

    stall(n) = min(τ, max(0, cpu(n) − gpu(n)))      (load it on demand, or run it on the CPU, alongside)

Layer l+d starts at S_d, fixed by the instance, not by the plan: S_1 = F* + gap, S_{d+1} = S_d + c_d + gap,
with F* = the fastest split's F0 (prefetching ignored), gap the attention, dense and host work between
two MoE layers, c_d = Σ_e p_e·gpu(n_e) the layer's expected expert compute. The prefetches follow the
on-demand loads on the link: the i-th (1-based) starts at L0 + (i−1)·τ, L0 = link_free + m·τ (queued
transfers end at link_free; the m on-demand loads come first). A prefetch of e avoids the share of e's
stall that its transfer completes before e's layer starts:

    β_d(i) = clip(r_d − (i − 1), 0, 1),   r_d = (S_d − L0) / τ

(1 when it lands in time; for a link-bound miss, stall = τ, this is exactly the stall left when a late
prefetch finishes, since the layer then waits for the rest of the transfer). Each load takes a free slot
or evicts an evictable key v, which costs loss_v = q_v·stall(n_v), q_v its probability of being needed
before it could be reloaded. The plan minimises

    J = F0 + Σ_{absent candidates e} p_e·stall(n_e) − Σ_{prefetch i} w_{e_i}·β_{d_i}(i) + Σ_{victims} loss_v

with w_e = p_e·stall(n_e): the window's expected latency (layers l … l+D) plus the later stall that
evictions cause, up to a constant (the stall-free time of layers l+1 … l+D, which no decision changes).
Layer l's own on-demand loads never wait behind a prefetch: they are ahead of every prefetch this plan
issues, and F0 does not depend on the prefetches.

The algorithm (exact for this objective when layer l's misses have equal GPU times, as at decode sizes
where an expert's GPU time is flat in tokens; otherwise the split is the best threshold split)
---------------------------------------------------------------------------------------------------
1. Split. Misses sorted by tokens, most first; for each m (0 … min(misses, slots)) the m first are loaded
   (most tokens first) and the rest run on the CPU: with equal GPU times this minimises F0 for that m,
   since the CPU's time grows with tokens. The GPU runs earliest-ready first (optimal for one machine with
   release times). For each m, the experts in flight that run on the CPU are the b that land last (ties:
   fewest tokens first) and the resident ones the a with fewest tokens, (a, b) chosen to minimise F0(m)
   (ties: fewer); exact among such choices. Residents are ready at 0, so they lead the GPU's queue and
   the GPU ends at max(G_res − T_a + G_rest, late), G_res their GPU time, T_a that of the a moved, G_rest
   and late the total and the release-bound end of the other jobs. F0 is the larger of a GPU end that
   falls with a and a CPU end that rises with it: a bisection finds the first best a for each (m, b).
2. Prefetch, for a given m. Positions are τ apart, so each layer d sees positions of full value
   (i ≤ c_d = ⌊r_d⌋), at most one partial position c_d + 1 of value f_d = r_d − c_d, and worthless ones.
   Within a layer values are w·β with a common β, so an optimal plan takes a prefix of the layer's
   candidates by w, the last one on the partial position if it uses it. For each choice π of the layers
   that use their partial position (≤ 2^D), full positions form nested capacities
   Σ_{d'≤d} n_{d'} ≤ c_d − #(partial positions ≤ c_d) (a polymatroid) and the layer values
   W_d(n) + π_d·f_d·w_d[n] are concave in n, with marginals (1 − π_d f_d)·w_d[n] + π_d f_d·w_d[n+1]; so
   the greedy by largest feasible marginal is optimal for every count. It is computed by merging the
   layers' sorted marginals in deadline order, keeping the best `cap_d` after each merge; the victims'
   losses, cheapest first (free slots cost 0), grow with the count, so it stops at the first marginal
   not above the next loss. The choices π share the merges of their common first layers, and are not
   enumerated when a relaxation of all of them (each partial position counted as a full position of its
   layer) does not beat π = 0; nor is a partial position opened beyond the relaxation's count of
   prefetches, which no optimal plan exceeds (`_Window.relaxed`). Full prefetches are placed earliest
   deadline first around the partial positions and any gap is closed (moving a prefetch earlier never
   lowers β).
3. Window. J(m) = F0(m) + the losses of the m on-demand victims + base stall − V(m), V(m) the best prefetch
   value of step 2. V(m) only falls as m grows (each load costs every prefetch one position and a cheap
   victim) and never exceeds the relaxation, so splits are tried by F0 and skipped once F0(m) plus those
   bounds cannot beat the best J.

Inputs a caller estimates (ETAs, link_free, gap, predictions, victims' probabilities) are taken as given.
Step 1 lives in `split.py`. Speed: plain Python, memoised cost functions, shared merges (`python -m
prescope.experiments.planspeed`).
Letters: D lookahead distance, E experts, K top-k, S slots, τ transfer time of one expert.
"""

from __future__ import annotations

from itertools import accumulate
from operator import mul, neg

from prescope.policies.instance import Candidate, Held, Instance, Key, Plan, PlanError
from prescope.policies.split import CostTables, Split, split_finishes

__all__ = ["Candidate", "CostTables", "Held", "Instance", "Key", "Plan", "PlanError", "Split", "layer_starts", "plan",
           "split_finishes"]


# ---- layer l: the split (split.py) and the layers' starts ----------------------------------------------------

def layer_starts(inst: Instance, costs: CostTables | None = None, fastest: float | None = None) -> tuple[float, ...]:
    """S_d for d = 1 … D: S_1 = F* + gap, S_{d+1} = S_d + c_d + gap, with F* the fastest split's F0
    (computed unless given) and c_d = `compute` or Σ p·gpu(n) over layer l+d's candidates."""
    costs = costs or CostTables(inst)
    start = (min(split_finishes(inst, costs)[0]) if fastest is None else fastest) + inst.gap
    compute = inst.compute or [sum(c[1] * costs.gpu[c[2]] for c in layer) for layer in inst.predictions]
    starts = []
    for c in compute:
        starts.append(start)
        start += c + inst.gap
    return tuple(starts)


# ---- the window -------------------------------------------------------------------------------------------

def _merge(acc: list, lst: list, cap: int) -> list:
    """The `cap` largest of two descending lists, descending: one step of the greedy's layer-by-layer merge
    (an item that survives is never blocked by the items above it)."""
    if not lst:
        return acc[:cap]
    if not acc:
        return lst[:cap]
    return sorted(acc + lst[:cap], reverse=True)[:cap]


def _marginals(w: list[float], f: float) -> list[float]:
    """A layer's marginals with its partial position in use: the partial job becomes full and the next one
    moves into the partial position, (1 − f)·w[n] + f·w[n+1] (w past the end = 0)."""
    g = 1.0 - f
    return [g * a + f * b for a, b in zip(w, w[1:] + [0.0], strict=True)]


class _Window:
    """The prefetch term for any m: weights w[d] (descending), position capacities r0[d] = (S_d − L0(0))/τ,
    victims' losses lam (ascending). β's fractional parts do not change with m (each load shifts every
    position by exactly τ), so a layer's partial marginals are computed once, when first needed. Per m, the
    greedy's merges for π = 0 are kept: every other choice, and the relaxation, share their first layers."""

    def __init__(self, w: list[list[float]], r0: list[float], lam: list[float], cap: int):
        self.w, self.r0, self.lam, self.cap = w, r0, lam, cap
        self.f = [x - int(x) if x > 0 else 0.0 for x in r0]
        self._part: dict[int, list[float]] = {}
        self._shapes: dict[int, tuple[list[int], int, list[int]]] = {}
        self._states: dict[int, list[list[float]]] = {}
        self._relaxed: dict[int, tuple[float, int]] = {}

    def part(self, d: int) -> list[float]:
        """Layer d's marginals with its partial position in use."""
        if d not in self._part:
            self._part[d] = _marginals(self.w[d], self.f[d]) if self.f[d] > 0 and self.w[d] else self.w[d]
        return self._part[d]

    def _shape(self, m: int) -> tuple[list[int], int, list[int]]:
        """(c, kcap, opens): full positions per layer, the prefetch cap, and the layers whose partial position
        may be used (π_d ∈ {0, 1})."""
        if m not in self._shapes:
            kcap = min(self.cap, len(self.lam) - m)
            c = [int(x) - m if x - m > 0 else 0 for x in self.r0]
            opens = [d for d, (x, f, wd, cd) in enumerate(zip(self.r0, self.f, self.w, c, strict=True))
                     if x > m and f > 0 and wd and cd < kcap]
            self._shapes[m] = (c, kcap, opens)
        return self._shapes[m]

    def _zero(self, m: int) -> list[list[float]]:
        """The π = 0 greedy's accepted marginals before each layer and after the last (before the cap)."""
        if m not in self._states:
            states, acc = [], []
            for wd, cd in zip(self.w, self._shape(m)[0], strict=True):
                states.append(acc)
                acc = _merge(acc, wd, cd)
            states.append(acc)
            self._states[m] = states
        return self._states[m]

    def _scan(self, acc: list[float], j: int, limit: int) -> tuple[float, int]:
        """Σ (g − λ_j) over the first `limit` accepted marginals while each beats the next victim's loss;
        (sum, count)."""
        lam, value, start = self.lam, 0.0, j
        for g in acc[:limit]:
            if g <= lam[j]:
                break
            value += g - lam[j]
            j += 1
        return value, j - start

    def relaxed(self, m: int) -> tuple[float, int]:
        """(value, count) with every partial position counted as a full one of its layer and of the later
        layers with the same c (layers up to d hold c_d positions, plus one if a layer up to d with that c
        has a partial position). The value bounds every choice π; and an optimal plan never holds more
        prefetches than the count (Gale: the relaxed greedy's i-th best dominates any plan's i-th best, so
        past the count a plan's least valuable prefetch is worth less than its victim; dropping it and
        closing the gap is no worse)."""
        if m not in self._relaxed:
            c, kcap, opens = self._shape(m)
            states, seen = self._states.get(m), set()
            start = (opens[0] if opens else len(c)) if states else 0  # before it, the merges of π = 0
            acc = states[start] if states else []
            for d in range(start, len(c)):
                if d in opens:
                    seen.add(c[d])
                acc = _merge(acc, self.w[d], c[d] + (c[d] in seen))
            self._relaxed[m] = self._scan(acc, m, kcap)
        return self._relaxed[m]

    def bound(self, m: int) -> float:
        return self.relaxed(m)[0]

    def best(self, m: int, prune: bool = True) -> tuple[float, tuple[int, ...], list[int], int]:
        """(value, π, c, taken): the best prefetch value with m on-demand loads (step 2), over every choice π
        of partial positions, depth first in lexicographic order of π from π = 0 (ties: fewer partial
        positions, then the first found), so that choices sharing their first layers share the merges. With
        `prune`, π = 0 alone is solved when the relaxation does not beat it, and a partial position past the
        relaxation's count is not opened."""
        c, kcap, opens = self._shape(m)
        states = self._zero(m)
        D, w, f, lam = len(c), self.w, self.f, self.lam
        if prune and opens:
            most = self.relaxed(m)[1]
            opens = [d for d in opens if c[d] + 1 <= most]
        value, taken = self._scan(states[-1], m, kcap)
        if not opens or (prune and self.bound(m) <= value):
            return value, (0,) * D, c, taken
        # every π layer by layer from the first open one, children π_d = 0 before π_d = 1 (so the leaves come
        # in lexicographic order, π = 0 first): (π as bits, layer 0 the highest; accepted so far; partial
        # positions; their value)
        frontier = [(0, states[opens[0]], (), 0.0)]
        for d in range(opens[0], D):
            cd, wd, bit, children = c[d], w[d], 1 << (D - 1 - d), []
            part = self.part(d) if d in opens else None
            for bits, acc, used, extra in frontier:
                cap = cd
                for u in used:
                    if u <= cd:
                        cap -= 1
                children.append((bits, _merge(acc, wd, cap) if used else states[d + 1], used, extra))
                if part is not None and cd + 1 not in used:
                    children.append((bits | bit, _merge(acc, part, cap), used + (cd + 1,), extra + f[d] * wd[0]))
            frontier = children
        best = (value, 0, 0, taken)  # value, π, partial positions, taken: ties go to fewer partial positions
        for bits, acc, used, extra in frontier[1:]:
            k = len(used)
            value, taken = self._scan(acc, m + k, kcap - k)
            value += extra - sum(lam[m:m + k])
            if value > best[0] or (value == best[0] and k < best[2]):
                best = (value, bits, k, taken)
        value, bits, _, taken = best
        return value, tuple(bits >> (D - 1 - d) & 1 for d in range(D)), c, taken

    def counts(self, pi, c, m: int, taken: int) -> list[int]:
        """Full prefetches per layer among the accepted items (the same merges, each item with its layer)."""
        used, acc = [c[d] + 1 for d in range(len(c)) if pi[d]], []
        for d, cd in enumerate(c):
            cap = cd - sum(1 for u in used if u <= cd)
            acc = _merge(acc, [(x, -d) for x in (self.part(d) if pi[d] else self.w[d])[:cap]], cap)
        counts = [0] * len(c)
        for _, nd in acc[:taken]:
            counts[-nd] += 1
        return counts


def _arrange(pi, counts, c, sizes) -> list[tuple[int, int]]:
    """(layer index d, rank in its layer) per prefetch, in link order: full jobs earliest deadline first,
    each partial job at its position c_d + 1 among them, gaps closed (moving a prefetch earlier never lowers
    its β)."""
    order = [(d, rank) for d, n in enumerate(counts) for rank in range(n)]
    for p, d in sorted((c[d] + 1, d) for d in range(len(counts)) if pi[d] and counts[d] < sizes[d]):
        order.insert(p - 1, (d, counts[d]))
    return order


# ---- the planner -----------------------------------------------------------------------------------------

def _best_split(window: _Window, splits: list[int], fixed: list[float], prune: bool,
                sizes: list[int]) -> tuple[int, list[tuple[int, int]]]:
    """(m, prefetches in link order) minimising J(m) = fixed[m] − V(m), fixed[m] = F0(m) + the m on-demand
    victims' losses + base stall, trying `splits` in order of F0 (the first best wins ties). V(m), the best
    prefetch value, only falls as m grows and never exceeds its bound (nor bound(0), which also falls with
    m), so a split is skipped once its fixed part cannot win."""
    found = window.best(splits[0], prune)
    best_j, best = fixed[splits[0]] - found[0], (splits[0], found)
    values = [(splits[0], found[0])]  # (m, V(m)) of the splits evaluated
    for m in splits[1:]:
        floor_j = fixed[m]
        if (any(mm <= m and floor_j - v >= best_j for mm, v in values) or floor_j - window.bound(0) >= best_j
                or floor_j - window.bound(m) >= best_j):
            continue
        found = window.best(m, prune)
        values.append((m, found[0]))
        if floor_j - found[0] < best_j:
            best_j, best = floor_j - found[0], (m, found)
    m, (_, pi, c, taken) = best
    return m, _arrange(pi, window.counts(pi, c, m, taken), c, sizes)


def plan(inst: Instance, prune: bool = True) -> Plan:
    """The plan minimising J (module docstring) for `inst`; among equal J, the faster split of layer l.
    `prune=False` enumerates every partial-position choice (the same optimum, slower; tests compare).

    With free_slots >= K + Σ_d |predictions[d]| + D, every load and prefetch takes a free slot and no victim
    is read: the pruned plan is the same with or without `evictable` (a caller may leave it out; tested)."""
    costs, tau = CostTables(inst), inst.load
    finishes, present, misses, offloaded = split_finishes(inst, costs)
    starts = layer_starts(inst, costs, min(finishes))
    stall, free = costs.stall, inst.free_slots
    # victims: free slots first, then evictable keys by loss; lam[j] is the (j+1)-th cheapest
    if inst.evictable:
        keys, probs, tokens = zip(*inst.evictable, strict=True)
        losses, keys = zip(*sorted(zip(map(mul, probs, map(stall.__getitem__, tokens)), keys, strict=True)), strict=True)
    else:
        losses = keys = ()
    lam = [0.0] * free + list(losses)
    floor = lam[0] if lam else 0.0
    # the window's absent candidates by weight w = p·stall(n), best first, per layer; one at or below the
    # cheapest loss is never loaded, but the first of them may enter a partial position's marginal
    ranked, weights, base = [], [], 0.0
    resident, inflight = inst.resident, inst.inflight
    for d, layer in enumerate(inst.predictions, 1):
        target, rows = inst.layer + d, []
        for e, p, n in layer:
            key = (target, e)
            if key in resident or key in inflight:
                continue
            wt = p * stall[n]
            if wt > 0:
                rows.append((wt, -e))
                base += wt
        rows.sort(reverse=True)
        if rows and rows[-1][0] <= floor:
            del rows[next(i for i, row in enumerate(rows) if row[0] <= floor) + 1:]
        w, e = zip(*rows, strict=True) if rows else ((), ())
        weights.append(list(w))
        ranked.append(list(map(neg, e)))
    # J's victims' losses for up to every load and prefetch (free slots may be many more)
    prefix = list(accumulate(lam[:len(finishes) + sum(map(len, weights))], initial=0.0))
    splits = sorted(range(len(finishes)), key=finishes.__getitem__)  # stable: ties by m
    if any(weights):
        window = _Window(weights, [(s - inst.link_free) / tau for s in starts], lam,
                         len(lam) if inst.max_prefetch is None else min(len(lam), inst.max_prefetch))
        fixed = [finishes[m] + prefix[m] + base for m in range(len(finishes))]  # J(m) + V(m)
        m, order = _best_split(window, splits, fixed, prune, [len(x) for x in ranked])
    else:  # nothing worth prefetching: V(m) = 0 for every split
        m, order = min(splits, key=lambda m: finishes[m] + prefix[m] + base), []
    # the prefetches in link order, each saving w·β_d(i) of its stall (i 1-based: β = clip(r_d − (i − 1), 0, 1))
    L0 = inst.link_free + m * tau
    r = [(s - L0) / tau for s in starts]
    prefetch, saving = [], []
    for i, (d, rank) in enumerate(order):
        prefetch.append((inst.layer + d + 1, ranked[d][rank]))
        x = r[d] - i
        saving.append(weights[d][rank] * (1.0 if x >= 1.0 else (x if x > 0.0 else 0.0)))
    loads, moved = tuple([e for e, _ in misses[:m]]), offloaded[m]
    ready = sorted([(t, i, e) for i, (t, e, _) in enumerate(present) if e not in moved]
                   + [(inst.demand_start + j * tau, len(present) + j, e) for j, e in enumerate(loads, 1)])
    used = m + len(prefetch)
    return Plan(gpu=tuple([e for _, _, e in ready]), cpu=tuple([e for e, _ in misses[m:]]) + moved, loads=loads,
                prefetch=tuple(prefetch), victims=((None,) * min(used, free) + keys)[:used],
                objective=finishes[m] + prefix[used] + base - sum(saving))
