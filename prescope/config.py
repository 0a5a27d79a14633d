"""Typed configuration of an offloaded run; CLI options and notebook parameters use these field names.

Also the checks every frozen config of the package shares: `check_types` (each field's value has the
type its annotation names: "0.5" is no share, 1.5e6 no byte count, True no number) and `check_device`
(a CUDA device this machine can give, asked before any work).
"""

from __future__ import annotations

import functools
import math
import numbers
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

TIMING_MODES = ("full", "steps", "off")
IO_CHUNK_BYTES = 32 << 20  # AsyncIO's largest single copy, in the engine and in the simulator's priority link
CUDA_PREFIX = "cuda"


def _type_name(kind: Any) -> str:
    if kind is type(None):
        return "None"
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(k) for k in typing.get_args(kind))
    if origin is not None:
        return str(kind).replace("typing.", "")
    return {int: "an int", float: "a finite number", bool: "a bool (True/False)", str: "a string"}.get(
        kind, getattr(kind, "__name__", str(kind)))


def _conforms(value: Any, kind: Any) -> tuple[bool, Any]:
    """(does `value` have type `kind`, the value to keep: a list becomes the tuple a tuple field asks for)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True, value
    if kind is type(None):
        return value is None, value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            ok, kept = _conforms(value, option)
            if ok:
                return True, kept
        return False, value
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool), value
    if kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        return ok, value
    if kind is Path:
        return isinstance(value, (str, Path)), value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False, value
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return False, value
        kept = [_conforms(v, k) for v, k in zip(value, items, strict=True)]
        return all(ok for ok, _ in kept), tuple(v for _, v in kept)
    if origin in (dict, list):
        return isinstance(value, origin), value
    return (isinstance(value, kind), value) if isinstance(kind, type) else (True, value)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_types(config: Any, error: type[Exception] = ValueError) -> None:
    """Raise `error` naming every field of the dataclass `config` whose value lacks its annotated type (see
    `_conforms`: ints for int, finite non-bool numbers for float, bools for bool, strings for str); lists
    given for tuple fields are kept as tuples. Call it first in a frozen config's `__post_init__`."""
    hints = _hints(type(config))
    wrong = []
    for f in fields(config):
        value = getattr(config, f.name)
        ok, kept = _conforms(value, hints[f.name])
        if not ok:
            wrong.append(f"{f.name} must be {_type_name(hints[f.name])}, got {value!r} ({type(value).__name__})")
        elif kept is not value:
            object.__setattr__(config, f.name, kept)
    if wrong:
        raise error(f"{type(config).__name__}: " + "; ".join(wrong))


def check_device(device: str) -> None:
    """Refuse a CUDA device this machine cannot give (torch built without CUDA, no GPU, no such index) with
    one line naming what is there, before any work; "cpu", "auto" and other devices pass."""
    if not isinstance(device, str) or not device.startswith(CUDA_PREFIX):
        return
    import torch

    if not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {device!r}: {why} on this machine; use --device cpu (or run on a GPU machine)")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine offloads one model.

    policy: name of the offloading policy (see `prescope.policies.POLICIES`).
    budget_share: share of all routed experts (L·E) the GPU slot pool holds; ignored if budget_bytes is set.
    budget_bytes: GPU bytes for expert slots; the slot count is budget_bytes // bytes per expert.
    device: "cuda", "cuda:N", "cpu" or "auto" (CUDA when available). On "cpu" the engine runs its CPU twin:
        the same orders, copies between host tensors, wall-clock times.
    cpu_workers: threads computing CPU-placed experts (0: half the cores, at least one).
    timing: "full" records every transfer and kernel (events cost host time), "steps" only step
        boundaries, "off" nothing.
    pin_memory: keep expert weights in pinned host memory (falls back to pageable, with a warning, where
        pinning is refused).
    profile: hardware profile (built-in name or JSON path) whose cost model cost-aware policies weigh.
    async_io: issue copies through AsyncIO's I/O worker (prescope.engine.transfers: priority queue, chunks);
        None lets the policy choose (`prescope`, `belady` and `ceiling` ask for it), False issues every copy at once
        on the copy stream, first come first served, as the peers' systems do.
    io_chunk_bytes: AsyncIO's largest single copy; an on-demand load overtakes queued prefetches at a
        chunk boundary.
    io_depth: AsyncIO's chunks issued ahead of the copy engine (more keeps the link busier while the host
        is busy; fewer lets an on-demand load overtake sooner).
    compile_segments: run the decode steps of `engine.generate` with every decoder layer's non-expert part
        compiled by `torch.compile` (inductor; the experts' call a graph break, `models.compiled`), before the
        step's CUDA graphs are captured; where compiling cannot run here the run stays uncompiled and says why.
    switch_interval_s: the interpreter's thread switch interval (`sys.setswitchinterval`) while `generate` runs;
        None keeps Python's (5 ms). The AsyncIO worker and the CPU-expert threads need the GIL between their
        copies and kernels, and a thread asking for it waits up to this long while the compute thread runs
        Python (planning); a shorter interval hands it over sooner at the cost of more switches.
    """

    policy: str = "on_demand_lru"
    budget_share: float = 0.25
    budget_bytes: int | None = None
    device: str = "auto"
    cpu_workers: int = 0
    timing: str = "full"
    pin_memory: bool = True
    profile: str = "h200"
    async_io: bool | None = None
    io_chunk_bytes: int = IO_CHUNK_BYTES
    io_depth: int = 3
    compile_segments: bool = False
    switch_interval_s: float | None = None

    def __post_init__(self) -> None:
        check_types(self)
        if self.switch_interval_s is not None and not 0.0 < self.switch_interval_s <= 1.0:
            raise ValueError(f"switch_interval_s must be in (0, 1] seconds, got {self.switch_interval_s}")
        if not 0.0 < self.budget_share <= 1.0:
            raise ValueError(f"budget_share must be in (0, 1], got {self.budget_share}")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {self.budget_bytes}")
        if self.timing not in TIMING_MODES:
            raise ValueError(f"timing must be one of {TIMING_MODES}, got {self.timing!r}")
        if self.cpu_workers < 0:
            raise ValueError(f"cpu_workers must be >= 0, got {self.cpu_workers}")
        if self.io_chunk_bytes < 1 or self.io_depth < 1:
            raise ValueError(f"io_chunk_bytes and io_depth must be >= 1, got {self.io_chunk_bytes}, {self.io_depth}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    def to_dict(self) -> dict:
        return asdict(self)
