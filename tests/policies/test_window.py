"""window.py: the forecast as arrays reads like the forecast's lists, and each input equals its definition on
hand-made cases (the replays' comparison is tests/policies/test_peers_reference.py)."""

from __future__ import annotations

import heapq

import numpy as np

from prescope.policies.instance import Candidate
from prescope.policies.window import ComputeTable, Window, absent, candidates, cheapest_held


def test_a_window_reads_like_the_lists_it_was_made_of():
    lists = [([0.5, 0.0, 1.0], [2.0, 1.0, 3.0]), ([0.1, 0.2, 0.3], [1.0, 1.0, 1.0])]
    w = Window.of(lists, 3)
    assert len(w) == 2 and Window.of(w, 3) is w
    assert [(p.tolist(), n.tolist()) for p, n in w] == lists
    assert w[1][0][2] == 0.3
    assert len(Window.of([], 3)) == 0 and Window.of([], 3).p.shape == (0, 3)


def test_candidates_are_the_likeliest_absent_experts_worth_a_transfer_ties_by_expert():
    w = Window.of([([0.5, 0.9, 0.5, 0.05], [1.4, 2.6, 1.0, 1.0]), ([0.0, 0.0, 0.0, 0.0], [1.0] * 4)], 4)
    offered = absent(w, np.array([[False, True, False, False], [False] * 4]), worth=0.1)
    assert offered == [[0, 2], []]
    assert candidates(w, offered, keep=1) == ((Candidate(0, 0.5, 1),), ())
    assert candidates(w, absent(w, np.zeros((2, 4), dtype=bool), 0.1), keep=3) == ((Candidate(1, 0.9, 3), Candidate(0, 0.5, 1),
                                                                 Candidate(2, 0.5, 1)), ())


def test_expected_compute_weighs_each_experts_time_at_its_rounded_tokens():
    table = ComputeTable(lambda n: 10.0 * n)
    w = Window.of([([0.5, 1.0], [0.2, 2.6])], 2)
    assert table.expected(w) == (0.5 * 10.0 + 1.0 * 30.0,)
    assert table.expected(Window.of([], 2)) == ()


def test_the_cheapest_victims_are_the_smallest_pairs_with_ties_by_key():
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = int(rng.integers(0, 40))
        q = rng.choice([0.0, 0.25, 0.5, 1.0, 1.5], size=m)
        keys = rng.permutation(np.array([(j, e) for j in range(5) for e in range(8)]))[:m].reshape(m, 2)
        n = int(rng.integers(0, 45))
        pairs = [(float(x), (int(j), int(e))) for x, (j, e) in zip(q, keys, strict=True)]
        got = heapq.nsmallest(n, pairs)
        assert [(h.key, h.prob) for h in cheapest_held(n, q, keys[:, 0] * 8 + keys[:, 1], 8)] == [
            (k, min(1.0, x)) for x, k in got]
