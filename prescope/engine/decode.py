"""Generation through the engine at the device's pace: a static KV cache, one forward per token, and the
decode step replayed from CUDA graphs.

`generate(engine, input_ids, attention_mask, max_new_tokens)` decodes greedily (the same tokens as
`model.generate(do_sample=False)`): the prefill runs through transformers' forward; each decode step then
runs in one of three modes (`Generation.mode`), or, for a model whose layers keep more than attention keys and
values (Mamba, linear-attention or other recurrent layers, `adapter.kv_cache_only`), which a static KV cache
does not hold, transformers' own `generate` runs the whole decode ("transformers"; the engine still runs
every MoE layer):

- "eager": transformers' forward every step (the CPU, or `graphs=False`); each MoE layer runs the engine's
  `moe_step` (one host synchronisation, the policy, one grouped expert kernel per wave);
- "graph" (device-driven): every expert is resident, so the expert-to-slot table never changes: the whole
  decode step is one CUDA graph, with no host work between layers;
- "piecewise" (host-driven): the step is captured as graphs split around each MoE layer: the segment that
  ends with layer l's router, then layer l's expert kernel (`adapter.grouped_rows` over the slot pool,
  reading the table), then the combine and everything up to the next router. Between them the host reads
  the layer's tokens per expert (one small copy), runs the layer protocol (plan, loads, CPU experts), writes
  the layer's table and lets the expert segment wait only for the copies it needs.

Routing replay (`Engine.set_replay`) is captured too: the recorded experts and weights of the running
position are gathered on the device, and their counts are read from the replay's host copy (no copy from
the device), once the device has reached the layer's router, as with the model's own routing: a host that
read the replay layers ahead of the device would plan, and load for, routing no real run knows yet.

The first decode step runs eagerly (it warms up the kernels the graphs capture); capture needs a CUDA device
and falls back to eager, with a warning, where it fails. With `EngineConfig.compile_segments` every decode
step runs the decoder layers' compiled forwards (`models.compiled`): the first step compiles them, so the
graphs capture inductor's fused kernels.

Letters: B rows, P prompt tokens, T cache positions, L MoE layers, E experts, K top-k, N = B tokens of a
decode step, H hidden, S slots.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field

import torch

from prescope.engine.streams import Segments
from prescope.models import adapter
from prescope.routing.replay import replayed_weights

MODES = ("eager", "graph", "piecewise", "transformers")


@dataclass
class Generation:
    sequences: torch.Tensor  # [B, P + new]
    mode: str  # how the decode steps ran (MODES)
    logits: list[torch.Tensor] = field(default_factory=list)  # per new token [B, V], if kept


class StaticInputs:
    """The decode step's inputs at fixed addresses: the token [B, 1], the attention mask over every cache
    position [B, T] (future positions 0), the same mask prepared as transformers' attention reads it
    ([B, 1, 1, T]: boolean for SDPA, additive for eager attention, so no mask is built inside the step) and
    the position ids [B, 1] (left padding counts from each row's first real token)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, total: int, attention: str,
                 dtype: torch.dtype):
        B, P = input_ids.shape
        self.prompt_len = P
        self.mask = torch.zeros(B, total, dtype=attention_mask.dtype, device=input_ids.device)  # [B, T]
        self.mask[:, :P] = attention_mask
        self.additive = attention == "eager"
        keep = self.mask.bool()[:, None, None, :]  # [B, 1, 1, T]
        self.mask4d = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(
            ~keep, torch.finfo(dtype).min) if self.additive else keep.clone()
        self.prefill_positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # [B, P]
        self.positions = self.prefill_positions[:, -1:].clone()  # [B, 1]
        self.ids = torch.zeros(B, 1, dtype=input_ids.dtype, device=input_ids.device)  # [B, 1]

    def advance(self, token: torch.Tensor, step: int) -> None:
        """Inputs of decode step `step` (1, 2, ...): the token it reads, at cache position P + step − 1."""
        position = self.prompt_len + step - 1
        self.ids.copy_(token)
        self.mask[:, position] = 1
        self.mask4d[:, :, :, position] = 0 if self.additive else True
        self.positions.add_(1)


def generate(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 32, graphs: bool = True, keep_logits: bool = False) -> Generation:
    """Greedy decoding of `max_new_tokens` through `engine`'s model; see the module docstring."""
    from transformers import StaticCache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model, device = engine.model, engine.device
    ids = input_ids.to(device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
    if adapter.kv_cache_only(model):  # recurrent or linear-attention layers: transformers' own cache and loop
        return _transformers_generate(model, ids, mask, max_new_tokens, keep_logits)
    attention = getattr(model.config, "_attn_implementation", "sdpa")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"engine.generate supports sdpa and eager attention, not {attention!r}; use model.generate")
    inputs = StaticInputs(ids, mask, ids.shape[1] + max_new_tokens, attention, model.dtype)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + max_new_tokens)
    tokens, kept, stepper = [], [], None
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=inputs.mask, position_ids=inputs.prefill_positions,
                       past_key_values=cache, use_cache=True).logits[:, -1]  # [B, V]
        compiled = engine.compiled  # the decode steps' compiled layers, after the prefill
        with compiled.active(cache) if compiled is not None else contextlib.nullcontext():
            for step in range(1, max_new_tokens + 1):
                kept += [logits.float().clone()] if keep_logits else []
                tokens.append(logits.argmax(-1, keepdim=True))  # [B, 1]
                if step == max_new_tokens:
                    break
                inputs.advance(tokens[-1], step)
                if stepper is None or stepper.mode == "eager" and step == 2 and graphs:
                    stepper = _stepper(engine, cache, inputs, graphs and step >= 2)
                logits = stepper.step()
    mode = "eager" if stepper is None else stepper.mode
    return Generation(torch.cat([ids, *tokens], dim=1), mode, kept)


def _transformers_generate(model, ids, mask, max_new_tokens: int, keep_logits: bool) -> Generation:
    """Greedy decoding by transformers' `generate` (the engine still runs every MoE layer) for a model whose layers
    keep state a static KV cache does not hold (`adapter.kv_cache_only`): its own cache, no CUDA graphs."""
    with torch.no_grad():
        pad = model.generation_config.pad_token_id
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0 if pad is None else pad, output_logits=keep_logits,
                             return_dict_in_generate=True)
    kept = [x.float() for x in out.logits] if keep_logits else []
    return Generation(out.sequences, "transformers", kept)


def _stepper(engine, cache, inputs: StaticInputs, capture: bool):
    """The decode step's runner: graphs where asked for and possible, else eager."""
    if capture and engine.device.type == "cuda":
        try:
            return StepGraphs(engine, cache, inputs)
        except RuntimeError as exc:  # a model whose forward cannot be captured still runs, eagerly
            warnings.warn(f"decode step not captured as CUDA graphs ({exc}); running eagerly", RuntimeWarning,
                          stacklevel=3)
    return EagerStep(engine, cache, inputs)


class EagerStep:
    mode = "eager"

    def __init__(self, engine, cache, inputs: StaticInputs):
        self.engine, self.cache, self.inputs = engine, cache, inputs

    def step(self) -> torch.Tensor:
        i = self.inputs
        return self.engine.model(input_ids=i.ids, attention_mask=i.mask4d, position_ids=i.positions,
                                 past_key_values=self.cache, use_cache=True).logits[:, -1]


@dataclass
class GraphLayer:
    """One MoE layer's tensors inside the captured step (fixed addresses, written by the graphs)."""

    hidden: torch.Tensor  # [N, H] the router input
    index: torch.Tensor  # [N, K] routed experts
    weights: torch.Tensor  # [N, K]
    counts: torch.Tensor | None  # [E + 1] tokens per expert (host-driven, own routing)
    rows: torch.Tensor | None = None  # [N*K, H] the expert segment's output
    cpu_rows: torch.Tensor | None = None  # [N*K, H] CPU experts' rows, zero elsewhere
    cpu_dirty: bool = False


class StepGraphs:
    """The decode step as CUDA graphs: one ("graph") when every expert is resident and the policy needs no
    host work, else split around each MoE layer ("piecewise"); see the module docstring."""

    def __init__(self, engine, cache, inputs: StaticInputs):
        self.engine, self.cache, self.inputs = engine, cache, inputs
        L, E, S = engine.layout.num_moe_layers, engine.layout.num_experts, engine.num_slots
        self.mode = "graph" if engine.device_driven() else "piecewise"
        device = engine.device
        self.lut = torch.full((L, E + 1), S, dtype=torch.int64, device=device)  # expert -> slot, S: elsewhere
        self.lut_host = torch.full((L, E + 1), S, dtype=torch.int64, pin_memory=True)
        self.lut_rows = self.lut_host.numpy()  # the same memory, written element by element at host speed
        self.counts_host = torch.zeros((L, E + 1), dtype=torch.int32, pin_memory=True)
        if self.mode == "graph":
            for layer, e in engine.cache.present_keys():
                self.lut_host[layer, e] = engine.cache.slot((layer, e))
            self.lut.copy_(self.lut_host)
        self.replay_position = torch.zeros((), dtype=torch.int64, device=device)  # the position a step routes
        rows_dtype = next(iter(engine.slot_tensors.values())).dtype
        pairs = inputs.ids.numel() * engine.layout.top_k
        self.cpu_rows = torch.zeros((L, pairs, engine.layout.hidden_size), dtype=rows_dtype, device=device)
        self.layers: list[GraphLayer] = []
        self.segments = Segments(device)
        engine.drain()
        engine.capture = self
        try:
            with self.segments.capturing():
                i = inputs
                self.logits = engine.model(input_ids=i.ids, attention_mask=i.mask4d, position_ids=i.positions,
                                           past_key_values=cache, use_cache=True).logits[:, -1]  # [B, V]
        finally:
            engine.capture = None
        if len(self.layers) != L:
            raise RuntimeError(f"the captured step ran {len(self.layers)} MoE layers, the model has {L}")

    # ---- inside the capture: what a MoE layer records ----------------------------------------------
    def moe(self, layer: int, experts, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        engine, E = self.engine, self.engine.layout.num_experts
        replay = engine.replay
        if replay is not None:  # the recorded routing of the position this step routes, gathered on the device
            N, K = top_k_index.shape
            own_index = top_k_index
            top_k_index = replay.experts[:, :, layer].index_select(1, self.replay_position.view(1)).reshape(N, K)
            weights = replay.weights[:, :, layer].index_select(1, self.replay_position.view(1)).reshape(N, K)
            top_k_weights = replayed_weights(own_index, top_k_weights, top_k_index, weights)
        counts = None
        if self.mode == "piecewise" and replay is None:
            flat = top_k_index.reshape(-1).clamp(0, E)  # [N*K]
            counts = torch.zeros(E + 1, dtype=torch.int32, device=flat.device).scatter_add_(
                0, flat, torch.ones_like(flat, dtype=torch.int32))  # [E + 1]
        record = GraphLayer(hidden, top_k_index, top_k_weights, counts)
        self.layers.append(record)
        if self.mode == "piecewise":
            self.segments.split()  # ends the segment that computed this layer's routing
        record.rows = adapter.grouped_rows(experts, hidden, self.lut[layer][top_k_index], engine.slot_tensors)  # [N*K, H]
        if self.mode == "piecewise":
            self.segments.split()  # ends the expert segment
            record.cpu_rows = self.cpu_rows[layer]  # [N*K, H], written by the host, outside the graphs
            rows = record.rows + record.cpu_rows
        else:
            rows = record.rows
        N, K = top_k_index.shape
        weighted = rows.view(N, K, -1) * top_k_weights.unsqueeze(-1)  # [N, K, H]
        return weighted.sum(dim=1).to(hidden.dtype)  # [N, H]

    # ---- one decode step ------------------------------------------------------------------------------
    def step(self) -> torch.Tensor:
        engine, began = self.engine, time.perf_counter()
        engine.begin_step(tokens=self.inputs.ids.numel(), phase="decode")
        if engine.replay is not None:  # the position this step routes (the replay's own numbering)
            self.replay_position.fill_(engine.replay.prompt_len + engine.step - 1)
        self.segments.replay(0)
        if self.mode == "piecewise":
            for layer in range(engine.layout.num_moe_layers):
                engine.graph_layer(layer, self.layers[layer], self)
                self.segments.replay(2 * layer + 2)  # the combine, then everything up to the next router
        engine.end_step()
        engine.records.issue_seconds[engine.step] = time.perf_counter() - began
        return self.logits

    def counts(self, layer: int) -> list[int]:
        """Tokens per expert of `layer` in this step (E + 1 entries, the last for a sentinel index): one small
        copy of what the graph counted, or the replay's host copy. Either way the host waits until the device
        has routed the layer: a replayed step learns its routing when a real one would, so no policy plans a
        layer (or issues its loads) while the device is still layers behind, which would hand every policy the
        future for free."""
        engine = self.engine
        if engine.replay is None:
            self.counts_host[layer].copy_(self.layers[layer].counts, non_blocking=True)
        engine.streams.wait_host(engine.streams.record(timed=False))
        if engine.replay is not None:
            return engine.replay.host_counts(engine.step, layer, engine.layout.num_experts)
        return self.counts_host[layer].tolist()

    def expert_segment(self, layer: int, wave: list[tuple[int, int]]) -> None:
        """A layer's first wave: write its row of the expert-to-slot table, replay its expert segment."""
        row = self.lut_rows[layer]
        row.fill(self.engine.num_slots)
        for e, slot in wave:
            row[e] = slot
        self.lut[layer].copy_(self.lut_host[layer], non_blocking=True)
        self.segments.replay(2 * layer + 1)
