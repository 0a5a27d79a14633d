"""prescope.files: portable paths, and no committed result or report naming a folder of the machine that made it."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from prescope import files

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ("reports", "prescope/assets")
MACHINE_FOLDERS = re.compile(r"(?<![\w.~$])/(?:work|root|home|tmp)/")  # absolute, not `~/x` or `$TMPDIR/x`
BINARY = {".npz", ".parquet", ".safetensors", ".png", ".pt"}


def committed_files() -> list[Path]:
    """The files git tracks under COMMITTED (every file there when this is not a git checkout)."""
    done = subprocess.run(["git", "ls-files", "-z", *COMMITTED], cwd=ROOT, capture_output=True, check=False)
    if done.returncode == 0 and done.stdout:
        return [ROOT / name for name in done.stdout.decode().split("\0") if name]
    return [p for folder in COMMITTED for p in (ROOT / folder).rglob("*") if p.is_file()]


def test_no_committed_result_or_report_holds_an_absolute_path_of_a_machine():
    offenders = []
    for path in committed_files():
        if path.suffix in BINARY or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        offenders += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: "
                      f"{text[m.start():m.start() + 60].splitlines()[0]}" for m in MACHINE_FOLDERS.finditer(text)]
    assert offenders == [], "absolute paths in committed files (record them with files.portable_path):\n" + \
        "\n".join(offenders[:20])


def test_the_check_finds_an_absolute_path_and_spares_portable_ones():
    assert MACHINE_FOLDERS.search('"out": "/root/out/mixtral"')
    assert MACHINE_FOLDERS.search("File /work/main/prescope/engine.py, line 3")
    assert not MACHINE_FOLDERS.search('"out": "~/out/mixtral", "x": "$TMPDIR/simout", "y": "../data"')


def test_portable_path_is_relative_to_the_working_directory_or_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert files.portable_path(tmp_path / "out" / "bench.json") == "out/bench.json"
    assert files.portable_path(tmp_path) == "."
    assert files.portable_path(files.PROJECT_DIR / "prescope" / "assets") == "prescope/assets"
    assert files.portable_path("reports/h200") == "reports/h200"  # relative paths stay as given


def test_portable_path_names_home_and_temporary_folders_symbolically(monkeypatch):
    monkeypatch.chdir(files.PROJECT_DIR)
    temp = Path(tempfile.gettempdir()).resolve()
    assert files.portable_path(temp / "simout") == "$TMPDIR/simout"
    home = Path.home().resolve()
    if home in files.PROJECT_DIR.parents or home == Path("/"):
        pytest.skip("the project lies in the home folder: its paths read relative to the project")
    assert files.portable_path(home / "out" / "mixtral") == "~/out/mixtral"
    assert files.portable_path("/usr/share/doc") == "/usr/share/doc"  # nobody's folder in particular


def test_portable_values_rewrites_absolute_path_strings_only(monkeypatch):
    monkeypatch.chdir(files.PROJECT_DIR)
    temp = Path(tempfile.gettempdir()).resolve()
    values = files.portable_values({"out": str(temp / "x"), "profiles": ["h200", str(temp / "p.json")], "n": 3})
    assert values == {"out": "$TMPDIR/x", "profiles": ["h200", "$TMPDIR/p.json"], "n": 3}
