"""The simulator's prices: `cost.py`'s formulas bound to one model layout on one hardware profile.

`expert_dims` gives the cost model the (H, I, bytes per element) of a layout's experts, also for a
layout that knows only their bytes (a llama.cpp trace); `default_dense_params` and `model_dense_params`
give the non-expert parameters of a MoE layer, estimated from the layout or read from the model's
config; `SimTimes` memoises the times the replay asks for over and over (one expert for n tokens, one
layer's resident work, one transfer of n bytes) and hands the policy its `Costs`.

Letters: L MoE layers, E experts, K top-k, N tokens in a step, H hidden, I expert width.
"""

from __future__ import annotations

from prescope.hardware import cost
from prescope.hardware.profiles import HardwareProfile
from prescope.layout import ModelLayout
from prescope.policies.base import Costs


def expert_dims(layout: ModelLayout, nbytes: int | None = None) -> tuple[int, int, int]:
    """(H, I, bytes per element) for the cost model, of an expert of `nbytes` bytes (default: the layout's
    `expert_bytes`). A layout without H and I (a llama.cpp trace) is timed as a bfloat16 expert of the same
    bytes: its times depend on H and I only through 3·H·I·b = bytes."""
    nbytes = layout.expert_bytes if nbytes is None else nbytes
    if layout.hidden_size > 0 and layout.intermediate_size > 0:
        h, i = layout.hidden_size, layout.intermediate_size
        b = cost.DTYPE_BYTES.get(layout.dtype) or max(1, nbytes // (3 * h * i))
        return h, i, b
    b = cost.DTYPE_BYTES["bfloat16"]
    return max(1, nbytes // (3 * b)), 1, b


def default_dense_params(layout: ModelLayout) -> int:
    """Non-expert parameters of one MoE layer when the model is not at hand: attention 4·H² (q, k, v, o at
    full width; grouped KV heads make it smaller), router E·H, two norms 2·H, shared experts' bytes / b.
    A layout without H (a llama.cpp trace) counts only its shared experts: its attention then costs the
    GPU's launch floor, unless `dense_params` is given."""
    _, _, b = expert_dims(layout)
    h = layout.hidden_size
    return 4 * h * h + layout.num_experts * h + 2 * h + layout.shared_expert_bytes // b


def experts_only(layout: ModelLayout, dense_params: int | None) -> str | None:
    """A one-line warning when `layout` cannot price a layer's resident work (no hidden size, as in a
    llama.cpp trace, and no `dense_params`): attention and dense layers then cost only the GPU's launch
    floor, so the replay is priced on its experts only. None when the layout prices everything."""
    if layout.hidden_size > 0 or dense_params is not None:
        return None
    return (f"{layout.model_class} has no hidden size and no non-expert parameters: attention and dense layers "
            "cost only the GPU's launch floor, so times are priced on the experts only; pass --twin NAME for a "
            "model's layout (prescope.models.twins.list_twins())")


def model_dense_params(model) -> int | None:
    """Non-expert parameters of a MoE layer from the model's config, where twins.py knows the family."""
    from prescope.models.twins import config_layer_sizes

    try:
        sizes = config_layer_sizes(model.config)
    except (ValueError, AttributeError, KeyError, TypeError):
        return None
    moe = sizes.loc[sizes["kind"] == "moe", "non_expert"]
    return int(moe.max()) if len(moe) else None


class SimTimes:
    """Per-expert, per-layer and per-transfer times of one layout on one profile, memoised. The experts are
    those of MoE layer `layer` (None: the layout's `expert_bytes`); `per_layer` gives every layer's."""

    def __init__(self, layout: ModelLayout, profile: HardwareProfile, dense_params: int, layer: int | None = None):
        nbytes = layout.expert_bytes if layer is None else layout.bytes_of(layer)
        h, i, b = expert_dims(layout, nbytes)
        # a dense decoder layer's MLP is taken as wide as the K experts a token activates (at the common size)
        common_h, common_i, common_b = expert_dims(layout)
        dense_layer = dense_params + layout.top_k * 3 * common_h * common_i
        self.layout, self.profile, self.nbytes, self.dense_params = layout, profile, nbytes, dense_params
        self.formulas = {  # what -> seconds for n tokens (n bytes for a transfer)
            # one expert (with a grouped kernel: what it adds to its wave)
            "gpu": lambda n: cost.grouped_expert_time(n, h, i, b, profile),
            "cpu": lambda n: cost.cpu_expert_time(n, h, i, b, profile),  # one expert
            "attention": lambda n: cost.dense_time(n, dense_params, common_b, profile),  # a MoE layer's resident work
            "dense": lambda n: cost.dense_time(n, dense_layer, common_b, profile),  # a dense decoder layer
            "link": lambda n: cost.transfer_time(n, profile),  # one transfer
        }
        self.wave_formula = lambda counts: cost.gpu_wave_time(counts, h, i, b, profile)  # one wave of experts
        self.memo: dict[tuple[str, int], float] = {}
        self.wave_memo: dict[tuple[int, ...], float] = {}

    def of(self, what: str, n: int) -> float:
        try:
            return self.memo[what, n]
        except KeyError:
            value = self.memo[what, n] = self.formulas[what](n)
            return value

    def per_layer(self) -> list[SimTimes]:
        """[L] the times of each MoE layer's experts, each priced by its own bytes (this object where a layer's
        experts have the layout's `expert_bytes`)."""
        sizes = {self.layout.bytes_of(o) for o in range(self.layout.num_moe_layers)} - {self.nbytes}
        by_size = {self.nbytes: self} | {n: SimTimes(self.layout, self.profile, self.dense_params,
                                                     self.layout.expert_bytes_per_layer.index(n)) for n in sizes}
        return [by_size[n] for n in self.layout.expert_bytes_per_layer]

    def gpu(self, n: int) -> float:
        return self.of("gpu", n)

    def cpu(self, n: int) -> float:
        return self.of("cpu", n)

    def wave(self, counts: tuple[int, ...]) -> float:
        """One wave of this layer's experts, `counts` tokens each (`cost.gpu_wave_time`: one grouped kernel where
        the profile has `gpu_grouped`, else one kernel per expert in turn)."""
        key = tuple(sorted(counts))
        try:
            return self.wave_memo[key]
        except KeyError:
            value = self.wave_memo[key] = self.wave_formula(key)
            return value

    def link(self, nbytes: int) -> float:
        return self.of("link", nbytes)

    def costs(self, device_driven: bool = False) -> Costs:
        """The costs a policy weighs in this replay: the simulator's own prices, its host serial with the
        device (a layer's loads and kernels start after the host's work of that layer). `device_driven`: every
        expert is resident (the profile's host time of such a step, `HardwareProfile.host_per_layer`)."""
        p = self.profile
        host = p.host_per_layer(device_driven)
        launch = p.gpu_expert.fixed_s if p.gpu_grouped is None else p.gpu_grouped.wave_fixed_s
        return Costs(load=self.of("link", self.nbytes), gpu=self.gpu, cpu=self.cpu,
                     layer_gap=self.formulas["attention"](1) + host, host=host, launch=launch,
                     plan=p.predict_overhead_s + p.plan_overhead_s, predict=p.predict_overhead_s,
                     wave=p.gpu_grouped.wave_fixed_s if p.gpu_grouped is not None else 0.0,
                     transfer_host=p.host_per_transfer_s,
                     host_hides_device=False)
