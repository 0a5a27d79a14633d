"""Cost-model formulas against hand-computed values, and the built-in H200 profile against its measurements."""

import pytest

from prescope.hardware import cost
from prescope.hardware.profiles import BandwidthCurve, ComputeModel, HardwareProfile, load_profile

MS = 1e-3
MIXTRAL = dict(hidden=4096, intermediate=14336)
OLMOE = dict(hidden=2048, intermediate=1024)


def flat_profile(link_gbps=55.0, latency_s=10e-6) -> HardwareProfile:
    """A profile with round numbers: flat 55 GB/s pinned, 10 GB/s pageable, a simple GPU and CPU."""
    return HardwareProfile(
        name="flat", description="test", source="published", citation="hand-made", gpu="g", cpu="c",
        date="2026-01-01", pinned_h2d=BandwidthCurve(((1.0, link_gbps),)),
        pageable_h2d=BandwidthCurve(((1.0, 10.0),)), transfer_latency_s=latency_s,
        gpu_expert=ComputeModel(0.1 * MS, 2000.0, 500.0), gpu_dense=ComputeModel(0.05 * MS, 1000.0, 100.0),
        cpu_expert={"bfloat16": ComputeModel(0.2 * MS, 100.0, 5.0), "float32": ComputeModel(0.0, 200.0, 1.0)},
        host_overhead_per_layer_s=0.0, predict_overhead_s=0.0, plan_overhead_s=0.0)


def test_expert_bytes_of_mixtral_is_336_mib():
    assert cost.expert_bytes(**MIXTRAL, dtype_bytes=2) == 3 * 4096 * 14336 * 2 == 352_321_536
    assert cost.expert_bytes(**MIXTRAL, dtype_bytes=2) / 2**20 == 336
    assert cost.expert_bytes(**MIXTRAL, dtype_bytes=2, gated=False) == 2 * 4096 * 14336 * 2
    assert cost.expert_flops(3, **OLMOE) == 2 * 3 * 3 * 2048 * 1024


def test_transfer_time_of_a_336_mb_expert_at_55_gbps():
    p = flat_profile()
    assert cost.transfer_time(336e6, p) == pytest.approx(6.109e-3 + 10e-6, rel=1e-3)
    assert cost.transfer_time(336e6, p, pinned=False) == pytest.approx(33.6e-3 + 10e-6)
    assert cost.transfer_time(0, p) == 0.0


def test_gpu_expert_time_in_its_three_regimes():
    p = flat_profile()
    assert cost.gpu_expert_time(1, **OLMOE, dtype_bytes=2, profile=p) == pytest.approx(0.1 * MS)  # launch floor
    assert cost.gpu_expert_time(1, **MIXTRAL, dtype_bytes=2, profile=p) == pytest.approx(352_321_536 / 2e12)
    flops = 2 * 1024 * 3 * 4096 * 14336
    assert cost.gpu_expert_time(1024, **MIXTRAL, dtype_bytes=2, profile=p) == pytest.approx(flops / 500e12)
    assert cost.gpu_expert_time(0, **MIXTRAL, dtype_bytes=2, profile=p) == 0.0


def test_cpu_expert_time_is_linear_in_tokens_and_picks_the_dtype_model():
    p = flat_profile()
    nbytes, flops1 = 3 * 2048 * 1024 * 2, 2 * 3 * 2048 * 1024
    t1 = cost.cpu_expert_time(1, **OLMOE, dtype_bytes=2, profile=p)
    assert t1 == pytest.approx(0.2 * MS + nbytes / 100e9 + flops1 / 5e12)
    t8, t16 = (cost.cpu_expert_time(n, **OLMOE, dtype_bytes=2, profile=p) for n in (8, 16))
    assert t16 - t8 == pytest.approx(8 * flops1 / 5e12)
    t_f32 = cost.cpu_expert_time(1, **OLMOE, dtype_bytes=4, profile=p)
    assert t_f32 == pytest.approx(2 * nbytes / 200e9 + flops1 / 1e12)
    with pytest.raises(cost.CostInputError, match="float16"):
        cost.cpu_expert_time(1, **OLMOE, dtype_bytes=4, profile=p, dtype="float16")
    with pytest.raises(ValueError, match="no CPU expert model for dtype 'float16'"):
        cost.cpu_expert_time(1, **OLMOE, dtype_bytes=2, profile=p, dtype="float16")


def test_dense_time_per_layer():
    p = flat_profile()
    params = 4 * 4096 * 4096
    assert cost.dense_time(1, params, 2, p) == pytest.approx(params * 2 / 1000e9)
    assert cost.dense_time(1, 1000, 2, p) == pytest.approx(0.05 * MS)
    assert cost.dense_time(4096, params, 2, p) == pytest.approx(2 * 4096 * params / 100e12)
    assert cost.dense_time(1, params, 2, p, kv_bytes=1e9) == pytest.approx((params * 2 + 1e9) / 1000e9)


def test_cpu_beats_link_break_even_matches_hand_computation():
    p = flat_profile()
    params = 3 * 2048 * 1024
    link = cost.transfer_time(params * 2, p) + 0.1 * MS  # GPU stays on its launch floor here
    cpu_fixed, cpu_per_token = 0.2 * MS + params * 2 / 100e9, 2 * params / 5e12
    expected = int((link - cpu_fixed) / cpu_per_token)  # largest N with cpu_fixed + N·slope < link
    assert cost.cpu_break_even_tokens(**OLMOE, dtype_bytes=2, profile=p) == expected > 0
    assert cost.cpu_beats_link(expected, **OLMOE, dtype_bytes=2, profile=p)
    assert not cost.cpu_beats_link(expected + 1, **OLMOE, dtype_bytes=2, profile=p)
    assert cost.cpu_break_even_tokens(**OLMOE, dtype_bytes=2, profile=flat_profile(link_gbps=1e4)) == 0


def test_step_lower_bound_is_the_largest_resource_share():
    p = flat_profile()
    assert cost.step_lower_bound(1 * MS, 2 * MS, 0, p) == pytest.approx(2 * MS)
    assert cost.step_lower_bound(1 * MS, 2 * MS, 550e6, p) == pytest.approx(10 * MS)


@pytest.mark.parametrize("bad", [-1, float("nan"), "3"])
def test_bad_inputs_raise_a_clear_error(bad):
    with pytest.raises(cost.CostInputError, match="nbytes must be a number >= 0"):
        cost.transfer_time(bad, flat_profile())


def test_builtin_h200_reproduces_the_measured_expert_costs():
    p = load_profile("h200")
    measured = p.measurements["experts"]  # the raw H200 points the profile keeps
    for name, shape in (("mixtral-8x7b", MIXTRAL), ("olmoe-1b-7b", OLMOE)):
        nbytes = cost.expert_bytes(**shape, dtype_bytes=2)
        assert cost.transfer_time(nbytes, p) == pytest.approx(measured[name]["h2d_ms"] * MS, rel=0.05)
        assert cost.gpu_expert_time(1, **shape, dtype_bytes=2, profile=p) == pytest.approx(
            measured[name]["gpu_ms_t1"] * MS, rel=0.1)
    # DESIGN.md 4.1: copying a Mixtral expert takes ~50x its GPU compute
    ratio = cost.transfer_time(352_321_536, p) / cost.gpu_expert_time(1, **MIXTRAL, dtype_bytes=2, profile=p)
    assert 40 < ratio < 60


def test_split_lower_bound_by_hand():
    from prescope.hardware.cost import split_lower_bound

    assert split_lower_bound([], []) == 0.0
    assert split_lower_bound([1.0, 1.0], [1.0, 3.0]) == pytest.approx(1.0)  # 2nd to the link, 1st on the CPU
    assert split_lower_bound([2.0], [1.0]) == pytest.approx(2 / 3)  # one item split so both finish together
    assert split_lower_bound([1.0] * 3, [1.0] * 3) == pytest.approx(1.5)
    # a slow CPU still takes a fraction: 1 + x = 9(1 - x) at x = 0.8, so T = 1.8 (a whole-item split gives 2)
    assert split_lower_bound([1.0, 1.0], [9.0, 9.0]) == pytest.approx(1.8)
    with pytest.raises(cost.CostInputError):
        split_lower_bound([1.0], [])


def grouped_profile(**changes) -> HardwareProfile:
    """flat_profile with one grouped kernel per wave: 100 µs per wave, 2 µs per expert, 2,000 GB/s, 500 TFLOP/s."""
    import dataclasses

    from prescope.hardware.profiles import GroupedKernelModel

    grouped = GroupedKernelModel(wave_fixed_s=0.1 * MS, expert_fixed_s=0.002 * MS, mem_gbps=2000.0, tflops=500.0)
    return dataclasses.replace(flat_profile(), gpu_grouped=grouped, **changes)


def test_a_wave_without_a_grouped_model_is_its_experts_one_after_another():
    p = flat_profile()
    counts = [1, 5, 0, 300]
    assert cost.gpu_wave_time(counts, **OLMOE, dtype_bytes=2, profile=p) == pytest.approx(
        sum(cost.gpu_expert_time(n, **OLMOE, dtype_bytes=2, profile=p) for n in counts))
    assert cost.grouped_expert_time(3, **OLMOE, dtype_bytes=2, profile=p) == cost.gpu_expert_time(
        3, **OLMOE, dtype_bytes=2, profile=p)
    assert cost.gpu_wave_time([], **OLMOE, dtype_bytes=2, profile=p) == 0.0


def test_a_grouped_wave_pays_its_fixed_cost_once_then_bytes_or_flops():
    p = grouped_profile()
    one = cost.expert_bytes(**OLMOE, dtype_bytes=2)  # 12 MiB
    # 8 experts of one token: memory-bound, 100 + 8·2 µs + 8·12.58 MB / 2,000 GB/s (the docstring's example)
    assert cost.gpu_wave_time([1] * 8, **OLMOE, dtype_bytes=2, profile=p) == pytest.approx(
        0.1 * MS + 8 * 0.002 * MS + 8 * one / 2000e9)
    assert cost.gpu_wave_time([1] * 8, **OLMOE, dtype_bytes=2, profile=p) == pytest.approx(166.3e-6, rel=1e-3)
    # experts without tokens cost nothing; an empty wave nothing at all
    assert cost.gpu_wave_time([1, 0, 0], **OLMOE, dtype_bytes=2, profile=p) == cost.gpu_wave_time(
        [1], **OLMOE, dtype_bytes=2, profile=p)
    assert cost.gpu_wave_time([0, 0], **OLMOE, dtype_bytes=2, profile=p) == 0.0
    # many tokens: the wave's FLOPs bind
    flops = cost.expert_flops(2 * 100_000, **OLMOE)
    assert cost.gpu_wave_time([100_000, 100_000], **OLMOE, dtype_bytes=2, profile=p) == pytest.approx(
        0.1 * MS + 2 * 0.002 * MS + flops / 500e12)
    # one expert's share of a wave: its fixed cost and its bytes, not the wave's
    assert cost.grouped_expert_time(1, **OLMOE, dtype_bytes=2, profile=p) == pytest.approx(
        0.002 * MS + one / 2000e9)
    with pytest.raises(cost.CostInputError):
        cost.gpu_wave_time([-1], **OLMOE, dtype_bytes=2, profile=p)
