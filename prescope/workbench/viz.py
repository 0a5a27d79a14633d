"""Plotly figures of prescope's tables; every function returns a `go.Figure` and never shows it.

Inputs are tidy DataFrames with the columns named in each docstring (DESIGN.md §2, §4-§6). A figure
of times always says whether they were measured or simulated and on which hardware profile, taken from
`df.attrs["source"]`/`df.attrs["profile"]` or, for tables gathering several runs, from `source` and
`profile` columns; a timing table without either is refused (ProvenanceError). Plain SVG traces only
(no WebGL), so reports render anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from prescope import timeline as tl

KIND_COLORS = {
    "prefetch": "#4C78A8", "on_demand": "#E45756", "gpu_expert": "#54A24B", "cpu_expert": "#F58518",
    "attention": "#B279A2", "dense": "#9D755D", "predict": "#72B7B2", "plan": "#EECA3B", "host": "#BAB0AC",
}
# Bubble causes in the colour of the operation they wait for (KIND_COLORS), the same in every figure.
CAUSE_COLORS = {"on_demand_transfer": "#E45756", "late_prefetch": "#4C78A8", "cpu_expert": "#F58518",
                "planning": "#EECA3B", "host": "#BAB0AC"}
BUBBLE_COLOR = "rgba(215, 25, 28, 0.45)"
WASTED_COLOR = "#9D755D"  # prefetched bytes evicted unused: not the red of on-demand loads
SUBPLOT_NOTE_Y = 1.08  # above the subplot titles, which sit at y = 1
MENU_TOP_MARGIN_PX = 130  # room for a title and a menu above the panels
BUBBLE_BAR_WIDTH = 0.3  # thinner than the operation bars, so a bubble over a `host` bar stays visible
MS_PER_S = 1e3


class VizInputError(ValueError):
    """A table handed to a figure function lacks columns or holds values the figure cannot draw."""


class ProvenanceError(VizInputError):
    """A table of times that does not say whether they were measured or simulated, and on what."""


def _require(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise VizInputError(f"{what}: missing columns {missing}; it has {list(df.columns)}")
    if df.empty:
        raise VizInputError(f"{what}: the table is empty")


def _unique_rows(df: pd.DataFrame, keys: list[str], what: str) -> None:
    if df.duplicated(keys).any():
        raise VizInputError(f"{what}: more than one row per {tuple(keys)}; filter or aggregate first")


def provenance(df: pd.DataFrame, attrs_only: bool = False) -> str:
    """'measured on <profile>' / 'simulated on <profile>' from df.attrs, else from source/profile columns."""
    if df.attrs.get("source") and df.attrs.get("profile"):
        pairs = [(df.attrs["source"], df.attrs["profile"])]
    elif not attrs_only and {"source", "profile"} <= set(df.columns):
        pairs = sorted(set(zip(df["source"], df["profile"], strict=True)))
    else:
        where = "df.attrs" if attrs_only else "df.attrs or columns"
        raise ProvenanceError(f"the table does not say where its times come from: set `source` "
                              f"({' or '.join(tl.SOURCES)}) and `profile` in {where}")
    bad = sorted({s for s, _ in pairs} - set(tl.SOURCES))
    if bad:
        raise ProvenanceError(f"source {bad}: expected one of {tl.SOURCES}")
    return "; ".join(f"{s} on {p}" for s, p in pairs)


def _annotate(fig: go.Figure, text: str, y: float = 1.0) -> go.Figure:
    fig.add_annotation(text=text, xref="paper", yref="paper", x=1, y=y, xanchor="right", yanchor="bottom",
                       showarrow=False, font=dict(size=12))
    return fig


def _check_timeline(df: pd.DataFrame) -> None:
    _require(df, tl.COLUMNS, "timeline")
    for column, allowed in (("lane", tl.LANES), ("kind", tl.KINDS)):
        bad = sorted(set(df[column]) - set(allowed))
        if bad:
            raise VizInputError(f"timeline: unknown {column} values {bad}; expected {allowed}")


def _shown_steps(timeline_df: pd.DataFrame, steps: int | Iterable[int] | None) -> pd.DataFrame:
    _check_timeline(timeline_df)
    if steps is None:
        return timeline_df
    wanted = {steps} if isinstance(steps, int) else set(steps)
    df = timeline_df[timeline_df["step"].isin(wanted)]
    if df.empty:
        raise VizInputError(f"timeline: no rows for steps {sorted(wanted)}")
    return df


_TIMELINE_HOVER = ("%{y} %{fullData.name}<br>step %{customdata[0]}, layer %{customdata[1]}, expert %{customdata[2]}"
                   "<br>%{customdata[3]} tokens, %{customdata[4]:.3s}B<br>%{base:.3f} ms + %{x:.3f} ms<extra></extra>")


def _timeline_traces(df: pd.DataFrame, named: set[str], bubble_name: str) -> list[go.Bar]:
    """One bar trace per kind present (in the legend once: `named` collects the kinds already listed) and the
    GPU bubbles of `df`, times in ms from its first row."""
    t0, traces = df["start"].min(), []
    for kind, color in KIND_COLORS.items():
        rows = df[df["kind"] == kind]
        if len(rows):
            traces.append(go.Bar(name=kind, legendgroup=kind, showlegend=kind not in named, orientation="h",
                                 y=rows["lane"], base=(rows["start"] - t0) * MS_PER_S,
                                 x=(rows["end"] - rows["start"]) * MS_PER_S, marker_color=color,
                                 customdata=rows[["step", "layer", "expert", "tokens", "bytes"]].to_numpy(),
                                 hovertemplate=_TIMELINE_HOVER))
            named.add(kind)
    gaps = tl.bubbles(df)
    if len(gaps):
        traces.append(go.Bar(name=f"{bubble_name} (GPU idle, {gaps['duration'].sum() * MS_PER_S:.3g} ms)",
                             orientation="h", y=["gpu"] * len(gaps), base=(gaps["start"] - t0) * MS_PER_S,
                             x=gaps["duration"] * MS_PER_S, width=BUBBLE_BAR_WIDTH, marker_color=BUBBLE_COLOR,
                             customdata=gaps[["cause"]].to_numpy(),
                             hovertemplate="GPU idle %{x:.3f} ms: %{customdata[0]}<extra></extra>"))
    return traces


LANE_AXIS = dict(categoryorder="array", categoryarray=list(reversed(tl.LANES)))
LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.18, x=0, xanchor="left")  # wide figures keep their width


def timeline_figure(timeline_df: pd.DataFrame, steps: int | Iterable[int] | None = None,
                    title: str | None = None) -> go.Figure:
    """Lanes pcie/gpu/cpu against time (ms from the first shown row), one bar per operation coloured by
    kind, and GPU bubbles (`timeline.bubbles`, hover: cause) as red stripes on the gpu lane.

    `timeline_df` follows the schema of `prescope.timeline` with attrs source and profile; `steps`
    selects one step or several.
    """
    where = provenance(timeline_df, attrs_only=True)
    df = _shown_steps(timeline_df, steps)
    fig = go.Figure(_timeline_traces(df, set(), "bubble"))
    shown = sorted(df["step"].unique())
    fig.update_layout(barmode="overlay", title=title or f"timeline, steps {shown[0]}–{shown[-1]}",
                      xaxis_title="time (ms)", legend=LEGEND_BELOW, yaxis=LANE_AXIS)
    return _annotate(fig, where)


def timeline_pair_figure(top: pd.DataFrame, bottom: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Two timelines one above the other, each against its own time from its first row (ms, one x axis):
    typically a run measured on a GPU and the simulator's replay of the same cell. Each panel is titled with
    what it is (`attrs["label"]` if set, then measured/simulated and the device or profile, from attrs), one
    legend of kinds for both; bubbles as in `timeline_figure`."""
    frames = [_shown_steps(df, None) for df in (top, bottom)]
    names = [" ".join(filter(None, (df.attrs.get("label"), provenance(df, attrs_only=True)))) for df in (top, bottom)]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.14, subplot_titles=names)
    named: set[str] = set()
    for row, (df, name) in enumerate(zip(frames, names, strict=True), start=1):
        for trace in _timeline_traces(df, named, "bubble, " + name.split(" on ")[0]):
            fig.add_trace(trace, row, 1)
        fig.update_yaxes(LANE_AXIS, row=row, col=1)
    fig.update_xaxes(title_text="time (ms) from the first shown operation", row=2, col=1)
    return fig.update_layout(barmode="overlay", title=title or "measured and simulated, the same cell",
                             legend=LEGEND_BELOW, height=2 * 330)


ROUTING_PANELS = {  # key of stats_tables -> (panel title, columns it needs)
    "load": ("expert load share", ("layer", "expert", "share")),
    "skew": ("load entropy (1 = uniform)", ("layer", "entropy_norm")),
    "reuse": ("reuse of earlier tokens' experts", ("layer", "lag", "reuse", "random")),
    "cross": ("NMI with the next layer", ("layer", "nmi", "nmi_shuffled")),
}


def _routing_traces(key: str, df: pd.DataFrame) -> list[go.BaseTraceType]:
    if key == "load":
        z = df.pivot_table(index="layer", columns="expert", values="share", aggfunc="sum", fill_value=0.0)
        return [go.Heatmap(z=z.to_numpy(), x=z.columns, y=z.index, colorscale="Viridis", colorbar_title="share",
                           name="load")]
    if key == "skew":
        return [go.Scatter(x=df["entropy_norm"], y=df["layer"], mode="lines+markers", name="entropy")]
    if key == "cross":
        return [go.Scatter(x=df["nmi"], y=df["layer"], mode="lines+markers", name="NMI with layer + 1"),
                go.Scatter(x=df["nmi_shuffled"], y=df["layer"], mode="lines", line=dict(dash="dash", color="grey"),
                           name="NMI, tokens shuffled")]
    lines = [go.Scatter(x=rows["reuse"], y=rows["layer"], mode="lines+markers", name=f"lag {lag}")
             for lag, rows in df.groupby("lag", sort=True)]
    baseline = float(df["random"].iloc[0])
    return lines + [go.Scatter(x=[baseline, baseline], y=[df["layer"].min(), df["layer"].max()], mode="lines",
                               line=dict(dash="dash", color="grey"), name="random routing")]


def routing_figure(stats_tables: Mapping[str, pd.DataFrame]) -> go.Figure:
    """Routing statistics per MoE layer, one panel per table given (layers on a shared y axis).

    Keys and columns (`prescope.routing.stats` produces the last two):
    "load": layer, expert, share (share of the layer's routed slots), drawn as a heatmap;
    "skew": layer, entropy_norm (`load_skew`);
    "reuse": layer, lag, reuse, random (`temporal_reuse`), one line per lag and the random baseline K/E;
    "cross": layer, nmi, nmi_shuffled (`cross_layer` with layer = layer_a), the correlation of each layer's
    choices with the next layer's and what shuffled tokens give (no dependence).
    `attrs["model"]` of any table names the model in the title.
    """
    unknown = sorted(set(stats_tables) - set(ROUTING_PANELS))
    panels = [k for k in ROUTING_PANELS if k in stats_tables]
    if unknown or not panels:
        raise VizInputError(f"routing_figure: tables {sorted(stats_tables)}; expected some of {list(ROUTING_PANELS)}")
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True,
                        subplot_titles=[ROUTING_PANELS[k][0] for k in panels])
    for col, key in enumerate(panels, start=1):
        _require(stats_tables[key], ROUTING_PANELS[key][1], f"routing {key} table")
        for trace in _routing_traces(key, stats_tables[key]):
            fig.add_trace(trace, 1, col)
    fig.update_yaxes(title_text="MoE layer", row=1, col=1)
    model = next((t.attrs["model"] for t in stats_tables.values() if "model" in t.attrs), "the model")
    # the legend goes under the panels, where the load heatmap's colour bar cannot cover it
    return fig.update_layout(title=f"routing of {model}", legend=dict(orientation="h", yanchor="top", y=-0.2))


def accuracy_heatmap(df: pd.DataFrame, metric: str = "recall_at_k", metrics: Iterable[str] | None = None) -> go.Figure:
    """Predictor accuracy per MoE layer × lookahead distance, one panel per predictor.

    Columns: predictor, layer, distance, and `metric` (e.g. recall_at_k, exact_match, recall_at_2k; one
    row per predictor, layer and distance). `metrics` (columns of `df`, `metric` among them) adds a menu
    that switches every panel between them, so a static report keeps the choice. `df.attrs` source and
    profile, when set, say what the accuracy was measured on (the trace it was evaluated on).
    """
    shown = list(dict.fromkeys([metric, *(metrics or ())]))
    _require(df, ("predictor", "layer", "distance", *shown), "accuracy table")
    _unique_rows(df, ["predictor", "layer", "distance"], "accuracy table")
    predictors = list(dict.fromkeys(df["predictor"]))
    fig = make_subplots(rows=1, cols=len(predictors), subplot_titles=predictors, shared_yaxes=True)
    grids = {m: [df[df["predictor"] == name].pivot(index="layer", columns="distance", values=m) for name in predictors]
             for m in shown}
    for col, z in enumerate(grids[metric], start=1):
        fig.add_trace(go.Heatmap(z=z.to_numpy(), x=z.columns, y=z.index, coloraxis="coloraxis",
                                 texttemplate="%{z:.2f}", name=predictors[col - 1]), 1, col)
        fig.update_xaxes(title_text="distance", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text="MoE layer", row=1, col=1)
    fig.update_layout(title=f"{metric} by layer and lookahead distance", coloraxis=_unit_axis(df[metric], metric))
    if len(shown) > 1:
        fig.update_layout(margin=dict(t=MENU_TOP_MARGIN_PX), updatemenus=[dict(  # between title and panels
            type="dropdown", x=0, y=1.1, xanchor="left", yanchor="bottom", active=0,
            buttons=[dict(label=m, method="update",
                          args=[{"z": [z.to_numpy() for z in grids[m]]},
                                {"title.text": f"{m} by layer and lookahead distance",
                                 "coloraxis": _unit_axis(df[m], m)}]) for m in shown])])
    if df.attrs.get("source") and df.attrs.get("profile"):
        _annotate(fig, provenance(df, attrs_only=True), SUBPLOT_NOTE_Y)
    return fig


def _unit_axis(values: pd.Series, title: str) -> dict:
    """A colour axis fixed to [0, 1] for shares (recall, match), free for other metrics (count errors)."""
    unit = bool(values.dropna().between(0, 1).all())
    return dict(colorscale="Viridis", cmin=0 if unit else None, cmax=1 if unit else None, colorbar_title=title)


def bubble_figure(df: pd.DataFrame) -> go.Figure:
    """GPU bubble time per decode step by cause, stacked per policy.

    Columns: policy, cause (one of `timeline.CAUSES`, the `cause` of `timeline.bubbles`), seconds (mean
    bubble time per decode step; one row per policy and cause); provenance in attrs or source/profile
    columns.
    """
    where = provenance(df)
    _require(df, ("policy", "cause", "seconds"), "bubble table")
    _unique_rows(df, ["policy", "cause"], "bubble table")
    order = {c: i for i, c in enumerate(tl.CAUSES)}
    causes = sorted(df["cause"].unique(), key=lambda c: (order.get(c, len(order)), c))
    fig = go.Figure([go.Bar(name=c, x=df.loc[df["cause"] == c, "policy"], marker_color=CAUSE_COLORS.get(c),
                            y=df.loc[df["cause"] == c, "seconds"] * MS_PER_S) for c in causes])
    fig.update_layout(barmode="stack", title="GPU bubbles per decode step", yaxis_title="ms per step",
                      legend_title="cause")
    return _annotate(fig, where)


def throughput_figure(df: pd.DataFrame, x: str = "batch_size", y: str = "tokens_per_s",
                      by: str = "policy") -> go.Figure:
    """Decode throughput against batch size, one line per `by` value, log2 batch axis.

    Defaults match the simulator's results (batch_size, tokens_per_s); `prescope bench` tables use
    x="batch", y="decode_tok_s". One row per (by, x); provenance in attrs or source/profile columns.
    """
    where = provenance(df)
    _require(df, (by, x, y), "throughput table")
    _unique_rows(df, [by, x], "throughput table")
    fig = go.Figure([go.Scatter(name=str(name), x=rows[x], y=rows[y], mode="lines+markers")
                     for name, rows in df.sort_values(x).groupby(by, sort=False)])
    fig.update_layout(title="decode throughput", xaxis=dict(title=x, type="log", tickvals=sorted(df[x].unique())),
                      yaxis_title=y, legend_title=by)
    return _annotate(fig, where)


def bubble_analysis_figure(timeline_df: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Where one run's GPU time went, four panels from its timeline (`prescope.timeline` schema, attrs
    source and profile): GPU idle ms per step by cause and per MoE layer by cause (`timeline.bubbles`;
    the layer is the blamed operation's, -1 when nothing was to blame), link utilisation per step (the
    share of the step's span the link was busy, `step_summary`), and prefetched MB per issuing step that
    were used before eviction against those wasted (`prefetch_precision`)."""
    where = provenance(timeline_df, attrs_only=True)
    _check_timeline(timeline_df)
    gaps = tl.bubbles(timeline_df)
    steps = tl.step_summary(timeline_df)
    used = tl.prefetch_precision(timeline_df, by="step")
    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.16, horizontal_spacing=0.1,
                        subplot_titles=["GPU idle per step, by cause", "GPU idle per MoE layer, by cause",
                                        "link utilisation per step", "prefetched MB: used vs wasted"])
    order = {c: i for i, c in enumerate(tl.CAUSES)}
    for cause in sorted(gaps["cause"].unique(), key=lambda c: (order.get(c, len(order)), c)):
        rows = gaps[gaps["cause"] == cause]
        for col, key in ((1, "step"), (2, "layer")):
            per = rows.groupby(key)["duration"].sum() * MS_PER_S
            fig.add_trace(go.Bar(name=cause, x=per.index, y=per.to_numpy(), legendgroup=cause, showlegend=col == 1,
                                 marker_color=CAUSE_COLORS.get(cause)), 1, col)
    share = steps["link_busy"] / steps["latency"].where(steps["latency"] > 0)
    fig.add_trace(go.Scatter(name="link busy share", x=steps["step"], y=share, mode="lines+markers"), 2, 1)
    if len(used):
        fig.add_trace(go.Bar(name="prefetch used", x=used["step"], y=used["bytes_used"] / 1e6,
                             marker_color=KIND_COLORS["gpu_expert"]), 2, 2)
        fig.add_trace(go.Bar(name="prefetch wasted", x=used["step"], y=(used["bytes"] - used["bytes_used"]) / 1e6,
                             marker_color=WASTED_COLOR), 2, 2)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="MoE layer", row=1, col=2)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_xaxes(title_text="issuing step", row=2, col=2)
    fig.update_yaxes(title_text="idle ms", row=1, col=1)
    fig.update_yaxes(title_text="idle ms", row=1, col=2)
    fig.update_yaxes(title_text="share", range=[0, 1.05], row=2, col=1)
    fig.update_yaxes(title_text="MB", row=2, col=2)
    fig.update_layout(barmode="stack", height=2 * 350, legend_title="cause / series",
                      title=title or f"GPU bubbles, link and prefetches over {len(steps)} steps")
    return _annotate(fig, where, SUBPLOT_NOTE_Y)


SCALING_PANELS = (("tokens_per_s", "decode throughput (tokens/s)"), ("latency_ms", "per-token latency (ms)"))
BOUND_COLUMNS = {"tokens_per_s": "bound_tokens_per_s", "latency_ms": "bound_latency_ms"}
LIMIT_COLOURS = {"belady": "black", "ceiling": "dimgrey", "oracle": "black"}  # the limits (`oracle`: belady's old name)
LOG_TICKS = "D2"  # a log axis labels 1, 2 and 5 of each decade


def scaling_figure(df: pd.DataFrame, x: str = "batch_size", by: str = "policy", title: str | None = None,
                   log_y: bool = True) -> go.Figure:
    """Throughput and per-token latency against `x` (batch size by default), one line per `by` value.

    Columns: `x`, `by`, tokens_per_s, latency_ms; optionally `source` ("measured" solid, "simulated"
    dashed, both on one figure for a fidelity view) and the lower bound of each x, bound_tokens_per_s and
    bound_latency_ms (drawn once per source as a grey dotted "lower bound" line; the best any policy can
    do). The limits are drawn thick, `belady` in black, `ceiling` in dark grey. One row per (by, x, source); provenance in attrs or
    source/profile columns. A batch-size or bandwidth axis is logarithmic, and so are both y axes unless
    `log_y` is False: the bound may lie ten times above every policy, and on a linear axis it would squeeze
    them into its bottom tenth.
    """
    where = provenance(df)
    _require(df, (x, by, *(c for c, _ in SCALING_PANELS)), "scaling table")
    split = "source" in df.columns and df["source"].nunique() > 1
    _unique_rows(df, [by, x, "source"] if "source" in df.columns else [by, x], "scaling table")
    fig = make_subplots(rows=1, cols=2, subplot_titles=[t for _, t in SCALING_PANELS], horizontal_spacing=0.1)
    palette = dict(zip(dict.fromkeys(df[by]), _PALETTE * (1 + df[by].nunique() // len(_PALETTE)), strict=False))
    keys = [by, "source"] if split else [by]
    groups = dict(list(df.sort_values(x, kind="stable").groupby(keys, sort=False)))
    order = {name: i for i, name in enumerate(dict.fromkeys(df[by]))}  # lines in table order, measured first
    for col, (metric, _) in enumerate(SCALING_PANELS, start=1):
        for key in sorted(groups, key=lambda k: (order[k[0]], str(k[1:]))):
            rows = groups[key]
            name, source = key if split else (key[0], None)
            limit = LIMIT_COLOURS.get(str(name))
            label = f"{name} ({source})" if split else str(name)
            fig.add_trace(go.Scatter(
                name=label, x=rows[x], y=rows[metric], mode="lines+markers", legendgroup=label, showlegend=col == 1,
                line=dict(color=limit or palette[name], width=3 if limit else 2,
                          dash="dash" if source == "simulated" else "solid")), 1, col)
        bound = BOUND_COLUMNS[metric]
        if bound in df.columns:
            for source, rows in (df.groupby("source") if split else [(None, df)]):
                line = rows.groupby(x)[bound].min() if metric == "latency_ms" else rows.groupby(x)[bound].max()
                label = "lower bound" + (f" ({source})" if split else "")
                fig.add_trace(go.Scatter(name=label, x=line.index, y=line.to_numpy(), mode="lines", legendgroup=label,
                                         showlegend=col == 1, line=dict(color="grey", dash="dot", width=2)), 1, col)
        fig.update_xaxes(title_text=x, row=1, col=col, **_x_axis(df, x))
        fig.update_yaxes(title_text=SCALING_PANELS[col - 1][1] + (", log scale" if log_y else ""), row=1, col=col,
                         **(dict(type="log", dtick=LOG_TICKS) if log_y else dict(type="linear")))
    fig.update_layout(title=title or f"throughput and latency against {x}", legend_title=by)
    return _annotate(fig, where, SUBPLOT_NOTE_Y)


_PALETTE = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#9D755D", "#EECA3B", "#FF9DA6"]


def _x_axis(df: pd.DataFrame, x: str) -> dict:
    values = sorted(df[x].unique())
    if x.startswith(("batch", "link")) and len(values) > 1 and min(values) > 0:
        return dict(type="log", tickvals=values)
    return {}


def layer_groups_figure(tables: Mapping[str, pd.DataFrame]) -> go.Figure:
    """The layer-group insight: per model, routing curves over depth (z-scored so they share an axis) and
    the groups they split into, the middle group shaded.

    Each table is `llapor.derive_groups(trace)[1]`: layer, metric, zscore, group (near_input, middle,
    near_output), one row per layer and metric; keys name the models.
    """
    if not tables:
        raise VizInputError("layer_groups_figure: no tables")
    fig = make_subplots(rows=1, cols=len(tables), subplot_titles=list(tables), horizontal_spacing=0.06)
    metrics: dict[str, str] = {}
    for col, (model, df) in enumerate(tables.items(), start=1):
        _require(df, ("layer", "metric", "zscore", "group"), f"layer groups of {model}")
        for metric, rows in df.groupby("metric", sort=False):
            color = metrics.setdefault(metric, _PALETTE[len(metrics) % len(_PALETTE)])
            fig.add_trace(go.Scatter(name=metric, x=rows["layer"], y=rows["zscore"], mode="lines+markers",
                                     legendgroup=metric, showlegend=col == 1, line=dict(color=color)), 1, col)
        middle = df.loc[df["group"] == "middle", "layer"]
        if len(middle):
            fig.add_vrect(x0=middle.min() - 0.5, x1=middle.max() + 0.5, fillcolor="grey", opacity=0.15, line_width=0,
                          row=1, col=col)
        fig.update_xaxes(title_text="MoE layer", row=1, col=col)
    fig.update_yaxes(title_text="z-score over layers", row=1, col=1)
    return fig.update_layout(title="routing over depth and the layer groups it implies (middle group shaded)")


def ratio_figure(df: pd.DataFrame, ratio: str = "vs_on_demand_lru") -> go.Figure:
    """Each policy's decode throughput as a ratio (`ratio`: vs_on_demand_lru, vs_belady, vs_ceiling, vs_resident; ratios
    within one run), one group of bars per cell (model, budget, batch), and the line ratio = 1. Rows without
    the ratio (the reference rows) are left out; one row per (model, budget, batch, policy)."""
    where = provenance(df)
    _require(df, ("model", "policy", "budget", "batch", ratio), "comparison table")
    rows = df.dropna(subset=[ratio])
    _require(rows, (ratio,), f"comparison table with {ratio}")
    _unique_rows(rows, ["model", "budget", "batch", "policy"], "comparison table")
    cell = rows["model"] + " " + rows["budget"].map("{:.0%}".format) + " b" + rows["batch"].astype(str)
    fig = go.Figure([go.Bar(name=str(policy), x=cell[group.index], y=group[ratio])
                     for policy, group in rows.groupby("policy", sort=False)])
    fig.add_hline(y=1.0, line=dict(color="black", dash="dot"))
    fig.update_layout(barmode="group", title=f"decode throughput, {ratio.replace('_', ' ')} (same run)",
                      yaxis_title=ratio, legend_title="policy")
    return _annotate(fig, where)


def fidelity_figure(df: pd.DataFrame, label: str = "policy") -> go.Figure:
    """Simulated against measured per-step latency, one point per cell, with the y = x line and the
    ±`tolerance` band. Columns: measured_ms, simulated_ms, `label` (colours); `df.attrs["profile"]` names
    the simulator's profile, `df.attrs["measured_on"]` the device; `df.attrs["tolerance"]` (default 0.15)."""
    _require(df, ("measured_ms", "simulated_ms", label), "fidelity table")
    missing = [k for k in ("measured_on", "profile") if not df.attrs.get(k)]
    if missing:
        raise ProvenanceError(f"fidelity table: set {missing} in df.attrs (the measuring device, the simulator's profile)")
    tolerance = float(df.attrs.get("tolerance", 0.15))
    top = float(max(df["measured_ms"].max(), df["simulated_ms"].max())) * 1.1
    bottom = float(min(df["measured_ms"].min(), df["simulated_ms"].min())) / 1.1
    span = [bottom, top]
    fig = go.Figure([go.Scatter(name=str(name), x=rows["measured_ms"], y=rows["simulated_ms"], mode="markers",
                                text=rows.get("cell"), marker=dict(size=9))
                     for name, rows in df.groupby(label, sort=False)])
    fig.add_trace(go.Scatter(name="simulated = measured", x=span, y=span, mode="lines", line=dict(color="black")))
    for f, name in ((1 + tolerance, f"±{tolerance:.0%}"), (1 - tolerance, None)):
        fig.add_trace(go.Scatter(name=name, x=span, y=[v * f for v in span], mode="lines", showlegend=name is not None,
                                 legendgroup="band", line=dict(color="grey", dash="dot")))
    fig.update_layout(title="simulator fidelity: median decode step", xaxis=dict(title="measured (ms)", type="log"),
                      yaxis=dict(title="simulated (ms)", type="log"), legend_title=label)
    return _annotate(fig, f"measured on {df.attrs['measured_on']}; simulated on {df.attrs['profile']}")
