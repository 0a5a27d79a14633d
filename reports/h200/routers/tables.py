"""The learned-routing comparison's tables (README.md) from the bench files beside this script.

Usage: python reports/h200/routers/tables.py [--detail] SUBJECT_DIR [SUBJECT_DIR ...] (folders holding a bench.json
each; their engine cells are pooled, the first file's resident and stock rows win). With --detail, one cell per
policy and batch: ms per step (median) · throughput × LRU · engine host ms per MoE layer · step over its
link-and-device bound, and the CPU workers where a row ran with other than the default. Per policy and batch: the median
decode ms per step (per-token latency) and the decode throughput against on_demand_lru's in the same file
(`decode_tok_s`, tokens over the mean step), then loads per step. Policies in POLICIES' order, then the variants
the files hold (e.g. `prescope[cpu_experts=False]`) in the order they ran."""

from __future__ import annotations

import json
import sys
from pathlib import Path

POLICIES = ["resident", "stock", "on_demand_lru", "prescope", "prescope[gate=False]", "ceiling", "belady", "hybrid",
            "activation_matrix", "cpu_misses", "lookahead_prefetch"]
REFERENCE = ("resident", "stock")


def detail(c: dict, lru: float) -> str:
    """One cell of the --detail table."""
    ms, bound = c["decode_ms_median"], c.get("vs_bound")
    return (f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}") + f" · {c['decode_tok_s'] / lru:.2f}x" \
        + f" · {c.get('host_ms_per_layer', float('nan')):.2f}" + (f" · {bound:.2f}" if bound else "")


def main(folders: list[str]) -> None:
    full = "--detail" in folders
    folders = [f for f in folders if f != "--detail"]
    cells = []
    for folder in folders:
        data = json.loads((Path(folder) / "bench.json").read_text())
        print(f"<!-- {folder}: revision {data['git_revision']}, {data['bandwidths']} -->")
        cells += [c for c in data["cells"] if not any(c["policy"] == d["policy"] and c["batch"] == d["batch"]
                                                     and c["policy"] in REFERENCE for d in cells)]
    batches = sorted({c["batch"] for c in cells})
    if full:
        for budget in sorted({c["budget"] for c in cells if c["policy"] not in REFERENCE}):
            print(f"\n{budget:.0%}: ms · × LRU · host ms/layer · × bound\n")
            print("| policy | " + " | ".join(f"b{b}" for b in batches) + " |\n|---|" + "---|" * len(batches))
            here = [c for c in cells if c["budget"] == budget and c["policy"] not in REFERENCE]
            lru = {c["batch"]: c["decode_tok_s"] for c in here if c["policy"] == "on_demand_lru"}
            for policy in dict.fromkeys(c["policy"] for c in here):
                row = {c["batch"]: detail(c, lru[c["batch"]]) for c in here if c["policy"] == policy and c["batch"] in lru}
                print(f"| {policy} | " + " | ".join(row.get(b, "") for b in batches) + " |")
        return
    for budget in sorted({c["budget"] for c in cells if c["policy"] not in REFERENCE}):
        print(f"\n{budget:.0%} of the experts on the GPU: decode ms per step (median), × LRU (throughput)\n")
        print("| policy | " + " | ".join(f"b{b} ms | × LRU" for b in batches) + " | loads/step "
              + " / ".join(f"b{b}" for b in batches) + " |")
        print("|---|" + "---|---|" * len(batches) + "---|")
        lru = {c["batch"]: c["decode_tok_s"] for c in cells if c["policy"] == "on_demand_lru" and c["budget"] == budget}
        variants = [p for p in dict.fromkeys(c["policy"] for c in cells) if p not in POLICIES]
        for policy in POLICIES + variants:
            row, loads = [], []
            for b in batches:
                found = [c for c in cells if c["policy"] == policy and c["batch"] == b
                         and (policy in REFERENCE or c["budget"] == budget)]
                if not found:
                    row += ["", ""]
                    loads.append("")
                    continue
                c, ref = found[0], policy in REFERENCE
                ms = c["decode_ms_median"]
                row += [f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}", "" if ref else f"{c['decode_tok_s'] / lru[b]:.2f}"]
                loads.append("" if ref else f"{c.get('loads_per_step', 0):.1f}")
            if any(row):
                print(f"| {policy} | " + " | ".join(row) + " | " + " / ".join(loads) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
