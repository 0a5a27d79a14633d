"""Routing-only LLaPor: LLaPor's per-layer networks fed from routing alone, for traces without hidden states.

Real traces of real models (llama.cpp's route traces, `routing.llamacpp`) carry which experts each token
chose and their weights, never the hidden states LLaPor (`llapor`) compresses. This sibling predicts the
experts of layers l+1 … l+D' (D' = min(D, L-1-l)) from what is known when layer l has run:

- this token's routing at the W layers already computed, l-W+1 … l (W = `routing_window`), multi-hot;
- the previous token's routing at layers l … l+D' (multi-hot), and the earlier tokens' mean routing at the
  target layers (their selections divided by their count: "the last few tokens" with every one counted).

A multi-hot row holding more than K experts (a policy's one-row history at batch > 1, the union of the
step's tokens) is scaled to K in total, so it reads as the mean token. As LLaPor learns a correction to
the gate lookahead, this one learns a correction to what history says:

    z_d = a_d · h_d + b_d + head_d(trunk(x)),   h_d = prev_{l+d} + mean_{l+d}   (multi-hot, shares)

with head_d zero-initialised and a_d, b_d calibrated first (L-BFGS), so training starts from a calibrated
history predictor and early stopping (on the validation split, the start included) never ends worse there.
Networks, loss, calibration and the seeded training are LLaPor's (`llapor.LayerNet`, `loss_fn`,
`_train_net`, `seeded`); the inputs are in [0, 1] and are not standardised. The validation split is by prompt
when the trace has enough prompts (at least 1 / valid_fraction), else by position (`position_split`: the
last share of each prompt's tokens), as one long real trace needs.

The features come from one scatter of every multi-hot part into [N, W + 1 + D', E] and one scale (`features`,
`assemble`: the same values as one multi-hot per part, bit for bit); a policy that keeps the routing as [L, E]
masks calls `predict_masks` (no scatter, no host read: a CUDA graph replays it). Measured on the 2-core
development CPU, one thread, the Qwen3-30B-A3B routing-only LLaPor (W = 4, D = 4, E = 128), a one-token history,
median per call over layers 0-43: `features` 195 -> 37 µs, `predict_window` 417 -> 267 µs (the rest is the
network); `policies.predictive` gives the policy's figures and the command.

Letters: L MoE layers, E experts, K top-k, N tokens, W routing window, D lookahead distance.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from prescope.files import write_archive_with
from prescope.layout import ModelLayout
from prescope.predict.llapor import FORMAT as LLAPOR_FORMAT
from prescope.predict.llapor import FORMAT_VERSION as LLAPOR_VERSION
from prescope.predict.llapor import (
    LayerNet,
    _train_net,
    check_header,
    derive_groups,
    from_checkpoint,
    group_of,
    positive_weight,
    read_checkpoint,
    seeded,
    trace_fingerprint,
)
from prescope.predict.llaporconfig import LLaPorConfig, LLaPorError
from prescope.predict.predictors import History, Predictor, TraceHistory, check_target, multi_hot
from prescope.routing.trace import MISSING, Trace

FORMAT, FORMAT_VERSION = "prescope.predict.routing_llapor", 1


def position_split(trace: Trace, frac: float) -> np.ndarray:
    """[T] bool: the held-out tokens, the last `frac` of each prompt's tokens by position (at least one token
    each side where the prompt has two)."""
    if not 0.0 < frac < 1.0:
        raise LLaPorError(f"split fraction must be in (0, 1), got {frac}")
    tok = trace.tokens
    rank = tok.groupby("prompt")["position"].rank(method="first").to_numpy() - 1  # 0-based within its prompt
    size = tok.groupby("prompt")["position"].transform("size").to_numpy()
    cut = np.clip(np.round(size * (1.0 - frac)), 1, np.maximum(size - 1, 1))
    return (rank >= cut) & (size > 1)


def heldout_mask(trace: Trace, frac: float, seed: int) -> np.ndarray:
    """[T] bool validation tokens: whole prompts when the trace has >= 1/frac of them, else `position_split`."""
    prompts = np.unique(trace.tokens["prompt"].to_numpy())
    if len(prompts) >= max(2, round(1.0 / frac)):
        first = np.random.default_rng(seed).permutation(prompts)[:min(max(1, round(frac * len(prompts))),
                                                                       len(prompts) - 1)]
        return trace.tokens["prompt"].isin(first).to_numpy()
    return position_split(trace, frac)


def _pad(rows: torch.Tensor, width: int) -> torch.Tensor:
    """[N, R, K'] expert ids padded with MISSING to [N, R, width]."""
    return rows if rows.shape[2] == width else torch.nn.functional.pad(rows, (0, width - rows.shape[2]), value=MISSING)


class RoutingLLaPor(Predictor):
    name = "llapor_routing"
    imitates = "PreScope's LLaPor, fed from routing alone (no hidden states)"
    needs_hidden = False
    uses_routing = True
    min_distance = 1

    def __init__(self, config: LLaPorConfig, layout: ModelLayout, boundaries: tuple[int, int],
                 nets: list[LayerNet], trace_info: dict | None = None, history: list[dict] | None = None):
        self.config, self.layout, self.boundaries = config, layout, tuple(boundaries)
        self.max_distance, self.device = config.distance, config.device
        self.nets, self.trace_info, self.history = nets, trace_info or {}, history or []

    def targets(self, layer: int) -> int:
        return min(self.config.distance, self.layout.num_moe_layers - 1 - layer)

    def _window(self, layer: int) -> tuple[int, int, int]:
        """(lo, cut, D'): this token's window reads layers lo … layer, its first `cut` rows (below layer 0) are
        zeros; the previous token's rows are layers layer … layer + D'."""
        lo = max(0, layer - self.config.routing_window + 1)
        return lo, self.config.routing_window - (layer + 1 - lo), self.targets(layer)

    def features(self, layer: int, history: History) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [N, (W + 1 + 2D')·E], prior h [N, D', E]) for the network of `layer` (module docstring): every
        multi-hot part (this token's W window layers, the previous token's layers l … l+D') from one scatter
        into [N, W + 1 + D', E], scaled in `assemble`."""
        E, device = self.layout.num_experts, self.device or "cpu"
        lo, cut, T = self._window(layer)
        current = history.current.to(device)  # [N, L, K']
        N, W = current.shape[0], self.config.routing_window
        rows = current[:, lo:layer + 1]  # [N, W - cut, K']
        if history.previous is not None:  # without one its rows stay zeros (all MISSING)
            before = history.previous.to(device)[:, layer:layer + 1 + T]  # [N, 1 + D', K'']
            width = max(rows.shape[2], before.shape[2])
            rows = torch.cat([_pad(rows, width), _pad(before, width)], 1)
        hot = torch.zeros(N, W + 1 + T, E, device=device)
        hot[:, cut:cut + rows.shape[1]].scatter_add_(2, rows.clamp_min(0), (rows != MISSING).float())
        seq = None if history.sequence is None else history.sequence[:, layer + 1:layer + 1 + T].to(device).float()
        return self.assemble(hot, seq)

    def assemble(self, hot: torch.Tensor, sequence: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, prior) from the multi-hot parts hot [N, W + 1 + D', E] (W window layers, the previous token's
        layer l and its D' target layers; a row may hold a union of more than K experts) and the earlier tokens'
        selections at the D' target layers [N, D', E] (None: no earlier tokens). Each row is scaled to sum at
        most K (a union reads as its mean token)."""
        K, W = self.layout.top_k, self.config.routing_window
        scaled = hot * (K / hot.sum(-1, keepdim=True).clamp_min(K))
        if sequence is None:
            mean = hot.new_zeros(hot.shape[0], hot.shape[1] - W - 1, hot.shape[2])
        else:
            mean = sequence * (K / sequence.sum(-1, keepdim=True).clamp_min(K))
        return torch.cat([scaled.flatten(1), mean.flatten(1)], 1), scaled[:, W + 1:] + mean  # [N, F], [N, D', E]

    def predict_masks(self, layer: int, current: torch.Tensor, previous: torch.Tensor,
                      sequence: torch.Tensor) -> torch.Tensor:
        """probabilities [N, D', E] of layers l+1 … l+D' from the history as masks [N, L, E] on the predictor's
        device: this step's experts (read at layers <= `layer`), the previous token's, the earlier tokens'
        selections; `predict_window` of the same history, without host reads (a policy's CUDA graph replays it)."""
        lo, cut, T = self._window(layer)
        parts = [current[:, lo:layer + 1], previous[:, layer:layer + 1 + T]]
        if cut:
            parts.insert(0, current.new_zeros(current.shape[0], cut, current.shape[2]))
        with torch.inference_mode():
            x, prior = self.assemble(torch.cat(parts, 1), sequence[:, layer + 1:layer + 1 + T])
            return torch.sigmoid(self.nets[layer](x, prior))

    def predict_window(self, layer, distances, *, hidden=None, history=None):
        for d in distances:
            check_target(layer, d, self.layout.num_moe_layers, self.config.distance)
            if d < 1:
                raise LLaPorError(f"routing-only LLaPor predicts distances 1..{self.config.distance}, got {d}")
        h = self._needs("history", history, "History with `current` (this token's routing up to `layer`), "
                                            "`previous` and `sequence` (earlier tokens)")
        if h.current.shape[1] != self.layout.num_moe_layers:
            raise LLaPorError(f"history has {h.current.shape[1]} MoE layers, this predictor was trained on "
                              f"{self.layout.num_moe_layers}")
        with torch.inference_mode():
            x, prior = self.features(layer, h)
            probs = torch.sigmoid(self.nets[layer](x, prior))  # [N, D', E]
        return {d: probs[:, d - 1] for d in distances}

    def predict(self, layer, distance, *, hidden=None, history=None):
        return self.predict_window(layer, [distance], hidden=hidden, history=history)[distance]

    def save(self, path) -> Path:
        """torch checkpoint with config, layout, trace identity and networks; atomic and checksummed."""
        blob = {"format": FORMAT, "version": FORMAT_VERSION, "config": asdict(self.config),
                "layout": self.layout.to_dict(), "boundaries": list(self.boundaries),
                "trace": json.dumps(self.trace_info, default=str), "history": json.dumps(self.history),
                "nets": [n.state_dict() for n in self.nets]}
        return write_archive_with(Path(path), lambda tmp: torch.save(blob, tmp))


def load(path, device: str = "cpu") -> RoutingLLaPor:
    """Read a checkpoint written by `RoutingLLaPor.save`; LLaPorError for a corrupt, foreign or newer file,
    `files.ChecksumError` for one whose bytes changed since it was written."""
    path = Path(path)
    return _from_checkpoint(path, read_checkpoint(path, device, "routing-only LLaPor", FORMAT, FORMAT_VERSION),
                            device)


def _from_checkpoint(path: Path, blob: dict, device: str) -> RoutingLLaPor:
    try:
        config = LLaPorConfig(**{**blob["config"], "device": device})
        layout = ModelLayout.from_dict(blob["layout"])
        bounds = tuple(blob["boundaries"])
        nets = []
        for layer, state in enumerate(blob["nets"]):
            net = LayerNet(state["shift"].shape[0], state["bias"].shape[0], layout.num_experts,
                           group_of(layer, bounds), config)
            net.load_state_dict(state)
            nets.append(net.to(device).eval())
        if len(nets) != layout.num_moe_layers:
            raise ValueError(f"{len(nets)} networks for {layout.num_moe_layers} MoE layers")
        return RoutingLLaPor(config, layout, bounds, nets, json.loads(blob["trace"]), json.loads(blob["history"]))
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise LLaPorError(f"{path}: corrupt routing-only LLaPor checkpoint: {type(exc).__name__}: {reason}") from None


def load_predictor(path, device: str = "cpu"):
    """A LLaPor or routing-only LLaPor checkpoint, whichever `path` holds."""
    path = Path(path)
    blob = read_checkpoint(path, device, "predictor")  # read and checksummed once, whichever kind it is
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        check_header(path, blob, "routing-only LLaPor", FORMAT, FORMAT_VERSION)
        return _from_checkpoint(path, blob, device)
    check_header(path, blob, "LLaPor", LLAPOR_FORMAT, LLAPOR_VERSION)
    return from_checkpoint(path, blob, device)


# ---------------------------------------------------------------------------------------------- training


def _layer_data(model: RoutingLLaPor, trace: Trace, history: TraceHistory, index: np.ndarray, layer: int):
    """(x, prior, y) of the tokens `index` routed at `layer` and at every target layer."""
    T = model.targets(layer)
    present = trace.present[index][:, layer:layer + 1 + T].all(1)
    index = index[present]
    hist = history.at(index, layer)
    x, prior = model.features(layer, hist)
    exp = torch.from_numpy(trace.experts[index]).to(model.device)
    E = trace.layout.num_experts
    y = torch.stack([multi_hot(exp[:, t], E) for t in range(layer + 1, layer + 1 + T)], 1)
    return x, prior, y  # [N, F], [N, D', E], [N, D', E]


def train_routing_llapor(trace: Trace, config: LLaPorConfig | None = None, *, progress: bool = True,
                         exclude: np.ndarray | None = None) -> RoutingLLaPor:
    """Train routing-only LLaPor on `trace` (hidden states not needed), early-stopped on a validation part of
    it (`heldout_mask` of the usable tokens). `exclude` [T] bool: tokens neither trained nor validated on (a
    test part); every token's history still reads the whole trace (causal: earlier tokens only)."""
    config = LLaPorConfig() if config is None else config
    L, E, K = trace.layout.num_moe_layers, trace.layout.num_experts, trace.layout.top_k
    if L < 2:
        raise LLaPorError(f"LLaPor predicts later layers; the trace has {L} MoE layer")
    usable = np.ones(trace.num_tokens, bool) if exclude is None else ~np.asarray(exclude, bool)
    if usable.shape != (trace.num_tokens,) or usable.sum() < 2:
        raise LLaPorError("routing-only LLaPor needs at least two tokens to train and validate on")
    valid = np.zeros(trace.num_tokens, bool)
    valid[np.flatnonzero(usable)[heldout_mask(trace.select(usable), config.valid_fraction, config.seed)]] = True
    if not valid.any() or not (usable & ~valid).any():
        raise LLaPorError("routing-only LLaPor needs training and validation tokens; the split left one side empty")
    if config.group_boundaries and config.group_boundaries[1] > L:
        raise LLaPorError(f"group_boundaries {config.group_boundaries} reach past the trace's {L} MoE layers")
    train_trace = trace.select(usable & ~valid)
    bounds = config.group_boundaries or derive_groups(train_trace, config.min_group_layers)[0]
    model = RoutingLLaPor(config, trace.layout, bounds, [],
                          {"hash": trace_fingerprint(trace), "tokens": trace.num_tokens,
                           "train_tokens": int((usable & ~valid).sum()), "valid_tokens": int(valid.sum()),
                           "meta": {k: v for k, v in trace.meta.items() if k != "generated"}})
    history = TraceHistory(trace)
    tr_index, va_index = np.flatnonzero(usable & ~valid), np.flatnonzero(valid)
    for o in tqdm(range(L), desc="llapor (routing)", unit="layer", disable=not progress):
        targets, start = model.targets(o), time.perf_counter()
        tr = _layer_data(model, trace, history, tr_index, o) if targets else None
        va = _layer_data(model, trace, history, va_index, o) if targets else None
        with seeded(config.seed + o, config.device):
            if not targets or not len(tr[0]) or not len(va[0]):
                # nothing ahead (the last layer), or no routed tokens to learn from: the prior alone
                width = tr[0].shape[1] if targets else 1
                model.nets.append(LayerNet(width, max(targets, 1), E, group_of(o, bounds), config).to(config.device).eval())
                continue
            net = LayerNet(tr[0].shape[1], targets, E, group_of(o, bounds), config).to(config.device)
            record = _train_net(net, tr, va, positive_weight(tr[2], config), config, K, config.seed + o)
        model.nets.append(net.eval())
        model.history.append({"layer": o, "group": group_of(o, bounds), **record,
                              "seconds": time.perf_counter() - start})
    return model


def cut_layout(layout: ModelLayout, n: int) -> ModelLayout:
    """`layout` reduced to its first `n` MoE layers (and the decoder layers up to the last of them)."""
    if n == layout.num_moe_layers:
        return layout
    keep = layout.moe_layers[:n]
    top = keep[-1] + 1
    return dataclasses.replace(layout, num_layers=top, moe_layers=keep, layer_expert_bytes=layout.layer_expert_bytes[:n],
                               dense_layers=tuple(i for i in layout.dense_layers if i < top))


def cut_layers(trace: Trace, layers: int) -> Trace:
    """The trace's first `layers` MoE layers (a twin cut to fewer layers replays those; a predictor for it trains
    on them)."""
    if layers == trace.layout.num_moe_layers:
        return trace
    layout = cut_layout(trace.layout, layers)
    sizes = trace.meta.get("expert_bytes_per_layer")
    meta = {**trace.meta, "layers_kept": layers, **({"expert_bytes_per_layer": sizes[:layers]} if sizes else {})}
    return dataclasses.replace(trace, layout=layout, experts=np.ascontiguousarray(trace.experts[:, :layers]),
                               weights=np.ascontiguousarray(trace.weights[:, :layers]),
                               hidden=None if trace.hidden is None else trace.hidden[:, :layers],
                               logits=None if trace.logits is None else trace.logits[:, :layers], meta=meta)


# ---------------------------------------------------------------------------------------------- command line


def run(args) -> int:
    """`prescope train-predictor`: LLaPor where the trace has hidden states, routing-only LLaPor where it has
    none or `--routing-only` asks for it."""
    from prescope.files import check_output
    from prescope.predict import llapor
    from prescope.routing.reader import read_trace

    config = llapor.config_from_args(args)
    check_output(args.out, what="--out")
    trace = read_trace(args.trace)
    if not (args.routing_only or trace.hidden is None):
        return llapor.run(args, trace)
    if args.model:
        raise LLaPorError("--model gives LLaPor the routers for its gate lookahead; routing-only LLaPor reads no "
                          "routers (leave --model out)")
    model = train_routing_llapor(trace, config, progress=not args.no_progress)
    model.save(args.out)
    recall = {h["layer"]: round(h["best_valid_recall"], 4) for h in model.history}
    print(json.dumps({"command": "train-predictor", "predictor": model.name, "out": str(args.out),
                      "config": asdict(config), "boundaries": list(model.boundaries),
                      "trace_hash": model.trace_info["hash"], "valid_recall_by_layer": recall}))
    return 0
