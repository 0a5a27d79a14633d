"""The limits the policies are measured against: what knowing the running step's future routing buys.

Both read `LayerView.future` (the true routing of the step's later layers), which an executor computes only
for a policy that says it needs it (`Policy.needs_future`): the simulator always has it, the engine when it
replays recorded routing.

- `belady` (committed results before this module call it `oracle`): every later expert of the step
  prefetched in order of use while Belady's rule (evict the key used farthest ahead) finds a victim used
  later than it; every expert runs where the fastest split of its layer puts it, with no prediction or
  planning cost. It is a prefetching limit, not a bound: it ignores PreSched's cross-layer trade-offs, so
  prescope and hybrid beat it where the CPU path matters.
- `ceiling`: PreScope itself (PreSched, its gate and AsyncIO) fed perfect predictions: every expert that a
  window layer routes has probability 1 (with its true token count where the executor gives
  `LayerView.future_tokens`), every other 0; victims ranked as Belady ranks them (a key a later layer of the
  step uses is needed for sure, a later layer's key it does not use last, next step); predicting costs no
  host time. It is what prescope would do with a perfect LLaPor: the
  ceiling of its predictor, with the same costs and the same planner.

Neither is a bound on every policy: a lower bound is the simulator's (`sim.link.belady_misses`,
`cost.split_lower_bound`). Letters: L MoE layers, E experts, K top-k, D lookahead distance.

Belady's host time is its idea's, not a scan of the pool per key: the next use of every key is one table
[L·E] per plan, the admission walk takes its victims from one sort of the present keys by next use
(`_belady_admission`), victims off the plan are ranked over the cache's slot arrays (`evictable_scored`), and
its costs are memoised by token count. Ceiling builds its forecast from the true routing in one scatter and its
chance grids only up to the running layer. Host time per MoE layer (plan + victims, `planspeed --replay`'s
`host_` columns: the simulator replaying the shipped Qwen3-30B-A3B trace, 48 layers, 128 experts, 25 % of them
on the GPU, 40 forward calls), on the 2-core development CPU (not the H200 host; a shared machine, the median
of 2 interleaved runs), before (766c7a9) -> after, batch 1 / 4 / 16, median µs: belady 186 / 246 / 336 ->
46 / 65 / 95, mean (the pool full and the walk long at some layers) 314 / 1018 / 3218 -> 51 / 102 / 113;
ceiling 171 / 264 / 367 -> 141 / 254 / 352 and ceiling[gate=False] 137 / 202 / 278 -> 100 / 192 / 257 (the
rest is PreScope's: its gate, instance and PreSched). The same decisions, every victim slot included
(`planspeed.replay_decisions(..., victims=True)` on the shipped Qwen3-30B-A3B and gpt-oss-120b traces, batches
1, 4, 16, budgets 10, 25 and 50 %; tests/policies/test_peers_arrays.py keeps the code belady replaced as the
reference). Command: `python -m prescope.experiments.planspeed --replay --steps 40 --batches 1,4,16 --policies
'belady;activation_matrix;hybrid;lookahead_prefetch;ceiling;ceiling[gate=False];on_demand_lru'`.
"""

from __future__ import annotations

import dataclasses
import warnings
from itertools import chain, repeat

import numpy as np

from prescope.policies.base import Costs, LayerView, Orders, Policy
from prescope.policies.cache import ExpertCache, Key
from prescope.policies.peers import PreScope
from prescope.policies.predictive import UNPLANNED, fastest_split
from prescope.policies.split import Memo
from prescope.policies.window import Window

LEGACY_NAMES = {"oracle": "belady"}  # names committed results give policies that were renamed since


def _warn_once(policy, what: str) -> None:
    if not policy.warned:
        warnings.warn(f"{policy.name}: this executor gives no LayerView.future; {what}", RuntimeWarning, stacklevel=3)
        policy.warned = True


class Belady(Policy):
    name = "belady"
    imitates = "the prefetching limit: true future routing, Belady's eviction, full overlap (named `oracle` before)"
    simplifies = ("knows the rest of the running step (LayerView.future), not later steps: a key not used "
                  "again this step is taken to be needed next step at its layer, so the farthest such layer "
                  "goes first (then least recently used); the layer's misses split by the cost model; "
                  "without LayerView.future (the live engine) it has nothing to know and plans on demand")
    async_io = True
    needs_future = True

    def reset(self, cache: ExpertCache, num_experts: int, costs: Costs | None = None) -> list[Key]:
        if costs is not None:  # remembered by token count, as the predicting policies hold theirs (`split.Memo`)
            costs = dataclasses.replace(costs, gpu=Memo(costs.gpu), cpu=Memo(costs.cpu))
        super().reset(cache, num_experts, costs)
        L, E = cache.num_layers, num_experts
        self.layer_of = np.arange(L * E, dtype=np.int64) // E  # [L·E] layer of each key id layer·E + expert
        self.next_use = self.layer_of + L  # [L·E] layers from the running layer until each key's next use
        self.guard = np.zeros(L * E, dtype=bool)  # [L·E] the keys a prefetch may not evict (`protect`)
        self.planned: dict[Key, Key | None] = {}
        self.layer, self.warned = -1, False
        return []

    def distance(self, key: Key) -> int:
        """Layers from the last plan's running layer l until `key` is next used: this step where the future says
        so, else at its own layer in the next step (L − l + key's layer)."""
        return int(self.next_use[key[0] * self.num_experts + key[1]])

    def plan(self, view: LayerView, cache: ExpertCache) -> Orders:
        layer, L, E = view.layer, view.num_layers, self.num_experts
        self.layer = layer
        if view.future is None:
            _warn_once(self, "planning on demand")
        future = view.future or ()
        gpu, cpu = fastest_split(view, cache, self.costs) if view.future is not None else (list(view.experts), [])
        routed = np.array(view.experts, dtype=np.int64) + layer * E  # [K] key ids
        sizes = list(map(len, future))
        experts = np.fromiter(chain.from_iterable(future), dtype=np.int64, count=sum(sizes))
        uses = np.repeat(np.arange(1, len(future) + 1, dtype=np.int64), sizes)  # [F] layers until each is used
        later = (experts + (uses + layer) * E)[experts >= 0]  # [F] key ids of the later layers' experts
        uses = uses[experts >= 0]
        # the next-use table of every key: this step's later layers (d), the running layer's (0), the rest at
        # their own layer next step (L − layer + j)
        self.next_use = next_use = self.layer_of + (L - layer)
        next_use[later] = uses
        next_use[routed] = 0
        present = cache.present_grid(E).reshape(-1)  # [L·E]
        misses = [layer * E + e for e in gpu if not present[layer * E + e]]
        order = np.concatenate((np.array(misses, dtype=np.int64), later))  # [M + F] keys in order of use
        use = np.concatenate((np.zeros(len(misses), dtype=np.int64), uses))
        loads, victims = _belady_admission(order, use, present, next_use, routed, cache.free_count)
        keys = list(map(divmod, loads.tolist(), repeat(E)))
        self.planned = dict(zip(keys, [None] * (len(keys) - len(victims))
                                + list(map(divmod, victims.tolist(), repeat(E))), strict=True))
        prefetch = keys[int(np.count_nonzero(loads < (layer + 1) * E)):]  # the loads of later layers
        self.guard[:] = False
        self.guard[routed] = True
        self.guard[loads] = True  # the misses are routed: the guard is the routed keys and the prefetches
        return Orders(gpu=gpu, cpu=cpu, prefetch=prefetch)

    def victim(self, cache: ExpertCache, key: Key) -> int | None:
        """The slot the plan named (`predictive.planned_slot`), else a free one, else the evictable key used
        farthest ahead (`predictive.ranked_victim` by −distance), never a guarded one for a prefetch."""
        guarded = key[0] != self.layer  # a prefetch may not evict the routed keys or the plan's prefetches
        planned = self.planned.pop(key, UNPLANNED)
        if planned is not UNPLANNED and planned is not None and cache.is_evictable(planned) \
                and not (guarded and self.guard[planned[0] * self.num_experts + planned[1]]):
            return cache.slot(planned)
        free = cache.first_free()
        if free is not None:
            return free
        return cache.evictable_scored(-self.next_use, self.num_experts, self.guard if guarded else None)


def _belady_admission(order: np.ndarray, use: np.ndarray, present: np.ndarray, next_use: np.ndarray,
                      routed: np.ndarray, free: int) -> tuple[np.ndarray, np.ndarray]:
    """Belady's admission over arrays of key ids (layer·E + expert): walking the keys `order` [M] in order of use
    (`use` [M], non-decreasing), each absent one (`present` [L·E] mask) takes a free slot while there are
    `free` left, then the slot of the present key used farthest ahead (`next_use` [L·E]; ties: the larger
    key; never a `routed` one), as long as that key is used later than the one it makes room for; the walk
    stops at the first key that finds no such slot. Returns (the keys loaded, in order [A]; the victims of the
    last V of them, the loads that found no free slot, in order [V]).

    Exact without a search per key: the keys walked are used no later than the ones after them, so a key loaded
    in the walk is never worth evicting for a later one (Belady would stop first), and the victims are the
    present keys in falling (next use, key). A victim that the walk reaches later (a key of this step, used
    d layers ahead) stops it there, and so does the test: every key from there on is used at least d ahead,
    every victim left at most."""
    absent = (~present.take(order)).nonzero()[0]  # [A'] positions in the walk of the keys to bring
    taken = min(free, len(absent))
    rest = absent[taken:]
    held = present.copy()
    held[routed] = False
    held = held.nonzero()[0]  # present keys a load may evict
    if not len(rest) or not len(held):
        return order.take(absent[:taken]), order[:0]
    n = min(len(rest), len(held))
    rank = next_use.take(held) * len(present) + held  # (next use, key), as one integer
    top = np.argpartition(-rank, n - 1)[:n] if n < len(held) else np.arange(len(held))
    victims = held.take(top[np.argsort(-rank.take(top))])  # [n] the farthest used first
    fits = next_use.take(victims) > use.take(rest[:n])
    count = int(fits.argmin()) if not fits.all() else n
    return order.take(absent[:taken + count]), victims[:count]


class Ceiling(PreScope):
    name = "ceiling"
    imitates = "the limit of PreScope: PreSched fed the true future (perfect prediction)"
    simplifies = ("PreScope with its predictor replaced by the running step's true routing (LayerView.future): "
                  "p = 1 for every expert a window layer routes, 0 for the others, each with its true token "
                  "count where the executor gives LayerView.future_tokens (the simulator), else the running "
                  "layer's mean tokens per expert; victims ranked as Belady would: a resident key that a later "
                  "layer of the step uses has chance 1 of being needed, one it does not use 0, one of a layer "
                  "that already ran its decayed frequency; no host time for prediction (only planning); knows "
                  "the running step, not "
                  "later ones; without LayerView.future it predicts from the previous step, as prescope without "
                  "a predictor")
    needs_future = True
    host_work = ("plan",)

    def __init__(self, **options):
        super().__init__(None, **options)
        self.warned = False

    def reset(self, cache: ExpertCache, num_experts: int, costs: Costs | None = None) -> list[Key]:
        self.warned = False
        if self.options.candidates is None:  # every expert a window layer routes is offered (p = 1), however many
            self.candidates = num_experts
        return super().reset(cache, num_experts, costs)

    def forecast(self, view: LayerView, depth: int) -> list[tuple[list[float], list[float]]]:
        """(p, tokens) per expert of layers l+1 … l+D' from the true routing: p is 1 or 0."""
        depth = min(depth, view.num_layers - 1 - view.layer)
        if depth <= 0:
            return []
        if view.future is None:
            _warn_once(self, "predicting from the previous step")
            return super().forecast(view, depth)
        E, counts = self.num_experts, view.future_tokens
        mean = float(sum(view.tokens)) / len(view.experts) if view.experts else 1.0
        out = []
        for d in range(depth):
            p, n = [0.0] * E, [1.0] * E
            for i, e in enumerate(view.future[d]):
                p[e], n[e] = 1.0, float(counts[d][i]) if counts is not None else mean
            out.append((p, n))
        return out

    def forecast_arrays(self, view: LayerView, depth: int) -> Window:
        """`forecast` as arrays (`window.Window`), set from the true routing without per-expert lists."""
        depth = min(depth, view.num_layers - 1 - view.layer)
        if depth <= 0 or view.future is None:
            return Window.of(self.forecast(view, depth), self.num_experts)
        E, counts, rows = self.num_experts, view.future_tokens, view.future[:depth]
        p, n = np.zeros((depth, E)), np.ones((depth, E))  # [D', E]
        sizes = list(map(len, rows))
        experts = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=sum(sizes))  # [F]
        at = (np.repeat(np.arange(depth), sizes), experts)
        p[at] = 1.0
        if counts is not None:
            n[at] = np.fromiter(chain.from_iterable(counts[:depth]), dtype=np.float64, count=len(experts))
        else:
            n[at] = float(sum(view.tokens)) / len(view.experts) if view.experts else 1.0
        return Window(p, n)

    def chance_grid(self, view: LayerView, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Chances from the true future, as Belady ranks keys: 1 for a key a later layer of this step routes
        (beyond the window too); 0 for a later layer's key it does not route (next needed in the next step,
        after every key of the layers that already ran); the memory's chance for those (PreScope's)."""
        if view.future is None:
            return super().chance_grid(view, window)
        # PreScope's grids up to the running layer (the decayed frequency, this step's use); every later row is
        # the future's, so PreScope's own for them (the window's predictions) need not be built
        memory, rows, later = self.memory, view.future, (view.layer + 1) * self.num_experts
        floor, used = np.zeros(memory.freq.size), np.zeros(memory.freq.size, dtype=bool)  # [L·E]
        floor[:later], used[:later] = memory.freq[:view.layer + 1].ravel(), memory.now_used[:view.layer + 1].ravel()
        sizes = list(map(len, rows))
        experts = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=sum(sizes))
        at = np.repeat(np.arange(later, later + len(rows) * self.num_experts, self.num_experts), sizes) + experts
        floor[at[experts >= 0]] = 1.0
        return floor, used
