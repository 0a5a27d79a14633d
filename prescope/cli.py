"""The `prescope` command line: one subcommand per job, options named like the config fields.

Each subcommand lives in the module that owns its work; this file only wires them up, importing
lazily so `prescope --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, function that adds arguments to a parser, function that runs with parsed args)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    # "name": ("prescope.module", "add_arguments_fn", "run_fn", "help"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prescope", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, add_fn, _, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text)
        getattr(importlib.import_module(module), add_fn)(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _, run_fn, _ = COMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(module), run_fn)(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"prescope {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
