"""Prediction-driven offloading policies on the `policies.Policy` interface: the peers' and PreScope's.

- `hybrid` (HybriMoE; FreeToken's `hybrid`): each layer splits its misses between the link and the CPU by
  the cost model, and prefetches the next layer's predicted top-K.
- `lookahead_prefetch` (Pre-gated MoE, AdapMoE, ProMoE): the next layer's predicted top-K prefetched one
  layer ahead; misses load on demand.
- `activation_matrix` (MoE-Infinity): activation-matrix matching predicts the later layers; prefetches
  ranked by predicted activation with a priority that falls with the layer distance; eviction of the key
  with the lowest predicted activation.
- `prescope` (the paper): a predictor (LLaPor) over a window of D layers, the PreSched planner
  (`presched.plan`) for the split, the prefetches and the victims, and AsyncIO's priority link (on-demand
  loads overtake queued prefetches) where one expert's transfer takes >= 1 ms (`uses_async_io`); its gate,
  which runs a layer on demand where planning cannot pay, is in `gate.py`.

The common part (what a policy has seen, victims, `Predictive.forecast`) is in `predictive.py`; the limits that
know the step's true routing instead of predicting it (`belady`, `ceiling`) in `limits.py`.
Predictors follow `predictors.Predictor` (`predict_window(layer, distances, hidden=, history=)`); a policy
takes one at construction, or a zero-argument factory called at `reset`. Without one (e.g. built by name
from a config), a policy predicts from the routing it has seen: the previous step's experts at the target
layer (MoE-Infinity: this run's activation frequencies). Prediction changes speed, never outputs: every
order places each routed expert exactly once.

Letters: L MoE layers, E experts, K top-k, N tokens, D lookahead distance, S slots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter

import numpy as np

import prescope.policies.lateplan as lateplan
import prescope.policies.presched as presched
from prescope.policies.arbiter import StepArbiter
from prescope.policies.base import Costs, LayerView, Orders, PolicyError, lru_victim
from prescope.policies.cache import ExpertCache, Key
from prescope.policies.gate import Gate
from prescope.policies.hostmeter import HostMeter
from prescope.policies.predictive import (
    UNPLANNED,
    Predictive,
    PredictiveOptions,
    fastest_split,
    link_state,
    planned_slot,
    ranked_victim,
)
from prescope.policies.reliability import Reliability
from prescope.policies.window import ComputeTable, Window, absent, candidates, cheapest_held

# ---- the peers ---------------------------------------------------------------------------------------------

class LookaheadPrefetch(Predictive):
    name = "lookahead_prefetch"
    imitates = "Pre-gated MoE; AdapMoE; ProMoE"
    simplifies = ("the predictor's top-K experts of the next layer are prefetched one layer ahead, best first "
                  "(no adaptive top-k or stride); misses load on demand; per-layer LRU that never evicts "
                  "the running layer's experts or this layer's prefetches")

    def next_layer_top(self, view: LayerView, cache: ExpertCache) -> list[Key]:
        """The predictor's top-K experts of layer l+1 with p > 0 (ties by expert), less those present."""
        window = self.forecast_arrays(view, 1)
        if not len(window):
            return []
        target, p = view.layer + 1, window.p[0]  # [E]
        positive = (p > 0).nonzero()[0]  # ascending: a stable sort leaves ties by expert
        top = positive.take(np.argsort(-p.take(positive), kind="stable")[:self.top_k()]).tolist()
        present = cache.present_grid(self.num_experts)[target]
        return [(target, e) for e in top if not present[e]]

    def plan(self, view: LayerView, cache: ExpertCache) -> Orders:
        self.memory.observe(view)
        self.layer = view.layer
        prefetch = self.next_layer_top(view, cache)
        self.protect = {(view.layer, e) for e in view.experts} | set(prefetch)
        return Orders(gpu=list(view.experts), prefetch=prefetch)

    def victim(self, cache: ExpertCache, key: Key) -> int | None:
        return lru_victim(cache, key, _guarded(self.protect, key, self.layer))


def _top(rows: np.ndarray, k: int) -> np.ndarray:
    """[D, k'] the k' = min(k, E) largest of each row of `rows` [D, E], largest first, ties by index (as
    sorting by (−p, e) would)."""
    k = min(k, rows.shape[1])
    if k <= 0:
        return np.zeros((len(rows), 0), dtype=np.intp)
    if k < rows.shape[1]:  # only the entries at or above each row's k-th largest need sorting
        kth = -np.partition(-rows, k - 1, axis=1)[:, k - 1:k]  # [D, 1]
        rows = np.where(rows >= kth, rows, -np.inf)
    return np.argsort(-rows, axis=1, kind="stable")[:, :k]


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
    """MoE-Infinity's prefetching and eviction over arrays: the rows' top-K at once (`_top`), priorities by key
    id [L·E], victims ranked over the cache's slot arrays (`ExpertCache.evictable_scored`), not a Python sort
    per layer and a scan of the pool per victim. Host time per MoE layer (plan + victims), the shipped
    Qwen3-30B-A3B trace in the simulator (48 layers, 128 experts, 25 % on the GPU, 40 forward calls), on the
    2-core development CPU (median of 2 interleaved runs), before (766c7a9) -> after, median µs: 684 -> 54
    (batch 1), 1698 -> 86 (b4), 6403 -> 214 (b16); the same decisions and victims (limits.py's docstring says
    how that was checked, and gives the command). hybrid and lookahead_prefetch: 49 / 69 / 123 -> 46 / 66 / 112
    and 21 / 34 / 117 -> 18 / 31 / 110 (what is left is their idea's: the split by the cost model, per-layer
    LRU)."""

    name = "activation_matrix"
    imitates = "MoE-Infinity"
    simplifies = ("activation-matrix matching (predictors.ActivationMatrix, or without one this run's decayed "
                  "activation frequencies) predicts every later layer; each layer's predicted top-K are "
                  "ranked by activation × (1 − d/L) and the first `max_prefetch` prefetched; misses on "
                  "demand; eviction of the key with the lowest predicted activation, then LRU")
    options_type = ActivationMatrixOptions

    def __init__(self, predictor=None, **options):
        super().__init__(predictor, **options)
        self.full_depth, self.scores = self.options.lookahead is None, np.zeros(0)
        self.lookahead, self.max_prefetch = self.options.lookahead or 1, self.options.max_prefetch

    def reset(self, cache: ExpertCache, num_experts: int, costs: Costs | None = None) -> list[Key]:
        if self.full_depth:
            self.lookahead = max(1, cache.num_layers - 1)
        self.scores = np.zeros(cache.num_layers * num_experts)  # [L·E] priority by key id layer·E + expert
        self.guard = np.zeros(cache.num_layers * num_experts, dtype=bool)  # [L·E] `protect` by key id
        return super().reset(cache, num_experts, costs)

    @property
    def priority(self) -> dict[Key, float]:
        """The last plan's priority of each predicted key (activation × (1 − d/L)); a key not in it has 0."""
        ids = self.scores.nonzero()[0]
        return dict(zip(map(divmod, ids.tolist(), repeat(self.num_experts)), self.scores.take(ids).tolist(),
                        strict=True))

    def plan(self, view: LayerView, cache: ExpertCache) -> Orders:
        self.memory.observe(view)
        self.layer = view.layer
        L, K, E = view.num_layers, self.top_k(), self.num_experts
        if self.predictor is None:
            depth = max(0, min(self.lookahead, L - 1 - view.layer))
            rows = self.memory.freq[view.layer + 1:view.layer + 1 + depth]  # [D, E]
        else:
            rows = self.forecast_arrays(view, self.lookahead).p  # [D, E]
        D = len(rows)
        decay = 1.0 - np.arange(1, D + 1) / L  # [D] MoE-Infinity's priority falls linearly with the layer distance
        top = _top(rows, K)  # [D, K']
        value = np.take_along_axis(rows, top, axis=1)  # [D, K']
        chosen = value > 0
        ids = (top + (np.arange(view.layer + 1, view.layer + 1 + D) * E)[:, None])[chosen]  # [P] key ids
        value = (value * decay[:, None])[chosen]  # [P]
        self.scores[:] = 0.0
        self.scores[ids] = value
        ranked = ids.take(np.lexsort((ids, -value)))  # by falling priority, then key
        ranked = ranked[~cache.present_grid(E).reshape(-1).take(ranked)][:self.max_prefetch or K]
        prefetch = list(map(divmod, ranked.tolist(), repeat(E)))
        self.guard[:] = False
        self.guard[ranked] = True
        self.guard[np.array(view.experts, dtype=np.intp) + view.layer * E] = True
        return Orders(gpu=list(view.experts), prefetch=prefetch)

    def victim(self, cache: ExpertCache, key: Key) -> int | None:
        """A free slot, else the evictable key of lowest priority (`predictive.ranked_victim`), never a guarded
        one (the routed keys and the plan's prefetches) for a prefetch (`_guarded`)."""
        free = cache.first_free()
        if free is not None:
            return free
        guard = self.guard if key[0] != self.layer else None
        return cache.evictable_scored(self.scores, self.num_experts, guard)


# ---- PreScope ----------------------------------------------------------------------------------------------

def _never(tokens: int) -> float:
    """The CPU's time for an expert where the policy runs none there (`cpu_experts=False`): an hour, finite so
    that PreSched's arithmetic stays finite; it takes the CPU only for misses the GPU's slots cannot hold."""
    return 3600.0


@dataclass(frozen=True)
class PreScopeOptions(PredictiveOptions):
    lookahead: int = 3  # D, the window of later layers predicted and planned
    # absent experts per later layer handed to the planner (None: 2·K, the likeliest)
    candidates: int | None = None
    # attention, dense and host time between two MoE layers (None: `costs.layer_gap` from the profile)
    layer_gap_s: float | None = None
    max_prefetch: int | None = None  # a cap on prefetches per plan (None: the slots)
    # host time to issue one transfer, paid whether or not the expert is used: a candidate is offered only if
    # p·(load + h) > h, i.e. p > h / (load + h); it matters for small experts, hardly for large ones (None:
    # `costs.transfer_host`, the profile's host_per_transfer_s, what the executor charges)
    transfer_host_s: float | None = None
    # replace the predictor's p by the frequency measured so far for that p and distance (reliability.py)
    calibrate: bool = False
    # a resident key of layers l+1 … l+D is kept with the larger of its prediction and the memory's chance
    # (False: its prediction alone)
    window_reuse: bool = True
    # predict and plan only where speculation can shorten a step (`PreScope.speculation_pays`)
    gate: bool = True
    # the gate before `plan_gain` (to compare them in one run): each layer's running `device_slack` against P
    layer_gate: bool = False
    # host time of predicting and planning one layer, which what planning saves must cover (`plan_gain`)
    # (None: `costs.plan`, the profile's predict_overhead_s + plan_overhead_s)
    plan_host_s: float | None = None
    # plan only the running layer's split before its launch, the window's prefetches once its GPU work is
    # enqueued (`plan_ahead`: that planning overlaps the device; lateplan.py)
    late_prefetch: bool = False
    # where the executor measures the policy's host time (the engine), the gate's P is what planning a layer
    # measured in this run over what a layer run on demand measured, not the profile's (hostmeter.py)
    measured_plan: bool = True
    # where the executor measures whole steps (the engine), each step shape tries the gate's decisions against
    # planning every layer and planning none, and runs the fastest by measured step time (arbiter.py)
    measured_gate: bool = True
    # run misses on the CPU where PreSched finds it faster (False: only those the GPU's slots cannot hold). On the
    # H200 each CPU expert added ~1.7 ms of host time to its layer (reports/h200/real-traces, afda9cb), against
    # the profile's cost of the expert itself, which runs beside the host
    cpu_experts: bool = True

    def check(self) -> None:
        super().check()
        if self.candidates is not None and self.candidates < 1:
            raise PolicyError(f"candidates must be >= 1 per layer, got {self.candidates}")
        for name in ("layer_gap_s", "plan_host_s", "max_prefetch", "transfer_host_s"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise PolicyError(f"{name} must be >= 0, got {getattr(self, name)}")


class PreScope(Gate, Predictive):
    name = "prescope"
    imitates = "PreScope (Yu et al. 2025): LLaPor + PreSched + AsyncIO"
    simplifies = ("PreSched as built in presched.py (its docstring states the objective); the link's state "
                  "and in-flight ETAs are estimated from the cache (loads in flight land one transfer apart); "
                  "keys outside the window are kept with their decayed activation frequency as the chance of "
                  "being needed; the candidates per layer are the `candidates` most likely absent experts; "
                  "AsyncIO only where one expert's transfer takes >= 1 ms (below that its thread costs more "
                  "host time than it saves: reports/h200/comparison); "
                  "a gate (gate=True) skips prediction and planning at layers where what they could save "
                  "(plan_gain: the layer's lanes on demand against planned, prefetches hiding loads behind at "
                  "most D layers' work, judged from the costs the executor gives) is less than planning costs "
                  "the host; "
                  "such a layer runs on demand, its misses split between the link and the CPU where the host does "
                  "not hide the device (the simulator), all on the GPU where it does (the engine's host-bound "
                  "layers, where a CPU expert would cost the host, the bottleneck); "
                  "optional (calibrate=True, off by default; reports/h200/comparison says why): the predictor's "
                  "probabilities calibrated online per distance (reliability.Reliability); "
                  "optional (late_prefetch=True, off by default): only the running layer's split planned before its "
                  "launch, the window's prefetches once its GPU work is enqueued (lateplan.py)")
    async_io = True
    host_work = ("predict", "plan")
    # AsyncIO where a transfer is long enough for an on-demand load to suffer behind queued prefetches (one
    # expert's load >= 1 ms); for shorter ones the I/O thread's host time outweighs what the priority saves
    ASYNC_MIN_LOAD_S = 1e-3
    options_type = PreScopeOptions

    def __init__(self, predictor=None, **options):
        super().__init__(predictor, **options)
        o = self.options
        self.candidates, self.layer_gap_s, self.max_prefetch = o.candidates, o.layer_gap_s, o.max_prefetch
        self.transfer_host_s, self.calibrate, self.window_reuse = o.transfer_host_s, o.calibrate, o.window_reuse
        self.gate, self.plan_host_s, self.late = o.gate, o.plan_host_s, o.late_prefetch
        self.reliability: Reliability | None = None
        self.planned: dict[Key, Key | None] = {}
        self.loss: dict[Key, float] = {}
        self.issued: list[Key] = []
        self.skipped = 0  # plans not built because there was nothing to plan (nothing_to_plan)
        self.lean = 0  # layers run on demand because speculation could not pay there (gate)
        self.slack: tuple[int, float] | None = None  # (tokens·K of the step, running plan_gain)
        self.on_demand = False  # this layer runs on demand (the gate): victims by per-layer LRU
        # late_prefetch: the window is planned ahead at this layer; its forecast if already taken; layer l's split
        self.ahead, self.early, self.split = False, None, ([], [])
        self.planned_window = False  # the last plan_ahead planned the window (what an executor charges)
        self.meter = HostMeter()  # the engine's measured host time per layer, for the gate's P (measured_plan)
        self.arbiter = StepArbiter()  # the engine's measured step times: gated, every layer planned, or none

    def reset(self, cache: ExpertCache, num_experts: int, costs: Costs | None = None) -> list[Key]:
        self.lookahead = min(self.lookahead, max(1, cache.num_layers - 1)) if cache.num_layers > 1 else 1
        self.planned, self.loss, self.issued, self.skipped, self.lean, self.slack = {}, {}, [], 0, 0, None
        self.on_demand, self.ahead, self.early, self.split = False, False, None, ([], [])
        self.meter, self.arbiter = HostMeter(), StepArbiter()
        self.reliability = Reliability(self.lookahead) if self.calibrate else None
        out = super().reset(cache, num_experts, costs)
        if self.costs is not None and not self.options.cpu_experts:  # the planner never finds the CPU faster
            self.costs = dataclasses.replace(self.costs, cpu=_never)
        self.compute_table = ComputeTable(self.costs.gpu) if costs is not None else None  # c_d of the window
        return out

    def window_forecast(self, view: LayerView) -> Window:
        """The forecast of layers l+1 … l+D the planner sees (calibrated if `calibrate`), as arrays [D, E]."""
        if self.reliability is None:
            return self.forecast_arrays(view, self.lookahead)
        forecast = self.forecast(view, self.lookahead)
        self.reliability.record(view.layer, forecast)
        return Window.of(self.reliability.apply(forecast), self.num_experts)

    def transfer_host(self) -> float:
        """Host seconds to issue one transfer: the option, else what the executor's costs say."""
        return self.transfer_host_s if self.transfer_host_s is not None else self.costs.transfer_host

    def worth(self) -> float:
        """The probability under which a transfer's host time costs more than it can save: h / (load + h)."""
        h = self.transfer_host()
        return h / (self.costs.load + h)

    def offered(self, view: LayerView, cache: ExpertCache, forecast) -> list[list[int]]:
        """Per window layer l+d, the absent experts (ascending) worth a transfer (p > `worth()`)."""
        window, start = Window.of(forecast, self.num_experts), view.layer + 1
        return absent(window, cache.present_grid(self.num_experts)[start:start + len(window)], self.worth())

    def nothing_to_plan(self, view: LayerView, cache: ExpertCache, forecast, offered=None) -> bool:
        """Every routed expert resident and no candidate in the window: PreSched's plan is then the layer's
        fastest split of its resident experts (`fastest_split`) and nothing else, so it need not be built
        (exact, tested). `offered`: `offered(view, cache, forecast)`, if the caller has it."""
        if any(offered if offered is not None else self.offered(view, cache, forecast)):
            return False
        layer, resident = view.layer, cache.is_resident
        return all(resident((layer, e)) for e in view.experts)

    def instance(self, view: LayerView, cache: ExpertCache, forecast=None, offered=None,
                 decided: tuple[list[int], list[int]] | None = None) -> presched.Instance:
        """The planner's view of this layer (see presched.Instance); `offered`: `offered(view, cache, forecast)`,
        if the caller has it. `decided`: the running layer's split (GPU, CPU experts) already ordered
        (`late_prefetch`): it enters as decided, its GPU experts resident or in flight (one evicted by a later
        wave already ran), nothing of it to load, its CPU experts keeping the CPU lane busy for their time."""
        costs, layer = self.costs, view.layer
        window = self.window_forecast(view) if forecast is None else Window.of(forecast, self.num_experts)
        offered = self.offered(view, cache, window) if offered is None else offered
        link_free, eta = link_state(cache, self.issued, costs.load)
        resident = cache.resident_keys(range(layer, layer + len(window) + 1))
        predictions = candidates(window, offered, self.candidates or 2 * self.top_k())
        experts, tokens, cpu_free, resident_on_cpu = view.experts, view.tokens, 0.0, not costs.host_hides_device
        if decided is not None:
            gpu, cpu = decided
            count = dict(zip(view.experts, view.tokens, strict=True))
            experts, tokens, resident_on_cpu = tuple(gpu), tuple(count[e] for e in gpu), False
            resident |= {(layer, e) for e in gpu if (layer, e) not in eta}
            cpu_free = sum(costs.cpu(count[e]) for e in cpu)
        need = (len(experts) if decided is None else 0) + sum(map(len, predictions))  # loads and prefetches
        if cache.free_count >= need + len(window):  # each takes a free slot: PreSched reads no victim (presched.plan)
            held = ()
        else:
            q, ids = self.victim_ids(view, cache, window)
            held = cheapest_held(need, q, ids, self.num_experts)
        gap = self.layer_gap_s if self.layer_gap_s is not None else self.costs_gap
        return presched.Instance(
            layer, experts, tokens, predictions, costs.load, costs.gpu, costs.cpu,
            resident=resident, inflight=eta, free_slots=cache.free_count, evictable=held, link_free=link_free,
            demand_free=0.0 if self.uses_async_io(costs) else None, cpu_free=cpu_free, gap=gap,
            max_prefetch=self.max_prefetch, compute=self.compute_table.expected(window),
            resident_on_cpu=resident_on_cpu)

    def victim_ids(self, view: LayerView, cache: ExpertCache, forecast) -> tuple[np.ndarray, np.ndarray]:
        """(chance of being needed, key id layer·E + expert) [M] of every key the plan may evict: the pool's
        offered keys (`ExpertCache.offered_ids`; a prefetch not used yet keeps its slot until its layer ran, no
        churn between plans; the running layer's routed experts are never offered), each one's chance read
        from the grids of `chance_grid`: what the memory saw (frequency, at least the lag-1 reuse rate for the
        last run's experts), a window key's the larger of that and its prediction (window_reuse: the H200
        showed prefetches evicting experts that reuse asked for again; else the prediction alone)."""
        layer, E = view.layer, self.num_experts
        window = Window.of(forecast, E)
        ids = cache.offered_ids(range(layer + 1, layer + 1 + len(window)), [(layer, e) for e in view.experts], E)
        floor, used = self.chance_grid(view, window)
        return np.maximum(floor.take(ids), np.where(used.take(ids), self.memory.reuse, 0.0)), ids

    def chance_grid(self, view: LayerView, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(floor, used), both [L·E] by key: a key's chance of being needed is max(floor, the lag-1 reuse rate
        if used else 0), floor its decayed frequency (`Memory.chances`), in the window the larger of that and
        its prediction (window_reuse), else its prediction alone, with `used` cleared there."""
        memory, layer = self.memory, view.layer
        floor = memory.freq.copy()  # [L, E]
        used = np.concatenate((memory.now_used[:layer + 1], memory.prev_used[layer + 1:]))  # [L, E]: the last run
        rows = slice(layer + 1, layer + 1 + len(window))
        if self.window_reuse:
            floor[rows] = np.maximum(window.p, floor[rows])
        else:
            floor[rows], used[rows] = window.p, False
        return floor.ravel(), used.ravel()

    def uses_async_io(self, costs: Costs | None) -> bool:
        return costs is None or costs.load >= self.ASYNC_MIN_LOAD_S

    def plan(self, view: LayerView, cache: ExpertCache) -> Orders:
        self.planned_window = False
        if self.reliability is not None:
            if view.step != self.memory.step:
                self.reliability.new_step()
            self.reliability.observe(view.layer, view.experts)
        self.memory.observe(view)
        self.layer = view.layer
        routed = {(view.layer, e) for e in view.experts}
        self.on_demand = self.costs is not None and self.gate and not self.speculation_pays(view, cache)
        if self.costs is None or self.on_demand:
            # nothing to weigh, or speculation cannot pay: nothing predicted or planned; where the host hides the
            # device (host-bound engine layers) every routed expert on the GPU on demand (a CPU expert would put
            # its token copy, sync and hand-off on the host, the bottleneck), else the fastest split of misses
            self.lean += self.on_demand
            if self.costs is None or self.costs.host_hides_device:
                return self._unplanned(cache, routed, list(view.experts))
            gpu, cpu = fastest_split(view, cache, self.costs)
            return self._unplanned(cache, routed, gpu, cpu)
        if self.late:  # the split now, the window once the layer's GPU work is enqueued (`plan_ahead`)
            return lateplan.split_plan(self, view, cache, routed)
        forecast = self.window_forecast(view)
        offered = self.offered(view, cache, forecast)
        if self.nothing_to_plan(view, cache, forecast, offered):
            self.skipped += 1
            return self._unplanned(cache, routed, *fastest_split(view, cache, self.costs))
        inst = self.instance(view, cache, forecast, offered)
        p = presched.plan(inst)
        keys = [(view.layer, e) for e in p.loads] + list(p.prefetch)
        self.planned = dict(zip(keys, p.victims, strict=True))
        self.loss = dict(map(itemgetter(0, 1), inst.evictable))  # key -> prob
        self.protect = routed | set(p.prefetch)
        self.issued = self._still_loading(cache) + keys
        return Orders(gpu=list(p.gpu), cpu=list(p.cpu), prefetch=list(p.prefetch))

    def plan_ahead(self, view: LayerView, cache: ExpertCache) -> list[Key]:
        """With `late_prefetch`, the window's prefetches, planned now that the layer's GPU work is enqueued
        (`lateplan.window_plan`); nothing otherwise, or where `plan` ran the layer on demand."""
        return lateplan.window_plan(self, view, cache) if self.ahead else []

    def _unplanned(self, cache: ExpertCache, routed: set[Key], gpu: list[int], cpu: list[int] | None = None) -> Orders:
        """Orders without PreSched: `gpu` in that order, `cpu` on the CPU, no prefetch, no planned victims."""
        self.planned, self.loss, self.protect, self.ahead = {}, {}, routed, False
        self.issued = self._still_loading(cache)
        return Orders(gpu=gpu, cpu=cpu or [])

    def planned_work(self) -> tuple[str, ...]:
        if self.on_demand:
            return ()
        if self.late:  # before the launch, only a forecast computed on the device (lateplan.early_forecast)
            return ("predict",) if self.early is not None and "predict" in self.host_work else ()
        return self.host_work

    def planned_ahead_work(self) -> tuple[str, ...]:
        """With `late_prefetch`, the host work of the window's planning where the last `plan_ahead` did it (its
        prediction too, unless taken before the launch); none at a layer run on demand or with no later layer."""
        if not self.planned_window:
            return ()
        return tuple(w for w in self.host_work if w != "predict" or not lateplan.early_forecast(self))

    def _still_loading(self, cache: ExpertCache) -> list[Key]:
        """The keys this policy issued that are still on the link, in issue order (for `link_state`)."""
        return [k for k in self.issued if cache.is_loading(k)]

    def victim(self, cache: ExpertCache, key: Key) -> int | None:
        protect = _guarded(self.protect, key, self.layer)
        if self.on_demand:  # nothing ranked: on_demand_lru's rule (a global ranking would cost a scan per load)
            return lru_victim(cache, key, protect)
        slot = planned_slot(cache, self.planned.pop(key, UNPLANNED), protect)
        return slot if slot is not None else ranked_victim(cache, protect, lambda k: self.loss.get(k, 1.0))
