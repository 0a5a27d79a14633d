"""Typed configuration of an offloaded run; CLI options and notebook parameters use these field names."""

from __future__ import annotations

from dataclasses import asdict, dataclass

TIMING_MODES = ("full", "steps", "off")
IO_CHUNK_BYTES = 32 << 20  # AsyncIO's largest single copy, in the engine and in the simulator's priority link


@dataclass(frozen=True)
class EngineConfig:
    """How the engine offloads one model.

    policy: name of the offloading policy (see `prescope.policies.POLICIES`).
    budget_share: share of all routed experts (L·E) the GPU slot pool holds; ignored if budget_bytes is set.
    budget_bytes: GPU bytes for expert slots; the slot count is budget_bytes // bytes per expert.
    device: "cuda", "cuda:N", "cpu" or "auto" (CUDA when available). On "cpu" the engine runs its CPU twin:
        the same orders, copies between host tensors, wall-clock times.
    cpu_workers: threads computing CPU-placed experts (0: half the cores, at least one).
    timing: "full" records every transfer and kernel (events cost host time), "steps" only step
        boundaries, "off" nothing.
    pin_memory: keep expert weights in pinned host memory (falls back to pageable, with a warning, where
        pinning is refused).
    profile: hardware profile (built-in name or JSON path) whose cost model cost-aware policies weigh.
    async_io: issue copies through AsyncIO's I/O worker (prescope.engine.transfers: priority queue, chunks);
        None lets the policy choose (`prescope`, `belady` and `ceiling` ask for it), False issues every copy at once
        on the copy stream, first come first served, as the peers' systems do.
    io_chunk_bytes: AsyncIO's largest single copy; an on-demand load overtakes queued prefetches at a
        chunk boundary.
    io_depth: AsyncIO's chunks issued ahead of the copy engine (more keeps the link busier while the host
        is busy; fewer lets an on-demand load overtake sooner).
    """

    policy: str = "on_demand_lru"
    budget_share: float = 0.25
    budget_bytes: int | None = None
    device: str = "auto"
    cpu_workers: int = 0
    timing: str = "full"
    pin_memory: bool = True
    profile: str = "h200"
    async_io: bool | None = None
    io_chunk_bytes: int = IO_CHUNK_BYTES
    io_depth: int = 3

    def __post_init__(self) -> None:
        if not 0.0 < self.budget_share <= 1.0:
            raise ValueError(f"budget_share must be in (0, 1], got {self.budget_share}")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {self.budget_bytes}")
        if self.timing not in TIMING_MODES:
            raise ValueError(f"timing must be one of {TIMING_MODES}, got {self.timing!r}")
        if self.cpu_workers < 0:
            raise ValueError(f"cpu_workers must be >= 0, got {self.cpu_workers}")
        if self.io_chunk_bytes < 1 or self.io_depth < 1:
            raise ValueError(f"io_chunk_bytes and io_depth must be >= 1, got {self.io_chunk_bytes}, {self.io_depth}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    def to_dict(self) -> dict:
        return asdict(self)
