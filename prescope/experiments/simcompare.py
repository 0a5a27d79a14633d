"""`prescope simulate-compare`: every policy on several hardware profiles, simulated, as ratios within a profile.

`prescope bench` measures the policies on the machine at hand (the H200); this command gives the same
comparison for other hardware through the trace-replay simulator (`simulator.replay`): one routing trace
with hidden states (prescope-tiny on held-out text), timed as a shape twin that routes like it (default
OLMoE-1B-7B: same L, E, K), on each profile, for every policy of the bench plus the everything-resident
reference (budget 1.0, `on_demand_lru`), at each budget and batch size. Policies get what the bench gives
them (`subjects.Subject.policy`; predictors read `LayerView.hidden`, the limits `LayerView.future`, both
filled by `replay`), AsyncIO's priority link where the policy asks for it (`prescope` and the limits: the
engine's rule when `EngineConfig.async_io` is None), and decide with the profile that times them.

Per cell: median decode step (decode_ms), tok_s = tokens / Σ step latency, loads per step (on demand +
prefetched), the simulator's lower bound on a step and over_bound = Σ latency / Σ bound, and tok_s ratios
inside one profile and batch: vs_on_demand_lru, vs_belady, vs_ceiling (same budget), vs_resident. Regime: link-bound
when a step's bytes take longer at the profile's peak link bandwidth than the resident step. Every row is
source="simulated". A replay is pure Python, so prompts are an evenly spaced subset, the same in every cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from prescope.config import check_types
from prescope.experiments.bench import ALL_POLICIES
from prescope.experiments.benchfile import read_bench
from prescope.experiments.benchrows import RESIDENT
from prescope.experiments.simreadme import main_ratios, render_readme
from prescope.files import (
    check_output,
    portable_values,
    source_revision,
    write_atomic,
    write_json,
    write_with_sidecar,
)
from prescope.hardware.profiles import HardwareProfile, ProfileError, load_profile
from prescope.policies import LIMITS, POLICIES, current_name, make_policy
from prescope.policies.base import Policy, costs_for
from prescope.routing.trace import Trace
from prescope.sim.simcost import experts_only
from prescope.sim.simulator import replay

DEFAULT_TRACE = ".cache/llapor/heldout-7be95c0f0c1b.trace.parquet"
DEFAULT_PREDICTOR = ".cache/llapor/llapor-a2863700bae5.pt"
DEFAULT_PROFILES = ("v100-pcie3", "a100-pcie4", "h200", "reports/h200/h200-engine.json")
DEFAULT_MEASURED = "reports/h200/comparison/olmoe-tiny-routing.json"  # the same twin measured on the H200
DEFAULT_HOST = "reports/h200/h200-engine.json"  # the engine's measured host side, for the published profiles
BASELINES = ("on_demand_lru", "belady", "ceiling")  # every row is compared with these at its own budget
ROUTERS = ("prescope-tiny", "fit")  # whose routers the gate lookahead applies (or least squares on the trace)
PRESCOPE_LOOKAHEAD = 3  # the bench's default window for `prescope`
MS = 1e3
COLUMNS = ("profile", "profile_source", "policy", "budget", "batch", "slots", "async_io", "predictor", "steps",
           "tokens", "decode_ms", "decode_ms_mean", "tok_s", "loads_per_step", "on_demand_per_step", "hit_rate",
           "gpu_idle_share", "prefetch_precision", "lower_bound_ms", "over_bound", "vs_on_demand_lru", "vs_belady",
           "vs_ceiling",
           "vs_resident", "regime", "source")


class CompareError(ValueError):
    """A comparison that cannot run as asked (unknown policy or profile, bad budget or subset)."""


@dataclass(frozen=True)
class CompareConfig:
    """trace: routing with hidden states. twin: the shape twin whose layout times the trace ("" times the
    trace's own model); twin_layers: its layer count (None: all). profiles: built-in names or profile JSON
    paths. prompts: evenly spaced prompts of the trace replayed (0: all). max_steps: forward calls per
    replay (None: all of the chosen prompts). predictor: LLaPor checkpoint for `prescope` (None: gate
    lookahead). routers: the gate lookahead's routers, "prescope-tiny" or "fit" (least squares on the
    trace's hidden states and logits). threads: torch intra-op threads (tiny GEMMs: one avoids OpenMP
    spin-waits on a busy CPU). measured: a `prescope bench` JSON of the same twin whose cells are set
    beside the simulated ones of the profile it decided with (`measured_context`; None: none). host_of: a
    profile whose host side also times every published profile, as extra variants (`with_host`; None:
    none)."""

    trace: str = DEFAULT_TRACE
    twin: str = "olmoe-1b-7b"
    twin_layers: int | None = None
    profiles: tuple[str, ...] = DEFAULT_PROFILES
    policies: tuple[str, ...] = ALL_POLICIES
    budgets: tuple[float, ...] = (0.25, 0.5)
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    prompts: int = 16
    max_steps: int | None = None
    predictor: str | None = DEFAULT_PREDICTOR
    routers: str = "prescope-tiny"
    lookahead: int = PRESCOPE_LOOKAHEAD
    threads: int = 1
    measured: str | None = DEFAULT_MEASURED
    host_of: str | None = DEFAULT_HOST
    out: str = "reports/simulated"

    def __post_init__(self) -> None:
        check_types(self, CompareError)
        check_grid(self.policies, self.budgets, self.batch_sizes)
        resolve_profiles(self.profiles + ((self.host_of,) if self.host_of else ()))
        if self.prompts < 0 or (self.prompts > 0 and self.prompts % max(self.batch_sizes)):
            raise CompareError(f"prompts must be 0 (all) or a positive multiple of the largest batch size "
                               f"{max(self.batch_sizes)} (every batch full), got {self.prompts}")
        if self.max_steps is not None and self.max_steps < 1:
            raise CompareError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.routers not in ROUTERS:
            raise CompareError(f"routers must be one of {ROUTERS}, got {self.routers!r}")
        if self.lookahead < 1 or self.threads < 1:
            raise CompareError(f"lookahead and threads must be >= 1, got {self.lookahead}, {self.threads}")
        if self.measured and not Path(self.measured).is_file():
            raise CompareError(f"measured bench JSON {self.measured!r} does not exist (give '' for none)")


def check_grid(policies: Sequence[str], budgets: Sequence[float], batch_sizes: Sequence[int]) -> None:
    """CompareError unless every policy is known, budgets are shares in (0, 1) and batch sizes >= 1."""
    unknown = [p for p in policies if current_name(p) not in POLICIES]
    if unknown or not policies:
        raise CompareError(f"unknown or no policies {unknown or list(policies)}; choose from {sorted(POLICIES)}")
    if not budgets or any(not 0.0 < b < 1.0 for b in budgets):
        raise CompareError(f"budgets are shares of all experts in (0, 1) (1.0 is the resident reference, "
                           f"always run), got {list(budgets)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise CompareError(f"batch sizes must be >= 1, got {list(batch_sizes)}")


def resolve_profiles(names: Sequence[str]) -> list[HardwareProfile]:
    """Profiles by built-in name or JSON path; a CompareError naming the bad one and the choices."""
    out = []
    for name in names:
        try:
            out.append(load_profile(name))
        except (ProfileError, FileNotFoundError) as exc:
            raise CompareError(f"profile {name!r}: {exc}") from None
    return out


def with_host(profile: HardwareProfile, host: HardwareProfile) -> HardwareProfile:
    """`profile`'s link and GPU with `host`'s host side: time per layer, per transfer issued, per prediction
    and plan, and its CPU expert model. The same engine and host on another GPU class."""
    return dataclasses.replace(
        profile, name=f"{profile.name}+{host.name}-host", cpu_expert=dict(host.cpu_expert),
        description=f"{profile.description} Host side and CPU experts of {host.name}.",
        host_overhead_per_layer_s=host.host_overhead_per_layer_s, host_per_transfer_s=host.host_per_transfer_s,
        host_device_driven_per_layer_s=host.host_device_driven_per_layer_s,
        predict_overhead_s=host.predict_overhead_s, plan_overhead_s=host.plan_overhead_s)


def profile_set(names: Sequence[str], host_of: str | None = None) -> list[tuple[HardwareProfile, str]]:
    """(profile, how it was asked for) for each name, then each published one with `host_of`'s host side."""
    chosen = list(zip(resolve_profiles(names), names, strict=True))
    if not host_of:
        return chosen
    host = resolve_profiles([host_of])[0]
    return chosen + [(with_host(p, host), f"{arg} with the host side of {host_of}")
                     for p, arg in chosen if p.source == "published"]


def prompt_subset(trace: Trace, count: int) -> Trace:
    """The trace restricted to `count` prompts with evenly spaced ids (all when count is 0 or too large)."""
    ids = np.unique(trace.tokens["prompt"].to_numpy())
    if count == 0 or count >= len(ids):
        return trace
    return trace.select(ids[np.linspace(0, len(ids) - 1, count).round().astype(np.int64)])


def policy_for(name: str, gate=None, llapor=None, lookahead: int = PRESCOPE_LOOKAHEAD) -> tuple[Policy, str]:
    """A fresh policy with the predictor the bench gives it (`subjects.Subject.policy`); (policy, predictor
    name). Without `gate`, the gate-lookahead policies predict from the routing they have seen."""
    from prescope.experiments.subjects import GATE_POLICIES  # torch: imported when a comparison runs

    name = current_name(name)
    if name in GATE_POLICIES:
        return make_policy(name, predictor=gate), "gate_lookahead" if gate is not None else "previous step"
    if name == "prescope":
        if llapor is not None:
            return make_policy(name, predictor=llapor, lookahead=min(lookahead, llapor.config.distance)), "llapor"
        return (make_policy(name, predictor=gate, lookahead=lookahead),
                "gate_lookahead" if gate is not None else "previous step")
    if name == "ceiling":
        return make_policy(name, lookahead=lookahead), "replayed future"
    if name in LIMITS:
        return make_policy(name), "replayed future"
    return make_policy(name), "own statistics" if name == "activation_matrix" else "none"


def compare(trace: Trace, profiles: Sequence[HardwareProfile | str], *, policies: Sequence[str] = ALL_POLICIES,
            budgets: Sequence[float] = (0.25, 0.5), batch_sizes: Sequence[int] = (1, 4), layout=None,
            dense_params: int | None = None, max_steps: int | None = None, gate=None, llapor=None,
            lookahead: int = PRESCOPE_LOOKAHEAD, progress: Callable[[dict], None] | None = None) -> pd.DataFrame:
    """One row per (profile, batch, policy, budget), plus the resident reference per (profile, batch);
    ratios added by `add_ratios`. `layout`/`dense_params` time another model that routes like the trace
    (`simulator.replay`); `progress` is called with each finished row."""
    check_grid(policies, budgets, batch_sizes)
    profiles = [p if isinstance(p, HardwareProfile) else resolve_profiles([p])[0] for p in profiles]
    cells = [(RESIDENT, 1.0)] + [(current_name(p), b) for b in budgets for p in policies]
    rows = []
    for profile in profiles:
        for batch in batch_sizes:
            for name, budget in cells:
                policy, predictor = policy_for("on_demand_lru" if name == RESIDENT else name, gate, llapor,
                                               lookahead)
                async_io = policy.uses_async_io(costs_for(layout or trace.layout, profile))
                sim = replay(trace, policy, profile, budget_share=budget, batch_size=batch, max_steps=max_steps,
                             async_io=async_io, layout=layout, dense_params=dense_params)
                rows.append(cell_row(sim, profile, name, budget, batch, predictor))
                if progress is not None:
                    progress(rows[-1])
    return add_ratios(pd.DataFrame(rows), {p.name: p.pinned_h2d.peak_gbps for p in profiles})


def cell_row(sim, profile: HardwareProfile, policy: str, budget: float, batch: int, predictor: str) -> dict:
    """The comparison's columns from one replay (`simulator.SimResult`)."""
    s, t, steps = sim.summary, sim.totals, len(sim.summary)
    loads = s["loads_on_demand"].sum() + s["loads_prefetched"].sum()
    return {"profile": profile.name, "profile_source": profile.source, "policy": policy, "budget": budget,
            "batch": batch, "slots": sim.config["budget_slots"], "async_io": sim.config["async_io"],
            "predictor": predictor, "steps": steps, "tokens": t["tokens"],
            "decode_ms": MS * float(s["latency"].median()), "decode_ms_mean": MS * float(s["latency"].mean()),
            "tok_s": t["tokens_per_s"], "loads_per_step": float(loads / steps),
            "on_demand_per_step": float(s["loads_on_demand"].sum() / steps),
            "bytes_per_step": float(s["bytes"].sum() / steps), "hit_rate": t["hit_rate"],
            "gpu_idle_share": t["gpu_idle_share"], "prefetch_precision": t["prefetch_precision"],
            "lower_bound_ms": MS * t["lower_bound_step_s"],
            "over_bound": 1.0 / t["lower_bound_share"] if t["lower_bound_share"] > 0 else math.inf,
            "source": "simulated"}


def add_ratios(table: pd.DataFrame, peak_gbps: dict[str, float] | None = None) -> pd.DataFrame:
    """Throughput ratios inside one profile and batch: vs_on_demand_lru, vs_belady and vs_ceiling against the row of
    that policy at the same budget (NaN for the resident row or where the peer did not run), vs_resident
    against the resident row; and the regime where the profile's peak link bandwidth is given."""
    table = table.copy()
    keys = ["profile", "batch", "budget"]
    for peer in BASELINES:
        ref = table.loc[table["policy"] == peer, keys + ["tok_s"]].rename(columns={"tok_s": f"_{peer}"})
        table = table.merge(ref, on=keys, how="left")
        table[f"vs_{peer}"] = np.where(table["policy"] == RESIDENT, np.nan, table["tok_s"] / table[f"_{peer}"])
    resident = table.loc[table["policy"] == RESIDENT, ["profile", "batch", "tok_s", "decode_ms"]]
    table = table.merge(resident.rename(columns={"tok_s": "_resident", "decode_ms": "_resident_ms"}),
                        on=["profile", "batch"], how="left")
    table["vs_resident"] = table["tok_s"] / table["_resident"]
    if peak_gbps and "bytes_per_step" in table:
        link_ms = MS * table["bytes_per_step"] / (table["profile"].map(peak_gbps) * 1e9)
        table["regime"] = np.where(link_ms > table["_resident_ms"], "link-bound", "host-bound")
    table = table.drop(columns=[c for c in table.columns if c.startswith("_")])
    return table[[c for c in COLUMNS if c in table] + [c for c in table if c not in COLUMNS]]


def measured_context(table: pd.DataFrame, bench: dict, twin: str) -> pd.DataFrame:
    """Simulated cells beside the measured cells of a `prescope bench` run of the same twin (model
    `twin` or `twin@source`), for the profile that bench decided with: same policy, budget and batch, not
    the same tokens (the bench replays its own prompts). error = simulated / measured median step − 1."""
    profile = load_profile(bench["config"]["profile"]).name
    cells = pd.DataFrame(bench["cells"])
    cells = cells[cells["model"].str.partition("@")[0] == twin]
    cells = cells[["policy", "budget", "batch", "decode_ms_median", "decode_tok_s"]].rename(
        columns={"decode_ms_median": "measured_ms", "decode_tok_s": "measured_tok_s"})
    sim = table.loc[table["profile"] == profile, ["profile", "policy", "budget", "batch", "decode_ms", "tok_s"]]
    both = sim.rename(columns={"decode_ms": "simulated_ms", "tok_s": "simulated_tok_s"}).merge(
        cells, on=["policy", "budget", "batch"])
    both["error"] = both["simulated_ms"] / both["measured_ms"] - 1
    return both.reset_index(drop=True)


# ---- the run behind the command -------------------------------------------------------------------------

def load_inputs(cfg: CompareConfig):
    """(trace subset, layout, dense params, gate predictor or None, LLaPor or None) for `cfg`. A trace without
    hidden states (a llama.cpp trace) runs with the predictors that need none: the gate-lookahead policies
    predict from the routing they have seen, and `prescope` too unless its LLaPor reads routing only."""
    from prescope.predict.predictors import GateLookahead
    from prescope.routing.reader import read_trace

    trace = prompt_subset(read_trace(cfg.trace), cfg.prompts)
    prompts = int(trace.tokens["prompt"].nunique())
    if max(cfg.batch_sizes) > prompts:
        raise CompareError(f"{cfg.trace} holds {prompts} prompt(s): a batch of b decodes b prompts together, so "
                           f"--batch-sizes must stay <= {prompts} (got {list(cfg.batch_sizes)})")
    layout, dense = trace.layout, None
    if cfg.twin:
        from prescope.models.twins import twin_layout

        layout, dense = twin_layout(cfg.twin, cfg.twin_layers)
        routes = (trace.layout.num_moe_layers, trace.layout.num_experts, trace.layout.top_k)
        if routes != (layout.num_moe_layers, layout.num_experts, layout.top_k):
            raise CompareError(f"twin {cfg.twin!r} (L={layout.num_moe_layers}, E={layout.num_experts}, "
                               f"K={layout.top_k}) does not route like {cfg.trace} (L={routes[0]}, E={routes[1]}, "
                               f"K={routes[2]}): give --twin with a twin of that shape, or --twin '' for the "
                               "trace's own layout")
    llapor = None
    if cfg.predictor:
        from prescope.predict.checkpoints import load_for_trace

        llapor = load_for_trace(cfg.predictor, trace)
    if trace.hidden is None:
        return trace, layout, dense, None, llapor
    if cfg.routers == "prescope-tiny":
        from prescope.models.adapter import describe
        from prescope.models.tiny import load_tiny

        tiny = load_tiny()[0]
        describe(tiny).check_compatible(trace.layout, "trace (for --routers prescope-tiny; try --routers fit)")
        gate = GateLookahead.from_model(tiny)
    else:
        gate = GateLookahead().fit(trace)
    return trace, layout, dense, gate, llapor


def run_compare(cfg: CompareConfig) -> tuple[pd.DataFrame, dict]:
    """Run the comparison of `cfg`, write comparison.csv (after each profile, so a run cut short keeps
    what it finished), comparison.json and README.md under `cfg.out`."""
    import torch
    from tqdm.auto import tqdm

    began, out = time.perf_counter(), check_output(cfg.out, folder=True, what="--out")
    profiles = profile_set(cfg.profiles, cfg.host_of)  # read once: a profile file may change meanwhile
    revision, dirty = source_revision()  # the code as it is when the modules are imported
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        trace, layout, dense, gate, llapor = load_inputs(cfg)
        warning = experts_only(layout, dense)
        if warning:
            print(f"prescope simulate-compare: warning: {warning}", file=sys.stderr, flush=True)
        parts = []
        total = len(profiles) * len(cfg.batch_sizes) * (1 + len(cfg.budgets) * len(cfg.policies))
        with tqdm(total=total, desc="simulate-compare", unit="cell") as bar:
            for profile, _ in profiles:
                parts.append(compare(trace, [profile], policies=cfg.policies, budgets=cfg.budgets,
                                     batch_sizes=cfg.batch_sizes, layout=layout, dense_params=dense,
                                     max_steps=cfg.max_steps, gate=gate, llapor=llapor, lookahead=cfg.lookahead,
                                     progress=lambda _: bar.update()))
                write_with_sidecar(out / "comparison.csv", pd.concat(parts, ignore_index=True).to_csv(index=False))
    finally:
        torch.set_num_threads(threads)
    table = pd.concat(parts, ignore_index=True)
    meta = {"config": portable_values(asdict(cfg)), "git_revision": revision, "uncommitted": dirty, "source": "simulated",
            "trace": {"path": cfg.trace, "model": trace.layout.model_class, "source": trace.meta.get("source", ""),
                      "split": trace.meta.get("split", ""), "prompts": int(trace.tokens["prompt"].nunique()),
                      "prompt_ids": sorted(int(p) for p in trace.tokens["prompt"].unique()),
                      "decode_tokens": int((trace.tokens["phase"] == "decode").sum())},
            "layout": layout.to_dict(), "dense_params": dense, "hidden_states": trace.hidden is not None,
            "priced_on": "experts only" if experts_only(layout, dense) else "experts and resident work",
            "predictors": {"gate_lookahead": cfg.routers, "llapor": cfg.predictor},
            "profiles": [_provenance(p, arg, layout) for p, arg in profiles],
            "seconds": round(time.perf_counter() - began, 1)}
    if cfg.measured:
        bench = read_bench(cfg.measured)
        context = measured_context(table, bench, cfg.twin)
        meta["measured"] = {"path": cfg.measured, "git_revision": bench.get("git_revision", "unknown"),
                            "device": bench.get("device", ""), "profile": bench["config"]["profile"],
                            "cells": context.to_dict(orient="records")}
    write_json(out / "comparison.json", meta)
    write_atomic(out / "README.md", render_readme(table, meta))
    return table, meta


def _provenance(profile: HardwareProfile, arg: str, layout) -> dict:
    """What the README says about a profile: where it comes from, and what one of the layout's experts costs
    on it (over the link; on the GPU and on the CPU for one token), which decides the regimes."""
    costs = costs_for(layout, profile)
    return {"name": profile.name, "arg": arg, "source": profile.source, "description": profile.description,
            "citation": profile.citation, "peak_gbps": profile.pinned_h2d.peak_gbps,
            "host_overhead_per_layer_ms": MS * profile.host_overhead_per_layer_s,
            "host_per_transfer_ms": MS * profile.host_per_transfer_s,
            "predict_overhead_ms": MS * profile.predict_overhead_s,
            "plan_overhead_ms": MS * profile.plan_overhead_s, "expert_load_ms": MS * costs.load,
            "expert_gpu_ms": MS * costs.gpu(1), "expert_cpu_ms": MS * costs.cpu(1)}


# ---- command line ---------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    # the defaults as declared, not checked: building the parser must not need the default files to exist
    d = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(CompareConfig)})
    parser.add_argument("--trace", default=d.trace, help="routing trace with hidden states (.parquet) "
                                                         "(default: %(default)s)")
    parser.add_argument("--twin", default=d.twin, help="shape twin whose layout times the trace ('' = its own) "
                                                       "(default: %(default)s)")
    parser.add_argument("--twin-layers", type=int, default=None, help="the twin's layer count (default: all)")
    parser.add_argument("--profiles", nargs="+", default=list(d.profiles), help="profile names or JSON paths "
                                                                                "(default: %(default)s)")
    parser.add_argument("--policies", nargs="+", default=list(d.policies),
                        help="policies to compare (default: %(default)s)")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(d.budgets),
                        help="GPU expert budgets, as shares of all L·E experts (default: %(default)s)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(d.batch_sizes),
                        help="batch sizes, in prompts decoded together (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=d.prompts, help="evenly spaced prompts replayed (0: all)")
    parser.add_argument("--max-steps", type=int, default=None, help="forward calls per replay (default: all)")
    parser.add_argument("--predictor", default=d.predictor,
                        help="LLaPor checkpoint for prescope ('' = gate lookahead)")
    parser.add_argument("--routers", default=d.routers, choices=ROUTERS,
                        help="routers the gate lookahead applies: prescope-tiny's own, or least squares fitted to "
                             "the trace (default: %(default)s)")
    parser.add_argument("--lookahead", type=int, default=d.lookahead,
                        help="layers prescope predicts and prefetches ahead (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="torch intra-op threads (tiny matrices: one avoids spin-waits) (default: %(default)s)")
    parser.add_argument("--host-of", default=d.host_of,
                        help="also time each published profile with this profile's host side ('' = no)")
    parser.add_argument("--measured", default=d.measured,
                        help="bench JSON of the same twin to set beside the simulated cells ('' = none)")
    parser.add_argument("--out", default=d.out, help="folder for comparison.json, the CSV and its README "
                                                     "(default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    cfg = CompareConfig(trace=args.trace, twin=args.twin, twin_layers=args.twin_layers,
                        profiles=tuple(args.profiles), policies=tuple(args.policies), budgets=tuple(args.budgets),
                        batch_sizes=tuple(args.batch_sizes),
                        prompts=args.prompts, max_steps=args.max_steps, predictor=args.predictor or None,
                        routers=args.routers, lookahead=args.lookahead, threads=args.threads,
                        measured=args.measured or None, host_of=args.host_of or None, out=args.out)
    table, meta = run_compare(cfg)
    shown = table[["profile", "policy", "budget", "batch", "decode_ms", "tok_s", "loads_per_step", "lower_bound_ms",
                   "vs_on_demand_lru", "vs_ceiling", "vs_resident", "regime"]]
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    headline = main_ratios(table)
    print(json.dumps({"command": "simulate-compare", "source": "simulated", "out": cfg.out,
                      "git_revision": meta["git_revision"], "cells": len(table), "seconds": meta["seconds"],
                      "prescope": headline[["profile", "budget", "batch", "vs_on_demand_lru", "vs_ceiling"]]
                      .round(3).to_dict(orient="records")}))
    return 0
