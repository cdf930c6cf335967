"""Counters, gauges and latency histograms a node keeps, readable from code.

Plain Python, no exporter dependency: ``snapshot()`` gives everything as a dict, and the
Prometheus exporter in ``bus.exporter`` renders the same numbers. Names follow Prometheus
conventions (``xsettle_..._total``, ``_seconds``).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bus.constants import PROVINCE_RE

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
    600.0, 3600.0, 86400.0,
)  # fmt: skip
"""Answer latency buckets: instant settlement lives in milliseconds, delayed in hours to days."""

Labels = tuple[tuple[str, str], ...]
OTHER = "other"
"""The label value standing for anything that is not a province code (bounded cardinality)."""
ByLabel = Callable[[], Mapping[str, float]]
"""Reads a labelled gauge: its value for each value of its one label (a counterparty, say)."""


def province_label(value: str | None) -> str:
    """``value`` as a label value when it is a province code, else :data:`OTHER`: a field a
    sender wrote (an ErrorReport's ``responsible``) can never open a series of its own."""
    return value if value is not None and PROVINCE_RE.match(value) else OTHER


def _labels(labels: dict[str, str]) -> Labels:
    """The labels as a key, sorted by name: one label needs no sort, two one comparison
    (most series have one or two: a family and the counterparty, say)."""
    items = tuple(labels.items())
    if len(items) == 2:
        return items if items[0][0] < items[1][0] else (items[1], items[0])
    if len(items) > 2:
        return tuple(sorted(items))
    return items


@dataclass
class Histogram:
    """Cumulative bucket counts, sum and count, as Prometheus keeps them."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    """Observations per bucket (last: above the largest bound)."""
    total: float = 0.0
    """Sum of observed seconds."""
    n: int = 0
    """Number of observations."""

    def observe(self, seconds: float) -> None:
        """Add one observation."""
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.total += seconds
        self.n += 1

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (None without observations)."""
        if self.n == 0:
            return None
        rank = q * self.n
        seen = 0
        for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), self.counts, strict=True):
            seen += count
            if seen >= rank:
                return bound
        return float("inf")


class Metrics:
    """Counters by name and labels, gauges read on demand, latency histograms.

    Label values must come from small sets (province codes, families, error codes, kinds):
    never a person, claim or message id, or every one would be a series of its own.
    """

    def __init__(self) -> None:
        self.counters: Counter[tuple[str, Labels]] = Counter()
        self.histograms: dict[tuple[str, Labels], Histogram] = {}
        self.gauges: dict[str, Callable[[], float]] = {}
        self.gauges_by: dict[str, tuple[str, ByLabel]] = {}
        """Labelled gauges: name -> (their label, what reads them)."""

    def inc(self, name: str, n: int = 1, **labels: str) -> None:
        """Add ``n`` to counter ``name`` with ``labels``."""
        self.counters[(name, _labels(labels))] += n

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        """Record one latency observation."""
        key = (name, _labels(labels))
        hist = self.histograms.get(key)
        if hist is None:
            hist = self.histograms[key] = Histogram()
        hist.observe(seconds)

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """Register a gauge read when a snapshot is taken."""
        self.gauges[name] = read

    def gauge_by(self, name: str, label: str, read: ByLabel) -> None:
        """Register a gauge with one label, read when a snapshot is taken: ``read`` gives its
        value for each value of ``label`` it has (one series each)."""
        self.gauges_by[name] = (label, read)

    def get(self, name: str, **labels: str) -> int:
        """Current value of a counter summed over its series that have ``labels`` (0 if none
        was incremented): ``get("xsettle_answers_total", outcome="ok")`` counts the answers
        of every counterparty. Scans the counters: for tests and reports, not the hot path."""
        want = labels.items()
        return sum(
            value
            for (n, key), value in self.counters.items()
            if n == name and want <= dict(key).items()
        )

    def total(self, name: str) -> int:
        """Sum of a counter over all its labels."""
        return sum(v for (n, _), v in self.counters.items() if n == name)

    def snapshot(self) -> dict[str, object]:
        """Everything as plain data: counters, gauges, histograms."""
        return {
            "counters": [
                {"name": n, "labels": dict(lbl), "value": v}
                for (n, lbl), v in sorted(self.counters.items())
            ],
            "gauges": {n: read() for n, read in self.gauges.items()},
            "gauges_by": {
                n: {"label": label, "values": dict(read())}
                for n, (label, read) in self.gauges_by.items()
            },
            "histograms": [
                {
                    "name": n,
                    "labels": dict(lbl),
                    "count": h.n,
                    "sum": h.total,
                    "buckets": list(zip(LATENCY_BUCKETS_S, h.counts, strict=False)),
                }
                for (n, lbl), h in sorted(self.histograms.items())
            ],
        }
