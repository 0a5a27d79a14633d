"""The tables and the README of a `prescope simulate-compare` run: prescope's ratios per profile, budget and batch
(the headline), the fastest policy per cell, and reports/simulated/README.md (what was simulated, from what, with
which command; every figure SIMULATED, published profiles marked as estimates)."""

from __future__ import annotations

import math

import pandas as pd

from prescope.experiments.benchrows import RESIDENT
from prescope.experiments.fidelity import TOLERANCE


def main_ratios(table: pd.DataFrame, policy: str = "prescope") -> pd.DataFrame:
    """`policy`'s ratios per profile, budget and batch: the headline of the comparison."""
    rows = table[table["policy"] == policy]
    return rows[["profile", "budget", "batch", "decode_ms", "tok_s", "vs_on_demand_lru", "vs_ceiling",
                 "vs_resident", "regime"]].reset_index(drop=True)


def best_policies(table: pd.DataFrame) -> pd.DataFrame:
    """The fastest offloaded policy per profile, budget and batch, and its ratio to `on_demand_lru`."""
    offloaded = table[table["policy"] != RESIDENT]
    best = offloaded.loc[offloaded.groupby(["profile", "budget", "batch"])["tok_s"].idxmax()]
    columns = ["profile", "budget", "batch", "policy", "tok_s", "vs_on_demand_lru", "vs_ceiling"]
    return best[columns].reset_index(drop=True)


def _md(frame: pd.DataFrame) -> str:
    """A markdown table (numbers to 3 significant digits) without the optional `tabulate` dependency."""
    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.3g}"
        return str(v)
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    return "\n".join([head, rule] + ["| " + " | ".join(cell(v) for v in row) + " |"
                                     for row in frame.itertuples(index=False)])


def render_readme(table: pd.DataFrame, meta: dict) -> str:
    """reports/simulated/README.md: what was simulated, from what, with which command, and the main ratios."""
    cfg, tr, lay = meta["config"], meta["trace"], meta["layout"]
    provenance = "\n".join(
        f"| `{p['name']}` (`{p['arg']}`) | {p['source']}"
        f"{' — an ESTIMATE, not a measurement' if p['source'] == 'published' else ''} | {p['peak_gbps']:.1f} | "
        f"{p['expert_load_ms']:.2f} / {p['expert_gpu_ms']:.3f} / {p['expert_cpu_ms']:.2f} | "
        f"{p['host_overhead_per_layer_ms']:.2f} / {p['host_per_transfer_ms']:.2f} | "
        f"{p['predict_overhead_ms']:.3f} / {p['plan_overhead_ms']:.3f} |" for p in meta["profiles"])
    flags = {"twin": cfg["twin"] or "''", "profiles": " ".join(cfg["profiles"]),
             "policies": " ".join(cfg["policies"]), "budgets": " ".join(map(str, cfg["budgets"])),
             "batch-sizes": " ".join(map(str, cfg["batch_sizes"])), "prompts": cfg["prompts"],
             "max-steps": cfg["max_steps"], "predictor": cfg["predictor"] or "''", "routers": cfg["routers"],
             "measured": cfg["measured"] or "''", "host-of": cfg["host_of"] or "''", "out": cfg["out"]}
    command = "python -m prescope.cli simulate-compare --trace " + cfg["trace"] + "".join(
        f" \\\n    --{k} {v}" for k, v in flags.items() if v is not None)
    uncommitted = (f"; uncommitted changes to {', '.join(f'`{f}`' for f in meta['uncommitted'])}"
                   if meta.get("uncommitted") else "")
    steps = "" if not cfg["max_steps"] else f", at most {cfg['max_steps']} forward calls per cell"
    throughput = table.pivot_table(index=["profile", "budget", "batch"], columns="policy", values="tok_s",
                                   sort=False).reset_index()
    return f"""# Every policy on V100-, A100- and H200-class profiles (SIMULATED)

**Everything here is simulated** by the trace-replay simulator on a CPU: no GPU ran; times come from the
cost model and the profiles below (measured H200 results: `../h200/comparison/`). `comparison.csv`: one
row per cell, all `source=simulated`; `comparison.json`: config, git revision, trace, layout, profiles
(with citations). Written by `prescope simulate-compare` (`prescope/simcompare.py`), which rewrites it.

## What was simulated

- **Routing**: `{tr['path']}`: {tr['model']} (recorded by `{tr['source']}`; split `{tr['split'] or '-'}`),
  {'with' if meta.get('hidden_states', True) else 'without'} the router inputs (hidden states) the predictors read. Subset:
  {tr['prompts']} prompts (evenly spaced ids {tr['prompt_ids'][0]} … {tr['prompt_ids'][-1]}), their
  {tr['decode_tokens']} decode tokens (prefill not replayed){steps}. Batch b runs b prompts' decode steps
  together; the cache carries over from one batch of prompts to the next.
- **Timed as** the `{cfg['twin'] or lay['model_class']}` shape twin ({lay['model_class']}, L={len(lay['moe_layers'])},
  E={lay['num_experts']}, K={lay['top_k']}, H={lay['hidden_size']}, I={lay['intermediate_size']},
  {lay['expert_bytes'] / 2**20:.0f} MiB {lay['dtype']} experts, {meta['dense_params']} non-expert
  parameters per layer), which routes like the trace (same L, E, K).
- **Policies**: {', '.join(cfg['policies'])}, plus `resident` (every expert in a GPU slot: budget 1.0,
  `on_demand_lru`). Budgets {', '.join(f'{b:.0%}' for b in cfg['budgets'])} of all L·E experts; batch
  sizes {', '.join(map(str, cfg['batch_sizes']))}. Predictors as in `prescope bench`: gate lookahead
  ({cfg['routers']} routers) for `lookahead_prefetch` and `hybrid`; LLaPor `{cfg['predictor']}` for
  `prescope` (lookahead {cfg['lookahead']}, capped at its trained distance); `belady` and `ceiling` the
  replayed future; AsyncIO's priority link for the policies that ask for it (`prescope` and those two). Each
  policy decides with the profile that times it.
- **Profiles**: one twin expert costs *load / GPU / CPU* ms (link; GPU and CPU for one token); host time
  per layer and per transfer, and prediction / planning per layer (charged only to `prescope`, the one
  policy declaring them) are profile constants. The built-in `h200` is the measured base the two
  estimates were scaled from (same host and CPU model: they differ only in link and GPU); `h200-engine`
  is refitted to the engine's own measurements and decided the measured H200 comparison; a `+…-host`
  profile is a published one with the named profile's host side and CPU experts.

| profile | source | peak link GB/s | expert load / GPU / CPU ms | host ms per layer / transfer | predict / plan ms |
|---|---|---|---|---|---|
{provenance}

Command (git `{meta['git_revision']}`{uncommitted}, {meta['seconds']:.0f} s on a 2-core CPU):

```
{command}
```

Columns: `decode_ms` median decode step; `tok_s` tokens over the summed step latencies; `loads_per_step`
expert transfers per step (on demand + prefetched); `lower_bound_ms` the simulator's bound on a step (no
policy of this engine can beat it), `over_bound` the run's latency over that bound; `vs_on_demand_lru`,
`vs_belady`, `vs_ceiling` throughput ratios to that policy at the same profile, budget and batch; `vs_resident` to the
resident reference; `regime` link-bound when the bytes a step moves take longer at the profile's peak than
the resident step.

## `prescope`: the main ratios (simulated)

{_md(main_ratios(table))}

## Fastest offloaded policy per cell (simulated)

{_md(best_policies(table))}

## Throughput, tokens/s (simulated)

{_md(throughput)}
{_measured_section(meta.get('measured'))}
## Caveats

- `v100-pcie3` and `a100-pcie4` are **published estimates**: link from PCIe 3 / PCIe 4 figures, GPU scaled
  from the H200 by datasheet ratios, and the CPU expert model and host overhead of the built-in `h200`
  profile, not the engine-refitted ones of `h200-engine` (whose CPU experts cost more: see the expert
  CPU ms above). Ratios between policies on one profile are the result; absolute times are not.
- The simulator charges no policy Python time beyond the profile's predict / plan constants (and the host
  time per transfer where the profile has it), and those only for the layers a policy plans. On the H200
  the engine measured `prescope` spending 0.5–2.5 ms per MoE layer where it plans (`../h200/comparison/`).
- The simulator runs a layer's host work serially with the GPU; the engine overlaps a layer's loads and
  kernels with the host's work on the next layer. `prescope`'s gate judges from the costs the executor
  gives (`Costs.host_hides_device`): in a replay it plans where the misses of a layer, split between the
  link and the CPU, end it later than all-resident experts would, and runs the others on demand with the
  same split.
- `belady` (named `oracle` before) knows the running step's future, evicts by Belady and splits only the
  running layer's misses with the CPU: not a bound, and other policies can beat it. `ceiling` is PreScope
  fed the true future (perfect prediction): what `prescope` would reach with a perfect predictor.
  `lower_bound_ms` is the bound.
- Routing comes from the trace named above, replayed on the layout named above.
"""


def _measured_section(measured: dict | None) -> str:
    if not measured:
        return ""
    cells = pd.DataFrame(measured["cells"])
    if cells.empty:
        return ""
    within = float((cells["error"].abs() <= TOLERANCE).mean())
    return f"""
## Against the H200 measurement (context, not the same tokens)

`{measured['path']}` (measured on {measured['device']}, git `{measured['git_revision']}`, decided with
`{measured['profile']}`): the same twin driven by prescope-tiny's routing, but on the bench's own held-out
prompts (128 tokens in, 32 out), so the tokens differ; and the policies' code may have changed since that
revision. error = simulated / measured median step − 1; {within:.0%} of {len(cells)} cells within
{TOLERANCE:.0%}, median |error| {cells['error'].abs().median():.0%}.

{_md(cells.drop(columns=['profile']))}
"""
