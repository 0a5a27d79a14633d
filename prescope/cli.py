"""The `prescope` command line: one subcommand per job, options named like the config fields.

Each subcommand lives in the module that owns its work; this file only wires them up, importing
lazily so `prescope --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT
# name -> (module, function that adds arguments to a parser, function that runs with parsed args)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "calibrate": ("prescope.experiments.calibrate", "add_arguments", "run", "measure this machine and write a profile"),
    "check-equivalence": ("prescope.experiments.equivalence", "add_arguments", "run", "offloaded vs stock output on a device"),
    "tiny-card": ("prescope.experiments.modelcard", "add_arguments", "run", "measure prescope-tiny's routing for its card"),
    "fidelity": ("prescope.experiments.fidelity", "add_arguments", "run", "simulated vs measured latency of a bench run"),
    "bench": ("prescope.experiments.bench", "add_arguments", "run", "measure policies on a GPU (shape twins)"),
    "report": ("prescope.workbench.reports", "add_arguments", "run", "run every notebook and render reports/"),
    "sweep": ("prescope.workbench.sweep", "add_arguments", "run", "run a notebook over a parameter grid"),
    "simulate": ("prescope.sim.simulator", "add_arguments", "run", "replay a routing trace through a policy on a hardware profile"),
    "simulate-compare": ("prescope.experiments.simcompare", "add_arguments", "run", "every policy on several hardware profiles, simulated"),
    "train-tiny": ("prescope.models.tiny", "add_arguments", "run", "train prescope-tiny"),
    "train-predictor": ("prescope.predict.llapor", "add_arguments", "run", "train LLaPor on a routing trace"),
    "trace": ("prescope.routing.recording", "add_arguments", "run", "record and summarise a routing trace"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """All subcommands; only the selected one imports its module (so each runs with only its own needs)."""
    parser = argparse.ArgumentParser(prog="prescope", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, add_fn, _, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text)
        if name == selected:
            getattr(importlib.import_module(module), add_fn)(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(selected).parse_args(argv)
        module, _, run_fn, _ = COMMANDS[args.command]
        return int(getattr(importlib.import_module(module), run_fn)(args) or 0)
    # Bad input and unusable files (every check raises ValueError; the OS's refusals are OSErrors) end in one
    # line naming what to change; a stop with Ctrl-C ends without a traceback. Anything else is a bug: shown.
    except (ValueError, OSError) as exc:
        print(f"prescope {selected}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"prescope {selected}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
