"""What PreSched takes and gives: an `Instance` (what MoE layer l knows when it plans: plain numbers and
tuples, times in seconds from now) and a `Plan` (its orders), with the candidates and victims they name
(`presched` holds the model, the objective and the algorithm)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

Key = tuple[int, int]  # (MoE layer ordinal, expert)


class PlanError(ValueError):
    """An instance the planner cannot take (inconsistent or out-of-range inputs); says what was expected."""


class Candidate(NamedTuple):
    """An expert a later layer may use: probability of being used, and tokens routed to it if used."""

    expert: int
    prob: float
    tokens: float = 1.0


class Held(NamedTuple):
    """A resident key the plan may evict: its probability of being needed before it could come back."""

    key: Key
    prob: float
    tokens: float = 1.0


@dataclass(frozen=True)
class Instance:
    """Everything layer `layer` knows when it plans (times in seconds from now; see the module docstring).

    experts, tokens: layer l's routed experts and their token counts. predictions[d-1]: candidates of layer
    l+d (present ones are skipped; a caller may leave out candidates it will not consider). compute[d-1]:
    layer l+d's expected expert compute (None: Σ p·gpu(n) over its candidates). resident: keys resident on
    the GPU (those of layers l … l+D are enough); inflight: keys on the link -> ETA. free_slots: empty slots; evictable: resident keys that may be
    given up (not pinned by layer l, not loading; a caller may pass only the cheapest). load, gpu, cpu: the
    cost model (τ; one expert for n tokens on the GPU, on the CPU). link_free: when the link ends what is
    queued; demand_free: when an on-demand load could start (None: link_free, a FIFO link); cpu_free: when
    the CPU lane is free; gap: non-expert time between two MoE layers; max_prefetch: a cap (None: none);
    resident_on_cpu: whether a resident expert may run on the CPU (False where a CPU expert costs the host,
    the bottleneck: the engine's host-bound layers).
    """

    layer: int
    experts: tuple[int, ...]
    tokens: tuple[float, ...]
    predictions: tuple[tuple[Candidate, ...], ...]
    load: float
    gpu: Callable[[float], float]
    cpu: Callable[[float], float]
    resident: frozenset = frozenset()
    inflight: Mapping[Key, float] = field(default_factory=dict)
    free_slots: int = 0
    evictable: tuple[Held, ...] = ()
    link_free: float = 0.0
    demand_free: float | None = None
    cpu_free: float = 0.0
    gap: float = 0.0
    max_prefetch: int | None = None
    compute: tuple[float, ...] | None = None
    resident_on_cpu: bool = True

    def __post_init__(self) -> None:
        if len(self.experts) != len(self.tokens) or len(set(self.experts)) != len(self.experts):
            raise PlanError(f"experts and tokens must be equally long with distinct experts, got {self.experts} "
                            f"and {self.tokens}")
        if not self.load > 0:
            raise PlanError(f"load (one expert's transfer time) must be > 0 s, got {self.load}")
        if self.free_slots < 0 or (self.max_prefetch is not None and self.max_prefetch < 0):
            raise PlanError(f"free_slots and max_prefetch must be >= 0, got {self.free_slots}, {self.max_prefetch}")
        if min(self.link_free, self.cpu_free, self.gap) < 0:
            raise PlanError(f"link_free, cpu_free and gap must be >= 0 s, got {self.link_free}, {self.cpu_free}, "
                            f"{self.gap}")
        if self.demand_free is not None and not 0 <= self.demand_free <= self.link_free:
            raise PlanError(f"demand_free must be in [0, link_free={self.link_free}], got {self.demand_free}")
        if self.compute is not None and len(self.compute) != len(self.predictions):
            raise PlanError(f"compute needs one value per predicted layer ({len(self.predictions)}), "
                            f"got {len(self.compute)}")
        for d, layer in enumerate(self.predictions, 1):
            for c in layer:
                if not (0.0 <= c[1] <= 1.0 and c[2] > 0):
                    raise PlanError(f"layer l+{d}: candidate {c} needs prob in [0, 1] and tokens > 0")
        for h in self.evictable:
            if not (0.0 <= h[1] <= 1.0 and h[2] > 0) or h[0] in self.inflight:
                raise PlanError(f"evictable {h} needs prob in [0, 1], tokens > 0, and must not be in flight")

    @property
    def demand_start(self) -> float:
        return self.link_free if self.demand_free is None else self.demand_free


@dataclass(frozen=True)
class Plan:
    """Orders for layer l and the window. gpu: present experts (by readiness) then `loads`; cpu: the misses not
    loaded, then the present experts the CPU takes (in flight, then resident); victims: one per load, then one
    per prefetch (None: a free slot). objective: J of this plan (`objective.expected_window_latency`)."""

    gpu: tuple[int, ...]
    cpu: tuple[int, ...]
    loads: tuple[int, ...]
    prefetch: tuple[Key, ...]
    victims: tuple[Key | None, ...]
    objective: float
