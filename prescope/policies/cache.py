"""GPU expert-slot bookkeeping shared by the engine and the simulator: pure Python, no tensors.

A fixed pool of S slots, each holding at most one (layer, expert) key. A slot is FREE, LOADING (a copy
into it is in flight) or RESIDENT. Slots pinned by the running layer cannot be given away: an expert the
layer still has to compute is never evicted. Counters record hits, misses, loads and evictions, and
whether each prefetched expert was used before it left, for prefetch precision.

Letters: L MoE layers, E experts, S slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

Key = tuple[int, int]  # (MoE layer ordinal, expert)


class SlotState(Enum):
    FREE = "free"
    LOADING = "loading"
    RESIDENT = "resident"


class CacheError(RuntimeError):
    """An order the cache cannot honour (a bug in a policy or the engine, never bad user input)."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    prefetches: int = 0
    prefetches_used: int = 0
    evictions: int = 0


@dataclass
class ExpertCache:
    num_slots: int
    num_layers: int
    owner: list[Key | None] = field(init=False)
    state: list[SlotState] = field(init=False)
    last_use: list[int] = field(init=False)
    prefetched: list[bool] = field(init=False)  # loaded speculatively and not used yet
    pinned: set[int] = field(default_factory=set, init=False)
    slot_of: dict[Key, int] = field(default_factory=dict, init=False)
    free: set[int] = field(init=False)  # FREE slots, kept in step so lookups never scan the pool
    by_layer: dict[int, set[int]] = field(init=False)  # occupied slots of each layer
    stats: CacheStats = field(default_factory=CacheStats, init=False)
    clock: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.num_slots < 1 or self.num_layers < 1:
            raise ValueError(f"cache needs at least one slot and one layer, got S={self.num_slots}, L={self.num_layers}")
        self.owner = [None] * self.num_slots
        self.state = [SlotState.FREE] * self.num_slots
        self.last_use = [-1] * self.num_slots
        self.prefetched = [False] * self.num_slots
        self.free = set(range(self.num_slots))
        self.by_layer = {layer: set() for layer in range(self.num_layers)}

    @property
    def quota(self) -> int:
        """Slots per layer when the pool is split evenly (per-layer policies use it); at least one."""
        return max(1, self.num_slots // self.num_layers)

    def lookup(self, key: Key) -> int | None:
        return self.slot_of.get(key)

    def is_resident(self, key: Key) -> bool:
        slot = self.slot_of.get(key)
        return slot is not None and self.state[slot] is SlotState.RESIDENT

    def is_present(self, key: Key) -> bool:
        """Resident or on its way."""
        return key in self.slot_of

    def free_slots(self) -> list[int]:
        return sorted(self.free)

    def layer_slots(self, layer: int) -> list[int]:
        return sorted(self.by_layer[layer])

    def evictable(self, layer: int | None = None) -> list[int]:
        """Occupied slots (of `layer`, or all) that are neither pinned nor loading."""
        slots = self.by_layer[layer] if layer is not None else range(self.num_slots)
        return [s for s in slots if self.state[s] is SlotState.RESIDENT and s not in self.pinned]

    def keys(self, layer: int | None = None) -> list[Key]:
        return [k for k in self.owner if k is not None and (layer is None or k[0] == layer)]

    def assign(self, key: Key, slot: int, *, speculative: bool) -> Key | None:
        """Start loading `key` into `slot`; returns the key it evicted, if any."""
        if key in self.slot_of:
            raise CacheError(f"{key} is already in slot {self.slot_of[key]}")
        if slot in self.pinned or self.state[slot] is SlotState.LOADING:
            raise CacheError(f"slot {slot} holds {self.owner[slot]}, which is in use or loading")
        evicted = self.owner[slot]
        if evicted is not None:
            del self.slot_of[evicted]
            self.by_layer[evicted[0]].discard(slot)
            self.stats.evictions += 1
        self.owner[slot], self.state[slot], self.slot_of[key] = key, SlotState.LOADING, slot
        self.free.discard(slot)
        self.by_layer[key[0]].add(slot)
        self.prefetched[slot] = speculative
        self.stats.loads += 1
        self.stats.prefetches += int(speculative)
        return evicted

    def mark_ready(self, key: Key) -> None:
        self.state[self.slot_of[key]] = SlotState.RESIDENT

    def use(self, key: Key, *, hit: bool) -> None:
        """Record that the running layer computes `key` from its slot."""
        slot = self.slot_of[key]
        self.clock += 1
        self.last_use[slot] = self.clock
        self.stats.hits += int(hit)
        self.stats.misses += int(not hit)
        if self.prefetched[slot]:
            self.prefetched[slot] = False
            self.stats.prefetches_used += 1

    def pin(self, key: Key) -> None:
        self.pinned.add(self.slot_of[key])

    def unpin(self, key: Key) -> None:
        self.pinned.discard(self.slot_of[key])

    def unpin_all(self) -> None:
        self.pinned.clear()

    def evict(self, key: Key) -> int:
        slot = self.slot_of[key]
        if slot in self.pinned:
            raise CacheError(f"{key} is pinned by the running layer")
        del self.slot_of[key]
        self.owner[slot], self.state[slot], self.prefetched[slot] = None, SlotState.FREE, False
        self.free.add(slot)
        self.by_layer[key[0]].discard(slot)
        self.stats.evictions += 1
        return slot

    def cancel(self, key: Key, started: bool = False) -> int:
        """Undo the assignment of `key` whose copy was stopped: its slot is free; a copy that never ran counts
        as no load, one cut part-way (`started`) stays a load (an unused prefetch: the link carried part of it)."""
        slot = self.evict(key)
        self.stats.evictions -= 1
        if not started:
            self.stats.loads -= 1
            self.stats.prefetches -= 1
        return slot

    def lru(self, slots: list[int]) -> int:
        return min(slots, key=lambda s: self.last_use[s])
