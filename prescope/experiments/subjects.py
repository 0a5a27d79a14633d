"""What `prescope bench` measures: the subject models, the routing that drives them, their prompts, and the
predictor each policy gets.

- a subject spec is `prescope-tiny`, a shape twin `name[:layers]`, `name-tiny[:layers]` (the twin's structure at
  tiny widths, for CPU smoke runs), `twin@prescope-tiny` (the twin driven by prescope-tiny's routing on
  held-out text: same L, E, K; its predictors read prescope-tiny's hidden states) or `twin@router` (driven by the
  routing model trained like the twin, `models.routers`: its routing, hidden states and routers);
- `Subject.replay` records the routing every engine cell of a batch replays; `Subject.policy` builds a policy
  with the predictor the bench gives it (gate lookahead, LLaPor where its layout matches, the replayed future).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from prescope.models import adapter, twins
from prescope.policies import LIMITS, make_policy
from prescope.routing.replay import RoutingReplay, record_replay

GATE_POLICIES = ("lookahead_prefetch", "hybrid")  # given gate lookahead (the routers of the model that routes)


def parse_model(spec: str) -> tuple[str, int | None]:
    name, _, layers = spec.split("@")[0].partition(":")
    return name, int(layers) if layers else None


ROUTER = "router"  # `twin@router`: the routing model trained like the twin
SOURCES = ("prescope-tiny", ROUTER)


def routing_source(spec: str) -> str | None:
    """The model whose routing drives subject `spec` (`twin@source`), or None for its own."""
    _, _, source = spec.partition("@")
    if source and source not in SOURCES:
        raise ValueError(f"{spec}: only prescope-tiny's routing or the twin's routing model (@{ROUTER}) can drive "
                         f"another model, got {source!r}")
    return source or None


def build_source(spec: str, device: torch.device, seed: int) -> torch.nn.Module:
    """The model whose routing drives `spec` (`twin@prescope-tiny`): prescope-tiny. A routing model's subjects
    (`twin[:layers]@router`) are built by `routersubject.build_router_subject`."""
    source = routing_source(spec)
    if source == ROUTER:
        raise ValueError(f"{spec}: a twin driven by its routing model is built by "
                         "experiments.routersubject.build_router_subject")
    return build_subject(source, device, seed)


def check_routing_fits(spec: str, model: torch.nn.Module, source: torch.nn.Module) -> None:
    """ValueError unless the source routes as many MoE layers, experts and top-k as the driven model."""
    ours, theirs = adapter.describe(model), adapter.describe(source)
    shape = lambda lay: (lay.num_moe_layers, lay.num_experts, lay.top_k)  # noqa: E731
    if shape(ours) != shape(theirs):
        raise ValueError(f"{spec}: the routing source has (MoE layers, experts, top-k) = {shape(theirs)}, the model "
                         f"{shape(ours)}; a twin cut to fewer layers cannot replay a full routing model")


def build_subject(spec: str, device: torch.device, seed: int):
    """A model to benchmark: `prescope-tiny`, a twin `name[:layers]`, or `name-tiny[:layers]` (the twin's
    structure at tiny widths, for CPU smoke runs)."""
    name, layers = parse_model(spec)
    if name == "prescope-tiny":
        from prescope.models.tiny import load_tiny

        model, _ = load_tiny(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        return model.to(device)
    if name.endswith("-tiny"):
        cfg = twins.tiny_twin_config(name.removesuffix("-tiny"), layers or 2)
        return twins.build_twin(cfg, device=device, seed=seed, dtype=torch.float32)
    return twins.build_twin(name, num_layers=layers, device=device, seed=seed)


def prompt_ids(model, batch: int, input_len: int, seed: int, prompts: np.ndarray | None = None,
               device: torch.device | None = None) -> torch.Tensor:
    """[batch, input_len] ids on the model's device: rows of `prompts` where given (cycled), else random ids
    (seeded)."""
    if prompts is not None:
        rows = np.resize(np.arange(len(prompts)), batch)
        ids = torch.from_numpy(np.ascontiguousarray(prompts[rows, :input_len])).long()
    else:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, model.config.vocab_size, (batch, input_len), generator=gen)
    return ids.to(device or model.device)


def generate(model, batch: int, input_len: int, new_tokens: int, seed: int, prompts: np.ndarray | None = None,
              device: torch.device | None = None):
    """Greedy generate of exactly `new_tokens` tokens from `batch` prompts of `input_len` tokens: rows of
    `prompts` where given (cycled), else random ids (seeded)."""
    ids = prompt_ids(model, batch, input_len, seed, prompts, device)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


HELDOUT = "heldout"


def heldout_prompts(input_len: int, per_domain: int = 13) -> np.ndarray:
    """[rows, input_len] token ids: windows of prescope-tiny's held-out text, `per_domain` from each domain
    (the corpus shipped with the package); save with np.save to carry them to a machine without prescope."""
    from prescope.models.corpus import default_corpus_dir
    from prescope.models.tiny import TinyConfig, load_tiny
    from prescope.predict.accuracy import corpus_prompts

    _, tokenizer = load_tiny()
    prompts, _ = corpus_prompts(tokenizer, TinyConfig().corpus_spec(default_corpus_dir()), "heldout", per_domain,
                                input_len)
    return np.asarray(prompts, dtype=np.int32)


def load_prompts(path: str | None, input_len: int) -> np.ndarray | None:
    """Prompt ids from a .npy file, or built from the held-out corpus for `path` = "heldout"."""
    if path is None:
        return None
    prompts = heldout_prompts(input_len) if path == HELDOUT else np.load(path)
    if prompts.ndim != 2 or prompts.shape[1] < input_len:
        raise ValueError(f"{path}: prompts must be [rows, >= {input_len}] token ids, got {prompts.shape}")
    return prompts


class Workload(Protocol):
    """What a subject reads of a bench run's config (`bench.BenchConfig` has these fields)."""

    input_len: int
    output_len: int
    seed: int
    prompts: str | None
    predictor: str | None


@dataclass
class Subject:
    """A model to benchmark with the routing that drives it and the predictors its policies use."""

    name: str
    model: torch.nn.Module
    prompts: np.ndarray | None = None  # the model's input ids (prescope-tiny), else random ids
    source: torch.nn.Module | None = None  # the model whose routing drives `model` (twin@prescope-tiny)
    source_prompts: np.ndarray | None = None  # the source's input ids
    llapor: object | None = None

    def replay(self, batch: int, cfg: Workload) -> RoutingReplay:
        """The routing every engine cell of this batch replays: the stock run's, or the source model's."""
        runner, prompts = (self.model, self.prompts) if self.source is None else (self.source, self.source_prompts)
        return record_replay(runner, lambda: generate(runner, batch, cfg.input_len, cfg.output_len, cfg.seed,
                                                         prompts), with_hidden=self.source is not None)

    def router_inputs(self, cfg: Workload) -> torch.Tensor:
        """[L, H]: the router input of every MoE layer for the last prompt token of one row."""
        replay = record_replay(self.model, lambda: generate(self.model, 1, cfg.input_len, 2, cfg.seed, self.prompts),
                               with_hidden=True)
        return replay.hidden[0, replay.prompt_len - 1]

    def gate_lookahead(self):
        """Gate lookahead from the routers of the model whose routing runs."""
        from prescope.predict.predictors import GateLookahead

        return GateLookahead.from_model(self.source or self.model)

    def policy(self, name: str, lookahead: int = 3, **options):
        """The policy object with this subject's predictor; (policy, predictor name). `options` go to the
        policy's constructor."""
        if name in GATE_POLICIES:
            return make_policy(name, predictor=self.gate_lookahead(), **options), "gate_lookahead"
        if name == "prescope":
            if self.llapor is not None:
                depth = min(lookahead, self.llapor.config.distance)
                return make_policy(name, predictor=self.llapor, lookahead=depth, **options), "llapor"
            return make_policy(name, predictor=self.gate_lookahead(), lookahead=lookahead, **options), "gate_lookahead"
        if name == "ceiling":
            return make_policy(name, lookahead=lookahead, **options), "replayed future"
        if name in LIMITS:
            return make_policy(name, **options), "replayed future"
        return make_policy(name, **options), "own statistics" if name == "activation_matrix" else "none"


def build_bench_subject(spec: str, cfg: Workload, device: torch.device) -> Subject:
    name, _ = parse_model(spec)
    prompts = load_prompts(cfg.prompts, cfg.input_len)
    source = routing_source(spec)
    model = build_subject(spec.split("@")[0], device, cfg.seed)
    subject = Subject(name if source is None else f"{name}@{source}", model,
                      prompts=prompts if name == "prescope-tiny" else None)
    if source is not None:
        if prompts is None:
            raise ValueError(f"{spec}: driving a twin with {source}'s routing needs --prompts (held-out ids)")
        subject.source, subject.source_prompts = build_source(spec, device, cfg.seed), prompts
        check_routing_fits(spec, model, subject.source)
    if cfg.predictor:
        from prescope.predict import llapor

        predictor = llapor.load(cfg.predictor, device=str(device))
        layout = adapter.describe(subject.source or model)
        routed = (layout.num_moe_layers, layout.num_experts, layout.hidden_size)
        trained = (predictor.layout.num_moe_layers, predictor.layout.num_experts, predictor.layout.hidden_size)
        subject.llapor = predictor if routed == trained else None
    return subject
