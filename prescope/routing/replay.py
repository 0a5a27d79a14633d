"""Routing replay: impose recorded routing on a model inside the engine, so policies compare on equal terms.

A `RoutingReplay` holds, for every batch row and position of one `generate()` call, each MoE layer's top-k
experts and gate weights, and optionally the router input of the model it was recorded from. Installed
in an engine (`Engine.set_replay`), the engine uses it instead of the model's own routing at every MoE
layer, hands policies the step's true later routing (`LayerView.future`, which the limits `belady` and
`ceiling` need), and gives predictors the recorded router input instead of the running model's hidden
state. Two uses:

- every policy of a benchmark cell sees exactly the routing the resident run recorded (no divergence from
  numerics of CPU-placed experts), and the limits know the future;
- a model of the same topology (L, E, K) runs with another model's routing: the OLMoE-1B-7B twin, whose
  random weights route near-uniformly, driven by prescope-tiny's trained routing on held-out text, with
  the predictors trained on prescope-tiny reading prescope-tiny's hidden states.

The call must match the recording: the same batch size and prompt length (no padding), at most as many
new tokens. Step 0 is the prefill (positions 0 … P−1, rows major), decode step s ≥ 1 routes position
P + s − 1.

Letters: B rows, T positions, L MoE layers, K top-k, H hidden, N tokens of one forward call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prescope.layout import ModelLayout
from prescope.models import adapter


class ReplayError(ValueError):
    """A replay that does not fit the model or the call it is used in."""


@dataclass
class RoutingReplay:
    experts: torch.Tensor  # [B, T, L, K] int64
    weights: torch.Tensor  # [B, T, L, K] float32
    prompt_len: int
    hidden: torch.Tensor | None = None  # [B, T, L, H] router input of the recorded model
    _future: dict = field(default_factory=dict, init=False, repr=False)
    _host_experts: torch.Tensor | None = field(default=None, init=False, repr=False)  # [B, T, L, K] on the CPU

    def __post_init__(self) -> None:
        if self.experts.dim() != 4 or self.experts.shape != self.weights.shape:
            raise ReplayError(f"replay experts and weights must both be [B, T, L, K], got "
                              f"{tuple(self.experts.shape)} and {tuple(self.weights.shape)}")
        if not 1 <= self.prompt_len <= self.experts.shape[1]:
            raise ReplayError(f"prompt_len {self.prompt_len} outside the {self.experts.shape[1]} recorded positions")
        if self.hidden is not None and self.hidden.shape[:3] != self.experts.shape[:3]:
            raise ReplayError(f"replay hidden {tuple(self.hidden.shape)} does not match experts "
                              f"{tuple(self.experts.shape)} in [B, T, L]")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.experts.shape)

    def check(self, layout: ModelLayout) -> None:
        """ReplayError unless the replay has the model's MoE layers and top-k, and experts in [0, E)."""
        _, _, L, K = self.shape
        if (L, K) != (layout.num_moe_layers, layout.top_k):
            raise ReplayError(f"replay has {L} MoE layers with top-{K}, the model {layout.model_class} has "
                              f"{layout.num_moe_layers} with top-{layout.top_k}")
        if int(self.experts.max()) >= layout.num_experts or int(self.experts.min()) < 0:
            raise ReplayError(f"replay routes to experts outside [0, {layout.num_experts})")

    def to(self, device: torch.device | str) -> RoutingReplay:
        hidden = None if self.hidden is None else self.hidden.to(device)
        moved = RoutingReplay(self.experts.to(device), self.weights.to(device), self.prompt_len, hidden)
        moved._host_experts = self.host_experts
        return moved

    @property
    def host_experts(self) -> torch.Tensor:
        """The experts [B, T, L, K] in host memory (kept, so reading them never waits for the device)."""
        if self._host_experts is None:
            self._host_experts = self.experts.cpu()
        return self._host_experts

    def host_counts(self, step: int, layer: int, num_experts: int) -> list[int]:
        """Tokens per expert (E + 1 entries) of MoE layer `layer` in forward call `step`, from host memory."""
        span = self.positions(step, self.shape[0] * (self.prompt_len if step == 0 else 1))
        return torch.bincount(self.host_experts[:, span, layer].reshape(-1), minlength=num_experts + 1).tolist()

    def positions(self, step: int, num_tokens: int) -> slice:
        """The positions forward call `step` routes, checked against its token count."""
        B, T = self.shape[:2]
        span = slice(0, self.prompt_len) if step == 0 else slice(self.prompt_len + step - 1, self.prompt_len + step)
        width = span.stop - span.start
        if span.stop > T or num_tokens != B * width:
            raise ReplayError(f"forward call {step} routes {num_tokens} tokens but the replay holds {B} rows of "
                              f"{width} positions there (recorded {T} positions, prompt {self.prompt_len}): "
                              "generate with the recorded batch size, prompt length and at most as many tokens")
        return span

    def at(self, step: int, layer: int, num_tokens: int):
        """(indices [N, K], weights [N, K], router input [N, H] or None) of MoE layer `layer` in call `step`."""
        span = self.positions(step, num_tokens)
        K = self.shape[3]
        indices = self.experts[:, span, layer].reshape(-1, K)  # [N, K]
        weights = self.weights[:, span, layer].reshape(-1, K)  # [N, K]
        hidden = None if self.hidden is None else self.hidden[:, span, layer].reshape(num_tokens, -1)  # [N, H]
        return indices, weights, hidden

    def hidden_at(self, step: int, layer: int, num_tokens: int) -> torch.Tensor | None:
        """The recorded router input [N, H] of MoE layer `layer` in call `step`, or None if none was kept."""
        if self.hidden is None:
            return None
        return self.hidden[:, self.positions(step, num_tokens), layer].reshape(num_tokens, -1)

    def future(self, step: int, layer: int, num_tokens: int) -> tuple[tuple[int, ...], ...]:
        """The experts each later MoE layer routes in call `step` (most tokens first), for the limits."""
        if step not in self._future:
            span = self.positions(step, num_tokens)
            rows = self.experts[:, span].reshape(-1, self.shape[2], self.shape[3]).transpose(0, 1)  # [L, N, K]
            per_layer = []
            for chosen in rows.cpu():
                counts = torch.bincount(chosen.reshape(-1))
                order = sorted((int(e) for e in torch.nonzero(counts).flatten()), key=lambda e: (-int(counts[e]), e))
                per_layer.append(tuple(order))
            self._future = {step: tuple(per_layer)}
        return self._future[step][layer + 1:]


def replayed_weights(own_index: torch.Tensor, own_weights: torch.Tensor, index: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """[N, K] the gate weights a replayed layer applies: the running model's own where its router chose exactly
    the replayed experts in the same order, the recorded ones elsewhere.

    Replaying a model's own routing used to move its logits (1.2e-3 was reported against stock under every
    policy): the recording is a separate run (transformers' `generate`, its cache and kernels), whose hidden
    states differ from the engine's by rounding, so its recorded weights, applied to the engine's hidden states,
    mixed two numerical paths. Where the experts agree the model's own weights are the same routing without that
    rounding; a fixed sequence of kernels, so a captured decode step keeps it."""
    same = (own_index.to(index.dtype) == index).all(-1, keepdim=True)  # [N, 1]
    return torch.where(same, own_weights, weights.to(own_weights.dtype))  # [N, K]


def record_replay(model: torch.nn.Module, generate: Callable[[], object], with_hidden: bool = False) -> RoutingReplay:
    """Run `generate()` (one generate call of a fixed-length, unpadded batch) and keep its routing."""
    calls: list[list] = []

    def keep(ordinal, hidden, logits, weights, indices):
        if ordinal == 0:
            calls.append([])
        calls[-1].append((indices.detach(), weights.detach().float(), hidden.detach() if with_hidden else None))

    with adapter.observe_routing(model, keep):
        generate()
    if not calls:
        raise ReplayError("the generate call routed nothing: is this a MoE model?")
    B = calls[-1][0][0].shape[0]  # a decode call routes one token per row
    prompt_len = calls[0][0][0].shape[0] // B

    def stack(part: int) -> torch.Tensor:
        per_call = [torch.stack([layer[part] for layer in call], dim=1) for call in calls]  # [N, L, ...]
        return torch.cat([c.reshape(B, -1, *c.shape[1:]) for c in per_call], dim=1)  # [B, T, L, ...]

    return RoutingReplay(stack(0).long(), stack(1), prompt_len, stack(2) if with_hidden else None)
