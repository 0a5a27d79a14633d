"""Record a notebook's metrics once, so people see them and the report runner can read them back.

Every notebook ends with one `record_metrics(source=..., config=..., **metrics)` call. The record holds
the metrics (scalars), the config that produced them, the git revision of the code, the hardware
profile and whether the numbers were measured on this host or simulated on a profile. It is

- displayed as a JSON mime bundle (`application/json`, wrapped under the key `MARKER`) with a readable
  text/plain fallback, so an executed notebook carries it in its outputs (`read_metrics(path)`);
- written as JSON, atomically, to the file named by the environment variable `PRESCOPE_METRICS_PATH`
  when that is set (for runners other than `prescope.workbench.reports`).

Files are written through `prescope.files.write_json` (atomic, checksummed).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prescope.files import git_revision, write_json
from prescope.timeline import SOURCES, measured_profile

METRICS_PATH_ENV = "PRESCOPE_METRICS_PATH"
METRICS_MIME = "application/json"
MARKER = "prescope_metrics"
Scalar = int | float | str | bool | None


class MetricsError(ValueError):
    """Metrics that cannot be recorded or read back; the message names the metric or file."""


@dataclass(frozen=True)
class MetricsRecord:
    """One notebook run's metrics with their provenance (JSON-safe)."""

    metrics: dict[str, Scalar]
    source: str
    profile: str
    config: dict[str, Any] = field(default_factory=dict)
    git_revision: str = "unknown"
    recorded_at: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise MetricsError(f"source={self.source!r}: expected one of {SOURCES}")
        if not isinstance(self.profile, str) or not self.profile:
            raise MetricsError(f"profile={self.profile!r}: expected a non-empty hardware profile name")
        object.__setattr__(self, "metrics", {str(k): _scalar(k, v) for k, v in self.metrics.items()})
        object.__setattr__(self, "config", _json_safe(self.config))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetricsRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted({"metrics", "source", "profile"} - set(d))
        if missing:
            raise MetricsError(f"metrics record is missing {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def summary(self) -> str:
        """A readable block: provenance line, then one `name = value` line per metric."""
        head = f"metrics ({self.source} on {self.profile}, git {self.git_revision[:12]})"
        return "\n".join([head] + [f"  {k} = {v}" for k, v in self.metrics.items()])


def _scalar(name: str, value: Any) -> Scalar:
    """Numbers, strings, booleans or None; numpy/torch 0-d values are unwrapped with `.item()`."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if value is not None and not isinstance(value, int | float | str | bool):
        raise MetricsError(f"metric {name!r} is a {type(value).__name__}: record scalars "
                           "(int, float, str, bool or None) so results fit one row of a table")
    if isinstance(value, float) and not math.isfinite(value):
        raise MetricsError(f"metric {name!r} is {value}: record None for an undefined metric")
    return value


def _json_safe(config: Any) -> dict[str, Any]:
    """A plain dict from a mapping or a dataclass; values JSON can't hold (paths, dtypes) become strings."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise MetricsError(f"config is a {type(config).__name__}: expected a mapping or a dataclass")
    return json.loads(json.dumps(dict(config), default=str))


def record_metrics(*, source: str, profile: str | None = None, config: Any = None,
                   **metrics: Scalar) -> None:
    """Record the notebook's metrics: display them as a marked JSON bundle and write them if asked.

    `source` is "measured" (numbers from running real code on this host) or "simulated" (from the cost
    model on `profile`); `profile` defaults to `timeline.measured_profile()` (this host); `config` is the notebook's parameters
    (a mapping or a dataclass). Writes to `$PRESCOPE_METRICS_PATH` when that is set. Returns None, so
    a notebook's last line does not echo the record a second time.
    """
    record = MetricsRecord(metrics=metrics, source=source, profile=profile or measured_profile(),
                           config={} if config is None else config, git_revision=git_revision(),
                           recorded_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    target = os.environ.get(METRICS_PATH_ENV)
    if target:
        write_json(target, record.to_dict())
    _display(record)


def _display(record: MetricsRecord) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(record.summary())
        return
    display({METRICS_MIME: {MARKER: record.to_dict()}, "text/plain": record.summary()}, raw=True)


def metrics_in_notebook(nb: Mapping[str, Any]) -> MetricsRecord | None:
    """The last record displayed in a notebook's outputs (nbformat dict), or None."""
    found = None
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            bundle = out.get("data", {}).get(METRICS_MIME)
            if isinstance(bundle, Mapping) and MARKER in bundle:
                found = MetricsRecord.from_dict(bundle[MARKER])
    return found


def read_metrics(executed_notebook_path: str | Path) -> MetricsRecord:
    """The metrics an executed notebook recorded; MetricsError if it recorded none."""
    path = Path(executed_notebook_path)
    record = metrics_in_notebook(json.loads(path.read_text(encoding="utf-8")))
    if record is None:
        raise MetricsError(f"{path}: no recorded metrics; the notebook must end with record_metrics(...)")
    return record
