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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from time import perf_counter

import pandas as pd
import plotly.graph_objects as go

from prescope.hardware.profiles import HardwareProfile, list_profiles, load_profile
from prescope.policies import POLICIES
from prescope.routing.trace import Trace
from prescope.workbench import steps, viz

MS_PER_S = 1e3
LINK_RANGE_GBPS = (1.0, 128.0)  # slider range: PCIe 3 x4 up to beyond PCIe 6 x16
BUDGET_STEP = 0.05
MAX_LOOKAHEAD = 6
FIGURE_HEIGHT_PX = 420


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
    title = (f"{state.policy} on {state.trace}, batch {state.batch_size}, budget {state.budget_share:.0%}: "
             f"steps {shown[0]}–{shown[-1]} of {len(result.summary)}")
    figure = viz.timeline_figure(result.timeline, steps=shown, title=title)
    figure.update_layout(height=FIGURE_HEIGHT_PX)
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
        "hit rate": round(row["hit_rate"], 3), "on-demand loads": row["loads_on_demand"],
        "prefetches": row["loads_prefetched"],
        "prefetch precision": None if row["prefetch_precision"] is None else round(row["prefetch_precision"], 3),
        "MB moved": round(row["mb_moved"], 1), "GPU idle share": round(row["gpu_idle_share"], 3),
        "steps replayed": row["steps"],
    }
    table = pd.DataFrame({"value": pd.Series(values, dtype=object)})
    table.index.name = "simulated"
    table.attrs.update(source="simulated", profile=profile.name)
    return table


class Dashboard:
    """Sliders and menus for a `DashboardState`; each change calls `dashboard_update` and redraws a
    FigureWidget and the summary in place. Display it as a notebook cell's value."""

    def __init__(self, traces: Mapping[str, Trace], state: DashboardState = DashboardState(),
                 profiles: Sequence[str] | None = None):
        import ipywidgets as w

        if not traces:
            raise DashboardError("the dashboard needs at least one trace")
        self.traces = dict(traces)
        state = state if state.trace in self.traces else replace(state, trace=next(iter(self.traces)))
        profiles = list(profiles or list_profiles())
        if state.profile not in profiles:
            profiles.append(state.profile)
        link = state.link_gbps or load_profile(state.profile).pinned_h2d.peak_gbps
        wide = {"style": {"description_width": "11em"}, "layout": w.Layout(width="30em")}
        self.controls = {
            "trace": w.Dropdown(options=list(self.traces), value=state.trace, description="trace", **wide),
            "policy": w.Dropdown(options=list(POLICIES), value=state.policy, description="policy", **wide),
            "profile": w.Dropdown(options=profiles, value=state.profile, description="hardware profile", **wide),
            "link_gbps": w.FloatSlider(value=link, min=LINK_RANGE_GBPS[0], max=LINK_RANGE_GBPS[1], step=0.5,
                                       description="link GB/s", continuous_update=False, **wide),
            "budget_share": w.FloatSlider(value=state.budget_share, min=BUDGET_STEP, max=1.0, step=BUDGET_STEP,
                                          description="expert budget (share)", continuous_update=False, **wide),
            "batch_size": w.IntSlider(value=state.batch_size, min=1, max=self._prompts(state.trace),
                                      description="batch size", continuous_update=False, **wide),
            "lookahead": w.IntSlider(value=state.lookahead, min=1, max=self._max_lookahead(state.trace),
                                     description="lookahead (layers)", continuous_update=False, **wide),
        }
        self.fixed = {"max_steps": state.max_steps, "show_steps": state.show_steps}
        self.figure = go.FigureWidget()
        self.table, self.status = w.HTML(), w.HTML()
        self.seconds: list[float] = []  # wall time of every update, for the benchmark and the status line
        self._quiet = False
        for control in self.controls.values():
            control.observe(self._changed, names="value")
        self.widget = w.HBox([w.VBox([*self.controls.values(), self.status]), w.VBox([self.figure, self.table])])
        self.update()

    def _prompts(self, trace: str) -> int:
        return int(self.traces[trace].tokens["prompt"].nunique())

    def _max_lookahead(self, trace: str) -> int:
        return max(1, min(MAX_LOOKAHEAD, self.traces[trace].layout.num_moe_layers - 1))

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
                self.controls["batch_size"].max = self._prompts(change["new"])
                self.controls["lookahead"].max = self._max_lookahead(change["new"])
            self.controls["lookahead"].disabled = not steps.takes_lookahead(self.controls["policy"].value)
        finally:
            self._quiet = False
        self.update()

    def update(self) -> None:
        """Recompute from the controls and redraw in place; an impossible state shows its error instead."""
        start = perf_counter()
        try:
            figure, summary = dashboard_update(self.state, self.traces)
        except ValueError as exc:  # DashboardError, SimulationError, ProfileError: say what to change
            self.status.value = f"<b style='color:#b00'>cannot simulate this:</b> {exc}"
            return
        with self.figure.batch_update():
            self.figure.data = ()
            self.figure.layout = figure.layout
        self.figure.add_traces(list(figure.data))
        self.table.value = summary.to_html()
        self.seconds.append(perf_counter() - start)
        self.status.value = f"simulated in {self.seconds[-1] * MS_PER_S:.0f} ms"

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def state_fields() -> list[str]:
    """The names of the dashboard's state, which are also the dashboard notebook's parameter names."""
    return [f.name for f in fields(DashboardState)]
