"""prescope.workbench.viz: figures from tidy tables, bubbles computed by hand, provenance required on times."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from prescope import timeline as timeline_module
from prescope.workbench import viz
from prescope.workbench.viz import ProvenanceError, VizInputError

MS = 1e-3


def timeline(source: str | None = "simulated", profile: str | None = "a100-pcie4") -> pd.DataFrame:
    """Step 0 (0-4.5 ms): attention 0-1 on the GPU, an on-demand load 0.5-3 on PCIe while the GPU waits
    1-3, the expert 3-4 on the GPU, a CPU expert 1-4.5. Step 1 (5-6 ms): attention 5-5.5, expert 5.75-6."""
    rows = [("gpu", 0, 0, -1, "attention", 4, 0, 0.0, 1.0), ("pcie", 0, 0, 3, "on_demand", 4, 1 << 20, 0.5, 3.0),
            ("gpu", 0, 0, 3, "host", 4, 0, 1.0, 3.0), ("gpu", 0, 0, 3, "gpu_expert", 2, 0, 3.0, 4.0),
            ("cpu", 0, 0, 5, "cpu_expert", 2, 0, 1.0, 4.5), ("gpu", 1, 0, -1, "attention", 4, 0, 5.0, 5.5),
            ("gpu", 1, 0, 3, "gpu_expert", 4, 0, 5.75, 6.0)]
    df = pd.DataFrame(rows, columns=timeline_module.COLUMNS)
    df[["start", "end"]] *= MS
    if source:
        df.attrs.update(source=source, profile=profile)
    return df


def test_every_timeline_kind_has_a_colour():
    assert set(viz.KIND_COLORS) == set(timeline_module.KINDS)


def test_timeline_figure_lanes_kinds_bubbles_and_provenance():
    fig = viz.timeline_figure(timeline(), title="t")
    assert isinstance(fig, go.Figure)
    names = [t.name for t in fig.data]
    assert names[:-1] == ["on_demand", "gpu_expert", "cpu_expert", "attention", "host"]  # KIND_COLORS order
    bubble = fig.data[-1]  # by hand: GPU idle 1-3 (waiting), 4-4.5 (CPU expert), 5.5-5.75 (nothing ran)
    assert bubble.name == "bubble (GPU idle, 2.75 ms)" and set(bubble.y) == {"gpu"}
    assert bubble.customdata[:, 0].tolist() == ["on_demand_transfer", "cpu_expert", "host"]
    np.testing.assert_allclose(bubble.x, [2.0, 0.5, 0.25])
    np.testing.assert_allclose(np.asarray(bubble.base, float), [1.0, 4.0, 5.5])
    expert = fig.data[names.index("gpu_expert")]
    np.testing.assert_allclose(np.asarray(expert.base, float), [3.0, 5.75])
    np.testing.assert_allclose(expert.x, [1.0, 0.25])
    assert [a.text for a in fig.layout.annotations] == ["simulated on a100-pcie4"]
    assert list(fig.layout.yaxis.categoryarray) == ["cpu", "gpu", "pcie"]


def test_timeline_pair_figure_one_panel_each_titled_with_what_it_is():
    measured = timeline(source="measured", profile="NVIDIA H200")
    simulated = timeline(source="simulated", profile="h200-engine")
    simulated.attrs["label"] = "the same cell,"
    fig = viz.timeline_pair_figure(measured, simulated, title="pair")
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["measured on NVIDIA H200", "the same cell, simulated on h200-engine"]
    kinds = [t.name for t in fig.data if t.showlegend is not False and not t.name.startswith("bubble")]
    assert kinds == ["on_demand", "gpu_expert", "cpu_expert", "attention", "host"]  # one legend entry per kind
    bubbles = [t.name for t in fig.data if t.name.startswith("bubble")]
    assert bubbles == ["bubble, measured (GPU idle, 2.75 ms)", "bubble, the same cell, simulated (GPU idle, 2.75 ms)"]
    assert {t.yaxis for t in fig.data} == {"y", "y2"} and fig.layout.xaxis.matches == "x2"
    with pytest.raises(ProvenanceError):
        viz.timeline_pair_figure(measured, timeline(source=None))


def test_timeline_figure_selects_steps_relative_to_their_start():
    fig = viz.timeline_figure(timeline(source="measured", profile="h200"), steps=[1])
    assert [t.name for t in fig.data] == ["gpu_expert", "attention", "bubble (GPU idle, 0.25 ms)"]
    np.testing.assert_allclose(np.asarray(fig.data[1].base, float), [0.0])
    assert fig.layout.annotations[0].text == "measured on h200"
    with pytest.raises(VizInputError, match=r"no rows for steps \[7\]"):
        viz.timeline_figure(timeline(), steps=7)


def test_timeline_figure_refuses_a_timeline_without_provenance_or_schema():
    with pytest.raises(ProvenanceError, match="df.attrs"):
        viz.timeline_figure(timeline(source=None))
    with pytest.raises(ProvenanceError, match="expected one of"):
        viz.timeline_figure(timeline(source="guessed"))
    bad = timeline()
    bad.loc[0, "kind"] = "teleport"
    with pytest.raises(VizInputError, match=r"unknown kind values \['teleport'\]"):
        viz.timeline_figure(bad)
    with pytest.raises(VizInputError, match=r"missing columns \['bytes'\]"):
        viz.timeline_figure(timeline().drop(columns="bytes"))


def accuracy_table() -> pd.DataFrame:
    rows = [(p, layer, d, 0.9 - 0.1 * d + (0.05 if p == "llapor" else 0.0), 0.5)
            for p in ("lookahead", "llapor") for layer in range(3) for d in (1, 2)]
    return pd.DataFrame(rows, columns=["predictor", "layer", "distance", "recall_at_k", "exact_match"])


def test_accuracy_heatmap_one_panel_per_predictor():
    fig = viz.accuracy_heatmap(accuracy_table())
    assert [t.name for t in fig.data] == ["lookahead", "llapor"]
    np.testing.assert_allclose(fig.data[1].z, [[0.85, 0.75]] * 3)
    assert list(fig.data[0].x) == [1, 2] and list(fig.data[0].y) == [0, 1, 2]
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0, 1)
    assert viz.accuracy_heatmap(accuracy_table(), metric="exact_match").data[0].z[0][0] == 0.5
    with pytest.raises(VizInputError, match=r"missing columns \['overhead_us'\]"):
        viz.accuracy_heatmap(accuracy_table(), metric="overhead_us")
    with pytest.raises(VizInputError, match="more than one row"):
        viz.accuracy_heatmap(pd.concat([accuracy_table()] * 2))


def test_bubble_figure_stacks_causes_per_policy_in_ms():
    df = pd.DataFrame({"policy": ["lru", "lru", "prescope"], "cause": ["on_demand", "cpu_expert", "on_demand"],
                       "seconds": [0.004, 0.001, 0.002], "source": "simulated", "profile": "v100"})
    fig = viz.bubble_figure(df)
    assert fig.layout.barmode == "stack" and [t.name for t in fig.data] == ["cpu_expert", "on_demand"]
    np.testing.assert_allclose(fig.data[1].y, [4.0, 2.0])
    assert fig.layout.annotations[0].text == "simulated on v100"
    with pytest.raises(ProvenanceError):
        viz.bubble_figure(df.drop(columns=["source", "profile"]))


def test_throughput_figure_one_line_per_policy():
    df = pd.DataFrame({"policy": ["lru", "lru", "prescope", "prescope"], "batch_size": [4, 1, 1, 4],
                       "tokens_per_s": [8.0, 3.0, 5.0, 12.0]})
    df.attrs.update(source="measured", profile="h200")
    fig = viz.throughput_figure(df)
    assert [t.name for t in fig.data] == ["lru", "prescope"]
    assert list(fig.data[0].x) == [1, 4] and list(fig.data[0].y) == [3.0, 8.0]
    assert fig.layout.xaxis.type == "log"
    bench = df.rename(columns={"batch_size": "batch", "tokens_per_s": "decode_tok_s"})
    bench = bench.assign(source=["measured", "measured", "simulated", "simulated"], profile="h200")
    bench.attrs = {}
    fig = viz.throughput_figure(bench, x="batch", y="decode_tok_s")
    assert fig.layout.annotations[0].text == "measured on h200; simulated on h200"
    twice = pd.concat([df, df], ignore_index=True)
    twice.attrs = dict(df.attrs)
    with pytest.raises(VizInputError, match="more than one row"):
        viz.throughput_figure(twice)


def test_routing_figure_panels_from_routing_stats_tables():
    load = pd.DataFrame({"layer": [0, 0, 1, 1], "expert": [0, 1, 0, 1], "share": [0.75, 0.25, 0.5, 0.5]})
    load.attrs["model"] = "qwen3-30b-a3b"
    fig = viz.routing_figure({"load": load})
    assert len(fig.data) == 1 and fig.data[0].type == "heatmap"
    np.testing.assert_allclose(fig.data[0].z, [[0.75, 0.25], [0.5, 0.5]])
    assert fig.layout.title.text == "routing of qwen3-30b-a3b"
    skew = pd.DataFrame({"layer": [0, 1], "entropy_norm": [0.9, 0.8], "max_over_mean": [2.0, 3.0]})
    reuse = pd.DataFrame({"layer": [0, 1, 0, 1], "lag": [1, 1, 2, 2], "reuse": [0.4, 0.3, 0.3, 0.2],
                          "random": 0.125})
    both = viz.routing_figure({"reuse": reuse, "skew": skew, "load": load})
    assert [t.name for t in both.data] == ["load", "entropy", "lag 1", "lag 2", "random routing"]
    assert list(both.data[-1].x) == [0.125, 0.125]
    with pytest.raises(VizInputError, match="expected some of"):
        viz.routing_figure({"loads": load})
    with pytest.raises(VizInputError, match=r"missing columns \['random'\]"):
        viz.routing_figure({"reuse": reuse.drop(columns="random")})


def test_no_webgl_traces():
    figs = [viz.timeline_figure(timeline()), viz.accuracy_heatmap(accuracy_table())]
    assert all(not t.type.endswith("gl") for f in figs for t in f.data)


def test_routing_figure_cross_layer_panel():
    cross = pd.DataFrame({"layer": [0, 1], "nmi": [0.1, 0.05], "nmi_shuffled": [0.002, 0.001]})
    fig = viz.routing_figure({"cross": cross})
    assert [t.name for t in fig.data] == ["NMI with layer + 1", "NMI, tokens shuffled"]
    assert list(fig.data[1].x) == [0.002, 0.001] and fig.layout.annotations[0].text == "NMI with the next layer"


def test_accuracy_heatmap_metric_menu_switches_every_panel():
    df = accuracy_table()
    fig = viz.accuracy_heatmap(df, "exact_match", metrics=["recall_at_k", "exact_match"])
    np.testing.assert_allclose(fig.data[0].z, 0.5)  # opens on the chosen metric
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["exact_match", "recall_at_k"]
    recall = buttons[1].args[0]["z"]  # one grid per panel, layers × distances
    np.testing.assert_allclose(recall[1], [[0.85, 0.75]] * 3)
    assert buttons[1].args[1]["title.text"] == "recall_at_k by layer and lookahead distance"
    assert not fig.layout.annotations[-1].text.startswith(("measured", "simulated"))
    df.attrs.update(source="measured", profile="cpu")
    assert viz.accuracy_heatmap(df).layout.annotations[-1].text == "measured on cpu"
    with pytest.raises(VizInputError, match=r"missing columns \['recall_at_2k'\]"):
        viz.accuracy_heatmap(df, metrics=["recall_at_2k"])


def test_bubble_analysis_figure_by_step_layer_link_and_prefetch():
    df = timeline()
    prefetch = pd.DataFrame([("pcie", 0, 0, 4, "prefetch", 0, 2_000_000, 4.0 * MS, 4.4 * MS),
                             ("pcie", 1, 0, 6, "prefetch", 0, 3_000_000, 5.0 * MS, 5.5 * MS)],
                            columns=timeline_module.COLUMNS)
    used = pd.DataFrame([("gpu", 1, 0, 4, "gpu_expert", 1, 0, 5.5 * MS, 5.7 * MS)], columns=timeline_module.COLUMNS)
    df = pd.concat([df, prefetch, used], ignore_index=True)
    df.attrs.update(source="simulated", profile="h200")
    fig = viz.bubble_analysis_figure(df)
    by_name = {}
    for t in fig.data:
        by_name.setdefault(t.name, []).append(t)
    on_demand = by_name["on_demand_transfer"]  # step panel and layer panel
    assert [list(t.x) for t in on_demand] == [[0], [0]]
    np.testing.assert_allclose(on_demand[0].y, [2.0])
    # by hand: step 0 spans 0-4.5 ms with the link busy 0.5-3 and 4-4.4 (2.9 ms); step 1 spans 5-6 with 5-5.5
    np.testing.assert_allclose(by_name["link busy share"][0].y, [2.9 / 4.5, 0.5])
    np.testing.assert_allclose(by_name["prefetch used"][0].y, [2.0, 0.0])
    np.testing.assert_allclose(by_name["prefetch wasted"][0].y, [0.0, 3.0])
    assert fig.layout.annotations[-1].text == "simulated on h200"


def scaling_table() -> pd.DataFrame:
    rows = [(p, b, tps, 1e3 * b / tps, 40.0 * b, 1e3 / 40.0) for p, scale in (("lru", 1.0), ("belady", 2.0))
            for b, tps in ((1, 10.0 * scale), (4, 30.0 * scale))]
    return pd.DataFrame(rows, columns=["policy", "batch_size", "tokens_per_s", "latency_ms", "bound_tokens_per_s",
                                       "bound_latency_ms"])


def test_scaling_figure_throughput_latency_limit_and_bound():
    df = scaling_table()
    df.attrs.update(source="simulated", profile="h200")
    fig = viz.scaling_figure(df)
    names = [t.name for t in fig.data]
    assert names == ["lru", "belady", "lower bound", "lru", "belady", "lower bound"]
    assert fig.data[1].line.color == "black" and fig.data[2].line.dash == "dot"
    np.testing.assert_allclose(fig.data[2].y, [40.0, 160.0])
    np.testing.assert_allclose(fig.data[3].y, [100.0, 400.0 / 3])  # latency of lru, ms
    assert fig.layout.xaxis.type == "log" and fig.layout.annotations[-1].text == "simulated on h200"
    # the bound lies 4x above lru here: log y axes keep the policies from the bottom of the panels
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    assert viz.scaling_figure(df, log_y=False).layout.yaxis.type == "linear"
    sweep = df.rename(columns={"batch_size": "link_gbps"})
    sweep.attrs = df.attrs
    assert viz.scaling_figure(sweep, x="link_gbps").layout.xaxis.type == "log"
    both = pd.concat([df.assign(source="measured"), df.assign(source="simulated")], ignore_index=True)
    both["profile"] = "h200"
    fig = viz.scaling_figure(both.drop(columns=["bound_tokens_per_s", "bound_latency_ms"]))
    assert [t.line.dash for t in fig.data[:4]] == ["solid", "dash", "solid", "dash"]
    assert fig.data[0].name == "lru (measured)"
    with pytest.raises(VizInputError, match="more than one row"):
        viz.scaling_figure(pd.concat([df, df]).pipe(lambda d: d.__setattr__("attrs", df.attrs) or d))
    with pytest.raises(ProvenanceError):
        viz.scaling_figure(scaling_table())


def test_layer_groups_figure_shades_the_middle_group():
    table = pd.DataFrame({"layer": [0, 1, 2, 3] * 2, "metric": ["nmi"] * 4 + ["top1"] * 4,
                          "zscore": [1.0, 0.0, 0.0, -1.0, 0.5, 0.1, 0.1, -0.5],
                          "group": ["near_input", "middle", "middle", "near_output"] * 2})
    fig = viz.layer_groups_figure({"tiny": table, "real": table})
    assert [t.name for t in fig.data] == ["nmi", "top1", "nmi", "top1"]
    assert [t.showlegend for t in fig.data] == [True, True, False, False]
    assert [(s.x0, s.x1) for s in fig.layout.shapes] == [(0.5, 2.5), (0.5, 2.5)]
    with pytest.raises(VizInputError, match="no tables"):
        viz.layer_groups_figure({})


def test_fidelity_figure_points_identity_and_band():
    df = pd.DataFrame({"measured_ms": [10.0, 20.0], "simulated_ms": [11.0, 15.0], "model": ["a", "b"]})
    with pytest.raises(ProvenanceError, match="measured_on"):
        viz.fidelity_figure(df, label="model")
    df.attrs.update(measured_on="NVIDIA H200", profile="h200-calibrated")
    fig = viz.fidelity_figure(df, label="model")
    assert [t.name for t in fig.data] == ["a", "b", "simulated = measured", "±15%", None]
    np.testing.assert_allclose(fig.data[3].y, np.array(fig.data[2].y) * 1.15)
    assert fig.layout.annotations[0].text == "measured on NVIDIA H200; simulated on h200-calibrated"


def test_every_bubble_cause_has_one_colour_everywhere():
    assert set(viz.CAUSE_COLORS) == set(timeline_module.CAUSES)
    fig = viz.bubble_analysis_figure(timeline())
    colours = {(t.name, t.marker.color) for t in fig.data if t.type == "bar"}
    assert colours == {(c, viz.CAUSE_COLORS[c]) for c in ("on_demand_transfer", "cpu_expert", "host")}


def test_ratio_figure_one_bar_group_per_cell_and_refuses_unlabelled_or_duplicated_tables():
    table = pd.DataFrame({"model": ["m"] * 4, "policy": ["on_demand_lru", "prescope"] * 2, "budget": [0.25] * 4,
                          "batch": [1, 1, 4, 4], "vs_on_demand_lru": [1.0, 0.8, 1.0, 1.5]})
    table.attrs.update(source="measured", profile="NVIDIA H200")
    fig = viz.ratio_figure(table)
    assert [bar.name for bar in fig.data] == ["on_demand_lru", "prescope"]
    assert list(fig.data[1].y) == [0.8, 1.5] and list(fig.data[1].x) == ["m 25% b1", "m 25% b4"]
    assert fig.layout.annotations[0].text == "measured on NVIDIA H200"
    doubled, bare = pd.concat([table, table]), table.copy()
    doubled.attrs, bare.attrs = dict(table.attrs), {}
    with pytest.raises(VizInputError, match="more than one row"):
        viz.ratio_figure(doubled)
    with pytest.raises(ProvenanceError):
        viz.ratio_figure(bare)
