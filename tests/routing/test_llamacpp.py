"""llama.cpp route traces: the two real files import with the README's token counts; bad input is named."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from prescope.routing import llamacpp
from prescope.routing.llamacpp import COLUMNS, MAGIC, RouteCsvError, load_llamacpp_trace
from prescope.routing.trace import MISSING

# n_layer=2, n_expert=4, top-2; three tokens: two prefill (the first skips layer 1, as llama.cpp does), one decode
HEADER = """# route_trace v1
# model=/m/tiny.gguf arch=toy n_layer=2 n_expert=4 n_expert_used=2
# layer=0 expert_bytes=100 dense_bytes=10
# layer=1 expert_bytes=100 dense_bytes=10
turn,phase,step,layer,slot,expert,weight,residency,expert_bytes
"""
ROWS = """0,0,0,0,0,3,0.6,0,100
0,0,0,0,1,1,0.4,0,100
0,0,1,0,0,2,0.7,0,100
0,0,1,0,1,0,0.3,0,100
0,0,1,1,0,1,0.5,1,0
0,0,1,1,1,3,0.5,0,100
0,1,2,0,0,0,0.9,1,0
0,1,2,0,1,2,0.1,1,0
0,1,2,1,0,3,0.8,1,0
0,1,2,1,1,1,0.2,1,0
"""
FIRST_ROW_LINE = 6  # HEADER has five lines


def _write(tmp_path, text: str):
    path = tmp_path / "toy.route.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name, prefill, decode, layers, top_k, missing", [
    ("qwen3-30b-a3b", 28, 128, 48, 6, 27),
    ("gpt-oss-120b", 85, 64, 36, 2, 84),
])
def test_real_files(shipped_data, name, prefill, decode, layers, top_k, missing):
    tr = load_llamacpp_trace(shipped_data / "routing" / f"{name}.route.csv")
    phases = tr.tokens["phase"].value_counts()
    assert (phases["prefill"], phases["decode"]) == (prefill, decode)
    assert (tr.layout.num_moe_layers, tr.layout.num_experts, tr.layout.top_k) == (layers, 128, top_k)
    assert tr.layout.model_class.startswith("llama.cpp:") and tr.layout.hidden_size == 0
    assert list(tr.tokens["position"]) == list(range(prefill + decode))
    assert list(tr.tokens["step"]) == [0] * prefill + list(range(1, decode + 1))
    # llama.cpp skips the last layer for every prefill token but the last one
    assert tr.meta["missing_entries"] == missing == prefill - 1
    assert (tr.experts[: prefill - 1, -1] == MISSING).all() and tr.present[prefill - 1:].all()
    np.testing.assert_allclose(tr.weights[tr.present].sum(-1), 1.0, atol=1e-5)


def test_toy_file_values(tmp_path):
    tr = load_llamacpp_trace(_write(tmp_path, HEADER + ROWS), domain="toy")
    assert tr.layout.model_class == "llama.cpp:toy" and tr.layout.expert_bytes == 100
    assert list(tr.tokens["phase"]) == ["prefill", "prefill", "decode"] and list(tr.tokens["step"]) == [0, 0, 1]
    np.testing.assert_array_equal(tr.experts[:, 0], [[3, 1], [2, 0], [0, 2]])
    np.testing.assert_array_equal(tr.experts[:, 1], [[MISSING, MISSING], [1, 3], [3, 1]])
    np.testing.assert_allclose(tr.weights[2, 1], [0.8, 0.2])
    assert (tr.tokens["domain"] == "toy").all()


def _replace_row(i: int, text: str) -> str:
    rows = ROWS.splitlines()
    rows[i] = text
    return HEADER + "\n".join(rows) + "\n"


@pytest.mark.parametrize("text, pattern", [
    ("# route_trace v2\n" + HEADER.split("\n", 1)[1] + ROWS, r":1: not a llama.cpp route trace"),
    (HEADER.replace("n_expert=4 ", "") + ROWS, r":2: header line .* missing \['n_expert'\]"),
    (HEADER.replace("# layer=1 expert_bytes=100 dense_bytes=10\n", "") + ROWS, r":4: expected '# layer=1"),
    (HEADER.replace("weight,", "gate,") + ROWS, r":5: expected the column line"),
    (_replace_row(0, "0,0,0,0,0,4,0.6,0,100"), rf":{FIRST_ROW_LINE}: expert=4 out of range, expected \[0, 4\)"),
    (_replace_row(2, "0,0,1,2,0,2,0.7,0,100"), rf":{FIRST_ROW_LINE + 2}: layer=2 out of range"),
    (_replace_row(1, "0,0,0,0,1,x,0.4,0,100"), rf":{FIRST_ROW_LINE + 1}: expert must be an integer"),
    (_replace_row(1, "0,0,0,0,1,1,heavy,0,100"), rf":{FIRST_ROW_LINE + 1}: weight must be a number"),
    (_replace_row(1, "0,0,0,0,1,1,0.4,0"), rf":{FIRST_ROW_LINE + 1}: 8 fields, expected 9"),
    (_replace_row(1, "0,0,0,0,0,1,0.4,0,100"), rf":{FIRST_ROW_LINE + 1}: slot 0 repeated"),
    (_replace_row(3, "0,1,1,0,1,0,0.3,0,100"), rf":{FIRST_ROW_LINE + 3}: step 1 has phase 1 here but 0"),
    (HEADER + ROWS.replace("0,1,2,1,1,1,0.2,1,0\n", ""),
     rf":{FIRST_ROW_LINE + 8}: step 2, layer 1 has slots \[0\], expected 0..1 .* missing slot\(s\) \[1\]"),
    (_replace_row(1, "0,0,0,0,1,3,0.4,0,100"), rf":{FIRST_ROW_LINE}: step 0, layer 0 repeats an expert"),
    (_replace_row(1, "0,0,0,0,1,1,0.9,0,100"), rf":{FIRST_ROW_LINE}: .* weights must fall with the slot"),
    (HEADER, r"no routing rows"),
])
def test_malformed_input_names_line_and_expectation(tmp_path, text, pattern):
    with pytest.raises(RouteCsvError, match=pattern):
        load_llamacpp_trace(_write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llamacpp_trace(tmp_path / "none.route.csv")


def _synthetic(path, tokens: int, layers: int = 8, experts: int = 16, top_k: int = 4, tail: str = "") -> Path:
    """A well-formed route trace: one prefill token, then decode tokens, every layer routed; `tail` after."""
    rng = np.random.default_rng(0)
    lines = [MAGIC, f"# model=/m.gguf arch=toy n_layer={layers} n_expert={experts} n_expert_used={top_k}"]
    lines += [f"# layer={i} expert_bytes=100 dense_bytes=10" for i in range(layers)]
    lines.append(",".join(COLUMNS))
    for step in range(tokens):
        for layer in range(layers):
            chosen = rng.choice(experts, top_k, replace=False)
            weights = np.sort(rng.dirichlet(np.ones(top_k)))[::-1]
            lines += [f"0,{int(step > 0)},{step},{layer},{k},{e},{w:.6f},0,100"
                      for k, (e, w) in enumerate(zip(chosen, weights, strict=True))]
    path.write_text("\n".join(lines) + "\n" + tail)
    return path


def _peak_bytes(path, **kwargs) -> int:
    tracemalloc.start()
    try:
        load_llamacpp_trace(path, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_import_streams_memory_grows_with_what_is_kept_not_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "BLOCK_LINES", 2048)  # both files span many blocks
    small, large = _synthetic(tmp_path / "s.csv", 500), _synthetic(tmp_path / "l.csv", 1500)
    extra_file = large.stat().st_size - small.stat().st_size
    extra_peak = _peak_bytes(large) - _peak_bytes(small)
    kept = 1000 * 8 * 4 * (8 + 4)  # the extra tokens' L·K experts (int64) and weights (float32)
    # reading the whole file first cost 11x the extra bytes; streaming costs about what is kept
    assert extra_peak < 1.5 * extra_file and extra_peak < 4 * kept


def test_max_decode_steps_reads_only_what_it_needs(tmp_path):
    path = _synthetic(tmp_path / "t.csv", 40, tail="0,1,40,0,0,x,garbage\n" + "\xff" * 10)
    with pytest.raises(RouteCsvError, match="t.csv"):
        load_llamacpp_trace(path)
    tr = load_llamacpp_trace(path, max_decode_steps=3)
    assert list(tr.tokens["phase"]) == ["prefill"] + ["decode"] * 3
    full = load_llamacpp_trace(_synthetic(tmp_path / "u.csv", 40))
    np.testing.assert_array_equal(tr.experts, full.experts[:4])
    with pytest.raises(RouteCsvError, match="max_decode_steps must be >= 1"):
        load_llamacpp_trace(path, max_decode_steps=0)


def test_a_malformed_large_file_is_refused_at_its_line_before_the_rest_is_read(tmp_path):
    # the bad line comes early; bytes that are not UTF-8 sit at the end and must never be reached
    path = _synthetic(tmp_path / "t.csv", 3000, tail="\xff\xfe")
    text = path.read_text(encoding="latin-1").splitlines()
    bad = len(HEADER.splitlines()) + 8 * 4 * 2 + 5 + 1 + 6  # inside the third token, past the model's 8 layers
    text[bad - 1] = "0,1,2,3,1,99,0.1,0,100"
    path.write_bytes(("\n".join(text) + "\n").encode("latin-1"))
    with pytest.raises(RouteCsvError, match=rf"t.csv:{bad}: expert=99 out of range"):
        load_llamacpp_trace(path)


@pytest.mark.parametrize("row, pattern", [
    ("0,0,0,0,1,1,0.4,0,1\x0000", "expert_bytes must be an integer"),
    (b"0,0,0,0,1,1,0.4,0,\xff".decode("latin-1"), "not UTF-8 text"),
    ("0,0,0,0,1,1e0,0.4,0,100", "expert must be an integer, got '1e0'"),
    ("0,0,0,0,1,1.,0.4,0,100", "expert must be an integer, got '1.'"),
])
def test_odd_bytes_are_named_with_their_line(tmp_path, row, pattern):
    path = tmp_path / "toy.route.csv"
    path.write_bytes(_replace_row(1, row).encode("latin-1"))
    with pytest.raises(RouteCsvError, match=rf"toy.route.csv:{FIRST_ROW_LINE + 1}: {pattern}"):
        load_llamacpp_trace(path)


def test_per_layer_expert_sizes_are_kept(tmp_path):
    """A model quantised per layer: every MoE layer keeps its own expert size (not the most common one), through
    the layout's dict and a saved trace; a dense layer (expert_bytes=0) is no MoE layer."""
    from conftest import write_route_csv

    from prescope.layout import ModelLayout
    from prescope.routing.trace import load_trace, save_trace

    sizes = [300, 0, 300, 500, 300, 700]
    tr = load_llamacpp_trace(write_route_csv(tmp_path / "mixed.route.csv", sizes))
    lay = tr.layout
    assert lay.moe_layers == (0, 2, 3, 4, 5) and lay.dense_layers == (1,)
    assert lay.expert_bytes == 300 and lay.expert_bytes_per_layer == (300, 300, 500, 300, 700)
    assert [lay.bytes_of(o) for o in range(5)] == [300, 300, 500, 300, 700] and lay.max_expert_bytes == 700
    assert sum(lay.expert_bytes_per_layer) == sum(b for b in sizes if b)  # no byte lost to the common size
    assert ModelLayout.from_dict(lay.to_dict()) == lay
    assert load_trace(save_trace(tr, tmp_path / "mixed.trace.parquet")).layout == lay
    uniform = load_llamacpp_trace(write_route_csv(tmp_path / "same.route.csv", [300, 300]))
    assert uniform.layout.layer_expert_bytes == () and "layer_expert_bytes" not in uniform.layout.to_dict()
    with pytest.raises(ValueError, match="one size >= 1 per MoE layer"):
        ModelLayout(**{**lay.to_dict(), "layer_expert_bytes": [300, 300]})
