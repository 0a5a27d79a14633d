"""The policy registry: names, typed options, and policies as the command line names them."""

from __future__ import annotations

import pytest

from prescope.policies import POLICIES, PolicySpec, make_policy, parse_policy
from prescope.policies.base import PolicyError
from prescope.policies.peers import PreScopeOptions


def test_every_policy_is_registered_under_its_name_and_declares_typed_options():
    for name, cls in POLICIES.items():
        assert cls.name == name
        policy = make_policy(name)
        assert isinstance(policy.options, cls.options_type)


def test_names_with_options_and_sync_parse_into_typed_options():
    spec = parse_policy("prescope[window_reuse=False, lookahead=2]+sync")
    assert spec == PolicySpec("prescope", {"window_reuse": False, "lookahead": 2}, async_io=False)
    assert spec.is_variant and str(spec) == "prescope[window_reuse=False,lookahead=2]+sync"
    policy = spec.build()
    assert policy.options == PreScopeOptions(window_reuse=False, lookahead=2) and policy.lookahead == 2
    assert parse_policy("prescope+cal").options == {"calibrate": True}  # the name earlier results use
    assert parse_policy("on_demand_lru") == PolicySpec("on_demand_lru") and not parse_policy("hybrid").is_variant
    assert make_policy("prescope", layer_gap_s=2).options.layer_gap_s == 2.0  # an int is taken for a float


def test_the_engines_suffixes_parse_in_either_order_and_name_a_variant():
    spec = parse_policy("prescope[gate=False]+cpu1+sync")
    assert spec == PolicySpec("prescope", {"gate": False}, async_io=False, cpu_workers=1) and spec.is_variant
    assert str(spec) == "prescope[gate=False]+sync+cpu1" and parse_policy(str(spec)) == spec
    assert spec.engine_options == {"async_io": False, "cpu_workers": 1}  # what EngineConfig takes of the name
    assert parse_policy("prescope").engine_options == {"async_io": None, "cpu_workers": 0}  # the engine's defaults
    assert parse_policy("belady+cpu12").cpu_workers == 12 and parse_policy("belady").cpu_workers is None
    assert parse_policy("oracle+cpu2").name == "belady"  # an earlier name with the engine's suffix


@pytest.mark.parametrize("bad, message", [
    ("prescope[lookahead]", "key=<Python literal>"), ("prescope[x=nope]", "key=<Python literal>"),
    ("prescope[x=1", "one bracket"), ("hybrid+cal", "prescope only"), ("lru", "unknown policy 'lru'"),
    ("prescope[gate=1]", "gate must be bool"), ("prescope[lookahead=True]", "lookahead must be int"),
    ("prescope[lookahead=0]", "lookahead must be >= 1"), ("prescope[colour=1]", r"unknown option\(s\) \['colour'\]"),
    ("prescope[transfer_host_s=nan]", "is not key=<Python literal>"),
    ("prescope[transfer_host_s=float('inf')]", "is not key=<Python literal>"),
    ("on_demand_lru[lookahead=2]", "its options: none|options: none"),
    ("prescope+cpu0", r"N >= 1"), ("prescope+cpu1+cpu2", "unknown policy"), ("prescope+cpus", r"\+cpuN"),
])
def test_bad_names_and_options_get_one_clear_error(bad, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(bad)


def test_options_are_checked_when_a_policy_is_built_directly():
    with pytest.raises(PolicyError, match="memory decay must be in"):
        make_policy("hybrid", memory_decay=1.5)
    with pytest.raises(PolicyError, match="transfer_host_s must be finite"):
        make_policy("prescope", transfer_host_s=float("inf"))
    with pytest.raises(PolicyError, match="unknown option"):
        make_policy("cpu_misses", lookahead=1)
