"""Hugging Face accelerate's CPU offload of a model: the baseline users would otherwise pick (DESIGN.md §4.6).

Two placements, both applied to a model built on the CPU:

- `accelerate_offload` ("auto"): what `from_pretrained(..., device_map="auto", max_memory={dev: gpu_bytes,
  "cpu": host_bytes})` gives. The same calls transformers makes (`get_balanced_memory`, then
  `infer_auto_device_map` with the model's `_no_split_modules`, its decoder-layer classes) decide a device
  map; `accelerate.dispatch_model` applies it. Modules fill the device in module order until the cap is
  reached; every module after that lives in host memory (or on disk beyond `host_bytes`), and accelerate's
  hooks copy its weights to the execution device at every forward. While anything is offloaded, accelerate
  holds back room for the largest no-split block on the device, so fewer layers fit than gpu_bytes suggests.
- `accelerate_stream` ("stream"): `accelerate.cpu_offload(model, device)`: every weight stays in host memory
  and is copied to the device at every forward of its module; only buffers live on the device.

`offload_gpu_bytes` states the cap the way the engine's budget is stated, so the comparison is like for like:
    gpu_bytes = non-expert bytes + slots · expert_bytes,   slots = round(budget_share · L · E)
(the engine's own `slots_for_budget`), with non-expert bytes = all parameter and buffer bytes − L · E ·
expert_bytes. Activations and the KV cache are counted by neither side.

On a machine without a GPU, pass device "cpu": the cap then applies to CPU memory and what does not fit goes
to disk (`offload_dir`), read back through the same hooks at every forward.

Letters: L MoE layers, E experts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from prescope.config import EngineConfig
from prescope.engine.engine import slots_for_budget
from prescope.layout import ModelLayout
from prescope.models import adapter

INSTALL_HINT = "pip install 'prescope[gpu]'  (or: pip install 'accelerate>=1.0')"
MODES = ("auto", "stream")
HOST, DISK = "cpu", "disk"


class OffloadBudgetError(ValueError):
    """The device cap cannot hold what the comparison assumes is resident (the non-expert weights)."""


class OffloadSetupError(ValueError):
    """The model or the arguments cannot be dispatched as asked (already dispatched, not on the CPU, ...)."""


@dataclass(frozen=True)
class Placement:
    """Where accelerate put a model's weights (parameters and buffers, shared tensors counted once).

    device: where accelerate runs the model: the execution device, or "cpu" when nothing fit on it (then
    the host bytes are simply computed on the CPU).
    device_bytes: resident on the execution device.
    host_bytes: kept in host memory and copied to the device at every forward.
    disk_bytes: kept on disk and read at every forward.
    device_map: accelerate's map, module name -> "cuda:0" / "cpu" / "disk".
    blocks, blocks_on_device: no-split blocks (decoder layers) in the model, and those resident on the device.
    Mode "stream" has gpu_bytes 0 (no cap), device_map {"": "cpu"} and only buffers on the device.
    """

    mode: str
    device: str
    gpu_bytes: int
    device_bytes: int
    host_bytes: int
    disk_bytes: int
    device_map: dict[str, str]
    blocks: int
    blocks_on_device: int

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"placement mode must be one of {MODES}, got {self.mode!r}")
        for name in ("gpu_bytes", "device_bytes", "host_bytes", "disk_bytes", "blocks", "blocks_on_device"):
            if getattr(self, name) < 0:
                raise ValueError(f"placement {name} must be >= 0, got {getattr(self, name)}")
        if self.blocks_on_device > self.blocks:
            raise ValueError(f"blocks_on_device={self.blocks_on_device} exceeds blocks={self.blocks}")

    @property
    def offloaded_bytes(self) -> int:
        return self.host_bytes + self.disk_bytes

    def to_dict(self) -> dict:
        return asdict(self)


def _accelerate():
    """The accelerate package, or an ImportError that says how to get it."""
    try:
        import accelerate
    except ImportError as err:
        raise ImportError(f"the accelerate baseline needs Hugging Face accelerate, which is not installed: "
                          f"{INSTALL_HINT}") from err
    return accelerate


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, each shared tensor once (under its first name)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def model_bytes(model: nn.Module) -> int:
    """Σ numel · element size over the model's parameters and buffers, tied weights once."""
    return sum(t.numel() * t.element_size() for t in _tensors(model).values())


def expert_bytes_total(layout: ModelLayout) -> int:
    """L · E · expert_bytes: every routed expert of every MoE layer."""
    return layout.num_moe_layers * layout.num_experts * layout.expert_bytes


def non_expert_bytes(model: nn.Module) -> int:
    """model_bytes − L · E · expert_bytes: what the engine keeps resident besides its expert slots."""
    return model_bytes(model) - expert_bytes_total(adapter.describe(model))


def offload_gpu_bytes(model: nn.Module, budget_share: float) -> int:
    """The device cap matching the engine at `budget_share`: non-expert bytes + slots · expert_bytes with the
    engine's slots = round(budget_share · L · E) (at least top-k, else the engine's error)."""
    layout = adapter.describe(model)
    slots = slots_for_budget(layout, EngineConfig(budget_share=budget_share))
    return non_expert_bytes(model) + slots * layout.expert_bytes


def _execution_device(device: str | torch.device) -> tuple[torch.device, int | str]:
    """(execution device with its index filled in, accelerate's max_memory key for it)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return dev, HOST
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OffloadSetupError(f"device {str(device)!r} was asked for but CUDA is not available here")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        return torch.device("cuda", index), index
    raise OffloadSetupError(f"device must be 'cpu' or 'cuda[:N]', got {str(device)!r}")


def _check_fresh(model: nn.Module) -> None:
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise OffloadSetupError(f"{type(model).__name__} already carries accelerate hooks: "
                                "build a fresh model")
    elsewhere = sorted({str(t.device) for t in _tensors(model).values() if t.device.type != "cpu"})
    if elsewhere:
        raise OffloadSetupError(f"{type(model).__name__} has weights on {elsewhere}: build it on the CPU, "
                                "accelerate moves what fits to the device")


def _no_split(model: nn.Module, no_split: list[str] | None) -> list[str]:
    classes = sorted(no_split if no_split is not None else (getattr(model, "_no_split_modules", None) or []))
    if not classes:
        raise OffloadSetupError(f"{type(model).__name__} names no `_no_split_modules` (its decoder-layer "
                                "classes): pass no_split=[...] so layers with a residual stay whole")
    return classes


def _where(name: str, device_map: dict) -> int | str:
    """The device of tensor `name`: the entry of its longest module prefix in the map ("" is the root)."""
    parts = name.split(".")
    for cut in range(len(parts), -1, -1):
        prefix = ".".join(parts[:cut])
        if prefix in device_map:
            return device_map[prefix]
    raise OffloadSetupError(f"the device map places no module holding {name!r}")


def _placement(model: nn.Module, device: torch.device, key: int | str, gpu_bytes: int, device_map: dict,
               no_split: list[str]) -> Placement:
    """Bytes per tier under `device_map`. accelerate runs offloaded modules on the first non-offloaded device
    of the map, so when nothing landed on `device` the whole model runs on the CPU and says so."""
    tiers = {"device": 0, HOST: 0, DISK: 0}
    for name, t in _tensors(model).items():
        where = _where(name, device_map)
        tiers["device" if where == key else where] += t.numel() * t.element_size()
    blocks = [n for n, m in model.named_modules() if type(m).__name__ in no_split]
    on_device = sum(1 for n in blocks if _where(n, device_map) == key)
    named = {k: str(device) if v == key else str(v) for k, v in device_map.items()}
    main = device if key in device_map.values() else torch.device(HOST)
    return Placement("auto", str(main), gpu_bytes, tiers["device"], tiers[HOST], tiers[DISK], named,
                     len(blocks), on_device)


def auto_device_map(model: nn.Module, device: str | torch.device, gpu_bytes: int, *,
                    host_bytes: int | None = None, no_split: list[str] | None = None) -> dict[str, int | str]:
    """The device map `from_pretrained(device_map="auto", max_memory=...)` computes for `model`.

    max_memory = {device: gpu_bytes, "cpu": host_bytes (default: the host's available memory)}; on device
    "cpu" only {"cpu": gpu_bytes}, so the rest goes to disk.
    """
    accelerate = _accelerate()
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    dev, key = _execution_device(device)
    if int(gpu_bytes) <= 0:
        raise OffloadBudgetError(f"gpu_bytes must be positive, got {gpu_bytes}")
    max_memory = {key: int(gpu_bytes)}
    if dev.type != "cpu":
        if host_bytes is None:
            host_bytes = accelerate.utils.get_max_memory()[HOST]  # what accelerate assumes when not told
        max_memory[HOST] = int(host_bytes)
    classes = _no_split(model, no_split)
    balanced = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=classes)
    return dict(infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=classes))


def accelerate_offload(model: nn.Module, device: str | torch.device, gpu_bytes: int, *,
                       host_bytes: int | None = None, no_split: list[str] | None = None,
                       offload_dir: str | Path | None = None) -> tuple[nn.Module, Placement]:
    """Dispatch `model` (built on the CPU) as `device_map="auto"` with a `gpu_bytes` cap would; returns the
    dispatched model (the same object, now carrying accelerate's hooks) and its placement.

    Raises OffloadBudgetError when gpu_bytes cannot hold the non-expert weights (the engine keeps those
    resident, so a smaller cap would not compare like for like), OffloadSetupError when the model is already
    dispatched or not on the CPU, or when weights go to disk and no offload_dir is given.
    """
    accelerate = _accelerate()
    _check_fresh(model)
    floor = non_expert_bytes(model)
    if int(gpu_bytes) < floor:
        raise OffloadBudgetError(
            f"gpu_bytes={int(gpu_bytes)} cannot hold the {floor} bytes of non-expert weights of "
            f"{type(model).__name__}; give at least that (offload_gpu_bytes(model, budget_share) adds the "
            "experts)")
    dev, key = _execution_device(device)
    classes = _no_split(model, no_split)
    device_map = auto_device_map(model, dev, gpu_bytes, host_bytes=host_bytes, no_split=classes)
    placement = _placement(model, dev, key, int(gpu_bytes), device_map, classes)
    if placement.disk_bytes and offload_dir is None:
        raise OffloadSetupError(f"{placement.disk_bytes} bytes fit neither the device nor host memory and "
                                "go to disk: pass offload_dir")
    skip = getattr(model, "_skip_keys_device_placement", None)
    # No main_device, as transformers' own dispatch: accelerate picks the map's device (a torch.device("cpu")
    # would not compare equal to "cpu" there and would offload CPU-placed modules too).
    accelerate.dispatch_model(model, device_map,
                              offload_dir=str(offload_dir) if offload_dir is not None else None,
                              skip_keys=sorted(skip) if skip else None)
    return model, placement


def accelerate_stream(model: nn.Module, device: str | torch.device,
                      no_split: list[str] | None = None) -> tuple[nn.Module, Placement]:
    """`accelerate.cpu_offload(model, device)`: every weight stays in host memory and is copied to `device` at
    each forward of its module. Feed inputs on `device` (the model's own `.device` reads "meta")."""
    accelerate = _accelerate()
    _check_fresh(model)
    dev, _ = _execution_device(device)
    blocks = sum(1 for m in model.modules() if type(m).__name__ in _no_split(model, no_split))
    params = {id(p) for p in model.parameters()}
    sizes = [(id(t) in params, t.numel() * t.element_size()) for t in _tensors(model).values()]
    host = sum(n for is_param, n in sizes if is_param)
    on_device = sum(n for is_param, n in sizes if not is_param)
    placement = Placement("stream", str(dev), 0, on_device, host, 0, {"": HOST}, blocks, 0)
    accelerate.cpu_offload(model, execution_device=dev)
    return model, placement
