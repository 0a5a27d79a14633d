"""The offloaded engine: experts in host memory, a fixed pool of GPU slots, policies' orders executed for real.

`Engine(model, config)` installs itself into any model the adapter supports, through the adapter's one
dispatch (transformers' experts-backend registry, or the experts' call inside their block), so
`model.generate()` runs unchanged (any batch size, KV cache, prefill and decode); `engine.generate()`
decodes greedily at the device's pace (a static KV cache and the decode step replayed from CUDA graphs:
`decode.py`, for models whose experts all go through the backend registry). Memory is decided once, at install: every expert tensor stays in
(pinned) host memory, the non-expert weights, shared experts and dense layers move to the device, and S
slots per expert tensor are allocated there. Inside the decode loop nothing is allocated beyond
activations and nothing is pinned.

Each MoE layer runs the layer protocol (`policies.protocol.run_layer`) with this engine as its executor:
one host synchronisation reads the layer's tokens per expert; the policy plans; absent experts are copied
into slots on their own stream; the experts of a wave run as ONE grouped kernel over the slot pool
(`adapter.grouped_rows`, through an expert-to-slot table), waiting only for the copies it reads; CPU
experts run in a worker pool meanwhile. On the CPU the same orders run through the CPU twin of the
streams (real copies between host tensors), which is what CI checks for equivalence with the stock model.

Letters: L MoE layers, E experts, K top-k, N tokens, H hidden, S slots.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from prescope.config import EngineConfig
from prescope.engine.records import Records
from prescope.engine.streams import make_streams
from prescope.engine.transfers import IOWorker, Transfer
from prescope.hardware.profiles import load_profile
from prescope.layout import ModelLayout
from prescope.models import adapter
from prescope.models.compiled import compile_layers
from prescope.policies import make_policy
from prescope.policies.base import LayerView, Policy, costs_for
from prescope.policies.cache import ExpertCache, Key
from prescope.policies.protocol import Executor, fill, preload, run_layer, slots_for
from prescope.routing.replay import replayed_weights
from prescope.timeline import host_device, measured_profile


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


@dataclass
class _Running:
    """The MoE layer the engine is running: its experts module, router input [N, H], routing [N, K] and
    tokens per expert; the (token, k) rows its GPU waves computed [N*K, H]; the CPU experts in flight.
    In a piecewise-captured step (`graphs`), the first wave replays the layer's expert segment, which
    writes `record.rows`."""

    experts: nn.Module
    hidden: torch.Tensor
    index: torch.Tensor
    counts: list[int]
    rows: torch.Tensor | None = None
    waves: int = 0
    cpu_positions: torch.Tensor | None = None
    cpu_jobs: list = field(default_factory=list)
    graphs: object | None = None  # decode.StepGraphs
    record: object | None = None  # decode.GraphLayer


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
        self.streams = make_streams(self.device, timed=config.timing == "full")
        use_io = config.async_io if config.async_io is not None else self.policy.uses_async_io(self.costs)
        self.io = IOWorker(self.streams, config.io_chunk_bytes, config.io_depth) if use_io else None
        self.replay = None
        self.capture = None  # decode.StepGraphs while it captures the decode step
        self.cache = ExpertCache(self.num_slots, self.layout.num_moe_layers)
        self.cpu_workers = config.cpu_workers or max(1, (os.cpu_count() or 2) // 2)
        self.pool = ThreadPoolExecutor(max_workers=self.cpu_workers, thread_name_prefix="prescope-cpu")
        self.records = Records(self.streams, self.layout.num_moe_layers, config.timing, lambda: self.cache.stats,
                               {"device": _device_name(self.device), "policy": self.policy.name,
                                "config": config.to_dict()})
        self._layer: _Running | None = None
        self._stale = False  # a layer failed part-way: reset before the next step
        self._step_clock: tuple[float, float] | None = None  # host clock at the last step's begin and end
        self._install()

    # ---- install: memory decided once ----------------------------------------------------------------
    def _install(self) -> None:
        experts = [lay.experts for lay in self.layers]
        self._host = [self._to_host(m) for m in experts]  # per layer: name -> [E, ...] host tensor
        _move_except(self.model, {id(m) for m in experts}, self.device)
        shapes = adapter.expert_param_names(experts[0])
        dtype = next(iter(self._host[0].values())).dtype
        self.slot_tensors = {n: torch.empty((self.num_slots, *s), dtype=dtype, device=self.device)
                             for n, s in shapes.items()}  # name -> [S, ...], the pool
        self._ready = [None] * self.num_slots  # copy-done event (or AsyncIO transfer) not yet waited for
        self._released = [None] * self.num_slots  # event after the last kernel that read the slot
        self._pinned_luts = self.device.type == "cuda"  # expert-to-slot tables cross to the device asynchronously
        for lay in self.layers:
            lay.experts._prescope = (self, lay.ordinal)
        # compiled layers break their graph at the dispatch: the layer protocol stays Python, run as it is
        self._dispatch = adapter.install_dispatch(self.model, _uncompiled_dispatch if self.config.compile_segments
                                                  else _dispatch)
        self.compiled = compile_layers(self.model, self.device) if self.config.compile_segments else None
        self._hooks = [self.model.register_forward_pre_hook(self._step_start, with_kwargs=True),
                       self.model.register_forward_hook(self._step_end)]
        self.reset()

    def _to_host(self, experts: nn.Module) -> dict[str, torch.Tensor]:
        """name -> [E, ...] host tensor; the model's expert parameters now point at it."""
        return adapter.relocate_experts(experts, self._host_copy)

    def _host_copy(self, data: torch.Tensor) -> torch.Tensor:
        data = data.to("cpu")
        if self.device.type == "cuda" and self.config.pin_memory and not data.is_pinned():
            try:
                data = data.pin_memory()
            except RuntimeError as exc:
                warnings.warn(f"pinned host memory refused ({exc}); experts stay pageable and copies "
                              "will be slower", RuntimeWarning, stacklevel=4)
        return data

    def reset(self) -> None:
        """Empty the slot pool, then load what the policy wants resident (all experts if the budget allows)."""
        self._stale, self._step_clock = False, None
        if self.io is not None and self.io.error is not None:  # the I/O worker died with a failed copy
            self.io.close()
            self.io = IOWorker(self.streams, self.config.io_chunk_bytes, self.config.io_depth)
        self.drain()
        self.cache = ExpertCache(self.num_slots, self.layout.num_moe_layers)
        self._ready = [None] * self.num_slots
        keys = preload(self.policy, self.cache, self.layout.num_experts, self.costs)
        fill(self.policy, self.cache, keys, lambda key, slot: self.load(key, slot, speculative=False))
        self.drain()
        self.streams.synchronize()

    def close(self) -> None:
        """Detach from the model (hooks, backend) and stop the CPU workers; experts stay in host memory."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._dispatch.remove()
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

    def device_driven(self) -> bool:
        """Every expert is resident: the expert-to-slot table never changes, no layer needs the host."""
        return self.num_slots >= self.layout.num_moe_layers * self.layout.num_experts

    def drain(self) -> None:
        """Wait until AsyncIO has issued every transfer it was given."""
        if self.io is not None:
            self.io.drain()

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 graphs: bool = True, keep_logits: bool = False):
        """Greedy decoding with a static KV cache, the decode step from CUDA graphs (`decode.generate`)."""
        from prescope.engine.decode import generate

        graphs = graphs and all(lay.seam == "backend" for lay in self.layers)  # a block's own call is not captured
        with switch_interval(self.config.switch_interval_s):
            return generate(self, input_ids, attention_mask, max_new_tokens, graphs=graphs, keep_logits=keep_logits)

    @property
    def step(self) -> int:
        return self.records.step

    # ---- the per-layer MoE step ----------------------------------------------------------------------
    def moe_step(self, layer: int, experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.capture is not None:  # a decode step being captured as CUDA graphs records the layer
            return self.capture.moe(layer, experts, hidden, top_k_index, top_k_weights)
        began, entry = time.perf_counter(), self.records.mark()
        num_tokens = top_k_index.shape[0]
        seen, future = hidden, None
        if self.replay is not None:
            own_index = top_k_index
            top_k_index, weights, recorded = self.replay.at(self.step, layer, num_tokens)
            top_k_weights = replayed_weights(own_index, top_k_weights, top_k_index, weights)
            seen = recorded if recorded is not None else hidden
            future = self.replay.future(self.step, layer, num_tokens) if self.policy.needs_future else None
        # route: tokens per expert, the one host synchronisation of the layer
        synced = time.perf_counter()
        counts = torch.bincount(top_k_index.reshape(-1), minlength=self.layout.num_experts + 1).tolist()
        self.records.synced(layer, time.perf_counter() - synced)
        # Llama 4 scales each (token, k) pair's input by its weight and sums the outputs: each pair is then a row
        # of its own, weighted 1, and a token's K rows are summed after the combine
        input_weighted = self.layers[layer].input_weighted
        inputs, index = (adapter.scaled_inputs(hidden, top_k_weights), top_k_index.reshape(-1, 1)) \
            if input_weighted else (hidden, top_k_index)  # [N*K, H], [N*K, 1] or [N, H], [N, K]
        running = _Running(experts, inputs, index, counts)
        self._run(layer, self._view(layer, counts, seen, future), running)
        if input_weighted:
            out = self._combine(running, torch.ones_like(index, dtype=top_k_weights.dtype))  # [N*K, H]
            out = out.view(*top_k_index.shape, -1).sum(dim=1)  # [N, H]
        else:
            out = self._combine(running, top_k_weights)  # [N, H]
        self.records.layer_done(layer, began, entry)
        return out

    def graph_layer(self, layer: int, record, graphs) -> None:
        """The host's part of MoE layer `layer` in a piecewise-captured decode step (`decode.StepGraphs`): its
        tokens per expert, the protocol (whose first wave replays the layer's expert segment), and the CPU
        experts' rows for the segment that combines them."""
        began, entry = time.perf_counter(), self.records.mark()
        synced = time.perf_counter()
        counts = graphs.counts(layer)
        self.records.synced(layer, time.perf_counter() - synced)
        seen, future = record.hidden, None
        if self.replay is not None:
            num_tokens = record.index.shape[0]
            recorded = self.replay.hidden_at(self.step, layer, num_tokens)
            seen = recorded if recorded is not None else record.hidden
            future = self.replay.future(self.step, layer, num_tokens) if self.policy.needs_future else None
        running = _Running(self.layers[layer].experts, record.hidden, record.index, counts, graphs=graphs,
                           record=record)
        self._run(layer, self._view(layer, counts, seen, future), running)
        if running.waves == 0:  # every routed expert ran on the CPU: nothing replayed the expert segment
            record.rows.zero_()
        if running.cpu_jobs or record.cpu_dirty:
            record.cpu_rows.zero_()
            if running.cpu_jobs:
                record.cpu_rows[running.cpu_positions] = self._cpu_results(running, record.cpu_rows)
            record.cpu_dirty = bool(running.cpu_jobs)
        self.records.layer_done(layer, began, entry)

    def _view(self, layer: int, counts: list[int], seen, future) -> LayerView:
        E = self.layout.num_experts
        ranked = sorted((e for e in range(E) if counts[e]), key=lambda e: (-counts[e], e))
        return LayerView(self.step, layer, self.layout.num_moe_layers, E, tuple(ranked),
                         tuple(counts[e] for e in ranked), hidden=seen, future=future)

    def _run(self, layer: int, view: LayerView, running: _Running) -> None:
        """The protocol: cut, plan, CPU experts, GPU experts in waves, prefetch (policies.protocol). A layer
        that fails or is interrupted part-way (Ctrl-C in a notebook) leaves the engine to be reset before its
        next step: copies may have been queued that the slot table cannot vouch for."""
        self._layer = running
        try:
            run = run_layer(view, self.policy, self.cache, self)
        except BaseException:
            self._stale = True
            raise
        finally:
            self._layer = None
        self.records.planned(layer, run)
        self.policy.host_measured(run.host_s)

    def _combine(self, run: _Running, weights: torch.Tensor) -> torch.Tensor:
        """Join the CPU experts into the (token, k) rows, weight each token's K rows and sum them in the
        routing weights' precision, as transformers' grouped backend does."""
        rows = run.rows
        if rows is None:  # every routed expert ran on the CPU
            rows = run.hidden.new_zeros((run.index.numel(), run.hidden.shape[1]))  # [N*K, H]
        if run.cpu_jobs:
            rows[run.cpu_positions] = self._cpu_results(run, rows)
        num_tokens, top_k = run.index.shape
        weighted = rows.view(num_tokens, top_k, -1) * weights.unsqueeze(-1)  # [N, K, H]
        return weighted.sum(dim=1).to(run.hidden.dtype)  # [N, H]

    def _cpu_results(self, run: _Running, like: torch.Tensor) -> torch.Tensor:
        """The CPU experts' rows [m, H] on `like`'s device and dtype. For a GPU they cross from pinned memory,
        queued on the compute stream: a copy from pageable memory would first wait for everything queued there
        (this layer's GPU experts included), and the host would lose its lead on the device at every layer with
        CPU experts."""
        waited = time.perf_counter()
        rows = [job.result() for job in run.cpu_jobs]
        self.records.cpu_waited(time.perf_counter() - waited)
        rows = torch.cat(rows)  # [m, H]
        if like.device.type != "cuda":
            return rows.to(like.device, like.dtype)
        staged = torch.empty(rows.shape, dtype=like.dtype, pin_memory=True)  # reused once its copy has run
        staged.copy_(rows)
        return staged.to(like.device, non_blocking=True)

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
                self.records.stopped["part_way" if started else "queued"] += 1

    def start_cpu(self, layer: int, chosen: list[int]) -> None:
        """Start the CPU experts: their tokens cross to the host in one copy, each expert is one task. The positions
        of every chosen expert's (token, k) pairs come from one `nonzero` (on a GPU, one wait for the device, not
        one per expert), grouped by expert in `chosen`'s order; each group's size is the expert's token count."""
        run, flat = self._layer, self._layer.index.reshape(-1)
        wanted = torch.tensor(chosen, dtype=flat.dtype, device=flat.device)  # [c]
        positions = torch.nonzero(flat.unsqueeze(0) == wanted.unsqueeze(1))[:, 1]  # [m] in [N*K], expert-major
        sizes = [run.counts[e] for e in chosen]
        if positions.shape[0] != sum(sizes):
            raise RuntimeError(f"layer {layer}: the routing holds {positions.shape[0]} (token, k) pairs of CPU experts "
                               f"{chosen}, its token counts say {sum(sizes)}")
        x_all = run.hidden[positions // run.index.shape[1]].to("cpu")  # [m, H], the one device-to-host copy
        dtype = next(iter(self._host[layer].values())).dtype
        start = 0
        for e, n in zip(chosen, sizes, strict=True):
            x, params = x_all[start:start + n].to(dtype), {name: host[e] for name, host in self._host[layer].items()}
            run.cpu_jobs.append(self.pool.submit(self._cpu_expert, layer, run.experts, e, x, params))
            start += n
        run.cpu_positions = positions
        self.records.cpu_started(len(chosen))

    def load(self, key: Key, slot: int, speculative: bool) -> bool:
        """Copy expert `key` into `slot`, after the slot's last kernel; resident at once, since every kernel
        reading the slot waits for the copy's event."""
        layer, e = key
        pairs = [(self.slot_tensors[n][slot], host[e]) for n, host in self._host[layer].items()]
        if self.io is not None:
            old = self._ready[slot]
            if isinstance(old, Transfer) and self.io.cancel(old):  # evicted before any of it moved
                self.cache.uncount_load(old.speculative)
            need = max(0, self.step) * self.layout.num_moe_layers + layer
            start = done = self.io.submit(key, slot, pairs, self._released[slot], speculative, need)
        else:
            start, done = self.streams.copy_many(pairs, after=self._released[slot])
        self._ready[slot] = done
        if self.step >= 0:
            self.records.row("pcie", layer, e, "prefetch" if speculative else "on_demand", 0,
                             self.layout.expert_bytes, start, done)
        return True

    def compute(self, layer: int, wave: list[tuple[int, int]]) -> None:
        """The wave's experts as one grouped kernel over the slot pool (`adapter.grouped_rows`), on the compute
        stream once their copies have landed; pairs routed to other experts stay zero."""
        run = self._layer
        for _, slot in wave:
            if self._ready[slot] is not None:  # a copy the compute stream has not waited for yet
                self.streams.wait(self._ready_event(slot))  # AsyncIO: promotes a queued transfer
                self._ready[slot] = None
        start = self.records.mark()
        if run.graphs is not None and run.waves == 0:
            run.graphs.expert_segment(layer, wave)  # writes run.record.rows
        else:
            lut = torch.full((self.layout.num_experts + 1,), self.num_slots, dtype=torch.int64,
                             pin_memory=self._pinned_luts)  # expert -> slot; the sentinel S elsewhere
            for e, slot in wave:
                lut[e] = slot
            slot_index = lut.to(self.device, non_blocking=True)[run.index]  # [N, K]
            rows = adapter.grouped_rows(run.experts, run.hidden, slot_index, self.slot_tensors)  # [N*K, H]
            if run.graphs is not None:
                run.record.rows.add_(rows)
            else:
                run.rows = rows if run.rows is None else run.rows + rows
        run.waves += 1
        released = self.streams.record()
        for _, slot in wave:
            self._released[slot] = released
        for e, _ in wave:  # one row per expert, each with the grouped kernel's span
            self.records.row("gpu", layer, e, "gpu_expert", run.counts[e], 0, start, released)

    def _ready_event(self, slot: int):
        """The event a kernel reading `slot` waits for; an AsyncIO transfer is promoted and issued first."""
        ready = self._ready[slot]
        return self.io.ready(ready) if isinstance(ready, Transfer) else ready

    def _cpu_expert(self, layer, experts, e, x, params) -> torch.Tensor:
        start = time.perf_counter()
        y = adapter.expert_forward(experts, x, params)  # [n, H]
        self.records.cpu_row(layer, e, len(x), start, time.perf_counter())
        return y

    # ---- steps and timing ----------------------------------------------------------------------------
    def begin_step(self, tokens: int, phase: str) -> None:
        if self._stale:  # the last step failed part-way: start again from a clean slot pool
            self.reset()
        self._time_last_step(time.perf_counter())
        self.records.begin_step(tokens, phase)

    def end_step(self) -> None:
        self.records.end_step()
        if self._step_clock is not None:
            self._step_clock = (self._step_clock[0], time.perf_counter())

    def _time_last_step(self, now: float) -> None:
        """Tell the policy how long the last step took, from its begin to this one's (`Policy.step_measured`):
        the host syncs with the device at every MoE layer, so the interval holds the step's device time, the
        tail of its last layers included. Not where the pause between the last step's end and now exceeds the
        step itself (another call's work in between: a new `generate`, a stock run), nor after a reset."""
        last, self._step_clock = self._step_clock, (now, now)
        if last is None or last[1] == last[0]:
            return
        began, ended = last
        if now - ended <= ended - began:
            self.policy.step_measured(now - began)

    def _step_start(self, module, args, kwargs) -> None:
        if self.capture is not None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        phase = "prefill" if ids is not None and ids.shape[1] > 1 else "decode"
        self.begin_step(int(ids.shape[0] * ids.shape[1]) if ids is not None else 0, phase)

    def _step_end(self, module, args, output) -> None:
        if self.capture is None:
            self.end_step()

    def timeline(self) -> pd.DataFrame:
        """Every recorded operation, seconds since the first step began (DESIGN.md §2 schema), measured."""
        self.drain()

        def spans(start, end):
            if isinstance(start, Transfer):  # AsyncIO: None where the transfer was cancelled before it ended
                start, end = start.start, start.done
            return None if start is None or end is None else (start, end)

        return self.records.timeline(spans)

    def step_table(self) -> pd.DataFrame:
        """One row per forward call: phase, tokens, start, end, latency, and the cache's hits, misses and loads."""
        self.drain()
        return self.records.step_table()

    def summary(self) -> pd.DataFrame:
        """Per step: latency, bytes moved, loads, hits, misses, GPU busy and idle time (needs timing="full")."""
        return self.records.summary(self.timeline())

    def set_timing(self, mode: str) -> None:
        """Switch between 'full', 'steps' and 'off' between runs (full timing costs host time)."""
        self.records.timing = EngineConfig(timing=mode).timing
        self.streams.timed = mode == "full"

    def clear_records(self) -> None:
        self.records.clear()


def _device_name(device: torch.device) -> str:
    return measured_profile(host_device(device))  # "host:NVIDIA H200", "host:x86_64-2cpu": one scheme


def _dispatch(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
              top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts backend transformers calls: hand the layer to the engine installed in it."""
    owner = getattr(experts, "_prescope", None)
    if owner is None:
        raise RuntimeError(f"{type(experts).__name__} uses the prescope backend but no engine is installed in it")
    engine, layer = owner
    return engine.moe_step(layer, experts, hidden_states, top_k_index, top_k_weights)


_uncompiled_dispatch = torch.compiler.disable(_dispatch)  # one object: dynamo guards on the backend it calls


@contextlib.contextmanager
def switch_interval(seconds: float | None):
    """The interpreter's thread switch interval set to `seconds` inside (None: unchanged), restored after."""
    if seconds is None:
        yield
        return
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)
