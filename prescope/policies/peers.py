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

The common part (what a policy has seen, victims, `Predictive.forecast`) is in `predictive.py`.
Predictors follow `predictors.Predictor` (`predict_window(layer, distances, hidden=, history=)`); a policy
takes one at construction, or a zero-argument factory called at `reset`. Without one (e.g. built by name
from a config), a policy predicts from the routing it has seen: the previous step's experts at the target
layer (MoE-Infinity: this run's activation frequencies). Prediction changes speed, never outputs: every
order places each routed expert exactly once.

Letters: L MoE layers, E experts, K top-k, N tokens, D lookahead distance, S slots.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

import prescope.policies.presched as presched
from prescope.policies.base import Costs, LayerView, Orders, Policy, PolicyError, lru_victim
from prescope.policies.cache import ExpertCache, Key
from prescope.policies.predictive import (
    UNPLANNED,
    Predictive,
    PredictiveOptions,
    fastest_split,
    link_state,
    planned_slot,
    ranked_victim,
    smallest,
)
from prescope.policies.reliability import Reliability

# ---- the peers ---------------------------------------------------------------------------------------------

class LookaheadPrefetch(Predictive):
    name = "lookahead_prefetch"
    imitates = "Pre-gated MoE; AdapMoE; ProMoE"
    simplifies = ("the predictor's top-K experts of the next layer are prefetched one layer ahead, best first "
                  "(no adaptive top-k or stride); misses load on demand; per-layer LRU that never evicts "
                  "the running layer's experts or this layer's prefetches")

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


@dataclass(frozen=True)
class ActivationMatrixOptions(PredictiveOptions):
    lookahead: int | None = None  # None: every later layer
    max_prefetch: int | None = None  # prefetches per plan (None: K)

    def check(self) -> None:
        if self.lookahead is not None and self.lookahead < 1:
            raise PolicyError(f"lookahead must be >= 1 layer, got {self.lookahead}")
        for name in ("max_prefetch",):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise PolicyError(f"{name} must be >= 0, got {getattr(self, name)}")


class ActivationMatrixPolicy(Predictive):
    name = "activation_matrix"
    imitates = "MoE-Infinity"
    simplifies = ("activation-matrix matching (predictors.ActivationMatrix, or without one this run's decayed "
                  "activation frequencies) predicts every later layer; each layer's predicted top-K are "
                  "ranked by activation × (1 − d/L) and the first `max_prefetch` prefetched; misses on "
                  "demand; eviction of the key with the lowest predicted activation, then LRU")

    options_type = ActivationMatrixOptions

    def __init__(self, predictor=None, **options):
        super().__init__(predictor, **options)
        self.full_depth, self.priority = self.options.lookahead is None, {}
        self.lookahead, self.max_prefetch = self.options.lookahead or 1, self.options.max_prefetch

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

@dataclass(frozen=True)
class PreScopeOptions(PredictiveOptions):
    lookahead: int = 3  # D, the window of later layers predicted and planned
    # absent experts per later layer handed to the planner (None: 2·K, the likeliest)
    candidates: int | None = None
    # attention, dense and host time between two MoE layers (None: `costs.layer_gap` from the profile)
    layer_gap_s: float | None = None
    max_prefetch: int | None = None  # a cap on prefetches per plan (None: the slots)
    # host time to issue one transfer, paid whether or not the expert is used: a candidate is offered only if
    # p·(load + h) > h, i.e. p > h / (load + h); it matters for small experts, hardly for large ones
    transfer_host_s: float = 1e-4
    # replace the predictor's p by the frequency measured so far for that p and distance (reliability.py)
    calibrate: bool = False
    # a resident key of layers l+1 … l+D is kept with the larger of its prediction and the memory's chance
    # (False: its prediction alone)
    window_reuse: bool = True
    # predict and plan only where speculation can shorten a step (`PreScope.speculation_pays`)
    gate: bool = True
    # host time of predicting and planning one layer, which the device's excess over the host must cover
    # (None: `costs.plan`, the profile's predict_overhead_s + plan_overhead_s)
    plan_host_s: float | None = None

    def check(self) -> None:
        super().check()
        if self.candidates is not None and self.candidates < 1:
            raise PolicyError(f"candidates must be >= 1 per layer, got {self.candidates}")
        if self.transfer_host_s < 0:
            raise PolicyError(f"transfer_host_s must be >= 0 s, got {self.transfer_host_s}")
        for name in ("layer_gap_s", "plan_host_s", "max_prefetch"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise PolicyError(f"{name} must be >= 0, got {getattr(self, name)}")


class PreScope(Predictive):
    name = "prescope"
    imitates = "PreScope (Yu et al. 2025): LLaPor + PreSched + AsyncIO"
    simplifies = ("PreSched as built in presched.py (its docstring states the objective); the link's state "
                  "and in-flight ETAs are estimated from the cache (loads in flight land one transfer apart); "
                  "keys outside the window are kept with their decayed activation frequency as the chance of "
                  "being needed; the candidates per layer are the `candidates` most likely absent experts; "
                  "AsyncIO only where one expert's transfer takes >= 1 ms (below that its thread costs more "
                  "host time than it saves: reports/h200/comparison); "
                  "a gate (gate=True) skips prediction and planning at layers where the device's on-demand work "
                  "exceeds the host's own time per layer by less than planning costs (host-bound: a prefetch could "
                  "not shorten the step); "
                  "optional (calibrate=True, off by default; reports/h200/comparison says why): the predictor's "
                  "probabilities calibrated online per distance (reliability.Reliability)")
    async_io = True
    host_work = ("predict", "plan")
    # AsyncIO where a transfer is long enough for an on-demand load to suffer behind queued prefetches (one
    # expert's load >= 1 ms); for shorter ones the I/O thread's host time outweighs what the priority saves
    ASYNC_MIN_LOAD_S = 1e-3
    GATE_WEIGHT = 0.2  # weight of the newest layer in the running slack (about the last 5 layers)
    options_type = PreScopeOptions

    def __init__(self, predictor=None, **options):
        super().__init__(predictor, **options)
        o = self.options
        self.candidates, self.layer_gap_s, self.max_prefetch = o.candidates, o.layer_gap_s, o.max_prefetch
        self.transfer_host_s, self.calibrate, self.window_reuse = o.transfer_host_s, o.calibrate, o.window_reuse
        self.gate, self.plan_host_s = o.gate, o.plan_host_s
        self.reliability: Reliability | None = None
        self.planned: dict[Key, Key | None] = {}
        self.loss: dict[Key, float] = {}
        self.issued: list[Key] = []
        self.skipped = 0  # plans not built because there was nothing to plan (nothing_to_plan)
        self.lean = 0  # layers run on demand because speculation could not pay there (gate)
        self.slack: tuple[int, float] | None = None  # (tokens·K of the step, running device_slack)
        self.on_demand = False  # this layer runs on demand (the gate): victims by per-layer LRU

    def reset(self, cache: ExpertCache, num_experts: int, costs: Costs | None = None) -> list[Key]:
        self.lookahead = min(self.lookahead, max(1, cache.num_layers - 1)) if cache.num_layers > 1 else 1
        self.planned, self.loss, self.issued, self.skipped, self.lean, self.slack = {}, {}, [], 0, 0, None
        self.on_demand = False
        self._gpu_table = np.zeros(1)  # gpu(n) by token count n, grown to the largest count seen
        self.reliability = Reliability(self.lookahead) if self.calibrate else None
        return super().reset(cache, num_experts, costs)

    def window_forecast(self, view: LayerView) -> list[tuple[list[float], list[float]]]:
        """The forecast of layers l+1 … l+D the planner sees (calibrated if `calibrate`)."""
        forecast = self.forecast(view, self.lookahead)
        if self.reliability is not None:
            self.reliability.record(view.layer, forecast)
            forecast = self.reliability.apply(forecast)
        return forecast

    def worth(self) -> float:
        """The probability under which a transfer's host time costs more than it can save: h / (load + h)."""
        return self.transfer_host_s / (self.costs.load + self.transfer_host_s)

    def device_slack(self, view: LayerView, cache: ExpertCache) -> float:
        """How much longer the device's work of this layer, run on demand, takes than the host's own time per
        layer (seconds; <= 0: host-bound). On demand: the routed experts' GPU time plus a load for each one
        that is absent or only there because a prefetch brought it (not used yet); host: `costs.host`, the
        launch of each routed expert (`costs.launch`, the fixed part of its GPU time: at decode the engine
        is launch-bound, so host and device both spend it) and the host time of issuing those loads. The
        engine syncs with the device once per layer (the routing), so a layer's loads and kernels run while
        the host launches the next layer: when they take less than that, a prefetch cannot make the step
        shorter and only adds its own host time and the planning."""
        costs, layer, warm = self.costs, view.layer, cache.is_warm
        demand = sum(1 for e in view.experts if not warm((layer, e)))
        device = sum(map(costs.gpu, view.tokens)) + demand * costs.load
        return device - (costs.host + len(view.experts) * costs.launch + demand * self.transfer_host_s)

    def speculation_pays(self, view: LayerView, cache: ExpertCache) -> bool:
        """The gate: the running `device_slack` of this step's shape (restarted when the step's tokens
        change, e.g. from prefill to decode) exceeds `plan_host_s`: the device, not the host, is the
        bottleneck, by more than predicting and planning cost the host."""
        x, shape = self.device_slack(view, cache), sum(view.tokens)
        if self.slack is None or self.slack[0] != shape:
            self.slack = (shape, x)
        else:
            self.slack = (shape, self.slack[1] + self.GATE_WEIGHT * (x - self.slack[1]))
        return self.slack[1] > (self.plan_host_s if self.plan_host_s is not None else self.costs.plan)

    def nothing_to_plan(self, view: LayerView, cache: ExpertCache, forecast) -> bool:
        """Every routed expert resident and no candidate in the window: PreSched's plan is then all routed
        experts on the GPU in its order and nothing else, so it need not be built (exact, tested)."""
        layer, resident, present = view.layer, cache.is_resident, cache.is_present
        if not all(resident((layer, e)) for e in view.experts):
            return False
        worth = self.worth()
        return not any(q > worth and not present((layer + d, e))
                       for d, (p, _) in enumerate(forecast, 1) for e, q in enumerate(p))

    def instance(self, view: LayerView, cache: ExpertCache, forecast=None) -> presched.Instance:
        """The planner's view of this layer (see presched.Instance)."""
        costs, layer, E = self.costs, view.layer, self.num_experts
        forecast = self.window_forecast(view) if forecast is None else forecast
        link_free, eta = link_state(cache, self.issued, costs.load)
        resident = frozenset(cache.resident_keys(range(layer, layer + len(forecast) + 1)))
        keep, worth, present = self.candidates or 2 * self.top_k(), self.worth(), cache.present_keys()
        predictions, compute = [], []
        for d, (p, n) in enumerate(forecast, 1):
            absent = [e for e in range(E) if p[e] > worth and (layer + d, e) not in present]
            absent.sort(key=p.__getitem__, reverse=True)  # stable: ties by expert
            predictions.append(tuple(presched.Candidate(e, p[e], max(1, round(n[e]))) for e in absent[:keep]))
            compute.append(self._expected_compute(p, n))
        # victims: a key's chance of being needed is what the memory saw (frequency, at least the lag-1 reuse
        # rate for the last run's experts); a window key's the larger of that and its prediction (window_reuse:
        # the H200 showed prefetches evicting experts that reuse asked for again; else the prediction alone);
        # a prefetch not used yet keeps its slot until its layer ran (no churn between plans); the plan takes
        # at most one victim per routed expert and candidate
        routed, chances, memory = {(layer, e) for e in view.experts}, [], self.memory
        for j in range(cache.num_layers):
            d, window = j - layer, 1 <= j - layer <= len(forecast)
            keys = cache.evictable_keys(j, keep_fresh=window)
            if d == 0:
                keys = [key for key in keys if key not in routed]
            if window and not self.window_reuse:
                seen = [forecast[d - 1][0][e] for _, e in keys]
            else:
                seen = memory.chances(j, [e for _, e in keys], ran=d <= 0)
                if window:
                    row = forecast[d - 1][0]
                    seen = [max(row[e], q) for (_, e), q in zip(keys, seen, strict=True)]
            chances += zip(seen, keys, strict=True)
        need = len(view.experts) + sum(len(c) for c in predictions)
        held = tuple(presched.Held(key, min(1.0, q)) for q, key in smallest(need, chances))
        gap = self.layer_gap_s if self.layer_gap_s is not None else self.costs_gap
        return presched.Instance(
            layer, view.experts, view.tokens, tuple(predictions), costs.load, costs.gpu, costs.cpu,
            resident=resident, inflight=eta, free_slots=cache.free_count, evictable=held, link_free=link_free,
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
        self.on_demand = self.costs is not None and self.gate and not self.speculation_pays(view, cache)
        if self.costs is None or self.on_demand:
            # nothing to weigh, or host-bound: every routed expert on the GPU on demand, nothing predicted or
            # planned (a CPU expert would put its token copy, sync and hand-off on the host, the bottleneck)
            self.lean += self.on_demand
            return self._unplanned(cache, routed, list(view.experts))
        forecast = self.window_forecast(view)
        if self.nothing_to_plan(view, cache, forecast):
            self.skipped += 1
            order = sorted(zip(view.experts, view.tokens, strict=True), key=lambda r: (-r[1], r[0]))
            return self._unplanned(cache, routed, [e for e, _ in order])
        inst = self.instance(view, cache, forecast)
        p = presched.plan(inst)
        keys = [(view.layer, e) for e in p.loads] + list(p.prefetch)
        self.planned = dict(zip(keys, p.victims, strict=True))
        self.loss = {h.key: h.prob for h in inst.evictable}
        self.protect = routed | set(p.prefetch)
        self.issued = self._still_loading(cache) + keys
        return Orders(gpu=list(p.gpu), cpu=list(p.cpu), prefetch=list(p.prefetch))

    def _unplanned(self, cache: ExpertCache, routed: set[Key], gpu: list[int]) -> Orders:
        """Orders without PreSched: `gpu` in that order, no prefetch, no planned victims."""
        self.planned, self.loss, self.protect = {}, {}, routed
        self.issued = self._still_loading(cache)
        return Orders(gpu=gpu)

    def planned_work(self) -> tuple[str, ...]:
        return () if self.on_demand else self.host_work

    def _still_loading(self, cache: ExpertCache) -> list[Key]:
        """The keys this policy issued that are still on the link, in issue order (for `link_state`)."""
        return [k for k in self.issued if cache.is_loading(k)]

    def victim(self, cache: ExpertCache, key: Key) -> int | None:
        protect = _guarded(self.protect, key, self.layer)
        if self.on_demand:  # nothing ranked: on_demand_lru's rule (a global ranking would cost a scan per load)
            return lru_victim(cache, key, protect)
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



