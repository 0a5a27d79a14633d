"""Calibration: fitting synthetic measurements, the real CPU measurement path, the CLI."""

import json

import pytest
import torch

from prescope import cli
from prescope.experiments import calibrate
from prescope.hardware import cost
from prescope.hardware.profiles import ComputeModel, load_profile
from prescope.models import twins

H200_FILE = calibrate.HARDWARE_DIR / "h200-measured-2026-11-28.json"  # shipped with the package
MIB, MS = 2**20, 1e-3
GPU = ComputeModel(0.1e-3, 3000.0, 600.0)
CPU_BF16 = ComputeModel(0.2e-3, 80.0, 4.0)
CPU_F32 = ComputeModel(0.05e-3, 150.0, 1.0)


def synthetic_measurements() -> dict:
    """Raw measurements in the H200 file's layout, generated from known models."""
    experts = {}
    for name, (h, i) in {"big": (4096, 14336), "mid": (2880, 2880), "small": (2048, 768)}.items():
        params = 3 * h * i
        row = {"expert_MB_bf16": params * 2 / MIB}
        for n in (1, 4, 16, 64, 1024):
            row[f"gpu_ms_t{n}"] = cost.gpu_time(2 * params, 2 * n * params, GPU) / MS
        for n in (1, 4, 16, 64):
            row[f"cpu_bfloat16_ms_t{n}"] = cost.cpu_time(2 * params, 2 * n * params, CPU_BF16) / MS
            row[f"cpu_float32_ms_t{n}"] = cost.cpu_time(4 * params, 2 * n * params, CPU_F32) / MS
        experts[name] = row
    h2d = {str(mb): {"pinned_GBps": mb * MIB / (10e-6 + mb * MIB / 50e9) / 1e9, "pageable_GBps": 8.0}
           for mb in (1, 4, 16, 64, 256)}
    return {"device": "synthetic", "torch": "x", "cpu_threads": 4, "h2d": h2d, "experts": experts}


def test_profile_from_measurements_recovers_the_generating_models():
    p = calibrate.profile_from_measurements(
        synthetic_measurements(), name="syn", description="d", source="calibrated", citation="c", gpu="g",
        cpu="c", date="2026-01-01", host_overhead_per_layer_s=0.0, predict_overhead_s=0.0, plan_overhead_s=0.0)
    assert p.transfer_latency_s == pytest.approx(10e-6)
    assert p.pinned_h2d.peak_gbps == pytest.approx(50.0)
    for got, want in ((p.gpu_expert, GPU), (p.cpu_expert["bfloat16"], CPU_BF16), (p.cpu_expert["float32"], CPU_F32)):
        assert (got.fixed_s, got.mem_gbps, got.tflops) == pytest.approx((want.fixed_s, want.mem_gbps, want.tflops))
    assert p.gpu_dense == p.gpu_expert  # not measured: reuses the expert fit
    assert p.fit["gpu_expert_rms_log_error"] == pytest.approx(0.0, abs=1e-6)
    assert p.measurements["experts"]["big"]["gpu_ms_t1"] > 0


def test_expert_points_derive_bytes_and_flops_from_the_bf16_size():
    table = {"x": {"expert_MB_bf16": 12.0, "gpu_ms_t4": 0.5, "cpu_float32_ms_t2": 1.0}}
    params = 12 * MIB / 2
    assert calibrate.expert_points(table, "gpu", 2) == ([2 * params], [8 * params], [0.5e-3])
    assert calibrate.expert_points(table, "cpu_float32", 4) == ([4 * params], [4 * params], [1e-3])


def test_host_overhead_from_probes_subtracts_the_modelled_gpu_work():
    p = load_profile("h200")
    size = twins.twin_sizes("mixtral-8x7b", 8)
    gpu = 2 * cost.gpu_expert_time(1, 4096, 14336, 2, p) + cost.dense_time(
        1, size["non_expert_params_per_moe_layer"], 2, p)
    got = calibrate.host_overhead_from_probes([{"twin": "mixtral-8x7b", "num_layers": 8, "step_s": 8 * 2e-3}], p)
    assert got == pytest.approx(2e-3 - gpu)


def test_expert_forward_matches_a_hand_written_swiglu():
    gate_up, down = calibrate.expert_weights(8, 16, torch.float32, "cpu")
    x = torch.randn(3, 8)
    g, u = x @ gate_up[:16].T, x @ gate_up[16:].T
    assert torch.allclose(calibrate.expert_forward(x, gate_up, down), (torch.nn.functional.silu(g) * u) @ down.T)


def test_cpu_measurement_path_runs_for_real():
    row = calibrate.measure_expert(256, 512, (1, 8), "cpu", torch.float32, repeats=3, warmup=1)
    assert set(row) == {"t1", "t8"} and all(v > 0 for v in row.values())
    profile = calibrate.calibrate("cpu", token_counts=(1, 4, 16), shapes=((256, 512), (512, 1024)),
                                  cpu_only=True, repeats=3, warmup=1, progress=False, name="here")
    assert profile.source == "calibrated" and profile.name == "here"
    assert set(profile.cpu_expert) == {"bfloat16", "float32"}
    assert profile.pinned_h2d == load_profile("h200").pinned_h2d  # copied from the base, and said so
    assert "--cpu-only" in profile.notes[0]
    assert set(profile.measurements["experts"]) == {"256x512", "512x1024"}


def test_host_overhead_measurement_runs_on_the_cpu():
    assert calibrate.measure_host_overhead("cpu", repeats=1, warmup=1) >= 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_gpu_parts_are_refused_clearly():
    with pytest.raises(calibrate.CalibrationError, match="no CUDA device.*--cpu-only"):
        calibrate.calibrate("cuda", progress=False)


def test_cli_fits_a_stored_measurement_file(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert cli.main(["calibrate", "--out", str(out), "--from-measurements", str(H200_FILE)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(printed[-1])
    assert summary["out"] == str(out) and summary["source"] == "calibrated"
    assert any(line.startswith("pinned H2D peak") for line in printed)
    fitted, builtin = load_profile(out), load_profile("h200")
    assert close(fitted.gpu_expert, builtin.gpu_expert)  # a least-squares fit: equal up to rounding
    assert fitted.cpu_expert.keys() == builtin.cpu_expert.keys()
    assert all(close(fitted.cpu_expert[k], builtin.cpu_expert[k]) for k in builtin.cpu_expert)


def close(a, b) -> bool:
    """Two compute models equal within floating-point rounding of a fit."""
    return (a.fixed_s, a.mem_gbps, a.tflops) == pytest.approx((b.fixed_s, b.mem_gbps, b.tflops), rel=1e-9)


def test_cli_reports_a_bad_measurement_file(tmp_path, capsys):
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"h2d": {}}))
    assert cli.main(["calibrate", "--out", str(tmp_path / "p.json"), "--from-measurements", str(bad)]) == 2
    assert "prescope calibrate: error" in capsys.readouterr().err


def test_cli_names_a_measurement_file_that_is_not_json_and_checks_out_first(tmp_path, capsys):
    (tmp_path / "m.json").write_text("{")
    assert cli.main(["calibrate", "--out", str(tmp_path / "p.json"), "--from-measurements", str(tmp_path / "m.json")]) == 2
    assert f"{tmp_path / 'm.json'}: not valid JSON" in capsys.readouterr().err
    (tmp_path / "FILE").write_text("x")
    assert cli.main(["calibrate", "--cpu-only", "--out", str(tmp_path / "FILE" / "p.json")]) == 2
    assert "FILE is a file" in capsys.readouterr().err
