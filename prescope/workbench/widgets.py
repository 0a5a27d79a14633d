"""ipywidgets front ends: the what-if dashboard, whose controls re-run the trace-replay simulator and redraw.

`dashboard_update(state, traces) -> (figure, summary)` is the whole computation, a pure function of a
`DashboardState` (trace, policy, hardware profile, link bandwidth, expert budget, batch size, lookahead
distance) and the traces to choose from: it replays the trace through the policy (`simulator.replay`) on
the profile, rescaled to the link bandwidth asked for (`profiles.scale_profile`), and returns the timeline
figure of the last steps (`viz.timeline_figure`) and a one-column summary table. `Dashboard` wires sliders
and menus to it and updates one `plotly.graph_objects.FigureWidget` in place, so moving a slider redraws
the figure without re-creating the widget. Every number it shows is simulated, on the named profile.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from time import perf_counter

import pandas as pd
import plotly.graph_objects as go

from prescope.hardware.profiles import HardwareProfile, list_profiles, load_profile
from prescope.policies import POLICIES
from prescope.routing.trace import Trace
from prescope.workbench import steps, viz

MS_PER_S = 1e3
LINK_RANGE_GBPS = (1.0, 128.0)  # slider range: PCIe 3 x4 up to beyond PCIe 6 x16
LINK_STEP_GBPS = 0.01  # fine enough to hold a profile's own measured peak (55.27 GB/s) exactly as shown
BUDGET_STEP = 0.01
MAX_LOOKAHEAD = 6
FIGURE_HEIGHT_PX = 460
# Controls sit in a grid of columns at least this wide (two side by side in a notebook 1400 px wide, one on a
# narrow screen), each label wide enough for "expert budget (share)", each readout for "128.00" or "100%"
CONTROL_MIN_WIDTH = "25em"
LABEL_WIDTH = "11em"
READOUT = {"link_gbps": ".2f", "budget_share": ".0%"}  # d3 formats: 55.27, 128.00, 25%
ON_A_STEP = 1e-6  # a value this close to a multiple of a slider's step is on that step (float rounding)


class DashboardError(ValueError):
    """A dashboard state that cannot be simulated; the message says which control and what is allowed."""


@dataclass(frozen=True)
class DashboardState:
    """What the dashboard's controls say.

    trace: name of a trace among those the dashboard was given; policy: a name of `policies.POLICIES`;
    profile: a built-in hardware profile name or a profile JSON path; link_gbps: pinned host-to-device
    bandwidth in GB/s (0 = the profile's own); budget_share: share of all L·E experts the GPU holds;
    batch_size: prompts decoded together; lookahead: layers predicted ahead (policies that predict);
    max_steps: forward calls replayed; show_steps: the last this many of them are drawn.
    """

    trace: str = "prescope-tiny"
    policy: str = "prescope"
    profile: str = "h200"
    link_gbps: float = 0.0
    budget_share: float = 0.25
    batch_size: int = 1
    lookahead: int = 2
    max_steps: int = 32
    show_steps: int = 2

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise DashboardError(f"policy {self.policy!r}: choose one of {sorted(POLICIES)}")
        if not 0.0 < self.budget_share <= 1.0:
            raise DashboardError(f"budget_share must be in (0, 1], got {self.budget_share}")
        if self.link_gbps < 0:
            raise DashboardError(f"link_gbps must be >= 0 (0 = the profile's own), got {self.link_gbps}")
        for name in ("batch_size", "lookahead", "max_steps", "show_steps"):
            if getattr(self, name) < 1:
                raise DashboardError(f"{name} must be >= 1, got {getattr(self, name)}")


def out_of_range(state: DashboardState, trace: Trace) -> list[str]:
    """What in `state` the controls cannot show for `trace` (a slider would clamp it without a word)."""
    prompts, deepest = _prompts(trace), _max_lookahead(trace)
    problems = []
    if state.link_gbps and not LINK_RANGE_GBPS[0] <= state.link_gbps <= LINK_RANGE_GBPS[1]:
        problems.append(f"link_gbps {state.link_gbps:g}: the link slider spans {LINK_RANGE_GBPS[0]:g}-"
                        f"{LINK_RANGE_GBPS[1]:g} GB/s (0 = the profile's own)")
    if state.batch_size > prompts:
        problems.append(f"batch_size {state.batch_size}: the trace {state.trace!r} has {prompts} prompts, so 1-{prompts}")
    if state.lookahead > deepest:
        problems.append(f"lookahead {state.lookahead}: at most {deepest} layers ahead for {state.trace!r}")
    steps_of_budget = state.budget_share / BUDGET_STEP
    if state.budget_share < BUDGET_STEP or abs(steps_of_budget - round(steps_of_budget)) > ON_A_STEP:
        problems.append(f"budget_share {state.budget_share:g}: the budget slider moves from {BUDGET_STEP:g} to 1 "
                        f"in steps of {BUDGET_STEP:g}")
    return problems


def _prompts(trace: Trace) -> int:
    return int(trace.tokens["prompt"].nunique())


def _max_lookahead(trace: Trace) -> int:
    return max(1, min(MAX_LOOKAHEAD, trace.layout.num_moe_layers - 1))


def dashboard_update(state: DashboardState, traces: Mapping[str, Trace]) -> tuple[go.Figure, pd.DataFrame]:
    """Replay `traces[state.trace]` as `state` says; returns (timeline figure of the last `show_steps`
    steps, summary table: one `value` per quantity, attrs source "simulated" and the profile)."""
    if state.trace not in traces:
        raise DashboardError(f"trace {state.trace!r}: choose one of {sorted(traces)}")
    trace = traces[state.trace]
    profile = steps.what_if_profile(state.profile, state.link_gbps)
    lookahead = state.lookahead if steps.takes_lookahead(state.policy) else None
    result = steps.simulate(trace, state.policy, profile, budget_share=state.budget_share,
                            batch_size=state.batch_size, max_steps=state.max_steps, lookahead=lookahead)
    shown = sorted(result.timeline["step"].unique())[-state.show_steps:]
    title = (f"{state.policy}, batch {state.batch_size}, budget {state.budget_share:.0%}: "
             f"steps {shown[0]}–{shown[-1]} of {len(result.summary)}")
    figure = viz.timeline_figure(result.timeline, steps=shown, title=title)
    figure.update_layout(height=FIGURE_HEIGHT_PX, title_font_size=14)
    return figure, summary_table(state, result, profile, lookahead)


def summary_table(state: DashboardState, result, profile: HardwareProfile, lookahead: int | None) -> pd.DataFrame:
    """The quantities the dashboard lists under its figure, from one replay."""
    row = steps.result_row(result.totals)
    config = result.config
    values = {
        "policy": state.policy, "trace": state.trace, "profile": profile.name,
        "link GB/s (pinned peak)": round(profile.pinned_h2d.peak_gbps, 2),
        "GPU expert slots": f"{config['budget_slots']} ({config['budget_share']:.0%} of all experts)",
        "batch size": state.batch_size, "lookahead": lookahead if lookahead is not None else "n/a",
        "AsyncIO priority link": config["async_io"],
        "tokens/s": round(row["tokens_per_s"], 1), "decode step (ms)": round(row["latency_ms"], 3),
        "lower bound step (ms)": round(row["bound_latency_ms"], 3),
        "bound / achieved": round(result.totals["lower_bound_share"], 3),
        "host work per step (ms)": round(row["host_ms"], 3),
        "hit rate": round(row["hit_rate"], 3), "on-demand loads": row["loads_on_demand"],
        "prefetches": row["loads_prefetched"],
        "prefetch precision": None if row["prefetch_precision"] is None else round(row["prefetch_precision"], 3),
        "layers the gate ran on demand": "n/a" if pd.isna(row["gate_on_demand_share"])
        else f"{row['gate_on_demand_share']:.0%}",
        "MB moved": round(row["mb_moved"], 1), "GPU idle share": round(row["gpu_idle_share"], 3),
        "steps replayed": row["steps"],
    }
    table = pd.DataFrame({"value": pd.Series(values, dtype=object)})
    table.index.name = "simulated"
    table.attrs.update(source="simulated", profile=profile.name)
    return table


class Dashboard:
    """Sliders and menus for a `DashboardState`; each change calls `dashboard_update` and redraws a
    FigureWidget and the summary in place. Display it as a notebook cell's value; where no widget can be
    drawn (a rendered report, offline) the cell shows the state it was displayed in (`static_html`).

    A state the controls cannot show (a batch larger than the trace's prompts, a link outside the slider) is
    refused with a DashboardError rather than clamped; a control clamped later (another trace with fewer
    prompts) says so in the status line."""

    def __init__(self, traces: Mapping[str, Trace], state: DashboardState = DashboardState(),
                 profiles: Sequence[str] | None = None):
        import ipywidgets as w

        if not traces:
            raise DashboardError("the dashboard needs at least one trace")
        self.traces = dict(traces)
        if state.trace not in self.traces:
            raise DashboardError(f"trace {state.trace!r}: choose one of {sorted(self.traces)}")
        problems = out_of_range(state, self.traces[state.trace])
        if problems:
            raise DashboardError("the dashboard cannot show " + "; ".join(problems))
        profiles = list(profiles or list_profiles())
        if state.profile not in profiles:
            profiles.append(state.profile)
        link = state.link_gbps or load_profile(state.profile).pinned_h2d.peak_gbps

        def styled(**extra):
            return {"style": {"description_width": LABEL_WIDTH},
                    "layout": w.Layout(width="auto", min_width=CONTROL_MIN_WIDTH), **extra}

        slider = styled(continuous_update=False)
        self.controls = {
            "trace": w.Dropdown(options=list(self.traces), value=state.trace, description="trace", **styled()),
            "policy": w.Dropdown(options=list(POLICIES), value=state.policy, description="policy", **styled()),
            "profile": w.Dropdown(options=profiles, value=state.profile, description="hardware profile", **styled()),
            "link_gbps": w.FloatSlider(value=link, min=LINK_RANGE_GBPS[0], max=LINK_RANGE_GBPS[1], step=LINK_STEP_GBPS,
                                       description="link GB/s", readout_format=READOUT["link_gbps"], **slider),
            "budget_share": w.FloatSlider(value=state.budget_share, min=BUDGET_STEP, max=1.0, step=BUDGET_STEP,
                                          description="expert budget (share)",
                                          readout_format=READOUT["budget_share"], **slider),
            "batch_size": w.IntSlider(value=state.batch_size, min=1, max=max(2, _prompts(self.traces[state.trace])),
                                      description="batch size", **slider),
            "lookahead": w.IntSlider(value=state.lookahead, min=1, max=_max_lookahead(self.traces[state.trace]),
                                     description="lookahead (layers)", **slider),
        }
        self.fixed = {"max_steps": state.max_steps, "show_steps": state.show_steps}
        self.figure = go.FigureWidget(layout={"height": FIGURE_HEIGHT_PX})
        self.table, self.status = w.HTML(), w.HTML()
        self.summary: pd.DataFrame | None = None
        self.seconds: list[float] = []  # wall time of every update, for the benchmark and the status line
        self.notes: list[str] = []  # what the last change did beyond itself (a clamped control), for the status
        self._quiet = False
        for control in self.controls.values():
            control.observe(self._changed, names="value")
        grid = w.GridBox(list(self.controls.values()), layout=w.Layout(
            grid_template_columns=f"repeat(auto-fill, minmax({CONTROL_MIN_WIDTH}, 1fr))", grid_gap="0.2em 2em",
            width="100%"))
        self.widget = w.VBox([grid, self.status, self.figure, self.table], layout=w.Layout(width="100%"))
        self._batch_range()
        self.update()

    def _batch_range(self) -> None:
        """A trace of one prompt has one batch size: its slider is shown at 1 and disabled (a slider from 1 to
        1 would draw no readout)."""
        batch = self.controls["batch_size"]
        prompts = _prompts(self.traces[self.controls["trace"].value])
        before = batch.value
        batch.max, batch.disabled = max(2, prompts), prompts < 2
        batch.value = min(batch.value, prompts)
        if batch.value != before:
            self.notes.append(f"batch size set to {batch.value}: the trace has {prompts} prompts")

    @property
    def state(self) -> DashboardState:
        values = {name: c.value for name, c in self.controls.items()}
        return DashboardState(**{**values, **self.fixed})

    def _changed(self, change) -> None:
        if self._quiet:
            return
        self._quiet = True  # the adjustments below would each trigger an update of their own
        try:
            owner = change["owner"]
            if owner is self.controls["profile"]:
                self.controls["link_gbps"].value = load_profile(change["new"]).pinned_h2d.peak_gbps
            elif owner is self.controls["trace"]:
                self._batch_range()
                lookahead, deepest = self.controls["lookahead"], _max_lookahead(self.traces[change["new"]])
                if lookahead.value > deepest:
                    self.notes.append(f"lookahead set to {deepest}: the trace has {deepest + 1} MoE layers")
                lookahead.max = deepest
            self.controls["lookahead"].disabled = not steps.takes_lookahead(self.controls["policy"].value)
        finally:
            self._quiet = False
        self.update()

    def update(self) -> None:
        """Recompute from the controls and redraw in place; an impossible state shows its error instead."""
        start = perf_counter()
        notes, self.notes = self.notes, []
        try:
            figure, summary = dashboard_update(self.state, self.traces)
        except ValueError as exc:  # DashboardError, SimulationError, ProfileError: say what to change
            self.status.value = f"<b style='color:#b00'>cannot simulate this:</b> {html.escape(str(exc))}"
            return
        with self.figure.batch_update():
            self.figure.data = ()
            self.figure.layout = figure.layout
        self.figure.add_traces(list(figure.data))
        self.summary = summary
        self.table.value = summary.to_html()
        self.seconds.append(perf_counter() - start)
        self.status.value = "; ".join([f"simulated in {self.seconds[-1] * MS_PER_S:.0f} ms",
                                       *map(html.escape, notes)])

    def static_html(self) -> str:
        """The dashboard as last drawn, without widgets: its controls' values, the figure (a plotly div that
        needs plotly.js on the page) and the summary, for reports and viewers without a kernel."""
        import plotly.io as pio

        values = ", ".join(f"{c.description} = {html.escape(str(c.value))}" for c in self.controls.values())
        figure = pio.to_html(go.Figure(self.figure), include_plotlyjs=False, full_html=False,
                             default_height=f"{FIGURE_HEIGHT_PX}px")
        return (f"<div class='prescope-dashboard-static'><p><b>The dashboard as drawn</b> (moving its controls needs "
                f"a live kernel): {values}.</p>{figure}{self.table.value}</div>")

    def _repr_mimebundle_(self, **kwargs):
        return {**self.widget._repr_mimebundle_(**kwargs), "text/html": self.static_html()}


def state_fields() -> list[str]:
    """The names of the dashboard's state, which are also the dashboard notebook's parameter names."""
    return [f.name for f in fields(DashboardState)]
