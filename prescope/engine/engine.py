"""The offloaded engine: experts in host memory, a fixed pool of GPU slots, policies' orders executed for real.

`Engine(model, config)` installs itself into any model the adapter supports, through transformers' own
experts-backend registry, so `model.generate()` runs unchanged (any batch size, KV cache, prefill and
decode). Memory is decided once, at install: every expert tensor stays in (pinned) host memory, the
non-expert weights, shared experts and dense layers move to the device, and S slots per expert tensor are
allocated there. Inside the decode loop nothing is allocated beyond activations and nothing is pinned.

On a CUDA device copies run on their own stream and kernels wait only for the copy of the expert they
use; on the CPU the same orders run through the CPU twin of the streams (real copies between host
tensors), which is what CI checks for exact equivalence with the stock model.

Letters: L MoE layers, E experts, K top-k, N tokens, H hidden, S slots.
"""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from prescope.config import EngineConfig
from prescope.engine.streams import make_streams
from prescope.engine.transfers import IOWorker, Transfer
from prescope.hardware.profiles import load_profile
from prescope.layout import ModelLayout
from prescope.models import adapter
from prescope.policies import make_policy
from prescope.policies.base import LayerView, Policy, costs_for
from prescope.policies.cache import ExpertCache, Key
from prescope.policies.protocol import Executor, fill, preload, run_layer, slots_for
from prescope.timeline import make_timeline, step_summary

TIMELINE_COLUMNS = ("lane", "step", "layer", "expert", "kind", "tokens", "bytes", "start", "end")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'")
    return torch.device(name)


def slots_for_budget(layout: ModelLayout, config: EngineConfig) -> int:
    """Slots the config's budget buys (`protocol.slots_for`: budget_bytes if set, else budget_share)."""
    if config.budget_bytes is not None:
        return slots_for(layout, nbytes=config.budget_bytes)
    return slots_for(layout, share=config.budget_share)


def _move_except(module: nn.Module, skip: set[int], device: torch.device) -> None:
    """`module.to(device)` for everything but the modules in `skip` (the experts stay in host memory)."""
    if id(module) in skip:
        return
    for child in module.children():
        _move_except(child, skip, device)
    for p in module._parameters.values():
        if p is not None:
            p.data = p.data.to(device)
    for name, b in module._buffers.items():
        if b is not None:
            module._buffers[name] = b.to(device)


class Engine(Executor):
    """Offloads `model`'s experts and executes a policy's orders inside every MoE layer."""

    def __init__(self, model: nn.Module, config: EngineConfig | None = None, policy: Policy | None = None):
        config = config or EngineConfig()
        self.model, self.config = model, config
        self.layout = adapter.describe(model)
        self.layers = adapter.moe_layers(model)
        self.device = resolve_device(config.device)
        self.policy = policy or make_policy(config.policy)
        self.num_slots = slots_for_budget(self.layout, config)
        self.costs = costs_for(self.layout, load_profile(config.profile))
        self.timing = config.timing
        self.streams = make_streams(self.device, timed=config.timing == "full")
        use_io = config.async_io if config.async_io is not None else self.policy.uses_async_io(self.costs)
        self.io = IOWorker(self.streams, config.io_chunk_bytes, config.io_depth) if use_io else None
        self.replay = None
        self.cache = ExpertCache(self.num_slots, self.layout.num_moe_layers)
        workers = config.cpu_workers or max(1, (os.cpu_count() or 2) // 2)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prescope-cpu")
        self.step, self.phase, self.rows, self.steps = -1, "prefill", [], []
        self._last_exit = None
        self.host_seconds = [0.0] * self.layout.num_moe_layers  # wall time inside moe_step
        self.sync_seconds = [0.0] * self.layout.num_moe_layers  # of which waiting for the device to catch up
        self.plan_seconds = [0.0] * self.layout.num_moe_layers  # of which in the policy: prediction, planning
        self.victim_seconds = [0.0] * self.layout.num_moe_layers  # and in the policy's victim choices
        self.stopped = {"queued": 0, "part_way": 0}  # AsyncIO prefetches no layer used, stopped (_drop_stale)
        self._t0, self._layer = None, None  # the first step's events; the MoE layer running (_Running)
        self._install()

    # ---- install: memory decided once ----------------------------------------------------------------
    def _install(self) -> None:
        experts = [lay.experts for lay in self.layers]
        self._host = [self._to_host(m) for m in experts]  # per layer: name -> [E, ...] host tensor
        _move_except(self.model, {id(m) for m in experts}, self.device)
        shapes = adapter.expert_param_names(experts[0])
        dtype = next(iter(self._host[0].values())).dtype
        self._slots = {n: torch.empty((self.num_slots, *s), dtype=dtype, device=self.device) for n, s in shapes.items()}
        self._ready = [None] * self.num_slots  # copy-done event (or AsyncIO transfer) per slot
        self._released = [None] * self.num_slots  # event after the last kernel that read the slot
        for lay in self.layers:
            lay.experts._prescope = (self, lay.ordinal)
        adapter.register_backend(_dispatch)
        self._previous_backend = adapter.set_backend(self.model, adapter.BACKEND_NAME)
        self._hooks = [self.model.register_forward_pre_hook(self._step_start, with_kwargs=True),
                       self.model.register_forward_hook(self._step_end)]
        self.reset()

    def _to_host(self, experts: nn.Module) -> dict[str, torch.Tensor]:
        host = {}
        for name in adapter.expert_param_names(experts):
            p = getattr(experts, name)
            data = p.data.to("cpu")
            if self.device.type == "cuda" and self.config.pin_memory and not data.is_pinned():
                try:
                    data = data.pin_memory()
                except RuntimeError as exc:
                    warnings.warn(f"pinned host memory refused ({exc}); experts stay pageable and copies "
                                  "will be slower", RuntimeWarning, stacklevel=3)
            p.data = data
            host[name] = data
        return host

    def reset(self) -> None:
        """Empty the slot pool, then load what the policy wants resident (all experts if the budget allows)."""
        self._drain()
        self.cache = ExpertCache(self.num_slots, self.layout.num_moe_layers)
        keys = preload(self.policy, self.cache, self.layout.num_experts, self.costs)
        fill(self.policy, self.cache, keys, lambda key, slot: self.load(key, slot, speculative=False))
        self._drain()
        self.streams.synchronize()

    def close(self) -> None:
        """Detach from the model (hooks, backend) and stop the CPU workers; experts stay in host memory."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        adapter.set_backend(self.model, self._previous_backend if self._previous_backend != adapter.BACKEND_NAME
                            else "eager")
        self.pool.shutdown(wait=True)
        if self.io is not None:
            self.io.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_replay(self, replay) -> None:
        """Route from a `replay.RoutingReplay` instead of the model's routers (None: the model's own)."""
        if replay is not None:
            replay.check(self.layout)
            replay = replay.to(self.device)
        self.replay = replay

    # ---- the per-layer MoE step ----------------------------------------------------------------------
    def moe_step(self, layer: int, experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        began, entry = time.perf_counter(), self._mark()
        num_tokens, top_k = top_k_index.shape
        seen, future = hidden, None
        if self.replay is not None:
            top_k_index, weights, recorded = self.replay.at(self.step, layer, num_tokens)
            top_k_weights = weights.to(top_k_weights.dtype)
            seen = recorded if recorded is not None else hidden
            future = self.replay.future(self.step, layer, num_tokens)
        # route: tokens per expert and each (token, k) position grouped by expert; one host sync
        flat = top_k_index.reshape(-1)  # [N*K]
        order = torch.argsort(flat, stable=True)  # [N*K]
        synced = time.perf_counter()
        counts = torch.bincount(flat, minlength=self.layout.num_experts + 1).tolist()  # waits for the device
        self.sync_seconds[layer] += time.perf_counter() - synced
        groups = self._groups(order, counts)  # expert -> positions in [N*K]
        ranked = sorted(groups, key=lambda e: (-counts[e], e))
        view = LayerView(self.step, layer, self.layout.num_moe_layers, self.layout.num_experts,
                         tuple(ranked), tuple(counts[e] for e in ranked), hidden=seen, future=future)
        # the protocol: cut, plan, CPU experts, GPU experts in waves, prefetch (policies.protocol)
        out = hidden.new_zeros((num_tokens * top_k, hidden.shape[1]))  # [N*K, H]
        self._layer = _Running(experts, hidden, groups, top_k, out)
        run = run_layer(view, self.policy, self.cache, self)
        self.plan_seconds[layer] += run.plan_s
        self.victim_seconds[layer] += run.victim_s
        # join CPU results; weight each token's K outputs and sum them in the routing weights' precision
        running, self._layer = self._layer, None
        if running.cpu_jobs:
            out[running.cpu_positions] = torch.cat([job.result() for job in running.cpu_jobs]).to(out.device, out.dtype)
        self._log_host(layer, began, entry)
        weighted = out.view(num_tokens, top_k, -1) * top_k_weights.unsqueeze(-1)  # [N, K, H]
        return weighted.sum(dim=1).to(hidden.dtype)  # [N, H]

    # ---- the protocol's orders, carried out ----------------------------------------------------------
    def cut_stale(self, view: LayerView) -> None:
        """Stop the prefetches no layer will use (for layers that already ran, or for this layer's experts it
        does not route), queued or part-way: their slots are free again."""
        if self.io is None:
            return
        now = max(0, self.step) * self.layout.num_moe_layers + view.layer
        for t in self.io.drop_stale(now, set(view.experts)):
            if self.cache.holds(t.key, t.slot):
                started = t.busy or t.next > 0  # busy first: the worker sets next, then busy
                self.cache.cancel(t.key, started=started)
                self._ready[t.slot] = None
                self.stopped["part_way" if started else "queued"] += 1

    def start_cpu(self, layer: int, chosen: list[int]) -> None:
        """Start the CPU experts: their tokens cross to the host in one copy, each expert is one task."""
        run = self._layer
        positions = torch.cat([run.groups[e] for e in chosen])  # [m] positions in [N*K]
        x_all = run.hidden[positions // run.top_k].to("cpu")  # [m, H], the one device-to-host copy
        dtype = next(iter(self._host[layer].values())).dtype
        start = 0
        for e in chosen:
            n = len(run.groups[e])
            x, params = x_all[start:start + n].to(dtype), {name: host[e] for name, host in self._host[layer].items()}
            run.cpu_jobs.append(self.pool.submit(self._cpu_expert, layer, run.experts, e, x, params))
            start += n
        run.cpu_positions = positions

    def load(self, key: Key, slot: int, speculative: bool) -> None:
        """Copy expert `key` into `slot` (assigned by the protocol), after the slot's last kernel."""
        layer, e = key
        pairs = [(self._slots[n][slot], host[e]) for n, host in self._host[layer].items()]
        if self.io is not None:
            old = self._ready[slot]
            if isinstance(old, Transfer) and self.io.cancel(old):  # evicted before any of it moved
                self.cache.uncount_load(old.speculative)
            need = max(0, self.step) * self.layout.num_moe_layers + layer
            start = done = self.io.submit(key, slot, pairs, self._released[slot], speculative, need)
        else:
            start, done = self.streams.copy_many(pairs, after=self._released[slot])
        self._ready[slot] = done
        self.cache.mark_ready(key)  # ordered before any use: kernels wait on `done`
        if self.step >= 0:
            self._row("pcie", layer, e, "prefetch" if speculative else "on_demand", 0, self.layout.expert_bytes,
                      start, done)

    def compute(self, layer: int, wave: list[tuple[int, int]]) -> None:
        """Each expert of the wave from its slot, on the compute stream once its copy has landed."""
        run = self._layer
        for e, slot in wave:
            positions = run.groups[e]
            self.streams.wait(self._ready_event(slot))  # AsyncIO: promotes a queued transfer
            start = self._mark()
            x = run.hidden[positions // run.top_k]  # [n, H]
            run.out[positions] = adapter.expert_forward(run.experts, x, {n: t[slot] for n, t in self._slots.items()})
            self._released[slot] = self.streams.record()
            self._row("gpu", layer, e, "gpu_expert", len(positions), 0, start, self._released[slot])

    # ---- named parts of the step ---------------------------------------------------------------------
    def _groups(self, order: torch.Tensor, counts: list[int]) -> dict[int, torch.Tensor]:
        groups, start = {}, 0
        for e, n in enumerate(counts[: self.layout.num_experts]):
            if n:
                groups[e] = order[start:start + n]
            start += n
        return groups

    def _ready_event(self, slot: int):
        """The event a kernel reading `slot` waits for; an AsyncIO transfer is promoted and issued first."""
        ready = self._ready[slot]
        return self.io.ready(ready) if isinstance(ready, Transfer) else ready

    def _drain(self) -> None:
        if self.io is not None:
            self.io.drain()

    def _cpu_expert(self, layer, experts, e, x, params) -> torch.Tensor:
        start = time.perf_counter()
        y = adapter.expert_forward(experts, x, params)  # [n, H]
        self._cpu_row(layer, e, len(x), start, time.perf_counter())
        return y

    # ---- steps and timing ----------------------------------------------------------------------------
    def _step_start(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self.step += 1
        self.phase = "prefill" if ids is not None and ids.shape[1] > 1 else "decode"
        if self.timing != "off":
            if self._t0 is None:
                self._t0 = (self.streams.record(), time.perf_counter())
            tokens = int(ids.shape[0] * ids.shape[1]) if ids is not None else 0
            stats = self.cache.stats
            self.steps.append({"step": self.step, "phase": self.phase, "tokens": tokens,
                               "start": self.streams.record(), "end": None,
                               "counts": (stats.hits, stats.misses, stats.loads)})

    def _step_end(self, module, args, output) -> None:
        if self.timing != "off" and self.steps:
            self.steps[-1]["end"] = self.streams.record()
            stats, before = self.cache.stats, self.steps[-1]["counts"]
            self.steps[-1]["counts"] = (stats.hits - before[0], stats.misses - before[1], stats.loads - before[2])
            if self._last_exit is not None:
                self._row("gpu", -1, -1, "dense", 0, 0, self._last_exit, self.steps[-1]["end"])
        self._last_exit = None

    def _mark(self):
        return self.streams.record() if self.timing == "full" else None

    def _row(self, lane, layer, expert, kind, tokens, nbytes, start, end) -> None:
        if self.timing == "full" and start is not None:
            self.rows.append([lane, self.step, layer, expert, kind, tokens, nbytes, start, end])

    def _cpu_row(self, layer, expert, tokens, start, end) -> None:
        if self.timing == "full":  # host clock, converted to the device clock in timeline()
            self.rows.append(["cpu", self.step, layer, expert, "cpu_expert", tokens, 0, ("host", start), ("host", end)])

    def _log_host(self, layer: int, began: float, entry) -> None:
        """Host time in prescope's own code; the GPU span since the last MoE layer is attention and dense work."""
        self.host_seconds[layer] += time.perf_counter() - began
        if self.timing == "full" and entry is not None:
            kind = "attention" if self._last_exit is not None else "dense"
            step_start = self.steps[-1]["start"] if self.steps else entry
            self._row("gpu", layer, -1, kind, 0, 0, self._last_exit or step_start, entry)
            self._last_exit = self._mark()

    def timeline(self) -> pd.DataFrame:
        """Every recorded operation, seconds since the first step began (DESIGN.md §2 schema)."""
        self._drain()
        self.streams.synchronize()
        if self._t0 is None:
            return pd.DataFrame(columns=TIMELINE_COLUMNS)
        t0, host0 = self._t0

        def at(event) -> float:
            if isinstance(event, tuple):
                return event[1] - host0
            return self.streams.seconds(t0, event)

        def span(start, end):
            if isinstance(start, Transfer):  # AsyncIO: None where the transfer was cancelled before it ended
                start, end = start.start, start.done
            return None if start is None or end is None else [at(start), at(end)]

        records = [dict(zip(TIMELINE_COLUMNS, r[:7] + times, strict=True)) for r in self.rows
                   if (times := span(r[7], r[8])) is not None]
        return make_timeline(pd.DataFrame(records, columns=TIMELINE_COLUMNS), source="measured",
                             profile=_device_name(self.device),
                             meta={"policy": self.policy.name, "config": self.config.to_dict()})

    def step_table(self) -> pd.DataFrame:
        """One row per forward call: phase, tokens, start, end, latency, and the cache's hits, misses and loads."""
        self._drain()
        self.streams.synchronize()
        t0 = self._t0[0] if self._t0 else None
        rows = [{"step": s["step"], "phase": s["phase"], "tokens": s["tokens"],
                 "start": self.streams.seconds(t0, s["start"]), "end": self.streams.seconds(t0, s["end"]),
                 "hits": s["counts"][0], "misses": s["counts"][1], "loads": s["counts"][2]}
                for s in self.steps if s["end"] is not None]
        frame = pd.DataFrame(rows, columns=["step", "phase", "tokens", "start", "end", "hits", "misses", "loads"])
        frame["latency"] = frame["end"] - frame["start"]
        return frame

    def summary(self) -> pd.DataFrame:
        """Per step: latency, bytes moved, loads, hits, misses, GPU busy and idle time (needs timing="full")."""
        steps = self.step_table()
        table = step_summary(self.timeline(), steps[["step", "hits", "misses"]])
        return table.merge(steps[["step", "phase"]], on="step", how="left")

    def set_timing(self, mode: str) -> None:
        """Switch between 'full', 'steps' and 'off' between runs (full timing costs host time)."""
        self.timing = EngineConfig(timing=mode).timing
        self.streams.timed = mode == "full"

    def clear_records(self) -> None:
        self.rows, self.steps, self._t0, self.step = [], [], None, -1
        self.host_seconds = [0.0] * self.layout.num_moe_layers
        self.sync_seconds = [0.0] * self.layout.num_moe_layers
        self.plan_seconds = [0.0] * self.layout.num_moe_layers
        self.victim_seconds = [0.0] * self.layout.num_moe_layers
        self.stopped = {"queued": 0, "part_way": 0}


@dataclass
class _Running:
    """The MoE layer the engine is running: its experts module, router input [N, H], positions in [N*K] of
    each routed expert, K, the output rows [N*K, H], and the CPU experts in flight."""

    experts: nn.Module
    hidden: torch.Tensor
    groups: dict[int, torch.Tensor]
    top_k: int
    out: torch.Tensor
    cpu_positions: torch.Tensor | None = None
    cpu_jobs: list = field(default_factory=list)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _dispatch(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
              top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts backend transformers calls: hand the layer to the engine installed in it."""
    owner = getattr(experts, "_prescope", None)
    if owner is None:
        raise RuntimeError(f"{type(experts).__name__} uses the prescope backend but no engine is installed in it")
    engine, layer = owner
    return engine.moe_step(layer, experts, hidden_states, top_k_index, top_k_weights)
