"""The simulator's prices: expert dimensions (also from bytes alone), non-expert parameters per MoE layer
(hand-computed, and from a real model's config against its own parameters), and the memoised times."""

from __future__ import annotations

from types import SimpleNamespace

from conftest import tiny_model

from prescope.hardware import cost
from prescope.hardware.profiles import load_profile
from prescope.layout import ModelLayout
from prescope.sim.simcost import SimTimes, default_dense_params, expert_dims, model_dense_params


def layout(hidden: int, width: int, dtype: str, expert_bytes: int, shared_bytes: int = 0) -> ModelLayout:
    """L = 2 MoE layers, E = 4 experts, K = 2, H = hidden, I = width."""
    return ModelLayout("TestMoeForCausalLM", "test", 2, (0, 1), (), 4, 2, hidden, width, dtype, expert_bytes,
                       shared_bytes)


def test_expert_dims_from_the_layout_or_from_bytes_alone():
    assert expert_dims(layout(8, 4, "float32", 3 * 8 * 4 * 4)) == (8, 4, 4)
    # a llama.cpp layout knows only the bytes: timed as a bfloat16 expert of H·I = 600 / (3·2)
    assert expert_dims(layout(0, 0, "q4_K", 600)) == (100, 1, 2)


def test_default_dense_params_by_hand():
    # 4·H² + E·H + 2·H = 256 + 32 + 16, plus shared experts' 400 bytes / 4 bytes per float32
    assert default_dense_params(layout(8, 4, "float32", 384)) == 304
    assert default_dense_params(layout(8, 4, "float32", 384, shared_bytes=400)) == 404


def test_model_dense_params_counts_a_moe_layers_non_expert_parameters():
    model = tiny_model("olmoe")
    block = model.model.layers[0]
    want = sum(p.numel() for n, p in block.named_parameters() if ".experts." not in f".{n}")
    assert model_dense_params(model) == want
    assert model_dense_params(SimpleNamespace(config=None)) is None


def test_times_bind_the_cost_formulas_and_memoise():
    profile = load_profile("h200")
    lay = layout(8, 4, "float32", 384)
    times = SimTimes(lay, profile, dense_params=304)
    assert times.gpu(3) == cost.gpu_expert_time(3, 8, 4, 4, profile)
    assert times.cpu(3) == cost.cpu_expert_time(3, 8, 4, 4, profile)
    assert times.of("attention", 3) == cost.dense_time(3, 304, 4, profile)
    assert times.of("dense", 3) == cost.dense_time(3, 304 + 2 * 3 * 8 * 4, 4, profile)
    assert times.link(384) == cost.transfer_time(384, profile) == times.costs().load
    assert set(times.memo) == {("gpu", 3), ("cpu", 3), ("attention", 3), ("dense", 3), ("link", 384)}


def test_each_layer_is_priced_by_its_own_expert_bytes():
    """A layout with per-layer sizes: transfers and expert times per layer at that layer's bytes; the resident
    work at the common size; a layout of one size shares one object."""
    import dataclasses

    profile = load_profile("v100-pcie3")
    lay = dataclasses.replace(layout(0, 0, "gguf", 600_000), moe_layers=(0, 1, 2), num_layers=3,
                              layer_expert_bytes=(600_000, 2_400_000, 600_000))
    times = SimTimes(lay, profile, dense_params=0)
    per = times.per_layer()
    assert [t.nbytes for t in per] == [600_000, 2_400_000, 600_000] and per[0] is times and per[2] is times
    assert per[1].link(per[1].nbytes) == cost.transfer_time(2_400_000, profile)
    assert per[1].cpu(1) == cost.cpu_expert_time(1, *expert_dims(lay, 2_400_000), profile) > per[0].cpu(1)
    assert per[1].of("attention", 4) == times.of("attention", 4)
    uniform = SimTimes(dataclasses.replace(lay, layer_expert_bytes=()), profile, dense_params=0)
    assert all(t is uniform for t in uniform.per_layer())
