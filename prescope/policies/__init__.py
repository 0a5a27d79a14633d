"""Offloading policies: what each MoE layer runs where, what to prefetch, what to evict.

- `base`: the interface every executor runs (`Policy.plan`, `Policy.victim`, `LayerView`, `Orders`, `Costs`),
  typed options (`PolicyOptions`) and the two prediction-free policies;
- `cache`: the GPU slot bookkeeping a policy reads and the executors update;
- `protocol`: one MoE layer's steps, written once for both executors (the engine, the simulator);
- `peers`: the prediction-driven policies (the peers' systems, PreScope), on `predictive`; `window`: PreScope's
  planning inputs over arrays (the window's forecast, candidates, expected compute, cheapest victims); `lateplan`:
  PreScope's `late_prefetch` (the split before a layer's launch, the window's prefetches once its kernels are enqueued);
- `limits`: what knowing the step's future buys: `belady` (true future, Belady's eviction; results before it
  was renamed call it `oracle`) and `ceiling` (PreScope with perfect prediction);
- `presched`: PreSched, the cross-layer planner, a pure function; `objective`: J of any plan, the reference it is
  tested against; `reliability`: online calibration.

`POLICIES` names every policy; `make_policy(name, **options)` builds one; `parse_policy("name[k=v,...]+sync+cpu1")`
reads a policy as the command line and result files name it (`+sync` and `+cpuN` set the engine, not the policy);
`current_name` reads a name of earlier results (`oracle` -> `belady`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from prescope.policies.base import CpuMisses, OnDemandLRU, Policy, PolicyError
from prescope.policies.limits import LEGACY_NAMES, Belady, Ceiling
from prescope.policies.peers import ActivationMatrixPolicy, Hybrid, LookaheadPrefetch, PreScope

POLICIES: dict[str, Callable[..., Policy]] = {cls.name: cls for cls in (
    OnDemandLRU, CpuMisses, Hybrid, LookaheadPrefetch, ActivationMatrixPolicy, PreScope, Belady, Ceiling)}
LIMITS = (Belady.name, Ceiling.name)  # the policies that know the step's future (no system can run them)
SYNC = "+sync"  # AsyncIO off: every copy issued at once, first come first served
CPU_WORKERS = re.compile(r"\+cpu(\d+)$")  # `+cpuN`: the engine computes CPU experts on N threads at once
CALIBRATED = "+cal"  # the name results of earlier versions give `prescope[calibrate=True]`


def current_name(text: str) -> str:
    """A policy name as results of earlier versions wrote it, in today's words: `oracle` (and `oracle+sync`,
    `oracle[...]`) -> `belady`; any other name unchanged."""
    for old, new in LEGACY_NAMES.items():
        if text == old or text.startswith((old + "[", old + "+")):
            return new + text[len(old):]
    return text


def make_policy(name: str, **options) -> Policy:
    """The policy registered as `name` (or as an earlier name of it, `current_name`), built with `options` (a
    predictor, and its `options_type` fields)."""
    name = current_name(name)
    if name not in POLICIES:
        raise PolicyError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](**options)


@dataclass(frozen=True)
class PolicySpec:
    """A policy as the command line and result files name it: `name[key=value,...]`, `+sync` for AsyncIO off,
    `+cpuN` for the engine's CPU experts on N worker threads (`EngineConfig.cpu_workers`)."""

    name: str
    options: dict = field(default_factory=dict)
    async_io: bool | None = None  # None: the policy's own choice; False: `+sync`
    cpu_workers: int | None = None  # None: the engine's default; N: `+cpuN`

    @property
    def is_variant(self) -> bool:
        """An ablation of the policy (options, AsyncIO or the CPU workers changed), not a contender of its own."""
        return bool(self.options) or self.async_io is not None or self.cpu_workers is not None

    @property
    def engine_options(self) -> dict:
        """What the name sets of the engine rather than the policy: `EngineConfig`'s async_io and cpu_workers."""
        return {"async_io": self.async_io, "cpu_workers": self.cpu_workers or 0}

    def build(self, **runtime) -> Policy:
        """The policy object; `runtime` adds what a name cannot carry (a predictor)."""
        return make_policy(self.name, **runtime, **self.options)

    def __str__(self) -> str:
        inside = ",".join(f"{k}={v!r}" for k, v in self.options.items())
        return (self.name + (f"[{inside}]" if inside else "") + (SYNC if self.async_io is False else "")
                + (f"+cpu{self.cpu_workers}" if self.cpu_workers is not None else ""))


def parse_policy(text: str) -> PolicySpec:
    """`prescope[window_reuse=False, lookahead=2]+sync` -> PolicySpec; options are Python literals, checked
    against the policy's option types; `+sync` and `+cpuN` may follow in either order; an earlier name reads as
    today's (`oracle` -> `belady`); a clear PolicyError for anything else."""
    rest, sync, workers = text.strip(), False, None
    while True:  # the engine's suffixes, each at most once
        if rest.endswith(SYNC) and not sync:
            rest, sync = rest[: -len(SYNC)], True
        elif workers is None and (found := CPU_WORKERS.search(rest)):
            rest, workers = rest[: found.start()], int(found.group(1))
        else:
            break
    if workers == 0:
        raise PolicyError(f"{text!r}: +cpuN needs N >= 1 CPU-expert threads")
    rest = current_name(rest.strip())
    calibrated = rest.endswith(CALIBRATED)
    rest = rest[: -len(CALIBRATED)] if calibrated else rest
    name, bracket, inside = rest.partition("[")
    name, options = name.strip(), {}
    if name not in POLICIES:
        raise PolicyError(f"{text!r}: unknown policy {name!r}; choose one of {sorted(POLICIES)}, optionally with "
                          f"[key=value,...], {SYNC} and +cpuN")
    if bracket:
        if not inside.endswith("]") or "[" in inside[:-1]:
            raise PolicyError(f"{text!r}: options go in one bracket at the end of the name, as name[k=v,...]")
        for item in filter(str.strip, inside[:-1].split(",")):
            key, eq, value = (part.strip() for part in item.partition("="))
            try:
                if not eq or not key.isidentifier():
                    raise ValueError(item)
                options[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise PolicyError(f"{text!r}: option {item.strip()!r} is not key=<Python literal>") from None
    if calibrated:
        if name != PreScope.name:
            raise PolicyError(f"{text!r}: {CALIBRATED} applies to prescope only")
        options["calibrate"] = True
    options_type = POLICIES[name].options_type
    unknown = sorted(set(options) - set(options_type.names()))
    if unknown:
        raise PolicyError(f"{text!r}: unknown option(s) {unknown}; {name}'s options: "
                          f"{', '.join(options_type.names()) or 'none'}")
    options_type(**options)  # types and ranges, checked now rather than when the policy is built
    return PolicySpec(name, options, False if sync else None, workers)
