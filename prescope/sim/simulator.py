"""The simulated executor: replay a routing trace through a policy on a hardware profile, on a virtual clock.

The same policy objects, cache and layer protocol as the engine (`policies.protocol.run_layer`: cut, plan,
CPU experts, GPU experts in waves, prefetch), the same orders, times from `hardware/cost.py` (bound to the
layout and profile in `simcost.py`). A step is one forward call over a batch; a batch-1 trace of several
prompts is grouped into batches of `batch_size` prompts whose decode steps run together. Per step, each
decoder layer in order: attention and the other resident work of the layer on the GPU (`dense_time` for
N tokens); the host's own work of the MoE step (the profile's per-layer overhead, `host`); then the
protocol, whose orders this executor times (`_Replay`): the cache catches up with the clock before the
plan; the plan costs the profile's prediction and planning times for what the policy did
(`Policy.planned_work`: prescope's gate skips both), before the layer's GPU work; what the policy plans once that
work is issued (`Policy.plan_ahead`, `Policy.planned_ahead_work`: prescope's `late_prefetch`) costs the host the
same times after it, overlapping it; issuing each transfer costs `host_per_transfer_s`;
CPU experts run one after another on the CPU lane, overlapping GPU work; a GPU expert starts when its
load has landed and the GPU is free (or, where the profile has `gpu_grouped`, as the fast engine does: a
wave's experts run as one grouped kernel once the last of its loads has landed, `cost.gpu_wave_time`); when
every slot is still loading, the GPU waits for the first transfer to land. The layer ends when its GPU and
CPU experts are done. When the budget holds every expert, the host's time per layer is the profile's
device-driven one (`HardwareProfile.host_per_layer`: the engine runs such a step as one CUDA graph).

The link (`link.py`): one FIFO queue (`async_io=False`: a queued prefetch delays a later on-demand load),
or a priority queue (`async_io=True`: on-demand loads overtake queued prefetches at `chunk_bytes`
granularity, each chunk costing one `transfer_time`, and a prefetch the running layer waits for is
promoted). Every load into a slot starts after the slot's previous occupant finished computing. When the
budget holds every expert, all are resident before time 0 (as in the engine); otherwise the policy's
`reset` keys are. Each step's lower bound prices the misses of an optimal cache (`belady_misses`).

Simplifications: one CPU worker lane; host work before a layer's experts are issued is serial with the GPU
(the routing decision needs a host sync), later host work of the layer (planning ahead, issuing prefetches)
overlaps its GPU and CPU experts; KV-cache reads are not timed; non-expert parameters per layer are estimated from the layout
unless given (`default_dense_params`); a layer's prefetches are queued once all its on-demand loads are.

Letters: L MoE layers, E experts, K top-k, N tokens in a step, H hidden, I expert width, S slots.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from prescope.config import IO_CHUNK_BYTES, EngineConfig
from prescope.hardware import cost
from prescope.hardware.profiles import HardwareProfile, load_profile
from prescope.layout import ModelLayout
from prescope.policies import make_policy
from prescope.policies.base import LayerView, Policy, costs_for
from prescope.policies.cache import CacheStats, ExpertCache, Key
from prescope.policies.protocol import Executor, fill, preload, run_layer, slots_for
from prescope.routing.trace import MISSING, Trace
from prescope.sim.link import (
    FifoLink,
    Load,
    PriorityLink,
    belady_miss_flags,
    belady_misses,
)
from prescope.sim.simcost import SimTimes, default_dense_params, model_dense_params
from prescope.timeline import make_timeline, prefetch_precision, step_summary

HOST_WORK = ("predict", "plan")
STAT_FIELDS = tuple(CacheStats.__dataclass_fields__)


class SimulationError(ValueError):
    """A replay that cannot run as asked (budget, batch size, trace/layout mismatch); says what to change."""


@dataclass(frozen=True)
class SimResult:
    """A replay's timeline (one row per operation), per-step summary, totals and the config that made it."""

    timeline: pd.DataFrame
    summary: pd.DataFrame
    totals: dict
    config: dict
    trace: Trace | None = field(default=None, repr=False)


# ---- the replay ----------------------------------------------------------------------------------------

def replay_steps(trace: Trace, batch_size: int = 1, decode_only: bool = True,
                 max_steps: int | None = None) -> list[tuple[int, int, str, np.ndarray]]:
    """The forward calls to simulate, in order: (batch, trace step, phase, token indices [N]). Prompts are
    grouped `batch_size` at a time (by prompt id); their tokens of the same step form one call."""
    if batch_size < 1:
        raise SimulationError(f"batch_size must be >= 1, got {batch_size}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1):
        raise SimulationError(f"max_steps must be a number of forward calls >= 1 (or None for all), got {max_steps!r}")
    tokens = trace.tokens
    keep = (tokens["phase"] == "decode").to_numpy() if decode_only else np.ones(len(tokens), bool)
    prompts = tokens["prompt"].to_numpy()
    batch = np.searchsorted(np.unique(prompts), prompts) // batch_size
    frame = pd.DataFrame({"batch": batch, "step": tokens["step"].to_numpy()})[keep]
    rows = frame.index.to_numpy()
    calls = [(int(b), int(s), "prefill" if s == 0 else "decode", np.sort(rows[idx]))
             for (b, s), idx in frame.groupby(["batch", "step"], sort=True).indices.items()]
    return calls if max_steps is None else calls[:max_steps]


def _routed(experts: np.ndarray, num_experts: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per layer: routed experts, most tokens first (ties by index), and their token counts.
    `experts` is one step's [N, L, K]; MISSING entries are skipped."""
    n, L, K = experts.shape
    valid = experts != MISSING  # [N, L, K]
    flat = (np.arange(L)[None, :, None] * num_experts + experts)[valid]
    counts = np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)  # [L, E]
    order = np.argsort(-counts * num_experts + np.arange(num_experts), axis=1, kind="stable")  # [L, E]
    ranked = np.take_along_axis(counts, order, axis=1)
    nnz = (counts > 0).sum(axis=1)
    return [(tuple(order[layer, :nnz[layer]].tolist()), tuple(ranked[layer, :nnz[layer]].tolist()))
            for layer in range(L)]


class _Replay(Executor):
    """The virtual clock, the cache and the lanes of one replay; `layer()` runs one MoE layer of one step
    through the layer protocol (`policies.protocol.run_layer`), carrying out its orders on the clock."""

    def __init__(self, policy: Policy, cache: ExpertCache, times: SimTimes, num_experts: int, async_io: bool,
                 chunk_bytes: int, device_driven: bool = False):
        self.policy, self.cache, self.times, self.num_experts = policy, cache, times, num_experts
        self.by_layer = times.per_layer()  # [L] each MoE layer's experts priced by their own bytes
        self.rows: list[tuple] = []
        self.ids = itertools.count()
        self.link = (PriorityLink(times.link, self._emit, self._done, chunk_bytes) if async_io
                     else FifoLink(times.link, self._emit, self._done))
        self.inflight: dict[Key, Load] = {}
        self.landed: list[tuple[float, int, Load]] = []
        self.release = [0.0] * cache.num_slots  # when each slot's last occupant finished computing
        self.cpu_free = 0.0
        work = tuple(policy.host_work)
        if set(work) - set(HOST_WORK):
            raise SimulationError(f"policy {policy.name!r} declares host_work {work}; allowed: {HOST_WORK}")
        p = times.profile
        self.per_transfer = p.host_per_transfer_s  # host time to issue one transfer
        host = p.host_per_layer(device_driven)  # one graph per step where every expert is resident
        self.host = [("host", host)] if host > 0 else []
        self.grouped = p.gpu_grouped is not None
        self.planning = [(kind, d) for kind, d in (("predict", p.predict_overhead_s if "predict" in work else 0.0),
                                                   ("plan", p.plan_overhead_s if "plan" in work else 0.0)) if d > 0]
        # the running layer: its step, token count per routed expert, and the host, GPU and CPU clocks
        self.step, self.count, self.h, self.g, self.c = 0, {}, 0.0, 0.0, 0.0

    def _emit(self, load: Load, start: float, end: float, nbytes: int) -> None:
        self.rows.append(("pcie", load.step, load.key[0], load.key[1], load.kind, 0, nbytes, start, end,
                          load.slot, load.id))

    def _done(self, load: Load) -> None:
        heapq.heappush(self.landed, (load.end, load.id, load))

    def _resident(self, load: Load) -> None:
        if self.inflight.get(load.key) is load:
            del self.inflight[load.key]
            self.cache.mark_ready(load.key)

    def advance(self, t: float) -> None:
        """The cache catches up with the clock: loads that ended by `t` become resident."""
        self.link.advance(t)
        while self.landed and self.landed[0][0] <= t:
            self._resident(heapq.heappop(self.landed)[2])

    def ready_time(self, key: Key, t: float) -> float:
        load = self.inflight.get(key)
        if load is None:
            return t
        self.link.promote(load)
        end = self.link.finish(load)
        self._resident(load)
        return end

    # ---- the protocol's orders, on the clock --------------------------------------------------------
    def cut_stale(self, view: LayerView) -> None:
        """The cache at the clock, then the prefetches in flight for layers that already ran or for this
        layer's unrouted experts cut (on the priority link only: `transfers.IOWorker.drop_stale`)."""
        self.advance(self.h)
        routed, step, layer = set(view.experts), view.step, view.layer
        stale = [load for key, load in self.inflight.items() if load.kind == "prefetch" and load.left > 0
                 and (load.step < step or key[0] < layer or (key[0] == layer and key[1] not in routed))]
        for load in stale:
            if not self.cache.holds(load.key, load.slot):
                continue
            started = self.link.cut(load)
            if started is None:  # promoted
                continue
            del self.inflight[load.key]
            self.cache.cancel(load.key, started=started)

    def planned(self, policy: Policy, view: LayerView) -> None:
        """Charge the profile's prediction and planning time for what the plan did (prescope's gate runs some
        layers without either); the GPU lane starts after it."""
        done, h = policy.planned_work(), self.h
        for kind, d in self.planning:
            if kind in done:
                self.rows.append(("cpu", view.step, view.layer, -1, kind, sum(view.tokens), 0, h, h + d, -1, -1))
                h += d
        self.h = self.g = h

    def planned_ahead(self, policy: Policy, view: LayerView) -> None:
        """Charge the prediction and planning done in `Policy.plan_ahead` (`Policy.planned_ahead_work`) on the
        host's clock only, where it runs: after the layer's loads and kernels were issued, so it overlaps the
        layer's GPU work (the GPU clock does not move) and delays only what the host does next, the prefetches'
        issue and the next layer (which starts when the host, the GPU and the CPU are done)."""
        done, h = policy.planned_ahead_work(), self.h
        for kind, d in self.planning:
            if kind in done:
                self.rows.append(("cpu", view.step, view.layer, -1, kind, sum(view.tokens), 0, h, h + d, -1, -1))
                h += d
        self.h = h

    def start_cpu(self, layer: int, experts: list[int]) -> None:
        """One after another on the CPU lane, from the end of planning, overlapping GPU work."""
        c = max(self.cpu_free, self.h)
        for e in experts:
            d = self.times.cpu(self.count[e])
            self.rows.append(("cpu", self.step, layer, e, "cpu_expert", self.count[e], 0, c, c + d, -1, -1))
            c += d
        self.cpu_free = self.c = c

    def load(self, key: Key, slot: int, speculative: bool) -> bool:
        """Issuing a transfer costs host time; the copy starts once the slot's last occupant is done; the
        expert is resident when it lands (`advance`, `ready_time`)."""
        self.h += self.per_transfer
        load = Load(next(self.ids), key, slot, "prefetch" if speculative else "on_demand", self.step,
                    self.times.nbytes, max(self.h, self.release[slot]))
        self.inflight[key] = load
        self.link.enqueue(load)
        return False

    def compute(self, layer: int, wave: list[tuple[int, int]]) -> None:
        """Each expert when its load has landed and the GPU is free; with a grouped kernel (the profile's
        `gpu_grouped`) the whole wave at once, when the last of its loads has landed."""
        g = self.g
        if self.grouped and wave:
            start = max([g] + [self.ready_time((layer, e), self.h) for e, _ in wave])
            g = start + self.times.wave(tuple(self.count[e] for e, _ in wave))
            for e, slot in wave:
                self.rows.append(("gpu", self.step, layer, e, "gpu_expert", self.count[e], 0, start, g, slot, -1))
                self.release[slot] = g
            self.g = g
            return
        for e, slot in wave:
            start = max(g, self.ready_time((layer, e), self.h))
            g = start + self.times.gpu(self.count[e])
            self.rows.append(("gpu", self.step, layer, e, "gpu_expert", self.count[e], 0, start, g, slot, -1))
            self.release[slot] = g
        self.g = g

    def make_room(self) -> bool:
        """Let the earliest transfer in flight land (the GPU waits for it) so its slot can be given up."""
        if not self.landed and not self.link.finish_any():
            return False
        self._resident(heapq.heappop(self.landed)[2])
        return True

    # ---- one layer ------------------------------------------------------------------------------------
    def layer(self, step: int, layer: int, t: float, num_tokens: int, experts: tuple[int, ...],
              tokens: tuple[int, ...], future, hidden, future_tokens=None) -> float:
        """One MoE layer from time `t` (GPU free, previous layer done); returns its end. `future` and
        `future_tokens`: the later layers' routed experts and their token counts."""
        rows, self.times = self.rows, self.by_layer[layer]  # this layer's expert sizes
        # attention and resident work on the GPU, then the host's own work of the MoE step
        h = t + self.times.of("attention", num_tokens)
        rows.append(("gpu", step, layer, -1, "attention", num_tokens, 0, t, h, -1, -1))
        for kind, d in self.host:
            rows.append(("cpu", step, layer, -1, kind, num_tokens, 0, h, h + d, -1, -1))
            h += d
        self.step, self.count, self.h, self.g, self.c = step, dict(zip(experts, tokens, strict=True)), h, h, h
        view = LayerView(step, layer, self.cache.num_layers, self.num_experts, experts, tokens, hidden, future,
                         future_tokens)
        run_layer(view, self.policy, self.cache, self)
        # the layer ends with its last expert (and the host's last issue)
        return max(self.g, self.c, self.h)


def _lower_bounds(requests, request_tokens, stats, num_slots, layout, profile, times) -> tuple[list, list]:
    """Two bounds per step. GPU-only (every expert computed on the GPU, so resident): max(GPU work of the
    step, bytes of an optimal cache's misses / peak link bandwidth) — `cost.step_lower_bound`. Any placement
    (an absent expert may also run on the CPU, from host memory): max(the step's non-expert GPU work, the
    least max(link, CPU) over fractional splits of the misses of an optimal cache that may bypass) —
    `cost.split_lower_bound`. No policy of this engine can beat the second."""
    forced = belady_misses(requests, num_slots)
    flags = belady_miss_flags(requests, num_slots, bypass=True)
    # Belady minimises the count of misses, not their bytes: where expert sizes differ by layer, every miss is
    # priced as the smallest expert (link and CPU), so the bounds stay bounds
    small = min(times.per_layer(), key=lambda t: t.nbytes)
    gpu_only = [cost.step_lower_bound(float(w), 0.0, int(m) * small.nbytes, profile)
                for w, m in zip(stats["gpu_work"], forced, strict=True)]
    load = small.link(small.nbytes)
    any_placement, start = [], 0
    for group, dense in zip(requests, stats["dense_work"], strict=True):
        missed = [request_tokens[start + i] for i in range(len(group)) if flags[start + i]]
        start += len(group)
        split = cost.split_lower_bound([load] * len(missed), [small.cpu(n) for n in missed])
        any_placement.append(max(float(dense), split))
    return gpu_only, any_placement


def replay(trace: Trace, policy: Policy | str, profile: HardwareProfile | str, *, budget_slots: int | None = None,
           budget_share: float | None = None, batch_size: int = 1, decode_only: bool = True,
           max_steps: int | None = None, async_io: bool = False, chunk_bytes: int = IO_CHUNK_BYTES,
           layout: ModelLayout | None = None, dense_params: int | None = None,
           policy_profile: HardwareProfile | str | None = None) -> SimResult:
    """Replay `trace` through `policy` on `profile` with a GPU expert budget; see the module docstring.

    `policy_profile` is the profile whose costs the policy weighs in its decisions, when that differs from
    the one that times the replay (to reproduce a measured run whose engine decided with another profile).
    The budget is `budget_slots` or `budget_share` of all L·E experts (EngineConfig's default share when
    neither is given). `layout` times another model that routes like the trace (a shape twin: same L and
    E); `dense_params` is the non-expert parameter count per MoE layer (default: `default_dense_params`).
    `max_steps` bounds the number of forward calls replayed.
    """
    with _gc_paused():
        return _replay(trace, policy, profile, budget_slots, budget_share, batch_size, decode_only, max_steps,
                       async_io, chunk_bytes, layout, dense_params, policy_profile)


def _replay(trace, policy, profile, budget_slots, budget_share, batch_size, decode_only, max_steps, async_io,
            chunk_bytes, layout, dense_params, policy_profile=None) -> SimResult:
    policy = make_policy(policy) if isinstance(policy, str) else policy
    profile = load_profile(profile)
    layout = layout or trace.layout
    diffs = [f"{k}: trace {getattr(trace.layout, k)}, layout {getattr(layout, k)}"
             for k in ("num_moe_layers", "num_experts") if getattr(trace.layout, k) != getattr(layout, k)]
    if diffs:
        raise SimulationError(f"layout {layout.model_class} does not route like the trace ({'; '.join(diffs)})")
    if chunk_bytes < 1:
        raise SimulationError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    L, E = layout.num_moe_layers, layout.num_experts
    if budget_slots is None and budget_share is None:
        budget_share = EngineConfig().budget_share
    num_slots = slots_for(layout, share=budget_share, slots=budget_slots)
    times = SimTimes(layout, profile, default_dense_params(layout) if dense_params is None else dense_params)
    cache = ExpertCache(num_slots, L)
    device_driven = num_slots >= L * E  # every expert resident: the engine runs the step as one graph
    costs = (times.costs(device_driven) if policy_profile is None
             else costs_for(layout, load_profile(policy_profile)))
    fill(policy, cache, preload(policy, cache, E, costs), lambda key, slot: True)  # resident before time 0
    sim = _Replay(policy, cache, times, E, async_io, chunk_bytes, device_driven)
    # decoder layers in order: (decoder index, MoE ordinal or -1 for a dense layer)
    decoder = sorted([(i, -1) for i in layout.dense_layers] + [(i, o) for o, i in enumerate(layout.moe_layers)])
    calls = replay_steps(trace, batch_size, decode_only, max_steps)
    if not calls:
        raise SimulationError(f"the trace has no {'decode ' if decode_only else ''}tokens to replay")
    records, requests, request_tokens, t = [], [], [], 0.0
    for step, (batch, trace_step, phase, index) in enumerate(calls):
        routed = _routed(trace.experts[index], E)  # per layer: (experts, tokens)
        hidden = None if trace.hidden is None else np.ascontiguousarray(trace.hidden[index].transpose(1, 0, 2))
        n, before = len(index), _stats(cache)
        gpu_work = dense_work = 0.0
        for _, layer in decoder:
            if layer < 0:
                d = times.of("dense", n)
                sim.rows.append(("gpu", step, -1, -1, "dense", n, 0, t, t + d, -1, -1))
                t, gpu_work, dense_work = t + d, gpu_work + d, dense_work + d
                continue
            experts, counts = routed[layer]
            later = routed[layer + 1:]
            t = sim.layer(step, layer, t, n, experts, counts, tuple(r[0] for r in later),
                          None if hidden is None else _tensor(hidden[layer]), tuple(r[1] for r in later))
            gpu_work += times.of("attention", n) + sim.by_layer[layer].wave(counts)  # all in one wave
            dense_work += times.of("attention", n)
        routed_total, hits = sum(len(r[0]) for r in routed), cache.stats.hits - before["hits"]
        requests.append([layer * E + e for layer, (experts, _) in enumerate(routed) for e in experts])
        request_tokens.extend(c for _, counts in routed for c in counts)
        records.append({"step": step, "batch": batch, "trace_step": trace_step, "phase": phase,
                        "gpu_work": gpu_work, "dense_work": dense_work, "hits": hits,
                        "misses": routed_total - hits,
                        **{k: v - before[k] for k, v in _stats(cache).items() if k not in ("hits", "misses")}})
    sim.link.drain()
    config = {"policy": policy.name, "profile": profile.name, "budget_slots": num_slots,
              "budget_share": num_slots / (L * E), "budget_bytes": num_slots * layout.max_expert_bytes,
              "batch_size": batch_size, "decode_only": decode_only, "max_steps": max_steps,
              "async_io": async_io, "chunk_bytes": chunk_bytes, "model_class": layout.model_class,
              "num_moe_layers": L, "num_experts": E, "top_k": layout.top_k, "expert_bytes": layout.expert_bytes,
              "expert_bytes_per_layer": list(layout.layer_expert_bytes) or None,
              "dense_params": times.dense_params, "trace_source": str(trace.meta.get("source", ""))}
    timeline = make_timeline(sim.rows, source="simulated", profile=profile.name, meta=config)
    timeline = timeline.sort_values("start", kind="stable").reset_index(drop=True)
    stats = pd.DataFrame(records)
    stats["lower_bound_gpu_only"], stats["lower_bound"] = _lower_bounds(requests, request_tokens, stats, num_slots,
                                                                        layout, profile, times)
    summary = step_summary(timeline, stats)
    return SimResult(timeline, summary, _totals(summary, timeline), config)


@contextlib.contextmanager
def _gc_paused():
    """The replay allocates many small objects; a full collection meanwhile walks every live object of
    the process (torch's included) and would cost more than the replay itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _stats(cache: ExpertCache) -> dict[str, int]:
    return {k: getattr(cache.stats, k) for k in STAT_FIELDS}


def _tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(array)  # [N, H]


def _totals(summary: pd.DataFrame, timeline: pd.DataFrame) -> dict:
    seconds = float(summary["latency"].sum())
    decode = summary[summary["phase"] == "decode"]
    per_token = decode if len(decode) else summary
    routed = float(summary["hits"].sum() + summary["misses"].sum())
    precision = prefetch_precision(timeline)["precision"].iloc[0]
    return {
        "steps": int(len(summary)), "tokens": int(summary["tokens"].sum()), "seconds": seconds,
        "tokens_per_s": float(summary["tokens"].sum() / seconds) if seconds > 0 else math.inf,
        "mean_token_latency_s": float(per_token["latency"].mean()),
        "bytes_moved": int(timeline.loc[timeline["lane"] == "pcie", "bytes"].sum()),
        "loads_on_demand": int(summary["loads_on_demand"].sum()),
        "loads_prefetched": int(summary["loads_prefetched"].sum()),
        "hit_rate": float(summary["hits"].sum() / routed) if routed else math.nan,
        "gpu_idle_share": float(summary["gpu_idle"].sum() / seconds) if seconds > 0 else 0.0,
        "prefetch_precision": None if pd.isna(precision) else float(precision),
        "lower_bound_step_s": float(summary["lower_bound"].mean()),
        "lower_bound_share": float(summary["lower_bound"].sum() / seconds) if seconds > 0 else 1.0,
    }


# ---- real computation, modelled times ----------------------------------------------------------------

def simulate_generate(model, tokenizer, prompts: Sequence, policy: Policy | str, profile: HardwareProfile | str, *,
                      max_new_tokens: int, batch_size: int = 1, keep_hidden: bool = True, progress: bool = False,
                      **options) -> SimResult:
    """Generate on the CPU with the real model, recording its routing (`recording.record_trace`), then
    replay that routing: outputs and routing are real, times are modelled. The result carries the trace,
    whose `meta["generated"]` holds the new tokens. `options` go to `replay`."""
    from prescope.routing.recording import record_trace

    trace = record_trace(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         keep_hidden=keep_hidden, progress=progress)
    options.setdefault("dense_params", model_dense_params(model))
    result = replay(trace, policy, profile, batch_size=batch_size, **options)
    return SimResult(result.timeline, result.summary, result.totals, result.config, trace)
