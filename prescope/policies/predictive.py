"""The common part of the prediction-driven policies (`peers.py`): what a policy has seen, victims, prediction.

- `Memory`: the routing seen in this run (this and the previous step's experts, decayed frequencies, the
  lag-1 reuse rate), for history-based predictions and victims' chances.
- victims: per-layer LRU with protection, the slot a plan named, or the lowest-ranked evictable key.
- `Predictive`: a policy that predicts layers l+1 … l+D from a `predictors.Predictor` (a hidden-state
  predictor's whole window runs as one CUDA graph on the GPU, `predict.graphs.GraphCache`), with `forecast`
  giving (P(used by some token of the step), expected tokens if used) per expert and layer.
- helpers the policies share: the link's state from the cache, the fastest GPU/CPU split of a layer's misses.

A routing-only LLaPor (`predict.routellapor`, `predict_masks`) is read from the Memory's [L, E] grids, packed with
k in one float32 host buffer, instead of the history's per-layer expert lists; its forecast and `_used` (k as a
tensor, `predictors.inclusion_probs`) run as one CUDA graph per layer on the GPU, eagerly on the CPU, with the same
values. Measured on the 2-core development CPU (not the H200 host), one intra-op thread, replaying the Qwen3-30B-A3B
trace with its routing-only LLaPor (`python -m prescope.experiments.planspeed --replay --predictor Q.pt
--batches 1,4,16 --steps 12 --threads 1`, Q.pt from `prescope.cli predictor-accuracy --trace
prescope/assets/data/routing/qwen3-30b-a3b.route.csv.xz --out DIR --save-predictor Q.pt`), prescope[gate=False]'s median µs
per layer, before (766c7a9, the same planspeed.py) -> after: the forecast (`_predicted`) 703 -> 457 (b1),
819 -> 454 (b4), 1043 -> 461 (b16); the whole `plan` 1068 -> 819, 1161 -> 792, 1468 -> 868 (median of 2 runs
each). On this CPU what is left of the forecast is the network's arithmetic (~300 µs: 48 layers' weights of
~2.6 MB each, read from memory); the eager ops it saves cost ~15-20 µs each on the H200 host, where the graph
leaves ~3 of them (the buffer's copy, the replay, the read). The decisions are the same: `--decisions
--predictor Q.pt --batches 1,4,16 --steps 4` gives the same six prescope digests before and after.

Letters: L MoE layers, E experts, K top-k, N tokens, D lookahead distance, S slots.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

import prescope.policies.presched as presched
from prescope.policies.base import Costs, LayerView, Policy, PolicyError, PolicyOptions
from prescope.policies.cache import ExpertCache, Key
from prescope.policies.split import Memo
from prescope.policies.window import Window

MISSING = -1  # the trace's padding expert id (prescope.routing.trace.MISSING), kept here to avoid importing pandas
UNPLANNED = object()  # a load the last plan did not foresee


# ---- what a policy has seen --------------------------------------------------------------------------------

class Memory:
    """The routing a policy has seen in this run: this step's and the previous step's experts per layer,
    token counts, and decayed activation frequencies per (layer, expert)."""

    def __init__(self, num_layers: int, num_experts: int, decay: float):
        if not 0.0 <= decay < 1.0:
            raise PolicyError(f"memory decay must be in [0, 1), got {decay}")
        self.L, self.E, self.decay = num_layers, num_experts, decay
        self.step = None
        self.now: list[dict[int, int]] = [{} for _ in range(num_layers)]
        self.prev: list[dict[int, int]] = [{} for _ in range(num_layers)]
        self.freq = np.zeros((num_layers, num_experts))  # [L, E] decayed share of steps using each expert
        self.seen = np.zeros((num_layers, num_experts))  # [L, E] tokens routed to each expert by earlier steps
        # now/prev as [L, E] masks (expert used by the layer's run this step / previous), for `PreScope.chance_grid`
        self.now_used = np.zeros((num_layers, num_experts), dtype=bool)
        self.prev_used = np.zeros((num_layers, num_experts), dtype=bool)
        # tokens per expert of those runs ([L, E], read only where the mask is set), for `previous_step_arrays`
        self.now_tokens = np.ones((num_layers, num_experts))
        self.prev_tokens = np.ones((num_layers, num_experts))
        self.min_routed = None
        self.reuse = 0.0  # decayed share of a layer's experts that its previous step also used (lag-1 reuse)

    def observe(self, view: LayerView) -> None:
        if view.step != self.step:
            self.seen += np.where(self.now_used, self.now_tokens, 0.0)  # this step's tokens per expert
            ran = [bool(now) for now in self.now]
            self.prev = [now or prev for now, prev in zip(self.now, self.prev, strict=True)]
            self.prev_used[ran] = self.now_used[ran]
            self.prev_tokens[ran] = self.now_tokens[ran]
            self.now = [{} for _ in range(self.L)]
            self.now_used[:] = False
            self.step = view.step
        self.now[view.layer] = dict(zip(view.experts, view.tokens, strict=True))
        routed = np.array(view.experts, dtype=np.intp)  # [K]
        used = self.now_used[view.layer]  # [E]
        used[:] = False
        used[routed] = True
        self.now_tokens[view.layer, routed] = view.tokens
        before = self.prev[view.layer]
        if before and view.experts:
            again = sum(map(before.__contains__, view.experts)) / len(view.experts)
            self.reuse = self.decay * self.reuse + (1.0 - self.decay) * again
        row, keep = self.freq[view.layer], self.decay
        row *= keep
        row[routed] += 1.0 - keep  # the routed experts are distinct: one addition each
        if view.experts:
            self.min_routed = min(self.min_routed or len(view.experts), len(view.experts))

    def previous_step(self, layer: int, distance: int) -> tuple[list[float], list[float]]:
        """(p, tokens) per expert of layer + distance: the previous step's experts there, used for sure."""
        p, n = [0.0] * self.E, [1.0] * self.E
        for e, count in self.prev[layer + distance].items():
            p[e], n[e] = 1.0, float(count)
        return p, n

    def previous_step_arrays(self, layer: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """`previous_step` of layers layer+1 … layer+depth as arrays (p [D, E], tokens [D, E])."""
        rows = slice(layer + 1, layer + 1 + depth)
        used = self.prev_used[rows]
        return used.astype(np.float64), np.where(used, self.prev_tokens[rows], 1.0)

    def frequency(self, layer: int) -> list[float]:
        return self.freq[layer].tolist()

    def chances(self, layer: int, experts: Sequence[int], ran: bool) -> list[float]:
        """P(the next use of `layer` routes to each of `experts`) from what was seen: its decayed frequency, and
        at least the lag-1 reuse rate if the layer's last run (`ran`: this step, else the previous) used it."""
        freq, last, reuse = self.freq[layer].tolist(), self.now[layer] if ran else self.prev[layer], self.reuse
        return [max(freq[e], reuse if e in last else 0.0) for e in experts]

    def current(self, view: LayerView):
        """[1, L, W] int64: this step's experts at layers <= view.layer, MISSING elsewhere (History.current)."""
        return _padded([list(self.now[layer]) if layer <= view.layer else [] for layer in range(self.L)])

    def history(self, view: LayerView, with_truth: bool):
        """A one-row `predictors.History` of the running step (exact at batch 1; at larger batches one
        pseudo-token holding every routed expert): this step's experts at layers <= view.layer, the previous
        step's, earlier steps' selections, and with `with_truth` the true routing incl. `view.future`."""
        import torch

        from prescope.predict.predictors import History

        now = [list(self.now[layer]) if layer <= view.layer else [] for layer in range(self.L)]
        prev = [list(self.prev[layer]) for layer in range(self.L)]
        truth = None
        if with_truth and view.future is not None:
            truth = now[:view.layer + 1] + [list(f) for f in view.future]
            truth += [[] for _ in range(self.L - len(truth))]
        width = max([1] + [len(r) for rows in (now, prev, truth or []) for r in rows])
        seq = torch.tensor(self.seen[None], dtype=torch.float32)  # [1, L, E]
        return History(_padded(now, width), _padded(prev, width), seq, None if truth is None else _padded(truth, width))


def _padded(rows: list[list[int]], width: int | None = None):
    """[1, L, W] int64 of per-layer expert lists, padded with MISSING to `width` (default: the longest, >= 1)."""
    import torch

    width = width or max([1] + [len(r) for r in rows])
    return torch.tensor([[r + [MISSING] * (width - len(r)) for r in rows]], dtype=torch.int64)


# ---- victims ----------------------------------------------------------------------------------------------

def planned_slot(cache: ExpertCache, planned, protect: set[Key]) -> int | None:
    """The slot a plan chose for a load: a free one (planned None), or its victim's while that key is still
    evictable and unprotected; None when the plan no longer applies."""
    if planned is UNPLANNED:
        return None
    if planned is None:
        return cache.first_free()
    if planned in protect or not cache.is_evictable(planned):
        return None
    return cache.slot(planned)


def ranked_victim(cache: ExpertCache, protect: set[Key], rank: Callable[[Key], float]) -> int | None:
    """A free slot, else the evictable slot whose key ranks lowest (ties: least recently used)."""
    free = cache.first_free()
    return free if free is not None else cache.evictable_ranked(protect, rank)


# ---- the common part ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PredictiveOptions(PolicyOptions):
    lookahead: int = 1  # D, the layers predicted ahead (checked at `reset` against the model and the predictor)
    memory_decay: float = 0.8  # weight of the past in the decayed activation frequencies (0.8: ~ the last 5 steps)

    def check(self) -> None:
        if self.lookahead < 1:
            raise PolicyError(f"lookahead must be >= 1 layer, got {self.lookahead}")
        if not 0.0 <= self.memory_decay < 1.0:
            raise PolicyError(f"memory decay must be in [0, 1), got {self.memory_decay}")


class Predictive(Policy):
    """A policy that predicts layers l+1 … l+D from a `predictors.Predictor` (or from what it has seen).

    predictor: a Predictor, a zero-argument factory of one, or None (the previous step's routing); the
    options are `options_type`'s.
    """

    use_graphs = True  # replay a hidden-state predictor's window from CUDA graphs (False: always eager)
    options_type = PredictiveOptions

    def __init__(self, predictor=None, **options):
        super().__init__(**options)
        self.predictor_source, self.lookahead = predictor, self.options.lookahead
        self.memory_decay = self.options.memory_decay
        self.predictor = None
        self.protect: set[Key] = set()
        self.layer, self.costs_gap = -1, 0.0
        self.graphs = None  # predict.graphs.GraphCache of the forecast, built on first use (CUDA graphs on the GPU)
        self.graphs_for = None  # the predictor those graphs call
        self.masks = None  # (host buffer, its numpy view, the device it feeds) of `_predicted_masks`

    def reset(self, cache: ExpertCache, num_experts: int, costs: Costs | None = None) -> list[Key]:
        super().reset(cache, num_experts, costs)
        L = cache.num_layers
        if self.lookahead > L - 1 and L > 1:
            raise PolicyError(f"{self.name}: lookahead {self.lookahead} reaches past the model's {L} MoE layers "
                              f"(at most {L - 1})")
        source = self.predictor_source
        self.predictor = source() if callable(source) and not hasattr(source, "predict") else source
        if self.predictor is not None:
            check_predictor(self.predictor, L, num_experts, self.lookahead, self.name)
        self.memory = Memory(L, num_experts, self.memory_decay)
        self.protect = set()
        if self.graphs_for is not self.predictor:  # the graphs replay one predictor's calls: kept across resets
            self.graphs, self.graphs_for = None, self.predictor
        if costs is not None:
            # remembered by token count (few distinct counts), as tables PreSched keeps across plans
            self.costs = dataclasses.replace(costs, gpu=Memo(costs.gpu), cpu=Memo(costs.cpu))
            self.costs_gap = costs.layer_gap
        return []

    def top_k(self) -> int:
        layout = self.predictor.layout if self.predictor is not None else None
        return layout.top_k if layout is not None else (self.memory.min_routed or 1)

    def forecast(self, view: LayerView, depth: int) -> list[tuple[list[float], list[float]]]:
        """(p, tokens) per expert for layers l+1 … l+D' (D' = min(depth, layers left)): p the probability
        that some token of the step routes to the expert, tokens the expected count if it does."""
        depth = min(depth, view.num_layers - 1 - view.layer)
        if depth <= 0:
            return []
        if self.predictor is None:
            return [self.memory.previous_step(view.layer, d) for d in range(1, depth + 1)]
        return _as_lists(self._read(self._predicted(view, depth)))

    def forecast_arrays(self, view: LayerView, depth: int) -> Window:
        """`forecast` as arrays [D', E] (`window.Window`), built without per-expert lists where the forecast
        comes from the memory or a predictor (a subclass's own `forecast` is read and converted)."""
        if type(self).forecast is not Predictive.forecast:
            return Window.of(self.forecast(view, depth), self.num_experts)
        depth = min(depth, view.num_layers - 1 - view.layer)
        if depth <= 0:
            return Window.of([], self.num_experts)
        if self.predictor is None:
            return Window(*self.memory.previous_step_arrays(view.layer, depth))
        p, n = self._read(self._predicted(view, depth))
        return Window(p, n)

    def _read(self, used) -> np.ndarray:
        """The forecast `used` [2, D', E] as a float64 array on the host (a copy: a CUDA graph's output is
        overwritten by its next replay). On a GPU the host first waits for the device to finish the work queued
        before the read, the forecast's own kernels included, and counts that wait in `forecast_wait_s` (the
        copy that follows is the host's own work); on the CPU there is nothing to wait for."""
        import torch

        used = used.detach()
        if used.is_cuda:
            began = time.perf_counter()
            torch.cuda.current_stream(used.device).synchronize()
            self.forecast_wait_s += time.perf_counter() - began
        return used.to(device="cpu", dtype=torch.float64, copy=True).numpy()

    def _predicted(self, view: LayerView, depth: int):
        """The predictor's forecast of layers l+1 … l+depth: [2, depth, E] (p, tokens), see `forecast`."""
        import torch

        from prescope.predict.predictors import History

        hidden, pred, distances = view.hidden, self.predictor, list(range(1, depth + 1))
        rows = hidden.shape[0] if hidden is not None else 1
        if not pred.needs_hidden and hasattr(pred, "predict_masks"):  # routing-only LLaPor: from Memory's masks
            k = self.top_k() if hidden is not None and rows == 1 else max(1, len(view.experts))
            return self._predicted_masks(view, depth, min(k, self.num_experts))
        if not pred.needs_hidden:  # history-based: the routing seen so far
            history = self.memory.history(view, with_truth=True)
            scores = pred.predict_window(view.layer, distances, hidden=hidden, history=history)
            k = self.top_k() if hidden is not None and rows == 1 else max(1, len(view.experts))
            return _used(torch.stack([scores[d] for d in distances]), min(k, self.num_experts))
        # hidden-state predictors read layer l's routing only if they ask for it (LLaPor's use_routing), and
        # only when it is exact (one token; with more, LLaPor routes with its own routers); the whole window
        # then runs as one CUDA graph on the GPU (its ~40 kernels cost their launches, not their arithmetic)
        if hidden is None:  # the predictor says what it needs; one that does not is refused here
            pred.predict_window(view.layer, distances, hidden=None, history=None)
            raise PolicyError(f"{self.name}: predictor {pred.name!r} reads hidden states and this "
                              "executor gives none")
        inputs = [self._predictor_input(hidden)]
        if rows == 1 and pred.uses_routing:
            inputs.append(self.memory.current(view).to(inputs[0].device, non_blocking=True))  # [1, L, K]
        k = min(self.top_k(), self.num_experts)

        def window(x, *current):
            history = History(current=current[0]) if current else None
            scores = pred.predict_window(view.layer, distances, hidden=x, history=history)
            return _used(torch.stack([scores[d] for d in distances]), k)  # [2, D', E]

        if self.graphs is None:
            from prescope.predict.graphs import GraphCache

            self.graphs = GraphCache(self.use_graphs)
        key = (view.layer, depth, *(tuple(x.shape) for x in inputs))
        return self.graphs(key, window, *inputs)

    def _predicted_masks(self, view: LayerView, depth: int, k: int):
        """`_predicted` of a predictor that reads the history as masks (`RoutingLLaPor.predict_masks`): the
        Memory's [L, E] grids (this step's experts, the previous step's, earlier steps' tokens; the same
        history `Memory.history` lists, without building it) and k, packed in one float32 host buffer
        [3·L·E + 1] that one copy moves to the predictor's device, where the forecast and `_used` run as
        one CUDA graph per layer (`graphs.GraphCache`; eagerly on the CPU)."""
        import torch

        mem, pred, L, E = self.memory, self.predictor, self.memory.L, self.memory.E
        where = torch.device(pred.device or "cpu")
        if self.masks is None or self.masks[0].shape != (3 * L * E + 1,) or self.masks[2] != where:
            # pinned for a GPU: its copy is queued, not waited for (the read waits, counted in forecast_wait_s);
            # the next call rewrites it only after that read, which has waited for the copy
            host = torch.zeros(3 * L * E + 1, dtype=torch.float32)
            host = host.pin_memory() if where.type == "cuda" else host
            self.masks = host, host.numpy(), where
        packed, values = self.masks[0], self.masks[1]
        grids = values[:-1].reshape(3, L, E)
        grids[0], grids[1], grids[2] = mem.now_used, mem.prev_used, mem.seen
        values[-1] = k
        layer = view.layer

        def window(packed):
            packed = packed.to(where, non_blocking=True)  # no-op inside a graph (its buffer is on the device)
            now, prev, seen = packed[:-1].view(3, 1, L, E)
            probs = pred.predict_masks(layer, now, prev, seen)[:, :depth]  # [1, D', E]
            return _used(probs.transpose(0, 1).contiguous(), packed[-1])  # [2, D', E]

        if self.graphs is None:
            from prescope.predict.graphs import GraphCache

            self.graphs = GraphCache(self.use_graphs)
        return self.graphs(("masks", layer, depth, L, E), window, packed, device=where)

    def _predictor_input(self, hidden):
        """The router input on the predictor's device (LLaPor's parameters live where it was loaded)."""
        where = self.predictor.device
        return hidden if where is None else hidden.to(where, non_blocking=True)


def _used(scores, k):
    """[D, N, E] scores -> [2, D, E]: P(expert used by some of the N tokens), p = 1 − Π(1 − q), and the
    expected tokens if used, Σq / p, within [1, N]. p is summed in log space: in float32 1 − (1 − q) is 0
    for q < 6e-8, which would make Σq / p explode. k: an int, or a 0-d tensor on the scores' device (one
    CUDA graph then serves every k, `inclusion_probs`)."""
    import torch

    from prescope.predict.predictors import inclusion_probs

    q = inclusion_probs(scores, k)  # [D, N, E]
    p = -torch.expm1(torch.log1p(-q).sum(dim=1))  # [D, E]; q = 1 gives log 0 = -inf, so p = 1 exactly
    n = q.sum(dim=1) / p.clamp_min(1e-30)  # [D, E]
    return torch.stack([p, n.clamp(1.0, float(scores.shape[1]))])


def _as_lists(used: np.ndarray) -> list[tuple[list[float], list[float]]]:
    """[2, D, E] on the host -> per distance (p, tokens) as lists."""
    p, n = used.tolist()
    return list(zip(p, n, strict=True))


def check_predictor(predictor, num_layers: int, num_experts: int, lookahead: int, policy: str) -> None:
    """PolicyError unless `predictor` (a `predictors.Predictor`) was built for a model with these L and E and
    answers up to `lookahead` layers ahead."""
    layout, name = predictor.layout, predictor.name or type(predictor).__name__
    if layout is not None and (layout.num_moe_layers, layout.num_experts) != (num_layers, num_experts):
        raise PolicyError(
            f"{policy}: predictor {name!r} was built for {layout.model_class} with {layout.num_moe_layers} MoE "
            f"layers and {layout.num_experts} experts, but this model has {num_layers} MoE layers and "
            f"{num_experts} experts")
    if predictor.max_distance is not None and lookahead > predictor.max_distance:
        raise PolicyError(f"{policy}: lookahead {lookahead} exceeds the {predictor.max_distance} layers predictor "
                          f"{name!r} was trained to predict")


def link_state(cache: ExpertCache, issued: Sequence[Key], load: float) -> tuple[float, dict[Key, float]]:
    """(link_free, ETA per key in flight) estimated from the cache: keys loading land one transfer apart,
    in the order this policy issued them (others first); the link is free after the last."""
    loading = cache.loading_keys()  # in slot order
    order = {k: i for i, k in enumerate(issued)}
    loading.sort(key=lambda k: order.get(k, -1))
    return load * len(loading), {k: load * (i + 1) for i, k in enumerate(loading)}


def fastest_split(view: LayerView, cache: ExpertCache, costs: Costs | None) -> tuple[list[int], list[int]]:
    """(gpu, cpu): the split of this layer's experts that ends the layer first (presched.split_finishes: misses
    loaded or on the CPU, present ones on the CPU too where that is sooner and the CPU costs no host time the
    step waits for, `Costs.host_hides_device` False), loading at most as many as there are slots to take (free,
    or held by other layers' experts)."""
    if costs is None:
        return list(view.experts), []
    routed = {(view.layer, e) for e in view.experts}
    takeable = cache.free_count + cache.evictable_count(routed)
    inst = presched.Instance(view.layer, view.experts, view.tokens, (), costs.load, costs.gpu, costs.cpu,
                             resident=frozenset(k for k in routed if cache.is_present(k)), free_slots=takeable,
                             resident_on_cpu=not costs.host_hides_device)
    finishes, present, misses, offloaded = presched.split_finishes(inst)
    m = min(range(len(finishes)), key=lambda i: (finishes[i], i))
    moved = offloaded[m]  # present experts that the CPU, beside the GPU, ends sooner
    gpu = [e for _, e, _ in present if e not in moved] + [e for e, _ in misses[:m]]
    return gpu, [e for e, _ in misses[m:]] + list(moved)
