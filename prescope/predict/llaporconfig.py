"""LLaPor's typed configuration and the options of `prescope train-predictor`, with no torch to import.

The networks, their training and checkpoints live in `llapor` (which re-exports `LLaPorConfig` and
`LLaPorError`); they need torch, so the configuration sits here for the command line, notebooks and
sweeps to read cheaply. `FIELD_HELP` says what each field does; every option's help comes from it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from prescope.config import check_types

GROUPS = ("near_input", "middle", "near_output")
MONITORS = ("recall", "loss")
FIELD_HELP = {
    "distance": "D: later MoE layers each layer's network predicts",
    "pca_dim": "P: principal components kept of the hidden state entering the layer",
    "use_routing": "also feed the layer's own routing (its top-K experts, multi-hot)",
    "use_lookahead": "also feed the gate lookahead (later routers on this hidden state) and learn a correction "
                     "to it (needs router logits in the trace, or --model)",
    "width": "width of each network's trunk",
    "edge_depth": "Linear-GELU-Dropout blocks of the trunk (the middle group adds a gated residual block)",
    "dropout": "dropout probability in the trunk",
    "group_boundaries": "'A,B': first middle and first near-output layer ('' = derived from the trace's routing)",
    "min_group_layers": "fewest layers a derived group may have",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "batch_size": "tokens per training minibatch",
    "max_epochs": "passes over the training tokens at most",
    "patience": "epochs without a better validation score before training stops",
    "freq_power": "exponent p of the expert-frequency weight ((1 - f) / f)^p of the BCE loss",
    "focal_gamma": "gamma of the focal term (1 - p_t)^gamma",
    "focal_weight": "weight of the focal term beside the weighted BCE",
    "valid_fraction": "share of the trace's prompts held out for validation (split by prompt, never by token)",
    "calibrate_steps": "L-BFGS steps that calibrate the lookahead's scale and bias before training (0 = none)",
    "monitor": f"early-stopping criterion on the validation split, one of {MONITORS}",
    "seed": "random seed (layer l trains with seed + l)",
    "device": "torch device that trains the networks",
    "routing_window": "routing-only LLaPor (traces without hidden states): this token's routing at this many layers "
                      "up to l is fed",
}


class LLaPorError(ValueError):
    """A LLaPor setting, training trace or checkpoint is unusable; the message says what was expected."""


@dataclass(frozen=True)
class LLaPorConfig:
    """How LLaPor is built and trained (`prescope train-predictor` takes one option per field, with the help
    text in FIELD_HELP).

    distance: D, layers predicted ahead; pca_dim: P; use_routing / use_lookahead: extra inputs (`llapor`);
    width, edge_depth: trunk width and Linear→GELU→Dropout blocks at the edges; group_boundaries:
    (first middle layer, first near-output layer), None = derived with at least min_group_layers each;
    monitor: early-stopping criterion on the validation split ("recall" or "loss").
    """

    distance: int = 4
    pca_dim: int = 64
    use_routing: bool = True
    use_lookahead: bool = True
    width: int = 256
    edge_depth: int = 1
    dropout: float = 0.1
    group_boundaries: tuple[int, int] | None = None
    min_group_layers: int = 2
    lr: float = 2e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    max_epochs: int = 40
    patience: int = 5
    freq_power: float = 0.5
    focal_gamma: float = 2.0
    focal_weight: float = 1.0
    valid_fraction: float = 0.15
    calibrate_steps: int = 50
    monitor: str = "recall"
    seed: int = 0
    device: str = "cpu"
    routing_window: int = 4

    def __post_init__(self) -> None:
        check_types(self, LLaPorError)
        if self.group_boundaries is not None:
            object.__setattr__(self, "group_boundaries", tuple(int(b) for b in self.group_boundaries))
            if len(self.group_boundaries) != 2 or not 0 <= self.group_boundaries[0] <= self.group_boundaries[1]:
                raise LLaPorError(f"group_boundaries must be (first middle, first near-output) with 0 <= a <= b, "
                                  f"got {self.group_boundaries}")
        for name in ("distance", "pca_dim", "width", "edge_depth", "batch_size", "max_epochs", "min_group_layers",
                     "routing_window"):
            if getattr(self, name) < 1:
                raise LLaPorError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "freq_power", "focal_gamma", "focal_weight", "patience", "calibrate_steps"):
            if getattr(self, name) < 0:
                raise LLaPorError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise LLaPorError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise LLaPorError(f"valid_fraction must be in (0, 1), got {self.valid_fraction}")
        if self.monitor not in MONITORS:
            raise LLaPorError(f"monitor must be one of {MONITORS}, got {self.monitor!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--trace, --out, --model, then one option per LLaPorConfig field (--pca-dim or --pca_dim)."""
    parser.add_argument("--trace", type=Path, required=True,
                        help="routing trace: a prescope .parquet (with hidden states for LLaPor, as `prescope trace "
                             "--keep-hidden` writes) or a llama.cpp .csv / .csv.xz (routing-only LLaPor)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint path to write (.pt)")
    parser.add_argument("--model", default="", help="model directory to take the routers from (default: fit them "
                                                      "to the trace's router logits)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.add_argument("--routing-only", action="store_true",
                        help="train routing-only LLaPor (this token's routing at earlier layers and the previous "
                             "tokens' routing; no hidden states): chosen anyway for a trace without hidden states, "
                             "such as an imported llama.cpp trace")
    for f in fields(LLaPorConfig):
        flags = sorted({"--" + f.name.replace("_", "-"), "--" + f.name})
        if f.name == "group_boundaries":
            parser.add_argument(*flags, dest=f.name, default="", help=FIELD_HELP[f.name])
        elif isinstance(f.default, bool):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=FIELD_HELP[f.name] + " (default: %(default)s)")
        else:
            parser.add_argument(*flags, dest=f.name, type=type(f.default), default=f.default,
                                help=FIELD_HELP[f.name] + " (default: %(default)s)")
