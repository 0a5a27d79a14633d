"""`prescope predictor-accuracy`: every predictor on any routing trace, held out by position or by prompt.

For a trace of any model (a llama.cpp route trace, or a prescope .parquet; any L, E, K and expert sizes) the
tokens are split into a training part and a held-out part (`routellapor.heldout_mask`: whole prompts where
the trace has enough of them, else the last share of each prompt's positions, as one long real trace needs).
Fitted on the training part: popularity, the activation matrix (MoE-Infinity) and routing-only LLaPor;
training-free: the previous token's experts. Where the trace carries hidden states and router logits, gate
lookahead (routers fitted to the training part) and LLaPor are added; where it carries none they are left
out and the report says so. Scored on the held-out decode tokens, whose history (previous and earlier
tokens) reads the whole trace causally, by source layer and distance (`accuracy.evaluate`).

Writes `<out>/accuracy.csv` (long table) and `<out>/summary.json` (which trace, its hash, the split, the
config, the git revision, means by distance, gains of routing-only LLaPor over the history baselines),
each atomically and checksummed. Measured on this machine's CPU; accuracy does not depend on the hardware.

Letters: L MoE layers, E experts, K top-k, D lookahead distance.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from prescope.predict.llaporconfig import LLaPorConfig, LLaPorError

HISTORY = ("previous_token", "popularity", "activation_matrix")


def accuracy_report(trace, label: str, config: LLaPorConfig, *, heldout_fraction: float = 0.3,
                    distances=(1, 2, 3, 4), predictor_path: str | None = None, progress: bool = False):
    """(long table, summary dict, the routing-only LLaPor scored) of every predictor that can run on `trace`."""
    from prescope.files import git_revision
    from prescope.predict import predictors as P
    from prescope.predict.accuracy import METRICS, evaluate, mean_by_distance
    from prescope.predict.routellapor import heldout_mask, load, train_routing_llapor

    held = heldout_mask(trace, heldout_fraction, config.seed)
    decode = (trace.tokens["phase"] == "decode").to_numpy()
    if not (held & decode).any():
        raise LLaPorError(f"{label}: the held-out {heldout_fraction:.0%} of the trace has no decode tokens to score")
    train = trace.select(~held)
    began, notes = time.perf_counter(), []
    preds = {"previous_token": P.PreviousToken(trace.layout), "popularity": P.Popularity().fit(train),
             "activation_matrix": P.ActivationMatrix().fit(train)}
    if predictor_path:
        preds["llapor_routing"] = load(predictor_path)
        preds["llapor_routing"].check_model(trace.layout)
        notes.append("llapor_routing read from a checkpoint (--predictor)")
    else:
        preds["llapor_routing"] = train_routing_llapor(trace, config, progress=progress, exclude=held)
    trained_s = time.perf_counter() - began
    if trace.hidden is not None and trace.logits is not None:
        from prescope.predict import llapor

        preds["gate_lookahead"] = P.GateLookahead().fit(train)
        if train.tokens["prompt"].nunique() >= 2:
            preds["llapor"] = llapor.train_llapor(train, config, progress=progress)
        else:
            notes.append("llapor left out: its validation split needs >= 2 training prompts")
    else:
        notes.append("gate_lookahead and llapor left out: the trace has no hidden states or router logits")
    D = config.distance
    table = evaluate(preds, trace, [d for d in distances if d <= D], tokens=held, batch_sizes=(1,), by_domain=False)
    means = {m: mean_by_distance(table, m) for m in METRICS}
    ref = means["recall_at_k"]
    gains = {other: {int(d): round(100 * float(ref.loc["llapor_routing", d] - ref.loc[other, d]), 2)
                     for d in ref.columns} for other in HISTORY}
    lay = trace.layout
    summary = {
        "source": "measured", "hardware": "cpu (accuracy does not depend on it)", "git_revision": git_revision(),
        "trace": label, "trace_hash": preds["llapor_routing"].trace_info.get("hash", ""),
        "model": trace.meta.get("model", lay.model_class),
        "layout": {"moe_layers": lay.num_moe_layers, "experts": lay.num_experts, "top_k": lay.top_k},
        "tokens": int(trace.num_tokens), "heldout_tokens_scored": int((held & decode).sum()),
        "split": "by prompt" if trace.tokens["prompt"].nunique() >= max(2, round(1 / heldout_fraction))
                 else f"by position: the last {heldout_fraction:.0%} of each prompt's tokens held out",
        "config": asdict(config), "predictors": sorted(preds), "notes": notes,
        "train_seconds": round(trained_s, 1),
        **{f"mean_{m}": {p: {int(d): round(float(v), 4) for d, v in row.items()} for p, row in means[m].iterrows()}
           for m in METRICS},
        "llapor_routing_gain_points": gains,
    }
    summary["recall_at_k_by_layer_group"] = _thirds(table, lay.num_moe_layers)
    return table, summary, preds["llapor_routing"]


def _thirds(table, L: int) -> dict:
    """recall@K by predictor, distance and third of the source layers (first, middle, last)."""
    import numpy as np

    sel = table[(table["metric"] == "recall_at_k") & (table["domain"] == "all")].copy()
    sel["third"] = np.minimum(3 * sel["layer"].to_numpy() // max(L, 1), 2)
    out = {}
    for (p, third, d), v in sel.groupby(["predictor", "third", "distance"])["value"].mean().items():
        out.setdefault(p, {}).setdefault(("first", "middle", "last")[third], {})[int(d)] = round(float(v), 4)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prescope.predict.llaporconfig import add_arguments as llapor_arguments

    parser.add_argument("--heldout-fraction", "--heldout_fraction", dest="heldout_fraction", type=float,
                        default=0.3, help="share held out: whole prompts where the trace has enough, else the last "
                                          "share of each prompt's positions (default: %(default)s)")
    parser.add_argument("--predictor", default="", help="a routing-only LLaPor checkpoint to score instead of "
                                                        "training one on the trace's training part")
    parser.add_argument("--layers", type=int, default=None,
                        help="only the trace's first N MoE layers (the predictor of a twin cut to N layers)")
    parser.add_argument("--save-predictor", "--save_predictor", dest="save_predictor", default="",
                        help="also write the routing-only LLaPor trained here (never on the held-out tokens) to "
                             "this .pt, for `prescope trace-compare --heldout-fraction` and `bench`")
    llapor_arguments(parser)
    for action in parser._actions:  # the options LLaPor's training shares; --out names a folder here
        if action.dest == "out":
            action.help = "folder for accuracy.csv and summary.json"
        if action.dest == "routing_only":
            action.help = "no effect here: routing-only LLaPor always runs, LLaPor too where the trace has hidden states"


def run(args: argparse.Namespace) -> int:
    from prescope.files import check_output, portable_path, write_json, write_with_sidecar
    from prescope.predict.llapor import config_from_args
    from prescope.predict.routellapor import cut_layers
    from prescope.routing.reader import read_trace

    config = config_from_args(args)
    if args.model:
        raise LLaPorError("predictor-accuracy fits the routers to the trace; leave --model out")
    out = check_output(args.out, folder=True, what="--out")
    trace = read_trace(args.trace)
    if args.layers is not None:
        if not 2 <= args.layers <= trace.layout.num_moe_layers:
            raise LLaPorError(f"--layers must be in 2..{trace.layout.num_moe_layers}, got {args.layers}")
        trace = cut_layers(trace, args.layers)
    if args.save_predictor:
        check_output(args.save_predictor, what="--save-predictor")
    table, summary, trained = accuracy_report(trace, portable_path(args.trace), config, heldout_fraction=args.heldout_fraction,
                                              predictor_path=args.predictor or None, progress=not args.no_progress)
    if args.save_predictor:
        trained.save(args.save_predictor)
    write_with_sidecar(Path(out) / "accuracy.csv", table.to_csv(index=False, float_format="%.6g"))
    write_json(Path(out) / "summary.json", summary, indent=2)
    print(json.dumps({"command": "predictor-accuracy", "out": str(out), "trace": summary["trace"],
                      "mean_recall_at_k": summary["mean_recall_at_k"],
                      "llapor_routing_gain_points": summary["llapor_routing_gain_points"]}))
    return 0
