"""The family sweep: every MoE family of the installed transformers, discovered from its config classes, gives
the stock output through the engine in every cell (on_demand_lru at the smallest budget, prescope[gate=False],
cpu_misses, belady on the stock run's routing), or is refused with the adapter's message, or is skipped
for the reason `SKIP` gives. A family that appears in a new transformers must pass or be refused here."""

from __future__ import annotations

import json

import pytest
import torch

from prescope import cli
from prescope.experiments import families as sweep
from prescope.models import adapter, families

pytestmark = pytest.mark.families

REFUSED = {  # family: what the adapter's refusal must say (besides the model class)
    "aria_text": "split across modules",
    "jetmoe": "split across modules",
    "doge": "no module holds per-expert weight matrices",
    "longcat_flash": "zero-computation (identity) experts are not supported",
    "switch_transformers": "encoder-decoder models are not supported",
    "nllb-moe": "encoder-decoder models are not supported",
}
FAMILIES = families.discover()


@pytest.mark.parametrize("family", FAMILIES, ids=[f.model_type for f in FAMILIES])
def test_family_is_stock_through_the_engine_or_refused(family, one_thread):
    if family.skip:
        pytest.skip(f"{family.model_type}: {family.skip}")
    row = sweep.check_family(family)
    if family.model_type in REFUSED:
        assert row["status"] == "refused", f"{family.model_type} was expected to be refused: {REFUSED[family.model_type]}"
        assert REFUSED[family.model_type] in row["reason"] and row["model_class"] in row["reason"]
        return
    assert row["status"] == "supported", row["reason"]
    failed = {label: cell for label, cell in row["cells"].items() if not sweep.passed(cell)}
    assert not failed, f"{family.model_type}: offloaded output differs from stock: {failed}"
    assert set(row["cells"]) == {c.label for c in sweep.CELLS}


def test_refused_families_are_still_discovered():
    assert set(REFUSED) <= {f.model_type for f in FAMILIES}, "a family refused here is gone: update REFUSED"


def test_the_command_writes_the_table_and_rows(tmp_path, one_thread):
    out = tmp_path / "families.md"
    assert cli.main(["families", "--families", "mixtral", "llama4_text", "nllb-moe", "--new-tokens", "2",
                     "--out", str(out)]) == 0
    text = out.read_text()
    assert "Measured on the CPU, float32, with transformers" in text and "git revision" in text
    assert "| mixtral | MixtralForCausalLM | supported |" in text
    assert "block call, input-weighted" in text  # Llama 4
    assert "| nllb-moe | NllbMoeForConditionalGeneration | refused |" in text
    assert "encoder-decoder models are not supported" in text
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["family"] for r in rows] == ["llama4_text", "mixtral", "nllb-moe"]
    assert all(sweep.passed(c) for r in rows for c in r["cells"].values())
    assert cli.main(["families", "--families", "llama", "--out", str(out)]) == 2  # not a MoE family: an error


def test_gemma4_as_the_hub_loads_its_moe_checkpoints(one_thread):
    """Gemma-4-26B-A4B loads through AutoModelForCausalLM as Gemma4ForConditionalGeneration (a vision tower
    beside the decoder); its MoE text config shares keys and values and has no per-layer inputs."""
    import transformers

    text = families.tiny_config(families.family("gemma4_text")).to_dict()
    text.update(attention_k_eq_v=True, hidden_size_per_layer_input=0)
    vision = {k: v for k, v in families.SMALL.items() if k in transformers.Gemma4VisionConfig.__annotations__}
    config = transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=None)
    torch.manual_seed(0)
    stock = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert type(stock).__name__ == "Gemma4ForConditionalGeneration"
    layout = adapter.describe(stock)
    assert (layout.num_experts, layout.top_k, layout.moe_layers) == (6, 2, (0, 1, 2))
    ids, mask = sweep.prompt(stock.config.get_text_config().vocab_size)
    reference = sweep.generate(stock, ids, mask)
    for cell in sweep.CELLS:
        assert sweep.passed(sweep.run_cell(stock, layout, cell, ids, mask, reference)), cell.label


DECODERS = [f for f in FAMILIES if not f.skip and not f.encoder_decoder and f.model_type not in REFUSED]


@pytest.mark.parametrize("family", DECODERS, ids=[f.model_type for f in DECODERS])
def test_the_engines_own_decode_loop_gives_the_stock_tokens(family, one_thread):
    """`engine.generate` (the static-KV-cache loop that bench and the CUDA graphs run; transformers' loop for
    models with recurrent layers) on a left-padded batch of 2, half the experts on the GPU: stock's greedy tokens."""
    import copy

    from prescope.config import EngineConfig
    from prescope.engine.engine import Engine

    stock = families.tiny_model(family, seed=1)
    torch.manual_seed(0)
    ids = torch.randint(1, 60, (2, 6))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    ref = stock.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with Engine(copy.deepcopy(stock), EngineConfig(policy="on_demand_lru", budget_share=0.5, device="cpu")) as engine:
        out = engine.generate(ids, mask, max_new_tokens=4)
    assert torch.equal(out.sequences, ref), f"{family.model_type} ({out.mode}): tokens differ from stock"
    assert (out.mode == "transformers") == bool(adapter.kv_cache_only(stock))
