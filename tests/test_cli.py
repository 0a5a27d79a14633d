"""The command line: every job listed, every option explained, `--help` without the heavy libraries, and a
clear one-line error where a job needs a GPU this machine does not have; bad input ends in one line on
stderr and exit code 2, Ctrl-C in exit code 130, never a traceback; each command checks what it can before
its work starts."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prescope import cli

ROOT = Path(__file__).resolve().parents[1]
# Importing these takes seconds (torch ~0.8 s, transformers ~0.5 s on a 2-core machine): `--help` must not.
HEAVY = ("torch", "transformers")
PROBE = """
import json, sys
from prescope import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def loaded_by(*argv: str) -> set[str]:
    """Top-level packages a fresh interpreter has imported after `prescope ARGV`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env,
                         check=True, cwd=ROOT).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in cli.COMMANDS])
def test_help_imports_neither_torch_nor_transformers(argv):
    assert not loaded_by(*argv) & set(HEAVY), argv


def test_the_probe_sees_a_heavy_import(tmp_path):
    """The import check can fail: a job that runs (here up to its first check) does load torch."""
    assert "torch" in loaded_by("trace", "--model", str(tmp_path / "no-model"), "--out-dir", str(tmp_path))


def options(name: str) -> list[argparse.Action]:
    sub = next(a for a in cli.build_parser(name)._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[name]._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_option_of_every_command_has_a_help_text(name):
    found = options(name)
    assert found, name
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in found
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, f"prescope {name}: options without help: {missing}"


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_names_a_module_with_its_functions(name):
    command = cli.COMMANDS[name]
    assert callable(importlib.import_module(command.module).run)
    assert callable(importlib.import_module(command.options or command.module).add_arguments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("argv", [["bench", "--models", "olmoe-1b-7b:2", "--batch-sizes", "1"],
                                  ["check-equivalence", "--models", "prescope-tiny"]])
def test_a_gpu_job_without_cuda_ends_with_one_clear_line(argv, capsys, tmp_path):
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"prescope {argv[0]}: error: --device cuda")
    assert "CUDA" in err[0] and "--device cpu" in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything was built or written

def _one_line_error(capsys, argv: list[str], expected: str) -> None:
    assert cli.main(argv) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and err.startswith(f"prescope {argv[0]}: error:")


def test_files_the_system_refuses_are_one_line(tmp_path, capsys):
    (tmp_path / "dir.json").mkdir()
    _one_line_error(capsys, ["simulate", "--trace", str(tmp_path / "none.parquet")], "does not exist")
    _one_line_error(capsys, ["fidelity", "--bench", str(tmp_path / "dir.json"), "--routing", "x", "--profile", "h200"],
                    "dir.json")


def test_an_interrupted_command_ends_quietly_with_130(monkeypatch, capsys):
    from prescope.sim import simulate

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(simulate, "run", interrupted)
    assert cli.main(["simulate", "--trace", "x.parquet"]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "prescope simulate: interrupted"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv", [["bench", "--out", "OUT"], ["check-equivalence", "--out", "OUT/e.json"],
                                  ["trace", "--device", "cuda:0", "--out-dir", "OUT"]])
def test_cuda_commands_on_a_machine_without_cuda_say_so_in_one_line(tmp_path, capsys, argv):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    _one_line_error(capsys, argv, "--device cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["train-tiny", "--out", "FILE/x"], ["calibrate", "--cpu-only", "--out", "FILE/p.json"],
                                  ["train-predictor", "--trace", "t.parquet", "--out", "FILE/ck.pt"]])
def test_long_jobs_check_their_output_first(tmp_path, capsys, argv):
    (tmp_path / "FILE").write_text("x")
    _one_line_error(capsys, [a.replace("FILE", str(tmp_path / "FILE")) for a in argv], "FILE is a file")
