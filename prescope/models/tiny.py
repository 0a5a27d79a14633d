"""prescope-tiny: the project's own small trained MoE language model, and its reproducible recipe.

Architecture: transformers' `OlmoeForCausalLM` with OLMoE-1B-7B's routing topology (L = 16 MoE
layers, E = 64 experts, K = 8 per token, no shared expert, unnormalised top-k weights) at a tiny
width (H = 128, I = 32, 4 heads, 8192-token byte-level BPE vocabulary, tied embeddings). Parameters:
V·H + L·(4·H² + E·3·H·I + E·H + 2·H + 2·H) + H ≈ 14.8M, ≈ 29.7 MB in bf16, under the repository's
32 MB budget; the experts hold 85% of it, as in the real model.

Recipe (`prescope train-tiny`): corpus (`prescope.models.corpus`, five domains, held-out split) →
BPE tokenizer trained on the training split → token ids (`.npy`) → AdamW with linear warm-up and a
cosine decay, bf16 autocast on CUDA and fp32 on the CPU, the load-balancing auxiliary loss on →
held-out loss per domain for the trained model and for its random-initialised twin (same config,
same seed) → `save_pretrained` in bf16 plus tokenizer, `model_card.json` and `README.md`.
The two halves can run on different machines: `--prepare-only` writes tokenizer and ids to a
folder, `--data FOLDER` trains from it. The training loop, its learning-rate schedule and the
held-out evaluation live in `tinytrain.py` (re-exported here).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from prescope.config import check_device
from prescope.files import check_output, portable_path, write_atomic, write_json
from prescope.models import corpus
from prescope.models.corpus import (
    EOS_ID,
    PAD_ID,
    build_tokenizer,
    encode_documents,
    load_prepared,
    validation_split,
)
from prescope.models.tinytrain import (
    AUTOCAST_EXPERTS,
    TINY_FIELD_HELP,
    TinyConfig,
    TinyConfigError,
    TrainResult,
    evaluate_domains,
    greedy_continuations,
    lr_at,
    train,
)

__all__ = [
    "EOS_ID", "PAD_ID", "TINY_DIR", "TinyConfig", "TinyConfigError", "TrainResult", "add_arguments",
    "build_model", "build_tokenizer", "encode_documents", "evaluate_domains", "greedy_continuations",
    "load_prepared", "load_tiny", "lr_at", "run", "save_tiny", "train", "validation_split", "write_card",
]

TINY_DIR = Path(__file__).resolve().parents[1] / "assets" / "prescope-tiny"
CARD_ROUTING_KEY = "routing_statistics"


# ---------------------------------------------------------------- model


def build_model(config: TinyConfig, seed: int | None = None):
    """A randomly initialised `OlmoeForCausalLM` of this config (fp32, CPU); same seed, same weights."""
    import torch
    from transformers import GenerationConfig, OlmoeForCausalLM

    torch.manual_seed(config.seed if seed is None else seed)
    model = OlmoeForCausalLM(config.olmoe_config())
    model.generation_config = GenerationConfig(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


# ---------------------------------------------------------------- saving and loading


def count_parameters(model) -> dict[str, int]:
    """Unique parameters in total and in the routed experts."""
    params = {id(p): p for p in model.parameters()}.values()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"total": sum(p.numel() for p in params), "experts": experts}


def save_tiny(model, tokenizer, out_dir: Path, card: dict) -> Path:
    """Write bf16 safetensors, config, generation config, tokenizer, model_card.json and README.md."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A bf16 copy on the CPU: casting the model itself would destroy its fp32 master weights.
    copy.deepcopy(model).to("cpu", torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_card(out_dir, card)
    return out_dir


def write_card(out_dir: Path, card: dict) -> None:
    """model_card.json and its rendering README.md; `bytes` is filled from the safetensors on disk."""
    weights = sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))
    card = {**card, "bytes": weights, CARD_ROUTING_KEY: card.get(CARD_ROUTING_KEY)}
    write_json(Path(out_dir) / "model_card.json", card, indent=2)
    write_atomic(Path(out_dir) / "README.md", render_card(card))


def render_card(card: dict) -> str:
    """The README model card, rendered from the model_card.json record."""
    arch, train_rec = card["architecture"], card["training"]
    lines = [
        "# prescope-tiny", "",
        "The prescope project's own small Mixture-of-Experts language model: OLMoE-1B-7B's routing topology "
        f"({arch['num_layers']} MoE layers, {arch['num_experts']} experts, top-{arch['top_k']}) at a tiny width, "
        "trained on the corpus shipped with prescope plus Python standard-library source so its routing is learned, not random. "
        "Loads with `transformers.AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.", "",
        "## Architecture", "",
        "| field | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in arch.items()],
        f"| parameters | {card['params']['total']:,} (experts {card['params']['experts']:,}) |",
        f"| weights on disk | {card['bytes']:,} bytes (bf16 safetensors) |", "",
        "## Training", "",
        "| field | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in train_rec.items()], "",
        "## Held-out loss per domain (nats per token)", "",
        *heldout_table(card["heldout"]),
        "", "The random twin has the same config and the same seed initialisation, untrained.", "",
        "## Greedy continuations of held-out prompts", "",
    ]
    for c in card["continuations"]:
        lines += [f"**{c['domain']}**", "", "```text", c["prompt"] + "⟦" + c["continuation"] + "⟧", "```", ""]
    lines += ["(prompt, then the model's greedy continuation inside ⟦ ⟧)", ""]
    if card.get("notes"):
        lines += ["## Notes", "", *[f"- {note}" for note in card["notes"]], ""]
    lines += ["## Routing statistics", "",
              "To be added by the project lead (key `routing_statistics` in `model_card.json`).", "",
              "## Reproduce", "", "```bash", card["command"], "```", "",
              "Corpus: allenai/OLMoE routing texts (Apache-2.0; arxiv, c4, github, wikipedia samples) from "
              "`prescope/assets/data/corpus` (shipped with the package), plus the Python standard library of the preparing interpreter "
              f"(Python {card['python']}).", ""]
    return "\n".join(lines)


def heldout_table(rows: list[dict]) -> list[str]:
    """Markdown rows of the held-out table; a `cpu_loss` column appears when the rows carry one."""
    cpu = bool(rows) and "cpu_loss" in rows[0]
    head = "| domain | tokens | trained | random twin |" + (" committed bf16 on CPU |" if cpu else "")
    rule = "|---|---|---|---|" + ("---|" if cpu else "")
    body = [f"| {r['domain']} | {r['tokens']} | {r['loss']:.3f} | {r['random_loss']:.3f} |"
            + (f" {r['cpu_loss']:.3f} |" if cpu else "") for r in rows]
    return [head, rule, *body]


def load_tiny(dir: Path | str | None = None, dtype=None):  # noqa: A002 - contract name
    """(model, tokenizer) of the committed prescope-tiny (or the one in `dir`), eval mode, on the CPU, in `dtype`
    (a torch dtype; None = float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    path = Path(dir) if dir is not None else TINY_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no prescope-tiny model in {path} (config.json missing)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `prescope train-tiny`: one per TinyConfig field (--hidden-size ...), plus paths."""
    parser.add_argument("--out", type=Path, required=True, help="output folder (model, or prepared data)")
    parser.add_argument("--corpus-dir", type=Path, default=None,
                        help="folder of the corpus files, plain or .xz (default: the copy shipped in the package)")
    parser.add_argument("--data", type=Path, default=None, help="train from this --prepare-only folder")
    parser.add_argument("--prepare-only", action="store_true", help="write tokenizer and token ids, then stop")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens per domain to evaluate")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    parser.add_argument("--valid-fraction", type=float, default=0.03,
                        help="share of each domain's training ids kept for validation / early stopping")
    parser.add_argument("--valid-every", type=int, default=25, help="steps between validation evaluations")
    parser.add_argument("--experts-implementation", default=AUTOCAST_EXPERTS,
                        help="experts backend while training (eager = slow fallback)")
    for field in dataclasses.fields(TinyConfig):
        flag, explained = "--" + field.name.replace("_", "-"), TINY_FIELD_HELP[field.name] + " (default: %(default)s)"
        if field.type in ("bool", bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=field.default,
                                help=explained)
        else:
            kind = {"int": int, "float": float}[str(field.type)]
            parser.add_argument(flag, type=kind, default=field.default, help=explained)


def config_from_args(args: argparse.Namespace) -> TinyConfig:
    return TinyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TinyConfig)})


def run(args: argparse.Namespace) -> int:
    """The whole recipe: prepare (or load prepared data) → train → evaluate against the random twin → save."""
    import torch

    config = config_from_args(args)
    check_output(args.out, folder=True, what="--out")
    check_device(args.device)
    if args.prepare_only:
        record = prepare_data(config, args.corpus_dir, args.out)
        tokens = sum(d["train_tokens"] for d in record["domains"].values())
        print(f"train-tiny: prepared {tokens} training tokens in {args.out}")
        return 0
    if args.data is None:
        args.data = args.out / "data"
        prepare_data(config, args.corpus_dir, args.data)
    tokenizer, stream, heldout, record = load_prepared(args.data)
    prepared = TinyConfig(**record["config"])
    if (prepared.vocab_size, prepared.heldout_fraction, prepared.doc_chars, prepared.stdlib_bytes) != (
            config.vocab_size, config.heldout_fraction, config.doc_chars, config.stdlib_bytes):
        raise TinyConfigError(f"prepared data in {args.data} was made with other tokenizer/corpus settings: {record['config']}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config)
    stream, valid = validation_split(stream, record, args.valid_fraction)
    result = train(model, stream, config, device=device, progress=not args.no_progress, monitor=valid,
                   experts_implementation=args.experts_implementation, keep_best=True,
                   monitor_tokens=args.eval_tokens, monitor_every=args.valid_every)
    empty = pd.DataFrame(columns=["domain", "tokens", "loss", "ppl", "random_loss"])
    # Saved before evaluation too, so a failure past this point still leaves the trained weights.
    save_tiny(model, tokenizer, args.out, make_card(model, config, result, empty, [], record, device, args.valid_every))
    trained = evaluate_domains(model, tokenizer, heldout, config.seq_len, args.eval_tokens)
    twin = build_model(config).to(device)
    random = evaluate_domains(twin, tokenizer, heldout, config.seq_len, args.eval_tokens)
    del twin
    table = trained.assign(random_loss=random["loss"].to_numpy())
    print(table.to_string(index=False))
    continuations = greedy_continuations(model, tokenizer, heldout, ("wikipedia", "stdlib", "c4"))
    for c in continuations:
        print(f"--- {c['domain']}: {c['prompt']!r} -> {c['continuation']!r}")
    card = make_card(model, config, result, table, continuations, record, device, args.valid_every)
    card["training"]["experts_backend"] = args.experts_implementation
    out = save_tiny(model, tokenizer, args.out, card)
    print(f"train-tiny: saved to {out}")
    return 0


def prepare_data(config: TinyConfig, corpus_dir: Path | None, out_dir: Path) -> dict:
    """`corpus.prepare` with this config's corpus and tokenizer settings (corpus_dir None = default)."""
    spec = config.corpus_spec(corpus_dir or corpus.default_corpus_dir())
    return corpus.prepare(spec, config.vocab_size, out_dir, dataclasses.asdict(config))


def make_card(model, config: TinyConfig, result: TrainResult, table: pd.DataFrame, continuations: list[dict],
              record: dict, device: str, valid_every: int) -> dict:
    """The model_card.json record (README.md is rendered from it)."""
    import torch

    hardware = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    defaults = TinyConfig()
    overrides = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                 if getattr(config, f.name) != getattr(defaults, f.name)}
    overrides.pop("time_budget_s", None)  # the reproduction fixes the step count instead
    if result.schedule_steps != defaults.steps:
        overrides["steps"] = result.schedule_steps
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items()) + f" --valid-every {valid_every}"
    command = (f"prescope train-tiny --prepare-only --out .cache/tiny-data{flags} && "
               f"prescope train-tiny --data .cache/tiny-data --out prescope-tiny{flags}")
    return {
        "name": "prescope-tiny",
        "architecture": {"class": type(model).__name__, "model_type": model.config.model_type,
                         "num_layers": config.num_layers, "num_experts": config.num_experts, "top_k": config.top_k,
                         "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                         "num_heads": config.num_heads, "vocab_size": config.vocab_size,
                         "tie_embeddings": config.tie_embeddings, "norm_topk_prob": False},
        "params": count_parameters(model),
        "bytes": None,
        "training": {"steps": result.steps, "steps_run": result.steps_run, "schedule_steps": result.schedule_steps,
                     "valid_every": valid_every, "tokens_seen": result.tokens, "wall_s": round(result.wall_s, 1),
                     "s_per_step": round(result.step_s, 4), "hardware": hardware,
                     "batch": f"{config.batch_size} x {config.seq_len} tokens", "lr": config.lr,
                     "final_train_loss": round(float(np.mean(result.losses[-20:])), 4),
                     "train_tokens_in_corpus": int(sum(d["train_tokens"] for d in record["domains"].values())),
                     "precision": "bf16 autocast, fp32 master weights" if device.startswith("cuda") else "fp32"},
        "config": dataclasses.asdict(config),
        "corpus": record["domains"],
        "heldout": table.to_dict(orient="records"),
        "validation_curve": list(result.monitor),
        "continuations": continuations,
        "python": record["python"],
        "torch": torch.__version__,
        "command": command,
        "argv": " ".join(shlex.quote(portable_path(a) if os.path.isabs(a) else a) for a in sys.argv),
        CARD_ROUTING_KEY: None,
    }
