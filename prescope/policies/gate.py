"""PreScope's gate: whether predicting and planning a layer can shorten the step, or the layer runs on demand.

`Gate` is a part of `peers.PreScope` (and of the ceiling, its sibling in `limits.py`), kept apart for its size; it
reads the policy's `costs`, `options` (`layer_gate`, `measured_plan`, `measured_gate`), `plan_host_s`, `late`,
`lookahead`, `transfer_host()`, and keeps `slack` (the running gain of the step's shape), `meter` (the engine's
measured host time, `hostmeter.HostMeter`), `arbiter` (its measured step times, `arbiter.StepArbiter`), `layer`
and `on_demand` (the running layer and the gate's decision for it).

- `device_slack`: what prefetching could at most save at a layer run on demand (the rule before `plan_gain`, and
  the simulator's);
- `plan_gain`: what planning a layer saves net of its host time P, where the host hides the device (the engine);
- `speculation_pays`: the running gain over the last few layers is positive (the gate's decision);
- `host_measured`, `measured_plan_host`: P as the engine measures it;
- `step_measured`: the engine's step times, by which `arbiter.StepArbiter` checks the gate's decisions against
  planning every layer and planning none (`measured_gate`).
"""

from __future__ import annotations

import prescope.policies.arbiter as arbiter
import prescope.policies.lateplan as lateplan
import prescope.policies.presched as presched
from prescope.policies.base import LayerView
from prescope.policies.cache import ExpertCache


class Gate:
    """The gate's methods of a PreScope policy (module docstring)."""

    GATE_WEIGHT = 0.2  # weight of the newest layer in the running plan_gain (about the last 5 layers)

    def device_slack(self, view: LayerView, cache: ExpertCache) -> float:
        """What prediction and prefetching could at most save at this layer, run on demand (seconds; <= 0:
        nothing). A routed expert counts as a miss when it is absent or only there because a prefetch brought
        it (not used yet), with h = `transfer_host()` of host time to issue its load.

        Where the host hides the device (`costs.host_hides_device`, the engine: it syncs with the device once
        per layer, for the routing, and a layer's loads and kernels run while the host launches the next
        layer), the device's on-demand work minus the host's own time per layer: the routed experts' GPU time
        plus a load per miss, against `costs.host`, the launch of each routed expert (`costs.launch`, the
        fixed part of its GPU time: at decode the engine is launch-bound, so host and device both spend it)
        and h per miss. When the device takes less than that, a prefetch cannot make the step shorter.

        Where the host does not hide the device (the simulator: a layer's loads and kernels follow its host
        work), how much later the layer ends with its misses, split between the link and the CPU as fast as
        they go (presched.split_finishes), than with every routed expert resident (what perfect prefetching
        gives PreSched's split); h is not counted, since a prefetch costs the host as much as a load on demand.
        When misses cost nothing, because their loads land before the GPU needs them or the CPU runs them
        beside the GPU's work, there is nothing to prefetch for."""
        costs, layer, warm, h = self.costs, view.layer, cache.is_warm, self.transfer_host()
        misses = [e for e in view.experts if not warm((layer, e))]
        if costs.host_hides_device:
            device = sum(map(costs.gpu, view.tokens)) + len(misses) * costs.load
            return device - (costs.host + len(view.experts) * costs.launch + len(misses) * h)
        if not misses:
            return 0.0
        warm_keys = frozenset((layer, e) for e in view.experts if warm((layer, e)))
        every_key = frozenset((layer, e) for e in view.experts)
        finish = [min(presched.split_finishes(presched.Instance(
            layer, view.experts, view.tokens, (), costs.load, costs.gpu, costs.cpu, resident=keys,
            free_slots=len(misses), resident_on_cpu=True)).finishes) for keys in (warm_keys, every_key)]
        return finish[0] - finish[1]

    def host_measured(self, seconds: float) -> None:
        """Record the layer's measured host time, planned or run on demand by the gate (`hostmeter`)."""
        if self.costs is not None and self.gate and self.options.measured_plan and self.slack is not None:
            self.meter.record(self.layer, self.slack[0], not self.on_demand, seconds)

    def step_measured(self, seconds: float) -> None:
        """Record the measured time of the step that ran last, for the arbiter (`measured_gate`)."""
        if self.costs is not None and self.gate and self.options.measured_gate:
            self.arbiter.step_measured(seconds)

    def measured_plan_host(self) -> float | None:
        """P as this run measured it (`hostmeter.HostMeter.plan_host`), None where nothing was measured (the
        simulator: its host time is the profile's) or without `measured_plan`."""
        if not self.options.measured_plan or self.slack is None:
            return None
        return self.meter.plan_host(self.slack[0])

    def plan_gain(self, view: LayerView, cache: ExpertCache) -> float:
        """What predicting and planning are expected to save at this layer, net of their host time P
        (`plan_host_s`, else what this run measured, `measured_plan_host`, else `costs.plan`), in seconds (<= 0:
        running it on demand is as fast). The measured P follows the host the policy runs on: on the H200 a
        routing-only forecast run eagerly took 3-4.5 ms per layer against the profile's 0.5 ms, and the gate
        planned layers where its planning cost more than it saved.

        Where the host hides the device (the engine), per layer, with m the routed experts absent or only
        prefetched (as `device_slack` counts them) and h = `transfer_host()`: host = `costs.host` +
        K·`costs.launch` + m·h; device = the layer's own device work (the part of `costs.layer_gap` that is not
        the host's: attention, dense, a wave's fixed cost) + the routed experts' GPU time; link = m·`costs.load`.
        On demand the layer takes max(host, device + link) (the host syncs on the next layer's routing);
        planned, the host also spends P, and a load prefetched up to D = `lookahead` layers ahead runs beside
        those layers' work. The gain is the least of: device + link − (host + P), what the layer's device
        time on demand exceeds the planned host time by (negative where the host is the bottleneck); link,
        what prefetches could hide at all (none without misses: a layer without misses costs P, less what
        its device work hides of it); D·max(host + P, device), what D layers of the planned step can hide of
        a load. Planning at a layer pays at the next D (its prefetches), so a layer's misses count as what
        the plans before it could hide, and the device's own work per layer as the room that hides P.

        Where the host does not hide the device (the simulator), or with `layer_gate` (the rule before this
        one, kept to compare), `device_slack` − P.

        With `late_prefetch`, P in both rules is only the part of the planning host time that the layer's device
        work does not hide (`lateplan.unhidden`): the prediction's share where it stays before the launch (a
        forecast computed on the device, `lateplan.early_forecast`), plus what the rest exceeds the routed
        experts' kernels by (Σ gpu(n) + one wave's fixed time), since it runs once they are enqueued."""
        p = self.plan_host_s
        if p is None:
            measured = self.measured_plan_host()
            p = measured if measured is not None else self.costs.plan
        if self.late:
            p = lateplan.unhidden(self, view, p)
        costs = self.costs
        if not costs.host_hides_device or self.options.layer_gate:
            return self.device_slack(view, cache) - p
        warm = cache.is_warm
        misses = sum(not warm((view.layer, e)) for e in view.experts)
        host = costs.host + len(view.experts) * costs.launch + misses * self.transfer_host() + p
        device = max(0.0, costs.layer_gap - costs.host) + sum(map(costs.gpu, view.tokens))
        link = misses * costs.load
        return min(device + link - host, link, self.lookahead * max(host, device))

    def speculation_pays(self, view: LayerView, cache: ExpertCache) -> bool:
        """The gate: the running `plan_gain` of this step's shape (restarted when the step's tokens change,
        e.g. from prefill to decode; the newest layer weighs GATE_WEIGHT) is positive: over the last few
        layers, planning saves more than it costs the host. Where the host hides the device, zero too: there
        it means planning hid behind the device's own work and no miss asked for it, so it costs nothing and
        may still prefetch for the layers after this one (the simulator's branch and `layer_gate` keep the
        strict rule). Where the executor measures steps (`measured_gate`), a step the arbiter gives to
        "planned" plans every layer and one it gives to "demand" none (`arbiter.StepArbiter`: the gate's
        decisions against planning everywhere and nowhere, by measured step time); those steps also measure P,
        so the meter's probes of single layers (`HostMeter.probe`) run only without it."""
        shape = sum(view.tokens)
        arm = self.arbiter.arm(view.step, shape) if self.options.measured_gate else arbiter.GATED
        if arm != arbiter.GATED:  # every layer planned, or every layer on demand
            if self.slack is None or self.slack[0] != shape:  # the meter counts the layer at this shape
                self.slack = (shape, 0.0)
            return arm == arbiter.PLANNED
        x = self.plan_gain(view, cache)
        if self.slack is None or self.slack[0] != shape:
            self.slack = (shape, x)
        else:
            self.slack = (shape, self.slack[1] + self.GATE_WEIGHT * (x - self.slack[1]))
        tie = self.slack[1] == 0.0 and self.costs.host_hides_device and not self.options.layer_gate
        pays = self.slack[1] > 0.0 or tie
        if self.options.measured_gate and self.arbiter.measured:  # the arbiter's planned steps measure P
            return pays
        return self.meter.probe(shape, pays)
