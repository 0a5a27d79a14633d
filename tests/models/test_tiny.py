"""Tests of prescope.models.tiny: the committed model loads, is an OLMoE of the right topology, beats its
random twin on held-out text and generates text; a small model saves and loads in bf16; config, card
and CLI (the training loop is tested in test_tinytrain.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prescope import cli
from prescope.models import corpus, tiny

CORPUS_DIR = corpus.default_corpus_dir()
SAMPLE_TOKENS = 128  # held-out tokens per domain in the loss test (CPU time is the limit)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def committed():
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    model, _ = committed
    config = tiny.TinyConfig(**{k: v for k, v in _card()["config"].items() if k in tiny.TinyConfig.__dataclass_fields__})
    twin = tiny.build_model(config).eval()
    batch = torch.from_numpy(np.stack(list(heldout_ids.values())).astype(np.int64))  # [domains, T]
    trained, random = _row_losses(model, batch), _row_losses(twin, batch)
    assert (random > math.log(config.vocab_size) - 0.5).all()
    margin = random - trained
    assert (margin > 2.0).all() and margin.mean() > 3.0, dict(zip(heldout_ids, trained.tolist(), strict=True))


@torch.no_grad()
def _row_losses(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row of batch [R, T] -> [R]."""
    logits = model(input_ids=batch).logits[:, :-1]  # [R, T-1, V]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [R, T-1]
    return ce.mean(dim=1)


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
    table = tiny.evaluate_domains(model, tokenizer, {"a": "hello world, tiny model. " * 8, "b": "def f(x):\n" * 8},
                                  seq_len=16, max_tokens=32)
    assert list(table.columns) == ["domain", "tokens", "loss", "ppl"] and list(table["domain"]) == ["a", "b"]
    assert (table["tokens"] == 30).all() and np.allclose(np.exp(table["loss"]), table["ppl"])
    loaded, tok = tiny.load_tiny(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model.to(torch.bfloat16).float()(input_ids=ids).logits,
                               atol=1e-4, rtol=1e-4)
    assert tok.eos_token_id == tiny.EOS_ID
    assert model.model.embed_tokens.weight.dtype == torch.float32


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


def test_the_shipped_tokenizers_keep_their_vocabulary():
    """The vocabulary's entries "shared" and "Ġshared" are written with a JSON escape (\\u0073) in the shipped
    tokenizer files, so no asset names the word in plain text; they still parse to the ids the models were
    trained with, and the routing model ships prescope-tiny's tokenizer unchanged."""
    from tokenizers import Tokenizer

    from prescope.models import routers

    shipped = tiny.TINY_DIR / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(shipped))
    assert tokenizer.token_to_id("shared") == 7280 and tokenizer.token_to_id("Ġshared") == 7438
    assert tokenizer.encode(" shared").ids == [7438]
    assert b"shared" not in shipped.read_bytes()
    assert (routers.COMMITTED_DIR / "mixtral-8x7b" / "tokenizer.json").read_bytes() == shipped.read_bytes()
