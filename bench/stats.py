"""Repetitions of one measurement, summarised as the median and the spread.

The machine is noisy, so a figure is never a single sample: every metric
keeps all of its samples, and the report shows the median with min..max.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Metric:
    """Samples of one quantity (e.g. MiB/s of one job on one target), in one unit."""

    unit: str
    higher_is_better: bool = True
    samples: list[float] = field(default_factory=list)

    def add(self, value: float | None) -> None:
        if value is not None:
            self.samples.append(float(value))

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def spread(self) -> tuple[float, float] | None:
        return (min(self.samples), max(self.samples)) if self.samples else None

    def to_json(self) -> dict[str, Any]:
        spread = self.spread
        return {
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "samples": [round(s, 6) for s in self.samples],
            "median": None if self.median is None else round(self.median, 6),
            "min": None if spread is None else round(spread[0], 6),
            "max": None if spread is None else round(spread[1], 6),
        }


@dataclass
class Result:
    """All repetitions of one job on one target: its parameters, metrics and any errors."""

    suite: str  # fio, smallfiles, checkpoint, degraded
    job: str
    target: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def metric(self, name: str, unit: str, higher_is_better: bool = True) -> Metric:
        if name not in self.metrics:
            self.metrics[name] = Metric(unit, higher_is_better)
        return self.metrics[name]

    def median(self, name: str) -> float | None:
        metric = self.metrics.get(name)
        return metric.median if metric else None

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "job": self.job,
            "target": self.target,
            "params": self.params,
            "metrics": {name: m.to_json() for name, m in self.metrics.items()},
            "errors": self.errors,
            "notes": self.notes,
        }
