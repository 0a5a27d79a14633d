"""The slot pool's bookkeeping: states, pins, per-layer sets and counters."""

from __future__ import annotations

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
