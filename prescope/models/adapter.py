"""The one module that knows transformers internals: find MoE layers, route, observe, compute one expert.

Contract a model must follow (transformers v5 MoE files; DESIGN.md §3): each sparse block holds a router
and a fused experts module. The experts module carries 3-D parameters whose first dimension is E
(`gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`, or their transposes, optional biases) and is
dispatched through the experts-backend registry (`use_experts_implementation`), which is the seam the
engine plugs into. The router is a sibling of the experts whose weight is `[E, H]` and which returns a
3-tuple of logits `[N, E]`, weights `[N, K]` and integer indices `[N, K]` in any order. Nothing here reads
a model-specific attribute path: experts are found by their parameter shapes, routers by their weight
shape, decoder layers by the module list that holds the blocks; E comes from the expert tensors and K
from the router's own output.

Letters: L MoE layers, E experts, K top-k, N tokens, H hidden, I expert width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from prescope.layout import ModelLayout, UnsupportedModelError

BACKEND_NAME = "prescope"


@dataclass(frozen=True)
class MoELayer:
    """One sparse block of a live model."""

    ordinal: int
    layer: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: tuple[nn.Module, ...]


@dataclass(frozen=True)
class RouterOutput:
    logits: torch.Tensor | None  # [N, E]
    weights: torch.Tensor  # [N, K]
    indices: torch.Tensor  # [N, K] int64


def _expert_params(experts: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters stacked over experts: 2-D or 3-D tensors sharing the same leading dimension E."""
    stacked = {n: p for n, p in experts.named_parameters(recurse=False) if p.dim() >= 2}
    return stacked if len({p.shape[0] for p in stacked.values()}) == 1 else {}


def _is_experts(module: nn.Module) -> bool:
    params = _expert_params(module)
    three_d = [p for p in params.values() if p.dim() == 3]
    return len(three_d) >= 2 and hasattr(module, "has_gate") and "down_proj" in params


def _find_router(block: nn.Module, experts: nn.Module, num_experts: int, hidden: int) -> nn.Module | None:
    for child in block.children():
        if child is experts:
            continue
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (num_experts, hidden):
            return child
    return None


def _decoder_layers(model: nn.Module, blocks: list[nn.Module]) -> nn.ModuleList:
    """The module list whose entries contain the sparse blocks (the decoder stack)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for candidate in sorted(lists, key=len, reverse=True):
        owned = {id(b) for layer in candidate for b in layer.modules()}
        if all(id(b) in owned for b in blocks):
            return candidate
    raise UnsupportedModelError(f"{type(model).__name__}: found MoE blocks but no decoder-layer list holding them")


def _scan(model: nn.Module) -> tuple[list[MoELayer], nn.ModuleList]:
    name = type(model).__name__
    found = []  # (block, experts)
    for block in model.modules():
        for child in block.children():
            if _is_experts(child):
                found.append((block, child))
    if not found:
        hint = ("no experts module with stacked 3-D parameters [E, ...] including `down_proj` and dispatched "
                "through transformers' experts-backend registry (use_experts_implementation)")
        raise UnsupportedModelError(f"{name} is not a supported MoE model: {hint}")
    decoder = _decoder_layers(model, [b for b, _ in found])
    index_of = {}
    for i, layer in enumerate(decoder):
        for m in layer.modules():
            index_of[id(m)] = i
    layers = []
    for ordinal, (block, experts) in enumerate(sorted(found, key=lambda be: index_of[id(be[0])])):
        num_experts, hidden = _num_experts(experts), _hidden_size(experts)
        router = _find_router(block, experts, num_experts, hidden)
        if router is None:
            raise UnsupportedModelError(
                f"{name}: MoE block {type(block).__name__} at layer {index_of[id(block)]} has no router "
                f"(a child with a weight of shape [E={num_experts}, H={hidden}])")
        shared = tuple(c for c in block.children()
                       if c is not experts and c is not router and any(True for _ in c.parameters()))
        layers.append(MoELayer(ordinal, index_of[id(block)], block, router, experts, shared))
    return layers, decoder


def _num_experts(experts: nn.Module) -> int:
    return int(experts.down_proj.shape[0])


def _hidden_size(experts: nn.Module) -> int:
    down = experts.down_proj  # [E, H, I], or [E, I, H] when transposed
    return int(down.shape[2] if getattr(experts, "is_transposed", False) else down.shape[1])


def _intermediate_size(experts: nn.Module) -> int:
    down = experts.down_proj
    return int(down.shape[1] if getattr(experts, "is_transposed", False) else down.shape[2])


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse block of `model`, in decoder order; raises UnsupportedModelError otherwise."""
    return _scan(model)[0]


def describe(model: nn.Module) -> ModelLayout:
    """The layout of `model`: MoE and dense decoder layers, E, K, H, I, dtype and bytes per expert."""
    layers, decoder = _scan(model)
    first = layers[0]
    num_experts, hidden = _num_experts(first.experts), _hidden_size(first.experts)
    for lay in layers[1:]:
        if (_num_experts(lay.experts), _hidden_size(lay.experts)) != (num_experts, hidden):
            raise UnsupportedModelError(f"{type(model).__name__}: MoE layers differ in E or H; not supported")
    probe = torch.zeros(1, hidden, dtype=first.router.weight.dtype, device=first.router.weight.device)
    top_k = int(route(first.router, probe).indices.shape[-1])
    expert_bytes = sum(p[0].numel() * p.element_size() for p in _expert_params(first.experts).values())
    shared_bytes = sum(p.numel() * p.element_size() for m in first.shared for p in m.parameters())
    moe = tuple(lay.layer for lay in layers)
    return ModelLayout(
        model_class=type(model).__name__,
        model_type=str(getattr(getattr(model, "config", None), "model_type", "unknown")),
        num_layers=len(decoder),
        moe_layers=moe,
        dense_layers=tuple(i for i in range(len(decoder)) if i not in moe),
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=hidden,
        intermediate_size=_intermediate_size(first.experts),
        dtype=str(first.experts.down_proj.dtype).removeprefix("torch."),
        expert_bytes=int(expert_bytes),
        shared_expert_bytes=int(shared_bytes),
    )


def route(router: nn.Module, hidden: torch.Tensor) -> RouterOutput:
    """Apply `router` to `hidden [N, H]` and name its outputs by dtype and shape, whatever their order."""
    out = router(hidden)
    if not isinstance(out, tuple) or len(out) < 2:
        raise UnsupportedModelError(f"router {type(router).__name__} must return (logits, weights, indices)")
    indices = [t for t in out if isinstance(t, torch.Tensor) and not t.is_floating_point()]
    floats = [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(indices) != 1 or not floats:
        raise UnsupportedModelError(f"router {type(router).__name__}: expected one integer index tensor "
                                    f"and float weights, got {[getattr(t, 'dtype', type(t)) for t in out]}")
    idx = indices[0]  # [N, K]
    top_k, num_experts = idx.shape[-1], router.weight.shape[0]
    weights = [t for t in floats if t.shape[-1] == top_k]
    logits = [t for t in floats if t.shape[-1] == num_experts and t.shape[-1] != top_k]
    if not weights:
        raise UnsupportedModelError(f"router {type(router).__name__}: no weight tensor of width K={top_k}")
    return RouterOutput(logits[0] if logits else None, weights[0], idx.long())


def expert_params(experts: nn.Module, e: int) -> dict[str, torch.Tensor]:
    """Views of expert `e`'s own tensors (gate_up_proj[e], down_proj[e], biases)."""
    return {name: p[e] for name, p in _expert_params(experts).items()}


def expert_param_names(experts: nn.Module) -> dict[str, torch.Size]:
    """Names and per-expert shapes of the stacked expert tensors, for allocating host buffers and slots."""
    return {name: p.shape[1:] for name, p in _expert_params(experts).items()}


def expert_forward(experts: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """One expert on `x [N, H]` with weights `params` (one expert's tensors): the unweighted output [N, H].

    Mirrors transformers' own per-expert loop: gate_up projection, the module's gating function, down
    projection, honouring the `is_transposed`, `has_bias` and `has_gate` flags of the experts class.
    """
    transposed = getattr(experts, "is_transposed", False)

    def project(inp: torch.Tensor, name: str) -> torch.Tensor:
        w = params[name]
        out = inp @ w if transposed else nn.functional.linear(inp, w)
        bias = params.get(f"{name}_bias")
        return out if bias is None else out + bias

    up_name = "gate_up_proj" if "gate_up_proj" in params else "up_proj"
    h = project(x, up_name)  # [N, 2I] or [N, I]
    h = experts._apply_gate(h) if getattr(experts, "has_gate", True) else experts.act_fn(h)  # [N, I]
    return project(h, "down_proj")  # [N, H]


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
    transposed, has_gate = getattr(experts, "is_transposed", False), getattr(experts, "has_gate", True)
    up = "gate_up_proj" if has_gate else "up_proj"
    bias = slots.get(f"{up}_bias")
    h = _grouped_linear(x.masked_fill(outside, 0.0), slots[up], offsets,
                        bias=None if bias is None else bias[rows], is_transposed=transposed)
    h = h.masked_fill(outside, 0.0)  # rows past the last offset are left unwritten by the kernel
    h = experts._apply_gate(h) if has_gate else experts.act_fn(h)  # [N*K, I]
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
    transposed, has_gate = getattr(experts, "is_transposed", False), getattr(experts, "has_gate", True)
    up = "gate_up_proj" if has_gate else "up_proj"
    token = torch.where(pair >= 0, pair // top_k, -1)  # [Mp] the token each row reads
    h = slotmm.slot_matmul(hidden, token, slots[up], plan, transposed)  # [Mp, 2I]
    if f"{up}_bias" in slots:
        h = h + slots[f"{up}_bias"][slot_of_row]
    h = experts._apply_gate(h) if has_gate else experts.act_fn(h)  # [Mp, I]
    rows = torch.where(live, torch.arange(len(pair), device=pair.device), -1)  # [Mp] each row reads itself
    out = slotmm.slot_matmul(h.contiguous(), rows, slots["down_proj"], plan, transposed)  # [Mp, H]
    if "down_proj_bias" in slots:
        out = out + slots["down_proj_bias"][slot_of_row]
    return out.masked_fill(~live.unsqueeze(-1), 0.0)[plan.row_of_pair]  # [N*K, H]


def register_backend(fn: Callable) -> None:
    """Register `fn(experts, hidden [N, H], top_k_index [N, K], top_k_weights [N, K])` as the prescope backend."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(BACKEND_NAME, fn)


def set_backend(model: nn.Module, name: str) -> str:
    """Switch `model`'s experts implementation; returns the previous one."""
    previous = model.config._experts_implementation
    model.set_experts_implementation(name)
    return previous


def _call_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args):]]
    return values[0], values[1], values[2]


@contextlib.contextmanager
def observe_routing(model: nn.Module, callback: Callable) -> Iterator[None]:
    """Call `callback(ordinal, hidden [N, H], logits [N, E] | None, weights [N, K], indices [N, K])` per MoE step.

    Hooks sit on the routers (for the full logits) and on the experts modules (for the router input and
    the routing the experts actually receive), so they work with any experts backend.
    """
    handles, last_logits = [], {}
    for lay in moe_layers(model):
        def on_router(module, args, out, ordinal=lay.ordinal):
            floats = [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point()
                      and t.shape[-1] == module.weight.shape[0]] if isinstance(out, tuple) else []
            last_logits[ordinal] = floats[0].reshape(-1, floats[0].shape[-1]) if floats else None

        def on_experts(module, args, kwargs, ordinal=lay.ordinal):
            hidden, index, weights = _call_args(args, kwargs)
            callback(ordinal, hidden, last_logits.pop(ordinal, None), weights, index)

        handles.append(lay.router.register_forward_hook(on_router))
        handles.append(lay.experts.register_forward_pre_hook(on_experts, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def load_model(path_or_id: str, dtype: torch.dtype | str | None = None, device: str = "cpu", **kwargs) -> nn.Module:
    """Load a causal LM with `from_pretrained` (a local directory, or a hub id where there is network)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype or "auto", **kwargs).to(device)
    model.eval()
    describe(model)  # fail early, with the class name, if the model is not a supported MoE
    return model
