"""Hardware profiles: the measured or published constants that the cost model turns into times.

A `HardwareProfile` describes one machine: the host-to-device link (a pinned and a pageable bandwidth
curve over transfer size, plus a per-transfer latency), the GPU (a roofline with a launch floor for
expert and dense/attention work), the host CPU (a linear cost per dtype for experts run on the CPU),
and the host's own per-layer overhead. Profiles live as JSON: built-ins under `prescope/assets/profiles/`,
others wherever `calibrate` writes them. The formulas that use these constants are in `cost.py`;
the functions that fit them to measurements are here, beside the models they fit.

Units: bytes, seconds, GB/s = 1e9 bytes/s, TFLOP/s = 1e12 FLOP/s.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from prescope.files import read_json, read_json_bytes, write_json

SOURCES = ("measured", "published", "calibrated")
BUILTIN_DIR = "assets/profiles"  # package data folder inside `prescope`
GB = 1e9
TERA = 1e12
# Stands for "this term costs nothing" (a bandwidth or FLOP rate), since JSON has no infinity.
NEGLIGIBLE_RATE = 1e9
# Fields a profile may leave out (null): the older behaviour holds without them.
OPTIONAL_FIELDS = ("gpu_grouped", "host_device_driven_per_layer_s")


class ProfileError(ValueError):
    """A hardware profile (or the file holding it) is missing fields or has invalid values."""


def _is_number(value: Any) -> bool:
    """A real number and not a boolean (JSON's `true` is no bandwidth) nor text (\"55\" is no bandwidth)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _number(what: str, value: Any) -> float:
    if not _is_number(value):
        raise ProfileError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


@dataclass(frozen=True)
class BandwidthCurve:
    """Bandwidth as a function of transfer size: points (bytes, GB/s), interpolated in log-size.

    The bandwidth is net of the profile's per-transfer latency, so that
    `latency + n / bandwidth(n)` reproduces the measured time of one copy of n bytes.
    Outside the measured range the nearest end point holds.
    """

    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        try:
            pts = tuple((_number("bandwidth curve size", b), _number("bandwidth curve GB/s", g)) for b, g in self.points)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ProfileError):
                raise
            raise ProfileError(f"bandwidth curve points must be (bytes, GB/s) pairs, got {self.points!r}") from None
        if not pts:
            raise ProfileError("bandwidth curve needs at least one (bytes, GB/s) point")
        sizes = [b for b, _ in pts]
        if any(b <= 0 or g <= 0 or not math.isfinite(b) or not math.isfinite(g) for b, g in pts):
            raise ProfileError(f"bandwidth curve points must be positive and finite, got {pts}")
        if any(b2 <= b1 for b1, b2 in itertools.pairwise(sizes)):
            raise ProfileError(f"bandwidth curve sizes must strictly increase, got {sizes}")
        object.__setattr__(self, "points", pts)

    def gbps(self, nbytes: float) -> float:
        """Bandwidth in GB/s for one transfer of `nbytes`, linear in log(bytes) between points."""
        sizes = np.log([b for b, _ in self.points])
        rates = [g for _, g in self.points]
        return float(np.interp(math.log(max(nbytes, 1.0)), sizes, rates))

    @property
    def peak_gbps(self) -> float:
        return max(g for _, g in self.points)

    def scaled(self, factor: float) -> BandwidthCurve:
        return BandwidthCurve(tuple((b, g * factor) for b, g in self.points))


@dataclass(frozen=True)
class ComputeModel:
    """Constants of one compute path: a fixed term, a memory bandwidth and a FLOP rate.

    How they combine depends on the device and is stated by the function that uses them
    (`cost.gpu_time`: a roofline with a launch floor; `cost.cpu_time`: a sum, linear in tokens).
    """

    fixed_s: float
    mem_gbps: float
    tflops: float

    def __post_init__(self) -> None:
        for name in ("fixed_s", "mem_gbps", "tflops"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ProfileError(f"compute model field {name!r} must be a finite number, got {value!r}")
        if self.fixed_s < 0 or self.mem_gbps <= 0 or self.tflops <= 0:
            raise ProfileError(
                f"compute model needs fixed_s >= 0, mem_gbps > 0, tflops > 0; got {self}"
            )


@dataclass(frozen=True)
class GroupedKernelModel:
    """Constants of an engine that runs one grouped expert kernel per wave (all of a wave's experts in one
    launch over the slot pool) instead of one kernel pair per expert: a fixed cost per wave (the launch and
    the routing, gating and combine kernels around it), a fixed cost per expert in the wave (its tiles'
    start-up), and a roofline over the wave's bytes and FLOPs (`cost.gpu_wave_time`)."""

    wave_fixed_s: float
    expert_fixed_s: float
    mem_gbps: float
    tflops: float

    def __post_init__(self) -> None:
        for name in ("wave_fixed_s", "expert_fixed_s", "mem_gbps", "tflops"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ProfileError(f"grouped kernel field {name!r} must be a finite number, got {value!r}")
        if self.wave_fixed_s < 0 or self.expert_fixed_s < 0 or self.mem_gbps <= 0 or self.tflops <= 0:
            raise ProfileError(f"grouped kernel model needs fixed costs >= 0, mem_gbps > 0, tflops > 0; got {self}")


@dataclass(frozen=True)
class HardwareProfile:
    """Everything the cost model needs to know about one machine.

    source: "measured" | "published" (an estimate from datasheets) | "calibrated" (by `calibrate`);
    citation, date and source_files say where the numbers come from. pinned_h2d / pageable_h2d and
    transfer_latency_s: the link. gpu_expert / gpu_dense: roofline constants of one expert call and
    of one layer's non-expert work. cpu_expert: a linear CPU model per dtype name. host_overhead_per_layer_s:
    Python and launch time per decoder layer (the host-bound regime); predict_overhead_s and
    plan_overhead_s: one predictor call and one planner call; host_per_transfer_s: host time to issue one
    expert transfer (the engine's Python, stream and event calls; 0 where not measured). fit: the fits' RMS log errors;
    measurements: the raw points the fits came from.
    gpu_grouped (optional): the engine runs one grouped expert kernel per wave (`GroupedKernelModel`); absent,
    each expert is its own kernel (`gpu_expert`). host_device_driven_per_layer_s (optional): the host's time per
    MoE layer when every expert is resident and the step runs without the host between layers (one CUDA
    graph); absent, host_overhead_per_layer_s holds there too.
    """

    name: str
    description: str
    source: str
    citation: str
    gpu: str
    cpu: str
    date: str
    pinned_h2d: BandwidthCurve
    pageable_h2d: BandwidthCurve
    transfer_latency_s: float
    gpu_expert: ComputeModel
    gpu_dense: ComputeModel
    cpu_expert: dict[str, ComputeModel]
    host_overhead_per_layer_s: float
    predict_overhead_s: float
    plan_overhead_s: float
    host_per_transfer_s: float = 0.0
    gpu_grouped: GroupedKernelModel | None = None
    host_device_driven_per_layer_s: float | None = None
    source_files: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    fit: dict[str, Any] = field(default_factory=dict)
    measurements: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("name", "description", "citation", "gpu", "cpu", "date"):
            if not isinstance(getattr(self, name), str):
                raise ProfileError(f"profile field {name!r} must be a string, got {getattr(self, name)!r}")
        if not self.name.strip():
            raise ProfileError("profile field 'name' must not be empty")
        if self.source not in SOURCES:
            raise ProfileError(f"profile field 'source' must be one of {SOURCES}, got {self.source!r}")
        for name in ("transfer_latency_s", "host_overhead_per_layer_s", "predict_overhead_s", "plan_overhead_s",
                     "host_per_transfer_s"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ProfileError(f"profile field {name!r} must be a finite number >= 0, got {value!r}")
        value = self.host_device_driven_per_layer_s
        if value is not None and (not _is_number(value) or not math.isfinite(value) or value < 0):
            raise ProfileError(f"profile field 'host_device_driven_per_layer_s' must be a finite number >= 0 or "
                               f"null, got {value!r}")
        if self.gpu_grouped is not None and not isinstance(self.gpu_grouped, GroupedKernelModel):
            raise ProfileError(f"profile field 'gpu_grouped' must be a GroupedKernelModel or null, got "
                               f"{self.gpu_grouped!r}")
        if not isinstance(self.cpu_expert, dict) or not self.cpu_expert:
            raise ProfileError("profile field 'cpu_expert' needs at least one dtype entry, e.g. 'bfloat16'")
        for name, kind in (("pinned_h2d", BandwidthCurve), ("pageable_h2d", BandwidthCurve),
                           ("gpu_expert", ComputeModel), ("gpu_dense", ComputeModel)):
            if not isinstance(getattr(self, name), kind):
                raise ProfileError(f"profile field {name!r} must be a {kind.__name__}, got {getattr(self, name)!r}")
        bad = {k: v for k, v in self.cpu_expert.items() if not isinstance(k, str) or not isinstance(v, ComputeModel)}
        if bad:
            raise ProfileError(f"profile field 'cpu_expert' maps dtype names to ComputeModels, got {bad!r}")
        for name in ("source_files", "notes"):
            items = getattr(self, name)
            if isinstance(items, str) or not all(isinstance(x, str) for x in items):
                raise ProfileError(f"profile field {name!r} must be a list of strings, got {items!r}")
        for name in ("fit", "measurements"):
            if not isinstance(getattr(self, name), dict):
                raise ProfileError(f"profile field {name!r} must be an object, got {getattr(self, name)!r}")
        object.__setattr__(self, "source_files", tuple(self.source_files))
        object.__setattr__(self, "notes", tuple(self.notes))

    def host_per_layer(self, device_driven: bool = False) -> float:
        """The host's time per MoE layer: `host_device_driven_per_layer_s` where every expert is resident
        and the profile has it, else `host_overhead_per_layer_s`."""
        if device_driven and self.host_device_driven_per_layer_s is not None:
            return self.host_device_driven_per_layer_s
        return self.host_overhead_per_layer_s

    def cpu_model(self, dtype: str) -> ComputeModel:
        if dtype not in self.cpu_expert:
            raise ProfileError(
                f"profile {self.name!r} has no CPU expert model for dtype {dtype!r}; "
                f"it has {sorted(self.cpu_expert)}"
            )
        return self.cpu_expert[dtype]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["pinned_h2d"] = [list(p) for p in self.pinned_h2d.points]
        out["pageable_h2d"] = [list(p) for p in self.pageable_h2d.points]
        out["source_files"] = list(self.source_files)
        out["notes"] = list(self.notes)
        for name in OPTIONAL_FIELDS:  # absent where unset, so that older files and readers see what they knew
            if out[name] is None:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "profile") -> HardwareProfile:
        if not isinstance(data, dict):
            raise ProfileError(f"{where}: expected a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        unknown = sorted(set(data) - set(fields))
        if missing or unknown:
            raise ProfileError(f"{where}: missing field(s) {missing}, unknown field(s) {unknown}")
        kwargs, key = dict(data), ""
        try:
            for key in ("pinned_h2d", "pageable_h2d"):
                kwargs[key] = BandwidthCurve(tuple(tuple(p) for p in data[key]))
            for key in ("gpu_expert", "gpu_dense"):
                kwargs[key] = ComputeModel(**data[key])
            key = "gpu_grouped"
            if data.get(key) is not None:
                if not isinstance(data[key], dict):
                    raise ProfileError(f"must be an object of {[f.name for f in dataclasses.fields(GroupedKernelModel)]}"
                                       f" or null, got {data[key]!r}")
                kwargs[key] = GroupedKernelModel(**data[key])
            key = "cpu_expert"
            if not isinstance(data[key], dict):
                raise ProfileError(f"field 'cpu_expert' must map dtype names to compute models, got {data[key]!r}")
            kwargs[key] = {k: ComputeModel(**v) for k, v in data[key].items()}
            key = ""
            return cls(**kwargs)
        except ProfileError as exc:
            raise ProfileError(f"{where}: " + (f"field {key!r}: " if key else "") + str(exc)) from None
        except (TypeError, AttributeError, ValueError) as exc:
            raise ProfileError(f"{where}: malformed field value" + (f" in {key!r}" if key else "") + f" ({exc})") from None


def list_profiles() -> list[str]:
    """Names of the built-in profiles shipped with the package."""
    folder = resources.files("prescope") / BUILTIN_DIR
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def load_profile(name_or_path: str | os.PathLike | HardwareProfile) -> HardwareProfile:
    """A built-in profile by name (`h200`, `h200-graphs`, `a100-pcie4`, `v100-pcie3`) or a profile JSON file by
    path. `h200-graphs` is `h200` refitted to the fast engine's bench runs (`experiments.refit`)."""
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"no profile file at {path}")
        try:
            data = read_json(path, "profile JSON")
        except ProfileError:
            raise
        except ValueError as exc:  # not JSON, not an object, or a checksum that does not match
            raise ProfileError(str(exc)) from None
        return HardwareProfile.from_dict(data, str(path))
    if str(name_or_path) not in list_profiles():
        raise ProfileError(
            f"unknown profile {str(name_or_path)!r}: not a file, and not one of the built-ins {list_profiles()}"
        )
    resource = resources.files("prescope") / BUILTIN_DIR / f"{name_or_path}.json"
    where = f"built-in profile {name_or_path!r}"
    try:
        data = read_json_bytes(resource.read_bytes(), where, "profile JSON")
    except ValueError as exc:
        raise ProfileError(str(exc)) from None
    return HardwareProfile.from_dict(data, where)


def save_profile(profile: HardwareProfile, path: str | os.PathLike) -> Path:
    """Write `profile` as JSON, atomically and checksummed (`files.write_json`)."""
    return write_json(path, profile.to_dict())


def scale_profile(profile: HardwareProfile, *, name: str, link_gbps: float | None = None,
                  gpu_mem_ratio: float = 1.0, gpu_flops_ratio: float = 1.0,
                  **changes: Any) -> HardwareProfile:
    """A what-if copy of `profile`: link curves rescaled so the pinned peak is `link_gbps`
    (pageable scaled by the same factor), GPU bandwidth and FLOP rate multiplied by the ratios
    (launch floors kept), other fields replaced by `changes`. Raw measurements are dropped."""
    if gpu_mem_ratio <= 0 or gpu_flops_ratio <= 0:
        raise ProfileError(f"GPU ratios must be > 0, got mem {gpu_mem_ratio}, flops {gpu_flops_ratio}")
    link = 1.0 if link_gbps is None else link_gbps / profile.pinned_h2d.peak_gbps
    if link <= 0:
        raise ProfileError(f"link_gbps must be > 0, got {link_gbps}")

    def gpu(m: ComputeModel) -> ComputeModel:
        return ComputeModel(m.fixed_s, m.mem_gbps * gpu_mem_ratio, m.tflops * gpu_flops_ratio)

    grouped = profile.gpu_grouped
    if grouped is not None:
        grouped = dataclasses.replace(grouped, mem_gbps=grouped.mem_gbps * gpu_mem_ratio,
                                      tflops=grouped.tflops * gpu_flops_ratio)
    base = dict(name=name, pinned_h2d=profile.pinned_h2d.scaled(link),
                pageable_h2d=profile.pageable_h2d.scaled(link), gpu_expert=gpu(profile.gpu_expert),
                gpu_dense=gpu(profile.gpu_dense), gpu_grouped=grouped, measurements={}, fit={})
    return dataclasses.replace(profile, **{**base, **changes})


# ---- fitting the models to measurements ---------------------------------------------------------


def fit_transfer_curve(sizes: list[float], seconds: list[float],
                       latency_s: float | None = None) -> tuple[float, BandwidthCurve]:
    """Per-transfer latency and the bandwidth curve net of it, from timed copies of `sizes` bytes.

    Latency, when not measured directly, is the intercept at 0 bytes of the line through the two
    smallest sizes, t = latency + n / B, clamped to [0, smallest time). Each point's bandwidth is
    then n / (t - latency), so `latency + n / curve(n)` reproduces every measured time.
    """
    if len(sizes) != len(seconds) or not sizes:
        raise ProfileError(f"need matching, non-empty sizes and times, got {len(sizes)} and {len(seconds)}")
    order = np.argsort(sizes)
    n = np.asarray(sizes, dtype=float)[order]
    t = np.asarray(seconds, dtype=float)[order]
    if (n <= 0).any() or (t <= 0).any():
        raise ProfileError("transfer sizes and times must be positive")
    if latency_s is None:
        latency_s = 0.0
        if len(n) >= 2:
            slope = (t[1] - t[0]) / (n[1] - n[0])
            latency_s = float(t[0] - slope * n[0])
    latency_s = float(min(max(latency_s, 0.0), 0.5 * t[0]))
    curve = BandwidthCurve(tuple((float(b), float(b / (s - latency_s) / GB)) for b, s in zip(n, t, strict=True)))
    return latency_s, curve


def _log_rms(predicted: np.ndarray, measured: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.log(predicted) - np.log(measured)) ** 2)))


def fit_gpu_roofline(nbytes: list[float], flops: list[float],
                     seconds: list[float]) -> tuple[ComputeModel, float]:
    """Fit t = max(fixed, bytes / bandwidth, flops / rate) to measurements; returns (model, RMS log error).

    Each constant is chosen among the values that make the model pass through one measured point
    (fixed = t_i, bandwidth = bytes_i / t_i, rate = flops_i / t_i), minimising the squared log error:
    an exhaustive search that needs no optimiser and cannot land on an unphysical extrapolation.
    Ties (a term that never binds) go to the smallest floor and the largest bandwidth and rate,
    i.e. the fastest hardware the measurements allow.
    """
    b, f, t = (np.asarray(x, dtype=float) for x in (nbytes, flops, seconds))
    if not (len(b) == len(f) == len(t)) or len(t) == 0 or (t <= 0).any() or (b <= 0).any() or (f <= 0).any():
        raise ProfileError("GPU fit needs matching, non-empty, positive bytes, FLOPs and times")
    fixed_c, bw_c, rate_c = np.unique(t), np.unique(b / t)[::-1], np.unique(f / t)[::-1]
    best = (math.inf, 0.0, 0.0, 0.0)
    for fixed in fixed_c:
        floor = np.maximum(fixed, b[None, :] / bw_c[:, None])  # [bandwidths, points]
        pred = np.maximum(floor[:, None, :], f[None, None, :] / rate_c[None, :, None])  # [bw, rate, points]
        loss = ((np.log(pred) - np.log(t)) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(loss), loss.shape)
        if loss[i, j] < best[0]:
            best = (float(loss[i, j]), float(fixed), float(bw_c[i]), float(rate_c[j]))
    model = ComputeModel(best[1], best[2] / GB, best[3] / TERA)
    pred = np.maximum(np.maximum(model.fixed_s, b / (model.mem_gbps * GB)), f / (model.tflops * TERA))
    return model, _log_rms(pred, t)


def _nonnegative_relative_fit(design: np.ndarray, t: np.ndarray) -> np.ndarray | None:
    """Non-negative coefficients c minimising Σ (log(design·c) − log t)² among the least-squares fits on relative
    error (rows weighted by 1/t) of every subset of the columns (exact for these few terms); None if no subset gives
    non-negative coefficients and positive predictions."""
    width = design.shape[1]
    best_loss, best = math.inf, None
    for mask in itertools.product((False, True), repeat=width):
        cols = [c for c in range(width) if mask[c]]
        if not cols:
            continue
        coef, *_ = np.linalg.lstsq(design[:, cols] / t[:, None], np.ones_like(t), rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(width)
        full[cols] = coef
        pred = design @ full
        if (pred <= 0).any():
            continue
        loss = float(((np.log(pred) - np.log(t)) ** 2).sum())
        if loss < best_loss:
            best_loss, best = loss, full
    return best


def fit_linear_cost(nbytes: list[float], flops: list[float],
                    seconds: list[float]) -> tuple[ComputeModel, float]:
    """Fit t = fixed + bytes / bandwidth + flops / rate (linear in tokens); returns (model, RMS log error).

    Non-negative least squares on relative error (rows weighted by 1/t), solved exactly by trying
    every subset of the three terms; a term whose best coefficient is 0 gets NEGLIGIBLE_RATE.
    """
    b, f, t = (np.asarray(x, dtype=float) for x in (nbytes, flops, seconds))
    if not (len(b) == len(f) == len(t)) or len(t) == 0 or (t <= 0).any():
        raise ProfileError("CPU fit needs matching, non-empty inputs and positive times")
    design = np.stack([np.ones_like(t), b, f], axis=1)  # [points, 3]
    best = _nonnegative_relative_fit(design, t)
    best = np.zeros(3) if best is None else best
    with np.errstate(divide="ignore"):
        mem_gbps, tflops = 1.0 / best[1] / GB, 1.0 / best[2] / TERA
    model = ComputeModel(float(best[0]), float(min(mem_gbps, NEGLIGIBLE_RATE)), float(min(tflops, NEGLIGIBLE_RATE)))
    return model, _log_rms(design @ best, t)


def fit_grouped_kernel(waves: list[float], experts: list[float], nbytes: list[float], seconds: list[float],
                       tflops: float) -> tuple[GroupedKernelModel, float]:
    """Fit t = waves·wave_fixed + experts·expert_fixed + bytes / bandwidth to measurements (each point may sum
    many waves: a decode step's L layers); returns (model with the given FLOP rate, RMS log error).

    Non-negative least squares on relative error (rows weighted by 1/t), solved exactly by trying every
    subset of the three terms, as `fit_linear_cost`; a bandwidth whose coefficient is 0 gets NEGLIGIBLE_RATE.
    The FLOP rate is not fitted (it never binds where only the memory-bound decode is measured).
    """
    w, k, b, t = (np.asarray(x, dtype=float) for x in (waves, experts, nbytes, seconds))
    if not (len(w) == len(k) == len(b) == len(t)) or len(t) == 0:
        raise ProfileError(f"grouped-kernel fit needs matching, non-empty inputs, got {len(w)}, {len(k)}, {len(b)}, "
                           f"{len(t)}")
    if (t <= 0).any() or (w < 0).any() or (k < 0).any() or (b < 0).any():
        raise ProfileError("grouped-kernel fit needs positive times and non-negative counts and bytes (a time <= 0: "
                           "the work outside the experts already explains the whole measurement)")
    design = np.stack([w, k, b], axis=1)  # [points, 3]
    best = _nonnegative_relative_fit(design, t)
    if best is None:
        raise ProfileError("grouped-kernel fit: no non-negative combination of the terms explains the times")
    with np.errstate(divide="ignore"):
        mem_gbps = 1.0 / best[2] / GB
    model = GroupedKernelModel(float(best[0]), float(best[1]), float(min(mem_gbps, NEGLIGIBLE_RATE)), float(tflops))
    return model, _log_rms(design @ best, t)
