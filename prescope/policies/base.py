"""Offloading policies: small objects that turn what a layer routes into orders; the engine executes them.

Every policy answers two questions, with no tensors involved, so the CUDA engine, its CPU twin and the
trace-replay simulator all run the very same objects:

- `plan(view, cache) -> Orders`: for the running layer, which routed experts run on the GPU (loading any
  that are absent, on demand) and which on the CPU from host memory; and which experts of later layers to
  prefetch, most valuable first.
- `plan_ahead(view, cache) -> list[Key]` (optional; none by default): once the layer's GPU experts are enqueued,
  more prefetches of later layers, issued after `plan`'s: planning done there overlaps the layer's device work
  instead of delaying its launch (PreScope's `late_prefetch`);
- `victim(cache, key) -> slot | None`: which slot `key` may take (a free one, or one whose expert is
  evicted); None when every slot is pinned by the running layer or still loading, in which case the
  engine first computes what is resident and retries.

Each policy names the system it imitates and where it simplifies, and declares its options as a frozen
dataclass (`Policy.options_type`, a `PolicyOptions`), typed and checked once: `make_policy(name, **options)`
and the command line's `name[key=value,...]` (`prescope.policies.parse_policy`) both build it.
Prediction-driven policies (lookahead, activation matrix, prescope) build on this interface in `peers.py`,
the limits that know the future (belady, ceiling) in `limits.py`; the registry by name is
`prescope.policies.POLICIES`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from prescope.policies.cache import ExpertCache, Key


class PolicyError(ValueError):
    """A policy set up in a way that cannot work (an unknown or mistyped option, a predictor of another model,
    a lookahead too deep)."""


_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}


@dataclass(frozen=True)
class PolicyOptions:
    """A policy's options: typed fields with defaults. Values are checked against the annotations (`int`,
    `float`, `bool`, `str`, `dict[...]`, `X | None`): a bool is not a number, an int is taken for a float,
    and a float must be finite. Subclasses add fields and range checks (`check`)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            allowed = [part.strip().split("[")[0] for part in str(f.type).split("|")]
            if "float" in allowed and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, value := float(value))
            kinds = tuple(_TYPES.get(a, dict if a == "dict" else tuple if a == "tuple" else object) for a in allowed)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise PolicyError(f"{type(self).__name__}.{f.name} must be {f.type}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise PolicyError(f"{type(self).__name__}.{f.name} must be finite, got {value!r}")
        self.check()

    def check(self) -> None:
        """Range checks of a policy's own options (none here)."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class LayerView:
    """What a policy sees when MoE layer `layer` runs in decode or prefill step `step`."""

    step: int
    layer: int
    num_layers: int
    num_experts: int
    experts: tuple[int, ...]  # routed experts of this layer, most tokens first
    tokens: tuple[int, ...]  # tokens routed to each of them
    hidden: Any = None  # router input [N, H] when the executor has it (predictors use it)
    future: Sequence[Sequence[int]] | None = None  # true routing of later layers, for the limits only
    future_tokens: Sequence[Sequence[int]] | None = None  # tokens per expert of `future`, where known


@dataclass
class Orders:
    gpu: list[int] = field(default_factory=list)  # experts of this layer computed on the GPU
    cpu: list[int] = field(default_factory=list)  # experts of this layer computed on the CPU
    prefetch: list[Key] = field(default_factory=list)  # later layers' experts, most valuable first

    def check(self, view: LayerView) -> None:
        routed, ordered = set(view.experts), self.gpu + self.cpu
        if sorted(ordered) != sorted(routed):
            raise ValueError(f"orders must place every routed expert exactly once: routed {sorted(routed)}, "
                             f"gpu {self.gpu}, cpu {self.cpu}")


@dataclass(frozen=True)
class Costs:
    """Per-expert times a policy may weigh, in seconds, from the hardware profile and the model layout."""

    load: float  # one expert over the link
    gpu: Callable[[int], float]  # one expert for n tokens on the GPU
    cpu: Callable[[int], float]  # one expert for n tokens on the CPU
    layer_gap: float = 0.0  # attention, dense and host time between two MoE layers at decode
    host: float = 0.0  # the host's own time per MoE layer at decode (launches, Python), which device work hides behind
    launch: float = 0.0  # the fixed part of `gpu(n)`: launching one expert's kernels, which the host spends too
    plan: float = 0.0  # host time of one layer's prediction and planning by a predicting policy
    predict: float = 0.0  # of `plan`, the prediction's part (the profile's predict_overhead_s)
    wave: float = 0.0  # the fixed device time of one grouped kernel over a wave of experts (0: a kernel per expert)
    transfer_host: float = 0.0  # host time to issue one transfer (the profile's host_per_transfer_s)
    # whether the executor runs a layer's loads and kernels while the host already works on the next layer
    # (the engine: one sync per layer, then launches run ahead), or after the host's work, serially (the simulator)
    host_hides_device: bool = True


def costs_for(layout, profile) -> Costs:
    """Per-expert costs of `layout`'s experts on hardware `profile` (prescope.hardware.cost formulas), as the
    engine runs them (its host runs ahead of the device: `host_hides_device`).

    The layer gap is the profile's host overhead per layer plus the GPU's fixed cost of one layer's
    resident work: a floor, since the attention's own size is not part of the layout. Where the profile
    has a grouped expert kernel (`gpu_grouped`: one kernel per wave over the slot pool, as the fast engine
    runs it), an expert's GPU time is what it adds to its wave, the wave's fixed cost is part of the gap,
    and the host launches no kernel per expert (one replay per wave, in its host time)."""
    from prescope.hardware import cost

    denominator = 3 * layout.hidden_size * layout.intermediate_size
    dtype_bytes = layout.expert_bytes // denominator if denominator else 2
    dims = (layout.hidden_size, layout.intermediate_size, dtype_bytes)
    grouped = profile.gpu_grouped
    gpu_time = cost.gpu_expert_time if grouped is None else cost.grouped_expert_time
    wave = grouped.wave_fixed_s if grouped is not None else 0.0
    return Costs(load=cost.transfer_time(layout.expert_bytes, profile),
                 gpu=lambda n: gpu_time(n, *dims, profile),
                 cpu=lambda n: cost.cpu_expert_time(n, *dims, profile),
                 layer_gap=profile.host_overhead_per_layer_s + profile.gpu_dense.fixed_s + wave,
                 host=profile.host_overhead_per_layer_s,
                 launch=profile.gpu_expert.fixed_s if grouped is None else 0.0,
                 plan=profile.predict_overhead_s + profile.plan_overhead_s, predict=profile.predict_overhead_s,
                 wave=wave, transfer_host=profile.host_per_transfer_s)


class Policy(ABC):
    name: str = ""
    imitates: str = ""
    simplifies: str = ""
    options_type: ClassVar[type[PolicyOptions]] = PolicyOptions

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.options_type.names()))
        if unknown:
            known = ", ".join(self.options_type.names()) or "none"
            raise PolicyError(f"{self.name}: unknown option(s) {unknown}; its options: {known}")
        self.options = self.options_type(**options)

    def reset(self, cache: ExpertCache, num_experts: int, costs: Costs | None = None) -> list[Key]:
        """Start of a run; returns keys to make resident before timing starts (none by default)."""
        self.num_experts, self.costs = num_experts, costs
        return []

    @abstractmethod
    def plan(self, view: LayerView, cache: ExpertCache) -> Orders: ...

    def plan_ahead(self, view: LayerView, cache: ExpertCache) -> list[Key]:
        """Called once the running layer's GPU experts are enqueued (after `plan`, its loads and kernels, before
        its prefetches are issued): later layers' keys to prefetch after `plan`'s, most valuable first. Its host
        time overlaps the layer's device work. None by default."""
        return []

    def host_measured(self, seconds: float) -> None:  # noqa: B027 - a policy that learns from it overrides it
        """The executor measured this layer's host work of the policy (`plan`, victims, `plan_ahead`; waits for
        the device excluded: `protocol.LayerRun.host_s`). The engine calls it after each MoE layer; the
        simulator, whose host time is the profile's, never does."""

    def step_measured(self, seconds: float) -> None:  # noqa: B027 - a policy that learns from it overrides it
        """The executor measured the wall time of the step that ran last, from its start to the next step's
        (`engine.Engine.begin_step`). The engine calls it; the simulator never does."""

    host_work: tuple[str, ...] = ()  # host-side phases an executor should time: "predict", "plan"
    needs_future: bool = False  # reads LayerView.future (an executor computes it only for such a policy)
    async_io: bool = False  # asks the executor for AsyncIO's priority link (on-demand loads overtake prefetches)
    # host seconds so far, inside `plan` and `victim`, spent waiting for the device (a forecast computed there
    # and read back): the protocol reports it apart from the policy's own host work (`protocol.LayerRun`)
    forecast_wait_s: float = 0.0

    def planned_work(self) -> tuple[str, ...]:
        """The phases of `host_work` the last `plan` call did (an executor that charges them by profile
        constants, the simulator, charges only these)."""
        return self.host_work

    def planned_ahead_work(self) -> tuple[str, ...]:
        """The phases of `host_work` the last `plan_ahead` call did (none by default), charged like
        `planned_work` but where they run: after the layer's GPU work was issued."""
        return ()

    def uses_async_io(self, costs: Costs | None) -> bool:
        """Whether to ask for AsyncIO with these costs (an executor's explicit setting overrides it)."""
        return self.async_io

    def victim(self, cache: ExpertCache, key: Key) -> int | None:
        """Per-layer LRU (`lru_victim`)."""
        return lru_victim(cache, key)


def lru_victim(cache: ExpertCache, key: Key, protect: frozenset[Key] | set[Key] = frozenset()) -> int | None:
    """Per-layer LRU: a free slot while the layer of `key` is under its quota (or has nothing to give up),
    else that layer's least recently used expert, else any layer's; never a key in `protect`."""
    own = cache.evictable(key[0], protect)
    if cache.free_count and (cache.layer_size(key[0]) < cache.quota or not own):
        return cache.first_free()
    if own:
        return cache.lru(own)
    return cache.lru_evictable(protect)


class OnDemandLRU(Policy):
    name = "on_demand_lru"
    imitates = "mixtral-offloading; FreeToken's `offload` mode"
    simplifies = "no prediction and no CPU path; an even split of slots per layer with LRU inside each layer"

    def plan(self, view: LayerView, cache: ExpertCache) -> Orders:
        return Orders(gpu=list(view.experts))


@dataclass(frozen=True)
class CpuMissesOptions(PolicyOptions):
    popularity: dict | None = None  # layer -> experts, most popular first: made resident at reset


class CpuMisses(Policy):
    name = "cpu_misses"
    imitates = "Fiddler; llama.cpp `--n-cpu-moe`; KTransformers"
    simplifies = ("hot experts are the first ones each layer uses (or a given popularity ranking), loaded "
                  "while the layer has free slots; a later miss runs on the CPU unless the cost model says "
                  "loading it is faster for its token count (prefill), in which case it takes the layer's "
                  "least recently used slot")

    options_type = CpuMissesOptions

    def __init__(self, **options):
        super().__init__(**options)
        self.popularity: dict[int, Sequence[int]] = self.options.popularity or {}

    def reset(self, cache: ExpertCache, num_experts: int, costs: Costs | None = None) -> list[Key]:
        super().reset(cache, num_experts, costs)
        return [(layer, e) for layer, ranked in sorted(self.popularity.items())
                for e in list(ranked)[:cache.quota]]

    def plan(self, view: LayerView, cache: ExpertCache) -> Orders:
        orders, room = Orders(), cache.quota - cache.layer_size(view.layer)
        for e, n in zip(view.experts, view.tokens, strict=True):
            if cache.is_present((view.layer, e)):
                orders.gpu.append(e)
            elif room > 0 and cache.free_count:
                orders.gpu.append(e)
                room -= 1
            elif self.costs is not None and self.costs.cpu(n) > self.costs.load + self.costs.gpu(n):
                orders.gpu.append(e)
            else:
                orders.cpu.append(e)
        return orders


def routed_experts(indices, num_experts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Unique routed experts of one layer, most tokens first, and their token counts.

    `indices` is any iterable of per-token top-k rows (a tensor [N, K] or nested lists); entries outside
    [0, E) are sentinels some models use for dropped slots and are ignored.
    """
    counts: dict[int, int] = {}
    for row in indices:
        for e in row:
            e = int(e)
            if 0 <= e < num_experts:
                counts[e] = counts.get(e, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(e for e, _ in ranked), tuple(c for _, c in ranked)
