"""prescope.data: the shipped data is complete and unchanged, .xz is read transparently, a user's plain
files go through the same functions, and nothing the project runs reads a sibling `shared/` folder."""

from __future__ import annotations

import hashlib
import lzma
import re
import subprocess
from pathlib import Path

import pytest

from prescope import data

ROOT = Path(__file__).resolve().parents[1]


def manifest() -> dict[str, str]:
    """{name without .xz: SHA-256 of the decompressed content} from the shipped SHA256SUMS."""
    lines = data.shipped("SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in lines if line.strip())}


def test_every_shipped_file_matches_its_recorded_checksum():
    sums = manifest()
    assert {"corpus/c4.txt", "routing/qwen3-30b-a3b.route.csv", "routing/olmoe-mixtral-routing-aggregates.json",
            "hardware/h200-measured-2026-11-28.json"} <= set(sums)
    for name, digest in sums.items():
        assert hashlib.sha256(data.read_bytes(data.shipped(name))).hexdigest() == digest, name


def test_every_shipped_file_is_in_the_manifest_and_every_folder_carries_its_licence():
    listed = set(manifest())
    found = {str(p.relative_to(data.DATA_DIR)).removesuffix(data.XZ) for p in data.DATA_DIR.rglob("*")
             if p.is_file() and p.name not in ("README.md", "SHA256SUMS")}
    assert found == listed
    for folder in ("corpus", "routing"):
        assert list(data.shipped(folder).glob("LICENSE-*")), folder


def test_plain_and_xz_files_read_alike(tmp_path):
    text = "one line\nanother é line\n"
    (tmp_path / "plain.txt").write_text(text, encoding="utf-8")
    (tmp_path / "packed.txt.xz").write_bytes(lzma.compress(text.encode()))
    for name in ("plain.txt", "packed.txt"):
        assert data.read_text(tmp_path / name) == text
        with data.open_text(tmp_path / name) as stream:
            assert stream.read() == text
        assert data.exists(tmp_path / name) and not data.is_empty(tmp_path / name)
    assert data.resolve(tmp_path / "packed.txt") == tmp_path / "packed.txt.xz"
    assert data.read_text(tmp_path / "packed.txt.xz") == text  # named with its suffix, too


def test_a_plain_file_wins_over_its_xz_neighbour(tmp_path):
    (tmp_path / "a.txt").write_text("plain")
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(b"packed"))
    assert data.read_text(tmp_path / "a.txt") == "plain"


def test_empty_files_are_seen_as_empty_compressed_or_not(tmp_path):
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "f.txt.xz").write_bytes(lzma.compress(b""))
    assert data.is_empty(tmp_path / "e.txt") and data.is_empty(tmp_path / "f.txt")


def test_a_missing_file_names_both_candidates(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.csv does not exist \(nor nothing\.csv\.xz"):
        data.read_text(tmp_path / "nothing.csv")
    assert not data.exists(tmp_path / "nothing.csv")


def test_nothing_the_project_runs_names_a_sibling_shared_folder():
    """The code, notebooks, tests and build files must work from a clone alone, with no sibling folder."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if not files:
        pytest.fail("git ls-files listed nothing: run the tests from a git checkout")
    runnable = [f for f in files if re.search(r"\.(py|ipynb|cfg|toml|yml|yaml)$|^Makefile$|^\.ci/", f)]
    pattern = re.compile(r"\.\./(\.\./)?shared\b|[\"']shared[\"']\s*/|/ \"shared\"")
    offenders = [f for f in runnable if pattern.search((ROOT / f).read_text(errors="replace"))]
    assert not offenders, offenders
