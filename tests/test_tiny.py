"""Tests of prescope.tiny: the committed model loads, is an OLMoE of the right topology, beats its
random twin on held-out text, generates text, and the training loop learns on the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prescope import cli, corpus, tiny

CORPUS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"
SAMPLE_TOKENS = 128  # held-out tokens per domain in the loss test (CPU time is the limit)


@pytest.fixture(scope="module")
def committed():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(tiny.TINY_DIR, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny.TINY_DIR)


@pytest.fixture(scope="module")
def heldout_ids(committed) -> dict[str, np.ndarray]:
    _, tokenizer = committed
    splits = corpus.load_splits(tiny.TinyConfig().corpus_spec(CORPUS_DIR))
    # A window from the middle of each domain's held-out text, not its first lines (card prompts).
    return {d: tiny.encode_documents(tokenizer, [s.heldout_text()])[1000 : 1000 + SAMPLE_TOKENS]
            for d, s in splits.items()}


def test_committed_model_is_olmoe_topology(committed):
    model, tokenizer = committed
    assert type(model).__name__ == "OlmoeForCausalLM"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == (16, 64, 8)
    assert tokenizer.eos_token_id == tiny.EOS_ID and tokenizer.pad_token_id == tiny.PAD_ID
    assert len(tokenizer) == cfg.vocab_size
    weights = sum(p.stat().st_size for p in tiny.TINY_DIR.glob("*.safetensors"))
    assert weights <= 32 * 1024 * 1024


def test_committed_model_beats_random_twin_on_heldout(committed, heldout_ids):
    model, tokenizer = committed
    config = tiny.TinyConfig(**{k: v for k, v in _card()["config"].items() if k in tiny.TinyConfig.__dataclass_fields__})
    twin = tiny.build_model(config).eval()
    trained = tiny.evaluate_domains(model, tokenizer, heldout_ids, seq_len=128, max_tokens=SAMPLE_TOKENS)
    random = tiny.evaluate_domains(twin, tokenizer, heldout_ids, seq_len=128, max_tokens=SAMPLE_TOKENS)
    assert list(trained["domain"]) == list(corpus.DOMAINS)
    assert (random["loss"] > math.log(config.vocab_size) - 0.5).all()
    margin = random["loss"].to_numpy() - trained["loss"].to_numpy()
    assert (margin > 2.0).all() and margin.mean() > 3.0, trained.assign(random=random["loss"])


def test_greedy_generate_is_not_degenerate(committed):
    model, tokenizer = committed
    prompt = tokenizer("The history of the city begins in the", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tiny.PAD_ID)
    new = out[0, prompt["input_ids"].size(1):].tolist()
    assert len(new) >= 8
    assert len(set(new)) >= 4, tokenizer.decode(new)
    assert tokenizer.decode(new).strip()


def test_load_tiny_returns_model_and_tokenizer(committed):
    model, tokenizer = tiny.load_tiny()
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.decode(tokenizer("def f(x):")["input_ids"]) == "def f(x):"
    with pytest.raises(FileNotFoundError, match="config.json"):
        tiny.load_tiny(Path("/nonexistent"))


def test_card_records_heldout_and_routing_placeholder():
    card = _card()
    assert {r["domain"] for r in card["heldout"]} == set(corpus.DOMAINS)
    assert tiny.CARD_ROUTING_KEY in card
    assert "prescope train-tiny" in card["command"]
    assert (tiny.TINY_DIR / "README.md").read_text().count("## ") >= 6


def test_training_steps_reduce_loss_on_cpu():
    config = tiny.TinyConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_layers=2, num_heads=2,
                             num_experts=8, top_k=2, seq_len=32, batch_size=8, steps=30, lr=1e-2,
                             warmup_steps=3, max_position=64)
    stream = np.tile(np.arange(2, 50, dtype=np.uint16), 200)  # a learnable periodic sequence
    model = tiny.build_model(config)
    result = tiny.train(model, stream, config, progress=False, log_every=0)
    assert result.steps == 30 and result.tokens == 30 * 8 * 32
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 1.0
    assert model.config._experts_implementation == "grouped_mm"


def test_build_model_is_seeded():
    config = tiny.TinyConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_layers=1, num_heads=2,
                             num_experts=4, top_k=2, seq_len=16, max_position=64)
    a, b, c = tiny.build_model(config, 1), tiny.build_model(config, 1), tiny.build_model(config, 2)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_save_and_load_round_trip(tmp_path):
    config = tiny.TinyConfig(vocab_size=300, hidden_size=32, intermediate_size=16, num_layers=1, num_heads=2,
                             num_experts=4, top_k=2, seq_len=16, max_position=64)
    tokenizer = tiny.build_tokenizer(["hello world, tiny model. " * 50, "def f(x):\n    return x\n" * 50], 300)
    model = tiny.build_model(config)
    card = {"architecture": {"num_layers": 1, "num_experts": 4, "top_k": 2}, "params": tiny.count_parameters(model),
            "training": {"steps": 0}, "heldout": [], "continuations": [], "command": "x", "python": "3"}
    tiny.save_tiny(model, tokenizer, tmp_path, card)
    loaded, tok = tiny.load_tiny(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model.to(torch.bfloat16).float()(input_ids=ids).logits,
                               atol=1e-4, rtol=1e-4)
    assert tok.eos_token_id == tiny.EOS_ID
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_lr_schedule_formula():
    config = tiny.TinyConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert tiny.lr_at(0, 110, config) == pytest.approx(0.1)
    assert tiny.lr_at(10, 110, config) == pytest.approx(1.0)
    assert tiny.lr_at(60, 110, config) == pytest.approx(0.1 + 0.9 * 0.5)
    assert tiny.lr_at(110, 110, config) == pytest.approx(0.1)


def test_validation_split_takes_each_domain_tail():
    record = {"domains": {"a": {"train_tokens": 100}, "b": {"train_tokens": 50}}}
    stream = np.arange(150, dtype=np.uint16)
    rest, valid = tiny.validation_split(stream, record, 0.1)
    assert valid["a"].tolist() == list(range(90, 100)) and valid["b"].tolist() == list(range(145, 150))
    assert rest.size == 135 and not set(rest.tolist()) & set(np.concatenate(list(valid.values())).tolist())


def test_config_validation():
    with pytest.raises(tiny.TinyConfigError, match="divisible"):
        tiny.TinyConfig(hidden_size=130, num_heads=4)
    with pytest.raises(tiny.TinyConfigError, match="top_k"):
        tiny.TinyConfig(num_experts=4, top_k=8)
    with pytest.raises(tiny.TinyConfigError, match="vocab_size"):
        tiny.TinyConfig(vocab_size=70_000)


def test_cli_registers_train_tiny():
    args = cli.build_parser("train-tiny").parse_args(["train-tiny", "--out", "x", "--hidden-size", "64", "--steps", "5"])
    config = tiny.config_from_args(args)
    assert (config.hidden_size, config.steps, config.num_experts) == (64, 5, 64)


def _card() -> dict:
    import json

    return json.loads((tiny.TINY_DIR / "model_card.json").read_text())
