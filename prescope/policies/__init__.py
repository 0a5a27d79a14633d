"""Offloading policies: what each MoE layer runs where, what to prefetch, what to evict.

- `base`: the interface every executor runs (`Policy.plan`, `Policy.victim`, `LayerView`, `Orders`, `Costs`)
  and the two prediction-free policies;
- `cache`: the GPU slot bookkeeping a policy reads and the executors update;
- `peers`: the prediction-driven policies (the peers' systems, PreScope, the oracle), on `predictive`;
- `presched`: PreSched, the cross-layer planner, a pure function; `reliability`: online calibration.

`POLICIES` names every policy; `make_policy(name, **options)` builds one.
"""

from __future__ import annotations

from collections.abc import Callable

from prescope.policies.base import CpuMisses, OnDemandLRU, Policy
from prescope.policies.peers import ActivationMatrixPolicy, Hybrid, LookaheadPrefetch, OracleFuture, PreScope

POLICIES: dict[str, Callable[..., Policy]] = {cls.name: cls for cls in (
    OnDemandLRU, CpuMisses, Hybrid, LookaheadPrefetch, ActivationMatrixPolicy, PreScope, OracleFuture)}


def make_policy(name: str, **options) -> Policy:
    """The policy registered as `name`, built with `options` (its constructor's keywords)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](**options)
