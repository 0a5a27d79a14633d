"""Expert weight layouts: where an experts module keeps its E experts' tensors, and one expert's math.

Part of the adapter (with `adapter` and `probe`, the only modules that know transformers internals).
Two layouts are known, recognised by the parameters an experts module holds, never by its class:

- fused (transformers v5's experts contract): 3-D tensors `gate_up_proj [E, 2I, H]` (or `up_proj [E, I, H]`
  for ungated experts) and `down_proj [E, H, I]`, or their transposes `[E, H, 2I]`, `[E, I, H]`, with
  optional biases `[E, out]`. The projection's orientation is the module's `is_transposed` flag where
  transformers set it, else read from the shapes (Llama 4 keeps `x @ W` weights and no flag).
  Zero-computation experts (LongCat-Flash) are indices at or past `down_proj`'s E: they have no weights.
- split (DBRX): 2-D tensors `w1`, `v1`, `w2`, each `[E·I, H]`, held by a child of the experts module; one
  expert is `act(x w1ᵀ) · (x v1ᵀ) @ w2` over its I rows. They are viewed as `[E, I, H]`, without a copy.

Letters: E experts, I expert width, H hidden, N tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prescope.layout import UnsupportedModelError

FUSED_UP = ("gate_up_proj", "up_proj")
FUSED_DOWN = "down_proj"
SPLIT = ("w1", "v1", "w2")  # gate, up, down
ACTIVATIONS = ("act_fn", "activation_fn")


@dataclass(frozen=True)
class ExpertsLayout:
    """Where one experts module keeps its stacked expert tensors."""

    math: str  # "fused" or "split"
    num_experts: int  # E: experts with weights
    hidden_size: int  # H
    intermediate_size: int  # I
    names: tuple[str, ...]  # dotted names, under the experts module, of tensors stacked over experts
    rows: int = 0  # split layout: rows per expert in the 2-D [E·I, H] tensors (I); 0 for 3-D tensors
    routable: int = 0  # experts the router may pick: E, or more where some have no weights (identity experts)

    def __post_init__(self) -> None:
        object.__setattr__(self, "routable", max(self.routable, self.num_experts))


def find_layout(module: nn.Module, num_experts: int | None = None) -> ExpertsLayout | None:
    """The layout of `module` when it is an experts module, else None. `num_experts` (E) is needed only for
    the split layout, whose 2-D tensors do not show E; without it a module's `num_experts` attribute is used."""
    return _fused(module) or _split(module, num_experts)


def _fused(module: nn.Module) -> ExpertsLayout | None:
    own = dict(module.named_parameters(recurse=False))
    up = next((n for n in FUSED_UP if n in own and own[n].dim() == 3), None)
    down = own.get(FUSED_DOWN)
    if up is None or down is None or down.dim() != 3:
        return None
    num_experts = int(down.shape[0])
    if own[up].shape[0] < num_experts:
        return None
    names = tuple(n for n in (up, f"{up}_bias", FUSED_DOWN, f"{FUSED_DOWN}_bias")
                  if n in own and own[n].dim() >= 2 and own[n].shape[0] >= num_experts)
    hidden, inner = _fused_dims(module, own[up], down)
    return ExpertsLayout("fused", num_experts, hidden, inner, names, routable=int(own[up].shape[0]))


def _fused_dims(module: nn.Module, up: torch.Tensor, down: torch.Tensor) -> tuple[int, int]:
    """(H, I): down is [E, H, I] or, transposed, [E, I, H]."""
    return (int(down.shape[2]), int(down.shape[1])) if _transposed(module, up, down) else \
        (int(down.shape[1]), int(down.shape[2]))


def is_transposed(experts: nn.Module) -> bool:
    """Whether a fused experts module keeps its weights for `x @ W` (see `_transposed`)."""
    up = next(getattr(experts, n) for n in FUSED_UP if isinstance(getattr(experts, n, None), torch.Tensor))
    return _transposed(experts, up, experts.down_proj)


def _transposed(module: nn.Module, up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether the weights are kept for `x @ W`: the flag transformers set, else the shapes (Llama 4 has none):
    untransposed, up [E, ·, H] and down [E, H, ·] share H; where shapes cannot tell, transformers' default."""
    flag = getattr(module, "is_transposed", None)
    return bool(flag) if flag is not None else up.shape[2] != down.shape[1]


def _split(module: nn.Module, num_experts: int | None) -> ExpertsLayout | None:
    num_experts = num_experts or getattr(module, "num_experts", None)
    if not isinstance(num_experts, int) or num_experts < 2:
        return None
    for prefix, child in module.named_children():
        own = dict(child.named_parameters(recurse=False))
        tensors = [own.get(n) for n in SPLIT]
        if any(t is None or t.dim() != 2 for t in tensors) or len({tuple(t.shape) for t in tensors}) != 1:
            continue
        rows, hidden = tensors[0].shape
        if rows % num_experts == 0:
            return ExpertsLayout("split", num_experts, int(hidden), rows // num_experts,
                                 tuple(f"{prefix}.{n}" for n in SPLIT), rows // num_experts)
    return None


def stacked_tensors(experts: nn.Module, layout: ExpertsLayout) -> dict[str, nn.Parameter]:
    """The stacked parameters themselves (setting their `.data` moves the experts' weights)."""
    params = dict(experts.named_parameters())
    return {name: params[name] for name in layout.names}


def per_expert(layout: ExpertsLayout, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with E in front: itself for 3-D tensors, a view [E, I, H] for the split layout's rows."""
    return tensor.view(layout.num_experts, layout.rows, -1) if layout.rows else tensor


def expert_forward(experts: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """One expert on `x [N, H]` with its own tensors `params`: the unweighted output [N, H]."""
    if any(n.rsplit(".", 1)[-1] == SPLIT[0] for n in params):
        return _split_forward(experts, x, params)
    return _fused_forward(experts, x, params)


def _fused_forward(experts: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mirrors transformers' own per-expert loop: up projection, the module's gating, down projection."""
    up = "gate_up_proj" if "gate_up_proj" in params else "up_proj"
    transposed = is_transposed(experts)

    def project(inp: torch.Tensor, name: str) -> torch.Tensor:
        out = inp @ params[name] if transposed else nn.functional.linear(inp, params[name])
        bias = params.get(f"{name}_bias")
        return out if bias is None else out + bias

    h = activate(experts, project(x, up), up)  # [N, I]
    return project(h, FUSED_DOWN)  # [N, H]


def activate(experts: nn.Module, h: torch.Tensor, up: str) -> torch.Tensor:
    """Between a fused module's projections: its own gating of `h [.., 2I]` (the class's `_apply_gate`; act(gate)
    times up, gate first, for a module outside the backend registry such as Llama 4's), or the activation of an
    ungated `up_proj` output [.., I]."""
    if up == "up_proj" or not getattr(experts, "has_gate", True):
        return experts.act_fn(h)
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(h)
    gate, upper = h.chunk(2, dim=-1)
    return experts.act_fn(gate) * upper


def _split_forward(experts: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    names = {n.rsplit(".", 1)[-1]: n for n in params}
    owner = experts.get_submodule(names["w1"].rsplit(".", 1)[0]) if "." in names["w1"] else experts
    act = next(getattr(owner, a) for a in ACTIVATIONS if hasattr(owner, a))
    gate = x @ params[names["w1"]].T  # [N, I]
    up = x @ params[names["v1"]].T  # [N, I]
    return (act(gate) * up) @ params[names["w2"]]  # [N, H]


def check_math(where: str, experts: nn.Module, layout: ExpertsLayout, convention: str) -> None:
    """The adapter computes one expert at a time (`expert_forward`): on two tokens, each routed to one
    expert with weight 1, that must give what the experts module itself computes, else the layer is refused
    rather than offloaded wrongly."""
    weight = next(iter(experts.parameters()))
    if weight.is_meta:
        return
    num_experts, size = layout.num_experts, layout.hidden_size
    x = torch.randn(2, size, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)  # [2, H]
    chosen = torch.tensor([0, num_experts - 1], device=weight.device)  # [2]
    original = type(experts).forward
    try:
        with torch.no_grad():
            if convention == "indexed":
                ones = torch.ones(2, 1, device=weight.device, dtype=weight.dtype)
                stock = original(experts, x, chosen.unsqueeze(1), ones).reshape(2, size)
            else:
                scores = nn.functional.one_hot(chosen, num_experts).to(weight.dtype)  # [2, E]
                stock = original(experts, x.repeat(num_experts, 1) * scores.T.reshape(-1, 1))
                stock = stock.reshape(num_experts, 2, size).sum(0)
            mine = torch.cat([expert_forward(experts, x[n:n + 1], {name: per_expert(layout, t)[int(chosen[n])]
                                                                   for name, t in stacked_tensors(experts, layout).items()})
                              for n in range(2)])
    except Exception as exc:  # the family's own code or an unknown layout, reported with the layer
        raise UnsupportedModelError(f"{where}: computing one expert failed ({type(exc).__name__}: {exc})") from exc
    tolerance = 1e-4 if weight.dtype == torch.float32 else 2e-2
    if not torch.allclose(mine.float(), stock.float(), rtol=tolerance, atol=tolerance):
        raise UnsupportedModelError(f"{where}: its experts compute something prescope's one-expert math "
                                    f"(gated up projection, activation, down projection) does not reproduce "
                                    f"(largest difference {float((mine - stock).abs().max()):.2e})")


def indexed_args(args: tuple, kwargs: dict, hidden_size: int):
    """(hidden, top_k_index, top_k_weights) of an experts call in the indexed convention, else None."""
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    index = [t for t in tensors if not t.is_floating_point() and t.dim() >= 2]
    hidden = [t for t in tensors if t.is_floating_point() and t.shape[-1] == hidden_size]
    if len(index) != 1 or not hidden:
        return None
    weights = [t for t in tensors if t.is_floating_point() and t is not hidden[0] and t.shape == index[0].shape]
    return (hidden[0], index[0], weights[0]) if weights else None
