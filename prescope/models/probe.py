"""Learn every sparse layer of a model from one short real forward, not from attribute paths.

Part of the adapter (with `adapter` and `experts`, the only modules that know transformers internals).
Experts modules are found by their tensors (`experts.find_layout`); the rest is read off one forward over
a few tokens, with every module of the decoder layers that hold experts watched:

- the call each experts module receives gives its routing convention and K: `(hidden [N, H], top_k_index
  [N, K], top_k_weights [N, K])` in any order ("indexed": the backend's call, and DBRX's), or one tensor
  `[E·N, H]` that is the block's input repeated per expert and scaled by a router score `S [N, E]`
  ("scaled": Llama 4; K is the number of non-zero scores per token);
- the router is the outermost module, called before the experts and outside them, whose output holds
  that routing (the very index tensor, or the scores); where the block takes the top-k itself, the one
  whose output holds the logits `[N, E]` (Jamba, DBRX). How the block called it (the hidden states, plus
  constants or tensors the block holds) is how `adapter.route` calls it again;
- one expert at a time (`experts.expert_forward`) must give what the experts module computes, on two tokens
  routed to its first and last expert: a layer whose experts compute something else is refused;
- shared experts are the always-on feed-forwards of the MoE layer: modules in the block or beside it in
  the decoder layer, called on the hidden states alone, holding two or more weight matrices and nothing
  of more than two dimensions (so neither a norm, a router, attention, nor a Mamba or convolution mixer).

Letters: E experts, K top-k, N tokens, H hidden.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from prescope.layout import UnsupportedModelError
from prescope.models.experts import ExpertsLayout, check_math, find_layout, indexed_args

PROBE_IDS = ((0, 1, 2, 3), (4, 5, 6, 7))  # two rows of four tokens; the first is left-padded by one
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class RouterCall:
    """How a block calls its router: where the hidden states go, the other arguments (constants, or tensors
    the block holds, looked up by name at every call so they follow the model across devices), and where
    the routing sits in the router's output."""

    module: nn.Module
    hidden_at: int | str
    hidden_dtype: torch.dtype
    hidden_dims: int  # 2: [N, H]; 3: [B, S, H] (given as [1, N, H])
    constants: tuple[tuple[int | str, Any], ...]
    held: tuple[tuple[int | str, nn.Module, str], ...]  # (place, owner, tensor name in the owner)

    def __call__(self, hidden: torch.Tensor) -> Any:
        args, kwargs = {}, {}
        param = next(iter(self.module.parameters()), None)
        device = param.device if param is not None else hidden.device
        x = hidden.reshape(1, -1, hidden.shape[-1]) if self.hidden_dims == 3 else hidden.reshape(-1, hidden.shape[-1])
        places = [(self.hidden_at, x.to(device, self.hidden_dtype)), *self.constants,
                  *((at, _held(owner, name)) for at, owner, name in self.held)]
        for at, value in places:
            (kwargs if isinstance(at, str) else args)[at] = value
        return self.module(*(args[i] for i in sorted(args)), **kwargs)


@dataclass(frozen=True)
class Outputs:
    """Places in a router's output (a tensor or a tuple, flattened) of what the block uses."""

    index_at: int | None = None  # top_k_index [N, K]; None: the block takes the top-k itself
    weights_at: int | None = None  # top_k_weights [N, K]
    logits_at: int | None = None  # logits or probabilities [N, E]
    scores_at: int | None = None  # "scaled": the scores S [N, E] that scale the experts' inputs


@dataclass(frozen=True)
class Probed:
    """What one forward taught about one sparse layer."""

    where: str  # "ModelClass: layer i (ExpertsClass)", for messages
    layer: int  # index in the decoder-layer list
    block: nn.Module  # the experts' parent (the MoE block, or the decoder layer itself: Gemma 4)
    experts: nn.Module
    layout: ExpertsLayout
    convention: str  # "indexed" or "scaled"
    backend: bool  # dispatched through transformers' experts-backend registry
    top_k: int
    router: nn.Module | None
    outputs: Outputs  # where the routing sits in the router's output
    router_call: RouterCall | None
    replay_at: int | str | None  # where the block takes its hidden states, when it takes nothing else
    replay_dims: int  # 2 or 3, as the block took them
    unroutable: str  # why the router cannot be applied alone ("" when it can)
    shared: tuple[nn.Module, ...] = field(default=())


@dataclass(frozen=True)
class ProbeResult:
    model_class: str
    decoder: nn.ModuleList
    layers: tuple[Probed, ...]


class _Unrouted(UnsupportedModelError):
    """A module with stacked expert tensors whose call carries no routing."""


@dataclass
class _Call:
    module: nn.Module
    order: int
    args: tuple
    kwargs: dict
    output: Any = None
    done: bool = False


def probe(model: nn.Module) -> ProbeResult:
    """The sparse layers of `model` (cached per model); UnsupportedModelError names what is missing."""
    cached = _CACHE.get(model)
    if cached is None:
        cached = _CACHE[model] = _probe(model)
    return cached


def _probe(model: nn.Module) -> ProbeResult:
    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name}: encoder-decoder models are not supported (prescope offloads the "
                                    "experts of decoder-only causal LMs)")
    found = _experts_modules(model)
    if not found:
        raise UnsupportedModelError(_no_experts_reason(model))
    decoder = _decoder_layers(model, [m for m, _ in found])
    index_of = {id(m): i for i, layer in enumerate(decoder) for m in layer.modules()}
    calls, experts_calls = _watched_forward(model, decoder, found, index_of)
    layers, unrouted = {}, []
    for experts, layout in sorted(found, key=lambda f: index_of[id(f[0])]):
        call = experts_calls.get(id(experts))
        if call is None:
            continue  # experts the forward never reaches (e.g. a speech head) are not part of decoding
        layer = index_of[id(experts)]
        try:
            learned = _learn_layer(name, decoder[layer], layer, experts, layout, call, calls)
        except _Unrouted as exc:
            unrouted.append((layer, experts, exc))
            continue
        if layer in layers:
            raise UnsupportedModelError(f"{name}: layer {layer} routes tokens to two experts modules "
                                        f"({type(layers[layer].experts).__name__}, {type(experts).__name__}); "
                                        "prescope offloads one routed experts module per decoder layer")
        layers[layer] = learned
    for layer, experts, exc in unrouted:  # stacked but always on (Inkling's shared experts): shared experts
        if layer not in layers:
            raise exc
        layers[layer] = replace(layers[layer], shared=(*layers[layer].shared, experts))
    layers = list(layers.values())
    if not layers:
        raise UnsupportedModelError(f"{name}: no experts module was called by a forward over token ids")
    return ProbeResult(name, decoder, tuple(layers))


# ---- finding experts and the decoder stack ----------------------------------------------------------------
def _experts_modules(model: nn.Module) -> list[tuple[nn.Module, ExpertsLayout]]:
    found = [(m, layout) for m in model.modules() if (layout := find_layout(m)) is not None]
    inner = {id(sub) for m, _ in found for sub in m.modules() if sub is not m}
    return [(m, layout) for m, layout in found if id(m) not in inner]


def _decoder_layers(model: nn.Module, experts: list[nn.Module]) -> nn.ModuleList:
    """The module list whose entries contain every experts module (the decoder stack)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for candidate in sorted(lists, key=len, reverse=True):
        owned = {id(sub) for layer in candidate for sub in layer.modules()}
        if all(id(e) in owned for e in experts):
            return candidate
    raise UnsupportedModelError(f"{type(model).__name__}: found experts but no decoder-layer list holding them")


def _no_experts_reason(model: nn.Module) -> str:
    name, config = type(model).__name__, getattr(model, "config", None)
    declared = {f: getattr(config, f) for f in EXPERT_COUNT_FIELDS if isinstance(getattr(config, f, None), int)}
    split = [(n, m) for n, m in model.named_modules()
             if any(p.dim() == 3 and p.shape[0] > 1 for p in m.parameters(recurse=False))]
    if split:
        where = " and ".join(n for n, _ in split[:2])
        return (f"{name} is not a supported MoE model: its experts' tensors are split across modules called one "
                f"by one ({where}, one 3-D tensor each); prescope needs one experts module holding the up and "
                "down projections of every expert (gate_up_proj or up_proj, and down_proj [E, ...])")
    hint = (f" (its config declares {declared}, but no module holds per-expert weight matrices)" if declared else "")
    return (f"{name} is not a supported MoE model{hint}: no experts module with stacked per-expert tensors "
            "(gate_up_proj or up_proj, and down_proj [E, ...]; or w1, v1, w2 [E·I, H])")


# ---- the watched forward ----------------------------------------------------------------------------------
def _watched_forward(model, decoder, found, index_of) -> tuple[list[_Call], dict[int, _Call]]:
    """One forward over PROBE_IDS with every module of the MoE decoder layers logged in call order; experts in
    the indexed convention return zeros (their output does not matter here), others run for real."""
    calls, open_calls, experts_calls, handles = [], {}, {}, []
    watched = {index_of[id(m)] for m, _ in found}
    experts_ids = {id(m) for m, _ in found}

    def pre(module, args, kwargs):
        call = _Call(module, len(calls), args, kwargs)
        calls.append(call)
        open_calls.setdefault(id(module), []).append(call)

    def post(module, args, kwargs, output):
        call = open_calls[id(module)].pop()
        call.output, call.done = output, True

    for i in sorted(watched):
        for m in decoder[i].modules():
            if id(m) in experts_ids:
                continue
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    previous = {id(m): m.__dict__.get("forward") for m, _ in found}  # an installed engine's seam comes back
    for experts, layout in found:
        experts.forward = _recording_forward(experts, layout, calls, experts_calls)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if _device(model).type == "meta":
                _run_blocks_alone(decoder, found)
            else:
                ids = torch.tensor(PROBE_IDS, device=_device(model)) % _vocab_size(model)
                mask = torch.ones_like(ids)
                mask[0, 0] = 0
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    except Exception as exc:  # the model's own failure, reported with what prescope was doing
        what = ("running its MoE blocks alone on the meta device (sizes, no values) failed" if
                _device(model).type == "meta" else "a short forward over token ids failed")
        raise UnsupportedModelError(f"{type(model).__name__}: {what} while learning its MoE layers: "
                                    f"{type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for experts, _ in found:
            if previous[id(experts)] is None:
                del experts.forward
            else:
                experts.forward = previous[id(experts)]
    return calls, experts_calls


def _run_blocks_alone(decoder: nn.ModuleList, found) -> None:
    """A meta-device model has sizes but no values, so its forward stops at the first value it reads (the
    padding mask); each MoE block runs alone on meta hidden states instead. What sits beside a block in its
    decoder layer (shared experts there, a router the decoder layer calls) is then not seen."""
    for experts, layout in found:
        block = next(m for layer in decoder for m in layer.modules() if any(c is experts for c in m.children()))
        rows, width = len(PROBE_IDS), len(PROBE_IDS[0])
        block(torch.zeros(rows, width, layout.hidden_size, device="meta"))


def _recording_forward(experts, layout, calls, experts_calls):
    original = type(experts).forward

    def forward(*args, **kwargs):
        first = id(experts) not in experts_calls
        call = _Call(experts, len(calls), args, kwargs)
        if first:
            experts_calls[id(experts)] = call
            calls.append(call)
        indexed = indexed_args(args, kwargs, layout.hidden_size)
        call.output = torch.zeros_like(indexed[0]) if indexed else original(experts, *args, **kwargs)
        call.done = True
        return call.output

    return forward


def _vocab_size(model: nn.Module) -> int:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(getattr(embeddings, "num_embeddings", 0) or max(max(row) for row in PROBE_IDS) + 1)


def _device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


# ---- one layer ----------------------------------------------------------------------------------------------
def _learn_layer(name, decoder_layer, layer, experts, layout, call, calls) -> Probed:
    where = f"{name}: layer {layer} ({type(experts).__name__})"
    inside = {id(m) for m in experts.modules()}
    ancestors = {id(m) for m in decoder_layer.modules() if any(id(s) in inside for s in m.modules())}
    in_layer = {id(m) for m in decoder_layer.modules()}
    before = [c for c in calls if c.order < call.order and c.done and id(c.module) in in_layer
              and id(c.module) not in inside and id(c.module) not in ancestors]
    block = _parent(decoder_layer, experts)
    num_experts, hidden_size = layout.num_experts, layout.hidden_size
    indexed = indexed_args(call.args, call.kwargs, hidden_size)
    if indexed is not None:
        _, index, weights = indexed
        convention, top_k, tokens = "indexed", int(index.shape[-1]), index.numel() // index.shape[-1]
        router = (_outermost(before, lambda t: _same(t, index))
                  or _outermost(before, lambda t: _is_logits(t, tokens, num_experts)))
    else:
        convention, index, weights = "scaled", None, None
        router, top_k, tokens = _scaled_router(where, call, before, block, layout, calls)
    _check_computed_experts(where, layout)
    check_math(where, experts, layout, convention)
    outputs = Outputs()
    if router is None:
        router_call, unroutable = None, f"{where}: no module's output holds its routing (indices or logits [N, E])"
    else:
        entry = next(c for c in before if c.module is router)
        outputs = _outputs(entry, layout, index, weights, tokens, convention)
        router_call, unroutable = _recipe(where, entry, (block, decoder_layer), hidden_size)
        if outputs.index_at is not None and outputs.weights_at is None:
            router_call, unroutable = None, f"{where}: its router returns the indices but not the experts' weights"
    replay_at, replay_dims = _replay_place(calls, block, hidden_size) if block is not decoder_layer else (None, 0)
    if router_call is not None and outputs.index_at is None and convention == "indexed" and replay_at is None:
        router_call, unroutable = None, (f"{where}: its block takes the top-k of the router's logits in a forward "
                                         "that needs more than the hidden states")
    shared = _shared(decoder_layer, experts, router, calls, hidden_size)
    return Probed(where, layer, block, experts, layout, convention, _backend(experts), top_k, router, outputs,
                  router_call, replay_at, replay_dims, unroutable, shared)


def _scaled_router(where, call, before, block, layout, calls):
    """Llama 4's convention: experts(x.repeat(E, 1) * S.T.reshape(-1, 1)); returns (router, K, N)."""
    tensors = [t for t in (*call.args, *call.kwargs.values()) if isinstance(t, torch.Tensor)]
    num_experts, hidden_size = layout.num_experts, layout.hidden_size
    if len(tensors) != 1 or tensors[0].dim() != 2 or tensors[0].shape[0] % num_experts:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                  for t in (*call.args, *call.kwargs.values())]
        raise _Unrouted(f"{where}: its experts are called with {shapes}, neither (hidden, top_k_index, "
                                    f"top_k_weights) nor one router-scaled input [E·N, H={hidden_size}]")
    scaled = tensors[0]
    if scaled.is_meta:
        raise UnsupportedModelError(f"{where}: its experts run on router-scaled inputs, which a meta-device model "
                                    "(sizes, no values) cannot show; describe a model with weights")
    tokens = scaled.shape[0] // num_experts
    block_call = next((c for c in calls if c.module is block), None)
    x = _first_hidden(block_call, hidden_size) if block_call is not None else None
    for c in before:
        for t in _flat(c.output):
            if x is not None and _is_logits(t, tokens, num_experts):
                rebuilt = x[1].reshape(-1, hidden_size).repeat(num_experts, 1) * t.T.reshape(-1, 1)
                if torch.equal(rebuilt, scaled):
                    router = _outermost(before, lambda u, t=t: _same(u, t))
                    return router, int(torch.count_nonzero(t, dim=-1).max()), tokens
    raise UnsupportedModelError(f"{where}: its experts get one input [E·N, H] that is not the block's input scaled "
                                "by a router score [N, E]; prescope cannot tell which experts each token uses")


def _check_computed_experts(where: str, layout: ExpertsLayout) -> None:
    """LongCat-Flash routes to zero-computation (identity) experts past the E that have down projections."""
    if layout.routable > layout.num_experts:
        raise UnsupportedModelError(f"{where}: it routes among {layout.routable} experts but only "
                                    f"{layout.num_experts} have down projections; zero-computation (identity) "
                                    "experts are not supported")


def _recipe(where: str, entry: _Call, owners, hidden_size: int) -> tuple[RouterCall | None, str]:
    """(RouterCall, "") when the router can be called again on hidden states alone, else (None, reason)."""
    router = entry.module
    hidden_at, hidden, constants, held = None, None, [], []
    for at, value in _places(entry.args, entry.kwargs):
        if hidden_at is None and isinstance(value, torch.Tensor) and value.is_floating_point() \
                and value.shape[-1] == hidden_size:
            hidden_at, hidden = at, value
        elif value is None or isinstance(value, (bool, int, float, str)):
            constants.append((at, value))
        elif isinstance(value, torch.Tensor) and (named := _held_by(owners, value)) is not None:
            held.append((at, *named))
        else:
            what = f"a tensor {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            return None, (f"{where}: its router {type(router).__name__} also takes {what} (argument {at!r}) that "
                          "the forward computes, not a weight or buffer of its block: it cannot be applied to "
                          "hidden states alone")
    if hidden_at is None:
        return None, f"{where}: its router {type(router).__name__} takes no hidden states [.., H={hidden_size}]"
    return RouterCall(router, hidden_at, hidden.dtype, min(hidden.dim(), 3), tuple(constants), tuple(held)), ""


def _outputs(entry: _Call, layout: ExpertsLayout, index, weights, tokens: int, convention: str) -> Outputs:
    out = _flat(entry.output)
    index_at = next((i for i, t in enumerate(out) if index is not None and _same(t, index)), None)
    weights_at = next((i for i, t in enumerate(out) if weights is not None and _same(t, weights)), None)
    wide = [i for i, t in enumerate(out) if _is_logits(t, tokens, layout.num_experts)]
    scores_at = next((i for i in wide if convention == "scaled" and _nonzero_per_row(out[i]) < out[i].shape[-1]),
                     None)
    logits_at = next((i for i in wide if i != scores_at), scores_at)
    return Outputs(index_at, weights_at, logits_at, scores_at)


def _shared(decoder_layer, experts, router, calls, hidden_size) -> tuple[nn.Module, ...]:
    """Always-on feed-forwards of the MoE layer: in the block, or beside it in the decoder layer (outermost)."""
    in_layer = {id(m) for m in decoder_layer.modules()}
    skip = {id(m) for part in (experts, router) if part is not None for m in part.modules()}
    skip |= {id(m) for m in decoder_layer.modules() if any(s is experts for s in m.modules())}  # the block, the layer
    chosen, inside_chosen = [], set()
    for c in calls:
        m = c.module
        if id(m) in in_layer and id(m) not in skip and id(m) not in inside_chosen and _feed_forward(c, hidden_size):
            chosen.append(m)
            inside_chosen |= {id(s) for s in m.modules()}
    return tuple(chosen)


def _feed_forward(call: _Call, hidden_size: int) -> bool:
    """Two or more weight matrices and nothing of more dimensions, called on the hidden states alone (or with
    per-token gates) and returning their shape: not a norm, router, attention (which takes positions or a mask
    and returns a tuple) or a Mamba or convolution mixer (3-D kernels)."""
    params = list(call.module.parameters())
    if sum(p.dim() == 2 for p in params) < 2 or any(p.dim() > 2 for p in params):
        return False
    values = [v for _, v in _places(call.args, call.kwargs) if v is not None]
    hidden = [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape[-1] == hidden_size]
    others_ok = all(isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() <= 3 for v in values)
    out = call.output
    return len(hidden) == 1 and others_ok and isinstance(out, torch.Tensor) and out.shape == hidden[0].shape


# ---- small helpers --------------------------------------------------------------------------------------------
def _parent(root: nn.Module, target: nn.Module) -> nn.Module:
    for m in root.modules():
        if any(c is target for c in m.children()):
            return m
    return root


def _outermost(calls: list[_Call], match) -> nn.Module | None:
    """The first-entered module (so the outermost) whose output holds a tensor that `match`es."""
    return next((c.module for c in calls if any(match(t) for t in _flat(c.output))), None)


def _flat(output) -> list:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return list(output)
    return []


def _same(t, ref: torch.Tensor) -> bool:
    """`t` is `ref` or a view of the same data (the router's output, reshaped by the block); meta tensors have
    no data, so there only the tensor itself or a view of the same base counts."""
    if not isinstance(t, torch.Tensor) or t.numel() != ref.numel() or t.dtype != ref.dtype:
        return False
    if t.is_meta or ref.is_meta:
        return t is ref or (t._base is not None and (t._base is ref._base or t._base is ref)) or ref._base is t
    return t.data_ptr() == ref.data_ptr()


def _is_logits(t, tokens: int | None, num_experts: int) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape[-1] == num_experts \
        and (tokens is None or t.numel() == tokens * num_experts)


def _nonzero_per_row(t: torch.Tensor) -> int:
    return int(torch.count_nonzero(t.reshape(-1, t.shape[-1]), dim=-1).max())


def _places(args: tuple, kwargs: dict) -> list[tuple[int | str, Any]]:
    return [*enumerate(args), *kwargs.items()]


def _first_hidden(call: _Call, hidden_size: int):
    return next(((at, v) for at, v in _places(call.args, call.kwargs) if isinstance(v, torch.Tensor)
                 and v.is_floating_point() and v.shape[-1] == hidden_size), None)


def _replay_place(calls: list[_Call], block: nn.Module, hidden_size: int) -> tuple[int | str | None, int]:
    """Where the block takes its hidden states and their dimensions, when it takes nothing else (so it can be
    run again alone); (None, 0) otherwise."""
    call = next((c for c in calls if c.module is block), None)
    found = _first_hidden(call, hidden_size) if call is not None else None
    if found is None:
        return None, 0
    rest = [v for at, v in _places(call.args, call.kwargs) if at != found[0]]
    alone = all(v is None or isinstance(v, (bool, int, float, str)) for v in rest)
    return (found[0], min(found[1].dim(), 3)) if alone else (None, 0)


def _held_by(owners, tensor: torch.Tensor) -> tuple[nn.Module, str] | None:
    for owner in owners:
        for name, t in [*owner.named_parameters(), *owner.named_buffers()]:
            if t is tensor or _same(t, tensor):
                return owner, name
    return None


def _held(owner: nn.Module, name: str) -> torch.Tensor:
    module_path, _, attr = name.rpartition(".")
    return getattr(owner.get_submodule(module_path) if module_path else owner, attr)


def _backend(experts: nn.Module) -> bool:
    """Dispatched through transformers' experts-backend registry (`use_experts_implementation`)."""
    return hasattr(type(experts).forward, "__wrapped__") and hasattr(experts, "has_gate") \
        and hasattr(getattr(experts, "config", None), "_experts_implementation")
