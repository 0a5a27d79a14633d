"""GPU expert-slot bookkeeping shared by the engine and the simulator: pure Python, no tensors.

A fixed pool of S slots, each holding at most one (layer, expert) key. A slot is FREE, LOADING (a copy
into it is in flight) or RESIDENT. Slots pinned by the running layer cannot be given away: an expert the
layer still has to compute is never evicted. Counters record hits, misses, loads and evictions, and
whether each prefetched expert was used before it left, for prefetch precision.

The representation is private: policies ask questions (`is_warm`, `evictable_keys`, `loading_keys`, ...)
and executors report what happened (`assign`, `mark_ready`, `use`, `pin`, `cancel`), so the bookkeeping can
change without touching the policies.

Whole-pool questions are answered from arrays over slots or kept orders, never by a Python scan of the pool
per call: `lru_evictable` from the use order, `first_free` from a heap of free slots (a `min` over the free
set scanned the pool at every victim while it filled: on_demand_lru's host time per MoE layer in
`planspeed --replay`'s run, limits.py's docstring, mean 23 / 28 / 144 -> 5 / 15 / 65 µs at batch 1 / 4 / 16),
`offered_arrays` and `evictable_scored` from the slot arrays.

Letters: L MoE layers, E experts, S slots.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, KeysView
from dataclasses import dataclass
from enum import Enum

import numpy as np

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


_RESIDENT, _LOADING, _FREE = SlotState.RESIDENT, SlotState.LOADING, SlotState.FREE


class ExpertCache:
    """S slots over L layers; see the module docstring."""

    def __init__(self, num_slots: int, num_layers: int):
        if num_slots < 1 or num_layers < 1:
            raise ValueError(f"cache needs at least one slot and one layer, got S={num_slots}, L={num_layers}")
        self.num_slots, self.num_layers = num_slots, num_layers
        self.stats = CacheStats()
        self._owner: list[Key | None] = [None] * num_slots
        self._state = [_FREE] * num_slots
        self._last_use = [-1] * num_slots
        self._used_at = np.full(num_slots, -1, dtype=np.int64)  # `_last_use` as an array (`evictable_scored`)
        # every slot, least recently used first (never used: by index), so an LRU victim is found from the
        # front without scanning the pool; `use` moves a slot to the end
        self._order: dict[int, None] = dict.fromkeys(range(num_slots))
        self._fresh = [False] * num_slots  # loaded speculatively and not used yet
        self._pinned: set[int] = set()
        self._slot_of: dict[Key, int] = {}
        self._free = set(range(num_slots))  # FREE slots, kept in step so lookups never scan the pool
        # the free slots as a heap, the lowest on top, for `first_free`; a slot taken since it was pushed stays in
        # it until it reaches the top (then it is dropped)
        self._free_heap = list(range(num_slots))
        self._by_layer: dict[int, set[int]] = {layer: set() for layer in range(num_layers)}  # occupied slots
        self._resident_of: list[set[Key]] = [set() for _ in range(num_layers)]  # resident keys per layer
        self._clock = 0
        # the same state as arrays over slots, for whole-pool questions without a Python scan (`offered_ids`):
        # owner's layer and expert (-1: free), loading, resident, fresh, pinned
        self._layer_of = np.full(num_slots, -1, dtype=np.int64)
        self._expert_of = np.full(num_slots, -1, dtype=np.int64)
        self._loading_at = np.zeros(num_slots, dtype=bool)
        self._resident_at = np.zeros(num_slots, dtype=bool)
        self._fresh_at = np.zeros(num_slots, dtype=bool)
        self._pinned_at = np.zeros(num_slots, dtype=bool)
        self._id_width, self._id_at = 0, self._layer_of  # key ids layer·width + expert per slot, once asked for
        self._grid_width, self._grid = 0, np.zeros((0, 0), dtype=bool)  # `present_grid`, once asked for

    # ---- questions about one key ---------------------------------------------------------------------
    def slot(self, key: Key) -> int | None:
        """The slot holding `key` (resident or loading), else None."""
        return self._slot_of.get(key)


    def is_present(self, key: Key) -> bool:
        """Resident or on its way."""
        return key in self._slot_of

    def is_resident(self, key: Key) -> bool:
        slot = self._slot_of.get(key)
        return slot is not None and self._state[slot] is _RESIDENT

    def is_loading(self, key: Key) -> bool:
        slot = self._slot_of.get(key)
        return slot is not None and self._state[slot] is _LOADING

    def is_warm(self, key: Key) -> bool:
        """Resident and used since it arrived (not a prefetch still waiting for its first use)."""
        slot = self._slot_of.get(key)
        return slot is not None and self._state[slot] is _RESIDENT and not self._fresh[slot]

    def is_evictable(self, key: Key) -> bool:
        """Resident and not pinned by the running layer."""
        slot = self._slot_of.get(key)
        return slot is not None and self._state[slot] is _RESIDENT and slot not in self._pinned

    def holds(self, key: Key, slot: int) -> bool:
        """`key` is in `slot` and the running layer has not pinned it (a transfer into it may be stopped)."""
        return self._slot_of.get(key) == slot and slot not in self._pinned

    # ---- questions about the pool --------------------------------------------------------------------
    @property
    def quota(self) -> int:
        """Slots per layer when the pool is split evenly (per-layer policies use it); at least one."""
        return max(1, self.num_slots // self.num_layers)

    @property
    def free_count(self) -> int:
        return len(self._free)

    def first_free(self) -> int | None:
        """The lowest free slot, None when there is none."""
        heap, free = self._free_heap, self._free
        while heap and heap[0] not in free:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def free_slots(self) -> list[int]:
        return sorted(self._free)

    def layer_size(self, layer: int) -> int:
        """Occupied slots (resident or loading) of `layer`."""
        return len(self._by_layer[layer])

    def layer_slots(self, layer: int) -> list[int]:
        return sorted(self._by_layer[layer])

    def owner(self, slot: int) -> Key | None:
        return self._owner[slot]

    def state(self, slot: int) -> SlotState:
        return self._state[slot]

    def is_pinned(self, slot: int) -> bool:
        return slot in self._pinned

    def last_used(self, slot: int) -> int:
        return self._last_use[slot]

    def present_keys(self) -> KeysView[Key]:
        """Every key resident or loading (a live view: do not assign while iterating)."""
        return self._slot_of.keys()

    def present_grid(self, width: int) -> np.ndarray:
        """[L, width] bool: key (layer, expert) resident or loading (width: above every expert); kept in step
        with every report once asked for, and returned as it is: read it, never write it."""
        if width != self._grid_width:
            self._grid, self._grid_width = np.zeros((self.num_layers, width), dtype=bool), width
            for key in self._slot_of:
                self._grid[key] = True
        return self._grid

    def keys(self, layer: int | None = None) -> list[Key]:
        return [k for k in self._owner if k is not None and (layer is None or k[0] == layer)]

    def loading_keys(self) -> list[Key]:
        """Keys whose copy is in flight, in slot order."""
        owner = self._owner
        return [owner[s] for s in self._loading_at.nonzero()[0].tolist()]

    def resident_keys(self, layers: Iterable[int]) -> frozenset[Key]:
        """The keys of `layers` that are resident (not loading)."""
        return frozenset().union(*(self._resident_of[j] for j in layers))

    def evictable(self, layer: int | None = None, protect: frozenset[Key] | set[Key] = frozenset()) -> list[int]:
        """Slots (of `layer`, or all) that are resident, not pinned and whose key is not in `protect`."""
        slots = self._by_layer[layer] if layer is not None else range(self.num_slots)
        owner, state, pinned = self._owner, self._state, self._pinned
        return [s for s in slots if state[s] is _RESIDENT and s not in pinned and owner[s] not in protect]

    def evictable_keys(self, layer: int, keep_fresh: bool = False) -> list[Key]:
        """Keys of `layer` that are resident and not pinned; with `keep_fresh`, not those a prefetch brought
        that have not been used yet either."""
        owner, state, pinned, fresh = self._owner, self._state, self._pinned, self._fresh
        return [owner[s] for s in self._by_layer[layer]
                if state[s] is _RESIDENT and s not in pinned and not (keep_fresh and fresh[s])]

    def evictable_count(self, protect: frozenset[Key] | set[Key] = frozenset()) -> int:
        """len(evictable(None, protect)), counted over the slot arrays (protect: distinct keys)."""
        held = int(np.count_nonzero(self._resident_at & ~self._pinned_at))
        return held - sum(1 for key in protect if self.is_evictable(key))

    def offered_arrays(self, keep_fresh: range, exclude: Iterable[Key] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(layer, expert) [M] of every resident, unpinned key, in slot order, except the keys in `exclude` and,
        in the layers of `keep_fresh` (consecutive), the prefetches not used yet: `evictable_keys(j,
        keep_fresh=j in keep_fresh)` of every layer j less `exclude`, without a Python scan of the pool."""
        slots = self._offered_slots(keep_fresh, exclude)
        return self._layer_of.take(slots), self._expert_of.take(slots)

    def offered_ids(self, keep_fresh: range, exclude: Iterable[Key], width: int) -> np.ndarray:
        """`offered_arrays` as key ids layer·width + expert [M] (width: above every expert), kept per slot."""
        return self._ids(width).take(self._offered_slots(keep_fresh, exclude))

    def _ids(self, width: int) -> np.ndarray:
        """Key id layer·width + expert of each slot's owner [S] (a free slot's is meaningless), kept once asked."""
        if width != self._id_width:
            self._id_at, self._id_width = self._layer_of * width + self._expert_of, width
        return self._id_at

    def _offered_slots(self, keep_fresh: range, exclude: Iterable[Key]) -> np.ndarray:
        offered, slot_of = self._resident_at & ~self._pinned_at, self._slot_of
        if len(keep_fresh):
            window = (self._layer_of - keep_fresh.start).view(np.uint64) < len(keep_fresh)  # free slots (-1) too big
            offered &= ~(window & self._fresh_at)
        for key in exclude:
            s = slot_of.get(key)
            if s is not None:
                offered[s] = False
        return offered.nonzero()[0]

    def evictable_ranked(self, protect: frozenset[Key] | set[Key], rank) -> int | None:
        """The evictable slot (key not in `protect`) whose key ranks lowest by `rank(key)`, ties by least
        recent use; None when there is none."""
        owner, last = self._owner, self._last_use
        pool = self.evictable(None, protect)
        return min(pool, key=lambda s: (rank(owner[s]), last[s])) if pool else None

    def evictable_scored(self, score: np.ndarray, width: int, protect: np.ndarray | None = None) -> int | None:
        """`evictable_ranked` over the slot arrays, without a Python scan of the pool: each key's rank read from
        `score` [L·width] (finite; integers below 2**53 are exact) by its id layer·width + expert (width: above
        every expert), the keys where the mask `protect` [L·width] is set (None: none) left out; the evictable
        slot whose key scores lowest, ties by least recent use, then by slot; None when there is none."""
        ids = self._ids(width)  # [S]; a free slot's is out of range: clipped, and left out as not resident
        scores = score.take(ids, mode="clip").astype(np.float64, copy=False)  # a new array: written below
        out = ~(self._resident_at & ~self._pinned_at)
        if protect is not None:
            out |= protect.take(ids, mode="clip")
        scores[out] = np.inf
        first = int(scores.argmin())
        if out[first]:
            return None
        tied = (scores == scores[first]).nonzero()[0]
        return first if len(tied) == 1 else int(tied[self._used_at.take(tied).argmin()])  # the least recently used

    def lru(self, slots: list[int]) -> int:
        return min(slots, key=self._last_use.__getitem__)

    def lru_evictable(self, protect: frozenset[Key] | set[Key] = frozenset()) -> int | None:
        """`lru(evictable(None, protect))` (the least recently used evictable slot of any layer, ties by slot)
        or None, found from the front of the use order: O(1) when the oldest slots are evictable, as they are
        when a layer routes more experts than its quota and takes slots from the others."""
        owner, state, pinned = self._owner, self._state, self._pinned
        for s in self._order:
            if state[s] is _RESIDENT and s not in pinned and owner[s] not in protect:
                return s
        return None

    # ---- what executors report -----------------------------------------------------------------------
    def assign(self, key: Key, slot: int, *, speculative: bool) -> Key | None:
        """Start loading `key` into `slot`; returns the key it evicted, if any."""
        if key in self._slot_of:
            raise CacheError(f"{key} is already in slot {self._slot_of[key]}")
        if slot in self._pinned or self._state[slot] is _LOADING:
            raise CacheError(f"slot {slot} holds {self._owner[slot]}, which is in use or loading")
        evicted = self._owner[slot]
        if evicted is not None:
            self._resident_of[evicted[0]].discard(evicted)
            del self._slot_of[evicted]
            self._by_layer[evicted[0]].discard(slot)
            self.stats.evictions += 1
            if self._grid_width:
                self._grid[evicted] = False
        if self._grid_width:
            self._grid[key] = True
        self._owner[slot], self._state[slot], self._slot_of[key] = key, _LOADING, slot
        self._free.discard(slot)
        self._by_layer[key[0]].add(slot)
        self._fresh[slot] = speculative
        self._layer_of[slot], self._expert_of[slot] = key
        if self._id_width:
            self._id_at[slot] = key[0] * self._id_width + key[1]
        self._loading_at[slot], self._resident_at[slot], self._fresh_at[slot] = True, False, speculative
        self.stats.loads += 1
        self.stats.prefetches += int(speculative)
        return evicted

    def vacate(self, slot: int) -> Key | None:
        """Evict the expert in `slot`, if any (its bytes are about to be overwritten); returns it."""
        key = self._owner[slot]
        if key is not None:
            self.evict(key)
        return key

    def mark_ready(self, key: Key) -> None:
        slot = self._slot_of[key]
        self._state[slot] = _RESIDENT
        self._resident_of[key[0]].add(key)
        self._loading_at[slot], self._resident_at[slot] = False, True

    def use(self, key: Key, *, hit: bool) -> None:
        """Record that the running layer computes `key` from its slot."""
        slot = self._slot_of[key]
        self._clock += 1
        self._last_use[slot] = self._used_at[slot] = self._clock
        del self._order[slot]
        self._order[slot] = None
        self.stats.hits += int(hit)
        self.stats.misses += int(not hit)
        if self._fresh[slot]:
            self._fresh[slot] = self._fresh_at[slot] = False
            self.stats.prefetches_used += 1

    def pin(self, key: Key) -> None:
        slot = self._slot_of[key]
        self._pinned.add(slot)
        self._pinned_at[slot] = True

    def unpin(self, key: Key) -> None:
        slot = self._slot_of[key]
        self._pinned.discard(slot)
        self._pinned_at[slot] = False

    def unpin_all(self) -> None:
        self._pinned.clear()
        self._pinned_at[:] = False

    def evict(self, key: Key) -> int:
        slot = self._slot_of[key]
        if slot in self._pinned:
            raise CacheError(f"{key} is pinned by the running layer")
        del self._slot_of[key]
        self._resident_of[key[0]].discard(key)
        if self._grid_width:
            self._grid[key] = False
        self._owner[slot], self._state[slot], self._fresh[slot] = None, _FREE, False
        self._layer_of[slot] = self._expert_of[slot] = -1
        self._loading_at[slot] = self._resident_at[slot] = self._fresh_at[slot] = False
        self._free.add(slot)
        heapq.heappush(self._free_heap, slot)
        self._by_layer[key[0]].discard(slot)
        self.stats.evictions += 1
        return slot

    def cancel(self, key: Key, started: bool = False) -> int:
        """Undo the assignment of `key` whose copy was stopped: its slot is free; a copy that never ran counts
        as no load, one cut part-way (`started`) stays a load (an unused prefetch: the link carried part of it)."""
        slot = self.evict(key)
        self.stats.evictions -= 1
        if not started:
            self.stats.loads -= 1
            self.stats.prefetches -= 1  # only prefetches wait in a queue (on-demand loads are issued at once)
        return slot

    def uncount_load(self, speculative: bool) -> None:
        """A load that was assigned but never moved a byte (its copy was cancelled before it started and its
        slot given to another key) counts as no load."""
        self.stats.loads -= 1
        self.stats.prefetches -= int(speculative)

    def reset_stats(self) -> None:
        self.stats = CacheStats()
