"""One trace reader for every command: parquet and llama.cpp traces, plain or xz, told apart by content."""

from __future__ import annotations

import lzma

import pytest
from conftest import write_route_csv

from prescope.routing.reader import read_trace, trace_format
from prescope.routing.trace import TraceError, save_trace


def _xz(path):
    packed = path.with_name(path.name + ".xz")
    packed.write_bytes(lzma.compress(path.read_bytes()))
    return packed


def test_every_format_plain_or_compressed_by_content(tmp_path):
    csv = write_route_csv(tmp_path / "t.route.csv", [300, 500])
    ref = read_trace(csv)
    parquet = save_trace(ref, tmp_path / "t.trace.parquet")
    odd_name = tmp_path / "routing.bin"  # the name says nothing: the content decides
    odd_name.write_bytes(csv.read_bytes())
    cases = {csv: ("llama.cpp", False), _xz(csv): ("llama.cpp", True), parquet: ("parquet", False),
             _xz(parquet): ("parquet", True), odd_name: ("llama.cpp", False)}
    for path, kind in cases.items():
        assert trace_format(path) == kind
        tr = read_trace(path)
        assert (tr.experts == ref.experts).all() and tr.layout == ref.layout
    csv.unlink()  # a missing file is read from its .xz sibling, as the shipped traces are
    assert read_trace(csv).num_tokens == ref.num_tokens


@pytest.mark.parametrize("content, message", [
    (b"", "nothing \\(an empty file\\)"),
    (b"token,layer,expert\n1,2,3\n", "neither a prescope trace .* nor a llama.cpp route trace"),
    (lzma.compress(b"hello"), "once decompressed"),
    (b"\xfd7zXZ\x00garbage", "does not decompress"),
])
def test_foreign_files_get_one_clear_error(tmp_path, content, message):
    path = tmp_path / "t.csv"
    path.write_bytes(content)
    with pytest.raises(TraceError, match=message):
        read_trace(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_trace(tmp_path / "none.parquet")
    with pytest.raises(TraceError, match="is a folder"):
        read_trace(tmp_path)
