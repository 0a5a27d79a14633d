"""Hardware profiles: curves, validation, JSON round trips, clear errors, fitting, the built-ins."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from prescope.hardware import cost
from prescope.hardware.profiles import (
    BandwidthCurve,
    ComputeModel,
    ProfileError,
    fit_gpu_roofline,
    fit_linear_cost,
    fit_transfer_curve,
    list_profiles,
    load_profile,
    save_profile,
    scale_profile,
)

MIB = 2**20


def test_curve_interpolates_in_log_size_and_clamps_at_the_ends():
    curve = BandwidthCurve(((1e6, 10.0), (1e8, 30.0)))
    assert curve.gbps(1e7) == pytest.approx(20.0)  # halfway in log(bytes)
    assert curve.gbps(1e3) == 10.0 and curve.gbps(1e12) == 30.0
    assert curve.peak_gbps == 30.0
    assert curve.scaled(0.5).gbps(1e7) == pytest.approx(10.0)


@pytest.mark.parametrize("points, match", [
    ((), "at least one"), (((1e6, 10.0), (1e6, 20.0)), "strictly increase"), (((1e6, -1.0),), "positive"),
])
def test_curve_rejects_bad_points(points, match):
    with pytest.raises(ProfileError, match=match):
        BandwidthCurve(points)


def test_compute_model_rejects_nonpositive_rates():
    with pytest.raises(ProfileError, match="mem_gbps > 0"):
        ComputeModel(0.0, 0.0, 1.0)
    with pytest.raises(ProfileError, match="'tflops' must be a finite number"):
        ComputeModel(0.0, 1.0, math.inf)


def test_save_and_load_round_trip(tmp_path):
    profile = load_profile("h200")
    path = save_profile(profile, tmp_path / "sub" / "copy.json")
    assert load_profile(path) == profile
    assert load_profile(str(path)) == profile
    assert [p.name for p in path.parent.iterdir()] == ["copy.json"]  # no temporary file left behind
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_bad_profile_files_get_errors_naming_the_problem(tmp_path):
    data = load_profile("h200").to_dict()
    del data["gpu_expert"], data["transfer_latency_s"]
    data["colour"] = "blue"
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"missing field\(s\) \['transfer_latency_s', 'gpu_expert'\], "
                                           r"unknown field\(s\) \['colour'\]"):
        load_profile(tmp_path / "a.json")
    data = load_profile("h200").to_dict() | {"source": "guessed"}
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="'source' must be one of"):
        load_profile(tmp_path / "b.json")
    data = load_profile("h200").to_dict()
    data["gpu_dense"] = {"fixed_s": 0.0, "mem_gbps": 1.0}
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="c.json: malformed field value"):
        load_profile(tmp_path / "c.json")
    (tmp_path / "d.json").write_text("{")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(tmp_path / "d.json")
    with pytest.raises(ProfileError, match=r"unknown profile 'h300'.*'h200'"):
        load_profile("h300")
    with pytest.raises(FileNotFoundError):
        load_profile(tmp_path / "missing.json")


def test_builtins_are_listed_and_say_where_they_come_from():
    assert list_profiles() == ["a100-pcie4", "h200", "h200-graphs", "v100-pcie3"]
    h200 = load_profile("h200")
    assert h200.source == "measured" and h200.date == "2026-11-28"
    assert "h200-measured-2026-11-28.json" in h200.source_files
    assert h200.measurements["experts"]["mixtral-8x7b"]["h2d_ms"] > 0  # raw points kept
    for name, peak, gpu_sheet in (("a100-pcie4", 25.0, "312 TFLOPS"), ("v100-pcie3", 12.5, "112 TFLOPS")):
        p = load_profile(name)
        assert p.source == "published" and "ESTIMATE" in p.description
        assert gpu_sheet in p.citation and "datasheet" in p.citation
        assert p.pinned_h2d.peak_gbps == pytest.approx(peak)
        assert p.gpu_expert.tflops < h200.gpu_expert.tflops and p.gpu_expert.fixed_s == h200.gpu_expert.fixed_s
        assert p.cpu_expert == h200.cpu_expert


def test_h200_curve_reproduces_every_measured_pinned_copy():
    raw = load_profile("h200").measurements["h2d"]
    p = load_profile("h200")
    for mb, row in raw.items():
        n = float(mb) * MIB
        assert cost.transfer_time(n, p) == pytest.approx(n / (row["pinned_GBps"] * 1e9), rel=1e-9)
        assert cost.transfer_time(n, p, pinned=False) == pytest.approx(n / (row["pageable_GBps"] * 1e9), rel=1e-9)


def test_builtin_profiles_are_reproducible_from_the_shipped_measurements(tmp_path):
    from prescope.experiments.calibrate import HARDWARE_DIR, build_builtin_profiles

    for path in build_builtin_profiles(HARDWARE_DIR, tmp_path):
        assert_close(load_profile(path).to_dict(), load_profile(path.stem).to_dict(), path.stem)


def assert_close(got, want, where: str) -> None:
    """Equal structures, floats within the rounding of a least-squares fit (machines differ at 1e-15)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15), where
    else:
        assert got == want, where


def test_scale_profile_changes_only_what_it_is_asked():
    h200 = load_profile("h200")
    slow = scale_profile(h200, name="slow", link_gbps=11.0, gpu_mem_ratio=0.5, source="published")
    assert slow.pinned_h2d.peak_gbps == pytest.approx(11.0)
    assert slow.gpu_expert.mem_gbps == pytest.approx(h200.gpu_expert.mem_gbps / 2)
    assert slow.gpu_expert.tflops == h200.gpu_expert.tflops
    assert slow.transfer_latency_s == h200.transfer_latency_s and slow.measurements == {}
    with pytest.raises(ProfileError, match="GPU ratios must be > 0"):
        scale_profile(h200, name="x", gpu_flops_ratio=0)


def test_fit_transfer_curve_recovers_latency_and_bandwidth():
    sizes = [MIB * 2**k for k in range(0, 10, 2)]
    latency, curve = fit_transfer_curve(sizes, [20e-6 + n / 40e9 for n in sizes])
    assert latency == pytest.approx(20e-6)
    assert all(g == pytest.approx(40.0) for _, g in curve.points)
    latency, _ = fit_transfer_curve(sizes, [20e-6 + n / 40e9 for n in sizes], latency_s=5e-6)
    assert latency == 5e-6


def test_fit_gpu_roofline_recovers_synthetic_constants():
    truth = ComputeModel(0.1e-3, 3000.0, 600.0)
    nbytes = np.array([1e6, 1e7, 3.5e8, 3.5e8, 3.5e8, 1.5e8])
    flops = np.array([1e9, 1e10, 3.5e8, 1e13, 1e14, 1e10])
    seconds = [cost.gpu_time(b, f, truth) for b, f in zip(nbytes, flops, strict=True)]
    model, err = fit_gpu_roofline(nbytes, flops, seconds)
    assert err == pytest.approx(0.0, abs=1e-9)
    assert (model.fixed_s, model.mem_gbps, model.tflops) == pytest.approx((0.1e-3, 3000.0, 600.0))


def test_fit_linear_cost_recovers_synthetic_constants_and_drops_absent_terms():
    truth = ComputeModel(0.2e-3, 80.0, 4.0)
    nbytes = np.repeat([1e7, 3e8], 4)
    flops = np.tile([1e9, 4e9, 16e9, 64e9], 2) * np.repeat([1, 30], 4)
    seconds = [cost.cpu_time(b, f, truth) for b, f in zip(nbytes, flops, strict=True)]
    model, err = fit_linear_cost(nbytes, flops, seconds)
    assert err == pytest.approx(0.0, abs=1e-9)
    assert (model.fixed_s, model.mem_gbps, model.tflops) == pytest.approx((0.2e-3, 80.0, 4.0))
    model, _ = fit_linear_cost(nbytes, flops, [1e-3 + b / 80e9 for b in nbytes])
    assert model.tflops == 1e9  # the FLOP term was absent: negligible, not negative


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["pinned_h2d"][0].__setitem__(1, "55"), r"bandwidth curve GB/s must be a number, got '55' \(str\)"),
    (lambda d: d["pinned_h2d"][0].__setitem__(1, True), r"bandwidth curve GB/s must be a number, got True"),
    (lambda d: d["pageable_h2d"][0].__setitem__(0, "1MB"), r"bandwidth curve size must be a number"),
    (lambda d: d["gpu_expert"].__setitem__("mem_gbps", True), r"'mem_gbps' must be a finite number, got True"),
    (lambda d: d.__setitem__("transfer_latency_s", False), r"'transfer_latency_s' must be a finite number"),
    (lambda d: d.__setitem__("cpu_expert", ["bfloat16"]), r"'cpu_expert' must map dtype names"),
    (lambda d: d.__setitem__("notes", "one note"), r"'notes' must be a list of strings"),
])
def test_loose_values_in_a_profile_file_are_refused(tmp_path, edit, match):
    data = load_profile("h200").to_dict()
    edit(data)
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=rf"p.json: .*{match}"):
        load_profile(tmp_path / "p.json")


def test_saved_and_builtin_profiles_carry_a_checksum_that_is_checked(tmp_path):
    from prescope import files

    for name in list_profiles():
        assert files.verify(Path(__file__).resolve().parents[2] / "prescope" / "assets" / "profiles" / f"{name}.json")
    path = save_profile(load_profile("h200"), tmp_path / "mine.json")
    assert load_profile(path) == load_profile("h200")
    path.write_text(path.read_text().replace('"gpu": "NVIDIA H200"', '"gpu": "NVIDIA H100"'))
    with pytest.raises(ProfileError, match=r"mine.json: checksum mismatch"):
        load_profile(path)
    by_hand = load_profile("h200").to_dict()  # a profile written by hand carries none: it loads
    (tmp_path / "hand.json").write_text(json.dumps(by_hand))
    assert load_profile(tmp_path / "hand.json").name == "h200"


def test_grouped_kernel_fit_recovers_known_constants():
    from prescope.hardware.profiles import fit_grouped_kernel

    rng = np.random.default_rng(0)
    waves = rng.integers(1, 64, 12).astype(float)  # layers of a step
    experts = waves * rng.uniform(1, 100, 12)
    nbytes = experts * rng.choice([9 * MIB, 12 * MIB, 336 * MIB], 12)
    truth = (120e-6, 2e-6, 3000.0)
    seconds = waves * truth[0] + experts * truth[1] + nbytes / (truth[2] * 1e9)
    model, err = fit_grouped_kernel(waves.tolist(), experts.tolist(), nbytes.tolist(), seconds.tolist(), tflops=500.0)
    assert (model.wave_fixed_s, model.expert_fixed_s, model.mem_gbps) == pytest.approx(truth, rel=1e-6)
    assert model.tflops == 500.0 and err < 1e-9
    noisy = seconds * rng.uniform(0.95, 1.05, 12)  # 5 % noise: the constants within a few per cent
    model, err = fit_grouped_kernel(waves.tolist(), experts.tolist(), nbytes.tolist(), noisy.tolist(), tflops=500.0)
    assert model.mem_gbps == pytest.approx(truth[2], rel=0.1) and model.wave_fixed_s == pytest.approx(truth[0], rel=0.2)
    assert 0 < err < 0.05
    with pytest.raises(ProfileError, match="positive times"):
        fit_grouped_kernel([1.0], [1.0], [1.0], [-1e-3], tflops=1.0)


def test_profiles_without_the_grouped_fields_load_as_before_and_with_them_round_trip(tmp_path):
    from prescope.hardware.profiles import OPTIONAL_FIELDS, GroupedKernelModel

    old = load_profile("h200")  # written before the fields existed
    assert old.gpu_grouped is None and old.host_device_driven_per_layer_s is None
    assert old.host_per_layer(device_driven=True) == old.host_per_layer() == old.host_overhead_per_layer_s
    assert not set(OPTIONAL_FIELDS) & set(old.to_dict())  # unset: left out of the file, as before
    data = old.to_dict()
    data.pop("checksum", None)
    data |= {"gpu_grouped": None, "host_device_driven_per_layer_s": None}  # null: the same as absent
    (tmp_path / "null.json").write_text(json.dumps(data))
    assert load_profile(tmp_path / "null.json") == old
    new = load_profile("h200-graphs")
    assert isinstance(new.gpu_grouped, GroupedKernelModel)
    assert new.host_per_layer(device_driven=True) == new.host_device_driven_per_layer_s
    assert load_profile(save_profile(new, tmp_path / "g.json")) == new
    data = new.to_dict()
    data.pop("checksum", None)
    data["gpu_grouped"] = {"wave_fixed_s": 1e-4, "expert_fixed_s": -1.0, "mem_gbps": 1.0, "tflops": 1.0}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="bad.json: field 'gpu_grouped': .*fixed costs >= 0"):
        load_profile(tmp_path / "bad.json")
    data["gpu_grouped"] = [1, 2]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="bad.json: field 'gpu_grouped': must be an object"):
        load_profile(tmp_path / "bad.json")
    scaled = scale_profile(new, name="half", gpu_mem_ratio=0.5)
    assert scaled.gpu_grouped.mem_gbps == pytest.approx(new.gpu_grouped.mem_gbps / 2)
    assert scaled.gpu_grouped.wave_fixed_s == new.gpu_grouped.wave_fixed_s
