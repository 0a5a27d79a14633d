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
"""

from __future__ import annotations

import warnings
from itertools import chain

import numpy as np

from prescope.policies.base import Costs, LayerView, Orders, Policy
from prescope.policies.cache import ExpertCache, Key
from prescope.policies.peers import PreScope, _guarded
from prescope.policies.predictive import UNPLANNED, fastest_split, planned_slot, ranked_victim
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
        super().reset(cache, num_experts, costs)
        self.next_use: dict[Key, int] = {}
        self.planned: dict[Key, Key | None] = {}
        self.protect: set[Key] = set()
        self.layer, self.warned = -1, False
        return []

    def distance(self, key: Key, layer: int, num_layers: int) -> int:
        """Layers from `layer` until `key` is next used: this step where the future says so, else at its own
        layer in the next step (L − layer + key's layer)."""
        return self.next_use.get(key, num_layers - layer + key[0])

    def plan(self, view: LayerView, cache: ExpertCache) -> Orders:
        routed, self.layer = {(view.layer, e) for e in view.experts}, view.layer
        if view.future is None:
            _warn_once(self, "planning on demand")
        future = view.future or ()
        self.next_use = {k: 0 for k in routed}
        for d, experts in enumerate(future, 1):
            for e in experts:
                self.next_use.setdefault((view.layer + d, e), d)
        gpu, cpu = fastest_split(view, cache, self.costs) if view.future is not None else (list(view.experts), [])
        # Belady admission: walk the later keys in order of use, each taking a free slot or the slot of the
        # resident key used farthest ahead, as long as that key is used later than the one loaded
        L = view.num_layers
        held = {k: self.distance(k, view.layer, L) for k in cache.present_keys()}
        misses = [(view.layer, e) for e in gpu if not cache.is_present((view.layer, e))]
        free = cache.free_count
        self.planned, prefetch = {}, []
        for key in misses + [(view.layer + d, e) for d, experts in enumerate(future, 1) for e in experts]:
            if key in held:
                continue
            use = self.next_use[key]
            if free:
                free -= 1
                victim = None
            else:
                candidates = [k for k in held if k not in routed]
                if not candidates:
                    break
                victim = max(candidates, key=lambda k: (held[k], k))
                if held[victim] <= use:
                    break
                del held[victim]
            held[key] = use
            self.planned[key] = victim
            if key[0] != view.layer:
                prefetch.append(key)
        self.protect = routed | set(prefetch)
        return Orders(gpu=gpu, cpu=cpu, prefetch=prefetch)

    def victim(self, cache: ExpertCache, key: Key) -> int | None:
        protect = _guarded(self.protect, key, self.layer)
        slot = planned_slot(cache, self.planned.pop(key, UNPLANNED), protect)
        if slot is not None:
            return slot
        L = cache.num_layers
        return ranked_victim(cache, protect, lambda k: -self.distance(k, self.layer, L))


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
        E, counts = self.num_experts, view.future_tokens
        p, n = np.zeros((depth, E)), np.ones((depth, E))  # [D', E]
        mean = float(sum(view.tokens)) / len(view.experts) if view.experts else 1.0
        for d in range(depth):
            experts = list(view.future[d])
            p[d, experts] = 1.0
            n[d, experts] = counts[d] if counts is not None else mean
        return Window(p, n)

    def chance_grid(self, view: LayerView, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Chances from the true future, as Belady ranks keys: 1 for a key a later layer of this step routes
        (beyond the window too); 0 for a later layer's key it does not route (next needed in the next step,
        after every key of the layers that already ran); the memory's chance for those (PreScope's)."""
        floor, used = super().chance_grid(view, window)
        if view.future is None:
            return floor, used
        rows, later = view.future, (view.layer + 1) * self.num_experts
        sizes = list(map(len, rows))
        experts = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=sum(sizes))
        at = np.repeat(np.arange(later, later + len(rows) * self.num_experts, self.num_experts), sizes) + experts
        floor[later:], used[later:] = 0.0, False
        floor[at[experts >= 0]] = 1.0
        return floor, used
