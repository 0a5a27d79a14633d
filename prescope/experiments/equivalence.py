"""`prescope check-equivalence`: the offloaded engine against the stock model on real hardware.

For each model, greedy `generate()` runs stock (every weight on the device, transformers' own experts)
and through the engine for every policy at the smallest feasible, a middle and the full budget. It
reports whether the generated tokens are identical, the largest logit difference, and whether the
runs of one policy agree with each other across budgets: the same tokens and logits within the dtype's
tolerance (1e-5 in float32, 2e-2 in bf16, relative and absolute: the grouped expert kernel groups a layer's experts differently when the slots run
short, which changes the order of floating-point sums, not the result beyond rounding). In bf16 the stock
kernels and the engine's round differently: logits then agree within bf16 tolerance and random-weight
twins, whose logits are nearly flat, may break greedy ties differently; the report says which.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from prescope.config import EngineConfig
from prescope.files import check_output, git_revision, write_json
from prescope.policies import POLICIES
from prescope.timeline import host_device

if TYPE_CHECKING:  # torch and the models load where the check runs, so `--help` starts fast
    import torch


def _generate(model, ids, new_tokens):
    import torch

    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def is_twin_spec(spec: str) -> bool:
    """Whether `spec` names a model prescope builds: prescope-tiny, a twin `name[:layers]` or `name-tiny[:layers]`."""
    from prescope.models.twins import list_twins

    name = spec.partition(":")[0]
    return name == "prescope-tiny" or name.removesuffix("-tiny") in list_twins()


def load_subject(spec: str, device: torch.device, seed: int = 0):
    """The stock model `spec` names: one prescope builds (`subjects.build_subject`), a checkpoint folder, or a
    hub id already in the local Hugging Face cache (never downloaded: `local_files_only`). On the CPU in
    float32, on a GPU in the checkpoint's own dtype."""
    import torch

    from prescope.experiments.subjects import build_subject
    from prescope.models.adapter import load_model
    from prescope.models.twins import list_twins

    if is_twin_spec(spec):
        return build_subject(spec, device, seed)
    dtype = torch.float32 if device.type == "cpu" else None
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{spec}: a folder without config.json is no model checkpoint")
        return load_model(str(path), dtype=dtype, device=str(device))
    if spec.count("/") == 1 and not path.exists():
        try:
            return load_model(spec, dtype=dtype, device=str(device), local_files_only=True)
        except OSError:
            pass
    raise ValueError(f"--models {spec}: not a model prescope builds (prescope-tiny, NAME[:LAYERS] or NAME-tiny[:LAYERS] "
                     f"with NAME in {list_twins()}), not a checkpoint folder, and not a hub id in the local Hugging "
                     "Face cache (nothing is downloaded)")


def check_model(spec: str, device: torch.device, batch: int = 2, prompt_len: int = 16, new_tokens: int = 12,
                seed: int = 0) -> list[dict]:
    import torch

    from prescope.engine.engine import Engine
    from prescope.models import adapter

    stock = load_subject(spec, device, seed)
    layout = adapter.describe(stock)
    ids = torch.randint(1, stock.config.vocab_size, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    ref = _generate(stock, ids, new_tokens)
    host_copy = copy.deepcopy(stock).to("cpu")
    del stock
    budgets = {"min": dict(budget_bytes=layout.top_k * layout.expert_bytes), "half": dict(budget_share=0.5),
               "all": dict(budget_share=1.0)}
    rows = []
    for policy in sorted(POLICIES):
        first = None
        for name, budget in budgets.items():
            model = copy.deepcopy(host_copy)
            with Engine(model, EngineConfig(policy=policy, device=str(device), **budget)) as engine:
                out = _generate(model, ids, new_tokens)
            logits = torch.stack(out.logits)
            if first is None:
                first, first_tokens = logits, out.sequences
            tolerance = 1e-5 if logits.dtype == torch.float32 else 2e-2
            rows.append({"model": spec, "dtype": layout.dtype, "policy": policy, "budget": name,
                         "slots": engine.num_slots, "tokens_equal_stock": bool(torch.equal(out.sequences, ref.sequences)),
                         "token_match_share": float((out.sequences == ref.sequences).float().mean()),
                         "max_logit_diff_vs_stock": float((logits.float() - torch.stack(ref.logits).float()).abs().max()),
                         "logit_scale": float(torch.stack(ref.logits).float().abs().max()),
                         "max_logit_diff_across_budgets": float((logits.float() - first.float()).abs().max()),
                         "agree_across_budgets": bool(torch.equal(out.sequences, first_tokens) and torch.allclose(
                             logits.float(), first.float(), rtol=tolerance, atol=tolerance)),
                         "loads": engine.cache.stats.loads})
            del model, engine
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["prescope-tiny", "olmoe-1b-7b:4", "qwen3-30b-a3b:4"],
                        help="models to check: prescope-tiny, shape twins (each optionally NAME:LAYERS), checkpoint "
                             "folders, or hub ids already in the local Hugging Face cache (default: %(default)s)")
    parser.add_argument("--device", default="cuda",
                        help="torch device the engine and the stock model run on (cuda, cuda:N or cpu; "
                             "default: %(default)s)")
    parser.add_argument("--out", default="reports/equivalence.json",
                        help="JSON file for every (model, policy, budget) row (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    import torch

    from prescope.experiments.bench import require_device

    require_device(args.device)
    check_output(args.out, what="--out")
    device = torch.device(args.device)
    rows = []
    for spec in args.models:
        checked = check_model(spec, device)
        rows += checked
        for r in checked:
            print(r, flush=True)
    result = {"source": "measured", "device": host_device(device),
              "git_revision": os.environ.get("PRESCOPE_GIT_REV") or git_revision(), "torch": torch.__version__,
              "rows": rows}
    write_json(args.out, result)
    # a GPU-only policy computes every expert on the device whatever the budget: its runs must agree
    ok = all(r["agree_across_budgets"] for r in rows if r["policy"] == "on_demand_lru")
    print(json.dumps({"equivalence": args.out, "rows": len(rows), "engine_runs_agree": ok,
                      "tokens_equal_stock": sum(r["tokens_equal_stock"] for r in rows)}))
    return 0 if ok else 1
