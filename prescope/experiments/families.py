"""`prescope families`: every MoE family of the installed transformers through the adapter and the engine.

For each family `models.families.discover()` finds, a tiny random instance (CPU, float32) is described,
each layer's router is applied alone where it can be (`adapter.route`, checked against the routing the
experts received), and greedy `generate()` on a left-padded batch of 2 runs stock and through the engine
for each policy cell: the offloaded run must give the stock tokens and logits within float32 tolerance.
A family is supported, refused (the adapter's UnsupportedModelError, quoted), or skipped (`SKIP`, why).
The table goes to `reports/families.md`, the rows to a JSON file beside it; the test suite runs the same
check (tests/experiments/test_families.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prescope.config import EngineConfig
from prescope.files import check_output, source_revision, write_atomic, write_json
from prescope.layout import ModelLayout, UnsupportedModelError
from prescope.policies import LIMITS, parse_policy

if TYPE_CHECKING:  # torch, transformers and the models load where the check runs, so `--help` starts fast
    import torch

    from prescope.models import adapter, families

BATCH, PROMPT, PAD, NEW_TOKENS = 2, 6, 2, 4  # the second row is left-padded by PAD tokens
RTOL, ATOL = 1e-4, 1e-5  # float32: the engine's per-expert kernels sum in another order than the stock ones
MIN_BUDGET = "min"  # one layer's top-k: every miss evicts


@dataclass(frozen=True)
class Cell:
    """One policy at one budget."""

    policy: str  # a policy as parse_policy reads it, e.g. 'prescope[gate=False]'
    budget: str = MIN_BUDGET  # "min" or a share of all experts, e.g. "0.5"

    @property
    def label(self) -> str:
        return self.policy if self.budget == MIN_BUDGET else f"{self.policy}@{self.budget}"


CELLS = (Cell("on_demand_lru"), Cell("prescope[gate=False]"), Cell("cpu_misses"), Cell("belady"))


def prompt(vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [BATCH, PROMPT], the second row left-padded; no id is a special one."""
    import torch

    ids = torch.randint(3, vocab_size, (BATCH, PROMPT), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :PAD], ids[1, :PAD] = 0, 0
    return ids, mask


def generate(model, ids, mask, new_tokens: int = NEW_TOKENS):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def budget(layout: ModelLayout, name: str) -> dict:
    if name == MIN_BUDGET:
        return dict(budget_bytes=layout.top_k * layout.expert_bytes)
    return dict(budget_share=float(name))


def run_cell(stock, layout: ModelLayout, cell: Cell, ids, mask, reference, new_tokens: int = NEW_TOKENS) -> dict:
    """The offloaded run of one cell against the stock `reference`; a limit (`belady`, `ceiling`) replays the stock
    routing, whose future it needs."""
    import torch

    from prescope.engine.engine import Engine

    model = copy.deepcopy(stock)
    spec = parse_policy(cell.policy)
    config = EngineConfig(policy=spec.name, device="cpu", **spec.engine_options, **budget(layout, cell.budget))
    with Engine(model, config, policy=spec.build()) as engine:
        if spec.name in LIMITS:
            engine.set_replay(_stock_routing(stock, ids, mask, new_tokens))
        out = generate(model, ids, mask, new_tokens)
        loads = engine.cache.stats.loads
    diff = max(float((got - want).abs().max()) for got, want in zip(out.logits, reference.logits, strict=True))
    close = all(torch.allclose(got, want, rtol=RTOL, atol=ATOL) for got, want in zip(out.logits, reference.logits, strict=True))
    return {"tokens_equal": bool(torch.equal(out.sequences, reference.sequences)), "logits_close": bool(close),
            "max_logit_diff": diff, "loads": int(loads)}


def _stock_routing(stock, ids, mask, new_tokens):
    from prescope.routing.replay import record_replay

    model = copy.deepcopy(stock)
    return record_replay(model, lambda: generate(model, ids, mask, new_tokens))


def check_routes(model) -> str:
    """Each layer's router applied alone to the hidden states its layer saw must give the routing its experts
    received; returns "all layers", or the adapter's reason for the layers whose routers cannot be applied alone."""
    import torch

    from prescope.models import adapter

    seen = {}
    ids, mask = prompt(model.config.get_text_config().vocab_size)
    with adapter.observe_routing(model, lambda o, hidden, logits, weights, index: seen.setdefault(
            o, (hidden.clone(), weights.clone(), index.clone()))), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    alone, layers = [], adapter.moe_layers(model)
    for lay in layers:
        hidden, weights, index = seen[lay.ordinal]
        try:
            out = adapter.route(lay, hidden)
        except UnsupportedModelError as exc:
            alone.append(str(exc))
            continue
        same = torch.equal(out.indices.sort(-1).values, index.long().sort(-1).values)
        if not same or not torch.allclose(out.weights.sort(-1).values.float(), weights.sort(-1).values.float(),
                                          rtol=RTOL, atol=ATOL):
            raise AssertionError(f"{type(model).__name__} layer {lay.layer}: route() differs from the routing "
                                 "its experts received")
    return "all layers" if not alone else f"not on {len(alone)} of {len(layers)} layers: {alone[0]}"


def check_family(family: families.Family, cells=CELLS, new_tokens: int = NEW_TOKENS) -> dict:
    """One row of the table: status, reason, layout, the routers check and every cell's equivalence."""
    from prescope.models import adapter, families

    row = {"family": family.model_type, "config": family.config_class.__name__, "model_class": "",
           "status": "skipped", "reason": family.skip, "cells": {}}
    if family.skip:
        return row
    began = time.perf_counter()
    stock = families.tiny_model(family)
    row["model_class"] = type(stock).__name__
    try:
        layout = adapter.describe(stock)
    except UnsupportedModelError as exc:
        return row | {"status": "refused", "reason": str(exc)}
    layers = adapter.moe_layers(stock)
    row |= {"status": "supported", "reason": "", "experts": layout.num_experts, "top_k": layout.top_k,
            "moe_layers": layout.num_moe_layers, "shared_expert_bytes": layout.shared_expert_bytes,
            "seam": seam(layers), "route": check_routes(stock)}
    ids, mask = prompt(stock.config.get_text_config().vocab_size)
    reference = generate(stock, ids, mask, new_tokens)
    row["cells"] = {cell.label: run_cell(stock, layout, cell, ids, mask, reference, new_tokens) for cell in cells}
    row["seconds"] = round(time.perf_counter() - began, 2)
    return row


def seam(layers: list[adapter.MoELayer]) -> str:
    """How the engine reaches this family's experts (see adapter.install_dispatch)."""
    kinds = {"backend registry" if lay.seam == "backend" else
             "block call, input-weighted" if lay.input_weighted else "block call" for lay in layers}
    return ", ".join(sorted(kinds))


def passed(cell: dict) -> bool:
    return cell["tokens_equal"] and cell["logits_close"]


# ---- the report ---------------------------------------------------------------------------------------------
def table(rows: list[dict], cells=CELLS) -> str:
    head = ["family", "model class", "status", "E/K/MoE layers", "seam", "router alone"] + [c.label for c in cells]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] == "supported":
            shape = f"{r['experts']}/{r['top_k']}/{r['moe_layers']}"
            rest = [shape, r["seam"], _short(r["route"], 60)] + [_cell_text(r["cells"][c.label]) for c in cells]
        else:
            rest = ["", "", _short(r["reason"], 60)] + ["—"] * len(cells)
        lines.append("| " + " | ".join([r["family"], r["model_class"] or r["config"], r["status"], *rest]) + " |")
    return "\n".join(lines)


def _cell_text(cell: dict) -> str:
    verdict = "equal" if passed(cell) else "tokens differ" if not cell["tokens_equal"] else "logits differ"
    return f"{verdict} ({cell['max_logit_diff']:.0e})"


def _short(text: str, width: int = 90) -> str:
    text = text.replace("|", "/")
    return text if len(text) <= width else text[: width - 1] + "…"


def report(rows: list[dict], seconds: float, cells=CELLS, new_tokens: int = NEW_TOKENS) -> str:
    import torch
    import transformers

    rev, dirty = source_revision()
    supported = [r for r in rows if r["status"] == "supported"]
    ok = [r for r in supported if all(passed(c) for c in r["cells"].values())]
    out = [
        "# Every MoE family of transformers through prescope",
        "",
        f"Measured on the CPU, float32, with transformers {transformers.__version__} and torch {torch.__version__}, "
        f"at git revision {rev}{' (uncommitted: ' + ', '.join(dirty) + ')' if dirty else ''}; "
        f"`prescope families` took {seconds:.0f} s.",
        "",
        f"Families are discovered from transformers' config classes (`prescope.models.families`): {len(rows)} "
        f"found, {len(supported)} supported ({len(ok)} equal to stock in every cell), "
        f"{sum(r['status'] == 'refused' for r in rows)} refused, {sum(r['status'] == 'skipped' for r in rows)} "
        "skipped. Each is a tiny random instance (hidden 32, 3 layers, 6 experts, top-2); greedy `generate()` "
        f"of {new_tokens} tokens on a batch of {BATCH} (one row left-padded) runs stock and through the engine at "
        "the smallest budget (one layer's top-k, so every miss evicts). A cell is *equal* when the tokens are "
        f"identical and every logit is within rtol {RTOL}, atol {ATOL} (in brackets: the largest logit "
        "difference). `belady` (named `oracle` in runs before the rename) replays the stock run's recorded routing. *Router alone*: each layer's router "
        "applied to the hidden states its layer saw (`adapter.route`) gives the routing its experts received.",
        "",
        table(rows, cells),
        "",
        "## Routers that cannot be applied alone (the engine does not need them; predictors that apply them do)",
        "",
        *[f"- **{r['family']}**: {r['route']}" for r in rows if r.get("route", "all layers") != "all layers"],
        "",
        "## Refused (the adapter's message)",
        "",
        *[f"- **{r['family']}** (`{r['model_class']}`): {r['reason']}" for r in rows if r["status"] == "refused"],
        "",
        "## Not built (`prescope.models.families.SKIP`)",
        "",
        *[f"- **{r['family']}** (`{r['config']}`): {r['reason']}" for r in rows if r["status"] == "skipped"],
        "",
    ]
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--families", nargs="*", default=None, help="model types to check (default: every one found)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                        help="tokens each greedy generate() adds, stock and offloaded")
    parser.add_argument("--out", default="reports/families.md", help="the Markdown table; the rows go beside it "
                                                                      "as .json")


def run(args: argparse.Namespace) -> int:
    import torch

    from prescope.models import families

    check_output(args.out, what="--out")
    torch.set_num_threads(1)  # tiny tensors: more intra-op threads only spin against the CPU experts' workers
    found = families.discover()
    if args.families:
        unknown = sorted(set(args.families) - {f.model_type for f in found})
        if unknown:
            raise ValueError(f"--families {unknown}: not MoE families of this transformers; "
                             f"choose from {sorted(f.model_type for f in found)}")
        found = [f for f in found if f.model_type in args.families]
    began, rows = time.perf_counter(), []
    for family in found:
        rows.append(check_family(family, new_tokens=args.new_tokens))
        r = rows[-1]
        cells = " ".join(f"{k}:{'ok' if passed(c) else 'FAIL'}" for k, c in r["cells"].items())
        print(f"{r['family']:28s} {r['status']:9s} {cells or _short(r['reason'], 100)}", flush=True)
    seconds = time.perf_counter() - began
    out = Path(args.out)
    write_atomic(out, report(rows, seconds, new_tokens=args.new_tokens))
    write_json(out.with_suffix(".json"), {"source": "measured", "device": "cpu", "rows": rows})
    failed = [r["family"] for r in rows if r["status"] == "supported" and not all(passed(c) for c in r["cells"].values())]
    print(json.dumps({"families": len(rows), "supported": sum(r["status"] == "supported" for r in rows),
                      "failed": failed, "seconds": round(seconds, 1), "out": str(out)}))
    return 1 if failed else 0
