"""Predictor accuracy: metrics, tidy tables by layer × distance × predictor, layer groups, overhead.

Metrics, for the N tokens whose target layer l+d was routed (true set S of K experts, MISSING left out):
- recall_at_k   = |top_K(scores) ∩ S| / |S|          (the "hit rate" of a prefetch of K experts)
- exact_match   = [top_K(scores) = S]
- recall_at_2k  = |top_2K(scores) ∩ S| / |S|         (a larger prefetch budget)
- count_error_bB: for batches of B tokens of the same decode step, with c_e the true tokens per expert
  and ĉ_e = Σ_tokens P(e in the token's top-K) (`predictors.expected_tokens`):
      error = Σ_e |ĉ_e − c_e| / B,  averaged over batches (0 = perfect; 2K = disjoint).
`evaluate` returns one long table (predictor, layer, distance, domain, metric, value, tokens), where
layer is the MoE layer the prediction is made from and domain "all" pools every domain. Evaluate on
held-out prompts only: a trace of training prompts flatters every fitted predictor.

`run_report` is the whole experiment behind reports/llapor/: record traces of prescope-tiny on training and
held-out corpus prompts (cached under .cache/), train LLaPor on the training trace, evaluate every
predictor on the held-out trace, and write CSV tables and a JSON summary.

Letters: L MoE layers, E experts, K top-k, N tokens, B batch.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from prescope.predict.predictors import (
    MISSING,
    Predictor,
    PredictorError,
    TraceHistory,
    inclusion_probs,
    multi_hot,
)
from prescope.routing.trace import Trace

METRICS = ("recall_at_k", "exact_match", "recall_at_2k")
ALL = "all"
BUDGET_FACTOR = 2  # recall at a prefetch budget of BUDGET_FACTOR·K experts
VARIANTS = {"llapor_uniform": "LLaPor with every layer in one group (shallow trunks, no gated residual block)",
            "llapor_no_lookahead": "LLaPor without the gate-lookahead input (PCA of the hidden state + own routing)"}
TARGET_GAIN_POINTS = 5  # the project's target for LLaPor over the gate lookahead at distances >= 2


def hits(scores: torch.Tensor, truth: torch.Tensor, k: int) -> torch.Tensor:
    """[N] how many of each token's true experts [N, K] are among its k highest scores [N, E]."""
    top = scores.topk(k, dim=-1).indices  # [N, k]
    return ((top[:, :, None] == truth[:, None, :]) & (truth[:, None, :] != MISSING)).any(1).sum(-1)


def recall_at(scores: torch.Tensor, truth: torch.Tensor, k: int) -> torch.Tensor:
    """[N] share of the true experts found in the top-k scores."""
    return hits(scores, truth, k) / (truth != MISSING).sum(-1).clamp_min(1)


def exact_match(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """[N] 1.0 where the top-K scores are exactly the true set."""
    K = truth.shape[-1]
    return (hits(scores, truth, K) == (truth != MISSING).sum(-1)).float()


def batch_ids(trace: Trace, index: np.ndarray, batch: int) -> np.ndarray:
    """[N] batch number of each token: tokens of one (call, step) in prompt order, cut into groups of `batch`."""
    tok = trace.tokens.iloc[index]
    order = np.lexsort((tok["prompt"].to_numpy(), tok["step"].to_numpy(), tok["call"].to_numpy()))
    key = tok[["call", "step"]].to_numpy()[order]
    new_step = np.r_[True, (key[1:] != key[:-1]).any(1)]
    rank = np.arange(len(order)) - np.maximum.accumulate(np.where(new_step, np.arange(len(order)), 0))
    ids = np.empty(len(order), dtype=np.int64)
    ids[order] = np.cumsum(new_step | (rank % batch == 0)) - 1
    return ids


def count_error(scores: torch.Tensor, truth: torch.Tensor, ids: np.ndarray) -> float:
    """Mean over batches of Σ_e |expected − true tokens per expert| / batch size (formula in the docstring)."""
    E, K = scores.shape[-1], truth.shape[-1]
    b = torch.from_numpy(ids)
    nb = int(ids.max()) + 1
    p = inclusion_probs(scores, K)  # [N, E]
    expected = torch.zeros(nb, E).index_add_(0, b, p)  # [nb, E]
    true = torch.zeros(nb, E).index_add_(0, b, multi_hot(truth, E))  # [nb, E]
    size = torch.bincount(b, minlength=nb).float()  # [nb]
    return float(((expected - true).abs().sum(1) / size).mean())


def _token_metrics(scores: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    K = truth.shape[-1]
    return {"recall_at_k": recall_at(scores, truth, K), "exact_match": exact_match(scores, truth),
            "recall_at_2k": recall_at(scores, truth, min(BUDGET_FACTOR * K, scores.shape[-1]))}


def _distances_of(pred: Predictor, layer: int, distances: Sequence[int], L: int) -> list[int]:
    top = getattr(pred, "max_distance", None)
    return [d for d in distances if layer + d < L and d >= pred.min_distance and (top is None or d <= top)]


def evaluate(predictors: Mapping[str, Predictor], trace: Trace, distances: Sequence[int] = (1, 2, 3, 4), *,
             phase: str | None = "decode", batch_sizes: Sequence[int] = (1, 8), by_domain: bool = True,
             tokens: np.ndarray | None = None) -> pd.DataFrame:
    """Long table (predictor, layer, distance, domain, metric, value, tokens) of every predictor on `trace`.

    phase "decode" (default) scores decode tokens, whose history (previous token, earlier tokens) is
    causal; None scores every token. `tokens` [T] bool scores only those (a held-out part of one long
    trace, whose history still reads the earlier tokens). Count errors are computed on domain "all" only.
    """
    needs = [n for n, p in predictors.items() if p.needs_hidden]
    if needs and trace.hidden is None:
        raise PredictorError(f"predictors {needs} need hidden states; the trace has none (keep_hidden=True)")
    for p in predictors.values():
        if p.layout is not None:
            p.check_model(trace.layout)
    mask = np.ones(trace.num_tokens, bool) if phase is None else (trace.tokens["phase"] == phase).to_numpy()
    if tokens is not None:
        mask = mask & np.asarray(tokens, bool)
    index = np.flatnonzero(mask)
    if not len(index):
        raise PredictorError(f"the trace has no {phase} tokens to evaluate")
    L = trace.layout.num_moe_layers
    domains = trace.tokens["domain"].to_numpy()[index]
    groups = {ALL: np.ones(len(index), bool)}
    if by_domain and len(set(domains)) > 1:
        groups |= {str(d): domains == d for d in sorted(set(domains))}
    batches = {b: batch_ids(trace, index, b) for b in batch_sizes}
    history, rows = TraceHistory(trace), []
    for layer in range(L):
        if not any(layer + d < L for d in distances):
            continue
        hist = history.at(index, layer, with_truth=True)
        hidden = None if trace.hidden is None else torch.from_numpy(trace.hidden[index, layer]).float()  # [N, H]
        for name, pred in predictors.items():
            ds = _distances_of(pred, layer, distances, L)
            window = pred.predict_window(layer, ds, hidden=hidden, history=hist) if ds else {}
            for d, scores in window.items():
                truth = hist.truth[:, layer + d]  # [N, K]
                valid = (truth != MISSING).any(-1).numpy()
                per_token = {m: v.numpy() for m, v in _token_metrics(scores, truth).items()}
                base = {"predictor": name, "layer": layer, "distance": d}
                for g, gmask in groups.items():
                    keep = gmask & valid
                    for m, v in per_token.items():
                        rows.append({**base, "domain": g, "metric": m, "value": float(v[keep].mean()) if keep.any()
                                     else float("nan"), "tokens": int(keep.sum())})
                for b, ids in batches.items():
                    err = count_error(scores[valid], truth[valid], np.unique(ids[valid], return_inverse=True)[1])
                    rows.append({**base, "domain": ALL, "metric": f"count_error_b{b}", "value": err,
                                 "tokens": int(valid.sum())})
    return pd.DataFrame(rows)


def mean_by_distance(df: pd.DataFrame, metric: str = "recall_at_k", domain: str = ALL) -> pd.DataFrame:
    """predictor × distance: the metric averaged over source layers (each layer weighs the same)."""
    sel = df[(df["metric"] == metric) & (df["domain"] == domain)]
    return sel.pivot_table(index="predictor", columns="distance", values="value", aggfunc="mean", sort=False)


def heatmap_table(df: pd.DataFrame, domain: str = ALL) -> pd.DataFrame:
    """One row per (predictor, layer, distance), one column per metric: what `viz.accuracy_heatmap` reads."""
    sel = df[df["domain"] == domain]
    wide = sel.pivot_table(index=["predictor", "layer", "distance"], columns="metric", values="value", sort=False)
    return wide.reset_index().rename_axis(columns=None)


def group_effect(df: pd.DataFrame, boundaries: tuple[int, int], reference: str = "gate_lookahead",
                 metric: str = "recall_at_k") -> pd.DataFrame:
    """Per (group, predictor, distance): the metric's mean over the group's source layers and its gain over
    `reference` in the same cells (points of recall, ×100)."""
    from prescope.predict.llapor import group_of

    sel = df[(df["metric"] == metric) & (df["domain"] == ALL)].copy()
    sel["group"] = [group_of(layer, boundaries) for layer in sel["layer"]]
    ref = sel[sel["predictor"] == reference].set_index(["layer", "distance"])["value"]
    sel["gain_points"] = 100 * (sel["value"].to_numpy() - ref.reindex(pd.MultiIndex.from_frame(sel[["layer", "distance"]])).to_numpy())
    out = sel.groupby(["group", "predictor", "distance"], as_index=False, sort=False).agg(
        value=("value", "mean"), gain_points=("gain_points", "mean"), layers=("layer", "nunique"))
    return out.assign(metric=metric)


def versus_lookahead(table: pd.DataFrame, boundaries: tuple[int, int], reference: str = "gate_lookahead") -> dict:
    """LLaPor against gate lookahead in an `evaluate` table (held-out tokens): every learned predictor's gain in
    mean recall@K over `reference` by distance (points, ×100), by layer group (`group_effect`, LLaPor's group
    `boundaries`), the mean recall@K of each predictor, and the project's targets for "llapor"."""
    gains = _gains(table, reference)
    mine = gains.get("llapor", {})
    far = [v for d, v in mine.items() if d >= 2]
    return {"gain_points_by_distance": gains,
            "gain_points_by_group": _group_gains(group_effect(table, boundaries, reference)),
            "mean_recall_at_k": _nested(mean_by_distance(table)),
            "target": {  # None: the trace has no such distance to judge
                "llapor_beats_gate_lookahead_at_every_distance": all(v > 0 for v in mine.values()) if mine else None,
                "llapor_gain_at_least_5_points_from_distance_2": all(v >= TARGET_GAIN_POINTS for v in far)
                if far else None}}


def score_llapor(llapor_predictor: Predictor, lookahead: Predictor, trace: Trace,
                 distances: Sequence[int] = (1, 2, 3, 4)) -> dict:
    """`versus_lookahead` of one LLaPor (named "llapor") and one gate lookahead evaluated on `trace`'s decode
    tokens (`evaluate`, every domain pooled, no count errors)."""
    table = evaluate({"llapor": llapor_predictor, "gate_lookahead": lookahead}, trace, distances, batch_sizes=(),
                     by_domain=False)
    return versus_lookahead(table, llapor_predictor.boundaries)


def overhead(predictors: Mapping[str, Predictor], trace: Trace, distances: Sequence[int] = (1, 2, 3, 4), *,
             tokens: int = 1, repeats: int = 20) -> pd.DataFrame:
    """Per predictor: median µs of one `predict_window` call (all distances from one layer) for `tokens`
    tokens on this host, averaged over layers; history construction is not counted."""
    history, L, rows = TraceHistory(trace), trace.layout.num_moe_layers, []
    index = np.arange(min(tokens, trace.num_tokens))
    for name, pred in predictors.items():
        per_layer = []
        for layer in range(L):
            ds = _distances_of(pred, layer, distances, L)
            if not ds:
                continue
            hist = history.at(index, layer, with_truth=True)
            hidden = None if trace.hidden is None else torch.from_numpy(trace.hidden[index, layer]).float()
            times = []
            for _ in range(repeats):
                start = time.perf_counter_ns()
                pred.predict_window(layer, ds, hidden=hidden, history=hist)
                times.append(time.perf_counter_ns() - start)
            per_layer.append(np.median(times) / 1e3)
        rows.append({"predictor": name, "tokens": len(index), "us_per_layer_step": float(np.mean(per_layer)),
                     "layers": len(per_layer), "device": "cpu", "torch_threads": torch.get_num_threads()})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- the experiment


def corpus_prompts(tokenizer, spec, split: str, per_domain: int, prompt_tokens: int) -> tuple[list[list[int]], list[str]]:
    """`per_domain` prompts of exactly `prompt_tokens` tokens from each domain's `split` ("train" or
    "heldout") documents: every document is cut into consecutive windows of that length (some domains hold
    few long documents) and the windows are taken at evenly spaced ranks."""
    from prescope.models import corpus

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    prompts, domains = [], []
    for domain, parts in corpus.load_splits(spec).items():
        windows = [ids[i:i + prompt_tokens] for ids in tokenizer(list(getattr(parts, split)))["input_ids"]
                   for i in range(0, len(ids) - prompt_tokens + 1, prompt_tokens)]
        if len(windows) < per_domain:
            raise ValueError(f"{domain}: only {len(windows)} windows of {prompt_tokens} tokens in its {split} "
                             f"documents, {per_domain} asked")
        pick = np.linspace(0, len(windows) - 1, per_domain).round().astype(int)
        prompts += [windows[i] for i in pick]
        domains += [domain] * per_domain
    return prompts, domains


def cached_trace(model, tokenizer, spec, split: str, per_domain: int, prompt_tokens: int, max_new_tokens: int,
                 batch_size: int, cache_dir: Path, model_id: str) -> tuple[Trace, float]:
    """Record (or reload from `cache_dir`) a trace with hidden states and logits; (trace, recording seconds)."""
    from prescope.routing.trace import load_trace, record_trace, save_trace

    key = json.dumps([model_id, split, per_domain, prompt_tokens, max_new_tokens, batch_size, str(spec)])
    path = Path(cache_dir) / f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.trace.parquet"
    if path.is_file():
        try:
            trace = load_trace(path)
            return trace, float(trace.meta.get("record_seconds", float("nan")))
        except ValueError as exc:  # a damaged cache entry is recorded again, and said so
            warnings.warn(f"cached trace unusable, recording it again: {exc}", stacklevel=2)
    prompts, domains = corpus_prompts(tokenizer, spec, split, per_domain, prompt_tokens)
    start = time.perf_counter()
    trace = record_trace(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         keep_hidden=True, keep_logits=True, domains=domains)
    seconds = time.perf_counter() - start
    trace.meta.update(split=split, record_seconds=seconds, model=model_id, prompt_tokens=prompt_tokens)
    save_trace(trace, path)
    return trace, seconds


def run_report(out_dir: str | Path = "reports/llapor", cache_dir: str | Path = ".cache/llapor", *,
               model_dir: str | Path | None = None, corpus_dir: str | Path | None = None, train_per_domain: int = 60, heldout_per_domain: int = 20,
               prompt_tokens: int = 32, max_new_tokens: int = 32, batch_size: int = 8,
               config=None, variants: bool = True, progress: bool = True, device: str = "cpu",
               processes: int | None = None) -> dict:
    """The LLaPor experiment on prescope-tiny (module docstring); returns the JSON summary it writes. `device`
    records the traces (the model runs there in float32; evaluation runs on the CPU); `processes`: workers that
    train LLaPor's layers at once on the CPU (None: one per core; the weights do not depend on it)."""
    from prescope.files import git_revision, portable_path, read_json, write_json, write_with_sidecar
    from prescope.models import corpus, tiny
    from prescope.predict import llapor, predictors

    config = config or llapor.LLaPorConfig()
    model_path = Path(model_dir) if model_dir else tiny.TINY_DIR
    model, tokenizer = tiny.load_tiny(model_path)
    card = read_json(model_path / "model_card.json", "model card").get("config", {})
    spec = corpus.card_spec(card, corpus_dir)
    shape = dict(prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, batch_size=batch_size,
                 cache_dir=Path(cache_dir), model_id=str(model_path))
    model.to(device)
    train, train_s = cached_trace(model, tokenizer, spec, "train", train_per_domain, **shape)
    test, test_s = cached_trace(model, tokenizer, spec, "heldout", heldout_per_domain, **shape)
    model.to("cpu")
    D = config.distance
    fitted = {p.name: p.fit(train) for p in (predictors.PreviousToken(), predictors.Popularity(),
                                             predictors.ActivationMatrix(), predictors.Oracle())}
    models = {"gate_lookahead": predictors.GateLookahead.from_model(model)}
    timings = {}
    runs = {"llapor": config}
    if variants:
        L = train.layout.num_moe_layers
        runs |= {"llapor_uniform": llapor.LLaPorConfig(**{**asdict(config), "group_boundaries": (L, L)}),
                 "llapor_no_lookahead": llapor.LLaPorConfig(**{**asdict(config), "use_lookahead": False})}
    trace_hash = llapor.trace_fingerprint(train)
    for name, cfg in runs.items():
        key = hashlib.sha256(json.dumps([trace_hash, asdict(cfg)], default=str).encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"{name}-{key}.pt"
        models[name] = _cached_llapor(path)  # trained checkpoints are cached: re-running only re-evaluates
        if models[name] is None:
            routers = predictors.LinearRouters.from_model(model)
            start = time.perf_counter()
            llapor.train_llapor(train, cfg, routers=routers, progress=progress, processes=processes).save(path)
            timings[f"train_{name}_wall_s"] = round(time.perf_counter() - start, 1)
            models[name] = llapor.load(path)
        timings[f"train_{name}_s"] = round(sum(h["seconds"] for h in models[name].history), 1)  # summed over layers
    everyone = {**models, **fitted}
    table = evaluate(everyone, test, range(0, D + 1))
    # Prefill tokens are routed together, so history baselines would see the future there: all-token
    # accuracy covers the predictors that use no history.
    causal = {n: p for n, p in everyone.items() if n.startswith(("llapor", "gate_lookahead", "popularity", "oracle"))}
    table_all = evaluate(causal, test, range(1, D + 1), phase=None, batch_sizes=(), by_domain=False)
    bounds = models["llapor"].boundaries
    _, groups = llapor.derive_groups(train, config.min_group_layers)
    effect = group_effect(table, bounds)
    cost = overhead(everyone, test, range(1, D + 1))
    training = pd.DataFrame([{k: v for k, v in h.items() if k != "curve"} | {"epochs": len(h["curve"])}
                             for h in models["llapor"].history])
    out = Path(out_dir)
    for name, df in {"accuracy": table, "accuracy_all_tokens": table_all, "groups": groups,
                     "group_effect": effect, "overhead": cost, "training": training}.items():
        write_with_sidecar(out / f"{name}.csv", df.to_csv(index=False, float_format="%.6g"))
    versus = versus_lookahead(table, bounds)
    summary = {
        "source": "measured", "hardware": "cpu" if torch.device(device).type == "cpu" else f"traces on {device}, cpu",
        "git_revision": git_revision(),
        "model": portable_path(model_path), "config": asdict(config), "boundaries": list(bounds),
        "variants": {name: VARIANTS[name] for name in runs if name in VARIANTS},
        "traces": {"train": {"tokens": train.num_tokens, "prompts": int(train.tokens["prompt"].nunique()),
                             "record_seconds": round(train_s, 1), "hash": models["llapor"].trace_info["hash"]},
                   "heldout": {"tokens": test.num_tokens, "prompts": int(test.tokens["prompt"].nunique()),
                               "domains": sorted(set(test.tokens["domain"])), "record_seconds": round(test_s, 1)},
                   "prompt_tokens": prompt_tokens, "max_new_tokens": max_new_tokens, "batch_size": batch_size},
        "evaluated_on": "held-out decode tokens of every domain (accuracy.csv); all tokens in accuracy_all_tokens.csv",
        **{f"mean_{m}": _nested(mean_by_distance(table, m)) for m in (*METRICS, "count_error_b1", "count_error_b8")},
        "mean_recall_at_k_all_tokens": _nested(mean_by_distance(table_all)),
        "mean_recall_at_k_by_domain": _by_domain(table, ("llapor", "gate_lookahead")),
        "gain_over_gate_lookahead_points": versus["gain_points_by_distance"],
        "target": versus["target"],
        "group_effect_gain_points": versus["gain_points_by_group"],
        "overhead_us_per_layer_step": dict(zip(cost["predictor"], cost["us_per_layer_step"].round(1), strict=True)),
        "timings": timings,
    }
    write_json(out / "summary.json", summary, indent=2)
    return summary


def _cached_llapor(path: Path):
    """The cached checkpoint at `path`, or None when there is none or it is damaged (it is trained again)."""
    from prescope.predict import llapor

    if not path.is_file():
        return None
    try:
        return llapor.load(path)
    except ValueError as exc:
        warnings.warn(f"cached LLaPor checkpoint unusable, training it again: {exc}", stacklevel=2)
        return None


def _gains(table: pd.DataFrame, reference: str = "gate_lookahead") -> dict:
    """Per learned predictor and distance: mean recall@K minus the reference's, in points (×100)."""
    wide = mean_by_distance(table)
    return {p: {int(d): round(100 * float(wide.loc[p, d] - wide.loc[reference, d]), 2) for d in wide.columns
                if pd.notna(wide.loc[p, d])} for p in wide.index if p.startswith("llapor")}


def _group_gains(effect: pd.DataFrame) -> dict:
    """{group: {learned predictor: {distance: gain over the lookahead in points}}}."""
    learned = effect[effect["predictor"].str.startswith("llapor")]
    return {g: {p: {int(d): round(float(v), 2) for d, v in zip(r["distance"], r["gain_points"], strict=True)}
                for p, r in rows.groupby("predictor", sort=False)} for g, rows in learned.groupby("group", sort=False)}


def _by_domain(table: pd.DataFrame, names) -> dict:
    domains = sorted(set(table["domain"]) - {ALL})
    return {p: {d: _nested(mean_by_distance(table[table["predictor"] == p], domain=d))[p] for d in domains}
            for p in names}


def _nested(wide: pd.DataFrame) -> dict:
    return {p: {int(d): round(float(v), 4) for d, v in row.items() if pd.notna(v)} for p, row in wide.iterrows()}


if __name__ == "__main__":
    print(json.dumps(run_report(), indent=2))
