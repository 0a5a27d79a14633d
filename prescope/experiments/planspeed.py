"""How fast PreSched plans: decode instances shaped as the prescope policy builds them, and the planning time
per layer on this machine's CPU (`python -m prescope.experiments.planspeed --bench`; the issue's target: median under
0.2 ms for E = 64, K = 8, D = 3), and the policies' whole host time per planned layer replaying a real trace, split
into PreSched's share and the policy's own (`--replay --batches 1,4,16`).

Measured with `--replay --steps 40 --batches 1,4,16` on the 2-core development CPU (not the H200 host), median µs
per planned layer of the policy's own work (all of `plan` but `presched.plan`), before (d1657cf's policies) and
after PreScope's planning inputs went over arrays (policies/window.py, 8f5dd50; the decisions are the same):
prescope[gate=False] 141 -> 85 (b1), 169 -> 107 (b4), 205 -> 139 (b16); ceiling[gate=False] 181 -> 113 (b1),
244 -> 152 (b4), 321 -> 202 (b16). Whole `plan` (PreSched included, sped up on main meanwhile): prescope 196 -> 135,
250 -> 182, 361 -> 255; ceiling 237 -> 164, 314 -> 220, 420 -> 299. Single runs on a shared machine: differences
under ~10 % are noise.

Then (b77dc95 -> policies/split.py's speed-ups: the split's search walked, cost tables kept across plans, victims
left out while free slots take every load, the window's absent experts from the cache's present grid; the same
decisions, `--decisions` and tests/experiments/test_planspeed.py), median of 3 interleaved runs of the same
command on the same 2-core CPU, whole `plan` per planned layer: prescope 134 -> 102 µs (b1), 183 -> 155 (b4),
258 -> 211 (b16); ceiling 164 -> 99, 219 -> 193, 302 -> 255. Part of b1's gain (victims left out) holds only
while the pool has free slots, as in these 40 steps' warm-up; with a full pool that layer's victims are built
(`--steps 120`, b1, the pool full for most of the run: prescope 129 -> 109 µs, ceiling 172 -> 161).

`--predictor Q.pt` (a routing-only LLaPor checkpoint, `--device` where it runs) feeds the prescope policy, whose
rows then give its forecast's median µs (`forecast_us`); `--threads 1` keeps torch's idle threads from spinning on a
shared CPU. Its figures are in `policies/predictive.py`'s docstring."""

from __future__ import annotations

from prescope.policies.presched import Candidate, Held, Instance, plan


def bench_instances(budget_share: float, count: int, *, num_layers: int = 16, num_experts: int = 64, top_k: int = 8,
                    lookahead: int = 3, hidden: int = 2048, intermediate: int = 1024, dtype_bytes: int = 2,
                    present: float = 0.75, in_flight: int = 4, profile: str = "h200", seed: int = 0) -> list[Instance]:
    """Decode instances shaped as the prescope policy builds them (defaults: OLMoE-1B-7B, L = 16, E = 64,
    K = 8, D = 3, on `profile`) with a full cache of budget_share·L·E slots, the same number per layer: of
    layer l's K routed experts (one token each) a share `present` is resident, the rest are misses; for
    l+1 … l+D, the inclusion probabilities of a skewed top-K router, whose 2·K likeliest absent experts are
    the candidates, after the `in_flight` likeliest of l+1, on the link; victims: the cheapest resident keys
    outside layer l, one per routed expert and candidate (a window key's chance is its prediction, another
    key's a random frequency)."""
    import functools
    import random

    from prescope.hardware import cost
    from prescope.hardware.profiles import load_profile

    prof, rng = load_profile(profile), random.Random(seed)
    L, E, K, D = num_layers, num_experts, top_k, lookahead
    load = cost.transfer_time(cost.expert_bytes(hidden, intermediate, dtype_bytes), prof)

    @functools.cache  # memoised across plans, as the policies hold their costs
    def gpu(n: float) -> float:
        return cost.gpu_expert_time(n, hidden, intermediate, dtype_bytes, prof)

    @functools.cache
    def cpu(n: float) -> float:
        return cost.cpu_expert_time(n, hidden, intermediate, dtype_bytes, prof)

    out = []
    for _ in range(count):
        layer = rng.randrange(L - D)
        cached = {(j, e) for j in range(L) if j != layer for e in rng.sample(range(E), round(budget_share * E))}
        experts = tuple(rng.sample(range(E), K))
        cached |= {(layer, e) for e in experts if rng.random() < present}
        inflight, predictions, compute, chance = {}, [], [], {}
        for d in range(1, D + 1):
            raw = [rng.lognormvariate(0.0, 2.0) for _ in range(E)]
            p = [min(1.0, K * x / sum(raw)) for x in raw]
            chance.update(((layer + d, e), p[e]) for e in range(E))
            absent = sorted((e for e in range(E) if (layer + d, e) not in cached), key=lambda e, p=p: -p[e])
            if d == 1:
                inflight = {(layer + 1, e): load * (i + 1) for i, e in enumerate(absent[:in_flight])}
            predictions.append(tuple(Candidate(e, p[e]) for e in absent[len(inflight) if d == 1 else 0:][:2 * K]))
            compute.append(sum(p) * gpu(1))
        victims = sorted((chance.get(key, rng.random() ** 2), key) for key in cached if key[0] != layer)
        held = tuple(Held(key, q) for q, key in victims[:K + sum(len(c) for c in predictions)])
        resident = frozenset(key for key in cached if layer <= key[0] <= layer + D)
        out.append(Instance(layer, experts, (1.0,) * K, tuple(predictions), load, gpu, cpu, resident=resident,
                            inflight=inflight, evictable=held, link_free=load * len(inflight), demand_free=0.0,
                            gap=prof.host_overhead_per_layer_s + prof.gpu_dense.fixed_s, compute=tuple(compute)))
    return out


def planning_time(budget_shares: tuple[float, ...] = (0.25, 0.5), count: int = 300, repeats: int = 5,
                  **shape) -> dict[float, dict[str, float]]:
    """Planning time per layer on this machine's CPU, per budget: the median and p90 over `count`
    `bench_instances` (`shape`: their keyword arguments) of each instance's best of `repeats` plans, in ms
    (the best of a few damps a busy machine's noise)."""
    import time

    result = {}
    for share in budget_shares:
        times = []
        for inst in bench_instances(share, count, **shape):
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                plan(inst)
                best = min(best, time.perf_counter() - start)
            times.append(best)
        times.sort()
        result[share] = {"median_ms": times[len(times) // 2] * 1e3, "p90_ms": times[int(0.9 * len(times))] * 1e3}
    return result


def replay_planning_time(trace, policies: tuple[str, ...] = ("prescope[gate=False]", "ceiling[gate=False]"),
                         batches: tuple[int, ...] = (1, 4), budget_share: float = 0.25, steps: int = 40,
                         profile: str = "h200", predictor=None) -> list[dict]:
    """The policies' host time per planned layer while the simulator replays `trace` (its decode cut in
    `batch` segments decoded together), on this machine's CPU: per policy and batch, the median and p90 of
    `policy.plan`'s wall time over the first `steps` forward calls, in µs, of PreSched's share of it
    (`presched.plan`) and of the rest (`own`: the policy's forecast, instance, victims and bookkeeping), and
    (`host_`, with its mean) of the layer's plan, `policy.victim` and `policy.plan_ahead` calls together (what the
    engine charges the policy per layer, `LayerRun.host_s`), with the simulated ms per token. `predictor`: what the prescope
    policies predict from (default: their memory of the previous step), with `forecast_us`, the median µs of
    its forecast per call (`Predictive._predicted`)."""
    import time

    import prescope.policies.presched as presched
    from prescope.policies import parse_policy
    from prescope.routing.segments import decode_segments
    from prescope.sim.simulator import replay

    def quantiles(times: list[float], name: str) -> dict[str, float]:
        times = sorted(times)
        return {f"{name}median_us": times[len(times) // 2] * 1e6, f"{name}p90_us": times[int(0.9 * len(times))] * 1e6}

    rows, planner = [], presched.plan
    for spec in policies:
        for batch in batches:
            parsed = parse_policy(spec)
            policy, times, inside, forecasts, victims = _policy(parsed, predictor), [], [], [], []
            plan, victim, predicted = policy.plan, policy.victim, getattr(policy, "_predicted", None)

            def timed_forecast(*args, predicted=predicted, forecasts=forecasts):
                start = time.perf_counter()
                out = predicted(*args)
                forecasts.append(time.perf_counter() - start)
                return out

            def timed(view, cache, plan=plan, times=times, inside=inside, victims=victims):
                inside.append(0.0)
                victims.append(0.0)
                start = time.perf_counter()
                orders = plan(view, cache)
                times.append(time.perf_counter() - start)
                return orders

            def timed_victim(cache, key, victim=victim, victims=victims):
                start = time.perf_counter()
                slot = victim(cache, key)
                victims[-1] += time.perf_counter() - start
                return slot

            def timed_ahead(view, cache, ahead=policy.plan_ahead, victims=victims):  # late_prefetch's window plan
                start = time.perf_counter()
                keys = ahead(view, cache)
                victims[-1] += time.perf_counter() - start
                return keys

            def timed_planner(inst, inside=inside):
                start = time.perf_counter()
                out = planner(inst)
                inside[-1] += time.perf_counter() - start
                return out

            policy.plan, policy.victim, policy.plan_ahead = timed, timed_victim, timed_ahead
            if predicted is not None:
                policy._predicted = timed_forecast
            cut = decode_segments(trace, batch) if batch > 1 else trace
            presched.plan = timed_planner  # the policies call it through the module
            try:
                result = replay(cut, policy, profile, budget_share=budget_share, batch_size=batch, max_steps=steps)
            finally:
                presched.plan = planner
            own = [t - p for t, p in zip(times, inside, strict=True)]
            host = [t + v for t, v in zip(times, victims, strict=True)]
            rows.append({"policy": spec, "batch": batch, "budget_share": budget_share, "profile": profile,
                         "layers": len(times), **quantiles(times, ""), **quantiles(own, "own_"),
                         **quantiles(inside, "presched_"), **quantiles(host, "host_"),
                         "host_mean_us": sum(host) / len(host) * 1e6,
                         **({"forecast_us": sorted(forecasts)[len(forecasts) // 2] * 1e6} if forecasts else {}),
                         "simulated_ms_per_token": result.totals["mean_token_latency_s"] * 1e3})
    return rows


def replay_decisions(trace, policies: tuple[str, ...] = ("prescope[gate=False]", "ceiling[gate=False]"),
                     batches: tuple[int, ...] = (1, 4, 16), budget_shares: tuple[float, ...] = (0.25,),
                     steps: int = 3, profile: str = "h200", predictor=None, victims: bool = False) -> list[dict]:
    """What the policies decide while the simulator replays `trace` (as `replay_planning_time` replays it), to
    check that a faster planner decides the same: per policy, batch and budget, every `plan` call's orders
    (step, layer, GPU experts, CPU experts, prefetches) and the victims it named for its loads (`planned`, where
    the policy keeps them), with `victims` also the slot each of the layer's `victim` calls gave (for the
    policies that choose victims there), and what `plan_ahead` returned where it returned prefetches
    (`late_prefetch`), with their SHA-256 (`digest`) and count. `predictor`: as
    `replay_planning_time`'s."""
    import hashlib
    import json

    from prescope.policies import parse_policy
    from prescope.routing.segments import decode_segments
    from prescope.sim.simulator import replay

    rows = []
    for spec in policies:
        for batch in batches:
            for share in budget_shares:
                parsed = parse_policy(spec)
                policy, decisions = _policy(parsed, predictor), []
                plan = policy.plan

                def recorded(view, cache, plan=plan, decisions=decisions, policy=policy):
                    orders = plan(view, cache)
                    decisions.append([view.step, view.layer, orders.gpu, orders.cpu, orders.prefetch,
                                      sorted(getattr(policy, "planned", {}).items())] + [[]] * victims)
                    return orders

                def chosen(cache, key, victim=policy.victim, decisions=decisions):
                    slot = victim(cache, key)
                    decisions[-1][-1].append([key, slot])
                    return slot

                aheads = []  # plan_ahead's prefetches and the victims named for them (late_prefetch), by plan

                def ahead(view, cache, plan_ahead=policy.plan_ahead, aheads=aheads, policy=policy):
                    keys = plan_ahead(view, cache)
                    if keys:
                        aheads.append([view.step, view.layer, keys, sorted(getattr(policy, "planned", {}).items())])
                    return keys

                policy.plan, policy.plan_ahead = recorded, ahead
                if victims:
                    policy.victim = chosen
                cut = decode_segments(trace, batch) if batch > 1 else trace
                replay(cut, policy, profile, budget_share=share, batch_size=batch, max_steps=steps)
                digest = hashlib.sha256(json.dumps([decisions, aheads] if aheads else decisions).encode()).hexdigest()
                rows.append({"policy": spec, "batch": batch, "budget_share": share, "steps": steps,
                             "plans": len(decisions), "digest": digest, "decisions": decisions})
    return rows


def _policy(parsed, predictor):
    """The policy `parsed` names, fed `predictor` where it is a prescope policy and one is given."""
    from prescope.policies import make_policy

    runtime = {"predictor": predictor} if predictor is not None and parsed.name == "prescope" else {}
    return make_policy(parsed.name, **runtime, **parsed.options)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m prescope.experiments.planspeed", description="PreSched planning speed")
    parser.add_argument("--bench", action="store_true", help="print planning time per layer (E=64, K=8, D=3)")
    parser.add_argument("--count", type=int, default=300, help="instances per budget")
    parser.add_argument("--repeats", type=int, default=5, help="plans per instance (the best counts)")
    parser.add_argument("--replay", action="store_true", help="print the prescope and ceiling policies' planning "
                        "time per layer replaying the shipped Qwen3-30B-A3B trace (25 %% budget, at --batches)")
    parser.add_argument("--policies", default="prescope[gate=False];ceiling[gate=False]", help="policies replayed, "
                        "separated by ';' (--replay; e.g. 'belady;activation_matrix;hybrid')")
    parser.add_argument("--steps", type=int, default=40, help="forward calls replayed per cell (--replay)")
    parser.add_argument("--batches", default="1,4", help="batch sizes replayed, comma-separated (--replay; "
                        "e.g. 1,4,16,64)")
    parser.add_argument("--decisions", action="store_true", help="print the digest of every decision the policies "
                        "make replaying the shipped Qwen3-30B-A3B trace (--steps, --batches; budgets 25 %% and 10 %%), "
                        "to compare planners")
    parser.add_argument("--predictor", help="a routing-only LLaPor checkpoint the prescope policy predicts from "
                        "(--replay, --decisions; default: its memory of the previous step)")
    parser.add_argument("--device", default="cpu", help="where --predictor runs (cpu, cuda)")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (1 on a small shared CPU: idle threads "
                        "spin-wait for a busy core, and a network forward on the CPU then takes milliseconds)")
    args = parser.parse_args()
    if args.threads is not None:
        import torch

        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.replay or args.decisions:
        from prescope.data import shipped
        from prescope.routing.llamacpp import load_llamacpp_trace

        qwen3 = load_llamacpp_trace(shipped("routing", "qwen3-30b-a3b.route.csv"))
        try:
            batches = tuple(int(b) for b in args.batches.split(","))
        except ValueError:
            parser.error(f"--batches takes comma-separated integers, got {args.batches!r}")
        if not batches or min(batches) < 1:
            parser.error(f"--batches must be >= 1, got {args.batches!r}")
        predictor = None
        if args.predictor:
            from prescope.predict.routellapor import load_predictor

            predictor = load_predictor(args.predictor, device=args.device)
        if args.decisions:
            for row in replay_decisions(qwen3, batches=batches, budget_shares=(0.25, 0.1), steps=args.steps,
                                        predictor=predictor):
                print(json.dumps({"replay": "qwen3-30b-a3b", "simulated": True,
                                  **{k: v for k, v in row.items() if k != "decisions"}}))
        else:
            policies = tuple(p.strip() for p in args.policies.split(";") if p.strip())
            for row in replay_planning_time(qwen3, policies=policies, batches=batches, steps=args.steps,
                                            predictor=predictor):
                print(json.dumps({"replay": "qwen3-30b-a3b", "simulated": True, "measured_on": "this CPU",
                                  **{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}}))
    elif args.bench:
        for share, t in planning_time(count=args.count, repeats=args.repeats).items():
            print(json.dumps({"bench": "presched.plan", "E": 64, "K": 8, "D": 3, "budget_share": share,
                              **{k: round(v, 4) for k, v in t.items()}}))
    else:
        parser.print_help()
