"""Routing statistics of a `Trace` as tidy pandas tables: what makes expert caching and prediction work.

- load skew: how unevenly a layer uses its experts (normalised entropy, max/mean of selection counts);
- temporal reuse: share of a token's experts the token `lag` positions earlier also used (what an LRU
  cache or a previous-token predictor can exploit), against the random baseline K/E;
- cross-layer correlation: normalised mutual information of expert choices between two layers, against
  the same statistic with the tokens of one layer shuffled (finite-sample bias), and pair lift;
- gate weights: how peaked the top-k weights are;
- a comparison with the OLMoE/Mixtral routing aggregates of allenai/OLMoE (layers 0, 7, 15 per domain; the
  file ships with prescope, `AGGREGATES`, and is the default of every function that reads it).

All functions are pure; (token, layer) entries the source did not route (MISSING) are left out.
Letters: T tokens, L MoE layers, E experts, K top-k.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from prescope.data import exists, read_text, shipped
from prescope.routing.trace import MISSING, Trace

DEFAULT_LAGS = tuple(range(1, 9))
# Decoder layer counts of the models in the aggregates file (their configs; DESIGN.md §3), needed to place
# the recorded layers 0/7/15 at the same relative depth in a trace with another number of layers.
AGGREGATE_NUM_LAYERS = {"olmoe-1b-7b": 16, "mixtral-8x7b-v0.1": 32}
# Our corpus names its code domain after the OLMoE text file; the aggregates file uses the short name.
AGGREGATE_DOMAIN_NAMES = {"github_oss_with_stack": "github"}
AGGREGATES = shipped("routing", "olmoe-mixtral-routing-aggregates.json")
PAIR_CHUNK = 8192  # token pairs compared at once in temporal_reuse: bounds memory at PAIR_CHUNK*L*K*K bools


def _phase_mask(trace: Trace, phase: str | None) -> np.ndarray:
    if phase is None:
        return np.ones(trace.num_tokens, dtype=bool)
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill', 'decode' or None, got {phase!r}")
    return (trace.tokens["phase"] == phase).to_numpy()


def selection_counts(trace: Trace, phase: str | None = None) -> np.ndarray:
    """[L, E] int64: how often each expert was selected (any rank) at each layer."""
    L, E = trace.layout.num_moe_layers, trace.layout.num_experts
    experts = trace.experts[_phase_mask(trace, phase)]  # [T', L, K]
    layer = np.broadcast_to(np.arange(L)[None, :, None], experts.shape)
    keep = experts != MISSING
    return np.bincount((layer[keep] * E + experts[keep]), minlength=L * E).reshape(L, E)


def count_skew(counts: np.ndarray) -> dict[str, float]:
    """Skew of one layer's selection counts c[E]: p = c / sum(c);
    entropy_norm = -sum(p ln p) / ln E (1 = uniform, 0 = one expert); max_over_mean = max(c) / mean(c)."""
    counts = np.asarray(counts, dtype=np.float64)
    total, E = counts.sum(), counts.shape[-1]
    if total <= 0 or E < 2:
        return {"entropy_norm": float("nan"), "max_over_mean": float("nan")}
    p = counts / total
    nz = p[p > 0]
    return {"entropy_norm": float(-(nz * np.log(nz)).sum() / np.log(E)),
            "max_over_mean": float(counts.max() / counts.mean())}


def _named(df: pd.DataFrame, trace: Trace) -> pd.DataFrame:
    df.attrs["model"] = trace.layout.model_class  # figures name the model from this
    return df


def expert_load(trace: Trace, phase: str | None = None) -> pd.DataFrame:
    """Per (layer, expert): count of selections and share = count / the layer's routed slots."""
    counts = selection_counts(trace, phase)  # [L, E]
    L, E = counts.shape
    totals = np.maximum(counts.sum(1, keepdims=True), 1)
    return _named(pd.DataFrame({"layer": np.repeat(np.arange(L), E), "expert": np.tile(np.arange(E), L),
                                "count": counts.reshape(-1), "share": (counts / totals).reshape(-1)}), trace)


def load_skew(trace: Trace, phase: str | None = None) -> pd.DataFrame:
    """Per layer: tokens routed, selections, entropy_norm and max_over_mean of the selection counts."""
    counts = selection_counts(trace, phase)
    rows = [{"layer": o, "decoder_layer": trace.layout.moe_layers[o], "tokens": int(c.sum() // trace.layout.top_k),
             "selections": int(c.sum()), **count_skew(c)} for o, c in enumerate(counts)]
    return _named(pd.DataFrame(rows), trace)


def random_reuse(trace_or_layout) -> float:
    """Expected share of a token's K experts found among another token's K, with uniform random routing: K/E."""
    lay = getattr(trace_or_layout, "layout", trace_or_layout)
    return lay.top_k / lay.num_experts


def _lag_pairs(trace: Trace, lag: int, phase: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (now, before) of tokens of the same prompt `lag` positions apart, both in `phase`."""
    tok = trace.tokens
    keep = _phase_mask(trace, phase)
    frame = pd.DataFrame({"prompt": tok["prompt"], "position": tok["position"], "i": np.arange(len(tok))})[keep]
    earlier = frame.assign(position=frame["position"] + lag)
    pairs = frame.merge(earlier, on=["prompt", "position"], suffixes=("", "_before"))
    return pairs["i"].to_numpy(), pairs["i_before"].to_numpy()


def temporal_reuse(trace: Trace, lags: Iterable[int] = DEFAULT_LAGS, decode_only: bool = True) -> pd.DataFrame:
    """Per (layer, lag): pairs, common experts, reuse = common / (pairs * K), and the random baseline K/E.

    A pair is a token and the token `lag` positions before it in the same sequence, both routed at the
    layer (and both decode tokens when `decode_only`). Pool layers with common.sum() / (pairs.sum() * K).
    """
    K, L = trace.layout.top_k, trace.layout.num_moe_layers
    present = trace.present  # [T, L]
    rows = []
    for lag in lags:
        if lag < 1:
            raise ValueError(f"lags must be >= 1, got {lag}")
        now, before = _lag_pairs(trace, lag, "decode" if decode_only else None)
        common, pairs = np.zeros(L, dtype=np.int64), np.zeros(L, dtype=np.int64)
        for c in range(0, len(now), PAIR_CHUNK):
            a, b = now[c:c + PAIR_CHUNK], before[c:c + PAIR_CHUNK]
            valid = present[a] & present[b]  # [P, L]
            hits = (trace.experts[a][..., :, None] == trace.experts[b][..., None, :]).any(-1).sum(-1)  # [P, L]
            common += (hits * valid).sum(0)
            pairs += valid.sum(0)
        for o in range(L):
            reuse = common[o] / (pairs[o] * K) if pairs[o] else float("nan")
            rows.append({"layer": o, "lag": lag, "pairs": int(pairs[o]), "common": int(common[o]),
                         "reuse": reuse, "random": random_reuse(trace)})
    return _named(pd.DataFrame(rows), trace)


def reuse_by_lag(trace: Trace, lags: Iterable[int] = DEFAULT_LAGS, decode_only: bool = True) -> pd.DataFrame:
    """Per lag, pooled over layers: pairs, reuse (share of a token's experts reused) and the random baseline."""
    per_layer = temporal_reuse(trace, lags, decode_only)
    g = per_layer.groupby("lag", as_index=False)[["pairs", "common"]].sum()
    g["reuse"] = g["common"] / (g["pairs"] * trace.layout.top_k)
    g["random"] = random_reuse(trace)
    return g


def pair_counts(trace: Trace, layer_a: int, layer_b: int, pairing: str = "all", phase: str | None = None,
                shuffle_seed: int | None = None) -> np.ndarray:
    """[E, E] counts of (expert at layer_a, expert at layer_b) chosen by the same token.

    pairing="all": every one of the K*K combinations per token (co-occurrence); pairing="rank": the expert of
    rank i at both layers, K pairs per token, as allenai/OLMoE's routing script counted its aggregates.
    shuffle_seed permutes the tokens of layer_b first, which breaks any real dependence (a baseline).
    """
    E = trace.layout.num_experts
    keep = _phase_mask(trace, phase) & trace.present[:, layer_a] & trace.present[:, layer_b]
    a, b = trace.experts[keep, layer_a], trace.experts[keep, layer_b]  # [T', K]
    if shuffle_seed is not None:
        b = b[np.random.default_rng(shuffle_seed).permutation(len(b))]
    if pairing == "all":
        a, b = np.repeat(a, a.shape[1], axis=1), np.tile(b, (1, b.shape[1]))  # [T', K*K]
    elif pairing != "rank":
        raise ValueError(f"pairing must be 'all' or 'rank', got {pairing!r}")
    return np.bincount((a * E + b).reshape(-1), minlength=E * E).reshape(E, E)


def pair_nmi(counts: np.ndarray) -> float:
    """Normalised mutual information of a pair-count matrix C[a, b]: p = C / sum(C),
    MI = sum p(a,b) ln(p(a,b) / (p(a) p(b))), NMI = MI / sqrt(H(a) H(b)) (0 independent, 1 determined)."""
    p = np.asarray(counts, dtype=np.float64)
    if p.sum() <= 0:
        return float("nan")
    p = p / p.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()
    ha, hb = -(pa[pa > 0] * np.log(pa[pa > 0])).sum(), -(pb[pb > 0] * np.log(pb[pb > 0])).sum()
    return float(mi / np.sqrt(ha * hb)) if ha > 0 and hb > 0 else float("nan")


def pair_lift(counts: np.ndarray) -> pd.DataFrame:
    """Per observed pair (a, b): count and lift = p(a, b) / (p(a) p(b)) (1 = independent), highest first."""
    c = np.asarray(counts, dtype=np.float64)
    p = c / c.sum()
    expected = np.outer(p.sum(1), p.sum(0))  # [E, E]
    a, b = np.nonzero(c)
    out = pd.DataFrame({"expert_a": a, "expert_b": b, "count": c[a, b].astype(np.int64),
                        "lift": p[a, b] / expected[a, b]})
    return out.sort_values(["lift", "count"], ascending=False, ignore_index=True)


def cross_layer(trace: Trace, layer_pairs: Iterable[tuple[int, int]] | None = None, pairing: str = "all",
                phase: str | None = None, shuffle_seed: int = 0) -> pd.DataFrame:
    """Per layer pair (adjacent by default): tokens, nmi, and nmi_shuffled (the same with layer_b's tokens
    permuted: what finite samples give with no dependence at all)."""
    L = trace.layout.num_moe_layers
    rows = []
    for la, lb in layer_pairs if layer_pairs is not None else [(o, o + 1) for o in range(L - 1)]:
        counts = pair_counts(trace, la, lb, pairing, phase)
        per_token = trace.layout.top_k ** (2 if pairing == "all" else 1)
        rows.append({"layer_a": la, "layer_b": lb, "tokens": int(counts.sum() // per_token),
                     "nmi": pair_nmi(counts),
                     "nmi_shuffled": pair_nmi(pair_counts(trace, la, lb, pairing, phase, shuffle_seed))})
    return pd.DataFrame(rows, columns=["layer_a", "layer_b", "tokens", "nmi", "nmi_shuffled"])


def gate_weights(trace: Trace, phase: str | None = None) -> pd.DataFrame:
    """Per layer: mean top-1 weight, mean sum of the top-k weights, and the mean entropy of the top-k
    weights renormalised to sum 1 (q = w / sum w; H = -sum q ln q), also divided by ln K."""
    keep = _phase_mask(trace, phase)
    K = trace.layout.top_k
    rows = []
    for o in range(trace.layout.num_moe_layers):
        w = trace.weights[keep & trace.present[:, o], o].astype(np.float64)  # [T', K]
        total = w.sum(1, keepdims=True)
        q = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
        ent = -(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)).sum(1)
        rows.append({"layer": o, "tokens": len(w), "top1_weight": float(w[:, 0].mean()) if len(w) else np.nan,
                     "weight_sum": float(total.mean()) if len(w) else np.nan,
                     "weight_entropy": float(ent.mean()) if len(w) else np.nan,
                     "weight_entropy_norm": float(ent.mean() / np.log(K)) if len(w) and K > 1 else np.nan})
    return pd.DataFrame(rows)


def routing_summary(trace: Trace) -> pd.DataFrame:
    """One row per layer: skew (all tokens), lag-1 decode reuse, gate weights, NMI with the next layer."""
    skew = load_skew(trace)
    reuse = temporal_reuse(trace, lags=(1,))[["layer", "reuse", "random"]].rename(
        columns={"reuse": "reuse_lag1", "random": "reuse_random"})
    gates = gate_weights(trace)[["layer", "top1_weight", "weight_entropy_norm"]]
    nmi = cross_layer(trace)[["layer_a", "nmi", "nmi_shuffled"]].rename(
        columns={"layer_a": "layer", "nmi": "nmi_next", "nmi_shuffled": "nmi_next_shuffled"})
    return skew.merge(reuse, on="layer").merge(gates, on="layer").merge(nmi, on="layer", how="left")


def load_aggregates(path: str | Path = AGGREGATES) -> dict:
    """The aggregates JSON (plain or .xz; see prescope/assets/data/README.md), with a clear error if it is
    not that file."""
    path = Path(path)
    if not exists(path):
        raise FileNotFoundError(f"routing aggregates file {path} does not exist")
    data = json.loads(read_text(path))
    if not isinstance(data, dict) or "models" not in data or "layers_recorded" not in data:
        raise ValueError(f"{path} is not a routing aggregates file (expected keys 'models', 'layers_recorded')")
    return data


def aggregate_skew(path: str | Path = AGGREGATES, model: str = "olmoe-1b-7b") -> pd.DataFrame:
    """Per (domain, recorded layer) of the reference model: tokens, entropy_norm, max_over_mean."""
    data = load_aggregates(path)
    if model not in data["models"]:
        raise ValueError(f"model {model!r} not in {path}; it holds {sorted(data['models'])}")
    ref = data["models"][model]
    rows = []
    for domain, per_layer in ref["expert_counts"].items():
        for layer, counts in zip(data["layers_recorded"], per_layer, strict=True):
            c = np.zeros(ref["num_experts"])
            for e, n in counts.items():
                c[int(e)] = n
            rows.append({"source": model, "domain": domain, "ref_layer": layer,
                         "tokens": int(c.sum() // ref["top_k"]), **count_skew(c)})
    return pd.DataFrame(rows)


def compare_with_aggregates(trace: Trace, path: str | Path = AGGREGATES, model: str = "olmoe-1b-7b") -> pd.DataFrame:
    """Load skew of the trace next to the reference model's at layers 0/7/15, per domain, as one long table.

    Trace layers are matched by relative depth: ordinal round(ref_layer / (ref_layers - 1) * (L - 1)) (the
    same index when the trace has the reference's layer count). Trace domains use the aggregates' names.
    """
    ref = aggregate_skew(path, model)
    L, ref_layers = trace.layout.num_moe_layers, AGGREGATE_NUM_LAYERS[model]
    ref["layer"] = ref["ref_layer"]
    rows = [ref]
    domains = trace.tokens["domain"].map(lambda d: AGGREGATE_DOMAIN_NAMES.get(d, d))
    for domain in sorted(domains.unique()):
        counts = selection_counts(trace.select((domains == domain).to_numpy()))
        for ref_layer in sorted(ref["ref_layer"].unique()):
            layer = round(ref_layer / (ref_layers - 1) * (L - 1))
            c = counts[layer]
            rows.append(pd.DataFrame([{"source": "trace", "domain": domain, "ref_layer": ref_layer, "layer": layer,
                                       "tokens": int(c.sum() // trace.layout.top_k), **count_skew(c)}]))
    return pd.concat(rows, ignore_index=True)[["source", "domain", "ref_layer", "layer", "tokens",
                                               "entropy_norm", "max_over_mean"]]


def aggregate_cross_layer(path: str | Path = AGGREGATES, model: str = "olmoe-1b-7b") -> pd.DataFrame:
    """Per (domain, layer pair 0→7, 7→15) of the reference model: NMI of its rank-aligned pair counts
    (compare with `cross_layer(trace, layer_pairs, pairing="rank")`)."""
    data = load_aggregates(path)
    if model not in data["models"]:
        raise ValueError(f"model {model!r} not in {path}; it holds {sorted(data['models'])}")
    ref, recorded = data["models"][model], data["layers_recorded"]
    E = ref["num_experts"]
    rows = []
    for domain, pair_lists in ref["crosslayer_pairs"].items():
        for (la, lb), pairs in zip(zip(recorded, recorded[1:], strict=False), pair_lists, strict=True):
            counts = np.zeros((E, E))
            for a, b, n in pairs:
                counts[a, b] += n
            rows.append({"source": model, "domain": domain, "ref_layer_a": la, "ref_layer_b": lb,
                         "tokens": int(counts.sum() // ref["top_k"]), "nmi": pair_nmi(counts)})
    return pd.DataFrame(rows)
