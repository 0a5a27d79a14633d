"""The seam into transformers: find MoE layers, route, observe, compute one expert, plug in a dispatch.

With `probe` (which learns every sparse layer from one short real forward) and `experts` (expert weight
layouts and one expert's math), the only code that knows transformers internals. Nothing here reads a
model-specific attribute path: experts are found by their tensors, E from them, K and the router from
the call the experts receive in a real forward (DESIGN.md §3).

The engine sees one uniform dispatch, `fn(experts, hidden [N, H], top_k_index [N, K], top_k_weights
[N, K]) -> [N, H]`, installed by `install_dispatch` through two seams:

- transformers' experts-backend registry (`use_experts_implementation`), for experts dispatched through it;
- the experts module's own call inside its MoE block, for experts that are not (DBRX, whose weights are
  2-D `[E·I, H]`; Llama 4, whose block runs every expert on its input scaled by the router's score: such
  layers are `input_weighted`, their weights scale each expert's input and the outputs are summed).

Letters: L MoE layers, E experts, K top-k, N tokens, H hidden, I expert width.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from prescope.layout import ModelLayout, UnsupportedModelError
from prescope.models import experts as layouts
from prescope.models.experts import indexed_args
from prescope.models.probe import Probed, probe

BACKEND_NAME = "prescope"
_REPLAYING = threading.local()  # experts whose block is being re-run by `route`: observers stay quiet


@dataclass(frozen=True)
class MoELayer:
    """One sparse layer of a live model."""

    ordinal: int
    layer: int
    block: nn.Module
    router: nn.Module | None
    experts: nn.Module
    shared: tuple[nn.Module, ...]
    num_experts: int
    top_k: int
    input_weighted: bool  # routing weights scale each expert's input, outputs are summed (Llama 4)
    seam: str  # "backend": transformers' experts-backend registry; "block": the experts' call in their block
    probed: Probed = field(repr=False, compare=False)


@dataclass(frozen=True)
class RouterOutput:
    logits: torch.Tensor | None  # [N, E]
    weights: torch.Tensor  # [N, K]
    indices: torch.Tensor  # [N, K] int64


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse layer of `model`, in decoder order; raises UnsupportedModelError otherwise."""
    return [MoELayer(o, p.layer, p.block, p.router, p.experts, p.shared, p.layout.num_experts, p.top_k,
                     p.convention == "scaled", "backend" if p.backend else "block", p)
            for o, p in enumerate(probe(model).layers)]


def describe(model: nn.Module) -> ModelLayout:
    """The layout of `model`: MoE and dense decoder layers, E, K, H, I, dtype and bytes per expert."""
    result = probe(model)
    first = result.layers[0]
    shape = (first.layout.num_experts, first.layout.hidden_size, first.top_k)
    for p in result.layers[1:]:
        if (p.layout.num_experts, p.layout.hidden_size, p.top_k) != shape:
            raise UnsupportedModelError(
                f"{result.model_class}: layer {p.layer} has E={p.layout.num_experts}, H={p.layout.hidden_size}, "
                f"K={p.top_k} but layer {first.layer} has E, H, K = {shape}; layers must agree")
    tensors = layouts.stacked_tensors(first.experts, first.layout)
    expert_bytes = sum(layouts.per_expert(first.layout, t)[0].numel() * t.element_size() for t in tensors.values())
    shared_bytes = sum(p.numel() * p.element_size() for m in first.shared for p in m.parameters())
    moe = tuple(p.layer for p in result.layers)
    return ModelLayout(
        model_class=result.model_class,
        model_type=str(getattr(getattr(model, "config", None), "model_type", "unknown")),
        num_layers=len(result.decoder),
        moe_layers=moe,
        dense_layers=tuple(i for i in range(len(result.decoder)) if i not in moe),
        num_experts=shape[0],
        top_k=shape[2],
        hidden_size=shape[1],
        intermediate_size=first.layout.intermediate_size,
        dtype=str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        expert_bytes=int(expert_bytes),
        shared_expert_bytes=int(shared_bytes),
    )


# ---- routing -------------------------------------------------------------------------------------------------
def route(layer: MoELayer, hidden: torch.Tensor) -> RouterOutput:
    """Layer `layer`'s routing of `hidden [N, H]`, computed the way its block does: its router called with what
    the block gives it, or (where the block takes the top-k) the block itself, stopped at its experts."""
    p = layer.probed
    if p.router_call is None:
        raise UnsupportedModelError(f"{p.unroutable}; use a routing trace or a predictor fitted to one instead")
    num_tokens = hidden.reshape(-1, hidden.shape[-1]).shape[0]
    if p.convention == "indexed" and p.outputs.index_at is None:
        return _route_by_block(layer, hidden)
    out = _flat(p.router_call(hidden))
    logits = _rows(out[p.outputs.logits_at], num_tokens) if p.outputs.logits_at is not None else None
    if p.convention == "scaled":
        weights, indices = _rows(out[p.outputs.scores_at], num_tokens).topk(layer.top_k, dim=-1)  # [N, K]
        return RouterOutput(logits, weights, indices)
    return RouterOutput(logits, _rows(out[p.outputs.weights_at], num_tokens),
                        _rows(out[p.outputs.index_at], num_tokens).long())


class _Routed(Exception):
    """Raised by the experts while `route` re-runs a block: the routing is all it needs."""


def _route_by_block(layer: MoELayer, hidden: torch.Tensor) -> RouterOutput:
    p, seen = layer.probed, {}
    size = p.layout.hidden_size

    def grab(*args, **kwargs):
        seen["routing"] = indexed_args(args, kwargs, size)
        raise _Routed

    def logits_of(module, args, output):
        wide = [t for t in _flat(output) if torch.is_tensor(t) and t.is_floating_point() and t.shape[-1] == p.layout.num_experts]
        seen["logits"] = wide[0] if wide else None

    param = next(iter(p.block.parameters()))
    x = hidden.reshape(1, -1, size) if p.replay_dims == 3 else hidden.reshape(-1, size)  # [1, N, H] or [N, H]
    x = x.to(param.device, param.dtype)
    kwargs = {p.replay_at: x} if isinstance(p.replay_at, str) else {}
    args = (x,) if not kwargs else ()
    hook = p.router.register_forward_hook(logits_of) if p.router is not None else None
    with _swapped_forward(p.experts, grab), torch.no_grad():
        try:
            p.block(*args, **kwargs)
        except _Routed:
            pass
        finally:
            if hook is not None:
                hook.remove()
    if "routing" not in seen:
        raise UnsupportedModelError(f"{p.where}: re-running its block {type(p.block).__name__} on hidden states "
                                    "did not reach its experts")
    _, index, weights = seen["routing"]
    n = x.shape[-2]
    logits = seen.get("logits")
    return RouterOutput(None if logits is None else _rows(logits, n), _rows(weights, n), _rows(index, n).long())


@contextlib.contextmanager
def _swapped_forward(experts: nn.Module, forward: Callable) -> Iterator[None]:
    """`experts` runs `forward` for a while (the engine's seam, if installed, comes back after)."""
    previous = experts.__dict__.get("forward")
    replaying = getattr(_REPLAYING, "ids", set())
    _REPLAYING.ids = replaying | {id(experts)}
    experts.forward = forward
    try:
        yield
    finally:
        _REPLAYING.ids = replaying
        if previous is None:
            del experts.forward
        else:
            experts.forward = previous


# decoder layer kinds whose whole state is a key/value cache a static KV cache holds (config.layer_types)
KV_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention"})


def kv_cache_only(model: nn.Module) -> str:
    """"" if every decoder layer keeps only attention keys and values (a static KV cache serves the model),
    else why not: a stateful model (recurrent, Mamba or linear-attention layers, `_is_stateful`) or a layer kind
    outside KV_LAYER_TYPES in `config.layer_types`."""
    kinds = set(getattr(model.config, "layer_types", None) or ()) - KV_LAYER_TYPES
    if getattr(model, "_is_stateful", False) or kinds:
        what = f"layer kinds {sorted(kinds)}" if kinds else "recurrent state (transformers marks it stateful)"
        return f"{type(model).__name__} keeps {what} beside attention keys and values"
    return ""


def linear_router(layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [E, H], bias [E] or None) when layer's router logits are a linear map of its input hidden
    states (checked on a few random inputs), else UnsupportedModelError saying why."""
    p = layer.probed
    where = f"{p.where}, router {type(p.router).__name__ if p.router is not None else '(none found)'}"
    candidates = [] if p.router is None else [m for m in p.router.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                                              and tuple(m.weight.shape) == (p.layout.num_experts, p.layout.hidden_size)]
    if not candidates or p.router_call is None or p.outputs.logits_at is None:
        raise UnsupportedModelError(f"{where}: no linear router logits to copy; fit LinearRouters to a trace instead")
    weight = candidates[0].weight
    bias = getattr(candidates[0], "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) and bias.shape == weight.shape[:1] else None
    x = torch.randn(4, p.layout.hidden_size, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with torch.no_grad():
        got = _rows(_flat(p.router_call(x))[p.outputs.logits_at], 4).float()
        want = nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-4):
        raise UnsupportedModelError(f"{where}: its router output is not a linear map of the hidden states "
                                    "(it normalises or scales them first); fit LinearRouters to a trace instead")
    return weight, bias


# ---- experts -------------------------------------------------------------------------------------------------
def _layout(experts: nn.Module) -> layouts.ExpertsLayout:
    layout = layouts.find_layout(experts)
    if layout is None:
        raise UnsupportedModelError(f"{type(experts).__name__} is not an experts module prescope knows")
    return layout


def expert_tensors(experts: nn.Module) -> dict[str, nn.Parameter]:
    """The stacked expert parameters by (dotted) name; setting a parameter's `.data` moves those weights."""
    return layouts.stacked_tensors(experts, _layout(experts))


def relocate_experts(experts: nn.Module, move: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each stacked tensor's data by `move(data)`; returns name -> [E, ...] views of the moved data."""
    layout, views = _layout(experts), {}
    for name, p in layouts.stacked_tensors(experts, layout).items():
        p.data = move(p.data)
        views[name] = layouts.per_expert(layout, p.data)
    return views


def expert_params(experts: nn.Module, e: int) -> dict[str, torch.Tensor]:
    """Views of expert `e`'s own tensors (gate_up_proj[e], down_proj[e], biases; DBRX's rows of w1, v1, w2)."""
    layout = _layout(experts)
    return {n: layouts.per_expert(layout, p)[e] for n, p in layouts.stacked_tensors(experts, layout).items()}


def expert_param_names(experts: nn.Module) -> dict[str, torch.Size]:
    """Names and per-expert shapes of the stacked expert tensors, for allocating host buffers and slots."""
    layout = _layout(experts)
    return {n: layouts.per_expert(layout, p).shape[1:] for n, p in layouts.stacked_tensors(experts, layout).items()}


def expert_forward(experts: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """One expert on `x [N, H]` with weights `params` (one expert's tensors): the unweighted output [N, H]."""
    return layouts.expert_forward(experts, x, params)


def scaled_inputs(hidden: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Input-weighted layers: each (token, k) pair's input, the token's hidden state times its weight [N·K, H]."""
    return (hidden.unsqueeze(1) * top_k_weights.unsqueeze(-1).to(hidden.dtype)).reshape(-1, hidden.shape[-1])


def grouped_rows(experts: nn.Module, hidden: torch.Tensor, slot_index: torch.Tensor,
                 slots: dict[str, torch.Tensor], kernel: str = "auto") -> torch.Tensor:
    """Every routed (token, k) pair through its expert, as one grouped kernel per projection over a pool of S
    expert slots: the unweighted outputs [N*K, H] in (token, k) order, zero where `slot_index` holds S.

    `slot_index [N, K]` is the slot holding each pair's expert (S: computed elsewhere, e.g. on the CPU);
    `slots` the pool's stacked tensors (`gate_up_proj [S, 2I, H]`, `down_proj [S, H, I]`, transposes and
    biases as the experts class has them). Between the projections, the class's own gating. A fixed
    sequence of kernels with no host synchronisation, so it can sit in a CUDA graph. `kernel`: "grouped_mm"
    (transformers' grouped matrix product, with slots in place of experts: the CPU's, bit for bit the stock
    backend's arithmetic), "triton" (`slotmm`, any number of slots: CUDA's, where grouped_mm stops at 1024
    groups), "auto" (triton on CUDA, else grouped_mm).
    """
    if any(n.rsplit(".", 1)[-1] == layouts.SPLIT[0] for n in slots):  # DBRX's rows: no grouped kernel here
        return _rows_one_by_one(experts, hidden, slot_index, slots)
    if kernel == "auto":
        kernel = "triton" if hidden.is_cuda else "grouped_mm"
    if kernel == "triton":
        return _slot_rows(experts, hidden, slot_index, slots)
    from transformers.integrations.moe import _grouped_linear

    num_slots, top_k = next(iter(slots.values())).shape[0], slot_index.shape[-1]
    flat = slot_index.reshape(-1)  # [N*K]
    sorted_slots, perm = torch.sort(flat)  # [N*K]
    x = hidden[perm // top_k]  # [N*K, H]
    # tokens per slot (histc, not bincount: no host sync, graph-safe); the sentinel falls past the last bin
    count_input = sorted_slots.float() if hidden.device.type in ("cpu", "mps") else sorted_slots.int()
    offsets = torch.cumsum(torch.histc(count_input, bins=num_slots, min=0, max=num_slots - 1), 0, dtype=torch.int32)
    outside = (sorted_slots >= num_slots).unsqueeze(-1)  # [N*K, 1]
    rows = sorted_slots.clamp(max=num_slots - 1)  # in range for the per-row bias gather
    transposed, up = layouts.is_transposed(experts), "gate_up_proj" if "gate_up_proj" in slots else "up_proj"
    bias = slots.get(f"{up}_bias")
    h = _grouped_linear(x.masked_fill(outside, 0.0), slots[up], offsets,
                        bias=None if bias is None else bias[rows], is_transposed=transposed)
    h = h.masked_fill(outside, 0.0)  # rows past the last offset are left unwritten by the kernel
    h = layouts.activate(experts, h, up)  # [N*K, I]
    bias = slots.get("down_proj_bias")
    out = _grouped_linear(h, slots["down_proj"], offsets, bias=None if bias is None else bias[rows],
                          is_transposed=transposed).masked_fill(outside, 0.0)  # [N*K, H], sorted by slot
    unsorted = torch.empty_like(out)
    unsorted[perm] = out
    return unsorted


def _slot_rows(experts: nn.Module, hidden: torch.Tensor, slot_index: torch.Tensor,
               slots: dict[str, torch.Tensor]) -> torch.Tensor:
    """`grouped_rows` through `slotmm`: pairs padded into blocks of one slot each, one kernel per projection."""
    from prescope.models import slotmm

    num_slots, top_k = next(iter(slots.values())).shape[0], slot_index.shape[-1]
    plan = slotmm.align(slot_index.reshape(-1), num_slots)
    pair = plan.pair_of_row  # [Mp]
    live = (pair >= 0) & (slotmm.row_slots(plan) >= 0)  # [Mp] rows some block computes
    slot_of_row = slotmm.row_slots(plan).clamp(min=0)  # [Mp] for the bias gathers
    transposed, up = layouts.is_transposed(experts), "gate_up_proj" if "gate_up_proj" in slots else "up_proj"
    token = torch.where(pair >= 0, pair // top_k, -1)  # [Mp] the token each row reads
    h = slotmm.slot_matmul(hidden, token, slots[up], plan, transposed)  # [Mp, 2I]
    if f"{up}_bias" in slots:
        h = h + slots[f"{up}_bias"][slot_of_row]
    h = layouts.activate(experts, h, up)  # [Mp, I]
    rows = torch.where(live, torch.arange(len(pair), device=pair.device), -1)  # [Mp] each row reads itself
    out = slotmm.slot_matmul(h.contiguous(), rows, slots["down_proj"], plan, transposed)  # [Mp, H]
    if "down_proj_bias" in slots:
        out = out + slots["down_proj_bias"][slot_of_row]
    return out.masked_fill(~live.unsqueeze(-1), 0.0)[plan.row_of_pair]  # [N*K, H]


def _rows_one_by_one(experts: nn.Module, hidden: torch.Tensor, slot_index: torch.Tensor,
                     slots: dict[str, torch.Tensor]) -> torch.Tensor:
    """`grouped_rows` one slot at a time (`expert_forward`), for layouts no grouped kernel reads (DBRX's 2-D
    rows); it reads the routing on the host, so such layers do not run inside CUDA graphs."""
    num_slots, top_k = next(iter(slots.values())).shape[0], slot_index.shape[-1]
    flat = slot_index.reshape(-1)  # [N*K]
    out = hidden.new_zeros((flat.numel(), hidden.shape[-1]))  # [N*K, H]
    for slot in torch.unique(flat).tolist():
        if slot < num_slots:
            positions = torch.nonzero(flat == slot).squeeze(1)  # [n]
            out[positions] = expert_forward(experts, hidden[positions // top_k], {n: t[slot] for n, t in slots.items()})
    return out



# ---- the engine's seams --------------------------------------------------------------------------------------
@dataclass
class Dispatch:
    """An installed dispatch; `remove()` puts the model back as it was."""

    undo: list[Callable[[], None]]

    def remove(self) -> None:
        while self.undo:
            self.undo.pop()()


def install_dispatch(model: nn.Module, fn: Callable) -> Dispatch:
    """Route every sparse layer's experts call to `fn(experts, hidden [N, H], top_k_index [N, K], top_k_weights
    [N, K]) -> [N, H]`: through the experts-backend registry where the experts use it, else through the experts'
    call inside their block. `fn` weights outputs, except for `input_weighted` layers (see `scaled_inputs`).
    Router logits are off while it is installed (`router_logits_off`)."""
    layers, dispatch = moe_layers(model), Dispatch([router_logits_off(model)])
    if any(lay.probed.backend for lay in layers):
        from transformers.integrations.moe import ExpertsInterface

        ExpertsInterface.register(BACKEND_NAME, fn)
        previous = _set_backend(model, BACKEND_NAME)
        dispatch.undo.append(lambda: _set_backend(model, previous if previous != BACKEND_NAME else "eager"))
    for lay in layers:
        if not lay.probed.backend:
            _install_block_seam(lay, fn, dispatch)
    return dispatch


def _set_backend(model: nn.Module, name: str) -> str:
    previous = model.config._experts_implementation
    model.set_experts_implementation(name)
    return previous


def _install_block_seam(lay: MoELayer, fn: Callable, dispatch: Dispatch) -> None:
    p, experts = lay.probed, lay.experts
    size, num_experts, top_k = p.layout.hidden_size, p.layout.num_experts, p.top_k
    if p.convention == "indexed":
        def forward(*args, **kwargs):
            hidden, index, weights = indexed_args(args, kwargs, size)
            k = index.shape[-1]
            out = fn(experts, hidden.reshape(-1, size), index.reshape(-1, k), weights.reshape(-1, k))  # [N, H]
            return out.reshape(hidden.shape).to(hidden.dtype)
    else:
        seen = {}
        handles = [p.block.register_forward_pre_hook(
                       lambda m, args, kwargs: seen.__setitem__("x", _block_input(p, args, kwargs)), with_kwargs=True),
                   p.router.register_forward_hook(
                       lambda m, args, out: seen.__setitem__("scores", _flat(out)[p.outputs.scores_at]))]
        dispatch.undo.append(lambda: [h.remove() for h in handles])

        def forward(scaled: torch.Tensor) -> torch.Tensor:
            x = seen.pop("x").reshape(-1, size)  # [N, H]
            weights, index = seen.pop("scores").reshape(-1, num_experts).topk(top_k, dim=-1)  # [N, K]
            out = fn(experts, x, index, weights)  # [N, H], the weights applied to the inputs
            per_expert = scaled.new_zeros(num_experts, x.shape[0], size)  # [E, N, H]: the block sums over E
            per_expert[0] = out
            return per_expert.reshape(-1, size)

    experts.forward = forward
    dispatch.undo.append(lambda: experts.__dict__.pop("forward", None))


def _block_input(p: Probed, args: tuple, kwargs: dict) -> torch.Tensor:
    return next(t for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.shape[-1] == p.layout.hidden_size)


def router_logits_off(model: nn.Module) -> Callable[[], None]:
    """Set `output_router_logits` to False in every config of `model` that asks for it; returns the undo.

    A checkpoint saved for training may ask for router logits: transformers then computes its load-balancing
    loss in every forward, which fails at batch > 1 with padding (the loss's mask is the attention mask, the
    logits are only the cached step's) and is wasted work for inference. Routing is observed on the routers."""
    changed = []
    for module in model.modules():
        config = getattr(module, "config", None)
        for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
            if getattr(cfg, "output_router_logits", False) is True and all(c is not cfg for c in changed):
                cfg.output_router_logits = False
                changed.append(cfg)

    def restore() -> None:
        for cfg in changed:
            cfg.output_router_logits = True
    return restore


# ---- observing ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def observe_routing(model: nn.Module, callback: Callable) -> Iterator[None]:
    """Call `callback(ordinal, hidden [N, H], logits [N, E] | None, weights [N, K], indices [N, K])` per MoE step.

    `hidden` is the router's input (what `route` takes), `weights` and `indices` the routing the experts
    receive; hooks sit on the routers and the experts modules, so they work with any experts backend."""
    handles, restore = [], router_logits_off(model)
    for lay in moe_layers(model):
        p, last = lay.probed, {}
        size, num_experts = p.layout.hidden_size, p.layout.num_experts

        def on_router(module, args, kwargs, out, p=p, last=last):
            outs = _flat(out)
            last["hidden"] = _router_input(p, args, kwargs)
            last["logits"] = outs[p.outputs.logits_at] if p.outputs.logits_at is not None else None
            last["scores"] = outs[p.outputs.scores_at] if p.outputs.scores_at is not None else None

        def on_experts(module, args, kwargs, lay=lay, p=p, last=last, size=size, num_experts=num_experts):
            if id(module) in getattr(_REPLAYING, "ids", ()):
                return
            if p.convention == "scaled":
                hidden = last.get("hidden")
                weights, index = last.pop("scores").reshape(-1, num_experts).topk(lay.top_k, dim=-1)
            else:
                hidden_in, index, weights = indexed_args(args, kwargs, size)
                hidden = last.get("hidden", hidden_in)
            logits = last.pop("logits", None)
            last.pop("hidden", None)
            n = index.numel() // lay.top_k
            callback(lay.ordinal, hidden.reshape(-1, size), None if logits is None else _rows(logits, n),
                     weights.reshape(n, -1), index.reshape(n, -1))

        if p.router is not None:
            handles.append(p.router.register_forward_hook(on_router, with_kwargs=True))
        handles.append(p.experts.register_forward_pre_hook(on_experts, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        restore()


def _router_input(p: Probed, args: tuple, kwargs: dict) -> torch.Tensor | None:
    at = p.router_call.hidden_at if p.router_call is not None else None
    if isinstance(at, str) and at in kwargs:
        return kwargs[at]
    if isinstance(at, int) and at < len(args):
        return args[at]
    return next((t for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.is_floating_point()
                 and t.shape[-1] == p.layout.hidden_size), None)


def _flat(output) -> list:
    return [output] if torch.is_tensor(output) else list(output) if isinstance(output, (tuple, list)) else []


def _rows(t: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return t.reshape(num_tokens, -1)


# ---- loading -----------------------------------------------------------------------------------------------------
def load_model(path_or_id: str, dtype: torch.dtype | str | None = None, device: str = "cpu", **kwargs) -> nn.Module:
    """Load a causal LM with `from_pretrained` (a local directory, or a hub id where there is network)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path_or_id, **{k: v for k, v in kwargs.items()
                                                        if k in ("trust_remote_code", "local_files_only")})
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{path_or_id}: {type(config).__name__} ({config.model_type}): encoder-decoder "
                                    "models are not supported (prescope offloads the experts of decoder-only "
                                    "causal LMs)")
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype or "auto", **kwargs).to(device)
    model.eval()
    router_logits_off(model)  # inference only: a training checkpoint's load-balancing loss stays off
    describe(model)  # fail early, with the class name, if the model is not a supported MoE
    return model
