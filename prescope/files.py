"""Files prescope writes: the one atomic writer, checksums that every result carries, folder locks, and the
git revision every result file records.

Result files never name this machine's folders: a path they record goes through `portable_path` (relative
to the working directory or to the folder holding the package, else `~/...` or `$TMPDIR/...`).

Atomic: a result is written to a temporary sibling and moved into place with `os.replace`, so a reader (a
notebook, a resumed sweep, a person) never sees half a file, and an interrupted run leaves the previous
file or none. `write_atomic` takes bytes or text; `write_atomic_with` hands a temporary path to a writer
that needs one.

Checksummed: every data file carries the SHA-256 of its own bytes, checked on load by `verify` (or
`read_json`), so a flipped bit, a truncation or an edit is an error naming the file, never data.

- In the file (`write_sealed_with`): the writer stores the token `prescope-sha256:` + 64 zeros where its
  format keeps text verbatim; the digest of the file's bytes, taken with the digits of every token read
  as zeros, then replaces those zeros. JSON (`write_json`): a last field `checksum`; parquet
  (`write_parquet`): the schema metadata key `prescope.checksum`; zip archives (torch checkpoints, npz;
  `write_archive_with`): the archive comment, which no member's CRC covers and every reader skips.
- Beside the file (`write_with_sidecar`), for formats with no room for it (CSV, which other tools read
  as they are): `NAME.sha256` in `sha256sum` format. While a file is replaced its sidecar lists the old and
  the new digest, so a run stopped between the two moves leaves a pair that still verifies.

Rule for files without one (written before checksums, by hand or by another tool, e.g. the committed
results under reports/): they load as they are. A checksum that is present and does not match is always
an error (`ChecksumError`), with what to do about it.

Locks: `FolderLock` (one holder of a folder at a time, released by the kernel when its process dies)
and `Claim` (the same for one work item, taken without waiting). `check_output` refuses an output path
that cannot be written before any expensive work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

GIT_TIMEOUT_S = 5
PROJECT_DIR = Path(__file__).resolve().parents[1]  # the folder holding the package (a checkout's root)
TOKEN_PREFIX = b"prescope-sha256:"
DIGEST_HEX = 64
PLACEHOLDER = TOKEN_PREFIX + b"0" * DIGEST_HEX
TOKEN = re.compile(re.escape(TOKEN_PREFIX) + rb"[\x00-\xff]{%d}" % DIGEST_HEX)
CHECKSUM_FIELD = "checksum"  # JSON field holding the token
PARQUET_KEY = b"prescope.checksum"  # parquet schema metadata key holding the token
SIDECAR_SUFFIX = ".sha256"
CHUNK_BYTES = 8 << 20
# End of a zip archive: the end-of-central-directory record, 22 bytes, its last two the comment's length.
ZIP_EOCD = b"PK\x05\x06"
ZIP_EOCD_BYTES = 22
LOCK_NAME = ".lock"


class ChecksumError(ValueError):
    """A file whose checksum does not match its bytes: corrupted, truncated or edited after it was written."""


class LockedError(ValueError):
    """A folder or work item that another live process holds; the message names it."""


# ---- writing ---------------------------------------------------------------------------------------------


def write_atomic_with(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a fresh temporary path beside `path`, then move it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name in the target's folder (same file system); the writer creates it with default modes
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically, as it is (no checksum: renders for people)."""
    payload = data.encode() if isinstance(data, str) else data

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            f.write(payload)

    return write_atomic_with(path, write)


def write_sealed_with(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write_atomic_with`, where `write` stores PLACEHOLDER verbatim in the file; the file's digest is
    written over the last placeholder before the file moves into place."""
    def sealed(tmp: Path) -> None:
        write(tmp)
        digest, tokens = _scan(_chunks(tmp))
        spots = [offset for offset, digits in tokens if digits == PLACEHOLDER[len(TOKEN_PREFIX):]]
        if not spots:
            raise ValueError(f"{path}: the writer left no checksum placeholder in the file")
        with open(tmp, "r+b") as f:
            f.seek(spots[-1] + len(TOKEN_PREFIX))
            f.write(digest.encode())

    return write_atomic_with(path, sealed)


def write_json(path: str | Path, data: dict, indent: int | None = 1) -> Path:
    """`data` as JSON (values JSON cannot hold as text), checksummed in its last field `checksum`."""
    body = {k: v for k, v in data.items() if k != CHECKSUM_FIELD}
    text = json.dumps({**body, CHECKSUM_FIELD: PLACEHOLDER.decode()}, indent=indent, default=str) + "\n"
    return write_sealed_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_parquet(path: str | Path, table, **options: Any) -> Path:
    """A pyarrow Table or pandas DataFrame as parquet (`options` go to `pq.write_table`), checksummed in
    the schema metadata key PARQUET_KEY."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    metadata = {**(table.schema.metadata or {}), PARQUET_KEY: PLACEHOLDER}
    table = table.replace_schema_metadata(metadata)
    return write_sealed_with(path, lambda tmp: pq.write_table(table, tmp, **options))


def write_archive_with(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` writes a zip archive (torch.save, numpy.savez); its comment then holds the checksum."""
    def commented(tmp: Path) -> None:
        write(tmp)
        with open(tmp, "r+b") as f:
            f.seek(-ZIP_EOCD_BYTES, os.SEEK_END)
            end = f.read(ZIP_EOCD_BYTES)
            if end[:4] != ZIP_EOCD or end[-2:] != b"\0\0":
                raise ValueError(f"{path}: expected a zip archive without a comment from the writer")
            f.seek(-2, os.SEEK_END)
            f.write(struct.pack("<H", len(PLACEHOLDER)) + PLACEHOLDER)

    return write_sealed_with(path, commented)


def write_npz(path: str | Path, arrays: dict) -> Path:
    """numpy arrays as a compressed .npz, checksummed (`write_archive_with`)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:  # a file object: savez given a name would append ".npz" to it
            np.savez_compressed(f, **arrays)

    return write_archive_with(path, write)


def write_with_sidecar(path: str | Path, data: str | bytes) -> Path:
    """Write `data` atomically with its digest beside it in `NAME.sha256` (for CSV and other formats that
    have no room for a checksum); both digests are listed while the file is being replaced."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    new = hashlib.sha256(payload).hexdigest()
    old = [hashlib.sha256(path.read_bytes()).hexdigest()] if path.is_file() else []
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    write_atomic(sidecar, "".join(f"{d}  {path.name}\n" for d in dict.fromkeys([new, *old])))
    write_atomic(path, payload)
    write_atomic(sidecar, f"{new}  {path.name}\n")
    return path


# ---- reading ---------------------------------------------------------------------------------------------


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def _scan(chunks: Iterable[bytes]) -> tuple[str, list[tuple[int, bytes]]]:
    """(sha256 hex of the bytes with every token's digits read as zeros, [(offset, digits) of each token])."""
    h, tokens, carry, base = hashlib.sha256(), [], bytearray(), 0
    keep = len(PLACEHOLDER) - 1  # a token may straddle two chunks: hold back what could start one
    for chunk in [*chunks, None]:
        final = chunk is None
        buf = carry + (b"" if final else chunk)
        limit = len(buf) if final else max(0, len(buf) - keep)
        for begin in [m.start() for m in TOKEN.finditer(buf) if m.start() < limit]:
            start, end = begin + len(TOKEN_PREFIX), begin + len(PLACEHOLDER)
            tokens.append((base + begin, bytes(buf[start:end])))
            buf[start:end] = b"0" * DIGEST_HEX
        h.update(buf[:limit])
        carry, base = buf[limit:], base + limit
    return h.hexdigest(), tokens


def _sidecar_digests(sidecar: Path) -> list[str]:
    return [line.split()[0].lower() for line in sidecar.read_text(encoding="utf-8", errors="replace").splitlines()
            if line.strip()]


def verify_bytes(data: bytes, where: str) -> bool:
    """`verify` for bytes in memory (a packaged resource); `where` names them in the error."""
    digest, tokens = _scan([data])
    return _judge(digest, tokens, where)


def _judge(digest: str, tokens: list[tuple[int, bytes]], where: str) -> bool:
    if not tokens:
        return False
    if any(digits == digest.encode() for _, digits in tokens):
        return True
    stored = tokens[-1][1].decode("ascii", errors="replace")
    raise ChecksumError(f"{where}: checksum mismatch (stored {stored[:12]}…, the bytes give {digest[:12]}…): the file "
                        "changed after prescope wrote it (corrupted, truncated or edited). Restore or regenerate it; "
                        "if you changed it on purpose, write it again with prescope or drop its checksum (the "
                        "`checksum` field of a JSON file, the `prescope.checksum` key of a parquet file)")


def verify(path: str | Path) -> bool:
    """Check `path` against its checksum: True when it matched, False when it carries none (see the module
    docstring's rule); ChecksumError when it does not match; FileNotFoundError when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    if sidecar.is_file():
        h = hashlib.sha256()
        for chunk in _chunks(path):
            h.update(chunk)
        listed = _sidecar_digests(sidecar)
        if h.hexdigest() not in listed:
            raise ChecksumError(f"{path}: checksum mismatch with {sidecar.name} (stored {(listed or ['none'])[0][:12]}…, "
                                f"the bytes give {h.hexdigest()[:12]}…): the file changed after prescope wrote it "
                                f"(corrupted, truncated or edited). Restore or regenerate it; if you edited it on "
                                f"purpose, delete {sidecar.name}")
        return True
    digest, tokens = _scan(_chunks(path))
    return _judge(digest, tokens, str(path))


def read_json(path: str | Path, what: str = "JSON file") -> dict:
    """A JSON object written by `write_json` (or without a checksum: the legacy rule), verified, without
    its `checksum` field; ValueError naming the file when it is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return read_json_bytes(path.read_bytes(), str(path), what)


def read_json_bytes(data: bytes, where: str, what: str = "JSON file") -> dict:
    """`read_json` for bytes in memory (a packaged resource); `where` names them in errors."""
    sealed = verify_bytes(data, where)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not valid JSON, expected a {what} ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a {what} holding an object, got {type(obj).__name__}")
    if CHECKSUM_FIELD in obj and not sealed:
        raise ChecksumError(f"{where}: its `{CHECKSUM_FIELD}` field is damaged ({str(obj[CHECKSUM_FIELD])[:24]}…), so "
                            "the file cannot be checked; restore or regenerate it (or delete the field)")
    obj.pop(CHECKSUM_FIELD, None)
    return obj


def read_csv(path: str | Path, **options: Any):
    """A CSV (`write_with_sidecar`, or one without a sidecar), verified, as a pandas DataFrame."""
    import pandas as pd

    verify(path)
    return pd.read_csv(path, **options)


# ---- paths and locks -------------------------------------------------------------------------------------


def check_output(path: str | Path, *, folder: bool = False, what: str = "output") -> Path:
    """Refuse an output file (or `folder`) that could not be written, before any work: an existing folder
    where a file goes (or the reverse), a parent that is a file, a place this user may not write."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{what} {path} is {'a file' if folder else 'a folder'}; expected "
                         f"{'a folder' if folder else 'a file path'} there")
    probe = path if path.exists() else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {path}: {probe} is a file, so nothing can be written under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {probe} is not writable by this user")
    return path


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


class Claim:
    """An exclusive hold on `path` (a lock file), taken without waiting: `acquire()` is False while another
    process holds it. The kernel drops the hold when its process ends, so a killed holder leaves nothing
    stale. The file records who holds it, for the message of whoever finds it taken (`holder`)."""

    def __init__(self, path: str | Path) -> None:
        self.path, self._fd = Path(path), None

    def acquire(self) -> bool:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed this file as we opened it: take the one there now
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder()).encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            return f"pid {h['pid']} on {h['host']} since {h['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before the flock drops, so no one takes a file being removed
            os.close(self._fd)
            self._fd = None


class FolderLock(Claim):
    """One holder of a folder at a time (`with FolderLock(folder, what):`); LockedError for the second."""

    def __init__(self, folder: str | Path, what: str = "process") -> None:
        super().__init__(Path(folder) / LOCK_NAME)
        self.folder, self.what = Path(folder), what

    def __enter__(self) -> FolderLock:
        if not self.acquire():
            raise LockedError(f"{self.folder} is in use by another {self.what} ({self.holder()}); wait for it to "
                              f"finish, or choose another folder")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---- provenance ------------------------------------------------------------------------------------------


def git_revision(where: str | Path | None = None) -> str:
    """`git rev-parse HEAD` of the repository holding `where` (default: this package), else "unknown". For this
    package, PRESCOPE_GIT_REV where set: a copy of the tree (a device machine's) may carry stale git metadata."""
    if where is None and os.environ.get("PRESCOPE_GIT_REV"):
        return os.environ["PRESCOPE_GIT_REV"]
    cwd = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def source_revision() -> tuple[str, list[str]]:
    """(the package's git revision, `+wip` appended when it has uncommitted changes; the package's files
    that differ from it), so a result says exactly which code ran."""
    rev = git_revision()
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return rev, []
    dirty = sorted(line[3:] for line in status.splitlines() if line.strip())
    return (f"{rev}+wip" if dirty and rev != "unknown" else rev), dirty


def portable_path(path: str | Path) -> str:
    """`path` as a result file records it: relative to the working directory or to PROJECT_DIR when under
    one of them, `~/...` under the home folder, `$TMPDIR/...` under the temporary folder; other paths and
    relative ones unchanged. A result then names no folder of the machine that wrote it."""
    text = str(path)
    if not os.path.isabs(text):
        return text
    resolved = Path(text).resolve()
    for base, shown in ((Path.cwd().resolve(), ""), (PROJECT_DIR, ""), (Path(tempfile.gettempdir()).resolve(), "$TMPDIR"),
                        (Path.home().resolve(), "~")):
        if base.parent != base and (resolved == base or base in resolved.parents):
            rest = resolved.relative_to(base).as_posix()
            return "/".join(p for p in (shown, rest) if p and p != ".") or "."
    return text


def portable_values(values: Mapping) -> dict:
    """A config's values with every absolute path string made portable (`portable_path`), lists included."""
    def one(v):
        if isinstance(v, str) and os.path.isabs(v):
            return portable_path(v)
        return [one(x) for x in v] if isinstance(v, list | tuple) else v

    return {k: one(v) for k, v in values.items()}
