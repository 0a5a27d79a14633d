"""Traces: the Trace invariants, selection and concatenation, parquet round trips and load errors, and the
layout check (traces recorded with `recording.record_trace` from a tiny random model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TRACE_NEW_TOKENS, TRACE_PROMPTS, tiny_model

from prescope import files
from prescope.layout import LayoutMismatchError
from prescope.routing import trace
from prescope.routing.trace import MISSING, Trace, TraceError

PROMPTS, NEW = TRACE_PROMPTS, TRACE_NEW_TOKENS


def test_round_trip_with_and_without_arrays(batched_trace, tmp_path):
    plain = Trace(batched_trace.layout, batched_trace.tokens, batched_trace.experts, batched_trace.weights, meta={"k": [1, 2]})
    for tr in (batched_trace, plain):
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


def test_failed_write_leaves_old_file_and_no_tmp(batched_trace, tmp_path, monkeypatch):
    path = trace.save_trace(batched_trace, tmp_path / "t.trace.parquet")
    before = path.read_bytes()

    def boom(table, where, **kw):
        Path(where).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(trace.pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        trace.save_trace(batched_trace, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["t.trace.parquet"]


def test_load_errors(batched_trace, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trace.load_trace(tmp_path / "nope.parquet")
    path = trace.save_trace(batched_trace, tmp_path / "t.trace.parquet")
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
    unsealed = {k: v for k, v in table.schema.metadata.items() if k != files.PARQUET_KEY}  # a foreign writer's file
    pq.write_table(table.slice(0, table.num_rows - 1).replace_schema_metadata(unsealed), tmp_path / "short.parquet")
    with pytest.raises(TraceError, match="rows, expected T\\*L"):
        trace.load_trace(tmp_path / "short.parquet")


def test_mismatch_names_both_layouts(trace_model, batched_trace):
    trace.check_trace_matches(batched_trace, trace_model)
    other = tiny_model("mixtral")
    with pytest.raises(LayoutMismatchError, match=r"recorded on OlmoeForCausalLM with E=8, K=3.*"
                                                          r"model is MixtralForCausalLM with E=6, K=2"):
        trace.check_trace_matches(batched_trace, other)


def test_validation_errors(batched_trace):
    lay, tok, ex, w = batched_trace.layout, batched_trace.tokens, batched_trace.experts, batched_trace.weights
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


def test_select_split_concat(batched_trace):
    dec = batched_trace.decode_only()
    assert (dec.tokens["phase"] == "decode").all() and dec.num_tokens == 3 * (NEW - 1)
    assert dec.hidden.shape[0] == dec.num_tokens
    two = batched_trace.select([0, 2])
    assert set(two.tokens["prompt"]) == {0, 2}
    first, rest = batched_trace.split_by_prompt(0.34, seed=1)
    assert set(first.tokens["prompt"]).isdisjoint(rest.tokens["prompt"])
    assert first.num_tokens + rest.num_tokens == batched_trace.num_tokens and first.tokens["prompt"].nunique() == 1
    with pytest.raises(TraceError, match="need >= 2"):
        batched_trace.select([1]).split_by_prompt(0.5)
    both = trace.concat_traces([batched_trace, batched_trace])
    assert both.num_tokens == 2 * batched_trace.num_tokens and both.tokens["prompt"].nunique() == 6
    assert both.tokens["call"].nunique() == 2


def test_flipped_bits_in_a_trace_file_are_refused_naming_it(batched_trace, tmp_path):
    """A bit flipped anywhere in a saved trace (hidden states, weights, ids, header) is an error naming the
    file, or, in the checksum's own marker, a load of the intact data: never changed data."""
    assert batched_trace.hidden is not None
    path = trace.save_trace(batched_trace, tmp_path / "t.trace.parquet")
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    for i in rng.choice(len(data), size=60, replace=False):
        flipped = bytearray(data)
        flipped[i] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(flipped))
        try:
            back = trace.load_trace(path)
        except (files.ChecksumError, TraceError) as exc:
            assert str(path) in str(exc)
            continue
        np.testing.assert_array_equal(back.hidden, batched_trace.hidden)
        np.testing.assert_array_equal(back.experts, batched_trace.experts)


def test_a_header_that_disagrees_with_its_data_is_refused(batched_trace, tmp_path):
    path = trace.save_trace(batched_trace, tmp_path / "t.trace.parquet")
    E = batched_trace.layout.num_experts
    data = path.read_bytes()
    assert data.count(f'"num_experts": {E},'.encode()) == 1
    path.write_bytes(data.replace(f'"num_experts": {E},'.encode(), f'"num_experts": {E + 1},'.encode()))
    with pytest.raises(files.ChecksumError, match="t.trace.parquet: checksum mismatch"):
        trace.load_trace(path)
    # the same edit made with pyarrow (the header rewritten, the data kept) is refused as well
    table = pq.read_table(tmp_path / trace.save_trace(batched_trace, tmp_path / "u.trace.parquet"))
    header = json.loads(table.schema.metadata[trace.METADATA_KEY])
    header["layout"]["num_experts"] = 2 * E
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, trace.METADATA_KEY: json.dumps(header)}),
                   tmp_path / "u.trace.parquet")
    with pytest.raises(files.ChecksumError, match="u.trace.parquet"):
        trace.load_trace(tmp_path / "u.trace.parquet")


def test_negative_weights_are_refused_from_a_file_as_from_the_api(batched_trace, tmp_path):
    weights = batched_trace.weights.copy()
    weights[0, 0, -1] = -0.25
    with pytest.raises(TraceError, match="weight -0.25 is negative"):
        Trace(batched_trace.layout, batched_trace.tokens, batched_trace.experts, weights)
    table = pq.read_table(trace.save_trace(batched_trace, tmp_path / "t.trace.parquet"))
    flat = table["weights"].combine_chunks()
    values = flat.flatten().to_numpy().copy()
    values[flat.type.list_size - 1] = -0.25  # the first row's last slot
    column = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), flat.type.list_size)
    foreign = {k: v for k, v in table.schema.metadata.items() if k != files.PARQUET_KEY}  # no checksum: legacy
    pq.write_table(table.set_column(table.column_names.index("weights"), "weights", column)
                   .replace_schema_metadata(foreign), tmp_path / "neg.parquet")
    with pytest.raises(TraceError, match="is negative"):
        trace.load_trace(tmp_path / "neg.parquet")


@pytest.mark.parametrize("name", ["hidden", "logits"])
def test_nan_in_hidden_states_or_logits_is_refused(batched_trace, name):
    arrays = {n: getattr(batched_trace, n) for n in ("experts", "weights", "hidden", "logits")}
    arrays[name] = arrays[name].copy()
    arrays[name][2, 1, 3] = np.nan
    with pytest.raises(TraceError, match=f"trace token 2 layer 1: {name} holds nan"):
        Trace(batched_trace.layout, batched_trace.tokens, **arrays)
    if name == "logits":  # a router may mask experts with -inf
        arrays[name][2, 1, 3] = -np.inf
        Trace(batched_trace.layout, batched_trace.tokens, **arrays)
