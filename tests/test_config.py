"""EngineConfig validation: a clear error for every bad field."""

from __future__ import annotations

import pytest

from prescope.config import EngineConfig


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
