"""`prescope gpu-inputs --routers SPEC[,SPEC...]`: routing models and their LLaPor, built into the inputs folder.

A bench subject `TWIN[:LAYERS]@router` (`routersubject`) replays the routing of twin TWIN's routing model on held-out
text; `prescope` there needs a LLaPor trained on that routing model's routing and hidden states, over the same MoE
layers. For each SPEC (`NAME` or `NAME:LAYERS`, decoder layers as in `bench --models`; `all`: every twin, whole):

- the routing model: the one `models.routers.router_dir` finds (committed or in the routers cache) where there is
  one, else trained here into `routers/NAME/` (`routermodels.train_router`, the routing-model recipe cut to
  `router_time_budget_s` seconds where > 0), with its card. A GPU run carries neither the large ones back nor a
  cache between sessions, so they are trained in the same call that uses them;
- a training trace of it (`accuracy.cached_trace` on `train_per_domain` training prompts per corpus domain of
  `prompt_tokens` tokens, `max_new_tokens` generated, hidden states and router logits kept), recorded on
  `device` in float32: training text, so the bench's held-out prompts stay unseen;
- `routers/NAME/llapor-{n}.pt`: LLaPor (`LLaPorConfig` defaults, `max_epochs` where given, trained on the CPU in
  parallel processes, `llapor_processes`) on the trace cut to its first n MoE layers, n = the MoE layers among the
  first LAYERS decoder layers, gate lookahead from the routing model's first n routers;
- `routers/NAME/llapor-vs-gate-N.json` (`router_scores`, default on): the deepest of those LLaPor (all MoE layers
  where asked) against gate lookahead on a held-out trace of the routing model (`routerscores`), recorded on
  `device` like the training trace, `heldout_per_domain` prompts per domain; the gains go into the manifest too.

The manifest records each routing model (`routers`: where it is, the SHA-256 of its weights, its card's training
summary, the LLaPor checkpoint of each layer count) and lists every file it wrote with its checksum (`files`).
`bench --inputs` checks them all (`gpuinputs.read_inputs`) and hands the records to the subjects (`lookup`).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROUTERS_DIR = "routers"
WEIGHTS = "model.safetensors"
LOCATIONS = ("inputs", "committed", "cache")  # where a recorded routing model lives


def sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (the manifest's checksums)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RouterInputsError(ValueError):
    """A --routers spec that names no twin or layer count, or a recorded routing model that changed."""


def parse_specs(text: str) -> dict[str, list[int | None]]:
    """{twin: [decoder layer counts (None: all)]} of 'NAME[:LAYERS],...' or 'all', names checked, in order."""
    from prescope.models import twins

    if text.strip() == "all":
        return {name: [None] for name in twins.list_twins()}
    specs: dict[str, list[int | None]] = {}
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        name, _, layers = word.partition(":")
        full = twins.twin_config(name).num_hidden_layers  # a clear error for an unknown twin
        try:
            count = int(layers) if layers else None
        except ValueError:
            raise RouterInputsError(f"--routers {word}: LAYERS must be a whole number of decoder layers") from None
        if count is not None and not 1 <= count <= full:
            raise RouterInputsError(f"--routers {word}: {name} has {full} decoder layers; LAYERS must be 1..{full}")
        specs.setdefault(name, [])
        if count not in specs[name]:
            specs[name].append(count)
    return specs


def moe_layers_within(model, layers: int | None) -> int:
    """MoE layers of `model` among its first `layers` decoder layers (all of them for None)."""
    from prescope.models import adapter

    moe = adapter.describe(model).moe_layers
    count = len(moe) if layers is None else sum(1 for i in moe if i < layers)
    if count < 2:
        raise RouterInputsError(f"the first {layers} layers hold {count} MoE layer(s); LLaPor predicts later "
                                "layers, so it needs at least 2")
    return count


def _locate(name: str, out: Path) -> tuple[Path, str]:
    """(folder, location) of twin `name`'s routing model: the existing one, else where this run trains it."""
    from prescope.models import routers

    found = routers.router_dir(name)
    if (found / "config.json").is_file():
        return found, "committed" if found == routers.COMMITTED_DIR / name else "cache"
    return out / ROUTERS_DIR / name, "inputs"


def train_in_child(name: str, path: Path, cfg, progress: bool) -> None:
    """Train routing model `name` into `path` (`prescope train-tiny --like NAME`, its short recipe, within
    `cfg.router_time_budget_s`) in a child interpreter: this process then never runs autograd, whose threads a
    forked worker cannot use (LLaPor's layers train in forked workers right after; measured failing on the H200
    when the router was trained here)."""
    command = [sys.executable, "-m", "prescope.cli", "train-tiny", "--like", name, "--out", str(path),
               "--device", cfg.device, "--time-budget-s", str(cfg.router_time_budget_s)]
    done = subprocess.run(command + ([] if progress else ["--no-progress"]), check=False)
    if done.returncode != 0 or not (path / "config.json").is_file():
        raise RouterInputsError(f"training {name}'s routing model failed (exit {done.returncode}): "
                                f"{' '.join(command)}")


def build_routers(cfg, out: Path, record, progress: bool = True) -> tuple[dict, dict]:
    """Build every routing model and LLaPor `cfg.routers` (a `gpuinputs.InputsConfig`) names into `out` (module
    docstring); (files, routers):
    the manifest's file records (`record(path, what, **extra)` makes one) and its `routers` section."""
    from prescope.files import read_json
    from prescope.models import corpus, routers
    from prescope.models.adapter import UnsupportedModelError
    from prescope.predict import llapor, predictors
    from prescope.predict.accuracy import cached_trace
    from prescope.predict.routellapor import cut_layers

    files, section = {}, {}
    for name, counts in parse_specs(cfg.routers).items():
        path, location = _locate(name, out)
        began = time.perf_counter()
        if location == "inputs" and not (path / "config.json").is_file():
            train_in_child(name, path, cfg, progress)
        if location == "inputs":
            for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("llapor-")):
                files[f"{ROUTERS_DIR}/{name}/{file.name}"] = record(file, f"{name} routing model ({file.name})")
        card = read_json(path / "model_card.json", "routing model card") if (path / "model_card.json").is_file() else {}
        weights = sha256(path / WEIGHTS)
        model, tokenizer = routers.load_router(name, path=path)
        spec = corpus.card_spec(card.get("config", {}))
        model.to(cfg.device)
        shape = dict(prompt_tokens=cfg.prompt_tokens, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                     cache_dir=Path(cfg.cache_dir) / "routers" / name, model_id=f"{name}:{weights}")
        trace, record_s = cached_trace(model, tokenizer, spec, "train", cfg.train_per_domain, **shape)
        if cfg.router_scores:  # recorded where the training trace is; scored on the CPU below
            heldout, heldout_s = cached_trace(model, tokenizer, spec, "heldout", cfg.heldout_per_domain, **shape)
        model.to("cpu")
        try:
            linear = predictors.LinearRouters.from_model(model)
        except UnsupportedModelError:  # a router that normalises its input: least squares on the trace's logits
            linear = predictors.LinearRouters.fit(trace)
        config = llapor.LLaPorConfig(**({"max_epochs": cfg.max_epochs} if cfg.max_epochs else {}))
        checkpoints, scored = {}, {}
        deepest = max(moe_layers_within(model, layers) for layers in counts)  # all MoE layers where asked
        for layers in counts:
            n = moe_layers_within(model, layers)
            cut = cut_layers(trace, n)
            cut_routers = predictors.LinearRouters(linear.weight[:n], None if linear.bias is None else linear.bias[:n])
            start = time.perf_counter()
            predictor = llapor.train_llapor(cut, config, routers=cut_routers, progress=progress,
                                            processes=cfg.llapor_processes or None)
            file = f"{ROUTERS_DIR}/{name}/llapor-{n}.pt"
            (out / file).parent.mkdir(parents=True, exist_ok=True)
            predictor.save(out / file)
            files[file] = record(out / file, f"LLaPor for {name}'s routing model, its first {n} MoE layers "
                                             "(bench --inputs, subjects TWIN[:LAYERS]@router)",
                                 trace_hash=predictor.trace_info["hash"], trace_tokens=cut.num_tokens, moe_layers=n,
                                 train_s=round(time.perf_counter() - start, 1))
            checkpoints[str(n)] = file
            if cfg.router_scores and n == deepest and not scored:
                scored = _score(out, name, n, predictor, cut_routers, heldout, file, weights, heldout_s, cfg, files,
                                record)
        section[name] = {"location": location, "path": _portable(path, out, location), "weights_sha256": weights,
                         "trained_here": location == "inputs", "training": card.get("training", {}),
                         "trained_vs_random": card.get("routing", {}).get("trained_vs_random"),
                         "trace_tokens": trace.num_tokens, "trace_record_s": round(record_s, 1),
                         "llapor": checkpoints, **({"llapor_vs_gate_lookahead": scored} if scored else {}),
                         "seconds": round(time.perf_counter() - began, 1)}
    return files, section


def _score(out: Path, name: str, n: int, predictor, routers, heldout, checkpoint: str, weights: str,
           record_s: float, cfg, files: dict, record) -> dict:
    """`routerscores.score` of the LLaPor just trained into `routers/NAME/`, its file recorded in `files`; the
    manifest's `llapor_vs_gate_lookahead` entry."""
    from prescope.experiments import routerscores

    file = f"{ROUTERS_DIR}/{name}/" + routerscores.SCORE_FILE.format(n=n)
    result = routerscores.score(out / file, name, n, predictor, routers, heldout, checkpoint=checkpoint,
                                weights_sha256=weights, record_s=record_s, cfg=cfg)
    files[file] = record(out / file, f"LLaPor vs gate lookahead for {name}'s routing model on its held-out text, "
                                     f"its first {n} MoE layers (measured)", moe_layers=n,
                         heldout_tokens=result["heldout"]["tokens"], score_s=result["score_s"])
    return routerscores.manifest_entry(file, result)


def _portable(path: Path, out: Path, location: str) -> str:
    """Where the manifest says the model is: inside the folder, relative to it; else its twin's name (committed
    and cache folders are found again by `models.routers` on the machine that reads the folder)."""
    return path.relative_to(out).as_posix() if location == "inputs" else path.name


@dataclass(frozen=True)
class FoundRouter:
    """A routing model a gpu-inputs folder recorded: its folder, and LLaPor checkpoints by MoE layer count."""

    path: Path
    llapor: dict[int, str]


def lookup(inputs: dict | None, twin: str) -> FoundRouter | None:
    """Twin `twin`'s routing model in the record `gpuinputs.read_inputs` made of an inputs folder (None: no folder
    or none recorded for it), its weights checked against the manifest's SHA-256."""
    from prescope.models import routers

    entry = (inputs or {}).get("routers", {}).get(twin)
    if entry is None:
        return None
    folder = Path(inputs["inputs"])
    location = entry.get("location")
    if location not in LOCATIONS:
        raise RouterInputsError(f"--inputs {folder}: routing model {twin} has location {location!r}, not one of "
                                f"{LOCATIONS}")
    path = {"inputs": folder / entry["path"], "committed": routers.COMMITTED_DIR / twin,
            "cache": routers.cache_root() / twin}[location]
    if not (path / WEIGHTS).is_file() or sha256(path / WEIGHTS) != entry.get("weights_sha256"):
        raise RouterInputsError(f"--inputs {folder} was built with another {twin} routing model than {path} holds "
                                f"(its weights' SHA-256 differs or it is missing); rebuild the folder here")
    return FoundRouter(path, {int(n): str(folder / file) for n, file in entry.get("llapor", {}).items()})
