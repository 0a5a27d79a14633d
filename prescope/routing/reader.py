"""One reader for every routing trace a command takes: `read_trace(path)`.

A trace file is one of two formats, told apart by its first bytes (its name only breaks no tie):
a prescope trace (parquet, `trace.save_trace`: magic `PAR1`) or a llama.cpp route trace (text starting
`# route_trace v1`, `llamacpp.load_llamacpp_trace`). Either may be xz-compressed (`.xz`, magic `FD 37 7A 58
5A 00`), and a path whose file is missing is read from its `.xz` sibling (`data.resolve`), as the traces
shipped in prescope/assets/data are. Every command that reads a trace (simulate, simulate-compare,
trace-stats, train-predictor) goes through here, so each gives the same clear errors: a missing file, a
file of neither format (naming what its first bytes look like), a corrupt one (the format's own reader).
"""

from __future__ import annotations

import lzma
import shutil
import tempfile
from pathlib import Path

from prescope import data
from prescope.routing import llamacpp
from prescope.routing.trace import Trace, TraceError, load_trace

PARQUET = b"PAR1"
XZ = b"\xfd7zXZ\x00"
ROUTE = llamacpp.MAGIC.encode()
FORMATS = ("parquet", "llama.cpp")
SNIFF_BYTES = 64


def _head(path: Path) -> tuple[bytes, bool]:
    """The first bytes of the file's content (decompressed when it is xz) and whether it is compressed."""
    with open(path, "rb") as f:
        raw = f.read(SNIFF_BYTES)
    if not raw.startswith(XZ):
        return raw, False
    try:
        with lzma.open(path, "rb") as f:
            return f.read(SNIFF_BYTES), True
    except (lzma.LZMAError, EOFError) as exc:
        raise TraceError(f"{path}: an xz file that does not decompress (corrupt or truncated?): {exc}") from None


def trace_format(path: str | Path) -> tuple[str, bool]:
    """("parquet" or "llama.cpp", compressed) of the trace file `path` (or its .xz sibling) names, from its
    content; a TraceError saying what the two formats start with when it is neither."""
    found = data.resolve(path)
    head, compressed = _head(found)
    if head.startswith(PARQUET):
        return "parquet", compressed
    if head.lstrip(b"\xef\xbb\xbf").startswith(ROUTE):
        return "llama.cpp", compressed
    shown = head[:24].decode("utf-8", errors="replace").replace("\n", "\\n")
    if not head:
        shown = "nothing (an empty file)"
    raise TraceError(f"{found} is neither a prescope trace (parquet, starting 'PAR1') nor a llama.cpp route trace "
                     f"(text starting {llamacpp.MAGIC!r}){' once decompressed' if compressed else ''}; it starts "
                     f"with {shown!r}")


def read_trace(path: str | Path, max_decode_steps: int | None = None) -> Trace:
    """The routing trace in `path`, whatever its format (module docstring). `max_decode_steps`: of a llama.cpp
    trace read only the first that many decode steps (a prescope trace is read whole)."""
    path = Path(path)
    if path.is_dir():
        raise TraceError(f"{path} is a folder; give a trace file (.parquet, or a llama.cpp .csv, plain or .xz)")
    if not data.exists(path):
        raise FileNotFoundError(f"trace file {path} does not exist")
    kind, compressed = trace_format(path)
    if kind == "llama.cpp":
        return llamacpp.load_llamacpp_trace(path, max_decode_steps=max_decode_steps)
    found = data.resolve(path)
    if not compressed:
        return load_trace(found)
    with tempfile.TemporaryDirectory(prefix="prescope-trace-") as tmp:
        plain = Path(tmp) / found.name.removesuffix(data.XZ)
        with lzma.open(found, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return load_trace(plain)
