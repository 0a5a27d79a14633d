"""`prescope gpu-inputs --out DIR`: everything a GPU run reads, built by one command into one folder.

A `prescope bench` of a twin driven by prescope-tiny's routing (`twin@prescope-tiny`) or of prescope-tiny itself
reads held-out prompts and a LLaPor checkpoint; before this command they were files nobody could rebuild. Now:

- `heldout-{input_len}.npy`: [rows, input_len] token ids, `prompts_per_domain` windows of prescope-tiny's
  held-out text per corpus domain (`subjects.heldout_prompts`, the corpus shipped in the package, its tokenizer);
- `llapor.pt`: LLaPor for prescope-tiny, trained by the recipe of `reports/llapor` (`accuracy.run_report`):
  a trace of `train_per_domain` training prompts per domain of `prompt_tokens` tokens, `max_new_tokens` new
  tokens, hidden states and logits kept, `LLaPorConfig` defaults (`max_epochs` and `device` as given), gate
  lookahead from prescope-tiny's routers. The trace is cached in `cache_dir` (the key `run_report` uses);
- with `--routers SPEC[,SPEC...]` (`NAME[:LAYERS]` or `all`): twins' routing models and a LLaPor per layer count
  for the subjects `TWIN[:LAYERS]@router`, under `routers/` (`routerinputs`: trained here where none is committed
  or cached, `--router-time-budget-s` seconds each; LLaPor's layers in `--llapor-processes` CPU processes), and the
  deepest LLaPor of each scored against gate lookahead on the routing model's held-out text
  (`routers/NAME/llapor-vs-gate-N.json`, `routerscores`; `--no-router-scores` skips it);
- `manifest.json` (checksummed): the format, the git revision, the command line that rebuilds the folder, the
  config, the SHA-256 and size of every file, and of the routing model they belong to (prescope-tiny's weights;
  each twin's routing model under `routers`).

`prescope bench --inputs DIR` reads prompts and predictor from such a folder (`read_inputs`), after checking the
manifest and every checksum, and that the prescope-tiny installed is the one the folder was built for: a
missing, changed or foreign file is one clear error. The folder is small (the LLaPor checkpoint is a few MB),
so a GPU run carries it along. LLaPor's training is not bit-reproducible across machines (see issue 15):
the manifest's checksums say which checkpoint a run used.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from prescope.config import check_device, check_types
from prescope.experiments.routerinputs import sha256
from prescope.files import (
    check_output,
    git_revision,
    portable_values,
    read_json,
    write_atomic_with,
    write_json,
)

FORMAT = "prescope.gpu-inputs"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PREDICTOR = "llapor.pt"
TINY_WEIGHTS = "model.safetensors"


class InputsError(ValueError):
    """A gpu-inputs folder that cannot be built or used as asked; says what to change."""


@dataclass(frozen=True)
class InputsConfig:
    """out: the folder. input_len: prompt tokens of the bench (`--input-len`); prompts_per_domain: held-out windows
    per corpus domain. The LLaPor recipe: train_per_domain training prompts per domain of prompt_tokens tokens,
    max_new_tokens generated, batch_size prompts recorded together, max_epochs (0 = LLaPorConfig's default),
    device (where the trace is recorded and LLaPor trained), cache_dir (the training trace's cache);
    predictor=False builds no LLaPor for prescope-tiny. routers: twins' routing models and their LLaPor
    (`routerinputs`), each trained in router_time_budget_s seconds at most where one must be trained (0: the full
    recipe); llapor_processes: CPU processes training their LLaPor's layers (0: one per core). router_scores: score
    each routing model's deepest LLaPor against gate lookahead on heldout_per_domain held-out prompts per domain
    (`routerscores`; the trace's shape as the training trace's)."""

    out: str
    input_len: int = 128
    prompts_per_domain: int = 13
    train_per_domain: int = 60
    prompt_tokens: int = 32
    max_new_tokens: int = 32
    batch_size: int = 8
    max_epochs: int = 0
    device: str = "cpu"
    cache_dir: str = ".cache/llapor"
    predictor: bool = True
    routers: str = ""
    router_time_budget_s: float = 0.0
    llapor_processes: int = 0
    router_scores: bool = True
    heldout_per_domain: int = 20

    def __post_init__(self) -> None:
        check_types(self, InputsError)
        for name in ("input_len", "prompts_per_domain", "train_per_domain", "prompt_tokens", "max_new_tokens",
                     "batch_size", "heldout_per_domain"):
            if getattr(self, name) < 1:
                raise InputsError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_epochs < 0:
            raise InputsError(f"max_epochs must be >= 0 (0: LLaPor's default), got {self.max_epochs}")
        if self.router_time_budget_s < 0 or self.llapor_processes < 0:
            raise InputsError("router_time_budget_s and llapor_processes must be >= 0 (0: no limit, one per core), "
                              f"got {self.router_time_budget_s} and {self.llapor_processes}")


def command_line(cfg: InputsConfig) -> str:
    """The command that rebuilds `cfg`'s folder (every option spelled out, so defaults may change safely)."""
    parts = ["prescope gpu-inputs"]
    for f in fields(InputsConfig):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def _record(path: Path, what: str, **extra) -> dict:
    return {"sha256": sha256(path), "bytes": path.stat().st_size, "what": what, **extra}


def build_inputs(cfg: InputsConfig, progress: bool = True) -> dict:
    """Build `cfg.out` (module docstring); returns the manifest written there."""
    import numpy as np

    from prescope.experiments import routerinputs
    from prescope.experiments.subjects import heldout_prompts
    from prescope.models import tiny

    out = check_output(cfg.out, folder=True, what="--out")
    if cfg.routers:
        routerinputs.parse_specs(cfg.routers)  # a clear error before anything is built
    if cfg.predictor or cfg.routers:
        check_device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    prompts = heldout_prompts(cfg.input_len, cfg.prompts_per_domain)  # [rows, input_len]
    name = f"heldout-{cfg.input_len}.npy"
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a path
            np.save(f, prompts)

    write_atomic_with(out / name, save)
    files = {name: _record(out / name, "held-out prompt ids of prescope-tiny (bench --prompts)",
                           shape=list(prompts.shape), input_len=cfg.input_len)}
    if cfg.predictor:
        files[PREDICTOR] = _train_predictor(cfg, out / PREDICTOR, progress)
    router_files, routers = routerinputs.build_routers(cfg, out, _record, progress) if cfg.routers else ({}, {})
    files.update(router_files)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "source": "built", "git_revision": git_revision(),
                "command": command_line(cfg), "config": portable_values(asdict(cfg)),
                "routing_model": {"name": "prescope-tiny", "path": "prescope/assets/prescope-tiny",
                                  TINY_WEIGHTS: sha256(tiny.TINY_DIR / TINY_WEIGHTS)},
                "routers": routers, "files": files, "seconds": round(time.perf_counter() - began, 1)}
    write_json(out / MANIFEST, manifest, indent=2)
    return manifest


def _train_predictor(cfg: InputsConfig, path: Path, progress: bool) -> dict:
    """LLaPor for prescope-tiny by the recipe of reports/llapor, saved at `path`; its manifest record."""
    from prescope.files import read_json as read_card
    from prescope.models import corpus, tiny
    from prescope.predict import llapor, predictors
    from prescope.predict.accuracy import cached_trace

    model, tokenizer = tiny.load_tiny()
    model = model.to(cfg.device)
    card = read_card(tiny.TINY_DIR / "model_card.json", "model card").get("config", {})
    spec = corpus.card_spec(card)
    train, _ = cached_trace(model, tokenizer, spec, "train", cfg.train_per_domain, cfg.prompt_tokens,
                            cfg.max_new_tokens, cfg.batch_size, Path(cfg.cache_dir), str(tiny.TINY_DIR))
    config = llapor.LLaPorConfig(device=cfg.device,
                                 **({"max_epochs": cfg.max_epochs} if cfg.max_epochs else {}))
    predictor = llapor.train_llapor(train, config, routers=predictors.LinearRouters.from_model(model),
                                    progress=progress)
    predictor.save(path)
    return _record(path, "LLaPor checkpoint for prescope-tiny (bench --predictor)", trace_hash=predictor.trace_info["hash"],
                   trace_tokens=train.num_tokens, llapor_config=asdict(config))


def read_inputs(folder: str | Path, input_len: int) -> tuple[str, str | None, dict]:
    """(prompts path, LLaPor path or None, what the run records) from a `prescope gpu-inputs` folder, after
    checking its manifest, every file's SHA-256, the prompt length and the installed prescope-tiny."""
    from prescope.models import tiny

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--inputs {folder}: no such folder; build it with `prescope gpu-inputs --out {folder}`")
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"--inputs {folder}: no {MANIFEST}, so not built by `prescope gpu-inputs` "
                                f"(build it with `prescope gpu-inputs --out {folder}`)")
    manifest = read_json(folder / MANIFEST, "gpu-inputs manifest")
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise InputsError(f"{folder / MANIFEST}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                          f"this prescope reads {FORMAT!r} version {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise InputsError(f"{folder / MANIFEST}: no `files` record")
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"--inputs {folder}: {name} is missing (the manifest lists it); rebuild with "
                                    f"`{manifest.get('command', 'prescope gpu-inputs')}`")
        if sha256(path) != record.get("sha256"):
            raise InputsError(f"--inputs {folder}: {name} changed since `prescope gpu-inputs` wrote it (its SHA-256 "
                              f"differs from the manifest's); rebuild with `{manifest.get('command', 'prescope gpu-inputs')}`")
    prompts = f"heldout-{input_len}.npy"
    if prompts not in files:
        have = sorted(r.get("input_len") for r in files.values() if "input_len" in r)
        raise InputsError(f"--inputs {folder} holds prompts of {have} tokens, --input-len is {input_len}; build them with "
                          f"`prescope gpu-inputs --out {folder} --input-len {input_len}`")
    weights = manifest.get("routing_model", {}).get(TINY_WEIGHTS)
    if weights != sha256(tiny.TINY_DIR / TINY_WEIGHTS):
        raise InputsError(f"--inputs {folder} was built for another prescope-tiny (its weights' SHA-256 differs from "
                          f"the installed {tiny.TINY_DIR / TINY_WEIGHTS}); rebuild it here")
    predictor = str(folder / PREDICTOR) if PREDICTOR in files else None
    info = {"inputs": str(folder), "git_revision": manifest.get("git_revision"), "command": manifest.get("command"),
            "sha256": {name: record["sha256"] for name, record in files.items()},
            "routers": manifest.get("routers") or {}}  # routing models and their LLaPor: routerinputs.lookup
    return str(folder / prompts), predictor, info


# ---- command line ---------------------------------------------------------------------------------------

HELP = {"out": "folder for the inputs and manifest.json", "input_len": "prompt tokens (the bench's --input-len)",
        "prompts_per_domain": "held-out prompt windows per corpus domain",
        "train_per_domain": "LLaPor's training prompts per corpus domain",
        "prompt_tokens": "tokens of each training prompt", "max_new_tokens": "tokens generated per training prompt",
        "batch_size": "training prompts recorded together", "max_epochs": "LLaPor's epochs at most (0: its default)",
        "device": "torch device that records the training trace and trains LLaPor",
        "cache_dir": "where the training trace is cached (shared with reports/llapor)",
        "predictor": "also train prescope-tiny's LLaPor checkpoint (--no-predictor: none)",
        "routers": "twins' routing models and their LLaPor for bench subjects TWIN[:LAYERS]@router: 'NAME[:LAYERS],...' "
                   "(decoder layers, as in bench --models) or 'all' (each trained here unless committed or cached)",
        "router_time_budget_s": "seconds each routing model trained here may take at most (0: the full recipe)",
        "llapor_processes": "CPU processes training the routing models' LLaPor layers at once (0: one per core)",
        "router_scores": "score each routing model's deepest LLaPor against gate lookahead on its held-out text, "
                         "routers/NAME/llapor-vs-gate-N.json (--no-router-scores: none)",
        "heldout_per_domain": "held-out prompts per corpus domain the routing models' LLaPor is scored on"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(InputsConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "out":
            parser.add_argument(flag, required=True, help=HELP[f.name])
        elif isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=HELP[f.name] + " (default: %(default)s)")
        else:
            parser.add_argument(flag, dest=f.name, type=type(f.default), default=f.default,
                                help=HELP[f.name] + " (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from prescope.experiments.routerscores import summary_line

    cfg = InputsConfig(**{f.name: getattr(args, f.name) for f in fields(InputsConfig)})
    manifest = build_inputs(cfg)
    width = max(len(name) for name in manifest["files"])
    for name, record in manifest["files"].items():
        print(f"{name:<{width}}  {record['bytes'] / 1e6:8.2f} MB  sha256 {record['sha256'][:16]}…  {record['what']}")
    for name, entry in manifest["routers"].items():
        if "llapor_vs_gate_lookahead" in entry:
            print(summary_line(name, entry["llapor_vs_gate_lookahead"]))
    print(json.dumps({"command": "gpu-inputs", "out": cfg.out, "manifest": str(Path(cfg.out) / MANIFEST),
                      "rebuild": manifest["command"], "git_revision": manifest["git_revision"],
                      "files": {n: r["sha256"] for n, r in manifest["files"].items()}, "seconds": manifest["seconds"]}))
    return 0
