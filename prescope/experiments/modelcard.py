"""`prescope tiny-card`: the routing section of prescope-tiny's model card, measured, never typed in.

Records routing traces of the trained model and of its random-initialised twin (same config, same
held-out prompts) on the CPU, and sets their statistics beside the real traces' (`prescope/assets/data/routing`:
Qwen3-30B-A3B and gpt-oss-120b, llama.cpp) and OLMoE-1B-7B's published per-domain aggregates: lag-1
decode reuse against the random baseline K/E, per-layer load skew, adjacent-layer NMI and top-1 gate
weight. Writes the numbers into `model_card.json` (key `routing_statistics`) and a table into the card's
README, atomically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from prescope.data import shipped
from prescope.files import git_revision, read_json, write_atomic, write_json
from prescope.models.corpus import CorpusSpec
from prescope.models.tiny import CARD_ROUTING_KEY, TINY_DIR, TinyConfig, build_model, load_tiny
from prescope.routing import stats as rs
from prescope.routing.llamacpp import load_llamacpp_trace
from prescope.routing.recording import heldout_prompts, record_trace
from prescope.routing.trace import Trace

REAL_TRACES = {"Qwen3-30B-A3B": "qwen3-30b-a3b.route.csv", "gpt-oss-120b": "gpt-oss-120b.route.csv"}
README_MARK = "## Routing statistics"


def trace_statistics(trace: Trace) -> dict:
    """The card's figures for one trace (means over layers)."""
    summary = rs.routing_summary(trace)
    return {"lag1_reuse": float(rs.temporal_reuse(trace, lags=(1,))["reuse"].mean()),
            "random_reuse": rs.random_reuse(trace),
            "load_entropy_norm": float(summary["entropy_norm"].mean()),
            "load_max_over_mean": float(summary["max_over_mean"].mean()),
            "nmi_next_layer": float(summary["nmi_next"].mean()),
            "nmi_next_layer_shuffled": float(summary["nmi_next_shuffled"].mean()),
            "top1_gate_weight": float(summary["top1_weight"].mean()),
            "tokens": int(trace.num_tokens)}


def card_statistics(data_dir: Path, prompts_per_domain: int = 4, prompt_tokens: int = 64,
                    max_new_tokens: int = 32) -> dict:
    import torch

    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a small shared machine
    model, tokenizer = load_tiny()
    card = read_json(TINY_DIR / "model_card.json", "model card")
    spec = CorpusSpec(corpus_dir=str(data_dir / "corpus"))
    prompts, domains = heldout_prompts(tokenizer, spec, prompts_per_domain, prompt_tokens)
    record = dict(max_new_tokens=max_new_tokens, batch_size=4, domains=domains, progress=False)
    trained = record_trace(model, tokenizer, prompts, **record)
    twin = build_model(TinyConfig(**card["config"]) if "config" in card else TinyConfig(), seed=1).eval()
    random_twin = record_trace(twin, tokenizer, prompts, **record)
    rows = {"prescope-tiny (trained)": trace_statistics(trained),
            "prescope-tiny random twin": trace_statistics(random_twin)}
    for name, file in REAL_TRACES.items():
        rows[f"{name} (real, llama.cpp)"] = trace_statistics(load_llamacpp_trace(data_dir / "routing" / file))
    aggregates = rs.aggregate_skew(data_dir / "routing" / "olmoe-mixtral-routing-aggregates.json")
    per_domain = rs.load_skew(trained.select(trained.tokens["domain"] != ""))
    return {"traces": rows,
            "olmoe_1b_7b_aggregates_load_entropy_norm": float(aggregates["entropy_norm"].mean()),
            "trained_vs_random": {
                "lag1_reuse": [rows["prescope-tiny (trained)"]["lag1_reuse"],
                               rows["prescope-tiny random twin"]["lag1_reuse"]],
                "load_entropy_norm": [rows["prescope-tiny (trained)"]["load_entropy_norm"],
                                      rows["prescope-tiny random twin"]["load_entropy_norm"]]},
            "per_layer_load_entropy_norm": per_domain["entropy_norm"].round(4).tolist(),
            "prompts": len(prompts), "prompt_tokens": prompt_tokens, "max_new_tokens": max_new_tokens,
            "source": "measured on the CPU", "git_revision": git_revision()}


def write_card(stats: dict, model_dir: Path = TINY_DIR) -> None:
    card_path = model_dir / "model_card.json"
    card = read_json(card_path, "model card")
    card[CARD_ROUTING_KEY] = stats
    write_json(card_path, card)
    table = pd.DataFrame(stats["traces"]).T.round(3)
    text = (f"{README_MARK}\n\nMeasured by `prescope tiny-card` (git {stats['git_revision'][:12]}) on "
            f"{stats['prompts']} held-out prompts ({stats['prompt_tokens']} tokens, {stats['max_new_tokens']} "
            "generated, greedy), beside the real traces in `prescope/assets/data/routing/`. lag1_reuse: share of a "
            "decode token's experts that the previous token also used (same layer); random_reuse = K/E; "
            "load_entropy_norm: normalised entropy of expert selection counts per layer (1 = uniform); "
            "nmi_next_layer: mutual information between adjacent layers' choices (shuffled: the small-sample "
            f"baseline). OLMoE-1B-7B's published aggregates give load_entropy_norm "
            f"{stats['olmoe_1b_7b_aggregates_load_entropy_norm']:.3f} (layers 0/7/15, six domains).\n\n```\n"
            f"{table.to_string()}\n```\n")
    readme = model_dir / "README.md"
    body = readme.read_text()
    head = body.split(README_MARK)[0].rstrip() + "\n\n"
    write_atomic(readme, head + text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=str(shipped()),
                        help="data folder holding corpus/ and routing/ (files plain or .xz; default: the copy "
                             "shipped in prescope/assets/data)")
    parser.add_argument("--prompts-per-domain", type=int, default=4,
                        help="held-out prompts of each corpus domain recorded (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    stats = card_statistics(Path(args.data_dir), args.prompts_per_domain)
    write_card(stats)
    print(pd.DataFrame(stats["traces"]).T.round(3).to_string())
    print(json.dumps({"tiny_card": str(TINY_DIR), **stats["trained_vs_random"]}))
    return 0
