"""A routing model's LLaPor against gate lookahead on its held-out text, scored where `gpu-inputs --routers` trains it.

The project's claim for every routing model is LLaPor's gain over gate lookahead in recall@K of the true top-K
experts at distances 1..D (points), "at least 5 points from distance 2", on text the routing model never trained
on. `routerinputs.build_routers` has the trained LLaPor and the routers it looks ahead with at hand, so it scores
the deepest one here instead of training another (`train-tiny --llapor`, `accuracy.run_report`):

- the held-out trace: `accuracy.cached_trace(..., "heldout", heldout_per_domain, ...)` of the routing model, the
  training trace's shape (`prompt_tokens`, `max_new_tokens`, `batch_size`), recorded on `device`, cached beside it;
- the score: `accuracy.score_llapor` (the evaluation and gains `run_report` reports, on the CPU) of the LLaPor
  checkpoint against `GateLookahead` on the same linear routers LLaPor was trained with, both cut to its layers;
- `routers/NAME/llapor-vs-gate-N.json` (checksummed): measured, where, the git revision, the config, held-out tokens,
  gains by distance and by layer group, mean recall@K of both, and the target flag.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

SCORE_FILE = "llapor-vs-gate-{n}.json"
TARGET = "llapor_gain_at_least_5_points_from_distance_2"


def hardware(device: str) -> str:
    """Where the score was measured: the held-out trace recorded on `device` (`timeline.host_device`'s name), the
    evaluation on this machine's CPU."""
    from prescope.timeline import host_device

    return f"held-out trace on {host_device(device)}, evaluation on {host_device('cpu')}"


def score(path: Path, name: str, n: int, predictor, routers, heldout, *, checkpoint: str, weights_sha256: str,
          record_s: float, cfg) -> dict:
    """Score LLaPor `predictor` (the routing model's first `n` MoE layers) against gate lookahead on `routers`
    ([n] linear routers) over the held-out trace `heldout` (whole; cut here to n layers), write the result to
    `path`, and return it. `cfg` is the `gpuinputs.InputsConfig` that built the folder."""
    from prescope.files import git_revision, portable_values, write_json
    from prescope.predict.accuracy import score_llapor
    from prescope.predict.predictors import GateLookahead
    from prescope.predict.routellapor import cut_layers

    cut = cut_layers(heldout, n)
    start = time.perf_counter()
    versus = score_llapor(predictor, GateLookahead(routers, cut.layout), cut, range(1, predictor.config.distance + 1))
    seconds = time.perf_counter() - start
    decode = (cut.tokens["phase"] == "decode").to_numpy()
    result = {
        "source": "measured", "hardware": hardware(cfg.device), "git_revision": git_revision(),
        "routing_model": name, "weights_sha256": weights_sha256, "moe_layers": n, "llapor_checkpoint": checkpoint,
        "config": portable_values(asdict(cfg)), "llapor_config": asdict(predictor.config),
        "heldout": {"tokens": cut.num_tokens, "decode_tokens": int(decode.sum()),
                    "prompts": int(cut.tokens["prompt"].nunique()), "domains": sorted(set(cut.tokens["domain"])),
                    "per_domain": cfg.heldout_per_domain, "record_seconds": round(record_s, 1)},
        "evaluated_on": "held-out decode tokens of every domain, pooled; recall@K of the true top-K experts",
        "gate_lookahead": "the routing model's routers as linear maps (the ones LLaPor was trained with)",
        "boundaries": list(predictor.boundaries),
        "gain_points_by_distance": versus["gain_points_by_distance"]["llapor"],
        "gain_points_by_group": versus["gain_points_by_group"],
        "mean_recall_at_k": versus["mean_recall_at_k"],
        "target": versus["target"], TARGET: versus["target"][TARGET],
        "score_s": round(seconds, 2)}
    write_json(path, result, indent=2)
    return result


def manifest_entry(file: str, result: dict) -> dict:
    """What the manifest's `routers[NAME]` section records of a score (`llapor_vs_gate_lookahead`)."""
    return {"file": file, "moe_layers": result["moe_layers"], "heldout_tokens": result["heldout"]["tokens"],
            "gain_points_by_distance": result["gain_points_by_distance"], TARGET: result[TARGET],
            "hardware": result["hardware"]}


def summary_line(name: str, entry: dict) -> str:
    """One line per routing model for the command's output: gains by distance and the target."""
    gains = "  ".join(f"d{d} {v:+.1f}" for d, v in sorted((int(d), v) for d, v in entry["gain_points_by_distance"].items()))
    met = {True: "met", False: "NOT met", None: "not judged (no distance >= 2)"}[entry[TARGET]]
    return (f"{name}: LLaPor vs gate lookahead on {entry['heldout_tokens']} held-out tokens, {entry['moe_layers']} MoE "
            f"layers, recall@K gain in points: {gains or 'none'}; >= 5 points from distance 2: {met}")
