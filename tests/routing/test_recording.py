"""Recording traces from a real generate(): counts, phases and router agreement, left padding, EOS, and the
`prescope trace` command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TRACE_NEW_TOKENS, TRACE_PROMPTS, tiny_model

from prescope import cli
from prescope.data import read_text
from prescope.models import adapter
from prescope.routing import recording, trace
from prescope.routing.recording import TraceConfig
from prescope.routing.trace import TraceError

PROMPTS, NEW = TRACE_PROMPTS, TRACE_NEW_TOKENS


def _independent_routing(model, ids: list[int]):
    """Router input and routing of every MoE layer from one plain forward over the whole sequence."""
    layers, seen = adapter.moe_layers(model), {}
    hooks = [lay.router.register_forward_hook(lambda m, a, o, i=lay.ordinal: seen.__setitem__(i, a[0]))
             for lay in layers]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        return {lay.ordinal: (seen[lay.ordinal], adapter.route(lay, seen[lay.ordinal])) for lay in layers}


def test_batch1_counts_phases_and_router_agreement(trace_model):
    tr = recording.record_trace(trace_model, None, PROMPTS[:1], max_new_tokens=NEW, keep_hidden=True, progress=False)
    P, generated = len(PROMPTS[0]), tr.meta["generated"][0]
    assert len(generated) == NEW
    assert tr.num_tokens == P + NEW - 1  # the last new token is never fed back
    tok = tr.tokens
    assert list(tok["phase"]) == ["prefill"] * P + ["decode"] * (NEW - 1)
    assert list(tok["step"]) == [0] * P + list(range(1, NEW))
    assert list(tok["position"]) == list(range(P + NEW - 1))
    fed = PROMPTS[0] + generated[:-1]
    assert list(tok["token_id"]) == fed
    ref = _independent_routing(trace_model, fed)
    for o, (hidden, out) in ref.items():
        w, order = out.weights.float().sort(dim=-1, descending=True)  # [N, K]
        np.testing.assert_array_equal(tr.experts[:, o], out.indices.gather(-1, order).numpy())
        np.testing.assert_allclose(tr.weights[:, o], w.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(tr.hidden[:, o].astype(np.float32), hidden.numpy(), rtol=2e-3, atol=2e-3)


def test_batch3_left_padding_matches_batch1(trace_model, batched_trace):
    tok = batched_trace.tokens
    for p, ids in enumerate(PROMPTS):
        rows = tok[tok["prompt"] == p]
        assert len(rows) == len(ids) + NEW - 1
        assert list(rows["position"]) == list(range(len(ids) + NEW - 1))  # no pad token got in
        assert (rows["row"] == p).all() and (rows["domain"] == "abc"[p]).all()
        single = recording.record_trace(trace_model, None, [ids], max_new_tokens=NEW, progress=False)
        assert single.meta["generated"][0] == batched_trace.meta["generated"][p]
        idx = rows.sort_values("position").index.to_numpy()
        np.testing.assert_array_equal(batched_trace.experts[idx], single.experts)
        np.testing.assert_allclose(batched_trace.weights[idx], single.weights, rtol=1e-4, atol=1e-5)
    # execution order: step 0 holds every prompt token, each later step one token per row
    steps = list(batched_trace.steps())
    assert [(s.step, len(s.index)) for s in steps] == [(0, sum(map(len, PROMPTS)))] + [(s, 3) for s in range(1, NEW)]
    assert batched_trace.logits.shape == (batched_trace.num_tokens, 3, 8) and batched_trace.hidden.dtype == np.float16
    top = np.argsort(-batched_trace.logits, axis=-1, kind="stable")[..., :3]  # routers pick the top-k logits
    np.testing.assert_array_equal(np.sort(top, -1), np.sort(batched_trace.experts, -1))


def test_tokens_after_eos_are_left_out(trace_model):
    free = recording.record_trace(trace_model, None, PROMPTS[1:2], max_new_tokens=NEW, progress=False)
    eos = free.meta["generated"][0][1]  # make the second new token an EOS
    trace_model.generation_config.eos_token_id = eos
    try:
        tr = recording.record_trace(trace_model, None, [PROMPTS[1], PROMPTS[0]], max_new_tokens=NEW, batch_size=2,
                                    progress=False)
    finally:
        trace_model.generation_config.eos_token_id = None
    first = tr.tokens[tr.tokens["prompt"] == 0]
    assert tr.meta["generated"][0] == free.meta["generated"][0][:2]
    # prompt, then new token 1 fed at step 1; the EOS (new token 2) is never fed
    assert len(first) == len(PROMPTS[1]) + 1 and first["step"].max() == 1



def test_cli_records_and_summarises(tmp_path, shipped_data, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("olmoe")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    text = read_text(shipped_data / "corpus" / "c4.txt")[:20000]
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=model.config.vocab_size, limit_alphabet=40,
                                                        special_tokens=["<unk>", "<eos>"]))
    model_dir = tmp_path / "tiny-random"
    model.save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>").save_pretrained(model_dir)
    code = cli.main(["trace", "--model", str(model_dir), "--prompts-per-domain", "1", "--prompt-tokens", "12",
                     "--max-new-tokens", "3", "--batch-size", "2", "--corpus-dir", str(shipped_data / "corpus"),
                     "--out-dir", str(tmp_path / "reports"), "--name", "smoke"])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tr = trace.load_trace(tmp_path / "reports" / "smoke.trace.parquet")
    domains = set(tr.tokens["domain"])
    assert last["tokens"] == tr.num_tokens == len(domains) * (12 + 3 - 1)
    assert last["prefill_tokens"] == 12 * len(domains) and domains >= {"arxiv", "c4", "wikipedia"}
    summary = pd.read_csv(tmp_path / "reports" / "smoke.routing.csv")
    assert len(summary) == 3 and {"entropy_norm", "reuse_lag1", "nmi_next"} <= set(summary.columns)
    assert tr.meta["config"]["max_new_tokens"] == 3


@pytest.mark.parametrize("field, value, message", [
    ("name", "../../x", "name '../../x' must be a plain file name"),
    ("name", "..", "must be a plain file name"),
    ("dtype", "float99", "dtype 'float99' is not a torch floating-point dtype"),
    ("dtype", "int8", "is not a torch floating-point dtype"),
    ("batch_size", 2.0, "batch_size must be an int"),
])
def test_trace_config_refuses_what_would_write_elsewhere_or_fail_later(field, value, message):
    with pytest.raises(TraceError, match=message):
        TraceConfig(**{field: value})


def test_cli_checks_device_and_out_dir_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(adapter, "load_model", lambda *a, **k: pytest.fail("the model loaded before the checks"))
    (tmp_path / "FILE").write_text("x")
    assert cli.main(["trace", "--out-dir", str(tmp_path / "FILE" / "sub")]) == 2
    assert "FILE is a file, so nothing can be written under it" in capsys.readouterr().err
    assert cli.main(["trace", "--name", "../../x", "--out-dir", str(tmp_path)]) == 2
    assert "plain file name" in capsys.readouterr().err and not (tmp_path.parent.parent / "x.trace.parquet").exists()
    if not torch.cuda.is_available():
        assert cli.main(["trace", "--device", "cuda", "--out-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "device 'cuda'" in err and len(err.strip().splitlines()) == 1


def _router_logits_checkpoint(path):
    """An OLMoE checkpoint saved for training (`output_router_logits=True`) with prescope-tiny's tokenizer."""
    import shutil

    from prescope.models.tiny import TINY_DIR

    model = tiny_model("olmoe")
    model.config.vocab_size = 8192  # prescope-tiny's tokenizer
    model.resize_token_embeddings(8192)
    model.config.output_router_logits = True
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_DIR / name, path / name)
    return path


def test_router_logits_checkpoint_records_at_batch_above_one_with_padding(tmp_path):
    """transformers' load-balancing loss fails at batch > 1 with padding; recording turns router logits off,
    and gives the model back as it was."""
    model = tiny_model("olmoe")
    model.generation_config.eos_token_id = None
    model.config.output_router_logits = True
    tr = recording.record_trace(model, None, PROMPTS, max_new_tokens=NEW, batch_size=3, progress=False)
    assert tr.num_tokens == sum(len(p) + NEW - 1 for p in PROMPTS)
    assert model.config.output_router_logits is True


def test_cli_traces_a_router_logits_checkpoint(tmp_path, shipped_data, capsys):
    model_dir = _router_logits_checkpoint(tmp_path / "olmoe-router-logits")
    code = cli.main(["trace", "--model", str(model_dir), "--prompts-per-domain", "2", "--prompt-tokens", "10",
                     "--max-new-tokens", "3", "--batch-size", "3", "--corpus-dir", str(shipped_data / "corpus"),
                     "--out-dir", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["decode_tokens"] > 0 and last["tokens"] == trace.load_trace(last["trace"]).num_tokens
