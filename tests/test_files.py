"""prescope.files: portable paths, and no committed result or report naming a folder of the machine that made
it; checksums in every format, the rule for files without one, locks, early output checks."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from prescope import files
from prescope.files import ChecksumError, Claim, FolderLock, LockedError

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

FLIPS = 200  # single-bit flips tried per format


def _written(tmp_path: Path) -> dict[str, Path]:
    """One small file of each kind prescope writes."""
    return {
        "json": files.write_json(tmp_path / "a.json", {"x": 1, "y": [1.5, "text"], "z": {"n": None}}),
        "parquet": files.write_parquet(tmp_path / "a.parquet", pd.DataFrame({"a": np.arange(50), "b": ["s"] * 50})),
        "torch": files.write_archive_with(tmp_path / "a.pt", lambda tmp: torch.save({"w": torch.arange(20.0)}, tmp)),
        "npz": files.write_npz(tmp_path / "a.npz", {"r": np.arange(30)}),
        "csv": files.write_with_sidecar(tmp_path / "a.csv", "a,b\n1,2\n3,4\n"),
    }


@pytest.mark.parametrize("kind", ["json", "parquet", "torch", "npz", "csv"])
def test_every_format_verifies_and_every_flipped_bit_is_caught_or_harmless(tmp_path, kind):
    path = _written(tmp_path)[kind]
    assert files.verify(path) is True
    data = path.read_bytes()
    rng = random.Random(0)
    marker = data.find(files.TOKEN_PREFIX)
    refused = 0
    for _ in range(FLIPS):
        i = rng.randrange(len(data))
        flipped = bytearray(data)
        flipped[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        try:
            files.verify(path)
        except ChecksumError as exc:
            assert str(path) in str(exc)
            refused += 1
            continue
        # accepted only when the flip hit the marker's own prefix: the data itself is intact
        assert marker <= i < marker + len(files.TOKEN_PREFIX), f"flip at byte {i} of {kind} was accepted"
    assert refused > FLIPS // 2


def test_checksums_survive_chunk_boundaries_and_name_what_to_do(tmp_path, monkeypatch):
    paths = _written(tmp_path)
    monkeypatch.setattr(files, "CHUNK_BYTES", 7)  # every token straddles chunks
    assert all(files.verify(p) for p in paths.values())
    text = paths["json"].read_text().replace('"x": 1', '"x": 2')
    paths["json"].write_text(text)
    with pytest.raises(ChecksumError, match=r"a.json: checksum mismatch .* edited"):
        files.read_json(paths["json"])


def test_files_without_a_checksum_load_and_a_damaged_checksum_field_does_not(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"x": 1}))
    assert files.verify(tmp_path / "old.json") is False and files.read_json(tmp_path / "old.json") == {"x": 1}
    sealed = files.write_json(tmp_path / "new.json", {"x": 1})
    assert files.read_json(sealed) == {"x": 1}  # the checksum field is not part of the data
    sealed.write_text(sealed.read_text().replace("prescope-sha256:", "prescope-sha257:"))
    with pytest.raises(ChecksumError, match="`checksum` field is damaged"):
        files.read_json(sealed)


def test_rewriting_a_loaded_json_gets_a_fresh_checksum(tmp_path):
    first = files.write_json(tmp_path / "a.json", {"x": 1})
    data = json.loads(first.read_text())  # still holds the old checksum
    files.write_json(tmp_path / "b.json", {**data, "x": 2})
    assert files.read_json(tmp_path / "b.json") == {"x": 2}


def test_sidecar_lists_old_and_new_digest_while_replacing(tmp_path, monkeypatch):
    path = files.write_with_sidecar(tmp_path / "t.csv", "a\n1\n")
    writes = []
    real = files.write_atomic

    def stop_after_sidecar(target, data):
        writes.append(Path(target).name)
        if Path(target) == path:
            raise KeyboardInterrupt  # stopped between the sidecar and the file
        return real(target, data)

    monkeypatch.setattr(files, "write_atomic", stop_after_sidecar)
    with pytest.raises(KeyboardInterrupt):
        files.write_with_sidecar(path, "a\n2\n")
    assert writes == ["t.csv.sha256", "t.csv"]
    assert path.read_text() == "a\n1\n" and files.verify(path)  # the old file still verifies
    monkeypatch.setattr(files, "write_atomic", real)
    files.write_with_sidecar(path, "a\n2\n")
    assert len((tmp_path / "t.csv.sha256").read_text().splitlines()) == 1 and files.verify(path)
    path.write_text("a\n3\n")
    with pytest.raises(ChecksumError, match="t.csv.sha256"):
        files.read_csv(path)


def test_committed_results_and_builtin_profiles_keep_loading():
    """Files written before checksums load under the rule; the built-in profiles carry one."""
    found = [p for pattern in ("reports/**/*.json", "reports/**/*.csv", "reports/**/*.parquet", "reports/**/*.npz",
                               "prescope/assets/**/*.json") for p in ROOT.glob(pattern)]
    assert len(found) > 50
    for path in found:
        files.verify(path)
    assert all(files.verify(p) for p in (ROOT / "prescope" / "assets" / "profiles").glob("*.json"))


def test_check_output_refuses_what_cannot_be_written_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="file is a file, so nothing can be written under it"):
        files.check_output(tmp_path / "file" / "ck.pt")
    with pytest.raises(ValueError, match="is a folder; expected a file path"):
        files.check_output(tmp_path / "dir")
    with pytest.raises(ValueError, match="is a file; expected a folder"):
        files.check_output(tmp_path / "file", folder=True)
    assert files.check_output(tmp_path / "new" / "deeper" / "ck.pt") == tmp_path / "new" / "deeper" / "ck.pt"
    assert not (tmp_path / "new").exists()  # nothing is created by checking
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            files.check_output(tmp_path / "ro" / "x.json")


HOLD = """
import sys, time
from prescope.files import FolderLock
with FolderLock(sys.argv[1], "sweep"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_folder_lock_refuses_a_second_holder_and_frees_when_its_holder_dies(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"{tmp_path} is in use by another sweep \(pid {holder.pid} on "):
            with FolderLock(tmp_path, "sweep"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: no clean-up runs
        holder.wait()
    with FolderLock(tmp_path, "sweep"):  # the kernel dropped the dead holder's lock
        assert (tmp_path / files.LOCK_NAME).exists()
    assert not (tmp_path / files.LOCK_NAME).exists()


CLAIM_RACE = """
import os, sys
from prescope.files import Claim
won = 0
for i in range(int(sys.argv[2])):
    claim = Claim(f"{sys.argv[1]}/{i}/.claim")
    if claim.acquire():
        if not os.path.exists(f"{sys.argv[1]}/{i}/ran"):  # claim, then look whether it is still to do
            won += 1
            with open(f"{sys.argv[1]}/{i}/ran", "a") as f:
                f.write(sys.argv[3])
        claim.release()
print(won)
"""


def test_concurrent_claims_give_each_item_to_one_process(tmp_path):
    items = 200
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM_RACE, str(tmp_path), str(items), name],
                              stdout=subprocess.PIPE, text=True, env=env) for name in "ab"]
    counts = [int(p.communicate(timeout=120)[0]) for p in procs]
    # claim, check, run, release (as the sweep's runner does): every item ran once, whichever process took it
    assert sum(counts) == items
    assert all(len((tmp_path / str(i) / "ran").read_text()) == 1 for i in range(items))


def test_claim_is_exclusive_in_one_process_and_released(tmp_path):
    first, second = Claim(tmp_path / "c"), Claim(tmp_path / "c")
    assert first.acquire() and not second.acquire()
    assert f"pid {os.getpid()}" in second.holder()
    first.release()
    assert not (tmp_path / "c").exists() and second.acquire()
    second.release()
    start = time.perf_counter()
    assert Claim(tmp_path / "c").acquire() and time.perf_counter() - start < 1


def test_the_packages_revision_is_the_one_a_run_names(monkeypatch):
    """A device machine's copy of the tree may carry stale git metadata: PRESCOPE_GIT_REV names the revision."""
    from prescope.files import git_revision

    monkeypatch.setenv("PRESCOPE_GIT_REV", "abc1234")
    assert git_revision() == "abc1234"
    monkeypatch.delenv("PRESCOPE_GIT_REV")
    assert git_revision() != "abc1234"
