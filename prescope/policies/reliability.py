"""Online calibration of a predictor's probabilities, per lookahead distance (used by the prescope policy).

PreSched weighs a prefetch's expected saving p·τ against what it costs (the link time, the victim's chance
of being needed, the host time of the transfer), so it is only as good as the probabilities p it is given.
Predictors are not calibrated for this: the gate lookahead's softmax after water-filling (`inclusion_probs`)
is confident whether or not the later router agrees, and LLaPor was fitted on another model's traces. So
the policy measures, while it runs, how often an expert predicted with probability p at distance d was in
fact used, and replaces p by that frequency:

    bin b of [0, 1] (B equal bins):  count c_db, hits h_db, sum of predicted p  s_db
    rate_db = (h_db + a·p̄_db) / (c_db + a),  p̄_db = s_db / c_db (the bin's centre while empty)

with a prior of strength `a` observations that trusts the predictor, so the map starts as the identity
and moves to the measured frequencies as evidence arrives. The rates are made non-decreasing in p (pool
adjacent violators), and p' is the piecewise-linear interpolation of (p̄_db, rate_db) in p, between
(0, 0) and (1, (h_dB + a)/(c_dB + a)) (the top bin with p = 1 as its prior), so a fresh map is the identity
and the predictor's ranking of experts is kept where the map rises. Pending predictions are scored when their
target layer runs (its routed experts are the outcome: used by some token of the step or not).

Letters: L MoE layers, E experts, D lookahead distance, B bins.
"""

from __future__ import annotations

import numpy as np


class Reliability:
    """Per-distance reliability maps learned online; `record` predictions, `observe` outcomes, `apply` maps."""

    def __init__(self, depth: int, bins: int = 10, prior: float = 20.0):
        if depth < 1 or bins < 2 or prior <= 0:
            raise ValueError(f"Reliability needs depth >= 1, bins >= 2, prior > 0; got {depth}, {bins}, {prior}")
        self.depth, self.bins, self.prior = depth, bins, prior
        self.count = np.zeros((depth, bins))  # [D, B]
        self.hits = np.zeros((depth, bins))  # [D, B]
        self.total = np.zeros((depth, bins))  # [D, B] sum of predicted p
        self.pending: dict[int, list[tuple[int, np.ndarray]]] = {}  # target layer -> (distance, p [E])
        self._maps: list[tuple[np.ndarray, np.ndarray]] | None = None

    def record(self, layer: int, forecast: list[tuple[list[float], list[float]]]) -> None:
        """Keep layer `layer`'s predictions of layers layer+1 … (raw, before `apply`) until those layers run."""
        for d, (p, _) in enumerate(forecast[: self.depth], 1):
            self.pending.setdefault(layer + d, []).append((d, np.asarray(p)))

    def observe(self, layer: int, experts) -> None:
        """Score the predictions made for `layer` against its routed `experts`."""
        waiting = self.pending.pop(layer, None)
        if not waiting:
            return
        for d, p in waiting:
            used = np.zeros(len(p))  # [E]
            used[list(experts)] = 1.0
            b = self._bin(p)
            self.count[d - 1] += np.bincount(b, minlength=self.bins)
            self.hits[d - 1] += np.bincount(b, weights=used, minlength=self.bins)
            self.total[d - 1] += np.bincount(b, weights=p, minlength=self.bins)
        self._maps = None

    def new_step(self) -> None:
        """Predictions for layers that did not run (a step ended early) are dropped, never scored late."""
        self.pending.clear()

    def apply(self, forecast: list[tuple[list[float], list[float]]]) -> list[tuple[list[float], list[float]]]:
        """The forecast with each distance's p replaced by its calibrated value (tokens unchanged)."""
        maps = self.maps()
        out = []
        for d, (p, n) in enumerate(forecast, 1):
            x, y = maps[min(d, self.depth) - 1]
            out.append((np.interp(p, x, y).tolist(), n))
        return out

    def maps(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per distance (p̄ [B], rate [B]): the points of the calibration map, rates non-decreasing."""
        if self._maps is None:
            centre = (np.arange(self.bins) + 0.5) / self.bins  # [B]
            mean = np.where(self.count > 0, self.total / np.maximum(self.count, 1), centre)  # [D, B]
            rate = (self.hits + self.prior * mean) / (self.count + self.prior)  # [D, B]
            # end points: p = 0 maps to 0, and p = 1 to the top bin's evidence with p = 1 as its prior
            # (so a fresh map is the identity, and p = 1 is never trusted more than what was measured near it)
            top = (self.hits[:, -1] + self.prior) / (self.count[:, -1] + self.prior)  # [D]
            self._maps = []
            for d in range(self.depth):
                x, y = mean[d], _isotonic(rate[d], self.count[d] + self.prior)
                if x[0] > 0:
                    x, y = np.concatenate([[0.0], x]), np.concatenate([[0.0], y])
                if x[-1] < 1:
                    x, y = np.concatenate([x, [1.0]]), np.concatenate([y, [max(top[d], y[-1])]])
                self._maps.append((x, y))
        return self._maps

    def _bin(self, p: np.ndarray) -> np.ndarray:
        return np.minimum((p * self.bins).astype(np.int64), self.bins - 1)


def _isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The weighted least-squares non-decreasing fit of y (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [value, weight, length]
    for v, wt in zip(y.tolist(), w.tolist(), strict=True):
        blocks.append([v, wt, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.concatenate([np.full(n, v) for v, _, n in blocks])
