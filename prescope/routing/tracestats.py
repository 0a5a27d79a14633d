"""`prescope trace-stats PATH`: a routing trace's shape and routing statistics, for people and for machines.

Any trace the reader takes (`reader.read_trace`: a prescope parquet or a llama.cpp route trace, plain or .xz).
Prints the trace's shape (model, L MoE layers, E experts, K top-k, tokens by phase, prompts, hidden states),
then one row per MoE layer (`stats.routing_summary`: load entropy, max/mean load, lag-1 decode reuse against
the random K/E, top-1 weight, NMI with the next layer against its shuffled baseline) with the layer's expert
size, then one JSON line with the same figures pooled (the keys `prescope trace` prints) and per layer.

Letters: T tokens, L MoE layers, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import json
import math

import pandas as pd

from prescope.files import check_output, write_with_sidecar
from prescope.routing import stats
from prescope.routing.reader import read_trace, trace_format
from prescope.routing.trace import Trace

MIB = 2**20
SHOWN = ("layer", "decoder_layer", "expert_MiB", "tokens", "entropy_norm", "max_over_mean", "reuse_lag1",
         "reuse_random", "top1_weight", "nmi_next", "nmi_next_shuffled")


def _rounded(value, digits: int = 4):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), digits)


def trace_stats(trace: Trace) -> tuple[pd.DataFrame, dict]:
    """(per-layer table, pooled figures) of `trace`: its shape and routing statistics (module docstring)."""
    lay = trace.layout
    table = stats.routing_summary(trace)
    table.insert(2, "expert_MiB", [lay.bytes_of(o) / MIB for o in table["layer"]])
    phases = trace.tokens["phase"].value_counts()
    decode = int(phases.get("decode", 0))
    reuse = stats.reuse_by_lag(trace, lags=(1,))["reuse"].iloc[0] if decode > 1 else math.nan
    sizes = lay.expert_bytes_per_layer
    pooled = {
        "model_class": lay.model_class, "num_layers": lay.num_layers, "moe_layers": lay.num_moe_layers,
        "num_experts": lay.num_experts, "top_k": lay.top_k, "hidden_size": lay.hidden_size,
        "tokens": trace.num_tokens, "prefill_tokens": int(phases.get("prefill", 0)), "decode_tokens": decode,
        "prompts": int(trace.tokens["prompt"].nunique()), "hidden_states": trace.hidden is not None,
        "missing_entries": int((~trace.present).sum()),
        "expert_bytes_per_layer": list(sizes), "expert_bytes_all_layers": int(sum(sizes) * lay.num_experts),
        "reuse_lag1_decode": _rounded(reuse), "reuse_random": _rounded(stats.random_reuse(trace)),
        "entropy_norm_mean": _rounded(table["entropy_norm"].mean()),
        "nmi_next_mean": _rounded(table["nmi_next"].mean()),
        "nmi_next_shuffled_mean": _rounded(table["nmi_next_shuffled"].mean()),
    }
    return table, pooled


def _shape_line(path: str, kind: str, pooled: dict) -> str:
    sizes = pooled["expert_bytes_per_layer"]
    size = (f"{sizes[0] / MIB:.2f} MiB experts" if len(set(sizes)) == 1 else
            f"experts of {min(sizes) / MIB:.2f}-{max(sizes) / MIB:.2f} MiB by layer ({len(set(sizes))} sizes)")
    return (f"{path} ({kind}): {pooled['model_class']}, L={pooled['moe_layers']} MoE layers of "
            f"{pooled['num_layers']}, E={pooled['num_experts']}, K={pooled['top_k']}, {size}; "
            f"{pooled['tokens']} tokens ({pooled['prefill_tokens']} prefill, {pooled['decode_tokens']} decode) "
            f"in {pooled['prompts']} prompt(s); hidden states: {'yes' if pooled['hidden_states'] else 'no'}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="routing trace: a prescope .parquet (`prescope trace`) or a llama.cpp "
                                     "route trace (.csv), plain or .xz")
    parser.add_argument("--csv", default="", help="also write the per-layer table to this CSV ('' = no)")


def run(args: argparse.Namespace) -> int:
    if args.csv:
        check_output(args.csv, what="--csv")
    trace = read_trace(args.path)
    kind, compressed = trace_format(args.path)
    table, pooled = trace_stats(trace)
    print(_shape_line(args.path, kind + (", xz" if compressed else ""), pooled))
    print(table[list(SHOWN)].round(3).to_string(index=False))
    if args.csv:
        write_with_sidecar(args.csv, table.to_csv(index=False))
    per_layer = {c: [_rounded(v) for v in table[c]] for c in SHOWN[3:]}
    print(json.dumps({"command": "trace-stats", "trace": str(args.path), "format": kind, **pooled,
                      "per_layer": per_layer}))
    return 0
