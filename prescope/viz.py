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
    "attention": "#B279A2", "dense": "#9D755D", "predict": "#72B7B2", "plan": "#EECA3B", "wait": "#BAB0AC",
}
BUBBLE_COLOR = "rgba(215, 25, 28, 0.45)"
BUBBLE_BAR_WIDTH = 0.3  # thinner than the operation bars, so a bubble over a `wait` bar stays visible
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


def _annotate(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, xref="paper", yref="paper", x=1, y=1, xanchor="right", yanchor="bottom",
                       showarrow=False, font=dict(size=12))
    return fig


def _check_timeline(df: pd.DataFrame) -> None:
    _require(df, tl.COLUMNS, "timeline")
    for column, allowed in (("lane", tl.LANES), ("kind", tl.KINDS)):
        bad = sorted(set(df[column]) - set(allowed))
        if bad:
            raise VizInputError(f"timeline: unknown {column} values {bad}; expected {allowed}")


def timeline_figure(timeline_df: pd.DataFrame, steps: int | Iterable[int] | None = None,
                    title: str | None = None) -> go.Figure:
    """Lanes pcie/gpu/cpu against time (ms from the first shown row), one bar per operation coloured by
    kind, and GPU bubbles (`timeline.bubbles`, hover: cause) as red stripes on the gpu lane.

    `timeline_df` follows the schema of `prescope.timeline` with attrs source and profile; `steps`
    selects one step or several.
    """
    where = provenance(timeline_df, attrs_only=True)
    _check_timeline(timeline_df)
    df = timeline_df
    if steps is not None:
        wanted = {steps} if isinstance(steps, int) else set(steps)
        df = df[df["step"].isin(wanted)]
        if df.empty:
            raise VizInputError(f"timeline: no rows for steps {sorted(wanted)}")
    t0 = df["start"].min()
    fig = go.Figure()
    hover = "%{y} %{fullData.name}<br>step %{customdata[0]}, layer %{customdata[1]}, expert %{customdata[2]}" \
            "<br>%{customdata[3]} tokens, %{customdata[4]:.3s}B<br>%{base:.3f} ms + %{x:.3f} ms<extra></extra>"
    for kind, color in KIND_COLORS.items():
        rows = df[df["kind"] == kind]
        if len(rows):
            fig.add_trace(go.Bar(name=kind, orientation="h", y=rows["lane"], base=(rows["start"] - t0) * MS_PER_S,
                                 x=(rows["end"] - rows["start"]) * MS_PER_S, marker_color=color,
                                 customdata=rows[["step", "layer", "expert", "tokens", "bytes"]].to_numpy(),
                                 hovertemplate=hover))
    gaps = tl.bubbles(df)
    if len(gaps):
        fig.add_trace(go.Bar(name=f"bubble (GPU idle, {gaps['duration'].sum() * MS_PER_S:.3g} ms)",
                             orientation="h", y=["gpu"] * len(gaps), base=(gaps["start"] - t0) * MS_PER_S,
                             x=gaps["duration"] * MS_PER_S, width=BUBBLE_BAR_WIDTH, marker_color=BUBBLE_COLOR,
                             customdata=gaps[["cause"]].to_numpy(),
                             hovertemplate="GPU idle %{x:.3f} ms: %{customdata[0]}<extra></extra>"))
    shown = sorted(df["step"].unique())
    fig.update_layout(barmode="overlay", title=title or f"timeline, steps {shown[0]}–{shown[-1]}",
                      xaxis_title="time (ms)", legend_title="kind",
                      yaxis=dict(categoryorder="array", categoryarray=list(reversed(tl.LANES))))
    return _annotate(fig, where)


ROUTING_PANELS = {  # key of stats_tables -> (panel title, columns it needs)
    "load": ("expert load share", ("layer", "expert", "share")),
    "skew": ("load entropy (1 = uniform)", ("layer", "entropy_norm")),
    "reuse": ("reuse of earlier tokens' experts", ("layer", "lag", "reuse", "random")),
}


def _routing_traces(key: str, df: pd.DataFrame) -> list[go.BaseTraceType]:
    if key == "load":
        z = df.pivot_table(index="layer", columns="expert", values="share", aggfunc="sum", fill_value=0.0)
        return [go.Heatmap(z=z.to_numpy(), x=z.columns, y=z.index, colorscale="Viridis", colorbar_title="share",
                           name="load")]
    if key == "skew":
        return [go.Scatter(x=df["entropy_norm"], y=df["layer"], mode="lines+markers", name="entropy")]
    lines = [go.Scatter(x=rows["reuse"], y=rows["layer"], mode="lines+markers", name=f"lag {lag}")
             for lag, rows in df.groupby("lag", sort=True)]
    baseline = float(df["random"].iloc[0])
    return lines + [go.Scatter(x=[baseline, baseline], y=[df["layer"].min(), df["layer"].max()], mode="lines",
                               line=dict(dash="dash", color="grey"), name="random routing")]


def routing_figure(stats_tables: Mapping[str, pd.DataFrame]) -> go.Figure:
    """Routing statistics per MoE layer, one panel per table given (layers on a shared y axis).

    Keys and columns (`prescope.routing_stats` produces the last two):
    "load": layer, expert, share (share of the layer's routed slots), drawn as a heatmap;
    "skew": layer, entropy_norm (`load_skew`);
    "reuse": layer, lag, reuse, random (`temporal_reuse`), one line per lag and the random baseline K/E.
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
    return fig.update_layout(title=f"routing of {model}")


def accuracy_heatmap(df: pd.DataFrame, metric: str = "recall_at_k") -> go.Figure:
    """Predictor accuracy per MoE layer × lookahead distance, one panel per predictor.

    Columns: predictor, layer, distance, and `metric` (e.g. recall_at_k, exact_match,
    recall_at_budget; one row per predictor, layer and distance).
    """
    _require(df, ("predictor", "layer", "distance", metric), "accuracy table")
    _unique_rows(df, ["predictor", "layer", "distance"], "accuracy table")
    predictors = list(dict.fromkeys(df["predictor"]))
    fig = make_subplots(rows=1, cols=len(predictors), subplot_titles=predictors, shared_yaxes=True)
    for col, name in enumerate(predictors, start=1):
        z = df[df["predictor"] == name].pivot(index="layer", columns="distance", values=metric)
        fig.add_trace(go.Heatmap(z=z.to_numpy(), x=z.columns, y=z.index, coloraxis="coloraxis",
                                 texttemplate="%{z:.2f}", name=name), 1, col)
        fig.update_xaxes(title_text="distance", dtick=1, row=1, col=col)
    unit_range = bool(df[metric].between(0, 1).all())
    fig.update_yaxes(title_text="MoE layer", row=1, col=1)
    return fig.update_layout(title=f"{metric} by layer and lookahead distance",
                             coloraxis=dict(colorscale="Viridis", cmin=0 if unit_range else None,
                                            cmax=1 if unit_range else None, colorbar_title=metric))


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
    fig = go.Figure([go.Bar(name=c, x=df.loc[df["cause"] == c, "policy"],
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
