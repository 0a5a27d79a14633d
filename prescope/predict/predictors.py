"""Expert predictors behind one interface: seen from MoE layer l, which experts will layer l+d route?

Policies and the planner ask a `Predictor` for `predict(layer, distance, hidden=, history=) -> [N, E]`
scores for the N tokens of the running step (probability-like; higher = more likely in the top-K of layer
`layer + distance`) and turn scores into expected tokens per expert with `expected_tokens`. The baselines
here (DESIGN.md §4.3), each naming what it imitates:

- `GateLookahead` (Pre-gated MoE, AdapMoE, HybriMoE): the router of layer l+d applied to the hidden state
  entering layer l. Routers come from the live model (`from_model`) or are fitted by least squares to the
  trace's hidden states and router logits (`fit`) where the model is not at hand.
- `PreviousToken`: the previous token of the same sequence chose these experts at the target layer.
- `Popularity`: per-layer selection frequency in the training trace.
- `ActivationMatrix` (MoE-Infinity): the per-prompt expert activation matrices (EAMs) of the training
  trace; the current sequence's partial EAM is matched by cosine similarity, the best matches' rows of the
  target layer are averaged (weighted by similarity) and decayed with the distance.
- `Oracle`: the true routing (the limit).

`History` carries the routing seen so far; `TraceHistory` cuts it from a trace for any tokens and layer.
History-only predictors need no hidden states, so they run on imported llama.cpp traces too.

Letters: L MoE layers, E experts, K top-k, N tokens, H hidden, P prompts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prescope.layout import ModelLayout
from prescope.models.adapter import MoELayer, describe, linear_router, moe_layers, route
from prescope.routing.trace import MISSING, Trace


class PredictorError(ValueError):
    """A predictor was asked for something it cannot answer; the message says what it needs."""


class DistanceError(PredictorError):
    """A (layer, distance) pair that reaches past the last MoE layer or outside what was trained."""


def check_target(layer: int, distance: int, num_layers: int, max_distance: int | None = None) -> int:
    """The target layer `layer + distance`, or a DistanceError naming the valid range."""
    if not 0 <= layer < num_layers:
        raise DistanceError(f"layer {layer} is not a MoE layer ordinal 0..{num_layers - 1}")
    if distance < 0:
        raise DistanceError(f"distance must be >= 0, got {distance}")
    if max_distance is not None and distance > max_distance:
        raise DistanceError(f"distance {distance} exceeds the {max_distance} layers this predictor was trained for")
    if layer + distance >= num_layers:
        raise DistanceError(f"distance {distance} from layer {layer} reaches layer {layer + distance}, "
                            f"beyond the last MoE layer {num_layers - 1}")
    return layer + distance


def inclusion_probs(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """[..., E] probabilities that each expert is in a token's top-k, from non-negative scores [..., E].

    p_e = min(1, λ·s_e) with the per-row λ ≥ 0 chosen so that Σ_e p_e = k (capped water-filling). Closed form,
    with s_(0) ≥ s_(1) ≥ ... the sorted scores and S_c = Σ_{i≥c} s_(i): the number of capped experts is the
    smallest c in 0..k-1 with s_(c)·(k−c) ≤ S_c, and λ = (k−c)/S_c. A row of zeros gets k/E; a row with fewer
    than k positive scores gets 1 at each of them. A fixed sequence of kernels with no host sync, so it can sit
    in a CUDA graph; reductions run over the last dim only. k: an int in 1..E, or a 0-d tensor holding one on the
    scores' device (not checked: no host read), so that no shape depends on k and one graph serves every k.
    """
    s = scores.float().clamp_min(0)  # [..., E]
    E = s.shape[-1]
    if not isinstance(k, torch.Tensor) and not 0 < k <= E:
        raise PredictorError(f"k must be in 1..{E}, got {k}")
    s = torch.where(s.sum(-1, keepdim=True) > 0, s, 1.0)
    ascending = s.sort(-1).values  # [..., E]
    # Summing from the smallest score up gives S_c with exact zeros past the last positive score and S_c ≥ s_(c) in
    # floating point. Ascending slot j holds s_(c) with c = E-1-j, so k-c = j+1-(E-k): positive at the k largest
    # slots only (the candidates), and the slot of c = k-1 always qualifies.
    suffix = ascending.cumsum(-1)  # [..., E]
    room = torch.arange(1 - E, 1, dtype=s.dtype, device=s.device) + k  # [E] k-c, <= 0 below the k largest
    # The smallest qualifying c is the qualifying slot with the most room.
    room, slot = torch.where((room > 0) & (ascending * room <= suffix), room, 0).max(-1, keepdim=True)  # [..., 1]
    lam = room / suffix.gather(-1, slot).clamp_min(1e-30)  # [..., 1]; the guard keeps λ finite when S_c = 0
    return (lam * s).clamp(0, 1)


def expected_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[E] expected tokens per expert in a batch: sum over tokens of P(expert in the token's top-k)."""
    return inclusion_probs(scores, k).sum(0)


def multi_hot(experts: torch.Tensor, num_experts: int, values: torch.Tensor | None = None) -> torch.Tensor:
    """[N, E] with `values` (default 1) at each row's experts [N, K]; MISSING entries are left out."""
    keep = experts != MISSING  # [N, K]
    out = torch.zeros(experts.shape[0], num_experts, dtype=torch.float32, device=experts.device)
    src = torch.ones_like(experts, dtype=torch.float32) if values is None else values.float()
    return out.scatter_add_(1, experts.clamp_min(0), src * keep)


@dataclass(frozen=True, eq=False)
class History:
    """Routing seen so far by the N tokens of one step, when layer `layer` has just been routed.

    current: this token's experts, valid at layers <= the running layer (MISSING after).
    previous: the previous token of each sequence, all layers (MISSING rows where there is none).
    sequence: selections per (layer, expert) by all earlier tokens of each sequence.
    truth: the true routing of all layers, for the oracle only.
    """

    current: torch.Tensor  # [N, L, K] int64
    previous: torch.Tensor | None = None  # [N, L, K] int64
    sequence: torch.Tensor | None = None  # [N, L, E] float32
    truth: torch.Tensor | None = None  # [N, L, K] int64

    def __post_init__(self) -> None:
        if self.current.dim() != 3:
            raise PredictorError(f"history.current must be [N, L, K], got shape {tuple(self.current.shape)}")
        N = self.current.shape[0]
        for name in ("previous", "sequence", "truth"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 3 or value.shape[0] != N):
                raise PredictorError(f"history.{name} must be [N={N}, L, ...], got shape {tuple(value.shape)}")


class TraceHistory:
    """Every token's history in a trace, precomputed once: previous token and earlier-token selections."""

    def __init__(self, trace: Trace):
        tok = trace.tokens
        T, L, E = trace.num_tokens, trace.layout.num_moe_layers, trace.layout.num_experts
        order = np.lexsort((tok["position"].to_numpy(), tok["prompt"].to_numpy()))
        prompt = tok["prompt"].to_numpy()[order]
        position = tok["position"].to_numpy()[order]
        starts = np.r_[True, prompt[1:] != prompt[:-1]]  # [T] first token of its prompt
        prev = np.full(T, -1, dtype=np.int64)
        follows = ~starts & (np.diff(position, prepend=-2) == 1)
        prev[order[follows]] = order[np.flatnonzero(follows) - 1]
        self.experts = torch.from_numpy(trace.experts)  # [T, L, K]
        self.prev = torch.from_numpy(prev)  # [T]
        hot = torch.zeros(T, L, E)
        hot.scatter_add_(2, self.experts.clamp_min(0), (self.experts != MISSING).float())  # [T, L, E]
        hot = hot[torch.from_numpy(order)]
        cum = hot.cumsum(0) - hot  # [T, L, E] selections by earlier tokens in sorted order
        group = np.maximum.accumulate(np.where(starts, np.arange(T), 0))  # index of each prompt's first token
        cum -= cum[torch.from_numpy(group)]
        self.sequence = torch.empty_like(cum)
        self.sequence[torch.from_numpy(order)] = cum

    def at(self, index, layer: int, with_truth: bool = False) -> History:
        """History of the trace tokens `index` [N] after layer `layer` was routed."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        experts = self.experts[idx]  # [N, L, K]
        current = experts.clone()
        current[:, layer + 1:] = MISSING
        p = self.prev[idx]  # [N]
        previous = self.experts[p.clamp_min(0)].clone()  # [N, L, K]
        previous[p < 0] = MISSING
        return History(current, previous, self.sequence[idx], experts if with_truth else None)


class LinearRouters:
    """Linear routers of every MoE layer, logits = x Wᵀ + b, copied from a model or fitted to a trace."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight.float()  # [L, E, H]
        self.bias = None if bias is None else bias.float()  # [L, E]

    @classmethod
    def from_model(cls, model: nn.Module) -> LinearRouters:
        """The routers' weights, where each layer's router logits are a linear map of its hidden states
        (adapter.linear_router says why not otherwise: then fit them to a trace)."""
        pairs = [linear_router(lay) for lay in moe_layers(model)]
        bias = [b for _, b in pairs]
        return cls(torch.stack([w.detach().float().cpu() for w, _ in pairs]),
                   None if any(b is None for b in bias) else torch.stack([b.detach().float().cpu() for b in bias]))

    @classmethod
    def fit(cls, trace: Trace, max_tokens: int = 65536) -> LinearRouters:
        """Least squares [x, 1] → logits per layer on up to `max_tokens` tokens (needs hidden and logits)."""
        if trace.hidden is None or trace.logits is None:
            raise PredictorError("fitting routers needs a trace with hidden states and router logits "
                                 "(record_trace(..., keep_hidden=True, keep_logits=True)); or use from_model(model)")
        take = np.linspace(0, trace.num_tokens - 1, min(max_tokens, trace.num_tokens)).astype(np.int64)
        weights, biases = [], []
        for o in range(trace.layout.num_moe_layers):
            x = torch.from_numpy(trace.hidden[take, o]).double()  # [T', H]
            x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # [T', H+1]
            y = torch.from_numpy(trace.logits[take, o]).double()  # [T', E]
            sol = torch.linalg.lstsq(x1, y).solution  # [H+1, E]
            weights.append(sol[:-1].T)
            biases.append(sol[-1])
        return cls(torch.stack(weights), torch.stack(biases))

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """[N, E] logits of router `layer` on `hidden` [N, H]."""
        w = self.weight[layer].to(hidden.device)  # [E, H]
        out = hidden.float() @ w.T  # [N, E]
        return out if self.bias is None else out + self.bias[layer].to(hidden.device)

    def state(self) -> dict:
        return {"weight": self.weight, "bias": self.bias}


class Predictor(ABC):
    """Scores [N, E] for the experts of layer `layer + distance`, seen from MoE layer `layer`.

    What a policy may read of a predictor is declared here: `name`; `layout`, the model it was built for
    (None: any); `needs_hidden`, whether `predict` reads the router input of layer `layer`; `uses_routing`,
    whether it reads this step's routing at layers <= `layer` (`History.current`), exact only for one
    token; `min_distance` and `max_distance`, the distances it answers (None: up to the last layer);
    `device`, where its parameters live and its inputs must be (None: wherever they are given).
    """

    name: str = ""
    imitates: str = ""
    needs_hidden: bool = False
    uses_routing: bool = False
    min_distance: int = 0
    max_distance: int | None = None  # None: up to the last layer
    layout: ModelLayout | None = None
    device: str | None = None

    def fit(self, trace: Trace) -> Predictor:
        """Learn from a training trace (no-op for training-free predictors); returns self."""
        self.layout = trace.layout
        return self

    @abstractmethod
    def predict(self, layer: int, distance: int, *, hidden: torch.Tensor | None = None,
                history: History | None = None) -> torch.Tensor: ...

    def predict_window(self, layer: int, distances: Sequence[int], *, hidden: torch.Tensor | None = None,
                       history: History | None = None) -> dict[int, torch.Tensor]:
        """Scores for several distances from one layer (learned predictors do this in one call)."""
        return {d: self.predict(layer, d, hidden=hidden, history=history) for d in distances}

    @staticmethod
    def expected_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
        return expected_tokens(scores, k)

    def check_model(self, model_or_layout) -> None:
        """LayoutMismatchError unless the model routes like the trace this predictor was fitted on."""
        layout = model_or_layout if isinstance(model_or_layout, ModelLayout) else describe(model_or_layout)
        layout.check_compatible(self._layout(), f"{self.name} predictor's training trace")

    def _layout(self) -> ModelLayout:
        if self.layout is None:
            raise PredictorError(f"{self.name}: call fit(trace) first (no model layout known)")
        return self.layout

    def _target(self, layer: int, distance: int) -> int:
        return check_target(layer, distance, self._layout().num_moe_layers)

    def _needs(self, what: str, value, hint: str):
        if value is None:
            raise PredictorError(f"{self.name} needs `{what}`: {hint}")
        return value


class GateLookahead(Predictor):
    name = "gate_lookahead"
    imitates = "Pre-gated MoE, AdapMoE, HybriMoE (training-free lookahead routing)"
    needs_hidden = True

    def __init__(self, routers: Sequence[MoELayer] | LinearRouters | None = None, layout: ModelLayout | None = None):
        self.routers, self.layout = routers, layout

    @classmethod
    def from_model(cls, model: nn.Module) -> GateLookahead:
        """The model's own routers, each applied the way its block applies it (adapter.route)."""
        return cls(moe_layers(model), describe(model))

    def fit(self, trace: Trace) -> GateLookahead:
        if self.routers is None:
            self.routers = LinearRouters.fit(trace)
            self.layout = trace.layout
        elif self.layout is not None:
            self.layout.check_compatible(trace.layout, "trace")
        return self

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """[N, E] router `layer` on `hidden`; a router without logits gives its top-k weights scattered."""
        if self.routers is None:
            raise PredictorError("gate_lookahead has no routers: build it with from_model(model) or fit(trace)")
        if isinstance(self.routers, LinearRouters):
            return self.routers.logits(layer, hidden)
        moe_layer = self.routers[layer]
        with torch.no_grad():
            out = route(moe_layer, hidden)
        if out.logits is not None:
            return out.logits.float().to(hidden.device)
        return multi_hot(out.indices, moe_layer.num_experts, out.weights).log().to(hidden.device)

    def predict(self, layer, distance, *, hidden=None, history=None):
        target = self._target(layer, distance)
        x = self._needs("hidden", hidden, "the router input [N, H] at `layer`")
        return torch.softmax(self.logits(target, x), dim=-1)  # [N, E]


class PreviousToken(Predictor):
    name = "previous_token"
    imitates = "temporal reuse (what an LRU cache exploits)"

    def __init__(self, layout: ModelLayout | None = None):
        self.layout = layout

    def predict(self, layer, distance, *, hidden=None, history=None):
        target = self._target(layer, distance)
        h = self._needs("history", history, "History with `previous` (the previous token's experts)")
        prev = self._needs("history.previous", h.previous, "the previous token's experts [N, L, K]")[:, target]
        E, K = self.layout.num_experts, self.layout.top_k
        scores = multi_hot(prev, E)  # [N, E]
        none = (prev == MISSING).all(-1)  # [N] first tokens: nothing to reuse
        scores[none] = K / E
        return scores


class Popularity(Predictor):
    name = "popularity"
    imitates = "static hot-expert placement (Fiddler, llama.cpp --n-cpu-moe)"

    def fit(self, trace: Trace) -> Popularity:
        super().fit(trace)
        exp = torch.from_numpy(trace.experts)  # [T, L, K]
        L, E = trace.layout.num_moe_layers, trace.layout.num_experts
        counts = torch.stack([multi_hot(exp[:, o], E).sum(0) for o in range(L)])  # [L, E]
        routed = torch.from_numpy(trace.present.sum(0)).clamp_min(1).float()  # [L]
        self.freq = counts / routed[:, None]  # [L, E] share of tokens choosing each expert
        return self

    def predict(self, layer, distance, *, hidden=None, history=None):
        target = self._target(layer, distance)
        n = history.current.shape[0] if history is not None else hidden.shape[0] if hidden is not None else 1
        return self.freq[target].expand(n, -1).clone()  # [N, E]


class ActivationMatrix(Predictor):
    name = "activation_matrix"
    imitates = "MoE-Infinity (expert activation matrix collection, cosine matching, layer-decayed priority)"

    def __init__(self, matches: int = 3):
        if matches < 1:
            raise PredictorError(f"matches must be >= 1, got {matches}")
        self.matches = matches

    def fit(self, trace: Trace) -> ActivationMatrix:
        """Store one EAM per training prompt: selections [L, E] divided by the prompt's token count."""
        super().fit(trace)
        L, E = trace.layout.num_moe_layers, trace.layout.num_experts
        prompts, inverse = np.unique(trace.tokens["prompt"].to_numpy(), return_inverse=True)
        exp = torch.from_numpy(trace.experts)  # [T, L, K]
        eam = torch.zeros(len(prompts), L, E)
        for o in range(L):
            eam[:, o].index_add_(0, torch.from_numpy(inverse), multi_hot(exp[:, o], E))
        self.eam = eam / torch.from_numpy(np.bincount(inverse)).float()[:, None, None]  # [P, L, E]
        self.unit = nn.functional.normalize(self.eam.flatten(1), dim=1)  # [P, L*E]
        return self

    def predict(self, layer, distance, *, hidden=None, history=None):
        return self.predict_window(layer, [distance], hidden=hidden, history=history)[distance]

    def predict_window(self, layer, distances, *, hidden=None, history=None):
        """One match of the sequence's partial EAM, read out at every target layer."""
        targets = {d: self._target(layer, d) for d in distances}
        h = self._needs("history", history, "History with `current` and `sequence` (earlier tokens' selections)")
        seq = self._needs("history.sequence", h.sequence, "earlier tokens' selections [N, L, E]")
        L, E = self.layout.num_moe_layers, self.layout.num_experts
        N, _, K = h.current.shape
        now = multi_hot(h.current.reshape(N * L, K), E).view(N, L, E)  # this token, layers <= `layer`
        query = nn.functional.normalize((seq + now).flatten(1), dim=1)  # [N, L*E]
        sims = query @ self.unit.T  # [N, P]
        top, which = sims.topk(min(self.matches, sims.shape[1]), dim=1)  # [N, m]
        w = (top.clamp_min(0) + torch.finfo(top.dtype).tiny)[..., None]  # [N, m, 1]
        # MoE-Infinity's prefetch priority falls linearly with the layer distance.
        return {d: (1.0 - d / L) * (w * self.eam[which, t]).sum(1) / w.sum(1) for d, t in targets.items()}


class Oracle(Predictor):
    name = "oracle"
    imitates = "the limit: true future routing"

    def __init__(self, layout: ModelLayout | None = None):
        self.layout = layout

    def predict(self, layer, distance, *, hidden=None, history=None):
        target = self._target(layer, distance)
        h = self._needs("history", history, "History with `truth` (TraceHistory.at(..., with_truth=True))")
        truth = self._needs("history.truth", h.truth, "the true routing [N, L, K]")
        return multi_hot(truth[:, target], self.layout.num_experts)


BASELINES = (GateLookahead, PreviousToken, Popularity, ActivationMatrix, Oracle)
