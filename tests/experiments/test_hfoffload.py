"""accelerate's offload baseline on the CPU: the execution device is the CPU, the cap applies to CPU memory
and what does not fit goes to disk, streamed back by the same hooks a GPU run uses. Greedy generate() must give
the stock tokens; the byte accounting must match the device map and transformers' own sizes; bad input fails
clearly."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import transformers
from conftest import tiny_config, tiny_model
from transformers.integrations.accelerate import compute_module_sizes

from prescope.experiments import hfoffload
from prescope.models import adapter

PROMPT = [[5, 17, 33, 2, 9, 60, 41]]
NEW_TOKENS = 6
SPLIT_ARCHS = ("olmoe", "mixtral", "deepseek_v2")  # plain, Mixtral-style, shared experts + a dense layer


def _model(arch: str, tie: bool = False):
    if tie:
        torch.manual_seed(0)
        cfg = tiny_config(arch)
        cfg.tie_word_embeddings = True
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    else:
        model = tiny_model(arch)
    model.generation_config.eos_token_id = None  # random weights: let every row run to max_new_tokens
    return model


def _greedy(model, device: str = "cpu") -> torch.Tensor:
    ids = torch.tensor(PROMPT, device=device)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=0)


def _split_cap(model) -> int:
    """A cap at which the first decoder layer stays on the device and later ones go to disk (found, not assumed:
    accelerate holds back room for one whole layer, so small shares place no layer at all)."""
    for share in (0.5, 0.75, 0.9):
        cap = hfoffload.offload_gpu_bytes(model, share)
        device_map = hfoffload.auto_device_map(model, "cpu", cap)
        if device_map.get("model.layers.0") == "cpu" and "disk" in device_map.values():
            return cap
    pytest.fail(f"{type(model).__name__}: no budget share gave a device/disk split")


@pytest.mark.parametrize("tie", [False, True])
def test_model_bytes_match_transformers_sizes(tie):
    model = _model("olmoe", tie)
    assert hfoffload.model_bytes(model) == compute_module_sizes(model)[0][""]


def test_offload_gpu_bytes_is_non_expert_plus_engine_slots():
    model = _model("mixtral")
    layout = adapter.describe(model)
    expert_ids = {id(p) for lay in adapter.moe_layers(model) for p in lay.experts.parameters()}
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in expert_ids)
    resident += sum(b.numel() * b.element_size() for b in model.buffers())
    assert hfoffload.non_expert_bytes(model) == resident
    assert layout.num_moe_layers * layout.num_experts == 18  # 3 layers x 6 experts
    for share, slots in ((0.25, 4), (0.5, 9), (1.0, 18)):  # round(share * 18)
        assert hfoffload.offload_gpu_bytes(model, share) == resident + slots * layout.expert_bytes
    with pytest.raises(ValueError, match="top-k"):
        hfoffload.offload_gpu_bytes(model, 0.05)  # round(0.9) = 1 slot < K = 2


@pytest.mark.parametrize("arch", SPLIT_ARCHS)
def test_auto_offload_generates_stock_tokens(arch, tmp_path, one_thread):
    model = _model(arch)
    stock = _greedy(model)
    cap = _split_cap(model)
    offloaded, placement = hfoffload.accelerate_offload(copy.deepcopy(model), "cpu", cap, offload_dir=tmp_path)
    assert torch.equal(_greedy(offloaded), stock)
    assert placement.mode == "auto" and placement.device == "cpu" and placement.gpu_bytes == cap
    assert placement.device_bytes + placement.offloaded_bytes == hfoffload.model_bytes(model)
    assert 0 < placement.device_bytes <= cap and placement.disk_bytes > 0 and placement.host_bytes == 0
    assert placement.blocks == adapter.describe(model).num_layers
    assert 0 < placement.blocks_on_device < placement.blocks
    layers = offloaded.model.layers  # resident layers keep their weights; offloaded ones wait on "meta"
    assert {p.device.type for p in layers[0].parameters()} == {"cpu"}
    assert {p.device.type for p in layers[-1].parameters()} == {"meta"}


def test_auto_map_is_what_from_pretrained_gives(tmp_path, one_thread):
    model = _model("olmoe")
    cap = _split_cap(model)
    model.save_pretrained(tmp_path / "model")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": cap}, offload_folder=tmp_path / "hf")
    assert hfoffload.auto_device_map(model, "cpu", cap) == loaded.hf_device_map
    _, placement = hfoffload.accelerate_offload(copy.deepcopy(model), "cpu", cap, offload_dir=tmp_path / "ours")
    assert placement.device_map == {k: str(v) for k, v in loaded.hf_device_map.items()}


def test_placement_bytes_follow_the_device_map(tmp_path):
    model = _model("olmoe")
    cap = _split_cap(model)
    device_map = hfoffload.auto_device_map(model, "cpu", cap)
    sizes = compute_module_sizes(model)[0]
    on_device = sum(sizes[name] for name, where in device_map.items() if where == "cpu")
    on_disk = sum(sizes[name] for name, where in device_map.items() if where == "disk")
    _, placement = hfoffload.accelerate_offload(model, "cpu", cap, offload_dir=tmp_path)
    assert (placement.device_bytes, placement.disk_bytes) == (on_device, on_disk)
    json.dumps(placement.to_dict())


def test_full_budget_keeps_everything_on_the_device(tmp_path):
    model = _model("olmoe")
    _, placement = hfoffload.accelerate_offload(model, "cpu", hfoffload.offload_gpu_bytes(model, 1.0))
    assert placement.device_map == {"": "cpu"} and placement.offloaded_bytes == 0
    assert placement.blocks_on_device == placement.blocks


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.filterwarnings("ignore:You are calling .generate:UserWarning")  # streamed weights sit on "meta"
def test_stream_generates_stock_tokens(tie, one_thread):
    model = _model("olmoe", tie)
    stock = _greedy(model)
    streamed, placement = hfoffload.accelerate_stream(copy.deepcopy(model), "cpu")
    assert torch.equal(_greedy(streamed), stock)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert placement.mode == "stream" and placement.host_bytes == param_bytes
    assert placement.device_bytes == hfoffload.model_bytes(model) - param_bytes
    assert placement.blocks_on_device == 0 and placement.blocks == adapter.describe(model).num_layers


def test_tied_model_offloads_and_counts_shared_weights_once(tmp_path, one_thread):
    model = _model("olmoe", tie=True)
    stock = _greedy(model)
    cap = _split_cap(model)
    offloaded, placement = hfoffload.accelerate_offload(copy.deepcopy(model), "cpu", cap, offload_dir=tmp_path)
    assert torch.equal(_greedy(offloaded), stock)
    assert placement.device_bytes + placement.offloaded_bytes == hfoffload.model_bytes(model)


def test_budget_below_non_expert_weights_is_refused():
    model = _model("olmoe")
    floor = hfoffload.non_expert_bytes(model)
    with pytest.raises(hfoffload.OffloadBudgetError, match=f"{floor - 1}.*{floor} bytes of non-expert"):
        hfoffload.accelerate_offload(model, "cpu", floor - 1)
    with pytest.raises(hfoffload.OffloadBudgetError, match="positive"):
        hfoffload.auto_device_map(model, "cpu", 0)


def test_disk_spill_without_offload_dir_is_refused():
    model = _model("olmoe")
    with pytest.raises(hfoffload.OffloadSetupError, match="offload_dir"):
        hfoffload.accelerate_offload(model, "cpu", _split_cap(model))
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())  # refused before any hook was attached


def test_dispatched_or_misplaced_models_are_refused(tmp_path):
    model = _model("olmoe")
    hfoffload.accelerate_stream(model, "cpu")
    with pytest.raises(hfoffload.OffloadSetupError, match="already carries accelerate hooks"):
        hfoffload.accelerate_offload(model, "cpu", 10**9)
    fresh = _model("olmoe")
    with pytest.raises(hfoffload.OffloadSetupError, match="'cpu' or 'cuda"):
        hfoffload.accelerate_stream(fresh, "meta")
    fresh.lm_head.to("meta")
    with pytest.raises(hfoffload.OffloadSetupError, match=r"weights on \['meta'\]"):
        hfoffload.accelerate_offload(fresh, "cpu", 10**9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(hfoffload.OffloadSetupError, match="CUDA is not available"):
        hfoffload.accelerate_offload(_model("olmoe"), "cuda:0", 10**9)


def test_missing_no_split_classes_are_refused():
    model = _model("olmoe")
    model._no_split_modules = None
    with pytest.raises(hfoffload.OffloadSetupError, match="no_split"):
        hfoffload.auto_device_map(model, "cpu", 10**9)
    assert hfoffload.auto_device_map(model, "cpu", 10**9, no_split=["OlmoeDecoderLayer"]) == {"": "cpu"}


def test_missing_accelerate_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # makes `import accelerate` raise ImportError
    with pytest.raises(ImportError, match=r"prescope\[gpu\]"):
        hfoffload.accelerate_stream(_model("olmoe"), "cpu")


def test_placement_validates():
    good = dict(mode="auto", device="cpu", gpu_bytes=1, device_bytes=1, host_bytes=0, disk_bytes=0,
                device_map={"": "cpu"}, blocks=2, blocks_on_device=2)
    hfoffload.Placement(**good)
    with pytest.raises(ValueError, match="mode"):
        hfoffload.Placement(**{**good, "mode": "balanced"})
    with pytest.raises(ValueError, match="host_bytes"):
        hfoffload.Placement(**{**good, "host_bytes": -1})
    with pytest.raises(ValueError, match="blocks_on_device"):
        hfoffload.Placement(**{**good, "blocks_on_device": 3})
