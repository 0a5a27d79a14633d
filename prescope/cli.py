"""The `prescope` command line: one subcommand per job, options named like the config fields.

Each subcommand lives in the module that owns its work (`run(args)`, and `add_arguments(parser)` for its
options); this file only wires them up by name. Only the selected subcommand's module is imported, and
importing it does not import torch or transformers (they load inside the work), so `prescope --help` and
`prescope CMD --help` answer at once (tests/test_cli.py holds every command to that).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT


class Command(NamedTuple):
    module: str  # holds run(args), and add_arguments(parser) unless `options` names another module
    help: str
    options: str = ""  # where add_arguments lives when `module` itself needs torch to import


COMMANDS: dict[str, Command] = {
    "trace": Command("prescope.routing.recording", "record and summarise a routing trace of a model"),
    "trace-stats": Command("prescope.routing.tracestats", "a routing trace's shape and routing statistics"),
    "report": Command("prescope.workbench.reports", "run every notebook and render reports/"),
    "simulate": Command("prescope.sim.simulate", "replay a routing trace through a policy on a hardware profile"),
    "simulate-compare": Command("prescope.experiments.simcompare",
                                "every policy on several hardware profiles, simulated"),
    "trace-compare": Command("prescope.experiments.tracecompare",
                             "every policy on a real trace replayed on its shape twin, simulated"),
    "sweep": Command("prescope.workbench.sweep", "run a notebook over a parameter grid"),
    "train-tiny": Command("prescope.experiments.routermodels", "train prescope-tiny, or with --like NAME a twin's routing model"),
    "tiny-card": Command("prescope.experiments.modelcard", "measure prescope-tiny's routing for its card"),
    "predictor-accuracy": Command("prescope.predict.traceaccuracy", "every predictor on a routing trace, held out "
                                  "by position or prompt, by layer and distance"),
    "train-predictor": Command("prescope.predict.routellapor",
                               "train LLaPor (routing-only without hidden states) on a trace",
                               options="prescope.predict.llaporconfig"),
    "calibrate": Command("prescope.experiments.calibrate", "measure this machine and write a profile"),
    "bench": Command("prescope.experiments.bench", "measure policies on a GPU (shape twins)"),
    "gpu-inputs": Command("prescope.experiments.gpuinputs",
                          "build what a GPU run reads (held-out prompts, LLaPor) into one folder"),
    "check-equivalence": Command("prescope.experiments.equivalence", "offloaded vs stock output on a device"),
    "families": Command("prescope.experiments.families", "every MoE family of transformers: offloaded vs stock"),
    "fidelity": Command("prescope.experiments.fidelity", "simulated vs measured latency of a bench run"),
    "refit": Command("prescope.experiments.refit",
                     "refit a profile's GPU expert and host terms to bench runs; measured vs simulated per cell"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """All subcommands; only the selected one imports its module (so each runs with only its own needs)."""
    parser = argparse.ArgumentParser(prog="prescope", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        cmd = sub.add_parser(name, help=command.help, description=command.help)
        if name == selected:
            importlib.import_module(command.options or command.module).add_arguments(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(selected).parse_args(argv)
        return int(importlib.import_module(COMMANDS[args.command].module).run(args) or 0)
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
