"""Timeline schema validation and the analyses (step summary, bubbles, prefetch precision) on hand-built rows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from prescope import timeline as tl


def row(lane, step, layer, expert, kind, start, end, tokens=1, nbytes=0, slot=-1, load=-1):
    return (lane, step, layer, expert, kind, tokens, nbytes, start, end, slot, load)


# One decode step, two MoE layers, times in seconds:
# layer 0: attention [0, 1], host [1, 2], expert 3 loads on demand [2, 5] then runs [5, 6], while a prefetch
#          of layer 1's expert 7 runs [5, 8] and expert 4 runs on the CPU [2, 7];
# layer 1: attention [7, 8], host [8, 9], expert 7 (prefetched) runs [9, 10].
ROWS = [
    row("gpu", 0, 0, -1, "attention", 0, 1),
    row("cpu", 0, 0, -1, "host", 1, 2),
    row("pcie", 0, 0, 3, "on_demand", 2, 5, tokens=0, nbytes=100, slot=0, load=0),
    row("gpu", 0, 0, 3, "gpu_expert", 5, 6, slot=0),
    row("cpu", 0, 0, 4, "cpu_expert", 2, 7),
    row("pcie", 0, 1, 7, "prefetch", 5, 8, tokens=0, nbytes=100, slot=1, load=1),
    row("gpu", 0, 1, -1, "attention", 7, 8),
    row("cpu", 0, 1, -1, "plan", 8, 9),
    row("gpu", 0, 1, 7, "gpu_expert", 9, 10, slot=1),
]


@pytest.fixture
def timeline() -> pd.DataFrame:
    return tl.make_timeline(ROWS, source="simulated", profile="hand", meta={"policy": "test"})


def test_make_timeline_columns_types_and_attrs(timeline):
    assert list(timeline.columns) == list(tl.COLUMNS + tl.OPTIONAL_COLUMNS)
    assert timeline["step"].dtype == np.int64 and timeline["start"].dtype == np.float64
    assert timeline.attrs == {"source": "simulated", "profile": "hand", "meta": {"policy": "test"}}
    from_dicts = tl.make_timeline([dict(zip(tl.COLUMNS, r[:len(tl.COLUMNS)], strict=True)) for r in ROWS], source="measured", profile="x")
    assert list(from_dicts.columns) == list(tl.COLUMNS) and len(from_dicts) == len(ROWS)
    empty = tl.make_timeline([], source="measured", profile="x")
    assert list(empty.columns) == list(tl.COLUMNS) and empty.empty


@pytest.mark.parametrize("bad, message", [
    (row("nvlink", 0, 0, 1, "gpu_expert", 0, 1), "lanes must be among"),
    (row("gpu", 0, 0, 1, "compute", 0, 1), "kinds must be among"),
    (row("gpu", 0, 0, 1, "on_demand", 0, 1), "wrong lane"),
    (row("gpu", 0, 0, 1, "gpu_expert", 2, 1), "end before they start"),
    (row("gpu", 0.5, 0, 1, "gpu_expert", 0, 1), "whole numbers"),
    (row("pcie", 0, 0, 1, "prefetch", 0, 1, nbytes=-5), ">= 0"),
    (row("gpu", 0, 0, 1, "gpu_expert", 0, math.nan), "finite"),
])
def test_make_timeline_rejects_bad_rows(bad, message):
    with pytest.raises(tl.TimelineError, match=message):
        tl.make_timeline(ROWS + [bad], source="simulated", profile="hand")


def test_a_timeline_written_with_the_old_kind_name_reads_as_host():
    old = tl.make_timeline([row("gpu", 0, 0, -1, "attention", 0, 1), row("cpu", 0, 0, -1, "wait", 1, 2)],
                           source="simulated", profile="test")
    assert old["kind"].tolist() == ["attention", "host"]


def test_make_timeline_rejects_bad_source_and_missing_columns():
    with pytest.raises(tl.TimelineError, match="source"):
        tl.make_timeline(ROWS, source="guessed", profile="hand")
    with pytest.raises(tl.TimelineError, match="lacks columns"):
        tl.make_timeline(pd.DataFrame({"lane": ["gpu"]}), source="measured", profile="x")


def test_step_summary_by_hand(timeline):
    s = tl.step_summary(timeline).iloc[0]
    assert (s["start"], s["end"], s["latency"], s["tokens"]) == (0, 10, 10, 1)
    assert (s["bytes"], s["loads_on_demand"], s["loads_prefetched"]) == (200, 1, 1)
    # expert 7 ran on the GPU with no on-demand load (a hit); expert 3's load and expert 4's CPU run are misses
    assert (s["hits"], s["misses"]) == (1, 2)
    # GPU busy [0,1] [5,6] [7,8] [9,10]; link busy [2,8]; host [1,2] [8,9]; CPU [2,7]
    assert (s["gpu_busy"], s["gpu_idle"], s["link_busy"], s["host"], s["cpu_busy"]) == (4, 6, 6, 2, 5)


def test_step_summary_takes_cache_stats():
    frame = tl.make_timeline(ROWS, source="simulated", profile="hand")
    s = tl.step_summary(frame, [{"step": 0, "hits": 5, "misses": 0, "evictions": 3}]).iloc[0]
    assert (s["hits"], s["misses"], s["evictions"]) == (5, 0, 3)
    with pytest.raises(tl.TimelineError, match="'step' column"):
        tl.step_summary(frame, [{"hits": 1}])


def test_step_spans_ignore_a_prefetch_running_into_the_next_step():
    rows = ROWS + [row("pcie", 0, 0, 2, "prefetch", 9, 30, tokens=0, nbytes=100, slot=2, load=2),
                   row("gpu", 1, 0, -1, "attention", 10, 11), row("gpu", 1, 0, 2, "gpu_expert", 11, 12)]
    summary = tl.step_summary(tl.make_timeline(rows, source="simulated", profile="hand"))
    assert summary["latency"].tolist() == [10, 2]
    assert summary["link_busy"].tolist() == [7, 2]  # the prefetch occupies the link during step 1 too


def test_bubbles_by_hand(timeline):
    b = tl.bubbles(timeline)
    assert b[["start", "end", "cause"]].values.tolist() == [
        [1, 5, "on_demand_transfer"],  # waited for expert 3's load (the host work ended earlier)
        [6, 7, "cpu_expert"],  # layer 0 ended with its CPU expert
        [8, 9, "planning"],  # expert 7 was resident: the GPU waited for the plan
    ]
    assert b["duration"].sum() == tl.step_summary(timeline)["gpu_idle"].iloc[0]
    assert (b.iloc[0]["layer"], b.iloc[0]["expert"], b.iloc[0]["kind"]) == (0, 3, "on_demand")


def test_bubble_without_a_culprit_is_a_host_gap():
    rows = [row("gpu", 0, 0, -1, "attention", 0, 1), row("gpu", 0, 0, 1, "gpu_expert", 2, 3)]
    b = tl.bubbles(tl.make_timeline(rows, source="measured", profile="x"))
    assert b[["start", "end", "cause", "kind", "expert"]].values.tolist() == [[1, 2, "host", "", -1]]


def test_late_prefetch_is_blamed_before_host_work_ending_at_the_same_instant():
    rows = [row("gpu", 0, 0, -1, "attention", 0, 1), row("cpu", 0, 0, -1, "host", 1, 3),
            row("pcie", 0, 0, 5, "prefetch", 0, 3, tokens=0, nbytes=8, load=0),
            row("gpu", 0, 0, 5, "gpu_expert", 3, 4)]
    b = tl.bubbles(tl.make_timeline(rows, source="simulated", profile="x"))
    assert b["cause"].tolist() == ["late_prefetch"]


def test_prefetch_precision_by_hand():
    rows = [
        row("pcie", 0, 1, 7, "prefetch", 0, 1, tokens=0, nbytes=100, load=0),  # used at t=2
        row("gpu", 0, 1, 7, "gpu_expert", 2, 3),
        row("pcie", 0, 1, 8, "prefetch", 0, 1, tokens=0, nbytes=30, load=1),  # segment 1 of 2
        row("pcie", 0, 1, 8, "prefetch", 1.5, 2, tokens=0, nbytes=70, load=1),
        row("pcie", 1, 1, 8, "on_demand", 5, 6, tokens=0, nbytes=100, load=2),  # evicted unused, reloaded
        row("gpu", 1, 1, 8, "gpu_expert", 6, 7),
        row("pcie", 1, 2, 9, "prefetch", 6, 7, tokens=0, nbytes=100, load=3),  # never used
    ]
    frame = tl.make_timeline(rows, source="simulated", profile="x")
    p = tl.prefetch_precision(frame).iloc[0]
    assert (p["prefetches"], p["used"], p["bytes"], p["bytes_used"]) == (3, 1, 300, 100)
    assert p["precision"] == pytest.approx(1 / 3)
    by_step = tl.prefetch_precision(frame, by="step")
    assert by_step[["step", "prefetches", "used"]].values.tolist() == [[0, 2, 1], [1, 1, 0]]
    assert math.isnan(tl.prefetch_precision(frame[frame["kind"] != "prefetch"])["precision"].iloc[0])
    no_transfers = tl.prefetch_precision(frame[frame["lane"] != "pcie"]).iloc[0]
    assert no_transfers["prefetches"] == 0 and math.isnan(no_transfers["precision"])


def test_analyses_of_an_empty_timeline():
    empty = tl.make_timeline([], source="measured", profile="x")
    assert tl.step_summary(empty).empty and tl.bubbles(empty).empty
    assert tl.prefetch_precision(empty)["prefetches"].iloc[0] == 0


def test_measured_results_are_labelled_in_one_scheme():
    """"host:" and the device: a CUDA device's name, or the CPU as <machine>-<cores>cpu; a label is not
    prefixed twice."""
    import os
    import platform

    cpu = tl.host_device("cpu")
    assert cpu == f"{platform.machine() or 'cpu'}-{os.cpu_count()}cpu"
    assert tl.measured_profile(cpu) == "host:" + cpu
    assert tl.measured_profile("NVIDIA H200") == tl.measured_profile("host:NVIDIA H200") == "host:NVIDIA H200"
