"""README.md works as written: every ```python block runs (on prescope-tiny, on the CPU), every `prescope`
command of its bash blocks parses, every job and every notebook is listed, and no path it names is missing."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from prescope import cli
from prescope.workbench import reports

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[tuple[int, str]]:
    """(line number, source) of every fenced block of `language` in README.md."""
    found = []
    for match in re.finditer(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M):
        found.append((README.count("\n", 0, match.start()) + 2, match.group(1)))
    return found


def commands() -> list[list[str]]:
    """The `prescope ...` commands of the bash blocks, continuation lines joined, comments dropped."""
    out = []
    for _, source in blocks("bash"):
        for line in source.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["prescope"]:
                out.append(words[1:])
    return out


def test_the_readme_has_python_and_bash_blocks():
    assert len(blocks("python")) >= 2 and commands()


@pytest.mark.parametrize("line, source", blocks("python"), ids=[f"line{line}" for line, _ in blocks("python")])
def test_every_python_block_runs_as_written(line, source, one_thread, capsys):
    exec(compile(source, f"README.md:{line}", "exec"), {"__name__": "readme"})  # noqa: S102 - the README's own code
    assert capsys.readouterr().out.strip(), "each block shows what it did"


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv[:3]))
def test_every_prescope_command_in_the_readme_parses(argv):
    args = cli.build_parser(argv[0]).parse_args(argv)
    assert args.command == argv[0]


def test_every_job_and_every_notebook_is_listed():
    for name in cli.COMMANDS:
        assert f"| `{name}` |" in README, name
    listed = re.findall(r"^\| (\d\d) \| `(\w+)` \|", README, flags=re.M)
    assert [stem for _, stem in listed] == [p.stem for p in reports.list_notebooks(ROOT / "notebooks")]
    assert [number for number, _ in listed] == sorted(number for number, _ in listed)  # 00 first


def test_paths_the_readme_names_exist():
    """Every path it names exists, or is an output the commands write (git ignores those)."""
    named = set(re.findall(r"`((?:prescope|reports|notebooks|tests)/[\w./-]+?)/?`", README))
    missing = sorted(p for p in named if not (ROOT / p).exists()
                     and subprocess.run(["git", "check-ignore", "-q", p], cwd=ROOT).returncode != 0)
    assert not missing, missing


def test_make_has_the_targets_the_readme_names():
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"`make (\w+)`", README):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
