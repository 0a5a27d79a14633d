"""Calibration: measure this machine and fit a `HardwareProfile`; build the built-in profiles.

`calibrate()` times host-to-device copies (pinned and pageable, CUDA events, warm-up, median of
repeats), a gated expert (SwiGLU: two matmuls and an activation) on the GPU and on the CPU (all
cores) at several token counts, an attention-layer proxy, and the per-layer host overhead of a tiny
transformers model; it stores the raw points in the same layout as the H200 measurement file (shipped
with the package: `prescope/assets/data/hardware/h200-measured-2026-11-28.json`) and fits the profile's
models to them with
`profile_from_measurements`, which also builds the built-in `h200` profile from that file.

Raw layout: {"h2d": {"<MiB>": {"pinned_GBps", "pageable_GBps"}}, "experts": {"<shape>":
{"expert_MB_bf16", "gpu_ms_t<N>", "cpu_<dtype>_ms_t<N>"}}, "dense": {"<shape>": {"params",
"bytes", "flops_per_token", "gpu_ms_t<N>"}}, ...}. An expert of P parameters costs 2·N·P
FLOPs and P·b bytes, so only its bf16 size (P = MiB·2^20 / 2) is needed.

Rebuild the built-ins: `build_builtin_profiles(HARDWARE_DIR, "prescope/assets/profiles")` (HARDWARE_DIR: the
measurements shipped with the package; another folder of the same files works in its place).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from prescope.data import read_bytes, read_text, shipped
from prescope.files import check_output, read_json_bytes
from prescope.hardware import cost
from prescope.hardware.profiles import (
    GB,
    HardwareProfile,
    ProfileError,
    fit_gpu_roofline,
    fit_linear_cost,
    fit_transfer_curve,
    load_profile,
    save_profile,
    scale_profile,
)

if TYPE_CHECKING:  # torch and the twins load in the functions that measure, so `--help` starts fast
    import torch

HARDWARE_DIR = shipped("hardware")  # the H200 measurements behind the built-in profiles
MIB = 1 << 20
MS = 1e-3
BF16_BYTES = 2
LATENCY_PROBE_BYTES = 4096
DEFAULT_SHAPES = ("mixtral-8x7b", "olmoe-1b-7b", "qwen3-30b-a3b")  # 336, 12 and 9 MiB bf16 experts
QUICK_SHAPES = ("olmoe-1b-7b",)
HOST_PROBE_TWIN = "olmoe-1b-7b"
DENSE_PROBE_TWIN = "olmoe-1b-7b"  # attention proxy at this twin's H and head count
DENSE_PROBE_CONTEXT = 256  # KV positions read by the attention proxy: input 128 + output 32, rounded up
PREDICTOR_PROXY_WIDTH = 256  # width of the two-layer MLP timed as a stand-in for one predictor call

# Datasheet figures for the published profiles (dense tensor throughput, no sparsity).
H200_SXM = dict(tflops=989.0, mem_gbps=4800.0, sheet="NVIDIA H200 Tensor Core GPU datasheet (H200 SXM: "
                "BF16 Tensor Core 1,979 TFLOPS with sparsity, i.e. 989 dense; GPU memory bandwidth 4.8 TB/s)")
PUBLISHED = {
    "a100-pcie4": dict(
        gpu="NVIDIA A100 40GB PCIe (estimate)", link_gbps=25.0, tflops=312.0, mem_gbps=1555.0,
        sheet="NVIDIA A100 Tensor Core GPU datasheet (A100 40GB PCIe: BF16 Tensor Core 312 TFLOPS dense, "
              "GPU memory bandwidth 1,555 GB/s)",
        link="~24-26 GB/s pinned host-to-device on PCIe 4.0 x16 (DESIGN.md section 4.1); 25 GB/s used"),
    "v100-pcie3": dict(
        gpu="NVIDIA V100 PCIe 16GB (estimate; FP16, Volta has no BF16)", link_gbps=12.5, tflops=112.0,
        mem_gbps=900.0,
        sheet="NVIDIA Tesla V100 PCIe datasheet (Tensor performance 112 TFLOPS FP16, memory bandwidth 900 GB/s)",
        link="~12-13 GB/s pinned on PCIe 3.0 x16, as implied by the constants of a public artifact of the "
             "PreScope paper (DESIGN.md section 4.1); 12.5 GB/s used"),
}


class CalibrationError(ValueError):
    """Calibration cannot run as asked (no CUDA device without --cpu-only, bad sizes)."""


# ---- timing -------------------------------------------------------------------------------------


def time_cuda(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    """Median seconds of `fn` on the current CUDA stream, between CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * MS)
    return statistics.median(times)


def time_host(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall-clock seconds of `fn` followed by `sync` (e.g. a CUDA synchronize)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- measurements -------------------------------------------------------------------------------


def expert_weights(hidden: int, intermediate: int, dtype: torch.dtype, device: str | torch.device,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random gated-expert weights in the transformers layout: gate_up [2I, H], down [H, I]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(2 * intermediate, hidden, generator=gen).to(device, dtype)  # [2I, H]
    down = torch.randn(hidden, intermediate, generator=gen).to(device, dtype)  # [H, I]
    return gate_up, down


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [N, I] each
    return F.linear(F.silu(gate) * up, down)  # [N, H]


def measure_h2d(sizes_mb: tuple[int, ...], device: str, repeats: int, warmup: int) -> tuple[dict, float]:
    """Pinned and pageable host-to-device GB/s per size (MiB), and the time of a 4 KiB pinned copy."""
    import torch

    out = {}
    for mb in sizes_mb:
        n = int(mb * MIB)
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        row = {}
        for kind, pin in (("pinned", True), ("pageable", False)):
            src = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
            seconds = time_cuda(lambda: dst.copy_(src, non_blocking=True), repeats, warmup)  # noqa: B023
            row[f"{kind}_GBps"] = n / seconds / GB
        out[str(mb)] = row
        del dst
    src = torch.empty(LATENCY_PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(LATENCY_PROBE_BYTES, dtype=torch.uint8, device=device)
    latency = time_cuda(lambda: dst.copy_(src, non_blocking=True), repeats, warmup)
    return out, latency


def measure_expert(hidden: int, intermediate: int, token_counts: tuple[int, ...], device: str,
                   dtype: torch.dtype, repeats: int, warmup: int) -> dict[str, float]:
    """Milliseconds of N tokens through one gated expert, per N, on `device` ('cpu' uses all cores)."""
    import torch

    gate_up, down = expert_weights(hidden, intermediate, dtype, device)
    on_cuda = torch.device(device).type == "cuda"
    out = {}
    for n in token_counts:
        x = torch.randn(n, hidden, device=device, dtype=dtype)  # [N, H]
        fn = lambda: expert_forward(x, gate_up, down)  # noqa: E731, B023
        seconds = time_cuda(fn, repeats, warmup) if on_cuda else time_host(fn, repeats, warmup)
        out[f"t{n}"] = seconds / MS
    return out


def measure_dense(hidden: int, heads: int, context: int, token_counts: tuple[int, ...], device: str,
                  dtype: torch.dtype, repeats: int, warmup: int) -> dict[str, float]:
    """An attention-layer proxy: RMS norm, fused QKV [3H, H], SDPA over `context` cached positions,
    output projection [H, H]. Returns its parameters, bytes read, FLOPs per token and times."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(3 * hidden, hidden, generator=gen).to(device, dtype)  # [3H, H]
    o = torch.randn(hidden, hidden, generator=gen).to(device, dtype)  # [H, H]
    norm = torch.ones(hidden, device=device, dtype=dtype)  # [H]
    d = hidden // heads
    k_cache = torch.randn(1, heads, context, d, device=device, dtype=dtype)  # [1, heads, C, d]
    v_cache = torch.randn_like(k_cache)

    def layer(x: torch.Tensor) -> torch.Tensor:
        q, _, _ = F.linear(F.rms_norm(x, (hidden,), norm), qkv).chunk(3, dim=-1)  # [N, H] each
        q = q.view(1, -1, heads, d).transpose(1, 2)  # [1, heads, N, d]
        att = F.scaled_dot_product_attention(q, k_cache, v_cache)  # [1, heads, N, d]
        return x + F.linear(att.transpose(1, 2).reshape(-1, hidden), o)  # [N, H]

    params = 4 * hidden * hidden + hidden
    out = {"params": params, "bytes": params * dtype.itemsize + 2 * context * hidden * dtype.itemsize,
           "flops_per_token": 2 * params + 4 * context * hidden}  # + QK^T and AV over the context
    for n in token_counts:
        x = torch.randn(n, hidden, device=device, dtype=dtype)  # [N, H]
        out[f"gpu_ms_t{n}"] = time_cuda(lambda: layer(x), repeats, warmup) / MS  # noqa: B023
    return out


def measure_host_overhead(device: str, repeats: int, warmup: int) -> float:
    """Seconds of host work per decoder layer: a tiny-width twin (whose kernels take no GPU time to
    speak of) at 2 and 4 layers, one token; the difference per layer is launch and Python time."""
    import torch

    from prescope.models import twins

    times = {}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for layers in (2, 4):
        model = twins.build_twin(twins.tiny_twin_config(HOST_PROBE_TWIN, layers), device=device)
        ids = torch.ones(1, 1, dtype=torch.long, device=device)  # [batch 1, one token]
        with torch.inference_mode():
            times[layers] = time_host(lambda: model(ids), repeats, warmup, sync)  # noqa: B023
    return max(times[4] - times[2], 0.0) / 2


def measure_predictor_proxy(device: str, repeats: int, warmup: int) -> float:
    """Seconds of one small MLP forward (Linear, GELU, Linear) on one token: a predictor call."""
    import torch

    w = PREDICTOR_PROXY_WIDTH
    mlp = torch.nn.Sequential(torch.nn.Linear(w, w), torch.nn.GELU(), torch.nn.Linear(w, w)).to(device)
    x = torch.randn(1, w, device=device)  # [1, w]
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with torch.inference_mode():
        return time_host(lambda: mlp(x), repeats, warmup, sync)


# ---- fitting ------------------------------------------------------------------------------------


def expert_points(experts: dict[str, dict], prefix: str, dtype_bytes: int) -> tuple[list, list, list]:
    """(bytes, FLOPs, seconds) of every `<prefix>_ms_t<N>` entry in a raw experts table."""
    b, f, t = [], [], []
    for row in experts.values():
        params = row["expert_MB_bf16"] * MIB / BF16_BYTES
        for key, ms in row.items():
            if key.startswith(prefix + "_ms_t"):
                tokens = int(key.rsplit("_t", 1)[1])
                b.append(params * dtype_bytes)
                f.append(2 * tokens * params)
                t.append(ms * MS)
    return b, f, t


def profile_from_measurements(measured: dict[str, Any], **fields: Any) -> HardwareProfile:
    """Fit a profile's models to raw measurements (module docstring layout); `fields` supplies the
    descriptive fields and anything not measured (e.g. gpu_dense, host_overhead_per_layer_s)."""
    h2d = measured["h2d"]
    sizes = [float(mb) * MIB for mb in h2d]
    pinned_t = [n / (row["pinned_GBps"] * GB) for n, row in zip(sizes, h2d.values(), strict=True)]
    latency, pinned = fit_transfer_curve(sizes, pinned_t, measured.get("h2d_latency_s"))
    pageable_t = [n / (row["pageable_GBps"] * GB) for n, row in zip(sizes, h2d.values(), strict=True)]
    _, pageable = fit_transfer_curve(sizes, pageable_t, latency)

    gpu_expert, gpu_err = fit_gpu_roofline(*expert_points(measured["experts"], "gpu", BF16_BYTES))
    fit = {"gpu_expert_rms_log_error": round(gpu_err, 4)}
    cpu_expert = {}
    for dtype in ("bfloat16", "float32"):
        points = expert_points(measured["experts"], f"cpu_{dtype}", cost.DTYPE_BYTES[dtype])
        if points[2]:
            cpu_expert[dtype], err = fit_linear_cost(*points)
            fit[f"cpu_expert_{dtype}_rms_log_error"] = round(err, 4)
    if measured.get("dense"):
        b, f, t = [], [], []
        for row in measured["dense"].values():
            for key, ms in row.items():
                if key.startswith("gpu_ms_t"):
                    n = int(key.removeprefix("gpu_ms_t"))
                    b.append(row["bytes"])
                    f.append(n * row["flops_per_token"])
                    t.append(ms * MS)
        fields.setdefault("gpu_dense", fit_gpu_roofline(b, f, t)[0])
    fields.setdefault("gpu_dense", gpu_expert)
    return HardwareProfile(
        pinned_h2d=pinned, pageable_h2d=pageable, transfer_latency_s=latency, gpu_expert=gpu_expert,
        cpu_expert=cpu_expert, fit={**fit, **fields.pop("fit", {})},
        measurements={**measured, **fields.pop("measurements", {})}, **fields)


def host_overhead_from_probes(probes: list[dict[str, Any]], profile: HardwareProfile) -> float:
    """Mean per-layer host time implied by resident decode probes at batch 1: step / L minus the
    modelled GPU work of a layer (K experts of one token, plus the layer's non-expert work).
    Each probe: {"twin", "num_layers", "step_s"}."""
    from prescope.models import twins

    if not probes:
        raise CalibrationError("need at least one resident decode probe")
    values = []
    for probe in probes:
        size = twins.twin_sizes(probe["twin"], probe["num_layers"])
        h, i, b = size["hidden_size"], size["expert_intermediate_size"], size["dtype_bytes"]
        gpu = size["top_k"] * cost.gpu_expert_time(1, h, i, b, profile)
        gpu += cost.dense_time(1, size["non_expert_params_per_moe_layer"], b, profile)
        values.append(max(probe["step_s"] / probe["num_layers"] - gpu, 0.0))
    return statistics.mean(values)


def build_h200_profile(hardware_dir: str | os.PathLike = HARDWARE_DIR) -> HardwareProfile:
    """The built-in `h200` profile from the H200 measurement file and the resident-loop probes beside it."""
    folder = Path(hardware_dir)
    main_file = "h200-measured-2026-11-28.json"
    probe_files = {"mixtral-8x7b": ("h200-mixtral-twin-8layers-lru-probe-2026-11-28.json", 8),
                   "olmoe-1b-7b": ("h200-olmoe-twin-lru-probe-2026-11-28.json", 16)}
    measured = json.loads(read_text(folder / main_file))
    probes, raw_probes = [], {}
    for twin, (file, layers) in probe_files.items():
        raw_probes[file] = json.loads(read_text(folder / file))
        for key in ("resident_loop_ms_r0", "resident_loop_ms_r1"):
            probes.append({"twin": twin, "num_layers": layers, "step_s": raw_probes[file][key] * MS})
    profile = profile_from_measurements(
        measured, name="h200", source="measured", date="2026-11-28", gpu=measured["device"],
        cpu=f"host of the H200 machine, {measured['cpu_threads']} threads", source_files=(main_file, *(
            f for f, _ in probe_files.values())),
        description="One NVIDIA H200 on PCIe 5 (about 55 GB/s pinned host-to-device), measured.",
        citation=f"Measured on the project's H200 machine on 2026-11-28 (torch {measured['torch']}): "
                 f"prescope/assets/data/hardware/{main_file} and the resident-loop probes beside it.",
        host_overhead_per_layer_s=0.0, predict_overhead_s=0.0, plan_overhead_s=0.0,
        notes=("GPU dense/attention model: not measured on this machine; it reuses the expert fit "
               "(launch floor, achieved HBM bandwidth and FLOP rate). `prescope calibrate` measures it.",
               "host_overhead_per_layer_s: from the resident decode loops of the Mixtral (8 layers) and "
               "OLMoE (16 layers) twins at batch 1, minus the modelled GPU work per layer.",
               "predict_overhead_s and plan_overhead_s: not measured here (0); the benches measure them."),
        measurements={"probes": raw_probes})
    return dataclasses.replace(profile, host_overhead_per_layer_s=host_overhead_from_probes(probes, profile))


def published_profile(base: HardwareProfile, name: str) -> HardwareProfile:
    """An estimated profile for a GPU that was not measured: the base profile with its link rescaled
    to the published bandwidth and its GPU bandwidth and FLOP rate scaled by datasheet ratios."""
    if name not in PUBLISHED:
        raise CalibrationError(f"no published figures for {name!r}; known: {sorted(PUBLISHED)}")
    spec = PUBLISHED[name]
    return scale_profile(
        base, name=name, link_gbps=spec["link_gbps"], gpu_mem_ratio=spec["mem_gbps"] / H200_SXM["mem_gbps"],
        gpu_flops_ratio=spec["tflops"] / H200_SXM["tflops"], source="published", gpu=spec["gpu"],
        description=f"ESTIMATE for {spec['gpu']}: link {spec['link_gbps']} GB/s pinned; GPU scaled from the "
                    f"measured H200 by datasheet ratios; CPU and host overhead as the H200's host.",
        citation=f"Link: {spec['link']}. GPU: {spec['sheet']}; relative to {H200_SXM['sheet']}. "
                 f"Base: the measured `{base.name}` profile ({base.date}).",
        notes=("An estimate, not a measurement: the link curve keeps the H200 curve's shape, scaled to the "
               "published peak (pageable scaled alike); launch floors are the H200's.",
               "CPU expert models and host overhead are those of the H200 machine's 16-thread host, taken as "
               "a typical server host."),
        source_files=base.source_files)


def build_builtin_profiles(hardware_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write the built-in profiles (h200, a100-pcie4, v100-pcie3) as JSON into `out_dir`."""
    h200 = build_h200_profile(hardware_dir)
    profiles = [h200] + [published_profile(h200, name) for name in PUBLISHED]
    return [save_profile(p, Path(out_dir) / f"{p.name}.json") for p in profiles]


# ---- the calibration run ------------------------------------------------------------------------


def _shape_dims(shape: str | tuple[int, int]) -> tuple[int, int]:
    from prescope.models import twins

    if isinstance(shape, str):
        size = twins.twin_sizes(shape)
        return size["hidden_size"], size["expert_intermediate_size"]
    hidden, intermediate = shape
    if hidden <= 0 or intermediate <= 0:
        raise CalibrationError(f"expert shape (H, I) must be positive, got {shape}")
    return int(hidden), int(intermediate)


def _shape_name(shape: str | tuple[int, int]) -> str:
    return shape if isinstance(shape, str) else "{}x{}".format(*_shape_dims(shape))


def calibrate(device: str = "cuda", sizes_mb: tuple[int, ...] = (1, 4, 16, 64, 256),
              token_counts: tuple[int, ...] = (1, 4, 16, 64),
              shapes: tuple[str | tuple[int, int], ...] = DEFAULT_SHAPES,
              gpu_token_counts: tuple[int, ...] = (1, 4, 16, 64, 256), cpu_only: bool = False,
              base: str | HardwareProfile = "h200", name: str = "calibrated", repeats: int = 10,
              warmup: int = 3, progress: bool = True) -> HardwareProfile:
    """Measure this machine and fit a profile. `shapes` are twin names, or (H, I) pairs, whose
    gated expert is timed.

    Without CUDA, or with `cpu_only`, only the CPU expert models are measured and the link, GPU and
    host-overhead parts are copied from the `base` profile (noted in the profile).
    """
    import torch

    from prescope.models import twins

    has_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if not cpu_only and not has_cuda:
        raise CalibrationError(
            f"no CUDA device for {device!r}: cannot measure the link and the GPU. Pass --cpu-only to "
            f"measure only the CPU parts (the rest is then copied from profile {base!r}).")
    shape_dims = {_shape_name(s): _shape_dims(s) for s in shapes}
    tasks: list[tuple[str, Callable[[], None]]] = []
    measured: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if has_cuda else "none",
                                "torch": torch.__version__, "cpu_threads": os.cpu_count(), "experts": {}}
    experts = measured["experts"]

    def add_expert(shape: str, h: int, i: int) -> None:
        row = experts.setdefault(shape, {"expert_MB_bf16": cost.expert_bytes(h, i, BF16_BYTES) / MIB})
        for dtype in (torch.bfloat16, torch.float32):
            dname = str(dtype).removeprefix("torch.")
            tasks.append((f"cpu expert {shape} {dname}", lambda d=dtype, n=dname: row.update(
                {f"cpu_{n}_ms_{k}": v for k, v in measure_expert(h, i, token_counts, "cpu", d, repeats,
                                                                   warmup).items()})))
        if not cpu_only:
            tasks.append((f"gpu expert {shape}", lambda: row.update(
                {f"gpu_ms_{k}": v for k, v in measure_expert(h, i, gpu_token_counts, device, torch.bfloat16,
                                                              repeats, warmup).items()})))

    for shape, (h, i) in shape_dims.items():
        add_expert(shape, h, i)
    if not cpu_only:
        def h2d() -> None:
            measured["h2d"], measured["h2d_latency_s"] = measure_h2d(sizes_mb, device, repeats, warmup)

        def dense() -> None:
            cfg = twins.twin_config(DENSE_PROBE_TWIN)
            measured["dense"] = {DENSE_PROBE_TWIN: measure_dense(
                cfg.hidden_size, cfg.num_attention_heads, DENSE_PROBE_CONTEXT, token_counts, device,
                torch.bfloat16, repeats, warmup)}

        def host() -> None:
            measured["host_overhead_per_layer_s"] = measure_host_overhead(device, repeats, warmup)
            measured["predict_overhead_s"] = measure_predictor_proxy(device, repeats, warmup)

        tasks += [("host-to-device copies", h2d), ("attention proxy", dense), ("host overhead", host)]
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or threads)
    try:
        for _, task in tqdm(tasks, desc="calibrate", disable=not progress):
            task()
    finally:
        torch.set_num_threads(threads)
    return _fit(measured, cpu_only, load_profile(base), name)


def _fit(measured: dict[str, Any], cpu_only: bool, base: HardwareProfile, name: str) -> HardwareProfile:
    today = datetime.date.today().isoformat()
    desc = dict(name=name, source="calibrated", date=today, cpu=f"{measured['cpu_threads']} threads",
                citation=f"Measured by `prescope calibrate` on {today} (torch {measured['torch']}).")
    if cpu_only:
        cpu, fit = {}, {}
        for dtype in ("bfloat16", "float32"):
            cpu[dtype], err = fit_linear_cost(*expert_points(measured["experts"], f"cpu_{dtype}",
                                                            cost.DTYPE_BYTES[dtype]))
            fit[f"cpu_expert_{dtype}_rms_log_error"] = round(err, 4)
        return scale_profile(base, cpu_expert=cpu, measurements=measured, fit=fit, **desc,
                             description=f"CPU measured here; link and GPU copied from profile {base.name!r}.",
                             notes=(f"Only the CPU expert models were measured (--cpu-only); the link, GPU "
                                    f"and host-overhead parts are those of {base.name!r}.",))
    notes = ["predict_overhead_s: one small MLP forward (a predictor stand-in); plan_overhead_s: not "
             "measured (0)."]
    if "dense" not in measured:
        notes.append("GPU dense/attention model: not measured; it reuses the expert fit.")
    if "host_overhead_per_layer_s" not in measured:
        notes.append(f"host_overhead_per_layer_s and predict_overhead_s: not measured; copied from {base.name!r}.")
    return profile_from_measurements(
        measured, **desc, gpu=measured["device"], description=f"{measured['device']}, calibrated.",
        host_overhead_per_layer_s=measured.get("host_overhead_per_layer_s", base.host_overhead_per_layer_s),
        predict_overhead_s=measured.get("predict_overhead_s", base.predict_overhead_s), plan_overhead_s=0.0,
        notes=tuple(notes))


# ---- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="where to write the profile JSON")
    parser.add_argument("--device", default="cuda", help="the CUDA device to measure")
    parser.add_argument("--quick", action="store_true", help="fewer sizes, one expert shape, fewer repeats")
    parser.add_argument("--cpu-only", action="store_true", help="measure only the CPU; copy the rest from --base")
    parser.add_argument("--base", default="h200", help="profile to copy unmeasured parts from")
    parser.add_argument("--name", default="calibrated", help="the profile's name")
    parser.add_argument("--from-measurements", default=None,
                        help="fit a profile from a raw measurement JSON instead of measuring")


def summary_table(profile: HardwareProfile) -> str:
    """A readable table of the fitted constants."""
    rows = [("pinned H2D peak", f"{profile.pinned_h2d.peak_gbps:.1f} GB/s"),
            ("transfer latency", f"{profile.transfer_latency_s * 1e6:.1f} us")]
    rows += [(f"pinned H2D at {b / MIB:g} MiB", f"{g:.1f} GB/s") for b, g in profile.pinned_h2d.points]
    for label, m in [("GPU expert", profile.gpu_expert), ("GPU dense", profile.gpu_dense),
                     *((f"CPU expert {d}", m) for d, m in profile.cpu_expert.items())]:
        rows.append((label, f"fixed {m.fixed_s * 1e3:.3f} ms, {m.mem_gbps:.4g} GB/s, {m.tflops:.4g} TFLOP/s"))
    rows.append(("host overhead per layer", f"{profile.host_overhead_per_layer_s * 1e3:.3f} ms"))
    rows += [(k, str(v)) for k, v in profile.fit.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    check_output(args.out, what="--out")
    if args.from_measurements:
        measured = read_json_bytes(read_bytes(args.from_measurements), str(args.from_measurements), "measurement JSON")
        try:
            profile = _fit(measured, "h2d" not in measured, load_profile(args.base), args.name)
        except KeyError as exc:
            raise ProfileError(f"{args.from_measurements}: measurement field {exc} missing") from None
    elif args.quick:
        profile = calibrate(args.device, sizes_mb=(1, 16, 256), token_counts=(1, 16),
                            gpu_token_counts=(1, 16, 256), shapes=QUICK_SHAPES, cpu_only=args.cpu_only,
                            base=args.base, name=args.name, repeats=3, warmup=1)
    else:
        profile = calibrate(args.device, cpu_only=args.cpu_only, base=args.base, name=args.name)
    path = save_profile(profile, args.out)
    print(summary_table(profile))
    print(json.dumps({"profile": profile.name, "out": str(path), "source": profile.source,
                      "pinned_peak_GBps": profile.pinned_h2d.peak_gbps,
                      "transfer_latency_s": profile.transfer_latency_s,
                      "gpu_expert": vars(profile.gpu_expert), "gpu_dense": vars(profile.gpu_dense),
                      "cpu_expert": {d: vars(m) for d, m in profile.cpu_expert.items()},
                      "host_overhead_per_layer_s": profile.host_overhead_per_layer_s, "fit": profile.fit}))
    return 0
