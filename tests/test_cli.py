"""The command line: bad input ends in one line on stderr and exit code 2, Ctrl-C in exit code 130, never a
traceback; each command checks what it can before its work starts."""

from __future__ import annotations

import pytest
import torch

from prescope import cli


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
    from prescope.sim import simulator

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(simulator, "run", interrupted)
    assert cli.main(["simulate", "--trace", "x.parquet"]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "prescope simulate: interrupted"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv", [["bench", "--out", "OUT"], ["check-equivalence", "--out", "OUT/e.json"],
                                  ["trace", "--device", "cuda:0", "--out-dir", "OUT"]])
def test_cuda_commands_on_a_machine_without_cuda_say_so_in_one_line(tmp_path, capsys, argv):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    _one_line_error(capsys, argv, "on this machine; use --device cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["train-tiny", "--out", "FILE/x"], ["calibrate", "--cpu-only", "--out", "FILE/p.json"],
                                  ["train-predictor", "--trace", "t.parquet", "--out", "FILE/ck.pt"]])
def test_long_jobs_check_their_output_first(tmp_path, capsys, argv):
    (tmp_path / "FILE").write_text("x")
    _one_line_error(capsys, [a.replace("FILE", str(tmp_path / "FILE")) for a in argv], "FILE is a file")
