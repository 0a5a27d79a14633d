"""The objective of any plan: J (`presched`'s module docstring) computed from a plan alone, with no search.

PreSched's `plan` minimises J by a structured search; `expected_window_latency` evaluates J of whatever plan it
is given, checking the plan is legal on the way. It is the reference the planner is tested against (exhaustive
search compares every plan by it) and the measure its own `objective` must agree with. `link_schedule` lays a
plan's transfers on the link as the model assumes: on-demand loads first, then the prefetches.
Letters: D lookahead distance, τ transfer time of one expert.
"""

from __future__ import annotations

from prescope.policies.presched import CostTables, Instance, Key, Plan, PlanError, layer_starts


def _avoided(r: float, i: int) -> float:
    """β = clip(r − (i − 1), 0, 1): share of the stall a prefetch at position i avoids."""
    x = r - (i - 1)
    return 1.0 if x >= 1.0 else (x if x > 0.0 else 0.0)


def expected_window_latency(inst: Instance, p: Plan) -> float:
    """J of plan `p` on `inst` (`presched`'s module docstring), computed from the plan alone; PlanError for a plan that
    does not place every routed expert once, loads a present expert, prefetches outside the window or a
    present key, or names impossible victims."""
    costs, tau = CostTables(inst), inst.load
    routed = dict(zip(inst.experts, inst.tokens, strict=True))
    if sorted(p.gpu + p.cpu) != sorted(routed):
        raise PlanError(f"plan must place every routed expert once: routed {sorted(routed)}, gpu {p.gpu}, cpu {p.cpu}")
    ready = {}
    for e in p.gpu:
        key = (inst.layer, e)
        ready[e] = 0.0 if key in inst.resident else inst.inflight.get(key)
    absent_gpu = {e for e, t in ready.items() if t is None}
    if absent_gpu != set(p.loads) or len(p.loads) != len(set(p.loads)):
        raise PlanError(f"loads {p.loads} must be exactly the absent experts on the GPU {sorted(absent_gpu)}")
    for j, e in enumerate(p.loads, 1):
        ready[e] = inst.demand_start + j * tau
    g = 0.0
    for e in p.gpu:
        g = max(g, ready[e]) + costs.gpu[routed[e]]
    cpu_end = inst.cpu_free + sum(costs.cpu[routed[e]] for e in p.cpu) if p.cpu else 0.0
    f0 = max(g, cpu_end)
    # victims
    if len(p.victims) != len(p.loads) + len(p.prefetch):
        raise PlanError(f"one victim per load and prefetch: {len(p.loads)} + {len(p.prefetch)}, got {len(p.victims)}")
    named = [v for v in p.victims if v is not None]
    loss_of = {h.key: h.prob * costs.stall[h.tokens] for h in inst.evictable}
    if len(named) != len(set(named)) or any(v not in loss_of for v in named):
        raise PlanError(f"victims must be distinct evictable keys, got {named}")
    if len(p.victims) - len(named) > inst.free_slots:
        raise PlanError(f"{len(p.victims) - len(named)} free slots used, {inst.free_slots} available")
    # the window
    starts = layer_starts(inst, costs)
    cands = {}
    base = 0.0
    for d, layer in enumerate(inst.predictions, 1):
        for cand in layer:
            key = (inst.layer + d, cand.expert)
            if key in inst.resident or key in inst.inflight:
                continue
            wt = cand.prob * costs.stall[cand.tokens]
            cands[key] = (d, wt)
            base += wt
    if len(set(p.prefetch)) != len(p.prefetch):
        raise PlanError(f"prefetches must be distinct, got {p.prefetch}")
    L0 = inst.link_free + len(p.loads) * tau
    saved = 0.0
    for i, key in enumerate(p.prefetch, 1):
        if not 1 <= key[0] - inst.layer <= len(inst.predictions) or key in inst.resident or key in inst.inflight:
            raise PlanError(f"prefetch {key} is outside the window or already present")
        if key in cands:
            d, wt = cands[key]
            saved += wt * _avoided((starts[d - 1] - L0) / tau, i)
    return f0 + base - saved + sum(loss_of[v] for v in named)


def link_schedule(inst: Instance, p: Plan) -> list[tuple[Key, str, float, float]]:
    """(key, kind, start, end) of the plan's transfers: on-demand loads from demand_start, then prefetches
    from link_free + m·τ."""
    tau, rows = inst.load, []
    for j, e in enumerate(p.loads):
        start = inst.demand_start + j * tau
        rows.append(((inst.layer, e), "on_demand", start, start + tau))
    L0 = inst.link_free + len(p.loads) * tau
    for i, key in enumerate(p.prefetch):
        rows.append((key, "prefetch", L0 + i * tau, L0 + (i + 1) * tau))
    return rows
