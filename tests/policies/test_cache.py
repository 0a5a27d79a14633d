"""The slot pool's bookkeeping: states, pins, per-layer sets and counters."""

from __future__ import annotations

import random

import numpy as np
import pytest

from prescope.policies.cache import CacheError, ExpertCache, SlotState


def test_assign_ready_use_and_evict_keep_indexes_in_step():
    cache = ExpertCache(num_slots=3, num_layers=2)
    assert cache.free_slots() == [0, 1, 2] and cache.quota == 1
    assert cache.assign((0, 5), 1, speculative=False) is None
    assert cache.state(1) is SlotState.LOADING and not cache.is_resident((0, 5)) and cache.is_present((0, 5))
    cache.mark_ready((0, 5))
    assert cache.is_resident((0, 5)) and cache.free_slots() == [0, 2] and cache.layer_slots(0) == [1]
    cache.use((0, 5), hit=True)
    assert cache.evictable() == [1] and cache.evictable(1) == []
    assert cache.assign((1, 2), 1, speculative=True) == (0, 5)
    assert cache.layer_slots(0) == [] and cache.layer_slots(1) == [1] and cache.stats.evictions == 1
    cache.mark_ready((1, 2))
    assert cache.evict((1, 2)) == 1 and cache.free_slots() == [0, 1, 2]
    assert (cache.stats.loads, cache.stats.prefetches, cache.stats.hits) == (2, 1, 1)


def test_pinned_or_loading_slots_cannot_be_taken():
    cache = ExpertCache(num_slots=2, num_layers=1)
    cache.assign((0, 1), 0, speculative=False)
    with pytest.raises(CacheError, match="in use or loading"):
        cache.assign((0, 2), 0, speculative=False)
    cache.mark_ready((0, 1))
    cache.pin((0, 1))
    with pytest.raises(CacheError):
        cache.assign((0, 2), 0, speculative=False)
    with pytest.raises(CacheError, match="pinned"):
        cache.evict((0, 1))
    cache.unpin_all()
    with pytest.raises(CacheError, match="already"):
        cache.assign((0, 1), 1, speculative=False)


def test_prefetch_precision_counts_first_use_only():
    cache = ExpertCache(num_slots=2, num_layers=1)
    cache.assign((0, 1), 0, speculative=True)
    cache.mark_ready((0, 1))
    cache.use((0, 1), hit=True)
    cache.use((0, 1), hit=True)
    assert cache.stats.prefetches_used == 1


def test_lru_picks_least_recent():
    cache = ExpertCache(num_slots=3, num_layers=1)
    for s, e in enumerate((4, 5, 6)):
        cache.assign((0, e), s, speculative=False)
        cache.mark_ready((0, e))
    for e in (5, 4, 6):
        cache.use((0, e), hit=True)
    assert cache.lru(cache.evictable()) == 1


def test_bad_sizes():
    with pytest.raises(ValueError, match="at least one slot"):
        ExpertCache(num_slots=0, num_layers=2)


def test_lru_evictable_is_the_scan_it_replaces_under_random_operations():
    """The use order kept for `lru_evictable` gives what scanning every slot gives (least recent use, ties by
    slot), `first_free` the lowest free slot, and `evictable_scored` what `evictable_ranked` gives (lowest
    score, then least recent use, then slot), through random assigns, uses, pins, evictions and cancels."""
    rng = random.Random(0)
    cache = ExpertCache(12, 4)
    for _ in range(3000):
        keys = [(layer, e) for layer in range(4) for e in range(8)]
        op = rng.random()
        if op < 0.35:
            key = rng.choice(keys)
            if not cache.is_present(key):
                slot = cache.first_free()
                if slot is None:
                    slot = cache.lru_evictable()
                if slot is not None and not cache.is_pinned(slot):
                    cache.assign(key, slot, speculative=rng.random() < 0.3)
        elif op < 0.55:
            present = [k for k in keys if cache.is_loading(k)]
            if present:
                cache.mark_ready(rng.choice(present))
        elif op < 0.8:
            resident = [k for k in keys if cache.is_resident(k)]
            if resident:
                cache.use(rng.choice(resident), hit=True)
        elif op < 0.88:
            resident = [k for k in keys if cache.is_resident(k)]
            if resident:
                cache.pin(rng.choice(resident))
        elif op < 0.93:
            cache.unpin_all()
        else:
            evictable = [k for k in keys if cache.is_evictable(k)]
            if evictable:
                cache.evict(rng.choice(evictable))
        protect = set(rng.sample(keys, rng.randrange(0, 10)))
        scan = cache.evictable(None, protect)
        assert cache.lru_evictable(protect) == (cache.lru(scan) if scan else None)
        assert cache.first_free() == min(cache.free_slots(), default=None)  # the heap's top is the lowest free slot
        # the ranked choice over the slot arrays is the scan's, with scores that tie often
        score = np.array([rng.choice((0.0, 0.5, 1.0)) for _ in range(4 * 8)])
        mask = np.zeros(4 * 8, dtype=bool)
        mask[[layer * 8 + e for layer, e in protect]] = True
        rank = lambda key, score=score: score[key[0] * 8 + key[1]]  # noqa: E731
        assert cache.evictable_scored(score, 8, mask) == cache.evictable_ranked(protect, rank)
        assert cache.evictable_scored(score, 8) == cache.evictable_ranked(set(), rank)
        layers = np.repeat(-np.arange(4), 8)  # integer scores (belady's: minus the layers to the next use)
        assert cache.evictable_scored(layers, 8, mask) == cache.evictable_ranked(protect, lambda key: -key[0])


def test_the_slot_arrays_follow_every_report():
    """`offered_arrays`, `evictable_count`, `resident_keys`, `present_grid` and `loading_keys` (read from the
    arrays and per-layer sets) equal their definitions from the slots
    after every report of a random run: assign, mark_ready, use, pin, unpin, unpin_all, evict, cancel."""
    rng, cache = random.Random(5), ExpertCache(12, 4)
    for _ in range(600):
        keys = [cache.owner(s) for s in range(12) if cache.owner(s) is not None]
        op = rng.randrange(7)
        if op == 0:
            key, slot = (rng.randrange(4), rng.randrange(6)), rng.randrange(12)
            if not cache.is_present(key) and not cache.is_pinned(slot) and cache.state(slot) is not SlotState.LOADING:
                cache.assign(key, slot, speculative=rng.random() < 0.5)
        elif keys and op == 1:
            key = rng.choice(keys)
            if cache.is_loading(key):
                cache.mark_ready(key)
        elif keys and op == 2:
            cache.use(rng.choice(keys), hit=True)
        elif keys and op == 3:
            cache.pin(rng.choice(keys))
        elif keys and op == 4:
            cache.unpin(rng.choice(keys)) if rng.random() < 0.8 else cache.unpin_all()
        elif keys and op == 5:
            key = rng.choice(keys)
            if not cache.is_pinned(cache.slot(key)):
                cache.cancel(key) if cache.is_loading(key) and rng.random() < 0.5 else cache.evict(key)
        assert cache.loading_keys() == [cache.owner(s) for s in range(12) if cache.state(s) is SlotState.LOADING]
        window, exclude = range(rng.randrange(4), rng.randrange(5)), set(rng.sample(keys, min(len(keys), 3)))
        layers, experts = cache.offered_arrays(window, exclude)
        want = [key for layer in range(4) for key in cache.evictable_keys(layer, keep_fresh=layer in window)
                if key not in exclude]
        assert sorted(zip(layers.tolist(), experts.tolist(), strict=True)) == sorted(want)
        assert cache.offered_ids(window, exclude, 7).tolist() == (layers * 7 + experts).tolist()
        assert cache.evictable_count(exclude) == len(cache.evictable(None, exclude))
        grid = np.zeros((4, 7), dtype=bool)  # asked for from the first report on: kept in step since
        for key in cache.present_keys():
            grid[key] = True
        np.testing.assert_array_equal(cache.present_grid(7), grid)
        assert cache.resident_keys(window) == {cache.owner(s) for s in range(12) if cache.state(s) is
                                               SlotState.RESIDENT and cache.owner(s)[0] in window}
