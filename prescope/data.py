"""Data that ships with prescope, and the one way files of data are found and opened.

The corpus, the real llama.cpp routing traces, the OLMoE/Mixtral routing aggregates and the H200
measurements that the README's commands, the notebooks and the tests read live inside the package, in
`prescope/assets/data/` (sources and licences in its README), so a clone of the project alone runs.
Large text files are stored xz-compressed (`name.xz`).

Every reader names a file by its plain name (`corpus/arxiv.txt`); `resolve` finds that file or, failing
that, `name.xz`, and `read_text` / `open_text` / `read_bytes` decompress what they find. So a user's own
folder of plain files and the shipped compressed copy go through the same loaders: a loader's default is
`shipped(...)`, and any other path works in its place.
"""

from __future__ import annotations

import io
import lzma
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "assets" / "data"
XZ = ".xz"


def shipped(*parts: str) -> Path:
    """The path of `parts` inside the shipped data folder (`shipped("routing")`, `shipped("corpus", "c4.txt")`)."""
    return DATA_DIR.joinpath(*parts)


def resolve(path: str | Path) -> Path:
    """The file `path` names: `path` itself when it exists, else `path` + ".xz"; FileNotFoundError names both."""
    path = Path(path)
    if path.is_file():
        return path
    packed = path.with_name(path.name + XZ)
    if packed.is_file():
        return packed
    raise FileNotFoundError(f"{path} does not exist (nor {packed.name} beside it)")


def exists(path: str | Path) -> bool:
    """Whether `path` or `path` + ".xz" is a file."""
    try:
        resolve(path)
    except FileNotFoundError:
        return False
    return True


def read_bytes(path: str | Path) -> bytes:
    """The contents of the file `path` names, decompressed when it is an .xz file."""
    found = resolve(path)
    return lzma.decompress(found.read_bytes()) if found.suffix == XZ else found.read_bytes()


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """The text of the file `path` names, decompressed when it is an .xz file."""
    return read_bytes(path).decode(encoding)


def open_text(path: str | Path, encoding: str = "utf-8") -> io.TextIOBase:
    """A text stream over the file `path` names (decompressing as it reads, for .xz files)."""
    found = resolve(path)
    if found.suffix == XZ:
        return lzma.open(found, "rt", encoding=encoding)
    return open(found, encoding=encoding)


def is_empty(path: str | Path) -> bool:
    """Whether the file `path` names holds no data (read one byte: an empty .xz file is not 0 bytes long)."""
    with open_text(path) as stream:
        return stream.read(1) == ""
