"""What the notebooks share, so they stay thin: the traces and result tables they show, policies built by name,
and policy comparisons (simulated by trace replay, or measured through the engine) as tidy tables for `viz`.

Traces: `tiny_trace` returns the trace of prescope-tiny that `prescope trace` leaves in `reports/` when it
exists, and otherwise records a small one on the spot (a few built-in prompts, greedy decoding on the CPU);
`real_traces` loads the llama.cpp routing traces of real models (shipped with the package). Result tables
carry `attrs` source ("measured" | "simulated") and profile, which `viz` requires of anything timed.

Rates: tokens_per_s = tokens / seconds over the replayed (or measured) forward calls; latency_ms = the mean
decode step (one token per sequence); the lower bound of a step is the simulator's any-placement bound (the
attention's GPU work, and the fastest link/CPU split of what an optimal cache must still fetch:
`cost.split_lower_bound`), so bound_tokens_per_s = tokens / Σ bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from prescope import timeline as tl
from prescope.data import DATA_DIR, exists
from prescope.hardware.profiles import HardwareProfile, load_profile, scale_profile
from prescope.layout import ModelLayout
from prescope.policies import POLICIES, current_name, make_policy
from prescope.policies.base import Policy
from prescope.routing.trace import Trace

TINY_TRACE = "prescope-tiny.trace.parquet"
REAL_TRACES = {"qwen3-30b-a3b": "qwen3-30b-a3b.route.csv", "gpt-oss-120b": "gpt-oss-120b.route.csv"}
# Short prompts from the domains prescope-tiny was trained on (web, code, papers, encyclopedia).
DEFAULT_PROMPTS = (
    "The history of the Roman Empire began when",
    "def read_config(path):\n    with open(path) as f:\n",
    "In this paper we propose a new method for",
    "The city council voted on Tuesday to",
    "import numpy as np\n\nclass Matrix:\n",
    "Abstract. We study the convergence of",
    "The river flows through the valley and",
    "Photosynthesis is the process by which",
)
MS_PER_S = 1e3
PREDICTORS = ("previous_step", "gate_lookahead")  # what the predicting policies predict from (`gate_lookahead`)
GATED = ("lookahead_prefetch", "hybrid", "prescope")  # the policies `prescope bench` gives the gate lookahead
# A predictor's matrices are tiny: one thread, as `simulate-compare` runs them (more spin-wait in OpenMP on a
# busy CPU: 3 s became 34 s for 03's replays on a loaded 2-core machine)
PREDICTOR_THREADS = 1
REFERENCE = "on_demand_lru"  # the policy every comparison's ratios are taken against
SAME_LINK_GBPS = 0.005  # a link this close to a profile's own is the profile's (half the dashboard slider's step)
SMALL_RUN_PCA_DIM = 32  # a small run has a few hundred tokens: a PCA of the hidden state no wider than this
SMALL_RUN_WIDTH = 64


class WorkbenchError(ValueError):
    """A notebook asked for something its inputs cannot give (a batch larger than the trace's prompts...)."""


# ---- traces ------------------------------------------------------------------------------------------------

def tiny_trace(path: str | Path = "", *, num_prompts: int = 4, max_new_tokens: int = 32, keep_hidden: bool = False,
               keep_logits: bool = False, model=None, tokenizer=None, progress: bool = False) -> Trace:
    """The trace at `path` (what `prescope trace` wrote, e.g. "../reports/prescope-tiny.trace.parquet") when
    that file exists and holds what is asked for; otherwise a fresh recording of prescope-tiny (`model`,
    `tokenizer`, loaded when not given) on the first `num_prompts` DEFAULT_PROMPTS, batched together.
    `trace.meta["source"]` says which ("record_trace" for a fresh one)."""
    from prescope.routing.trace import load_trace, record_trace

    if path and Path(path).is_file():
        trace = load_trace(path)
        if (not keep_hidden or trace.hidden is not None) and (not keep_logits or trace.logits is not None):
            trace.meta.setdefault("path", str(path))
            return trace
    if not 1 <= num_prompts <= len(DEFAULT_PROMPTS):
        raise WorkbenchError(f"num_prompts must be in 1..{len(DEFAULT_PROMPTS)}, got {num_prompts}")
    if model is None or tokenizer is None:
        from prescope.models.tiny import load_tiny

        model, tokenizer = load_tiny()
    prompts = list(DEFAULT_PROMPTS[:num_prompts])
    return record_trace(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=num_prompts,
                        keep_hidden=keep_hidden, keep_logits=keep_logits, progress=progress)


def real_traces(data_dir: str | Path = DATA_DIR) -> dict[str, Trace]:
    """The llama.cpp routing traces of real models in `data_dir`/routing (REAL_TRACES, plain or .xz), by model
    name; the default `data_dir` is the data shipped with the package."""
    from prescope.routing.llamacpp import load_llamacpp_trace

    folder = Path(data_dir) / "routing"
    missing = [f for f in REAL_TRACES.values() if not exists(folder / f)]
    if missing:
        raise FileNotFoundError(f"routing traces {missing} not found in {folder}")
    return {name: load_llamacpp_trace(folder / f) for name, f in REAL_TRACES.items()}


def on_twin(trace: Trace, twin_model: str) -> Trace:
    """The same routing timed as `twin_model`'s shape twin (e.g. "olmoe-1b-7b" for prescope-tiny, which shares
    its L, E and K): a copy of `trace` that `simulate` replays with the twin's layout (`timing_layout`: its
    expert bytes and compute, its non-expert parameters). The copy's own layout and hidden states stay the
    small model's, which a predictor reads with prescope-tiny's routers, as `prescope bench` drives
    `twin@prescope-tiny`."""
    layout, _ = twin_sizes(twin_model)
    mine = trace.layout
    if (layout.num_moe_layers, layout.num_experts, layout.top_k) != (mine.num_moe_layers, mine.num_experts, mine.top_k):
        raise WorkbenchError(f"{twin_model} routes {layout.num_moe_layers} layers × {layout.num_experts} experts, "
                             f"top-{layout.top_k}; the trace {mine.num_moe_layers} × {mine.num_experts}, top-{mine.top_k}")
    return dataclasses.replace(trace, logits=None, meta={**trace.meta, "sizes_of": twin_model})


@functools.cache
def twin_sizes(twin_model: str) -> tuple[ModelLayout, int]:
    """(layout, non-expert parameters per MoE layer) of a shape twin (`fidelity.twin_layout`; built once per
    name: a slider replays it many times)."""
    from prescope.experiments.fidelity import twin_layout

    return twin_layout(twin_model, None)


def timing_layout(trace: Trace) -> tuple[ModelLayout, int | None]:
    """The layout whose experts time `trace` in a replay, and its non-expert parameters per MoE layer (None:
    the simulator's estimate): the twin's for an `on_twin` copy, else the trace's own."""
    twin = trace.meta.get("sizes_of")
    return twin_sizes(twin) if twin else (trace.layout, None)


def trace_label(trace: Trace) -> str:
    """Where a trace came from, for captions: its file, or "recorded now"."""
    label = str(trace.meta.get("path") or ("recorded now" if trace.meta.get("source") == "record_trace"
                                           else trace.meta.get("source", "?")))
    return label + (f", timed with {trace.meta['sizes_of']}'s expert sizes" if trace.meta.get("sizes_of") else "")


# ---- policies ----------------------------------------------------------------------------------------------

def takes_lookahead(policy: str) -> bool:
    """Whether the policy named `policy` has a lookahead distance (layers predicted ahead)."""
    policy = current_name(policy)
    if policy not in POLICIES:
        raise WorkbenchError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)}")
    return "lookahead" in POLICIES[policy].options_type.names()


def named_policy(policy: str, lookahead: int | None = None, gate=None) -> Policy:
    """`make_policy(policy)`, with `lookahead` passed to the policies that have one (ignored by the others) and
    the predictor `gate` (a gate lookahead, `gate_lookahead`) to those `prescope bench` gives it (GATED);
    without it, a predicting policy predicts from the routing it has seen (the previous step's experts). An
    earlier name reads as today's (`oracle` -> `belady`)."""
    policy = current_name(policy)
    if policy not in POLICIES:
        raise WorkbenchError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)}")
    options = {"lookahead": lookahead} if lookahead is not None and takes_lookahead(policy) else {}
    if gate is not None and policy in GATED:
        options["predictor"] = gate
    return make_policy(policy, **options)


def gate_lookahead(predictor: str, trace: Trace):
    """The predictor the predicting policies get: None for "previous_step" (the routing they have seen), or
    for "gate_lookahead" later layers' routers of prescope-tiny applied to the router input the trace
    recorded (the bench's choice on prescope-tiny's routing; the trace needs hidden states)."""
    if predictor not in PREDICTORS:
        raise WorkbenchError(f"predictor must be one of {PREDICTORS}, got {predictor!r}")
    if predictor == "previous_step":
        return None
    if trace.hidden is None:
        raise WorkbenchError("predictor 'gate_lookahead' reads the router inputs, and this trace has none: record it "
                             "with hidden states (tiny_trace(..., keep_hidden=True)) or use 'previous_step'")
    from prescope.models.tiny import load_tiny
    from prescope.predict.predictors import GateLookahead

    return GateLookahead.from_model(load_tiny()[0])


def _clip_lookahead(lookahead: int | None, trace: Trace) -> int | None:
    return None if lookahead is None else max(1, min(lookahead, trace.layout.num_moe_layers - 1))


def what_if_profile(profile: str | HardwareProfile, link_gbps: float = 0.0) -> HardwareProfile:
    """`profile` with its pinned link rescaled to `link_gbps` (0 or its own peak, within SAME_LINK_GBPS:
    unchanged), renamed "<name> @ <link> GB/s" so figures say what was changed."""
    base = load_profile(profile)
    if link_gbps <= 0 or abs(link_gbps - base.pinned_h2d.peak_gbps) < SAME_LINK_GBPS:
        return base
    return scale_profile(base, name=f"{base.name} @ {link_gbps:g} GB/s", link_gbps=link_gbps)


# ---- comparisons -------------------------------------------------------------------------------------------

def simulate(trace: Trace, policy: str, profile: HardwareProfile | str, *, budget_share: float, batch_size: int = 1,
             max_steps: int | None = None, lookahead: int | None = None, gate=None):
    """One replay (`simulator.replay`) of `policy` by name (`named_policy`), with the policy's own AsyncIO
    choice. Its totals also hold host_s_per_step (the host's own work per step, which no cache or prefetch
    removes) and, for a policy with a gate (prescope), gate_on_demand_share: the share of MoE layers its gate
    ran on demand, without predicting or planning, because it judged them host-bound."""
    from prescope.policies.base import costs_for
    from prescope.sim.simulator import replay

    prompts = int(trace.tokens["prompt"].nunique())
    if batch_size > prompts:
        raise WorkbenchError(f"batch_size {batch_size} needs at least {batch_size} prompts; the trace has {prompts}")
    chosen = named_policy(policy, _clip_lookahead(lookahead, trace), gate)
    hardware, (layout, dense) = load_profile(profile), timing_layout(trace)
    with _torch_threads(PREDICTOR_THREADS if gate is not None else None):
        result = replay(trace, chosen, hardware, budget_share=budget_share, batch_size=batch_size,
                        max_steps=max_steps, async_io=chosen.uses_async_io(costs_for(layout, hardware)),
                        layout=layout, dense_params=dense)
    layers = len(result.summary) * trace.layout.num_moe_layers
    extra = {"host_s_per_step": float(result.summary["host"].mean()),
             "gate_on_demand_share": chosen.lean / layers if getattr(chosen, "gate", False) and layers else np.nan}
    return dataclasses.replace(result, totals={**result.totals, **extra})


@contextlib.contextmanager
def _torch_threads(count: int | None):
    """torch's intra-op threads set to `count` inside the block (None: left alone)."""
    import torch

    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def result_row(totals: Mapping, **keys) -> dict:
    """One table row from a replay's totals: keys, then rates, latency and its lower bound, cache and link."""
    share = totals["lower_bound_share"]
    return {**keys, "tokens_per_s": totals["tokens_per_s"],
            "latency_ms": totals["mean_token_latency_s"] * MS_PER_S,
            "bound_tokens_per_s": totals["tokens_per_s"] / share if share > 0 else np.nan,
            "bound_latency_ms": totals["lower_bound_step_s"] * MS_PER_S,
            "hit_rate": totals["hit_rate"], "gpu_idle_share": totals["gpu_idle_share"],
            "mb_moved": totals["bytes_moved"] / 1e6, "loads_on_demand": totals["loads_on_demand"],
            "loads_prefetched": totals["loads_prefetched"], "prefetch_precision": totals["prefetch_precision"],
            "host_ms": totals.get("host_s_per_step", np.nan) * MS_PER_S,
            "gate_on_demand_share": totals.get("gate_on_demand_share", np.nan),
            "steps": totals["steps"], "tokens": totals["tokens"]}


def with_ratios(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """`table` with vs_on_demand_lru (each row's tokens/s over REFERENCE's at the same `by` value, where it ran)
    and of_bound (tokens/s over the lower bound's: 1 would be the bound); attrs kept."""
    out = table.copy()
    if REFERENCE in set(out["policy"]):
        ref = out[out["policy"] == REFERENCE].set_index(by)["tokens_per_s"]
        out[f"vs_{REFERENCE}"] = out["tokens_per_s"] / out[by].map(ref)
    out["of_bound"] = out["tokens_per_s"] / out["bound_tokens_per_s"]
    out.attrs = dict(table.attrs)
    return out


def compare_policies(trace: Trace, policies: Iterable[str], profile: HardwareProfile | str, *,
                     batch_sizes: Iterable[int] = (1,), budget_share: float = 0.25, max_steps: int | None = None,
                     lookahead: int | None = None, predictor: str = "previous_step") -> tuple[pd.DataFrame, dict]:
    """Replay every policy at every batch size, the predicting ones predicting from `predictor`
    (`gate_lookahead`): (table with one `result_row` per (policy, batch_size) and `with_ratios` per batch
    size, attrs source "simulated" and the profile; the SimResults by (policy, batch_size))."""
    profile, gate = load_profile(profile), gate_lookahead(predictor, trace)
    rows, results = [], {}
    for policy in policies:
        for batch in batch_sizes:
            result = simulate(trace, policy, profile, budget_share=budget_share, batch_size=batch,
                              max_steps=max_steps, lookahead=lookahead, gate=gate)
            results[policy, batch] = result
            rows.append(result_row(result.totals, policy=policy, batch_size=batch))
    table = pd.DataFrame(rows)
    table.attrs.update(source="simulated", profile=profile.name)
    return with_ratios(table, "batch_size"), results


def link_sweep(trace: Trace, policies: Iterable[str], profile: HardwareProfile | str, links_gbps: Iterable[float], *,
               budget_share: float = 0.25, batch_size: int = 1, max_steps: int | None = None,
               lookahead: int | None = None, predictor: str = "previous_step") -> pd.DataFrame:
    """Replay every policy on `profile` with its link rescaled to each bandwidth (`what_if_profile`): one
    `result_row` per (policy, link_gbps) and `with_ratios` per bandwidth, attrs source "simulated" and profile
    "<name> (link rescaled)"."""
    base, gate = load_profile(profile), gate_lookahead(predictor, trace)
    rows = [result_row(simulate(trace, policy, what_if_profile(base, link), budget_share=budget_share,
                                batch_size=batch_size, max_steps=max_steps, lookahead=lookahead, gate=gate).totals,
                       policy=policy, link_gbps=float(link))
            for policy in policies for link in links_gbps]
    table = pd.DataFrame(rows)
    table.attrs.update(source="simulated", profile=f"{base.name} (link rescaled)")
    return with_ratios(table, "link_gbps")


def bubble_table(timelines: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per policy and cause: mean GPU bubble seconds per step (`timeline.bubbles`), for `viz.bubble_figure`.
    Every timeline must share one source and profile, which the table's attrs carry."""
    provenance = {(t.attrs.get("source"), t.attrs.get("profile")) for t in timelines.values()}
    if len(provenance) != 1:
        raise WorkbenchError(f"bubble_table: timelines from different sources or profiles {sorted(map(str, provenance))}")
    rows = []
    for policy, timeline in timelines.items():
        gaps = tl.bubbles(timeline)
        steps = max(1, len(tl.step_spans(timeline)))
        per_cause = gaps.groupby("cause")["duration"].sum() / steps
        rows += [{"policy": policy, "cause": c, "seconds": float(per_cause.get(c, 0.0))} for c in tl.CAUSES]
    table = pd.DataFrame(rows)
    table.attrs.update(zip(("source", "profile"), provenance.pop(), strict=True))
    return table


def measure_policies(model, tokenizer, policies: Iterable[str], *, device: str, budget_share: float,
                     max_new_tokens: int, prompts: Sequence[str] = DEFAULT_PROMPTS[:1]) -> tuple[pd.DataFrame, dict]:
    """Run greedy `generate()` through the offloaded engine once per policy on `device` and measure it:
    (table with one row per policy: tokens_per_s over decode steps, latency_ms = the median decode step,
    hit rate, MB moved, loads, GPU idle share, and `same_tokens` (the stock model's output was reproduced);
    attrs source "measured" and the device; the measured timelines by policy)."""
    import torch

    from prescope.config import EngineConfig
    from prescope.engine.engine import Engine

    batch = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        stock = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    rows, timelines, profile = [], {}, "?"
    for policy in policies:
        with Engine(model, EngineConfig(policy=policy, budget_share=budget_share, device=device)) as engine:
            with torch.no_grad():
                out = model.generate(**{k: v.to(engine.device) for k, v in batch.items()},
                                     max_new_tokens=max_new_tokens, do_sample=False)
            timeline, steps = engine.timeline(), engine.summary()
        profile = timeline.attrs["profile"]
        decode = steps[steps["phase"] == "decode"]
        seconds = float(decode["latency"].sum())
        routed = float(decode["hits"].sum() + decode["misses"].sum())
        rows.append({"policy": policy, "batch_size": len(prompts),
                     "tokens_per_s": float(decode["tokens"].sum()) / seconds if seconds > 0 else np.nan,
                     "latency_ms": float(decode["latency"].median()) * MS_PER_S,
                     "hit_rate": float(decode["hits"].sum()) / routed if routed else np.nan,
                     "mb_moved": float(decode["bytes"].sum()) / 1e6,
                     "loads_on_demand": int(decode["loads_on_demand"].sum()),
                     "loads_prefetched": int(decode["loads_prefetched"].sum()),
                     "gpu_idle_share": float(decode["gpu_idle"].sum()) / seconds if seconds > 0 else np.nan,
                     "same_tokens": bool(torch.equal(out.cpu(), stock)), "steps": len(decode)})
        timelines[policy] = timeline
    table = pd.DataFrame(rows)
    table.attrs.update(source="measured", profile=profile)
    return table, timelines


def resolve_mode(mode: str, device: str) -> tuple[str, str]:
    """("measure" | "simulate", device): "auto" measures where CUDA is present (device "auto" or "cuda...")
    and simulates elsewhere; "measure" on a machine without CUDA measures on the CPU."""
    import torch

    if mode not in ("auto", "measure", "simulate"):
        raise WorkbenchError(f"mode must be 'auto', 'measure' or 'simulate', got {mode!r}")
    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if mode == "auto":
        mode = "measure" if cuda and device.startswith("cuda") else "simulate"
    return mode, device


def small_accuracy_run(*, num_prompts: int = 8, max_new_tokens: int = 16, distance: int = 2, max_epochs: int = 3,
                       heldout_share: float = 0.25, model=None, tokenizer=None, seed: int = 0) -> pd.DataFrame:
    """A small LLaPor experiment on the CPU, for when no committed tables exist: record prescope-tiny on
    `num_prompts` DEFAULT_PROMPTS (hidden states and logits kept), hold out a `heldout_share` of the
    prompts, train a small LLaPor and fit the baselines on the rest, and return `accuracy.evaluate` on the
    held-out decode tokens (predictor, layer, distance, domain, metric, value, tokens). Too little data
    to rank predictors: it shows the pipeline, the committed tables show the result."""
    from prescope.predict import accuracy, llapor, predictors

    if model is None or tokenizer is None:
        from prescope.models.tiny import load_tiny

        model, tokenizer = load_tiny()
    trace = tiny_trace("", num_prompts=num_prompts, max_new_tokens=max_new_tokens, keep_hidden=True,
                       keep_logits=True, model=model, tokenizer=tokenizer)
    heldout, train = trace.split_by_prompt(heldout_share, seed)
    pca_dim = min(SMALL_RUN_PCA_DIM, train.num_tokens // 2, train.layout.hidden_size)
    config = llapor.LLaPorConfig(distance=distance, max_epochs=max_epochs, pca_dim=max(1, pca_dim),
                                 width=SMALL_RUN_WIDTH, seed=seed)
    routers = predictors.LinearRouters.from_model(model)
    everyone = {"gate_lookahead": predictors.GateLookahead.from_model(model),
                "llapor": llapor.train_llapor(train, config, routers=routers, progress=False),
                **{p.name: p.fit(train) for p in (predictors.PreviousToken(), predictors.Popularity(),
                                                  predictors.Oracle())}}
    return accuracy.evaluate(everyone, heldout, range(1, distance + 1), batch_sizes=(), by_domain=False)
