"""One MoE layer's protocol, written once; the engine and the simulator only carry out its orders.

Per MoE layer of a step, after the executor routed it (the layer's experts, most tokens first, and their
token counts, in a `LayerView`):

1. cut: prefetches no layer will use any more are stopped (`Executor.cut_stale`: the priority link only);
2. plan: the policy turns the view into orders (GPU or CPU for each routed expert, prefetches of later
   layers); the executor charges the host work the plan did (`Executor.planned`);
3. CPU experts start, overlapping what follows (`Executor.start_cpu`);
4. GPU experts run in waves: the present ones are pinned first, so no miss evicts them; each absent one
   takes the slot the policy gives up (`Policy.victim`) and loads on demand (`Executor.load`); when no slot
   can be given up, the wave computes (`Executor.compute`: each expert from its slot once its copy landed)
   and releases its pins, and the next wave loads the rest; when every slot is still loading, the executor
   lets one transfer land first (`Executor.make_room`);
5. plan ahead: the policy may add prefetches of later layers now (`Policy.plan_ahead`, none by default), its host
   time overlapping the layer's device work just enqueued; the executor charges it (`Executor.planned_ahead`);
6. prefetches (`plan`'s, then `plan_ahead`'s) are issued behind the layer's on-demand loads, stopping at the first
   that finds no slot;
7. the pins are released; the executor joins the CPU experts and combines (its own business).

The budget in slots is decided once, by `slots_for`, for both executors; `preload` is what is resident
before a run's first step.

Letters: L MoE layers, E experts, K top-k, S slots.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from prescope.layout import ModelLayout
from prescope.policies.base import LayerView, Orders, Policy
from prescope.policies.cache import CacheError, ExpertCache, Key


class BudgetError(ValueError):
    """An expert budget that cannot run (below one layer's top-k, or given twice); says the minimum."""


class Executor(ABC):
    """How an executor carries out the protocol's orders: copies, kernels, CPU work, and their times."""

    def cut_stale(self, view: LayerView) -> None:  # noqa: B027 - only a priority link has anything to stop
        """Stop in-flight prefetches no layer will use: for layers that already ran, or for this layer's
        experts it does not route; free their slots (`ExpertCache.cancel`)."""

    def planned(self, policy: Policy, view: LayerView) -> None:  # noqa: B027 - the engine measures its host time
        """The policy has planned this layer (an executor that charges planning by profile does it here)."""

    def planned_ahead(self, policy: Policy, view: LayerView) -> None:  # noqa: B027 - the engine measures its host time
        """The policy has planned ahead (`Policy.plan_ahead`) after this layer's GPU work was issued (an executor
        that charges planning by profile does it here, on the host's clock only: it overlaps that work)."""

    @abstractmethod
    def start_cpu(self, layer: int, experts: list[int]) -> None:
        """Start computing `experts` of `layer` on the CPU from host memory."""

    @abstractmethod
    def load(self, key: Key, slot: int, speculative: bool) -> bool:
        """Copy `key` into the free `slot`; an on-demand load goes before queued prefetches. True when the
        expert counts as resident at once (every later use is ordered after the copy), False when the executor
        marks it resident itself once it landed."""

    @abstractmethod
    def compute(self, layer: int, wave: list[tuple[int, int]]) -> None:
        """Compute the (expert, slot) pairs of `layer` on the GPU, each once its copy has landed."""

    def make_room(self) -> bool:
        """Every slot is pinned or loading: let the first transfer in flight land; False if none is in flight."""
        return False


@dataclass
class LayerRun:
    """What one layer's protocol did: the orders, and the host seconds spent in the policy."""

    orders: Orders  # its prefetches: `plan`'s, then `plan_ahead`'s
    plan_s: float = 0.0  # in `Policy.plan` (prediction and planning)
    victim_s: float = 0.0  # in `Policy.victim`
    forecast_wait_s: float = 0.0  # of plan_s, victim_s and ahead_s, waiting for the device (`Policy.forecast_wait_s`)
    ahead_s: float = 0.0  # in `Policy.plan_ahead` (planning that overlaps the layer's device work)

    @property
    def host_s(self) -> float:
        """The policy's own host work: plan_s + victim_s + ahead_s − forecast_wait_s, the wait taken as at most
        the time spent and never below zero (timer rounding)."""
        spent = self.plan_s + self.victim_s + self.ahead_s
        return spent - min(max(0.0, self.forecast_wait_s), spent)


def run_layer(view: LayerView, policy: Policy, cache: ExpertCache, executor: Executor) -> LayerRun:
    """Steps 1-7 of the module docstring for one MoE layer."""
    # 1. cut prefetches no layer will use
    executor.cut_stale(view)
    # 2. plan
    waited, began = policy.forecast_wait_s, time.perf_counter()
    orders = policy.plan(view, cache)
    run = LayerRun(orders, plan_s=time.perf_counter() - began, forecast_wait_s=policy.forecast_wait_s - waited)
    orders.check(view)
    executor.planned(policy, view)
    try:
        # 3. CPU experts start now and overlap the GPU work
        if orders.cpu:
            executor.start_cpu(view.layer, orders.cpu)
        # 4. GPU experts in waves
        gpu_waves(view.layer, orders.gpu, policy, cache, executor, run)
        # 5. plan ahead, while the device computes this layer
        if ahead := _timed(policy, run, "ahead_s", policy.plan_ahead, view, cache):
            orders.prefetch = [*orders.prefetch, *ahead]
        executor.planned_ahead(policy, view)
        # 6. prefetches, behind this layer's on-demand loads
        for key in orders.prefetch:
            if cache.is_present(key):
                continue
            if (slot := _victim(policy, cache, key, run)) is None:
                break
            place(key, slot, True, cache, executor)
    finally:
        # 7. a layer that raised part-way must not leave its pins behind
        cache.unpin_all()
    return run


def gpu_waves(layer: int, chosen: list[int], policy: Policy, cache: ExpertCache, executor: Executor,
              run: LayerRun) -> None:
    """Compute `chosen` experts of `layer` on the GPU: present ones first (pinned, they are hits), then each
    absent one in a slot the policy gives up (misses), in waves when the slots run short."""
    hits = {e for e in chosen if cache.is_present((layer, e))}
    pending = list(chosen)
    while pending:
        wave = [e for e in pending if cache.is_present((layer, e))]  # present: computed first, never evicted
        for e in wave:
            cache.pin((layer, e))
        deferred = [e for e in pending if not cache.is_present((layer, e))]
        while deferred:
            key = (layer, deferred[0])
            if (slot := _victim(policy, cache, key, run)) is None:
                break
            place(key, slot, False, cache, executor)
            cache.pin(key)
            wave.append(deferred.pop(0))
        if not wave:
            if not executor.make_room():
                raise CacheError(f"layer {layer}: no slot could be freed for expert {pending[0]}")
            continue
        for e in wave:
            cache.use((layer, e), hit=e in hits)
        executor.compute(layer, [(e, cache.slot((layer, e))) for e in wave])
        for e in wave:
            cache.unpin((layer, e))
        pending = deferred


def _victim(policy: Policy, cache: ExpertCache, key: Key, run: LayerRun) -> int | None:
    return _timed(policy, run, "victim_s", policy.victim, cache, key)


def _timed(policy: Policy, run: LayerRun, field: str, call, *args):
    """`call(*args)`, its wall time added to `run`'s `field` and the policy's wait for the device inside it to
    `run.forecast_wait_s`."""
    waited, began = policy.forecast_wait_s, time.perf_counter()
    out = call(*args)
    setattr(run, field, getattr(run, field) + time.perf_counter() - began)
    run.forecast_wait_s += policy.forecast_wait_s - waited
    return out


def place(key: Key, slot: int, speculative: bool, cache: ExpertCache, executor: Executor) -> None:
    """Load `key` into `slot`: the slot's expert leaves the cache first and `key` enters it only once its copy
    was issued, so a copy that fails or is interrupted leaves no key claiming bytes that are not there."""
    cache.vacate(slot)
    landed = executor.load(key, slot, speculative)
    cache.assign(key, slot, speculative=speculative)
    if landed:
        cache.mark_ready(key)


def fill(policy: Policy, cache: ExpertCache, keys: list[Key], load: Callable[[Key, int], bool]) -> None:
    """Put `keys` (a run's preload) in the slots the policy gives them, before any step (`load` copies one in
    and says whether it counts as resident at once), then count from zero."""
    for key in keys:
        if cache.is_present(key) or (slot := policy.victim(cache, key)) is None:
            continue
        cache.vacate(slot)
        landed = load(key, slot)
        cache.assign(key, slot, speculative=False)
        if landed:
            cache.mark_ready(key)
    cache.reset_stats()


def slots_for(layout: ModelLayout, *, share: float | None = None, nbytes: int | None = None,
              slots: int | None = None) -> int:
    """Slots of an expert budget given as a share of all L·E experts (rounded), as bytes (whole experts) or
    as slots; clipped to L·E. A budget below one layer's top-k is a BudgetError stating the minimum."""
    total = layout.num_moe_layers * layout.num_experts
    given = [name for name, v in (("share", share), ("bytes", nbytes), ("slots", slots)) if v is not None]
    if len(given) != 1:
        raise BudgetError(f"give the expert budget once, as a share, bytes or slots, not both or none "
                          f"(got {given or 'none'})")
    if share is not None:
        if not 0.0 < share <= 1.0:
            raise BudgetError(f"budget_share must be in (0, 1], got {share}")
        count = round(share * total)
    elif nbytes is not None:
        count = int(nbytes) // layout.expert_bytes
    else:
        count = int(slots)
    if count < layout.top_k:
        raise BudgetError(
            f"a budget of {count} experts is below the minimum of one layer's top-k (K={layout.top_k}): give at "
            f"least {layout.top_k} slots ({layout.top_k * layout.expert_bytes} bytes of {layout.expert_bytes}-byte "
            f"experts, budget_share >= {layout.top_k / total:.4f})")
    return min(count, total)


def preload(policy: Policy, cache: ExpertCache, num_experts: int, costs) -> list[Key]:
    """Reset `policy` for a run and return the keys to make resident before the first step: every expert
    when the budget holds them all, else what the policy asks for (at most the slots)."""
    keys = policy.reset(cache, num_experts, costs)
    if cache.num_slots >= cache.num_layers * num_experts:
        keys = [(layer, e) for layer in range(cache.num_layers) for e in range(num_experts)]
    return list(keys)[: cache.num_slots]
