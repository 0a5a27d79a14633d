"""`prescope train-tiny`: prescope-tiny's recipe, and with `--like NAME` the routing model of twin NAME with its card.

Without `--like` the command is prescope-tiny's own (`models.tiny.run`, unchanged). With `--like NAME` (a twin,
or `all` for every twin whose routing model is not yet in `--out`) it trains `models.routers.build_router_model(NAME)`
(the twin's family and routing structure at narrow widths) on the shipped corpus with prescope-tiny's tokenizer,
recipe and early stopping (`models.tinytrain.train`), then writes the model with its card: held-out loss per domain
against a random-initialised model of the same narrow shape (same seed), and routing statistics of both on
held-out prompts (lag-1 decode reuse against K/E, load entropy, cross-layer NMI, top-1 gate weight:
`modelcard.trace_statistics`) beside the real model's figures where the project ships them (the real llama.cpp
traces of Qwen3-30B-A3B and gpt-oss-120b, OLMoE-1B-7B's and Mixtral-8x7B's published load aggregates).
`--llapor` adds LLaPor against gate lookahead on the routing model's held-out text, by layer group and distance
(`predict.accuracy.run_report`: traces recorded on `--device`, LLaPor's layers trained on the CPU in parallel
processes, one per core, each seeded and single-threaded, so the weights do not depend on the count), into the card and
`--out/NAME/llapor/`; with `--like all` it also measures the models already in `--out` that lack it.
Everything a run writes is under `--out` (and its `data/` folder: the prepared corpus, the LLaPor cache), so a GPU
run takes one folder back: `prescope train-tiny --like all --out DIR --device cuda [--llapor]`.

`--like` trains shorter, smaller batches than prescope-tiny by default (`ROUTER_TRAINING`): a training flag left at
prescope-tiny's default takes the routing-model default instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from prescope.config import check_device
from prescope.data import shipped
from prescope.files import check_output, git_revision, read_json, write_atomic, write_json
from prescope.models import corpus, tiny
from prescope.models.tinytrain import TinyConfig, evaluate_domains, train

if TYPE_CHECKING:  # torch, transformers and the twins load where a model trains, so `--help` starts fast
    from prescope.models import routers, twins  # noqa: F401

ALL = "all"
# Training defaults of a routing model (prescope-tiny's recipe otherwise): 400 steps of 64 x 256 tokens.
ROUTER_TRAINING = {"steps": 400, "batch_size": 64}
# The real model's shipped routing beside each twin's routing model: (label, kind, file or aggregate model).
REAL_ROUTING = {
    "qwen3-30b-a3b": ("Qwen3-30B-A3B (real, llama.cpp)", "trace", "qwen3-30b-a3b.route.csv"),
    "gpt-oss-120b": ("gpt-oss-120b (real, llama.cpp)", "trace", "gpt-oss-120b.route.csv"),
    "gpt-oss-20b": ("gpt-oss-120b (real, llama.cpp; the 20b's larger sibling)", "trace", "gpt-oss-120b.route.csv"),
    "olmoe-1b-7b": ("OLMoE-1B-7B (published aggregates)", "aggregates", "olmoe-1b-7b"),
    "mixtral-8x7b": ("Mixtral-8x7B (published aggregates)", "aggregates", "mixtral-8x7b-v0.1"),
}
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_experts", "top_k", "max_position",
                "tie_embeddings")  # TinyConfig's prescope-tiny shape, not a routing model's
CARD_PROMPTS = dict(prompts_per_domain=4, prompt_tokens=64, max_new_tokens=32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tiny.add_arguments(parser)
    parser.add_argument("--like", default=None,
                        help=f"train the routing model of this twin (a name of prescope.models.twins.TWINS) or '{ALL}' "
                             "(every twin whose model is not in --out yet, each in --out/NAME); without it, prescope-tiny")
    parser.add_argument("--router-hidden", type=int, default=None, help="--like: model width H (default: the twin's "
                        "entry in models.routers.ROUTER_WIDTHS)")
    parser.add_argument("--router-expert", type=int, default=None, help="--like: expert width I (default: as --router-hidden)")
    parser.add_argument("--llapor", action="store_true", help="--like: also measure LLaPor against gate lookahead "
                        "on held-out text into the card (trains LLaPor; minutes on a GPU)")


def run(args: argparse.Namespace) -> int:
    if args.like is None:
        return tiny.run(args)
    from prescope.models import twins

    check_device(args.device)
    names = twins.list_twins() if args.like == ALL else [args.like]
    if args.like != ALL:
        twins.twin_spec(args.like)  # a clear error for an unknown twin
    check_output(args.out, folder=True, what="--out")
    config = router_training(args)
    data = args.data or (Path(args.out) if args.like == ALL else Path(args.out).parent) / "data"
    for name in names:
        out = Path(args.out) / name if args.like == ALL else Path(args.out)
        if args.like == ALL and (out / "model_card.json").is_file():
            print(f"train-tiny: {name}: already in {out}")
            card = read_json(out / "model_card.json", "model card")
        else:
            card = train_router(name, out, config, device=args.device, data_dir=Path(data), corpus_dir=args.corpus_dir,
                                hidden=args.router_hidden, expert=args.router_expert, eval_tokens=args.eval_tokens,
                                valid_every=args.valid_every, progress=not args.no_progress)
        if args.llapor and "llapor_vs_gate_lookahead" not in card:
            card = add_llapor(out, cache_dir=Path(data) / "llapor" / name, progress=not args.no_progress,
                              device=args.device or _default_device())
        print(json.dumps({"routing_model": name, "out": str(out), "params": card["params"]["total"],
                          "bytes": card["bytes"], "wall_s": card["training"]["wall_s"],
                          "trained_vs_random": card["routing"]["trained_vs_random"]}))
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def router_training(args: argparse.Namespace) -> TinyConfig:
    """The training config of a routing model: the flags given, `ROUTER_TRAINING` where left at prescope-tiny's."""
    defaults = TinyConfig()
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TinyConfig)}
    for key, value in ROUTER_TRAINING.items():
        if values[key] == getattr(defaults, key):
            values[key] = value
    return TinyConfig(**values)


def reproduce_flags(config: TinyConfig, schedule_steps: int) -> str:
    """The training flags that differ from a routing model's defaults (the step count that was scheduled)."""
    defaults = dataclasses.replace(TinyConfig(), **ROUTER_TRAINING)
    values = {**dataclasses.asdict(config), "steps": schedule_steps}
    return "".join(f" --{k.replace('_', '-')} {v}" for k, v in values.items()
                   if k not in (*SHAPE_FIELDS, "time_budget_s") and v != getattr(defaults, k))


def prepared(data_dir: Path, corpus_dir: Path | None, config: TinyConfig):
    """(tokenizer, train ids, held-out ids, record): the corpus with prescope-tiny's tokenizer, prepared once."""
    if not (data_dir / "prepare.json").is_file():
        _, tokenizer = tiny.load_tiny()
        spec = config.corpus_spec(corpus_dir or corpus.default_corpus_dir())
        corpus.prepare(spec, config.vocab_size, data_dir, dataclasses.asdict(config), tokenizer=tokenizer)
    return corpus.load_prepared(data_dir)


def train_router(name: str, out: Path, config: TinyConfig, *, device: str | None = None, data_dir: Path,
                 corpus_dir: Path | None = None, hidden: int | None = None, expert: int | None = None,
                 eval_tokens: int = 65536, valid_every: int = 25, progress: bool = True,
                 card_prompts: dict | None = None) -> dict:
    """Train twin `name`'s routing model, write it and its card to `out`; returns the card."""
    from prescope.models import routers, twins

    device = device or _default_device()
    tokenizer, stream, heldout, record = prepared(data_dir, corpus_dir, config)
    build = dict(hidden=hidden, expert=expert, aux_loss_coef=config.router_aux_loss_coef)
    model = routers.build_router_model(name, seed=config.seed, **build)
    stream, valid = corpus.validation_split(stream, record, 0.03)
    result = train(model, stream, config, device=device, progress=progress, monitor=valid, keep_best=True,
                   monitor_tokens=eval_tokens, monitor_every=valid_every)
    trained = evaluate_domains(model, tokenizer, heldout, config.seq_len, eval_tokens)
    random_model = routers.build_router_model(name, seed=config.seed, **build).to(device)
    table = trained.assign(random_loss=evaluate_domains(random_model, tokenizer, heldout, config.seq_len,
                                                        eval_tokens)["loss"].to_numpy())
    routing = routing_card(name, _for_card(model), _for_card(random_model), tokenizer,
                           config.corpus_spec(corpus_dir or corpus.default_corpus_dir()), **(card_prompts or CARD_PROMPTS))
    routing["source"] = f"measured on {device} ({'bf16' if device.startswith('cuda') else 'fp32'})"
    model.cpu()
    card = tiny.make_card(model, config, result, table, [], record, device, valid_every)
    card.update(name=f"{name} routing model", like=name, hub_id=twins.twin_spec(name).hub_id,
                structure=routers.structure(model.config), twin_structure=routers.structure(twins.twin_config(name)),
                command=f"prescope train-tiny --like {name} --out {routers.cache_root() / name}"
                        + (f" --router-hidden {hidden}" if hidden else "") + (f" --router-expert {expert}" if expert else "")
                        + reproduce_flags(config, result.schedule_steps) + f" --valid-every {valid_every}",
                routing=routing, git_revision=git_revision(), source="measured")
    sizes = twins.config_sizes(model.config)
    card["architecture"] = {"class": type(model).__name__, **{k: sizes[k] for k in (
        "model_type", "num_layers", "num_moe_layers", "num_experts", "top_k", "hidden_size", "expert_intermediate_size")},
        "num_heads": model.config.num_attention_heads, "vocab_size": model.config.vocab_size,
        "tie_embeddings": model.config.tie_word_embeddings}
    card["config"] = {k: v for k, v in card["config"].items() if k not in SHAPE_FIELDS}  # the shape is the twin's
    save(model, tokenizer, out, card)
    return read_json(out / "model_card.json", "model card")


def _for_card(model):
    """The model to record the card's routing with: a bf16 copy on a GPU (the grouped expert kernel's dtype there),
    the model itself (fp32) on the CPU."""
    import copy

    import torch

    device = next(model.parameters()).device
    return copy.deepcopy(model).to(torch.bfloat16) if device.type == "cuda" else model


def routing_card(name: str, model, random_model, tokenizer, spec, prompts_per_domain: int, prompt_tokens: int,
                 max_new_tokens: int) -> dict:
    """Routing statistics of the trained and the random-initialised model on held-out prompts, beside the real
    model's shipped figures."""
    from prescope.experiments.modelcard import trace_statistics
    from prescope.routing import stats as rs
    from prescope.routing.llamacpp import load_llamacpp_trace
    from prescope.routing.recording import heldout_prompts, record_trace

    prompts, domains = heldout_prompts(tokenizer, spec, prompts_per_domain, prompt_tokens)
    record = dict(max_new_tokens=max_new_tokens, batch_size=4, domains=domains, progress=False)
    rows = {"trained": trace_statistics(record_trace(model, tokenizer, prompts, **record)),
            "random init": trace_statistics(record_trace(random_model, tokenizer, prompts, **record))}
    if name in REAL_ROUTING:
        label, kind, source = REAL_ROUTING[name]
        if kind == "trace":
            rows[label] = trace_statistics(load_llamacpp_trace(shipped("routing", source)))
        else:
            rows[label] = {"load_entropy_norm": float(rs.aggregate_skew(model=source)["entropy_norm"].mean())}
    keys = ("lag1_reuse", "load_entropy_norm", "nmi_next_layer")
    return {"traces": rows, "trained_vs_random": {k: [round(rows["trained"][k], 4), round(rows["random init"][k], 4)]
                                                  for k in keys},
            "prompts": len(prompts), "prompt_tokens": prompt_tokens, "max_new_tokens": max_new_tokens}


def save(model, tokenizer, out: Path, card: dict) -> None:
    """bf16 safetensors, tokenizer, model_card.json and README.md (bytes filled from the safetensors)."""
    import copy

    import torch

    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to("cpu", torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    card = {**card, "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}
    write_json(out / "model_card.json", card, indent=2)
    write_atomic(out / "README.md", render(card))


def add_llapor(out: Path, cache_dir: Path, progress: bool = True, **report) -> dict:
    """LLaPor against gate lookahead on the routing model's held-out text (`accuracy.run_report` on the model
    in `out`; `report` goes to it, e.g. `device` that records the traces, `processes` that train LLaPor), by
    distance and layer group, into its card and README; returns the card."""
    from prescope.predict.accuracy import run_report

    start = time.perf_counter()
    summary = run_report(out / "llapor", cache_dir, model_dir=out, variants=False, progress=progress, **report)
    card = read_json(out / "model_card.json", "model card")
    card["llapor_vs_gate_lookahead"] = {
        "gain_points_by_distance": summary["gain_over_gate_lookahead_points"]["llapor"],
        "gain_points_by_group": summary["group_effect_gain_points"],
        "mean_recall_at_k": summary["mean_recall_at_k"], "boundaries": summary["boundaries"],
        "target_5_points_from_distance_2": summary["target"]["llapor_gain_at_least_5_points_from_distance_2"],
        "heldout_tokens": summary["traces"]["heldout"]["tokens"], "wall_s": round(time.perf_counter() - start, 1),
        "timings": summary["timings"],
        "source": summary["source"], "hardware": summary["hardware"], "git_revision": summary["git_revision"]}
    write_json(out / "model_card.json", card, indent=2)
    write_atomic(out / "README.md", render(card))
    return read_json(out / "model_card.json", "model card")


def render(card: dict) -> str:
    """The README of a routing model, rendered from its model_card.json."""
    arch, rec, routing = card["architecture"], card["training"], card["routing"]
    lines = [f"# {card['name']}", "",
             f"A small model trained on the corpus shipped with prescope with the routing structure of the "
             f"`{card['like']}` twin ({card['hub_id']}): it gives that twin learned routing and hidden states to replay "
             f"(`{card['like']}@router`). Narrow widths; real structure. Loads with "
             "`transformers.AutoModelForCausalLM.from_pretrained`; prescope-tiny's tokenizer.", "",
             "## Structure (equal to the twin's)", "", "| field | routing model | twin |", "|---|---|---|",
             *[f"| {k} | {v} | {card['twin_structure'][k]} |" for k, v in card["structure"].items()], "",
             "## Architecture", "", "| field | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in arch.items()],
             f"| parameters | {card['params']['total']:,} (experts {card['params']['experts']:,}) |",
             f"| weights on disk | {card['bytes']:,} bytes (bf16 safetensors) |", "",
             "## Training", "", "| field | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rec.items()], "",
             "## Held-out loss per domain (nats per token)", "", *tiny.heldout_table(card["heldout"]), "",
             "The random model has the same narrow shape and the same seed, untrained.", "",
             "## Routing statistics", "",
             f"Measured on {routing['prompts']} held-out prompts ({routing['prompt_tokens']} tokens, "
             f"{routing['max_new_tokens']} generated, greedy); the real model's figures from the traces and aggregates "
             "shipped in `prescope/assets/data/routing` (see `prescope tiny-card` for the definitions).", "", "```",
             pd.DataFrame(routing["traces"]).T.round(3).to_string(), "```", ""]
    if "llapor_vs_gate_lookahead" in card:
        lp = card["llapor_vs_gate_lookahead"]
        lines += ["## LLaPor against gate lookahead (held-out decode tokens, recall@K, points)", "",
                  f"By distance: {lp['gain_points_by_distance']}; by layer group: {lp['gain_points_by_group']}; "
                  f"≥ 5 points from distance 2: {lp['target_5_points_from_distance_2']} ({lp['hardware']}, "
                  f"{lp['heldout_tokens']} held-out tokens).", ""]
    lines += ["## Reproduce", "", "```bash", card["command"], "```", ""]
    return "\n".join(lines)
