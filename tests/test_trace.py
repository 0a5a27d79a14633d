"""Traces: recording from a real generate(), the Trace invariants, parquet round trips and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_model

from prescope import adapter, cli, trace
from prescope.trace import MISSING, Trace, TraceError

PROMPTS = [[5, 17, 33, 2, 9, 60, 41], [12, 80], [7, 7, 30, 55]]  # different lengths: left padding at batch 3
NEW = 5


@pytest.fixture(scope="module")
def model():
    m = tiny_model("olmoe")
    m.generation_config.eos_token_id = None  # random weights: let every row run max_new_tokens
    return m


@pytest.fixture(scope="module")
def batched(model) -> Trace:
    return trace.record_trace(model, None, PROMPTS, max_new_tokens=NEW, batch_size=3, keep_hidden=True,
                              keep_logits=True, domains=["a", "b", "c"], progress=False)


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
        return {lay.ordinal: (seen[lay.ordinal], adapter.route(lay.router, seen[lay.ordinal])) for lay in layers}


def test_batch1_counts_phases_and_router_agreement(model):
    tr = trace.record_trace(model, None, PROMPTS[:1], max_new_tokens=NEW, keep_hidden=True, progress=False)
    P, generated = len(PROMPTS[0]), tr.meta["generated"][0]
    assert len(generated) == NEW
    assert tr.num_tokens == P + NEW - 1  # the last new token is never fed back
    tok = tr.tokens
    assert list(tok["phase"]) == ["prefill"] * P + ["decode"] * (NEW - 1)
    assert list(tok["step"]) == [0] * P + list(range(1, NEW))
    assert list(tok["position"]) == list(range(P + NEW - 1))
    fed = PROMPTS[0] + generated[:-1]
    assert list(tok["token_id"]) == fed
    ref = _independent_routing(model, fed)
    for o, (hidden, out) in ref.items():
        w, order = out.weights.float().sort(dim=-1, descending=True)  # [N, K]
        np.testing.assert_array_equal(tr.experts[:, o], out.indices.gather(-1, order).numpy())
        np.testing.assert_allclose(tr.weights[:, o], w.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(tr.hidden[:, o].astype(np.float32), hidden.numpy(), rtol=2e-3, atol=2e-3)


def test_batch3_left_padding_matches_batch1(model, batched):
    tok = batched.tokens
    for p, ids in enumerate(PROMPTS):
        rows = tok[tok["prompt"] == p]
        assert len(rows) == len(ids) + NEW - 1
        assert list(rows["position"]) == list(range(len(ids) + NEW - 1))  # no pad token got in
        assert (rows["row"] == p).all() and (rows["domain"] == "abc"[p]).all()
        single = trace.record_trace(model, None, [ids], max_new_tokens=NEW, progress=False)
        assert single.meta["generated"][0] == batched.meta["generated"][p]
        idx = rows.sort_values("position").index.to_numpy()
        np.testing.assert_array_equal(batched.experts[idx], single.experts)
        np.testing.assert_allclose(batched.weights[idx], single.weights, rtol=1e-4, atol=1e-5)
    # execution order: step 0 holds every prompt token, each later step one token per row
    steps = list(batched.steps())
    assert [(s.step, len(s.index)) for s in steps] == [(0, sum(map(len, PROMPTS)))] + [(s, 3) for s in range(1, NEW)]
    assert batched.logits.shape == (batched.num_tokens, 3, 8) and batched.hidden.dtype == np.float16
    top = np.argsort(-batched.logits, axis=-1, kind="stable")[..., :3]  # routers pick the top-k logits
    np.testing.assert_array_equal(np.sort(top, -1), np.sort(batched.experts, -1))


def test_tokens_after_eos_are_left_out(model):
    free = trace.record_trace(model, None, PROMPTS[1:2], max_new_tokens=NEW, progress=False)
    eos = free.meta["generated"][0][1]  # make the second new token an EOS
    model.generation_config.eos_token_id = eos
    try:
        tr = trace.record_trace(model, None, [PROMPTS[1], PROMPTS[0]], max_new_tokens=NEW, batch_size=2,
                                progress=False)
    finally:
        model.generation_config.eos_token_id = None
    first = tr.tokens[tr.tokens["prompt"] == 0]
    assert tr.meta["generated"][0] == free.meta["generated"][0][:2]
    # prompt, then new token 1 fed at step 1; the EOS (new token 2) is never fed
    assert len(first) == len(PROMPTS[1]) + 1 and first["step"].max() == 1


def test_round_trip_with_and_without_arrays(batched, tmp_path):
    plain = Trace(batched.layout, batched.tokens, batched.experts, batched.weights, meta={"k": [1, 2]})
    for tr in (batched, plain):
        path = trace.save_trace(tr, tmp_path / "t.trace.parquet")
        back = trace.load_trace(path)
        pd.testing.assert_frame_equal(back.tokens, tr.tokens, check_dtype=False)
        np.testing.assert_array_equal(back.experts, tr.experts)
        np.testing.assert_array_equal(back.weights, tr.weights)
        for name in ("hidden", "logits"):
            got, want = getattr(back, name), getattr(tr, name)
            assert (got is None) == (want is None)
            if want is not None:
                np.testing.assert_array_equal(got, want)
        assert back.layout == tr.layout and back.meta["k" if tr is plain else "generated"] == tr.meta[
            "k" if tr is plain else "generated"]
        assert [p.name for p in tmp_path.iterdir()] == ["t.trace.parquet"]  # no tmp file left


def test_failed_write_leaves_old_file_and_no_tmp(batched, tmp_path, monkeypatch):
    path = trace.save_trace(batched, tmp_path / "t.trace.parquet")
    before = path.read_bytes()

    def boom(table, where, **kw):
        Path(where).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(trace.pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        trace.save_trace(batched, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["t.trace.parquet"]


def test_load_errors(batched, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trace.load_trace(tmp_path / "nope.parquet")
    path = trace.save_trace(batched, tmp_path / "t.trace.parquet")
    data = path.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="not a readable parquet file"):
        trace.load_trace(tmp_path / "cut.parquet")
    (tmp_path / "text.parquet").write_text("hello")
    with pytest.raises(TraceError, match="not a readable parquet file"):
        trace.load_trace(tmp_path / "text.parquet")
    pd.DataFrame({"a": [1, 2]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(TraceError, match="not a prescope trace"):
        trace.load_trace(tmp_path / "other.parquet")
    table = pq.read_table(path)
    header = json.loads(table.schema.metadata[trace.METADATA_KEY])
    pq.write_table(table.replace_schema_metadata({trace.METADATA_KEY: json.dumps({**header, "version": 99})}),
                   tmp_path / "v99.parquet")
    with pytest.raises(TraceError, match="version 99; this prescope reads .* version 1"):
        trace.load_trace(tmp_path / "v99.parquet")
    pq.write_table(table.slice(0, table.num_rows - 1), tmp_path / "short.parquet")
    with pytest.raises(TraceError, match="rows, expected T\\*L"):
        trace.load_trace(tmp_path / "short.parquet")


def test_mismatch_names_both_layouts(model, batched):
    trace.check_trace_matches(batched, model)
    other = tiny_model("mixtral")
    with pytest.raises(adapter.LayoutMismatchError, match=r"recorded on OlmoeForCausalLM with E=8, K=3.*"
                                                          r"model is MixtralForCausalLM with E=6, K=2"):
        trace.check_trace_matches(batched, other)


def test_validation_errors(batched):
    lay, tok, ex, w = batched.layout, batched.tokens, batched.experts, batched.weights
    bad = ex.copy()
    bad[0, 0, 0] = lay.num_experts
    with pytest.raises(TraceError, match="outside \\[0, E=8\\)"):
        Trace(lay, tok, bad, w)
    with pytest.raises(TraceError, match="shape .* expected"):
        Trace(lay, tok, ex[:, :2], w[:, :2])
    bad = ex.copy()
    bad[1, 0, 1] = MISSING
    with pytest.raises(TraceError, match="all routed or all MISSING"):
        Trace(lay, tok, bad, w)
    with pytest.raises(TraceError, match="not sorted highest first"):
        Trace(lay, tok, ex, w[..., ::-1].copy())
    with pytest.raises(TraceError, match="lack columns"):
        Trace(lay, tok.drop(columns=["phase"]), ex, w)
    with pytest.raises(TraceError, match="integer dtype"):
        Trace(lay, tok, ex.astype(np.float32), w)


def test_select_split_concat(batched):
    dec = batched.decode_only()
    assert (dec.tokens["phase"] == "decode").all() and dec.num_tokens == 3 * (NEW - 1)
    assert dec.hidden.shape[0] == dec.num_tokens
    two = batched.select([0, 2])
    assert set(two.tokens["prompt"]) == {0, 2}
    first, rest = batched.split_by_prompt(0.34, seed=1)
    assert set(first.tokens["prompt"]).isdisjoint(rest.tokens["prompt"])
    assert first.num_tokens + rest.num_tokens == batched.num_tokens and first.tokens["prompt"].nunique() == 1
    with pytest.raises(TraceError, match="need >= 2"):
        batched.select([1]).split_by_prompt(0.5)
    both = trace.concat_traces([batched, batched])
    assert both.num_tokens == 2 * batched.num_tokens and both.tokens["prompt"].nunique() == 6
    assert both.tokens["call"].nunique() == 2


def test_cli_records_and_summarises(tmp_path, shared_data, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("olmoe")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    text = (shared_data / "corpus" / "c4.txt").read_text()[:20000]
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=model.config.vocab_size, limit_alphabet=40,
                                                        special_tokens=["<unk>", "<eos>"]))
    model_dir = tmp_path / "tiny-random"
    model.save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>").save_pretrained(model_dir)
    code = cli.main(["trace", "--model", str(model_dir), "--prompts-per-domain", "1", "--prompt-tokens", "12",
                     "--max-new-tokens", "3", "--batch-size", "2", "--corpus-dir", str(shared_data / "corpus"),
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
