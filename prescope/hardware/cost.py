"""The cost model: how long transfers and expert, dense and attention work take on a hardware profile.

Pure functions of plain numbers and a `HardwareProfile` (profiles.py), the formula in each docstring.
The simulator, the planner, the benches and the notebooks call these; nobody re-derives them.

Letters: N tokens routed to an expert (or in a batch), H hidden size, I expert width, b bytes per
element. A gated expert (SwiGLU: gate, up, down) holds 3·H·I parameters; one token through it costs
2·3·H·I FLOPs (a multiply and an add per weight).
Units: bytes, seconds; profile bandwidths in GB/s (1e9 B/s), FLOP rates in TFLOP/s (1e12 FLOP/s).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from prescope.hardware.profiles import GB, TERA, ComputeModel, HardwareProfile

# Element size of the dtypes the cost model knows, and which CPU model a size falls back to.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_CPU_DTYPE = {4: "float32", 2: "bfloat16"}
BREAK_EVEN_SEARCH_MAX_TOKENS = 1 << 20


class CostInputError(ValueError):
    """A cost-model input is out of range (negative sizes or counts, unknown dtype)."""


def _check_nonneg(**values: float) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
            raise CostInputError(f"{name} must be a number >= 0, got {value!r}")


def expert_params(hidden: int, intermediate: int, gated: bool = True) -> int:
    """Parameters of one expert: 3·H·I if gated (gate, up, down), else 2·H·I (up, down)."""
    _check_nonneg(hidden=hidden, intermediate=intermediate)
    return (3 if gated else 2) * hidden * intermediate


def expert_bytes(hidden: int, intermediate: int, dtype_bytes: int, gated: bool = True) -> int:
    """Bytes of one expert: 3·H·I·b if gated. Mixtral-8x7B in bf16: 3·4096·14336·2 = 352,321,536 B (336 MiB)."""
    _check_nonneg(dtype_bytes=dtype_bytes)
    return expert_params(hidden, intermediate, gated) * dtype_bytes


def expert_flops(tokens: int, hidden: int, intermediate: int, gated: bool = True) -> int:
    """FLOPs of N tokens through one expert: 2·N·3·H·I if gated."""
    _check_nonneg(tokens=tokens)
    return 2 * tokens * expert_params(hidden, intermediate, gated)


def transfer_time(nbytes: float, profile: HardwareProfile, pinned: bool = True) -> float:
    """Seconds to copy `nbytes` host-to-device in one transfer: latency + n / bandwidth(n).

    bandwidth(n) is the profile's pinned (or pageable) curve at size n, net of latency.
    Example: 336 MB at 55 GB/s takes 336e6 / 55e9 = 6.11 ms plus the latency. Zero bytes cost 0.
    """
    _check_nonneg(nbytes=nbytes)
    if nbytes == 0:
        return 0.0
    curve = profile.pinned_h2d if pinned else profile.pageable_h2d
    return profile.transfer_latency_s + nbytes / (curve.gbps(nbytes) * GB)


def gpu_time(nbytes: float, flops: float, model: ComputeModel) -> float:
    """GPU kernel time: max(fixed, bytes / bandwidth, flops / rate), a roofline with a launch floor.

    The floor is the launch latency of an isolated call: it overlaps with the device's own work,
    hence a max, not a sum (on the H200 a 12 MB and a 150 MB expert both take ~0.1 ms at N=1).
    """
    _check_nonneg(nbytes=nbytes, flops=flops)
    return max(model.fixed_s, nbytes / (model.mem_gbps * GB), flops / (model.tflops * TERA))


def cpu_time(nbytes: float, flops: float, model: ComputeModel) -> float:
    """CPU time: fixed + bytes / bandwidth + flops / rate, i.e. linear in tokens (streaming the
    weights once, then a cost per token)."""
    _check_nonneg(nbytes=nbytes, flops=flops)
    return model.fixed_s + nbytes / (model.mem_gbps * GB) + flops / (model.tflops * TERA)


def gpu_expert_time(tokens: int, hidden: int, intermediate: int, dtype_bytes: int,
                    profile: HardwareProfile, gated: bool = True) -> float:
    """Seconds for N tokens through one resident expert on the GPU:
    max(fixed, 3·H·I·b / bandwidth, 2·N·3·H·I / rate) (see `gpu_time`); 0 when N = 0."""
    if tokens == 0:
        return 0.0
    return gpu_time(expert_bytes(hidden, intermediate, dtype_bytes, gated),
                    expert_flops(tokens, hidden, intermediate, gated), profile.gpu_expert)


def grouped_expert_time(tokens: int, hidden: int, intermediate: int, dtype_bytes: int,
                        profile: HardwareProfile, gated: bool = True) -> float:
    """What one more expert of N tokens adds to a wave's grouped kernel (`profile.gpu_grouped`):
    expert_fixed + max(3·H·I·b / bandwidth, 2·N·3·H·I / rate); without a grouped model, `gpu_expert_time`.
    0 when N = 0."""
    model = profile.gpu_grouped
    if model is None or tokens == 0:
        return gpu_expert_time(tokens, hidden, intermediate, dtype_bytes, profile, gated)
    return model.expert_fixed_s + max(expert_bytes(hidden, intermediate, dtype_bytes, gated) / (model.mem_gbps * GB),
                                      expert_flops(tokens, hidden, intermediate, gated) / (model.tflops * TERA))


def gpu_wave_time(tokens: Sequence[int], hidden: int, intermediate: int, dtype_bytes: int,
                  profile: HardwareProfile, gated: bool = True) -> float:
    """Seconds for one wave of resident experts of one layer, N_e tokens each (experts with none are left out).

    Without `profile.gpu_grouped` (one kernel pair per expert, run one after another): Σ_e gpu_expert_time(N_e).
    With it (one grouped kernel over the wave's slots): wave_fixed + k·expert_fixed
    + max(k·3·H·I·b / bandwidth, Σ_e 2·N_e·3·H·I / rate), k the experts with tokens; 0 for an empty wave.
    Example (grouped, wave_fixed 100 µs, expert_fixed 2 µs, 2,000 GB/s): 8 OLMoE experts (12 MiB each) of one
    token: 100 + 16 + 8·12.58e6 / 2e12 s = 166 µs.
    """
    counts = [int(n) for n in tokens if n]
    for n in counts:
        _check_nonneg(tokens=n)
    model = profile.gpu_grouped
    if model is None:
        return sum(gpu_expert_time(n, hidden, intermediate, dtype_bytes, profile, gated) for n in counts)
    if not counts:
        return 0.0
    nbytes = len(counts) * expert_bytes(hidden, intermediate, dtype_bytes, gated)
    flops = expert_flops(sum(counts), hidden, intermediate, gated)
    return (model.wave_fixed_s + len(counts) * model.expert_fixed_s
            + max(nbytes / (model.mem_gbps * GB), flops / (model.tflops * TERA)))


def cpu_dtype_for(dtype_bytes: int, dtype: str | None = None) -> str:
    """The CPU model's dtype name: `dtype` if given, else the usual dtype of that element size."""
    if dtype is None:
        if dtype_bytes not in DEFAULT_CPU_DTYPE:
            raise CostInputError(f"no default CPU dtype for {dtype_bytes}-byte elements; pass dtype=")
        dtype = DEFAULT_CPU_DTYPE[dtype_bytes]
    if DTYPE_BYTES.get(dtype) != dtype_bytes:
        raise CostInputError(f"dtype {dtype!r} does not have {dtype_bytes}-byte elements")
    return dtype


def cpu_expert_time(tokens: int, hidden: int, intermediate: int, dtype_bytes: int,
                    profile: HardwareProfile, gated: bool = True, dtype: str | None = None) -> float:
    """Seconds for N tokens through one expert on the host CPU (weights already in host memory):
    fixed + 3·H·I·b / bandwidth + 2·N·3·H·I / rate, with the profile's CPU model for the dtype
    (bfloat16 for 2-byte, float32 for 4-byte elements unless `dtype` says otherwise); 0 when N = 0."""
    if tokens == 0:
        return 0.0
    model = profile.cpu_model(cpu_dtype_for(dtype_bytes, dtype))
    return cpu_time(expert_bytes(hidden, intermediate, dtype_bytes, gated),
                    expert_flops(tokens, hidden, intermediate, gated), model)


def dense_time(tokens: int, params: int, dtype_bytes: int, profile: HardwareProfile,
               kv_bytes: float = 0, extra_flops: float = 0) -> float:
    """Seconds of one layer's resident non-expert GPU work (attention, norms, router, shared experts)
    for a batch of N tokens: max(fixed, (P·b + kv_bytes) / bandwidth, (2·N·P + extra) / rate),
    where P is the layer's non-expert parameter count (twins.twin_sizes), kv_bytes the KV cache read
    and extra_flops the attention score FLOPs if they matter."""
    _check_nonneg(tokens=tokens, params=params, kv_bytes=kv_bytes, extra_flops=extra_flops)
    return gpu_time(params * dtype_bytes + kv_bytes, 2 * tokens * params + extra_flops, profile.gpu_dense)


def link_expert_time(tokens: int, hidden: int, intermediate: int, dtype_bytes: int,
                     profile: HardwareProfile, gated: bool = True, pinned: bool = True) -> float:
    """Seconds to load a missing expert over the link and run N tokens through it on the GPU:
    transfer_time(3·H·I·b) + gpu_expert_time(N)."""
    nbytes = expert_bytes(hidden, intermediate, dtype_bytes, gated)
    return (transfer_time(nbytes, profile, pinned)
            + gpu_expert_time(tokens, hidden, intermediate, dtype_bytes, profile, gated))


def cpu_beats_link(tokens: int, hidden: int, intermediate: int, dtype_bytes: int,
                   profile: HardwareProfile, gated: bool = True, pinned: bool = True) -> bool:
    """True when running N tokens through a missing expert on the CPU is faster than loading it:
    cpu_expert_time(N) < transfer_time(bytes) + gpu_expert_time(N)."""
    return (cpu_expert_time(tokens, hidden, intermediate, dtype_bytes, profile, gated)
            < link_expert_time(tokens, hidden, intermediate, dtype_bytes, profile, gated, pinned))


def cpu_break_even_tokens(hidden: int, intermediate: int, dtype_bytes: int, profile: HardwareProfile,
                          gated: bool = True, pinned: bool = True) -> int:
    """The largest N for which the CPU beats the link for a missing expert (0 if it never does).

    The CPU's time per token exceeds the GPU's and the transfer does not depend on N, so the CPU's
    lead only shrinks as N grows and the winning N form a prefix 1..N*; found by doubling then bisection, capped at
    BREAK_EVEN_SEARCH_MAX_TOKENS.
    """
    def wins(n: int) -> bool:
        return cpu_beats_link(n, hidden, intermediate, dtype_bytes, profile, gated, pinned)

    if not wins(1):
        return 0
    lo, hi = 1, 2
    while hi <= BREAK_EVEN_SEARCH_MAX_TOKENS and wins(hi):
        lo, hi = hi, hi * 2
    if hi > BREAK_EVEN_SEARCH_MAX_TOKENS:
        return lo
    while hi - lo > 1:  # invariant: wins(lo), not wins(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if wins(mid) else (lo, mid)
    return lo


def step_lower_bound(gpu_s: float, cpu_s: float, bytes_to_move: float, profile: HardwareProfile) -> float:
    """A lower bound on one decode step: max(GPU compute, CPU work that cannot move, the bytes an
    optimal cache must still move / the link's peak pinned bandwidth). Each resource must do at
    least its own share; perfect overlap of all three is the best any policy can reach."""
    _check_nonneg(gpu_s=gpu_s, cpu_s=cpu_s, bytes_to_move=bytes_to_move)
    return max(gpu_s, cpu_s, bytes_to_move / (profile.pinned_h2d.peak_gbps * GB))


def split_lower_bound(link_s: list[float], cpu_s: list[float]) -> float:
    """Least possible max(link busy, CPU busy) when each absent expert i is either loaded (link_s[i]) or
    computed on the CPU (cpu_s[i]), with fractional splits allowed (so a lower bound on any real split):
    min T such that Σ x_i·link_i <= T and Σ (1 − x_i)·cpu_i <= T, 0 <= x_i <= 1. Items go to the link in
    increasing order of link_i / cpu_i (the LP's exchange argument); T is where the two loads meet.
    Example: link [1, 1], CPU [1, 3]: the second goes to the link, the first stays on the CPU: T = 1.0."""
    if len(link_s) != len(cpu_s):
        raise CostInputError(f"link_s and cpu_s differ in length ({len(link_s)} vs {len(cpu_s)})")
    for value in (*link_s, *cpu_s):
        _check_nonneg(seconds=value)
    order = sorted(range(len(link_s)), key=lambda i: link_s[i] / cpu_s[i] if cpu_s[i] > 0 else math.inf)
    link, cpu = 0.0, float(sum(cpu_s))
    for i in order:  # move item i from the CPU to the link while that lowers the maximum
        if link + link_s[i] <= cpu - cpu_s[i]:
            link, cpu = link + link_s[i], cpu - cpu_s[i]
            continue
        # split item i: link + x·l = cpu − x·c  =>  x = (cpu − link) / (l + c)
        total = link_s[i] + cpu_s[i]
        x = (cpu - link) / total if total > 0 else 0.0
        return max(link + max(0.0, min(1.0, x)) * link_s[i], cpu - max(0.0, min(1.0, x)) * cpu_s[i])
    return max(link, cpu)
