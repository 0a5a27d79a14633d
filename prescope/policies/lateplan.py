"""PreScope's late prefetch planning (`PreScopeOptions.late_prefetch`, off by default): before a layer's experts are
launched only their GPU/CPU split is decided; the window's prefetches are planned once the layer's GPU work is
enqueued (`Policy.plan_ahead`), so that planning overlaps the device instead of delaying the layer's launch.

Why: in the engine the host waits for each layer's routing, then plans, then launches the layer's experts; every
microsecond of planning before the launch is a microsecond the device idles. Measured on one NVIDIA H200
(revision 766c7a9), the real Qwen3-30B-A3B trace replayed on its 48-layer twin (9 MiB experts, a load 0.17 ms,
the layer's GPU work ~0.26 ms at batch 1): `ceiling[gate=False]` spent 0.40 / 0.68 ms of host time per layer in
`Policy.plan` at batch 1 / 4 and decoded a step in 52.6 / 101 ms against `on_demand_lru`'s 33.5 / 67.0 ms,
moving the same bytes. Only the running layer's split must precede its launch.

With the option:
- `split_plan` (PreScope's `plan`): PreSched on an instance with no predictions (the running layer's experts, the
  link and cache as they are): the split of the routed experts and the victims of its on-demand loads, ranked by
  the memory's chances (for the ceiling, the step's true future) since the window's forecast is not read yet;
  where every routed expert is resident, `fastest_split` (the same split, exactly: `PreScope.nothing_to_plan`).
  A forecast computed on the device (a hidden-state predictor's CUDA graph, a predictor on the GPU) is still taken
  here: read after the layer's kernels it would wait for them too; its planning moves, its prediction does not
  (`early_forecast`).
- `window_plan` (PreScope's `plan_ahead`): PreSched over the window l+1 … l+D with the forecast, the victims and
  the link's state now (the on-demand loads just issued in flight ahead of any prefetch); layer l enters as
  decided (its GPU experts resident or in flight, nothing to load; its CPU experts keep the CPU lane busy for
  their time), so only the layers' start times S_d come from it. Its prefetches follow `plan`'s (none).
- `unhidden` (the gate, `PreScope.plan_gain`): of the planning host time P only what the layer's expert kernels do
  not hide counts: P_before + max(0, P − P_before − (Σ gpu(n) + wave)), P_before the prediction's part
  (`Costs.predict`) where it stays before the launch (`early_forecast`), else 0.

Simulated effect (`sim.simulator`, where `plan_ahead`'s time is charged on the host's clock after the layer's GPU
work is issued, so it overlaps that work): `python -m prescope.experiments.latesim` (defaults: profile
reports/h200/h200-fast-engine.json with its plan_overhead_s 0.4 ms and predict_overhead_s 0.096 ms as they are,
the shipped Qwen3-30B-A3B trace on the qwen3-30b-a3b twin's layout, 9 MiB experts, budget 0.25, the whole trace:
128 / 32 / 8 decode steps at batch 1 / 4 / 16; 32 s on the 2-core development CPU), at 0d19537 and again, the
same, at 0ee51ca (main merged). Simulated ms per decode step (x: on_demand_lru's time over the policy's;
prescope without a predictor: the memory's forecast):

    policy                                    batch 1          batch 4           batch 16
    on_demand_lru                             28.47 (1.00x)    67.50 (1.00x)    367.15 (1.00x)
    ceiling[gate=False]                       39.86 (0.71x)    65.84 (1.03x)    145.14 (2.53x)
    ceiling[gate=False,late_prefetch=True]    37.35 (0.76x)    64.60 (1.05x)    142.74 (2.57x)
    prescope[gate=False]                      51.31 (0.55x)    85.23 (0.79x)    183.06 (2.01x)
    prescope[gate=False,late_prefetch=True]   37.79 (0.75x)    63.78 (1.06x)    163.71 (2.24x)
    prescope                                  29.39 (0.97x)    79.04 (0.85x)    183.06 (2.01x)
    prescope[late_prefetch=True]              28.41 (1.00x)    63.47 (1.06x)    163.71 (2.24x)

Simulated, read with care: the late split is decided without the window's predictions, so it loads more misses on
demand where PreSched's joint plan would have left the link to prefetches (the ceiling at batch 1: 2752 loads on
demand and 7355 prefetches against 1988 and 7983, hit rate 0.925 against 0.943; each load also costs the host
host_per_transfer_s 0.15 ms); most of the gain is the planning host time the layer's kernels hide, which is
largest where the plan is charged in full (prescope: prediction and planning 0.5 ms per layer) and the decisions
hardly change (prescope[gate=False] at batch 1 moves the same bytes either way). On the GPU the share hidden is
what the measured engine will tell: a layer's expert kernels take ~0.26 ms at batch 1 there.

Letters: L MoE layers, E experts, K top-k, D lookahead distance.
"""

from __future__ import annotations

from operator import itemgetter

import numpy as np

import prescope.policies.presched as presched
from prescope.policies.base import LayerView, Orders
from prescope.policies.cache import ExpertCache, Key
from prescope.policies.predictive import fastest_split, link_state
from prescope.policies.window import Window, cheapest_held


def early_forecast(policy) -> bool:
    """Whether the window's forecast is taken before the layer's launch: that of a predictor that may compute on
    the device (one reading hidden states, which live there, or one whose parameters live off the CPU), since
    reading it waits for everything queued before it (`Predictive._read`), the layer's kernels too once they
    are enqueued. The memory's forecast and the ceiling's true future are host work: taken after the launch."""
    predictor = policy.predictor
    if predictor is None:
        return False
    where = getattr(predictor, "device", None)
    return bool(getattr(predictor, "needs_hidden", False)) or (where is not None and str(where) != "cpu")


def unhidden(policy, view: LayerView, p: float) -> float:
    """Of the planning host time `p`, what the layer's expert kernels do not hide: the prediction's part
    (`Costs.predict`, at most p) where the forecast is taken before the launch (`early_forecast`), plus the
    rest less the kernels' device time, Σ gpu(n) over the routed experts + one wave's fixed time, never below 0.
    Loads on demand are not counted as room: prefetching is meant to remove them."""
    costs = policy.costs
    before = min(p, costs.predict) if early_forecast(policy) else 0.0
    kernels = sum(map(costs.gpu, view.tokens)) + (costs.wave if view.experts else 0.0)
    return before + max(0.0, p - before - kernels)


def split_plan(policy, view: LayerView, cache: ExpertCache, routed: set[Key]) -> Orders:
    """The running layer's orders (GPU or CPU for each routed expert, no prefetch) and the victims of its
    on-demand loads; the window is planned later, by `window_plan`."""
    costs, layer, E = policy.costs, view.layer, policy.num_experts
    depth = min(policy.lookahead, view.num_layers - 1 - layer)
    policy.early = policy.window_forecast(view) if depth > 0 and early_forecast(policy) else None
    policy.ahead = depth > 0
    policy.protect = routed
    if all(cache.is_resident(key) for key in routed):  # nothing in flight or absent: the split alone
        gpu, cpu = fastest_split(view, cache, costs)
        policy.planned, policy.loss, policy.issued = {}, {}, policy._still_loading(cache)
        policy.split = (gpu, cpu)
        return Orders(gpu=gpu, cpu=cpu)
    misses = sum(not cache.is_present(key) for key in routed)
    link_free, eta = link_state(cache, policy.issued, costs.load)
    held = ()
    if cache.free_count < misses:  # victims by what the memory says (for the ceiling, the true future)
        ids = cache.offered_ids(range(layer + 1, layer + 1 + depth), [(layer, e) for e in view.experts], E)
        floor, used = policy.chance_grid(view, Window(np.zeros((0, E)), np.ones((0, E))))
        q = np.maximum(floor.take(ids), np.where(used.take(ids), policy.memory.reuse, 0.0))
        held = cheapest_held(misses, q, ids, E)
    inst = presched.Instance(layer, view.experts, view.tokens, (), costs.load, costs.gpu, costs.cpu,
                             resident=cache.resident_keys(range(layer, layer + 1)), inflight=eta,
                             free_slots=cache.free_count, evictable=held, link_free=link_free,
                             demand_free=0.0 if policy.uses_async_io(costs) else None,
                             resident_on_cpu=not costs.host_hides_device)
    p = presched.plan(inst)
    keys = [(layer, e) for e in p.loads]
    policy.planned = dict(zip(keys, p.victims, strict=True))
    policy.loss = dict(map(itemgetter(0, 1), held))
    policy.issued = policy._still_loading(cache) + keys
    policy.split = (list(p.gpu), list(p.cpu))
    return Orders(gpu=list(p.gpu), cpu=list(p.cpu))


def window_plan(policy, view: LayerView, cache: ExpertCache) -> list[Key]:
    """The window's prefetches, planned once the layer's GPU work is enqueued (see the module docstring)."""
    if not policy.ahead:
        return []
    policy.ahead, policy.planned_window = False, True
    forecast = policy.early if policy.early is not None else policy.window_forecast(view)
    policy.early = None
    window = Window.of(forecast, policy.num_experts)
    offered = policy.offered(view, cache, window)
    if not any(offered):
        policy.skipped += 1
        return []
    inst = policy.instance(view, cache, window, offered, decided=policy.split)  # layer l as decided
    p = presched.plan(inst)
    prefetch = list(p.prefetch)
    policy.planned = dict(zip(prefetch, p.victims[len(p.loads):], strict=True))
    policy.loss = dict(map(itemgetter(0, 1), inst.evictable))
    policy.protect = policy.protect | set(prefetch)
    policy.issued = policy._still_loading(cache) + prefetch
    return prefetch
