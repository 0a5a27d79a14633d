"""The planner's records: an inconsistent or out-of-range instance is a PlanError that says what was expected."""

from __future__ import annotations

import pytest

from prescope.policies import presched
from prescope.policies.instance import Candidate, Held, Instance, PlanError


def flat(t: float):
    return lambda n: t


OK = dict(layer=0, experts=(1,), tokens=(1.0,), predictions=(), load=1.0, gpu=flat(0.1), cpu=flat(1.0))


@pytest.mark.parametrize(("change", "message"), [
    ({"tokens": (1.0, 2.0)}, "equally long"),
    ({"experts": (1, 2), "tokens": (1.0, 1.0), "load": 0.0}, "load"),
    ({"predictions": ((Candidate(2, 1.5),),)}, "prob in"),
    ({"predictions": ((Candidate(2, 0.5, 0.0),),)}, "tokens > 0"),
    ({"link_free": 1.0, "demand_free": 2.0}, "demand_free"),
    ({"compute": (1.0,)}, "compute"),
    ({"free_slots": -1}, "free_slots"),
    ({"gap": -0.1}, "gap"),
    ({"evictable": (Held((1, 3), 0.5),), "inflight": {(1, 3): 0.2}}, "in flight"),
])
def test_bad_instances_are_clear_errors(change, message):
    with pytest.raises(PlanError, match=message):
        Instance(**{**OK, **change})


def test_the_planner_takes_the_same_records():
    """presched names the same classes; a miss with no slot to load into runs on the CPU."""
    assert (presched.Instance, presched.PlanError) == (Instance, PlanError)
    p = presched.plan(Instance(**OK))
    assert (p.cpu, p.gpu, p.loads, p.victims) == ((1,), (), (), ())
