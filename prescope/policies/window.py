"""PreScope's planning inputs over arrays: the forecast of the window as arrays, the candidates PreSched is
offered, their layers' expected compute, and the cheapest victims, each equal to its straightforward
definition (tests/policies/test_peers_reference.py keeps those and compares them on real replays).

A planned layer builds them once; each is a few numpy operations over [D, E] or over the pool's evictable
keys, or a short Python loop over what a layer routes or is offered, never a Python loop over the pool.

Letters: L MoE layers, E experts, D lookahead distance, M evictable keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import repeat

import numpy as np

from prescope.policies.instance import Candidate, Held

Key = tuple[int, int]


class Window:
    """The forecast of layers l+1 … l+D as arrays: p [D, E], the probability that some token of the step
    routes to each expert, and n [D, E], the tokens it gets if so. Reads as the list of (p, n) rows that
    `Predictive.forecast` gives (len, index, iteration), with rows as arrays."""

    __slots__ = ("p", "n")

    def __init__(self, p: np.ndarray, n: np.ndarray):
        self.p, self.n = p, n

    @classmethod
    def of(cls, forecast, num_experts: int) -> Window:
        """A Window of a forecast given as (p, n) rows (a Window is returned as it is)."""
        if isinstance(forecast, Window):
            return forecast
        p = np.array([p for p, _ in forecast], dtype=np.float64).reshape(len(forecast), num_experts)
        n = np.array([n for _, n in forecast], dtype=np.float64).reshape(len(forecast), num_experts)
        return cls(p, n)

    def __len__(self) -> int:
        return len(self.p)

    def __getitem__(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        return self.p[d], self.n[d]

    def __iter__(self):
        return zip(self.p, self.n, strict=True)


def absent(window: Window, present: np.ndarray, worth: float) -> list[list[int]]:
    """Per distance d = 1 … D, the experts of layer l+d (ascending) with p > worth that are not present
    (`present` [D, E]: layers l+1 … l+D's keys resident or loading, rows of `ExpertCache.present_grid`)."""
    out: list[list[int]] = [[] for _ in range(len(window))]
    rows, experts = ((window.p > worth) & ~present).nonzero()  # row-major: experts ascending within a row
    for d, e in zip(rows.tolist(), experts.tolist(), strict=True):
        out[d].append(e)
    return out


def candidates(window: Window, offered: Sequence[list[int]], keep: int) -> tuple[tuple[Candidate, ...], ...]:
    """Per distance, the `keep` likeliest of `offered` (ties by expert) as Candidates (tokens rounded, >= 1)."""
    E = window.p.shape[1]
    at = [d * E + e for d, experts in enumerate(offered) for e in experts]
    probs, tokens = window.p.take(at).tolist(), window.n.take(at).tolist()  # one read of each for every row
    out, i = [], 0
    for experts in offered:
        row = sorted(range(i, i + len(experts)), key=probs.__getitem__, reverse=True)[:keep]  # stable: by expert
        out.append(tuple(Candidate(experts[j - i], probs[j], max(1, round(tokens[j]))) for j in row))
        i += len(experts)
    return tuple(out)


class ComputeTable:
    """c_d = Σ_e p_e·gpu(round(n_e)) (n_e >= 1) of each window layer, from a table of gpu() by token count that
    grows to the largest count seen (n <= the step's tokens, so it stays as small as the batch)."""

    def __init__(self, gpu: Callable[[float], float]):
        self.gpu, self.table = gpu, np.zeros(1)

    def expected(self, window: Window) -> tuple[float, ...]:
        if not len(window):
            return ()
        tokens = np.rint(window.n)  # [D, E]
        at = np.maximum(tokens, 1.0, out=tokens).astype(np.intp)
        top = int(at.max())
        if len(self.table) <= top:
            self.table = np.array([0.0] + [self.gpu(c) for c in range(1, top + 1)])
        times, p = self.table.take(at), np.maximum(window.p, 0.0)  # [D, E]
        return tuple([float(np.dot(p[d], times[d])) for d in range(len(p))])


def smallest_ids(n: int, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of the n smallest (q, id) pairs of arrays [M] (distinct ids), ascending; only those at or
    under the n-th smallest q are sorted."""
    if not len(q) > n > 0:
        return np.lexsort((ids, q))[:n]
    near = (q <= np.partition(q, n - 1)[n - 1]).nonzero()[0]
    return near.take(np.lexsort((ids.take(near), q.take(near)))[:n])


def cheapest_held(n: int, q: np.ndarray, ids: np.ndarray, width: int) -> tuple[Held, ...]:
    """The n cheapest victims as PreSched's Held, chances capped at 1, from chances q [M] and key ids [M]
    (layer·width + expert)."""
    first = smallest_ids(n, q, ids)
    probs = np.fmin(q.take(first), 1.0).tolist()  # min(1.0, c), NaN included
    keys = map(divmod, ids.take(first).tolist(), repeat(width))
    return tuple(map(tuple.__new__, repeat(Held), zip(keys, probs, repeat(1.0))))  # Held(key, prob), no call each
