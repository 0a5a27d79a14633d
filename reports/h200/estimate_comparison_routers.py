"""Estimate the device time of each `comparison-routers.sh` call from committed H200 measurements; prints a table.

Run from the repository root: `python reports/h200/estimate_comparison_routers.py`. An estimate, not a result: the
routing models route differently from the references (a real trace, random twins, prescope-tiny), so read it as
"which calls fit 9 minutes", not as throughput.

- A cell's own time: 2 prefills (warm-up and measured run, each `ttft_s`) + (warmup_tokens − 1 + output_len − 1)
  decode steps of `decode_ms_median`; a stock row the same for each experts implementation it runs.
- A whole call takes CALL_FACTOR × its cells' own time: reports/h200/engine/bench.json's call took 461 s (its
  README) for cells whose own time is 235 s by the same formula (twin builds, pinning, CUDA graph captures, imports).
- Step times: the subject's reference file at that batch and budget, the policy's own where measured, else the mean
  of the policies measured there; a budget of 0.5 without a measurement takes the 0.25 one (an upper bound: a
  larger cache moves less); times scale with MoE layers (link-bound steps do, per layer).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from prescope.policies import current_name  # noqa: E402

H200 = ROOT / "reports" / "h200"
CALL_FACTOR = 461 / 235
WARMUP = 4
STOCK_IMPLS = 2  # grouped_mm, batched_mm (the script leaves transformers' eager loop out)
POLICIES = ("on_demand_lru", "prescope", "ceiling", "belady", "hybrid", "cpu_misses", "lookahead_prefetch",
            "activation_matrix", "prescope[gate=False]")
# subject -> (reference files, the references' MoE layers, the subject's MoE layers)
REFERENCES = {
    "mixtral": (["comparison/mixtral4-calibrated-profile.json", "comparison/mixtral4-7c7d358.json",
                 "comparison/mixtral4-b16-64-a616ad2.json"], 4, 16),
    "qwen3": (["real-traces/qwen3-gate/bench.json", "real-traces/qwen3-nogate/bench.json",
               "engine/b64/bench.json"], 48, 48),
    "deepseek": (["comparison/olmoe-tiny-routing-7b9d049.json", "engine/bench.json", "engine/b64/bench.json"], 16, 26),
}


# the calls of reports/h200/comparison-routers.md: the script's defaults (batches 1, 4, 16 at 25 %), then the rest
PLANS = [{"subject": s, "batches": (1, 4, 16)} for s in ("mixtral", "qwen3", "deepseek")] + [
    {"subject": s, "batches": (64,)} for s in ("mixtral", "qwen3", "deepseek")] + [
    {"subject": s, "batches": (1, 4, 16), "budgets": (0.5,)} for s in ("mixtral", "qwen3", "deepseek")] + [
    {"subject": s, "batches": (64,), "budgets": (0.5,)} for s in ("mixtral", "qwen3", "deepseek")] + [
    {"subject": s, "batches": (1, 4), "repeats": 3} for s in ("qwen3", "deepseek")]


def cells(files: list[str]) -> list[dict]:
    """Every cell of the reference files, policies named as today (`step` picks the subject's model)."""
    rows = []
    for name in files:
        data = json.loads((H200 / name).read_text())
        rows += [{**c, "policy": current_name(c["policy"]), "file": name} for c in data["cells"]]
    return rows


def step(rows: list[dict], model_key: str, policy: str, budget: float, batch: int) -> tuple[float, float] | None:
    """(decode s per step, ttft s) of `policy` at (budget, batch), else the mean of those measured there."""
    at = [r for r in rows if model_key in r["model"] and r["batch"] == batch and r["budget"] == budget
          and r.get("decode_ms_median")]
    own = [r for r in at if r["policy"] == policy]
    pick = own or [r for r in at if r["policy"] not in ("stock", "stock-eager", "resident", "accelerate")]
    if not pick:
        return None
    return statistics.fmean(r["decode_ms_median"] for r in pick) / 1e3, statistics.fmean(r["ttft_s"] for r in pick)


def estimate(subject: str, budgets=(0.25,), batches=(1, 4, 16, 64), output_len: int = 16, repeats: int = 1) -> dict:
    files, ref_layers, layers = REFERENCES[subject]
    rows = cells(files)
    key = {"mixtral": "mixtral", "qwen3": "qwen3", "deepseek": "olmoe"}[subject]
    scale, steps = layers / ref_layers, WARMUP - 1 + output_len - 1
    by_policy, stock = {}, 0.0
    for batch in batches:
        for policy in ("stock", "resident"):
            found = step(rows, key, policy, 1.0, batch) or step(rows, key, "on_demand_lru", 0.25, batch)
            s, ttft = found
            t = scale * (2 * ttft + steps * s)
            stock += t * (STOCK_IMPLS if policy == "stock" else repeats)
        for budget in budgets:
            for policy in POLICIES:
                found = step(rows, key, policy, budget, batch) or step(rows, key, policy, 0.25, batch)
                s, ttft = found
                by_policy[policy] = by_policy.get(policy, 0.0) + repeats * scale * (2 * ttft + steps * s)
    own = stock + sum(by_policy.values())
    return {"subject": subject, "budgets": list(budgets), "batches": list(batches), "output_len": output_len,
            "repeats": repeats, "cells_s": round(own), "call_s": round(CALL_FACTOR * own),
            "per_policy_call_s": {p: round(CALL_FACTOR * t) for p, t in by_policy.items()},
            "stock_and_resident_call_s": round(CALL_FACTOR * stock)}


if __name__ == "__main__":
    for plan in PLANS:
        print(json.dumps(estimate(**plan)))
