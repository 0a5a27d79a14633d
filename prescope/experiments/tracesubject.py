"""Real traces as subjects: a real model's recorded routing replayed on its shape twin, simulated and measured.

A real trace (a llama.cpp route trace of Qwen3-30B-A3B or gpt-oss-120b, shipped in prescope/assets/data/routing,
or any trace of another model) says which experts each token chose at every MoE layer, with their weights, but
carries no hidden states. Its twin has the real model's expert sizes and compute with random weights. Together:
real routing at real expert sizes.

- `twin_config_for(twin, trace)`: the twin's configuration, its MoE layers checked against the trace's (E must
  match; a twin cut to fewer layers replays the trace's first layers), its top-k set to the trace's where the
  recorded run used another (llama.cpp can run a model with fewer experts per token than its config: the
  shipped Qwen3-30B-A3B trace routes 6 of 128, the gpt-oss-120b trace 2).
- `trace_replay(trace, batch, input_len, output_len)`: a `RoutingReplay` the engine imposes per token. Only
  tokens routed at every layer are used (llama.cpp skips the last layer of prefill tokens), in order; row b
  replays a window of input_len + output_len consecutive tokens; windows are disjoint where the trace is long
  enough and spread evenly (overlapping) otherwise. Rows are stretches of one conversation, not independent
  users.
- `TraceSubject`: the bench subject `twin[:layers]@trace:PATH` (`prescope bench --models`), whose policies
  read no hidden states: `prescope` gets routing-only LLaPor (`--predictor`, a checkpoint trained on the
  trace) or predicts from the routing it has seen; `hybrid` and `lookahead_prefetch` predict from the routing
  they have seen (their gate lookahead would read the random twin's routers: meaningless here).
- `prescope trace-compare` (`tracecompare`): every policy replayed in the simulator on the twin's layout.

Letters: B rows, T positions, L MoE layers, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prescope.experiments.subjects import GATE_POLICIES, Subject, Workload

TRACE = "trace:"


class TraceSubjectError(ValueError):
    """A trace that cannot drive the twin it was given (E, layers), or a replay it cannot fill."""


def trace_path(spec: str) -> str | None:
    """PATH of a subject `twin@trace:PATH`, else None."""
    _, _, source = spec.partition("@")
    return source.removeprefix(TRACE) if source.startswith(TRACE) else None


def twin_config_for(twin: str, trace, layers: int | None = None, tiny: bool = False):
    """(twin configuration, trace cut to its MoE layers): E checked, the twin's top-k set to the trace's."""
    from prescope.models import twins
    from prescope.predict.routellapor import cut_layers

    cfg = twins.tiny_twin_config(twin, layers or 2) if tiny else twins.twin_config(twin, layers)
    sizes = twins.config_sizes(cfg)
    L, E, K = trace.layout.num_moe_layers, trace.layout.num_experts, trace.layout.top_k
    if sizes["num_experts"] != E:
        raise TraceSubjectError(f"the trace routes over {E} experts, twin {twin} has {sizes['num_experts']}: "
                                "a trace drives only a twin of its own model")
    if sizes["num_moe_layers"] > L:
        raise TraceSubjectError(f"twin {twin} has {sizes['num_moe_layers']} MoE layers, the trace {L}: cut the twin "
                                f"to at most {L} layers ({twin}:{L} or fewer)")
    if sizes["top_k"] != K:
        if not hasattr(cfg, "num_experts_per_tok"):
            raise TraceSubjectError(f"the trace routes top-{K}, twin {twin} top-{sizes['top_k']}, and its "
                                    "configuration has no num_experts_per_tok to set")
        cfg.num_experts_per_tok = K
    return cfg, cut_layers(trace, sizes["num_moe_layers"])


def windows(trace, batch: int, length: int) -> np.ndarray:
    """[B, length] trace token indices: windows of consecutive tokens routed at every layer (module docstring)."""
    tok = trace.tokens
    order = np.lexsort((tok["position"].to_numpy(), tok["call"].to_numpy(), tok["prompt"].to_numpy()))
    usable = order[trace.present[order].all(1)]  # [T'] in order
    if length > len(usable):
        raise TraceSubjectError(f"a row needs {length} tokens (input + output) and the trace has {len(usable)} routed "
                                "at every layer: shorten --input-len / --output-len")
    starts = np.arange(batch) * length if batch * length <= len(usable) \
        else np.linspace(0, len(usable) - length, batch).round().astype(np.int64)
    return usable[starts[:, None] + np.arange(length)[None, :]]


def trace_replay(trace, batch: int, input_len: int, output_len: int):
    """The `RoutingReplay` of `batch` rows of input_len + output_len positions cut from `trace`."""
    import torch

    from prescope.routing.replay import RoutingReplay

    index = windows(trace, batch, input_len + output_len)  # [B, T]
    experts = torch.from_numpy(trace.experts[index])  # [B, T, L, K]
    weights = torch.from_numpy(trace.weights[index])  # [B, T, L, K]
    return RoutingReplay(experts.long(), weights.float(), input_len)


@dataclass
class TraceSubject(Subject):
    """A twin driven by a real trace's routing; its policies read no hidden states."""

    trace: object = None
    routing: str = ""

    def replay(self, batch: int, cfg: Workload):
        return trace_replay(self.trace, batch, cfg.input_len, cfg.output_len)

    def policy(self, name: str, lookahead: int = 3, **options):
        from prescope.policies import make_policy

        if name in GATE_POLICIES:
            return make_policy(name, **options), "routing seen (previous step)"
        if name == "prescope":
            if self.llapor is not None:
                depth = min(lookahead, self.llapor.config.distance)
                return make_policy(name, predictor=self.llapor, lookahead=depth, **options), "llapor_routing"
            return make_policy(name, lookahead=lookahead, **options), "routing seen (previous step)"
        return super().policy(name, lookahead=lookahead, **options)


def build_trace_subject(spec: str, cfg: Workload, device) -> TraceSubject:
    """`twin[:layers]@trace:PATH` (or `twin-tiny[:layers]@trace:PATH` for CPU runs): the twin with the trace's
    top-k, its routing replayed from the trace, `prescope` with routing-only LLaPor from `cfg.predictor`."""
    import torch

    from prescope.experiments.subjects import parse_model
    from prescope.models import twins
    from prescope.predict.routellapor import load_predictor
    from prescope.routing.reader import read_trace
    from prescope.routing.trace import check_trace_matches

    path = trace_path(spec)
    name, layers = parse_model(spec)
    tiny = name.endswith("-tiny")
    config, trace = twin_config_for(name.removesuffix("-tiny"), read_trace(path), layers, tiny)
    model = twins.build_twin(config, device=device, seed=cfg.seed,
                             dtype=torch.float32 if tiny or device.type != "cuda" else torch.bfloat16)
    check_trace_matches(trace, model)
    subject = TraceSubject(f"{spec.split('@')[0]}@trace:{Path(path).name}", model, trace=trace,
                           routing=f"replayed from {Path(path).name}")
    if cfg.predictor:
        predictor = load_predictor(cfg.predictor, device=str(device))
        if predictor.needs_hidden:
            raise TraceSubjectError(f"{cfg.predictor} is a LLaPor that reads hidden states; a trace subject has "
                                    "none: train routing-only LLaPor on the trace (prescope train-predictor)")
        predictor.check_model(trace.layout)
        subject.llapor = predictor
    return subject
