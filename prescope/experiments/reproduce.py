"""reports/h200/REPRODUCE.md: for every committed H200 result, the commands that regenerate it from a fresh clone.

Nothing is typed by hand: each command is rebuilt from the result file's own record (`config`, `git_revision`,
the models of its rows), so the page cannot drift from the files; a test holds the committed page to `render()`.
Run `python -m prescope.experiments.reproduce` after adding a result to rewrite it.

What a result needs: a fresh clone at the revision that produced it (the engine and policies changed since),
the GPU inputs (`prescope gpu-inputs`, built once at the current revision: plain data every revision reads
through `--prompts` and `--predictor`), and the command. Two limits are stated where they apply: a revision
marked `+` ran with uncommitted changes, and LLaPor's training is not bit-reproducible, so rows that used
`--predictor` are reproduced with a checkpoint trained by the same recipe, not the same bytes.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from prescope.files import read_json, write_atomic

ROOT = Path("reports/h200")
PAGE = "REPRODUCE.md"
INPUTS = ".cache/device/inputs"
# (config key, bench flag), in the order `prescope bench --help` lists them; a key a result lacks is left out
BENCH_FLAGS = (("models", "--models"), ("batch_sizes", "--batch-sizes"), ("policies", "--policies"),
               ("budgets", "--budgets"), ("input_len", "--input-len"), ("output_len", "--output-len"),
               ("timeline_tokens", "--timeline-tokens"), ("seed", "--seed"), ("profile", "--profile"),
               ("accelerate_batches", "--accelerate-batches"), ("accelerate_tokens", "--accelerate-tokens"),
               ("repeats", "--repeats"))
# flags newer than most results: written only where the run changed their default, so older revisions' commands parse
NEW_FLAGS = (("stock_implementations", "--stock-implementations"), ("deadline_s", "--deadline-s"),
             ("switch_interval_s", "--switch-interval-s"))


def result_files(root: Path = ROOT) -> list[Path]:
    """The committed JSON results: reports/h200/*.json and every JSON in its sub-folders."""
    return sorted([*root.glob("*.json"), *(p for p in root.glob("*/**/*.json"))])


def is_bench_config(config) -> bool:
    """Whether a result's `config` is a `prescope bench` run's (its models are subject specs, NAME[:LAYERS][@...]),
    not another script's that also names models."""
    models = config.get("models") if isinstance(config, dict) else None
    return bool(models) and all(isinstance(m, str) for m in models)


def _words(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def trace_predictor_commands(config: dict, out: str) -> tuple[list[str], str | None]:
    """For a subject replaying a real trace (`twin[:layers]@trace:PATH`), the command that trains its routing-only
    LLaPor on the trace (`prescope predictor-accuracy --save-predictor`) and the checkpoint's path; else ([], None)."""
    for spec in config.get("models") or ():
        twin, _, path = str(spec).partition("@trace:")
        if path:
            layers = twin.partition(":")[2]
            checkpoint = f"{out}-routing-llapor.pt"
            words = ["prescope", "predictor-accuracy", "--trace", path, *(["--layers", layers] if layers else [])]
            return [shlex.join(words) + f' --out "{out}-accuracy" --save-predictor "{checkpoint}"'], checkpoint
    return [], None


def router_inputs(config: dict) -> dict:
    """The record of a gpu-inputs folder with routing models (`gpu-inputs --routers`) the run read, else {}."""
    info = (config.get("extra") or {}).get("inputs") or {}
    return info if info.get("routers") and info.get("command") and info.get("inputs") else {}


def inputs_command(config: dict) -> list[str]:
    """The `prescope gpu-inputs` line that rebuilds the routing models' folder the run read (its recorded command),
    or [] when it read none."""
    info = router_inputs(config)
    if not info:
        return []
    words = shlex.split(info["command"])
    if "--out" in words:
        words[words.index("--out") + 1] = info["inputs"]
    return [shlex.join(words)]


def bench_command(config: dict, out: str, predictor: str | None = None) -> str:
    """The `prescope bench` line that reruns a recorded `config`, into folder `out`; prompts and predictor from
    the gpu-inputs folder where the run used them (or `predictor`, a checkpoint made for this run)."""
    from prescope.experiments.bench import BenchConfig

    parts = ["prescope", "bench"]
    for key, flag in BENCH_FLAGS:
        value = config.get(key)
        if value is None:
            continue
        parts += [flag, *_words(value)]
    defaults = BenchConfig()
    for key, flag in NEW_FLAGS:
        value = config.get(key)
        if value is not None and _words(value) != _words(getattr(defaults, key)):
            parts += [flag, *_words(value)]
    if router_inputs(config):  # routing models and their LLaPor: the whole folder
        parts += ["--inputs", router_inputs(config)["inputs"]]
        return shlex.join(parts) + f' --out "{out}"'
    if config.get("prompts"):
        parts += ["--prompts", f"{INPUTS}/heldout-{config.get('input_len', 128)}.npy"]
    if config.get("predictor") and predictor is None:
        parts += ["--predictor", f"{INPUTS}/llapor.pt"]
    tail = f' --predictor "{predictor}"' if config.get("predictor") and predictor else ""
    return shlex.join(parts) + tail + f' --out "{out}"'  # unquoted by shlex: $OUT must expand


def _revision(data: dict) -> tuple[str, str]:
    """(short revision to check out, note on how exactly it reproduces)."""
    rev = str(data.get("git_revision") or "unknown")
    if rev == "unknown":
        return "", "the file records no revision"
    short = rev.replace("+wip", "").rstrip("+")[:7]
    dirty = rev.endswith("+") or "+wip" in rev
    return short, (f"ran with uncommitted changes on top of `{short}`: the nearest reproduction" if dirty else "")


def entry(path: Path, root: Path = ROOT) -> tuple[str, list[str], list[str]]:
    """(what the file is, its commands, notes) for one committed result."""
    try:
        data = read_json(path, "result")
    except ValueError:  # not a record (a list of measurements): only its folder can say how it was made
        data = {}
    name = path.relative_to(root).as_posix()
    short, note = _revision(data)
    notes = [note] if note else []
    checkout = [f"git checkout {short}"] if short else []
    config = data.get("config")
    if is_bench_config(config):
        stem = path.stem
        out = f"$OUT/{Path(name).with_suffix('').as_posix().replace('/', '-')}"  # one folder per result
        train, predictor = trace_predictor_commands(config, out) if config.get("predictor") else ([], None)
        bench = bench_command(config, out, predictor)
        commands = [*checkout, *train, *inputs_command(config), f"PRESCOPE_GIT_REV={short} " + bench if short else bench,
                    f"cp {out}/bench.json {root / name}"]
        for companion, made in ((f"{stem}.routing.npz", "routing.npz"), (f"{stem}.timelines.parquet", "timelines.parquet"),
                                ("routing.npz", "routing.npz"), ("timelines.parquet", "timelines.parquet")):
            if (path.parent / companion).is_file() and (companion.startswith(stem) or path.name == "bench.json"):
                commands.append(f"cp {out}/{made} {path.parent / companion}")
        newer = [flag for key, flag in NEW_FLAGS if flag in bench]
        if newer:
            notes.append(f"{', '.join(f'`{f}`' for f in newer)} came after some revisions: at one without it, give the "
                         "value to `BenchConfig` and call `bench.run_bench`")
        if router_inputs(config):
            notes.append("routing models and their LLaPor rebuilt by `prescope gpu-inputs --routers` (a routing model "
                         "trained in the run, and LLaPor, are not bit-reproducible: the manifest's checksums say which "
                         "the run used)")
        if predictor:
            notes.append("routing-only LLaPor retrained on the trace (seeded: the same weights on one machine, "
                         "float rounding may differ on another)")
        elif config.get("predictor"):
            notes.append("LLaPor retrained by `prescope gpu-inputs` (same recipe; training is not bit-reproducible)")
        what = f"`prescope bench`, {', '.join(config['models'])}, measured on {data.get('device', '?')}"
        return what, commands, notes
    if isinstance(data.get("command"), str):  # a result that says how it was made
        where = data.get("device") or data.get("training", {}).get("hardware") if isinstance(data.get("training"), dict) \
            else data.get("device")
        return (f"{data.get('what') or data.get('source') or 'measured'}" + (f", on {where}" if where else ""),
                [*checkout, f"PRESCOPE_GIT_REV={short} {data['command']}" if short else data["command"]], notes)
    if "rows" in data and path.stem.startswith("equivalence"):
        models = sorted({r["model"] for r in data["rows"]})
        command = shlex.join(["prescope", "check-equivalence", "--models", *models, "--out", str(root / name)])
        return f"`prescope check-equivalence`, measured on {data.get('device', '?')}", [*checkout, command], notes
    manifest = path.parent / "inputs-manifest.json"
    if path != manifest and manifest.is_file():  # written with a run's inputs (a routing model's card or score)
        made = read_json(manifest, "inputs manifest").get("command")
        if isinstance(made, str):
            return ("written by `prescope gpu-inputs` with the run's inputs (`inputs-manifest.json` beside it); the "
                    "device call copies it back", [*checkout, made], notes)
    if data.get("source") == "calibrated":
        commands = [f"prescope calibrate --out {root / name}"]
        commands += [f"# then by hand, as its notes say: {n.split(':')[0]}" for n in data.get("notes") or []]
        return f"hardware profile ({data.get('citation', '').rstrip('.')}; no revision recorded)", commands, []
    readme = path.parent / "README.md"
    if data.get("citation"):  # a profile that says how it was made
        return "a measurement this page cannot rebuild from its record", [f"# {data['citation'][:200]}"], []
    if readme.is_file():  # a measurement made by a script its folder's README names
        return "a measurement this page cannot rebuild from its record", [f"# as {readme} says"], []
    return "not a result this page knows how to rebuild", [], ["regenerate by hand"]


def _scripts(root: Path) -> list[str]:
    """A line per device-call script in `root` (but call.sh) saying what it runs: its first comment line."""
    lines = []
    for script in sorted(root.glob("*.sh")):
        if script.name == "call.sh":
            continue
        first = next((ln.lstrip("# ").strip() for ln in script.read_text().splitlines() if ln.startswith("#")), "")
        lines.append(f"`{script.relative_to(root.parent.parent).as_posix() if root.is_absolute() else script.as_posix()}`: {first}")
    return lines


def render(root: Path = ROOT) -> str:
    lines = [
        "# Reproducing the H200 results",
        "",
        "Written by `python -m prescope.experiments.reproduce` from each result file's own record (its `config`,",
        "`git_revision`, device); `tests/experiments/test_reproduce.py` holds this page to the files. Every command",
        "runs from the root of a fresh clone on a CUDA machine (torch 2.11, transformers 5.17, no network):",
        "",
        "```bash",
        "git clone <this repository> prescope && cd prescope && pip install -e '.[gpu]'",
        f"prescope gpu-inputs --out {INPUTS} --device cuda   # once, at the current revision: prompts + LLaPor",
        "export OUT=$PWD/.cache/h200-rerun",
        "```",
        "",
        "`reports/h200/call.sh` is the same as one device call (inputs built if missing, then `bench --inputs`).",
        *_scripts(root),
        "Then, per result, check out the revision that produced it (the engine changed since) and run its commands",
        f"(`{INPUTS}` is untracked, so it stays across checkouts). Timings vary from run to run (host-bound cells by",
        "tens of percent); the tokens, loads and ratios are what a rerun should match.",
        "",
    ]
    for path in result_files(root):
        what, commands, notes = entry(path, root)
        lines += [f"## `{path.relative_to(root).as_posix()}`", "", what + ("" if not notes else ". " + ". ".join(notes)),
                  ""]
        if commands:
            lines += ["```bash", *commands, "```", ""]
    fidelity = sorted([*root.glob("fidelity-*.csv"), *(root / "comparison").glob("fidelity-*.csv")])
    if fidelity:
        lines += ["## Fidelity tables", "", "Simulated against measured, from a bench result beside it. The CSVs do not "
                  "record their inputs: the pairing is by name, the profile `h200-calibrated.json` for the top-level "
                  "tables (as reports/h200/README.md says) and the bench's own for the comparison's; a routing file "
                  "that is not committed comes from the bench rerun above:", "", "```bash"]
        for csv in fidelity:
            stem = csv.stem.removeprefix("fidelity-")
            bench = next((p for p in (csv.parent / f"{stem}.json", csv.parent / f"bench-{stem}.json") if p.is_file()), None)
            if bench is None:
                lines.append(f"# {csv}: no bench result of that name beside it")
                continue
            routing = bench.with_name(f"{stem}.routing.npz")
            # reports/h200/README.md names the calibrated profile for the top-level tables; the comparison's
            # tables are taken to use the profile its bench decided with
            profile = (root / "h200-calibrated.json" if csv.parent == root
                       else read_json(bench, "bench JSON").get("config", {}).get("profile", "h200"))
            lines.append(f"prescope fidelity --bench {bench} --routing {routing if routing.is_file() else '$OUT/' + stem + '/routing.npz'}"
                         f" --profile {profile} --out {csv}")
        lines += ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    print(write_atomic(root / PAGE, render(root)))
