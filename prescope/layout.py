"""The layout record: what prescope needs to know about a MoE model, with no modules in it (JSON-safe).

Every wing names a model by its `ModelLayout` (traces, predictors, cost models, the simulator), so the
record lives here, beside the config, and only `models.adapter` builds one from a live model.

Letters: L MoE layers, E experts, K top-k, H hidden, I expert width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


class UnsupportedModelError(ValueError):
    """The model does not follow the router/experts contract; the message names its class and the gap."""


class LayoutMismatchError(ValueError):
    """A trace, predictor or profile was made for a model with another layout."""


@dataclass(frozen=True)
class ModelLayout:
    """What the rest of prescope needs to know about a MoE model, with no modules in it (JSON-safe)."""

    model_class: str
    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    dense_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    dtype: str
    expert_bytes: int  # one expert's bytes; where layers differ (`layer_expert_bytes`), the most common size
    shared_expert_bytes: int = 0
    # One expert's bytes at each MoE layer, where they differ between layers (a llama.cpp trace of a model
    # quantised per layer); empty when every layer's experts have `expert_bytes`.
    layer_expert_bytes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))
        object.__setattr__(self, "layer_expert_bytes", tuple(int(b) for b in self.layer_expert_bytes))
        if not self.moe_layers:
            raise UnsupportedModelError(f"{self.model_class}: no MoE layers")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"{self.model_class}: top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        per_layer = self.layer_expert_bytes
        if per_layer and (len(per_layer) != len(self.moe_layers) or min(per_layer) < 1):
            raise ValueError(f"{self.model_class}: layer_expert_bytes must give one size >= 1 per MoE layer "
                             f"({len(self.moe_layers)}), got {len(per_layer)} sizes, smallest {min(per_layer)}")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def bytes_of(self, layer: int) -> int:
        """One expert's bytes at MoE layer `layer` (ordinal 0..L-1)."""
        return self.layer_expert_bytes[layer] if self.layer_expert_bytes else self.expert_bytes

    @property
    def expert_bytes_per_layer(self) -> tuple[int, ...]:
        """[L] one expert's bytes at each MoE layer."""
        return self.layer_expert_bytes or (self.expert_bytes,) * self.num_moe_layers

    @property
    def max_expert_bytes(self) -> int:
        """The largest expert: what one GPU slot must hold."""
        return max(self.expert_bytes_per_layer)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["moe_layers"], d["dense_layers"] = list(self.moe_layers), list(self.dense_layers)
        if self.layer_expert_bytes:
            d["layer_expert_bytes"] = list(self.layer_expert_bytes)
        else:
            del d["layer_expert_bytes"]  # files of layouts with one size read as they always did
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelLayout:
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names if n not in d and n not in ("shared_expert_bytes", "layer_expert_bytes"))
        if missing:
            raise ValueError(f"model layout is missing fields {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def check_compatible(self, other: ModelLayout, what: str = "trace") -> None:
        """Raise LayoutMismatchError unless `other` (the layout `what` was made on) routes like this one.

        Routing-relevant fields must agree: the MoE layer count, E, K and H (H is skipped when either side
        does not know it, as in imported llama.cpp traces, which record 0).
        """
        checks = {"num_moe_layers": (self.num_moe_layers, other.num_moe_layers),
                  "num_experts": (self.num_experts, other.num_experts),
                  "top_k": (self.top_k, other.top_k)}
        if self.hidden_size and other.hidden_size:
            checks["hidden_size"] = (self.hidden_size, other.hidden_size)
        diffs = [f"{k}: {what} has {b}, model has {a}" for k, (a, b) in checks.items() if a != b]
        if diffs:
            raise LayoutMismatchError(
                f"the {what} was made on {other.model_class} and does not match {self.model_class}: " + "; ".join(diffs))
