"""Twins driven by their routing models, whole or cut: the bench subject `TWIN[:LAYERS]@router`.

A twin has real expert sizes and random weights; its routing model (`models.routers`) has the twin's routing
structure at narrow widths and routing learned on the corpus. `TWIN@router` runs the twin with the routing model's
routing and hidden states on held-out text. `TWIN:LAYERS@router` cuts the twin to its first LAYERS decoder layers
(the Mixtral-8x7B twin at 32 layers needs ~90 GB of pinned host memory; at 16, half) and drives it with the first
MoE layers of the *whole* routing model's run: the routing model generates its own tokens with all its layers, so
the cut twin sees the routing those first layers really had, not that of a truncated model.

- `cut_count(spec, model, source)`: how many MoE layers of the source drive the twin (checked: the twin's MoE
  layers are the first of the source's, with the same E and K);
- `cut_replay`: a replay reduced to its first n MoE layers (`routellapor.cut_layout` cuts the layout);
- `RouterSubject`: replays the cut routing, builds gate lookahead from the source's first n routers, and takes a
  LLaPor of n MoE layers: the one `prescope gpu-inputs --routers` trained for this twin and layer count
  (`routerinputs.lookup`, with `bench --inputs`), else `--predictor` where its layout matches, else none (`prescope`
  then runs on gate lookahead, as each row's `predictor` says).

Letters: B rows, T positions, L MoE layers, K top-k, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prescope.experiments.subjects import Subject, Workload, build_subject, load_prompts, parse_model
from prescope.layout import ModelLayout
from prescope.models import adapter
from prescope.predict.routellapor import cut_layout
from prescope.routing.replay import RoutingReplay


class RouterSubjectError(ValueError):
    """A twin its routing model cannot drive (layers, experts, top-k), or a predictor that does not fit it."""


def cut_replay(replay: RoutingReplay, n: int) -> RoutingReplay:
    """The replay's first `n` MoE layers (experts, weights and router inputs [B, T, n, ...])."""
    if n == replay.shape[2]:
        return replay
    hidden = None if replay.hidden is None else replay.hidden[:, :, :n].contiguous()  # [B, T, n, H]
    return RoutingReplay(replay.experts[:, :, :n].contiguous(), replay.weights[:, :, :n].contiguous(),
                         replay.prompt_len, hidden)


def cut_count(spec: str, model: torch.nn.Module, source: torch.nn.Module) -> int:
    """The MoE layers of `source` that drive `model`: all of the twin's, which must be the source's first ones
    (same decoder positions), with the same E and K; RouterSubjectError otherwise."""
    ours, theirs = adapter.describe(model), adapter.describe(source)
    n = ours.num_moe_layers
    if (ours.num_experts, ours.top_k) != (theirs.num_experts, theirs.top_k):
        raise RouterSubjectError(f"{spec}: the routing model routes top-{theirs.top_k} of {theirs.num_experts} "
                                 f"experts, the twin top-{ours.top_k} of {ours.num_experts}")
    if ours.moe_layers != theirs.moe_layers[:n]:
        raise RouterSubjectError(
            f"{spec}: the twin's MoE layers {list(ours.moe_layers)} are not the routing model's first ones "
            f"{list(theirs.moe_layers[:n])} (it has {theirs.num_layers} decoder layers, {theirs.num_moe_layers} MoE); "
            f"cut the twin to at most {theirs.num_layers} layers")
    return n


@dataclass
class RouterSubject(Subject):
    """A twin driven by its routing model's first `moe_layers` MoE layers (all of them where it is not cut)."""

    moe_layers: int = 0

    def replay(self, batch: int, cfg: Workload) -> RoutingReplay:
        return cut_replay(super().replay(batch, cfg), self.moe_layers)

    def gate_lookahead(self):
        from prescope.predict.predictors import GateLookahead

        return GateLookahead(adapter.moe_layers(self.source)[:self.moe_layers],
                             cut_layout(adapter.describe(self.source), self.moe_layers))

    def source_layout(self) -> ModelLayout:
        return cut_layout(adapter.describe(self.source), self.moe_layers)


def fits(predictor, layout: ModelLayout) -> bool:
    """Whether a LLaPor was trained on routing of this layout (MoE layers, experts, hidden width)."""
    trained = predictor.layout
    return (trained.num_moe_layers, trained.num_experts, trained.hidden_size) == \
        (layout.num_moe_layers, layout.num_experts, layout.hidden_size)


def build_router_subject(spec: str, cfg: Workload, device: torch.device, inputs: dict | None = None) -> RouterSubject:
    """`TWIN[:LAYERS]@router` (or `TWIN-tiny[:LAYERS]@router` for CPU runs): the twin, its routing model (from the
    gpu-inputs folder's record `inputs` where it has one, else `models.routers.load_router`), cut to the twin's MoE
    layers, and LLaPor (module docstring)."""
    from prescope.experiments import routerinputs
    from prescope.models.routers import load_router
    from prescope.predict import llapor

    name, _ = parse_model(spec)
    twin = name.removesuffix("-tiny")
    prompts = load_prompts(cfg.prompts, cfg.input_len)
    if prompts is None:
        raise RouterSubjectError(f"{spec}: driving a twin with its routing model's routing needs --prompts (held-out "
                                 "ids) or --inputs")
    model = build_subject(spec.split("@")[0], device, cfg.seed)
    found = routerinputs.lookup(inputs, twin)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source, _ = load_router(twin, dtype=dtype, path=found.path if found else None)
    source = source.to(device)
    n = cut_count(spec, model, source)
    subject = RouterSubject(f"{name}@router", model, source=source, source_prompts=prompts, moe_layers=n)
    layout = subject.source_layout()
    if found is not None and n in found.llapor:
        predictor = llapor.load(found.llapor[n], device=str(device))
        if not fits(predictor, layout):
            raise RouterSubjectError(f"{found.llapor[n]}: LLaPor of {predictor.layout.num_moe_layers} MoE layers, "
                                     f"E={predictor.layout.num_experts}, H={predictor.layout.hidden_size}; {spec} "
                                     f"replays {n} layers of its routing model, E={layout.num_experts}, "
                                     f"H={layout.hidden_size}: rebuild the inputs")
        subject.llapor = predictor
    elif cfg.predictor and not inputs:  # with --inputs, --predictor is prescope-tiny's LLaPor, not this model's
        predictor = llapor.load(cfg.predictor, device=str(device))
        subject.llapor = predictor if fits(predictor, layout) else None
    return subject
