"""Files prescope writes: the one atomic writer, and the git revision every result file carries.

Result files never name this machine's folders: a path they record goes through `portable_path` (relative
to the working directory or to the folder holding the package, else `~/...` or `$TMPDIR/...`).

A result is written to a temporary sibling and moved into place with `os.replace`, so a reader (a
notebook, a resumed sweep, a person) never sees half a file, and an interrupted run leaves the previous
file or none. `write_atomic` takes bytes or text; `write_atomic_with` hands a temporary path to a
writer that needs one (parquet, torch.save, papermill).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

GIT_TIMEOUT_S = 5
PROJECT_DIR = Path(__file__).resolve().parents[1]  # the folder holding the package (a checkout's root)


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
    """Write `data` (text as UTF-8) to `path` atomically."""
    payload = data.encode() if isinstance(data, str) else data

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            f.write(payload)

    return write_atomic_with(path, write)


def git_revision(where: str | Path | None = None) -> str:
    """`git rev-parse HEAD` of the repository holding `where` (default: this package), else "unknown"."""
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
