"""EngineConfig validation: a clear error for every bad field and every wrong type; the shared checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from prescope.config import EngineConfig, check_device, check_types


@pytest.mark.parametrize("field, value, message", [
    ("budget_share", 0.0, "budget_share"), ("budget_share", 1.5, "budget_share"),
    ("budget_bytes", 0, "budget_bytes"), ("timing", "some", "timing"), ("cpu_workers", -1, "cpu_workers"),
    ("device", "tpu", "device"),
])
def test_bad_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{field: value})


def test_defaults_round_trip():
    config = EngineConfig()
    assert EngineConfig(**config.to_dict()) == config


@pytest.mark.parametrize("field, value, message", [
    ("budget_share", "0.5", r"budget_share must be a finite number, got '0.5' \(str\)"),
    ("budget_share", True, r"budget_share must be a finite number, got True \(bool\)"),
    ("budget_bytes", 1.5e6, r"budget_bytes must be an int or None, got 1500000.0 \(float\)"),
    ("io_depth", float("nan"), r"io_depth must be an int, got nan"),
    ("io_chunk_bytes", "32M", r"io_chunk_bytes must be an int"),
    ("cpu_workers", 1.0, r"cpu_workers must be an int"),
    ("pin_memory", 1, r"pin_memory must be a bool"),
    ("async_io", "yes", r"async_io must be a bool \(True/False\) or None"),
    ("device", None, r"device must be a string"),
    ("policy", 3, r"policy must be a string"),
])
def test_wrong_types_are_named_not_coerced(field, value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{field: value})


def test_numpy_numbers_are_numbers():
    config = EngineConfig(budget_share=np.float32(0.5), budget_bytes=np.int64(1 << 20), io_depth=np.int32(2))
    assert config.budget_bytes == 1 << 20 and config.io_depth == 2


@dataclass(frozen=True)
class _Shaped:
    pair: tuple[int, int] | None = None
    many: tuple[float, ...] = ()
    where: Path = Path(".")
    anything: Any = None

    def __post_init__(self) -> None:
        check_types(self, TypeError)


def test_check_types_on_tuples_paths_and_unions():
    assert _Shaped(pair=[1, 2]).pair == (1, 2)  # a list given for a tuple is kept as the tuple
    assert _Shaped(many=[0.5, 1]).many == (0.5, 1) and _Shaped(where="x").where == "x"
    for kwargs, message in [({"pair": (1, 2, 3)}, "pair must be"), ({"pair": (1.5, 2)}, "pair must be"),
                            ({"many": (1.0, "2")}, "many must be"), ({"where": 3}, "where must be Path")]:
        with pytest.raises(TypeError, match=message):
            _Shaped(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_check_device_refuses_cuda_where_there_is_none():
    check_device("cpu")
    check_device("auto")
    with pytest.raises(ValueError, match="device 'cuda:0': .* on this machine; use --device cpu"):
        check_device("cuda:0")


def _configs():
    from prescope.experiments.bench import BenchConfig
    from prescope.experiments.simcompare import CompareConfig
    from prescope.models.tinytrain import TinyConfig
    from prescope.predict.llapor import LLaPorConfig
    from prescope.routing.recording import TraceConfig

    compare = {"measured": None, "predictor": None, "host_of": None, "profiles": ("h200",)}
    return [(BenchConfig, {}, "budgets", ("0.5",)), (BenchConfig, {}, "repeats", 2.0),
            (CompareConfig, compare, "prompts", "16"), (CompareConfig, compare, "twin_layers", 4.5),
            (TinyConfig, {}, "lr", "3e-3"), (TinyConfig, {}, "tie_embeddings", 1),
            (LLaPorConfig, {}, "dropout", float("nan")), (LLaPorConfig, {}, "use_routing", "no"),
            (TraceConfig, {}, "max_new_tokens", 32.0)]


@pytest.mark.parametrize("index", range(9))
def test_every_frozen_config_refuses_wrong_types(index):
    cls, base, field, value = _configs()[index]
    cls(**base)  # the defaults are fine
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {field} must be"):
        cls(**{**base, field: value})
