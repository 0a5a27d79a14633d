"""Recording routing traces from a real `generate()`, and the `prescope trace` command.

`record_trace` runs greedy generation with the adapter's routing observer on (`observe_routing`) and
turns what each MoE layer's router chose into a `Trace` (see `trace.py` for the fields and the file
format): prompts go in left-padded batches, pad tokens and tokens fed after a row's EOS are left out, and
each token is tagged with its prompt, batch row, position, forward call and phase.

`prescope trace` records a model on held-out corpus prompts (`heldout_prompts`: the split the model's
card says it was trained with), saves the trace and prints its routing summary (`routing_stats`).

Letters: T tokens, L MoE layers, E experts, K top-k, H hidden, B batch rows, P prompt width (padded),
G generated tokens, S tokens per row in one forward call.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from prescope.config import check_device, check_types
from prescope.routing.trace import Trace, TraceError, save_trace

DTYPES = ("float32", "bfloat16", "float16", "float64")  # the torch dtypes a model may be recorded in

if TYPE_CHECKING:  # torch and the adapter load where a model runs, so `prescope trace --help` starts fast
    import torch


def _prompt_ids(tokenizer, prompt, i: int) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise TraceError(f"prompt {i} is text but no tokenizer was given")
        ids = list(tokenizer(prompt)["input_ids"])
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise TraceError(f"prompt {i} is empty")
    return ids


def _pad_and_eos(model, tokenizer) -> tuple[int, set[int]]:
    """The id that fills left padding and the ids that end a sequence, as generate() will use them."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    eos_ids = set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
    candidates = (getattr(tokenizer, "pad_token_id", None), getattr(gen, "pad_token_id", None))
    pad = next((p for p in candidates if p is not None), min(eos_ids, default=0))
    return int(pad), eos_ids


def _record_batch(model, batch: list[list[int]], max_new_tokens: int, pad_id: int, eos_ids: set[int],
                  keep_hidden: bool, keep_logits: bool) -> tuple[list[dict], torch.Tensor]:
    """Generate greedily for one left-padded batch; return per-step records of its real tokens and the output."""
    import torch

    from prescope.models.adapter import observe_routing

    B, P = len(batch), max(len(ids) for ids in batch)
    input_ids = torch.full((B, P), pad_id, dtype=torch.long)  # [B, P]
    mask = torch.zeros((B, P), dtype=torch.long)  # [B, P]
    for r, ids in enumerate(batch):
        input_ids[r, P - len(ids):] = torch.tensor(ids)
        mask[r, P - len(ids):] = 1
    per_layer: dict[int, list[tuple]] = {}

    def callback(ordinal, hidden, logits, weights, indices):
        if keep_logits and logits is None:
            raise TraceError(f"keep_logits=True but MoE layer {ordinal}'s router returns no logits")
        w, order = weights.float().sort(dim=-1, descending=True, stable=True)  # [N, K]
        per_layer.setdefault(ordinal, []).append((
            indices.gather(-1, order).cpu(), w.cpu(),  # [N, K]
            hidden.detach().to("cpu", torch.float16) if keep_hidden else None,  # [N, H]
            logits.detach().float().cpu() if keep_logits else None))  # [N, E]

    device = next(model.parameters()).device
    with observe_routing(model, callback), torch.no_grad():
        seqs = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                              max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad_id).cpu()  # [B, P + G]
    gen = seqs[:, P:]  # [B, G]
    n_calls = {len(v) for v in per_layer.values()}
    if n_calls != {gen.shape[1]}:
        raise TraceError(f"generate() made {sorted(n_calls)} forward calls per MoE layer for {gen.shape[1]} new "
                         "tokens; only plain greedy decoding with a KV cache is supported")
    ended = torch.zeros((B, gen.shape[1] + 1), dtype=torch.bool)  # [B, G+1]: row ended before step s
    for e in eos_ids:
        ended[:, 1:] |= (gen == e).cumsum(dim=1) > 0
    lengths = torch.tensor([len(ids) for ids in batch])  # [B]
    records = []
    for s in range(gen.shape[1]):
        S = P if s == 0 else 1
        # Prefill: the attention mask marks real tokens. Decode: the token fed at step s is generated token s,
        # real while no EOS came before or with it (a batch-1 generate() would have stopped).
        real = mask.bool() if s == 0 else ~ended[:, s:s + 1]  # [B, S]
        rows, cols = np.nonzero(real.numpy())
        fed = input_ids if s == 0 else gen[:, s - 1:s]  # [B, S]
        rec = {"row": rows, "step": s, "token_id": fed.numpy()[rows, cols],
               "position": cols - (P - lengths.numpy()[rows]) if s == 0 else lengths.numpy()[rows] + s - 1}
        for i, name in enumerate(("experts", "weights", "hidden", "logits")):
            if per_layer[0][s][i] is None:
                continue
            arr = torch.stack([per_layer[o][s][i] for o in sorted(per_layer)], 1)  # [B*S, L, ...]
            if arr.shape[0] != B * S:
                raise TraceError(f"forward call {s} routed {arr.shape[0]} tokens, expected {B}x{S}")
            rec[name] = arr.reshape(B, S, *arr.shape[1:]).numpy()[rows, cols]
        records.append(rec)
    return records, seqs


def record_trace(model, tokenizer, prompts: Sequence, *, max_new_tokens: int, batch_size: int = 1,
                 keep_hidden: bool = False, keep_logits: bool = False, domains: Sequence[str] | None = None,
                 progress: bool = True) -> Trace:
    """Run greedy `model.generate()` on `prompts` (text, or lists of token ids) and record its routing.

    Prompts go in batches of `batch_size`, left-padded; pad tokens never enter the trace. Each row
    contributes its prompt tokens (step 0) and every generated token that was fed back (steps 1..), i.e.
    all new tokens but the last, which no forward call routes; tokens fed after a row's EOS are left out.
    meta["generated"] holds each prompt's new token ids, up to and including its EOS.
    """
    from tqdm.auto import tqdm

    from prescope.models.adapter import describe

    if max_new_tokens < 1 or batch_size < 1:
        raise TraceError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    if domains is not None and len(domains) != len(prompts):
        raise TraceError(f"got {len(domains)} domains for {len(prompts)} prompts")
    layout = describe(model)
    ids = [_prompt_ids(tokenizer, p, i) for i, p in enumerate(prompts)]
    if not ids:
        raise TraceError("record_trace needs at least one prompt")
    pad_id, eos_ids = _pad_and_eos(model, tokenizer)
    frames, arrays, generated = [], {k: [] for k in ("experts", "weights", "hidden", "logits")}, []
    starts = range(0, len(ids), batch_size)
    for call, b0 in enumerate(tqdm(starts, desc="trace", unit="batch", disable=not progress)):
        records, seqs = _record_batch(model, ids[b0:b0 + batch_size], max_new_tokens, pad_id, eos_ids,
                                      keep_hidden, keep_logits)
        width = max(len(x) for x in ids[b0:b0 + batch_size])
        for r in range(seqs.shape[0]):
            new = seqs[r, width:].tolist()
            stop = next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))
            generated.append(new[:stop])
        for rec in records:
            prompt = b0 + rec["row"]
            frames.append(pd.DataFrame({
                "prompt": prompt, "row": rec["row"], "position": rec["position"], "step": rec["step"], "call": call,
                "phase": "prefill" if rec["step"] == 0 else "decode",
                "domain": [domains[p] if domains is not None else "" for p in prompt], "token_id": rec["token_id"]}))
            for k in arrays:
                if k in rec:
                    arrays[k].append(rec[k])
    meta = {"source": "record_trace", "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "pad_token_id": pad_id, "eos_token_ids": sorted(eos_ids), "generated": generated}
    return Trace(layout, pd.concat(frames, ignore_index=True), np.concatenate(arrays["experts"]),
                 np.concatenate(arrays["weights"]),
                 np.concatenate(arrays["hidden"]) if keep_hidden else None,
                 np.concatenate(arrays["logits"]) if keep_logits else None, meta)


# ---------------------------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class TraceConfig:
    """`prescope trace`: record a routing trace of a model on held-out corpus prompts and summarise it.

    model: local model directory ("" = the committed prescope-tiny); name: report stem ("" = the model
    folder's name); prompts_per_domain prompts of exactly prompt_tokens tokens from every corpus domain's
    held-out documents; corpus_dir "" = the corpus shipped with the package (prescope/assets/data/corpus);
    out_dir: where the files go.
    """

    model: str = ""
    name: str = ""
    prompts_per_domain: int = 4
    prompt_tokens: int = 128
    max_new_tokens: int = 32
    batch_size: int = 4
    keep_hidden: bool = False
    keep_logits: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    corpus_dir: str = ""
    out_dir: str = "reports"

    def __post_init__(self) -> None:
        check_types(self, TraceError)
        for name in ("prompts_per_domain", "prompt_tokens", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise TraceError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise TraceError(f"dtype {self.dtype!r} is not a torch floating-point dtype; use one of {DTYPES}")
        # the name becomes file names inside out_dir: a path in it would write elsewhere
        if self.name and (Path(self.name).name != self.name or self.name in (".", "..") or "\\" in self.name):
            raise TraceError(f"name {self.name!r} must be a plain file name (no folders); the files go to out_dir")


def heldout_prompts(tokenizer, spec, prompts_per_domain: int, prompt_tokens: int) -> tuple[list[list[int]], list[str]]:
    """The first `prompts_per_domain` held-out documents of each domain that reach `prompt_tokens`, cut there."""
    from prescope.models import corpus

    prompts, domains = [], []
    for domain, split in corpus.load_splits(spec).items():
        found = [ids[:prompt_tokens] for ids in (tokenizer(doc)["input_ids"] for doc in split.heldout)
                 if len(ids) >= prompt_tokens][:prompts_per_domain]
        prompts += found
        domains += [domain] * len(found)
    if not prompts:
        raise TraceError(f"no held-out document reaches {prompt_tokens} tokens")
    return prompts, domains


TRACE_HELP = {  # what each TraceConfig field does, for `prescope trace --help`
    "model": "local model directory ('' = the committed prescope-tiny)",
    "name": "stem of the files written ('' = the model folder's name)",
    "prompts_per_domain": "held-out prompts taken from each corpus domain",
    "prompt_tokens": "tokens of each prompt (held-out documents cut to this length)",
    "max_new_tokens": "tokens generated greedily per prompt",
    "batch_size": "prompts generated together",
    "keep_hidden": "also store the hidden state entering each MoE layer (LLaPor trains on them)",
    "keep_logits": "also store each router's logits over all experts",
    "dtype": "torch dtype the model runs in",
    "device": "torch device the model runs on",
    "corpus_dir": "folder of the corpus files, plain or .xz ('' = the copy shipped in prescope/assets/data/corpus)",
    "out_dir": "folder for NAME.trace.parquet and NAME.routing.csv",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per TraceConfig field, spelled --max-new-tokens or --max_new_tokens."""
    for f in TraceConfig.__dataclass_fields__.values():
        flags = sorted({"--" + f.name.replace("_", "-"), "--" + f.name})
        if isinstance(f.default, bool):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=TRACE_HELP[f.name] + " (default: %(default)s)")
        else:
            parser.add_argument(*flags, dest=f.name, type=type(f.default), default=f.default,
                                help=TRACE_HELP[f.name] + " (default: %(default)r)")


def run(args: argparse.Namespace) -> int:
    import time

    import torch
    from transformers import AutoTokenizer

    from prescope.files import (
        check_output,
        git_revision,
        portable_path,
        portable_values,
        read_json,
        write_with_sidecar,
    )
    from prescope.models import corpus, tiny
    from prescope.models.adapter import load_model
    from prescope.routing import stats as routing_stats

    config = TraceConfig(**{name: getattr(args, name) for name in TraceConfig.__dataclass_fields__})
    check_device(config.device)
    check_output(config.out_dir, folder=True, what="--out-dir")
    model_dir = Path(config.model) if config.model else tiny.TINY_DIR
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model in {model_dir} (config.json missing); pass --model DIR")
    card_path = model_dir / "model_card.json"
    card = read_json(card_path, "model card").get("config", {}) if card_path.is_file() else {}
    # Held-out prompts must come from the split the model was trained with, which its card records.
    spec = corpus.card_spec(card, config.corpus_dir)
    start = time.perf_counter()
    model = load_model(str(model_dir), dtype=getattr(torch, config.dtype), device=config.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts, domains = heldout_prompts(tokenizer, spec, config.prompts_per_domain, config.prompt_tokens)
    trace = record_trace(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                         batch_size=config.batch_size, keep_hidden=config.keep_hidden,
                         keep_logits=config.keep_logits, domains=domains)
    name = config.name or model_dir.name
    trace.meta.update(config=portable_values(vars(config)) | {"model": portable_path(model_dir)}, git_revision=git_revision(),
                      corpus={"heldout_fraction": spec.heldout_fraction, "doc_chars": spec.doc_chars,
                              "stdlib_bytes": spec.stdlib_bytes})
    out = Path(config.out_dir)
    trace_path = save_trace(trace, out / f"{name}.trace.parquet")
    summary = routing_stats.routing_summary(trace)
    csv_path = write_with_sidecar(out / f"{name}.routing.csv", summary.to_csv(index=False))
    print(summary.round(3).to_string(index=False))
    phases = trace.tokens["phase"].value_counts()
    reuse = routing_stats.reuse_by_lag(trace, lags=(1,))["reuse"].iloc[0]
    print(json.dumps({"command": "trace", "config": trace.meta["config"], "trace": str(trace_path),
                      "summary": str(csv_path), "tokens": trace.num_tokens,
                      "prefill_tokens": int(phases.get("prefill", 0)), "decode_tokens": int(phases.get("decode", 0)),
                      "reuse_lag1_decode": round(float(reuse), 4),
                      "reuse_random": round(routing_stats.random_reuse(trace), 4),
                      "entropy_norm_mean": round(float(summary["entropy_norm"].mean()), 4),
                      "nmi_next_mean": round(float(summary["nmi_next"].mean()), 4),
                      "seconds": round(time.perf_counter() - start, 2)}))
    return 0
