"""LLaPor, the learnable layer-aware predictor (DESIGN.md §4.2): one small network per MoE layer.

The network of MoE layer l predicts the top-K sets of layers l+1 … l+D' (D' = min(D, L-1-l)) from what is
known when layer l runs: the hidden state entering it, compressed by a PCA fitted on training traces
(torch, any device); optionally layer l's own routing (top-K multi-hot); and optionally the gate lookahead
(router of layer l+d applied to that hidden state; DESIGN.md §4.7: a plain MLP did not beat it). With the
lookahead on, the network learns a correction to it:

    z_d = a_d · g_d + b_d + head_d(trunk([pca(x), r, g_1..g_D'])),   g_d = log_softmax(router_{l+d}(x))

with head_d zero-initialised, so training starts from the lookahead's ranking (after calibrating a_d, b_d). Layer groups get different
trunks: near-input and near-output layers Linear → GELU → Dropout blocks; middle layers add a residual
block h + σ(W_g h) ⊙ f(h) whose update a learned sigmoid gate opens per feature. Group boundaries are
derived from routing statistics (`derive_groups`: change points of adjacent-layer NMI, gate sharpness and
hot-expert concentration over depth) unless overridden.

Training: multi-label targets (the top-K set), loss = frequency-weighted BCE + λ·focal,
    BCE_w = −mean[w_e·y·log σ(z) + (1 − y)·log(1 − σ(z))],  w_e = ((1 − f_e) / f_e)^freq_power
    focal = mean[(1 − p_t)^γ · BCE(z, y)],                p_t = σ(z) if y = 1 else 1 − σ(z)
(f_e: training frequency of expert e at the target layer); a split by prompt (never by token); AdamW;
early stopping on the validation split's recall@K (the state before training, i.e. the lookahead alone,
is a candidate); seeds fixed per layer. Before that, a_d and b_d alone are calibrated by L-BFGS
(`calibrate_steps`), so gradient steps on the trunk start from the calibrated lookahead rather than first
scrambling its ranking (measured: without it the first epochs lose 4-5 points of validation recall).

The configuration (`LLaPorConfig`) and the command's options live in `llaporconfig`, which needs no torch.

Letters: L MoE layers, E experts, K top-k, N tokens, H hidden, P PCA components, D lookahead distance.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from prescope.files import check_output, verify, write_archive_with
from prescope.layout import ModelLayout
from prescope.predict.layerpool import default_processes, map_layers
from prescope.predict.llaporconfig import GROUPS, LLaPorConfig, LLaPorError
from prescope.predict.predictors import LinearRouters, Predictor, check_target, multi_hot
from prescope.routing import stats as routing_stats
from prescope.routing.reader import read_trace
from prescope.routing.trace import Trace

FORMAT, FORMAT_VERSION = "prescope.predict.llapor", 1


# ---------------------------------------------------------------------------------------------- layer groups


def group_curves(trace: Trace) -> pd.DataFrame:
    """Per layer: adjacent-layer routing NMI (mean over its neighbours), top-1 gate weight (sharpness) and
    hot_share (share of selections taken by the layer's K most used experts: concentration)."""
    L, K = trace.layout.num_moe_layers, trace.layout.top_k
    nmi = routing_stats.cross_layer(trace)["nmi"].to_numpy() if L > 1 else np.zeros(0)
    adjacent = [np.nanmean([nmi[i] for i in (o - 1, o) if 0 <= i < len(nmi)] or [np.nan]) for o in range(L)]
    counts = np.sort(routing_stats.selection_counts(trace), axis=1)[:, ::-1]  # [L, E]
    hot = counts[:, :K].sum(1) / np.maximum(counts.sum(1), 1)
    top1 = routing_stats.gate_weights(trace)["top1_weight"].to_numpy()
    return pd.DataFrame({"layer": np.arange(L), "adjacent_nmi": adjacent, "top1_weight": top1, "hot_share": hot})


def change_points(z: np.ndarray, min_layers: int) -> tuple[int, int]:
    """Boundaries a < b splitting the rows of z [L, M] into [0, a), [a, b), [b, L) with the least total
    within-segment sum of squares (exhaustive search), each segment >= m = max(1, min(min_layers, L // 3))
    rows; (L, L) when L < 3 (one group)."""
    L = len(z)
    m = max(1, min(min_layers, L // 3))

    def cost(a: int, b: int) -> float:
        return float(((z[a:b] - z[a:b].mean(0)) ** 2).sum()) if b > a else 0.0

    pairs = [(a, b) for a in range(m, L) for b in range(a + m, L - m + 1)]
    return min(pairs, key=lambda ab: cost(0, ab[0]) + cost(*ab) + cost(ab[1], L)) if pairs else (L, L)


def derive_groups(trace: Trace, min_layers: int = 2) -> tuple[tuple[int, int], pd.DataFrame]:
    """(first middle layer, first near-output layer) from `change_points` of the `group_curves`, each
    z-scored over layers, and the tidy table (layer, metric, value, zscore, group)."""
    curves = group_curves(trace)
    metrics = [c for c in curves.columns if c != "layer"]
    values = curves[metrics].to_numpy(dtype=np.float64)  # [L, 3]
    std = np.nanstd(values, 0)
    z = np.nan_to_num((values - np.nanmean(values, 0)) / np.where(std > 0, std, 1.0))
    bounds = change_points(z, min_layers)
    table = curves.melt(id_vars="layer", var_name="metric", value_name="value")
    table["zscore"] = z.T.reshape(-1)
    table["group"] = [group_of(layer, bounds) for layer in table["layer"]]
    table.attrs["boundaries"] = bounds
    return bounds, table


def group_of(layer: int, boundaries: tuple[int, int]) -> str:
    return GROUPS[0] if layer < boundaries[0] else GROUPS[1] if layer < boundaries[1] else GROUPS[2]


# ---------------------------------------------------------------------------------------------- networks


class PCA(nn.Module):
    """Whitened projection onto the top P principal directions: z = (x − μ) V / s."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)  # [H]
        self.register_buffer("components", components)  # [H, P]
        self.register_buffer("scale", scale)  # [P]

    @classmethod
    def fit(cls, x: torch.Tensor, dim: int) -> PCA:
        x = x.float()  # [T, H]
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        p = min(dim, vh.shape[0])
        return cls(mean, vh[:p].T.contiguous(), (s[:p] / max(len(x) - 1, 1) ** 0.5).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) @ self.components / self.scale  # [N, P]


class GatedResidual(nn.Module):
    """h + σ(W_g h) ⊙ f(h), f = Linear → GELU → Dropout → Linear."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.update = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width))
        self.gate = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.sigmoid(self.gate(h)) * self.update(h)


class LayerNet(nn.Module):
    """One MoE layer's predictor: standardised inputs → trunk (by group) → a correction per target layer."""

    def __init__(self, in_dim: int, targets: int, num_experts: int, group: str, config: LLaPorConfig):
        super().__init__()
        self.targets, self.num_experts = targets, num_experts
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("spread", torch.ones(in_dim))
        blocks: list[nn.Module] = []
        for i in range(config.edge_depth):
            blocks += [nn.Linear(in_dim if i == 0 else config.width, config.width), nn.GELU(), nn.Dropout(config.dropout)]
        if group == "middle":
            blocks.append(GatedResidual(config.width, config.dropout))
        self.trunk = nn.Sequential(*blocks)
        self.head = nn.Linear(config.width, targets * num_experts)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.lookahead_scale = nn.Parameter(torch.ones(targets, 1))  # a_d
        self.bias = nn.Parameter(torch.zeros(targets, num_experts))  # b_d

    def forward(self, x: torch.Tensor, lookahead: torch.Tensor | None) -> torch.Tensor:
        out = self.head(self.trunk((x - self.shift) / self.spread)).view(-1, self.targets, self.num_experts)
        out = out + self.bias  # [N, D', E]
        return out if lookahead is None else out + self.lookahead_scale * lookahead


# ---------------------------------------------------------------------------------------------- the predictor


class LLaPor(Predictor):
    name = "llapor"
    imitates = "PreScope's LLaPor (Yu et al. 2025)"
    needs_hidden = True
    min_distance = 1

    def __init__(self, config: LLaPorConfig, layout: ModelLayout, boundaries: tuple[int, int],
                 pcas: list[PCA], nets: list[LayerNet], routers: LinearRouters | None, trace_info: dict | None = None,
                 history: list[dict] | None = None):
        self.config, self.layout, self.boundaries = config, layout, tuple(boundaries)
        self.max_distance, self.uses_routing, self.device = config.distance, config.use_routing, config.device
        self.pcas, self.nets, self.routers = pcas, nets, routers
        self.trace_info, self.history = trace_info or {}, history or []
        if config.use_lookahead and routers is None:
            raise LLaPorError("use_lookahead=True needs routers")
        self._stacked: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # layer -> routers l..l+D'

    def targets(self, layer: int) -> int:
        return min(self.config.distance, self.layout.num_moe_layers - 1 - layer)

    def features(self, layer: int, hidden: torch.Tensor, routing: torch.Tensor | None,
                 logits: torch.Tensor | None = None):
        """(x [N, P (+E) (+D'E)], lookahead [N, D', E] | None) for the network of `layer`; `logits` are the
        routers l … l+D' on `hidden` when the caller has them (`router_logits`)."""
        hidden = hidden.to(self.pcas[layer].mean.device).float()  # [N, H]
        parts, g = [self.pcas[layer](hidden)], None
        if self.config.use_routing:
            if routing is None:
                raise LLaPorError("this LLaPor uses layer l's routing: pass history (current experts) or routers")
            parts.append(multi_hot(routing.to(hidden.device), self.layout.num_experts))
        if self.config.use_lookahead:
            logits = self.router_logits(layer, hidden) if logits is None else logits
            g = torch.log_softmax(logits[:, 1:], -1)  # [N, D', E]
            parts.append(g.flatten(1))
        return torch.cat(parts, 1), g

    def router_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """[N, 1+D', E]: the routers of layers l … l+D' on `hidden`, in one matrix product (at decode the
        prediction's cost is its number of kernels, not its arithmetic)."""
        if layer not in self._stacked:
            span = range(layer, layer + self.targets(layer) + 1)
            weight = torch.cat([self.routers.weight[j] for j in span]).to(hidden.device)  # [(1+D')E, H]
            bias = None if self.routers.bias is None else torch.cat([self.routers.bias[j] for j in span]).to(hidden.device)
            self._stacked[layer] = (weight, bias)
        weight, bias = self._stacked[layer]
        out = hidden.float() @ weight.T if bias is None else torch.addmm(bias, hidden.float(), weight.T)
        return out.view(hidden.shape[0], -1, self.layout.num_experts)

    def _routing(self, layer: int, hidden: torch.Tensor, history, logits: torch.Tensor | None = None):
        if not self.config.use_routing:
            return None
        if history is not None:
            return history.current[:, layer]  # [N, K]
        if self.routers is None:
            raise LLaPorError("this LLaPor uses layer l's routing: pass history=History(current=...)")
        own = logits[:, 0] if logits is not None else self.routers.logits(layer, hidden)  # [N, E]
        return own.topk(self.layout.top_k, dim=-1).indices

    def predict_window(self, layer, distances, *, hidden=None, history=None):
        for d in distances:
            check_target(layer, d, self.layout.num_moe_layers, self.config.distance)
            if d < 1:
                raise LLaPorError(f"LLaPor predicts distances 1..{self.config.distance}, got {d}")
        x = self._needs("hidden", hidden, "the router input [N, H] entering `layer`")
        if x.shape[-1] != self.pcas[layer].mean.shape[0]:
            raise LLaPorError(f"hidden has width {x.shape[-1]}, this LLaPor was trained on H={self.pcas[layer].mean.shape[0]}")
        net = self.nets[layer]  # in eval mode since training or loading
        with torch.inference_mode():
            x = x.to(self.pcas[layer].mean.device).float()  # [N, H]
            logits = self.router_logits(layer, x) if self.routers is not None else None
            feats, g = self.features(layer, x, self._routing(layer, x, history, logits), logits)
            probs = torch.sigmoid(net(feats, g))  # [N, D', E]
        return {d: probs[:, d - 1] for d in distances}

    def predict(self, layer, distance, *, hidden=None, history=None):
        return self.predict_window(layer, [distance], hidden=hidden, history=history)[distance]

    # ---- checkpoint ---------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """torch checkpoint with config, layout, trace identity, PCA, routers and networks; written atomically,
        checksummed in the archive's comment (`files.write_archive_with`)."""
        path = Path(path)
        blob = {"format": FORMAT, "version": FORMAT_VERSION, "config": asdict(self.config),
                "layout": self.layout.to_dict(), "boundaries": list(self.boundaries),
                "trace": json.dumps(self.trace_info, default=str), "history": json.dumps(self.history),
                "pca": [p.state_dict() for p in self.pcas], "nets": [n.state_dict() for n in self.nets],
                "routers": None if self.routers is None else self.routers.state()}
        return write_archive_with(path, lambda tmp: torch.save(blob, tmp))


def read_checkpoint(path: Path, device: str, what: str, fmt: str | None = None, version: int | None = None):
    """The object a predictor checkpoint holds, read safely (weights only) after its checksum: FileNotFoundError
    when it is missing, LLaPorError when torch cannot read it (`what` names the kind in the messages) or, with
    `fmt`, when it is not a dict of that format and `version`."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint {path} does not exist")
    verify(path)
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip/pickle
        raise LLaPorError(f"{path} is not a readable {what} checkpoint (corrupt or truncated?): "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None
    if fmt is not None:
        check_header(path, blob, what, fmt, version)
    return blob


def check_header(path: Path, blob, what: str, fmt: str, version: int | None) -> None:
    """LLaPorError unless `blob` is a checkpoint dict of format `fmt` and `version`."""
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise LLaPorError(f"{path} is not a {what} checkpoint (format {fmt!r} missing)")
    if blob.get("version") != version:
        raise LLaPorError(f"{path}: checkpoint version {blob.get('version')!r}; this prescope reads {version}")


def load(path, device: str = "cpu") -> LLaPor:
    """Read a checkpoint written by `LLaPor.save`; LLaPorError for a corrupt, foreign or newer file,
    `files.ChecksumError` for one whose bytes changed since it was written."""
    path = Path(path)
    return from_checkpoint(path, read_checkpoint(path, device, "LLaPor", FORMAT, FORMAT_VERSION), device)


def from_checkpoint(path: Path, blob: dict, device: str = "cpu") -> LLaPor:
    """The LLaPor in `blob`, a checkpoint read from `path` whose header `check_header` passed."""
    try:
        config = LLaPorConfig(**{**blob["config"], "device": device})
        layout = ModelLayout.from_dict(blob["layout"])
        bounds = tuple(blob["boundaries"])
        pcas = [PCA(state["mean"], state["components"], state["scale"]) for state in blob["pca"]]
        r = blob["routers"]
        routers = None if r is None else LinearRouters(r["weight"], r["bias"])
        nets = []
        for layer, state in enumerate(blob["nets"]):
            targets = state["bias"].shape[0]
            net = LayerNet(state["shift"].shape[0], targets, layout.num_experts, group_of(layer, bounds), config)
            net.load_state_dict(state)
            nets.append(net.to(device).eval())
        return LLaPor(config, layout, bounds, pcas, nets, routers, json.loads(blob["trace"]), json.loads(blob["history"]))
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        reason = " ".join(str(exc).split())  # torch's messages span lines; ours is one
        raise LLaPorError(f"{path}: corrupt LLaPor checkpoint: {type(exc).__name__}: {reason}") from None


# ---------------------------------------------------------------------------------------------- training


def trace_fingerprint(trace: Trace) -> str:
    """sha256 over the trace's routing, token positions and hidden states: names the training data."""
    h = hashlib.sha256()
    for arr in (trace.experts, trace.weights, trace.tokens[["prompt", "position"]].to_numpy(), trace.hidden):
        if arr is not None:
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def loss_fn(logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor, config: LLaPorConfig) -> torch.Tensor:
    """Frequency-weighted BCE + focal_weight · focal term (formulas in the module docstring)."""
    weighted = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
    plain = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    return weighted + config.focal_weight * ((1 - p_t) ** config.focal_gamma * plain).mean()


def positive_weight(target: torch.Tensor, config: LLaPorConfig) -> torch.Tensor:
    """[D', E] BCE weight of a positive, ((1 - f) / f) ** freq_power by each expert's frequency f in `target`
    [N, D', E] (f kept inside [1/N, 1 - 1/N])."""
    freq = target.mean(0).clamp(1 / len(target), 1 - 1 / len(target))
    return ((1 - freq) / freq) ** config.freq_power


def _recall(logits: torch.Tensor, target: torch.Tensor, k: int) -> float:
    top = logits.topk(k, dim=-1).indices  # [N, D', k]
    return float(target.gather(-1, top).sum() / target.sum().clamp_min(1))


def _layer_data(model: LLaPor, trace: Trace, layer: int):
    device = model.config.device
    hidden = torch.from_numpy(trace.hidden[:, layer]).to(device)  # [T, H]
    routing = torch.from_numpy(trace.experts[:, layer]) if model.config.use_routing else None
    with torch.no_grad():
        x, g = model.features(layer, hidden, routing)
    L, E = trace.layout.num_moe_layers, trace.layout.num_experts
    exp = torch.from_numpy(trace.experts)
    y = torch.stack([multi_hot(exp[:, t], E) for t in range(layer + 1, min(L, layer + 1 + model.targets(layer)))], 1)
    return x, g, y.to(device)  # [T, F], [T, D', E] | None, [T, D', E]


def _calibrate(net: LayerNet, train, pos_weight: torch.Tensor, config: LLaPorConfig) -> None:
    """Fit a_d and b_d alone first (L-BFGS, full batch, the correction head still zero): training then starts
    from the calibrated lookahead (or, without it, the popularity prior) instead of first scrambling it."""
    x, g, y = train
    with torch.no_grad():
        base = net.head(net.trunk((x - net.shift) / net.spread)).view(-1, net.targets, net.num_experts)
    opt = torch.optim.LBFGS([net.lookahead_scale, net.bias], max_iter=config.calibrate_steps,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = base + net.bias + (0 if g is None else net.lookahead_scale * g)
        loss = loss_fn(out, y, pos_weight, config)
        loss.backward()
        return loss

    opt.step(closure)


@contextlib.contextmanager
def seeded(seed: int, device: str = "cpu"):
    """Every random draw inside (initial weights, dropout) from `seed`, and the caller's RNG state unchanged.

    LLaPor was not reproducible: layer 0's network was built before any seeding, so its initial weights came
    from whatever global RNG state the process had reached (a loaded model, an earlier training), and its
    early stopping (23 epochs in one run, 17 in another) followed; later layers were built after the previous
    layer's `torch.manual_seed`, so they happened to repeat. Threads matter too: the CPU splits a float sum
    over its intra-op threads, so one and two threads trained different weights (0.2-2 points of recall apart
    on a real trace); inside, the CPU runs one thread (the networks are small; the caller's count is
    restored). Deterministic algorithms are asked for (on the GPU, atomics in backward passes would otherwise
    reorder sums), without erroring where none exists."""
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _train_net(net: LayerNet, train, valid, pos_weight, config: LLaPorConfig, k: int, seed: int) -> dict:
    """AdamW on minibatches; keeps the best state on validation (the untrained start included). Call it inside
    `seeded` (dropout draws from the global RNG); the minibatch order comes from its own generator."""
    gen = torch.Generator().manual_seed(seed)
    x, g, y = train
    xv, gv, yv = valid

    def score() -> tuple[float, float]:
        net.eval()
        with torch.no_grad():
            out = net(xv, gv)
            return float(loss_fn(out, yv, pos_weight, config)), _recall(out, yv, k)

    raw = score()[1]
    if config.calibrate_steps:
        _calibrate(net, (x, g, y), pos_weight, config)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss0, rec0 = score()
    best, best_state, stale, curve = (rec0 if config.monitor == "recall" else -loss0), copy.deepcopy(net.state_dict()), 0, []
    for epoch in range(config.max_epochs):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        for b in range(0, len(x), config.batch_size):
            idx = order[b:b + config.batch_size]
            loss = loss_fn(net(x[idx], None if g is None else g[idx]), y[idx], pos_weight, config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        vloss, vrec = score()
        curve.append({"epoch": epoch + 1, "valid_loss": vloss, "valid_recall": vrec})
        value = vrec if config.monitor == "recall" else -vloss
        if value > best:
            best, best_state, stale = value, copy.deepcopy(net.state_dict()), 0
        else:
            stale += 1
            if stale > config.patience:
                break
    net.load_state_dict(best_state)
    return {"raw_valid_recall": raw, "start_valid_loss": loss0, "start_valid_recall": rec0, "curve": curve,
            "best_valid_recall": max([rec0] + [c["valid_recall"] for c in curve])}


def _train_layer(model: LLaPor, train: Trace, valid: Trace, o: int) -> tuple[LayerNet, dict | None]:
    """Layer `o`'s network, trained, and its history record (None for the last layer, which has nothing ahead).
    Everything inside runs seeded with `seed + o` on one thread, in this process or a worker: the result is the
    same whichever process trains it."""
    config, E, K = model.config, model.layout.num_experts, model.layout.top_k
    group, device, targets = group_of(o, model.boundaries), config.device, model.targets(o)
    with seeded(config.seed + o, device):  # the net's initial weights too, not only its training
        if targets == 0:  # an empty net keeps indices aligned
            return LayerNet(1, 1, E, group, config).to(device).eval(), None
        start = time.perf_counter()
        tr, va = _layer_data(model, train, o), _layer_data(model, valid, o)
        net = LayerNet(tr[0].shape[1], targets, E, group, config).to(device)
        net.shift.copy_(tr[0].mean(0))
        net.spread.copy_(tr[0].std(0).clamp_min(1e-3))
        record = _train_net(net, tr, va, positive_weight(tr[2], config), config, K, config.seed + o)
    return net.eval(), {"layer": o, "group": group, **record, "seconds": time.perf_counter() - start}


def train_llapor(trace: Trace, config: LLaPorConfig | None = None, *, routers: LinearRouters | None = None,
                 progress: bool = True, processes: int | None = None) -> LLaPor:
    """Train LLaPor on `trace` (needs hidden states; router logits too unless `routers` are given) with
    `config` (None = the defaults). `processes`: worker processes training layers at once (None:
    `layerpool.default_processes`); each layer is seeded and single-threaded, so the weights do not depend on it."""
    config = LLaPorConfig() if config is None else config
    if trace.hidden is None:
        raise LLaPorError("LLaPor needs a trace with hidden states (record_trace(..., keep_hidden=True)); "
                          "imported llama.cpp traces have none")
    L = trace.layout.num_moe_layers
    if L < 2:
        raise LLaPorError(f"LLaPor predicts later layers; the trace has {L} MoE layer")
    if not trace.present.all():
        raise LLaPorError("LLaPor needs every (token, layer) routed; the trace has MISSING entries")
    if processes is not None and processes < 1:
        raise LLaPorError(f"processes must be >= 1 (or None: one per core), got {processes}")
    valid, train = trace.split_by_prompt(config.valid_fraction, config.seed)
    if config.use_lookahead and routers is None:
        if train.logits is None:
            raise LLaPorError("use_lookahead needs router logits in the trace (keep_logits=True) or "
                              "routers=LinearRouters.from_model(model)")
        routers = LinearRouters.fit(train)
    if routers is not None and routers.num_layers != L:
        raise LLaPorError(f"routers cover {routers.num_layers} layers, the trace has {L}")
    if config.group_boundaries and config.group_boundaries[1] > L:
        raise LLaPorError(f"group_boundaries {config.group_boundaries} reach past the trace's {L} MoE layers; give "
                          f"(first middle, first near-output) layers with a <= b <= {L}")
    bounds, table = (config.group_boundaries, None) if config.group_boundaries else derive_groups(train, config.min_group_layers)
    device = config.device
    pcas = [PCA.fit(torch.from_numpy(train.hidden[:, o]).to(device), config.pca_dim) for o in range(L)]
    model = LLaPor(config, trace.layout, bounds, pcas, [], routers,
                   {"hash": trace_fingerprint(trace), "tokens": trace.num_tokens,
                    "prompts": int(trace.tokens["prompt"].nunique()),
                    "meta": {k: v for k, v in trace.meta.items() if k != "generated"}})
    count = default_processes(config.device, L) if processes is None else processes
    for net, record in map_layers(_train_layer, (model, train, valid), L, count, progress, "llapor"):
        model.nets.append(net)
        if record is not None:
            model.history.append(record)
    if table is not None:
        model.trace_info["group_table"] = table.to_dict(orient="list")
    return model


# ---------------------------------------------------------------------------------------------- command line


def config_from_args(args: argparse.Namespace) -> LLaPorConfig:
    """The LLaPorConfig that `train-predictor`'s options give (one option per field)."""
    values = {f.name: getattr(args, f.name) for f in fields(LLaPorConfig)}
    raw = values["group_boundaries"]
    try:
        values["group_boundaries"] = tuple(int(v) for v in raw.split(",")) if raw else None
    except ValueError:
        raise LLaPorError(f"--group-boundaries must be 'A,B' with integers, got {raw!r}") from None
    return LLaPorConfig(**values)


def run(args: argparse.Namespace, trace: Trace | None = None) -> int:
    config = config_from_args(args)
    check_output(args.out, what="--out")
    trace = read_trace(args.trace) if trace is None else trace  # any trace file
    routers = None
    if args.model:
        from prescope.models.adapter import describe, load_model

        live = load_model(args.model)
        describe(live).check_compatible(trace.layout, "trace")
        routers = LinearRouters.from_model(live)
    model = train_llapor(trace, config, routers=routers, progress=not args.no_progress)
    model.save(args.out)
    recall = {h["layer"]: round(h["best_valid_recall"], 4) for h in model.history}
    print(json.dumps({"command": "train-predictor", "out": str(args.out), "config": asdict(config),
                      "boundaries": list(model.boundaries), "trace_hash": model.trace_info["hash"],
                      "valid_recall_by_layer": recall}))
    return 0
