"""Prediction-driven offloading policies on the `policies.Policy` interface: the peers', PreScope's, the oracle's.

- `hybrid` (HybriMoE; FreeToken's `hybrid`): each layer splits its misses between the link and the CPU by
  the cost model, and prefetches the next layer's predicted top-K.
- `lookahead_prefetch` (Pre-gated MoE, AdapMoE, ProMoE): the next layer's predicted top-K prefetched one
  layer ahead; misses load on demand.
- `activation_matrix` (MoE-Infinity): activation-matrix matching predicts the later layers; prefetches
  ranked by predicted activation with a priority that falls with the layer distance; eviction of the key
  with the lowest predicted activation.
- `prescope` (the paper): a predictor (LLaPor) over a window of D layers, the PreSched planner
  (`presched.plan`) for the split, the prefetches and the victims, and AsyncIO's priority link (on-demand
  loads overtake queued prefetches) where one expert's transfer takes >= 1 ms (`uses_async_io`).
- `oracle` (the limit): the true later routing of the step (`LayerView.future`), every later expert
  prefetched in order of use while Belady's rule (evict the key used farthest ahead) finds a victim used
  later than it, the same victims for misses.

Predictors follow `predictors.Predictor` (`predict_window(layer, distances, hidden=, history=)`); a policy
takes one at construction, or a zero-argument factory called at `reset`. Without one (e.g. built by name
from a config), a policy predicts from the routing it has seen: the previous step's experts at the target
layer (MoE-Infinity: this run's activation frequencies). Prediction changes speed, never outputs: every
order places each routed expert exactly once.

Letters: L MoE layers, E experts, K top-k, N tokens, D lookahead distance, S slots.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from itertools import compress, repeat
from operator import is_

import numpy as np

from . import presched
from .cache import ExpertCache, Key, SlotState
from .policies import POLICIES, Costs, LayerView, Orders, Policy
from .reliability import Reliability

MISSING = -1  # the trace's padding expert id (prescope.trace.MISSING), kept here to avoid importing pandas
UNPLANNED = object()  # a load the last plan did not foresee


class PolicyError(ValueError):
    """A policy set up in a way that cannot work (a predictor of another model, a lookahead too deep)."""


# ---- what a policy has seen --------------------------------------------------------------------------------

class Memory:
    """The routing a policy has seen in this run: this step's and the previous step's experts per layer,
    token counts, and decayed activation frequencies per (layer, expert)."""

    def __init__(self, num_layers: int, num_experts: int, decay: float):
        if not 0.0 <= decay < 1.0:
            raise PolicyError(f"memory decay must be in [0, 1), got {decay}")
        self.L, self.E, self.decay = num_layers, num_experts, decay
        self.step = None
        self.now: list[dict[int, int]] = [{} for _ in range(num_layers)]
        self.prev: list[dict[int, int]] = [{} for _ in range(num_layers)]
        self.freq = [[0.0] * num_experts for _ in range(num_layers)]  # decayed share of steps using each expert
        self.seen = [[0] * num_experts for _ in range(num_layers)]  # selections by earlier steps
        self.min_routed = None
        self.reuse = 0.0  # decayed share of a layer's experts that its previous step also used (lag-1 reuse)

    def observe(self, view: LayerView) -> None:
        if view.step != self.step:
            for layer in range(self.L):
                for e, n in self.now[layer].items():
                    self.seen[layer][e] += n
            self.prev = [now or prev for now, prev in zip(self.now, self.prev, strict=True)]
            self.now = [{} for _ in range(self.L)]
            self.step = view.step
        self.now[view.layer] = dict(zip(view.experts, view.tokens, strict=True))
        before = self.prev[view.layer]
        if before and view.experts:
            again = sum(1 for e in view.experts if e in before) / len(view.experts)
            self.reuse = self.decay * self.reuse + (1.0 - self.decay) * again
        row, keep = self.freq[view.layer], self.decay
        for e in range(self.E):
            row[e] *= keep
        for e in view.experts:
            row[e] += 1.0 - keep
        if view.experts:
            self.min_routed = min(self.min_routed or len(view.experts), len(view.experts))

    def previous_step(self, layer: int, distance: int) -> tuple[list[float], list[float]]:
        """(p, tokens) per expert of layer + distance: the previous step's experts there, used for sure."""
        p, n = [0.0] * self.E, [1.0] * self.E
        for e, count in self.prev[layer + distance].items():
            p[e], n[e] = 1.0, float(count)
        return p, n

    def frequency(self, layer: int) -> list[float]:
        return self.freq[layer]

    def chance(self, layer: int, expert: int, ran: bool) -> float:
        """P(the next use of `layer` routes to `expert`) from what was seen: its decayed frequency, and at
        least the lag-1 reuse rate if the layer's last run (`ran`: this step, else the previous) used it."""
        last = self.now[layer] if ran else self.prev[layer]
        return max(self.freq[layer][expert], self.reuse if expert in last else 0.0)

    def current(self, view: LayerView):
        """[1, L, W] int64: this step's experts at layers <= view.layer, MISSING elsewhere (History.current)."""
        import torch

        rows = [list(self.now[layer]) if layer <= view.layer else [] for layer in range(self.L)]
        width = max([1] + [len(r) for r in rows])
        return torch.tensor([[r + [MISSING] * (width - len(r)) for r in rows]], dtype=torch.int64)

    def history(self, view: LayerView, with_truth: bool):
        """A one-row `predictors.History` of the running step (exact at batch 1; at larger batches one
        pseudo-token holding every routed expert): this step's experts at layers <= view.layer, the previous
        step's, earlier steps' selections, and with `with_truth` the true routing incl. `view.future`."""
        import torch

        from .predictors import History

        now = [list(self.now[layer]) if layer <= view.layer else [] for layer in range(self.L)]
        prev = [list(self.prev[layer]) for layer in range(self.L)]
        truth = None
        if with_truth and view.future is not None:
            truth = now[:view.layer + 1] + [list(f) for f in view.future]
            truth += [[] for _ in range(self.L - len(truth))]
        width = max([1] + [len(r) for rows in (now, prev, truth or []) for r in rows])

        def pad(rows):
            return torch.tensor([[r + [MISSING] * (width - len(r)) for r in rows]], dtype=torch.int64)  # [1, L, W]

        seq = torch.tensor([self.seen], dtype=torch.float32)  # [1, L, E]
        return History(pad(now), pad(prev), seq, None if truth is None else pad(truth))


# ---- victims ----------------------------------------------------------------------------------------------

def lru_victim(cache: ExpertCache, key: Key, protect: set[Key]) -> int | None:
    """`Policy.victim`'s per-layer LRU, never giving up a key in `protect`."""
    own = [s for s in cache.evictable(key[0]) if cache.owner[s] not in protect]
    if cache.free and (len(cache.by_layer[key[0]]) < cache.quota or not own):
        return min(cache.free)
    if own:
        return cache.lru(own)
    others = [s for s in cache.evictable() if cache.owner[s] not in protect]
    return cache.lru(others) if others else None


def planned_slot(cache: ExpertCache, planned, protect: set[Key]) -> int | None:
    """The slot a plan chose for a load: a free one (planned None), or its victim's while that key is still
    evictable and unprotected; None when the plan no longer applies."""
    if planned is UNPLANNED:
        return None
    if planned is None:
        return min(cache.free) if cache.free else None
    slot = cache.slot_of.get(planned)
    if slot is None or planned in protect or slot in cache.pinned or cache.state[slot] is not SlotState.RESIDENT:
        return None
    return slot


def ranked_victim(cache: ExpertCache, protect: set[Key], rank: Callable[[Key], float]) -> int | None:
    """A free slot, else the evictable slot whose key ranks lowest (ties: least recently used)."""
    if cache.free:
        return min(cache.free)
    pool = [s for s in cache.evictable() if cache.owner[s] not in protect]
    return min(pool, key=lambda s: (rank(cache.owner[s]), cache.last_use[s])) if pool else None


# ---- the common part ---------------------------------------------------------------------------------------

class Predictive(Policy):
    """A policy that predicts layers l+1 … l+D from a `predictors.Predictor` (or from what it has seen).

    predictor: a Predictor, a zero-argument factory of one, or None (the previous step's routing).
    lookahead: D, the layers predicted ahead (checked at `reset` against the model and the predictor).
    memory_decay: weight of the past in the decayed activation frequencies (0.8: about the last 5 steps).
    """

    use_graphs = True  # replay a hidden-state predictor's window from CUDA graphs (False: always eager)

    def __init__(self, predictor=None, lookahead: int = 1, memory_decay: float = 0.8):
        if lookahead < 1:
            raise PolicyError(f"lookahead must be >= 1 layer, got {lookahead}")
        self.predictor_source, self.lookahead, self.memory_decay = predictor, lookahead, memory_decay
        self.predictor = None
        self.protect: set[Key] = set()
        self.layer, self.costs_gap = -1, 0.0
        self.graphs = None  # streams.GraphCache of the forecast, built on first use (CUDA graphs on the GPU)
        self.graphs_for = None  # the predictor those graphs call

    def reset(self, cache: ExpertCache, num_experts: int, costs: Costs | None = None) -> list[Key]:
        super().reset(cache, num_experts, costs)
        L = cache.num_layers
        if self.lookahead > L - 1 and L > 1:
            raise PolicyError(f"{self.name}: lookahead {self.lookahead} reaches past the model's {L} MoE layers "
                              f"(at most {L - 1})")
        source = self.predictor_source
        self.predictor = source() if callable(source) and not hasattr(source, "predict") else source
        if self.predictor is not None:
            check_predictor(self.predictor, L, num_experts, self.lookahead, self.name)
        self.memory = Memory(L, num_experts, self.memory_decay)
        self.protect = set()
        if self.graphs_for is not self.predictor:  # the graphs replay one predictor's calls: kept across resets
            self.graphs, self.graphs_for = None, self.predictor
        if costs is not None:
            self.costs = Costs(costs.load, _memo(costs.gpu), _memo(costs.cpu))
            self.costs_gap = getattr(costs, "layer_gap", 0.0)
        return []

    def top_k(self) -> int:
        layout = getattr(self.predictor, "layout", None)
        return layout.top_k if layout is not None else (self.memory.min_routed or 1)

    def forecast(self, view: LayerView, depth: int) -> list[tuple[list[float], list[float]]]:
        """(p, tokens) per expert for layers l+1 … l+D' (D' = min(depth, layers left)): p the probability
        that some token of the step routes to the expert, tokens the expected count if it does."""
        depth = min(depth, view.num_layers - 1 - view.layer)
        if depth <= 0:
            return []
        if self.predictor is None:
            return [self.memory.previous_step(view.layer, d) for d in range(1, depth + 1)]
        import torch

        from .predictors import History

        hidden, pred, distances = view.hidden, self.predictor, list(range(1, depth + 1))
        rows = hidden.shape[0] if hidden is not None else 1
        if not getattr(pred, "needs_hidden", False):  # history-based: the routing seen so far
            history = self.memory.history(view, with_truth=True)
            scores = pred.predict_window(view.layer, distances, hidden=hidden, history=history)
            k = self.top_k() if hidden is not None and rows == 1 else max(1, len(view.experts))
            return _as_lists(_used(torch.stack([scores[d] for d in distances]), min(k, self.num_experts)))
        # hidden-state predictors read layer l's routing only if they ask for it (LLaPor's use_routing), and
        # only when it is exact (one token; with more, LLaPor routes with its own routers); the whole window
        # then runs as one CUDA graph on the GPU (its ~40 kernels cost their launches, not their arithmetic)
        if hidden is None:  # the predictor says what it needs
            pred.predict_window(view.layer, distances, hidden=None, history=None)
        inputs = [self._predictor_input(hidden)]
        if rows == 1 and getattr(getattr(pred, "config", None), "use_routing", False):
            inputs.append(self.memory.current(view).to(inputs[0].device, non_blocking=True))  # [1, L, K]
        k = min(self.top_k(), self.num_experts)

        def window(x, *current):
            history = History(current=current[0]) if current else None
            scores = pred.predict_window(view.layer, distances, hidden=x, history=history)
            return _used(torch.stack([scores[d] for d in distances]), k)  # [2, D', E]

        if self.graphs is None:
            from .streams import GraphCache

            self.graphs = GraphCache(self.use_graphs)
        key = (view.layer, depth, *(tuple(x.shape) for x in inputs))
        return _as_lists(self.graphs(key, window, *inputs))

    def _predictor_input(self, hidden):
        """The router input on the predictor's device (LLaPor's parameters live where it was loaded)."""
        where = getattr(getattr(self.predictor, "config", None), "device", None)
        return hidden if where is None else hidden.to(where, non_blocking=True)


def _memo(fn: Callable[[float], float]) -> Callable[[float], float]:
    """A cost function remembered by token count (the policies ask for few distinct counts)."""
    seen: dict[float, float] = {}

    def cached(n: float) -> float:
        if n not in seen:
            seen[n] = fn(n)
        return seen[n]

    return cached


def _used(scores, k: int):
    """[D, N, E] scores -> [2, D, E]: P(expert used by some of the N tokens), p = 1 − Π(1 − q), and the
    expected tokens if used, Σq / p, within [1, N]. p is summed in log space: in float32 1 − (1 − q) is 0
    for q < 6e-8, which would make Σq / p explode."""
    import torch

    from .predictors import inclusion_probs

    q = inclusion_probs(scores, k)  # [D, N, E]
    p = -torch.expm1(torch.log1p(-q).sum(dim=1))  # [D, E]; q = 1 gives log 0 = -inf, so p = 1 exactly
    n = q.sum(dim=1) / p.clamp_min(1e-30)  # [D, E]
    return torch.stack([p, n.clamp(1.0, float(scores.shape[1]))])


def _as_lists(used) -> list[tuple[list[float], list[float]]]:
    """[2, D, E] -> per distance (p, tokens) as lists (one device-to-host copy)."""
    p, n = used.tolist()
    return list(zip(p, n, strict=True))


def check_predictor(predictor, num_layers: int, num_experts: int, lookahead: int, policy: str) -> None:
    """PolicyError unless `predictor` was built for a model with these L and E and reaches `lookahead`."""
    layout = getattr(predictor, "layout", None)
    if layout is not None and (layout.num_moe_layers, layout.num_experts) != (num_layers, num_experts):
        raise PolicyError(
            f"{policy}: predictor {getattr(predictor, 'name', type(predictor).__name__)!r} was built for "
            f"{layout.model_class} with {layout.num_moe_layers} MoE layers and {layout.num_experts} experts, "
            f"but this model has {num_layers} MoE layers and {num_experts} experts")
    config = getattr(predictor, "config", None)
    trained = getattr(config, "distance", None)
    if trained is not None and lookahead > trained:
        raise PolicyError(f"{policy}: lookahead {lookahead} exceeds the {trained} layers predictor "
                          f"{getattr(predictor, 'name', '')!r} was trained to predict")


def link_state(cache: ExpertCache, issued: Sequence[Key], load: float) -> tuple[float, dict[Key, float]]:
    """(link_free, ETA per key in flight) estimated from the cache: keys loading land one transfer apart,
    in the order this policy issued them (others first); the link is free after the last."""
    loading = list(compress(cache.owner, map(is_, cache.state, repeat(SlotState.LOADING))))  # in slot order
    order = {k: i for i, k in enumerate(issued)}
    loading.sort(key=lambda k: order.get(k, -1))
    return load * len(loading), {k: load * (i + 1) for i, k in enumerate(loading)}


def _smallest(n: int, pairs: list[tuple[float, Key]]) -> list[tuple[float, Key]]:
    """heapq.nsmallest(n, pairs) for (value, key) pairs with distinct keys, faster on a few hundred pairs: only
    the pairs at or under the n-th smallest value are sorted as tuples."""
    if len(pairs) > n > 0:
        cut = sorted([q for q, _ in pairs])[n - 1]
        pairs = [pair for pair in pairs if pair[0] <= cut]
    return sorted(pairs)[:n]


def fastest_split(view: LayerView, cache: ExpertCache, costs: Costs | None) -> tuple[list[int], list[int]]:
    """(gpu, cpu): the split of this layer's misses that ends the layer first (presched.split_finishes),
    loading at most as many as there are slots to take (free, or held by other layers' experts)."""
    if costs is None:
        return list(view.experts), []
    routed = {(view.layer, e) for e in view.experts}
    takeable = len(cache.free) + sum(1 for s in cache.evictable() if cache.owner[s] not in routed)
    inst = presched.Instance(view.layer, view.experts, view.tokens, (), costs.load, costs.gpu, costs.cpu,
                             resident=frozenset(k for k in routed if cache.is_present(k)), free_slots=takeable)
    finishes, present, misses = presched.split_finishes(inst)
    m = min(range(len(finishes)), key=lambda i: (finishes[i], i))
    return [e for _, e, _ in present] + [e for e, _ in misses[:m]], [e for e, _ in misses[m:]]


# ---- the peers ---------------------------------------------------------------------------------------------

class LookaheadPrefetch(Predictive):
    name = "lookahead_prefetch"
    imitates = "Pre-gated MoE; AdapMoE; ProMoE"
    simplifies = ("the predictor's top-K experts of the next layer are prefetched one layer ahead, best first "
                  "(no adaptive top-k or stride); misses load on demand; per-layer LRU that never evicts "
                  "the running layer's experts or this layer's prefetches")

    def __init__(self, predictor=None, lookahead: int = 1, memory_decay: float = 0.8):
        super().__init__(predictor, lookahead, memory_decay)

    def next_layer_top(self, view: LayerView, cache: ExpertCache) -> list[Key]:
        forecast = self.forecast(view, 1)
        if not forecast:
            return []
        p, _ = forecast[0]
        target = view.layer + 1
        ranked = sorted((e for e in range(self.num_experts) if p[e] > 0), key=lambda e: (-p[e], e))
        return [(target, e) for e in ranked[:self.top_k()] if not cache.is_present((target, e))]

    def plan(self, view: LayerView, cache: ExpertCache) -> Orders:
        self.memory.observe(view)
        self.layer = view.layer
        prefetch = self.next_layer_top(view, cache)
        self.protect = {(view.layer, e) for e in view.experts} | set(prefetch)
        return Orders(gpu=list(view.experts), prefetch=prefetch)

    def victim(self, cache: ExpertCache, key: Key) -> int | None:
        return lru_victim(cache, key, _guarded(self.protect, key, self.layer))


def _guarded(protect: set[Key], key: Key, layer: int) -> set[Key]:
    """What a load may not evict: for a prefetch, the running layer's experts and this plan's prefetches;
    for a miss of the running layer, nothing beyond what the executor pinned (after a wave its experts are
    done and their slots must be free to take)."""
    return set() if key[0] == layer else protect


class Hybrid(LookaheadPrefetch):
    name = "hybrid"
    imitates = "HybriMoE; FreeToken's `hybrid` mode"
    simplifies = ("per layer, the split of misses between link+GPU and CPU that ends the layer first by the "
                  "cost model (HybriMoE's dynamic intra-layer scheduling), ignoring later layers; the "
                  "next layer's predicted top-K prefetched (its impact-driven prefetch, one layer deep); "
                  "per-layer LRU instead of its score-based cache")

    def plan(self, view: LayerView, cache: ExpertCache) -> Orders:
        self.memory.observe(view)
        self.layer = view.layer
        gpu, cpu = fastest_split(view, cache, self.costs)
        prefetch = self.next_layer_top(view, cache)
        self.protect = {(view.layer, e) for e in view.experts} | set(prefetch)
        return Orders(gpu=gpu, cpu=cpu, prefetch=prefetch)


class ActivationMatrixPolicy(Predictive):
    name = "activation_matrix"
    imitates = "MoE-Infinity"
    simplifies = ("activation-matrix matching (predictors.ActivationMatrix, or without one this run's decayed "
                  "activation frequencies) predicts every later layer; each layer's predicted top-K are "
                  "ranked by activation × (1 − d/L) and the first `max_prefetch` prefetched; misses on "
                  "demand; eviction of the key with the lowest predicted activation, then LRU")

    def __init__(self, predictor=None, lookahead: int | None = None, max_prefetch: int | None = None,
                 memory_decay: float = 0.8):
        super().__init__(predictor, lookahead or 1, memory_decay)
        self.full_depth, self.max_prefetch, self.priority = lookahead is None, max_prefetch, {}

    def reset(self, cache: ExpertCache, num_experts: int, costs: Costs | None = None) -> list[Key]:
        if self.full_depth:
            self.lookahead = max(1, cache.num_layers - 1)
        self.priority = {}
        return super().reset(cache, num_experts, costs)

    def plan(self, view: LayerView, cache: ExpertCache) -> Orders:
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
            decay = 1.0 - d / L  # MoE-Infinity's priority falls linearly with the layer distance
            top = sorted(range(self.num_experts), key=lambda e: (-row[e], e))[:K]
            priority.update({(view.layer + d, e): row[e] * decay for e in top if row[e] > 0})
        self.priority = priority
        ranked = sorted(priority, key=lambda k: (-priority[k], k))
        prefetch = [k for k in ranked if not cache.is_present(k)][:self.max_prefetch or K]
        self.protect = {(view.layer, e) for e in view.experts} | set(prefetch)
        return Orders(gpu=list(view.experts), prefetch=prefetch)

    def victim(self, cache: ExpertCache, key: Key) -> int | None:
        protect = _guarded(self.protect, key, self.layer)
        return ranked_victim(cache, protect, lambda k: self.priority.get(k, 0.0))


# ---- PreScope ----------------------------------------------------------------------------------------------

class PreScope(Predictive):
    name = "prescope"
    imitates = "PreScope (Yu et al. 2025): LLaPor + PreSched + AsyncIO"
    simplifies = ("PreSched as built in presched.py (its docstring states the objective); the link's state "
                  "and in-flight ETAs are estimated from the cache (loads in flight land one transfer apart); "
                  "keys outside the window are kept with their decayed activation frequency as the chance of "
                  "being needed; the candidates per layer are the `candidates` most likely absent experts; "
                  "AsyncIO only where one expert's transfer takes >= 1 ms (measured: below that its thread "
                  "costs more host time than it saves); "
                  "optional (calibrate=True, off by default: on the H200 it cost 0.3-0.5 ms per layer and bought "
                  "more prefetches, not fewer): the predictor's probabilities calibrated online per distance "
                  "(reliability.Reliability)")
    async_io = True
    host_work = ("predict", "plan")
    # AsyncIO where a transfer is long enough for an on-demand load to suffer behind queued prefetches: one
    # expert's load >= 1 ms. Measured on the H200 (reports/h200/comparison): with Mixtral's 336 MB experts
    # (6.6 ms) AsyncIO is 2-5 % faster; with OLMoE's and Qwen3's 9-12 MiB experts (0.2 ms) its I/O thread
    # costs the host-bound decode loop 5-31 %
    ASYNC_MIN_LOAD_S = 1e-3
    # candidates: absent experts per later layer handed to the planner (None: 2·K, the likeliest);
    # layer_gap_s: attention, dense and host time between two MoE layers (None: `costs.layer_gap` if the
    # executor's costs carry it, else 0); max_prefetch: a cap on prefetches per plan (None: the slots);
    # transfer_host_s: host time to issue one transfer, paid whether or not the expert is used: a candidate
    # is offered only if p·(load + h) > h, i.e. p > h / (load + h). The default is the engine's host cost
    # per load measured on the H200 (bench, rev 70a3c5d: 0.09 ms per load on the OLMoE twin, 0.2 ms on the
    # Qwen3 twin, at batch 1): it matters for small experts (OLMoE 12 MB: p > 0.3), hardly for large ones
    # (Mixtral 336 MB: p > 0.016); calibrate: replace the predictor's p by the frequency measured so far for
    # that p and distance (reliability.py), meant to stop an over-confident predictor buying wrong prefetches;
    # window_reuse: a resident key of layers l+1 … l+D is kept with the larger of its prediction and the
    # memory's chance (False: its prediction alone)
    TRANSFER_HOST_S = 1e-4

    def __init__(self, predictor=None, lookahead: int = 3, candidates: int | None = None,
                 layer_gap_s: float | None = None, max_prefetch: int | None = None, memory_decay: float = 0.8,
                 transfer_host_s: float = TRANSFER_HOST_S, calibrate: bool = False, window_reuse: bool = True):
        super().__init__(predictor, lookahead, memory_decay)
        if candidates is not None and candidates < 1:
            raise PolicyError(f"candidates must be >= 1 per layer, got {candidates}")
        if transfer_host_s < 0:
            raise PolicyError(f"transfer_host_s must be >= 0 s, got {transfer_host_s}")
        self.candidates, self.layer_gap_s, self.max_prefetch = candidates, layer_gap_s, max_prefetch
        self.transfer_host_s, self.calibrate, self.window_reuse = transfer_host_s, calibrate, window_reuse
        self.reliability: Reliability | None = None
        self.planned: dict[Key, Key | None] = {}
        self.loss: dict[Key, float] = {}
        self.issued: list[Key] = []

    def reset(self, cache: ExpertCache, num_experts: int, costs: Costs | None = None) -> list[Key]:
        self.lookahead = min(self.lookahead, max(1, cache.num_layers - 1)) if cache.num_layers > 1 else 1
        self.planned, self.loss, self.issued = {}, {}, []
        self._gpu_table = np.zeros(1)  # gpu(n) by token count n, grown to the largest count seen
        self.reliability = Reliability(self.lookahead) if self.calibrate else None
        return super().reset(cache, num_experts, costs)

    def instance(self, view: LayerView, cache: ExpertCache) -> presched.Instance:
        """The planner's view of this layer (see presched.Instance)."""
        costs, layer, E = self.costs, view.layer, self.num_experts
        forecast = self.forecast(view, self.lookahead)
        if self.reliability is not None:
            self.reliability.record(layer, forecast)
            forecast = self.reliability.apply(forecast)
        link_free, eta = link_state(cache, self.issued, costs.load)
        owner, state, pinned, present, ready = cache.owner, cache.state, cache.pinned, cache.slot_of, SlotState.RESIDENT
        resident = frozenset([owner[s] for j in range(layer, layer + len(forecast) + 1) for s in cache.by_layer[j]
                              if state[s] is ready])
        keep = self.candidates or 2 * self.top_k()
        worth = self.transfer_host_s / (costs.load + self.transfer_host_s)  # p below it: the issue costs more
        predictions, compute = [], []
        for d, (p, n) in enumerate(forecast, 1):
            absent = [e for e in range(E) if p[e] > worth and (layer + d, e) not in present]
            absent.sort(key=p.__getitem__, reverse=True)  # stable: ties by expert
            predictions.append(tuple(presched.Candidate(e, p[e], max(1, round(n[e]))) for e in absent[:keep]))
            compute.append(self._expected_compute(p, n))
        # victims: another key's chance of being needed is what the memory saw (frequency, at least the lag-1
        # reuse rate for the last run's experts), a window key's the larger of that and its prediction
        # (window_reuse; else the prediction alone), so a prefetch never evicts what temporal reuse will ask
        # for again, even where the predictor is weak (the H200 showed prefetches evicting reused experts); a prefetch not used yet keeps its slot until its layer ran
        # (no churn between plans); the plan takes at most one victim per routed expert and candidate
        routed, chances, memory, prefetched = {(layer, e) for e in view.experts}, [], self.memory, cache.prefetched
        for j, slots in cache.by_layer.items():  # every slot: comprehensions, and memory.chance inlined
            d = j - layer
            if 1 <= d <= len(forecast) and not self.window_reuse:
                row = forecast[d - 1][0]
                chances += [(row[owner[s][1]], owner[s]) for s in slots
                            if state[s] is ready and s not in pinned and not prefetched[s]]
            elif 1 <= d <= len(forecast):  # the prediction, or what the memory saw if that is likelier
                row, seen, last, reuse = forecast[d - 1][0], memory.freq[j], memory.prev[j], memory.reuse
                chances += [(max(row[key[1]], seen[key[1]], reuse if key[1] in last else 0.0), key)
                            for key in [owner[s] for s in slots
                                        if state[s] is ready and s not in pinned and not prefetched[s]]]
            else:
                row, last, reuse = memory.freq[j], memory.now[j] if d <= 0 else memory.prev[j], memory.reuse
                chances += [(max(row[key[1]], reuse if key[1] in last else 0.0), key)
                            for key in [owner[s] for s in slots if state[s] is ready and s not in pinned]
                            if d or key not in routed]
        need = len(view.experts) + sum(len(c) for c in predictions)
        held = tuple(presched.Held(key, min(1.0, q)) for q, key in _smallest(need, chances))
        gap = self.layer_gap_s if self.layer_gap_s is not None else self.costs_gap
        return presched.Instance(
            layer, view.experts, view.tokens, tuple(predictions), costs.load, costs.gpu, costs.cpu,
            resident=resident, inflight=eta, free_slots=len(cache.free), evictable=held, link_free=link_free,
            demand_free=0.0 if self.uses_async_io(costs) else None, gap=gap, max_prefetch=self.max_prefetch,
            compute=tuple(compute))

    def uses_async_io(self, costs: Costs | None) -> bool:
        return costs is None or costs.load >= self.ASYNC_MIN_LOAD_S

    def _expected_compute(self, p: list[float], n: list[float]) -> float:
        """c_d = Σ_e p_e·gpu(round(n_e)) (n_e >= 1), from a table of gpu() by token count (n <= the step's
        tokens, so the table stays as small as the batch)."""
        tokens = np.maximum(np.rint(n), 1).astype(np.int64)  # [E]
        top = int(tokens.max())
        if len(self._gpu_table) <= top:
            self._gpu_table = np.array([0.0] + [self.costs.gpu(c) for c in range(1, top + 1)])
        return float(np.dot(np.maximum(p, 0.0), self._gpu_table[tokens]))

    def plan(self, view: LayerView, cache: ExpertCache) -> Orders:
        if self.reliability is not None:
            if view.step != self.memory.step:
                self.reliability.new_step()
            self.reliability.observe(view.layer, view.experts)
        self.memory.observe(view)
        self.layer = view.layer
        routed = {(view.layer, e) for e in view.experts}
        if self.costs is None:  # nothing to weigh: every expert on the GPU, no prefetch
            self.planned, self.protect = {}, routed
            return Orders(gpu=list(view.experts))
        inst = self.instance(view, cache)
        p = presched.plan(inst)
        keys = [(view.layer, e) for e in p.loads] + list(p.prefetch)
        self.planned = dict(zip(keys, p.victims, strict=True))
        self.loss = {h.key: h.prob for h in inst.evictable}
        self.protect = routed | set(p.prefetch)
        self.issued = [k for k in self.issued if cache.slot_of.get(k) is not None
                       and cache.state[cache.slot_of[k]] is SlotState.LOADING] + keys
        return Orders(gpu=list(p.gpu), cpu=list(p.cpu), prefetch=list(p.prefetch))

    def victim(self, cache: ExpertCache, key: Key) -> int | None:
        protect = _guarded(self.protect, key, self.layer)
        slot = planned_slot(cache, self.planned.pop(key, UNPLANNED), protect)
        return slot if slot is not None else ranked_victim(cache, protect, lambda k: self.loss.get(k, 1.0))


# ---- the oracle --------------------------------------------------------------------------------------------

class OracleFuture(Policy):
    name = "oracle"
    imitates = "the limit: true future routing, Belady's eviction, full overlap"
    simplifies = ("knows the rest of the running step (LayerView.future), not later steps: a key not used "
                  "again this step is taken to be needed next step at its layer, so the farthest such layer "
                  "goes first (then least recently used); the layer's misses split by the cost model; "
                  "without LayerView.future (the live engine) it has nothing to know and plans on demand")
    async_io = True

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
        if view.future is None and not self.warned:
            warnings.warn("oracle: this executor gives no LayerView.future; planning on demand", RuntimeWarning,
                          stacklevel=2)
            self.warned = True
        future = view.future or ()
        self.next_use = {k: 0 for k in routed}
        for d, experts in enumerate(future, 1):
            for e in experts:
                self.next_use.setdefault((view.layer + d, e), d)
        gpu, cpu = fastest_split(view, cache, self.costs) if view.future is not None else (list(view.experts), [])
        # Belady admission: walk the later keys in order of use, each taking a free slot or the slot of the
        # resident key used farthest ahead, as long as that key is used later than the one loaded
        L = view.num_layers
        held = {k: self.distance(k, view.layer, L) for k in cache.slot_of}
        misses = [(view.layer, e) for e in gpu if (view.layer, e) not in cache.slot_of]
        free = len(cache.free)
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


PEERS = (Hybrid, LookaheadPrefetch, ActivationMatrixPolicy, PreScope, OracleFuture)


def register(registry: dict) -> None:
    """Add the prediction-driven policies to a policy registry (policies.POLICIES) by name."""
    registry.update({cls.name: cls for cls in PEERS})


register(POLICIES)
