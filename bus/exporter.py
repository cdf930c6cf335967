"""Prometheus text exposition of the nodes' :class:`bus.metrics.Metrics`, over HTTP.

A custom collector reads every node's snapshot on each scrape (nothing is copied in between),
so the numbers are the ones ``Metrics`` holds. Every series carries a ``province`` label.
Consumer lag is read from :meth:`Node.lag` in the nodes' event loop when the scrape runs in
another thread (the HTTP server's), with a short timeout; otherwise it is left out.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Protocol

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bus.metrics import LATENCY_BUCKETS_S, Metrics
from bus.transport import Partition

log = structlog.get_logger(__name__)

LAG_TIMEOUT_S = 2.0
"""Longest a scrape waits for one node's consumer lag."""

COUNTERS: dict[str, tuple[str, str]] = {
    "xsettle_messages_in_total": ("family", "Messages decoded from the inbox, by family."),
    "xsettle_messages_out_total": ("family", "Records produced, by topic family."),
    "xsettle_answers_total": ("outcome", "Answers to this node's requests, by outcome."),
    "xsettle_errors_total": ("code", "ErrorReports this node sent, by code."),
    "xsettle_dead_letters_total": ("kind", "Records dead-lettered, by decode error kind."),
    "xsettle_duplicates_total": ("family", "Messages received again and not handled twice."),
    "xsettle_worker_crashes_total": ("task", "Workers that died of an unexpected error."),
}
"""Exported counters: name → (its one label besides ``province``, help text)."""

GAUGES: dict[str, str] = {
    "xsettle_pending_requests": "Requests sent and still waiting for an answer.",
    "xsettle_outbox_records": "Records committed and not yet acknowledged by the broker.",
    "xsettle_stalled_partitions": "Inbox partitions whose record in hand is over 60 s old.",
    "xsettle_claims_overdue": "The host's claims past their deadline with no answer.",
}
"""Exported gauges (label ``province``): name → help text. A node that does not register
one (``xsettle_claims_overdue`` comes from the host role) has no series of it."""

HISTOGRAMS: dict[str, tuple[str, str]] = {
    "xsettle_answer_latency_seconds": (
        "family",
        "Time from first send of a request to its terminal answer.",
    ),
}
"""Exported histograms: name → (label besides ``province``, help text)."""


class MetricsSource(Protocol):
    """What the exporter needs of a node: its province and metrics (``bus.node.Node``)."""

    province: str
    metrics: Metrics


@dataclass(frozen=True, slots=True)
class _Snap:
    counters: list[tuple[str, dict[str, str], int]]
    gauges: dict[str, float]
    histograms: list[tuple[str, dict[str, str], list[int], float, int]]


def _snapshot(metrics: Metrics) -> _Snap:
    """Copy the metrics; retried when the event loop changed a dict under our feet."""
    for _ in range(5):
        try:
            counters = [(n, dict(lbl), v) for (n, lbl), v in list(metrics.counters.items())]
            hists = [
                (n, dict(lbl), list(h.counts), h.total, h.n)
                for (n, lbl), h in list(metrics.histograms.items())
            ]
            gauges: dict[str, float] = {}
            for name, read in list(metrics.gauges.items()):
                try:
                    gauges[name] = float(read())
                except Exception as exc:  # a gauge must never break a scrape
                    log.warning("gauge_failed", gauge=name, error=repr(exc))
            return _Snap(counters, gauges, hists)
        except RuntimeError:  # dictionary changed size during iteration
            continue
    return _Snap([], {}, [])


def cumulative(counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (last: above the largest bound) as Prometheus cumulative buckets."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), counts, strict=False):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
    return out


class NodeCollector:
    """Collects the metrics of the given nodes at every scrape."""

    def __init__(
        self, nodes: Iterable[MetricsSource], loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._nodes = list(nodes)
        self._loop = loop

    def add(self, node: MetricsSource) -> None:
        """Export one more node."""
        self._nodes.append(node)

    def _lag(self, node: MetricsSource) -> dict[Partition, int] | None:
        lag = getattr(node, "lag", None)
        loop = self._loop
        if lag is None or loop is None or not loop.is_running():
            return None
        try:
            if asyncio.get_running_loop() is loop:
                return None  # would deadlock: the scrape runs inside the nodes' loop
        except RuntimeError:
            pass
        try:
            fut = asyncio.run_coroutine_threadsafe(lag(), loop)
            result: dict[Partition, int] = fut.result(LAG_TIMEOUT_S)
        except Exception as exc:
            log.debug("lag_unavailable", province=node.province, error=repr(exc))
            return None
        return result

    def collect(self) -> Iterator[Metric]:
        """One scrape: every metric family, every node."""
        counters = {
            name: CounterMetricFamily(name, text, labels=["province", label])
            for name, (label, text) in COUNTERS.items()
        }
        hists = {
            name: HistogramMetricFamily(name, text, labels=["province", label])
            for name, (label, text) in HISTOGRAMS.items()
        }
        gauges = {
            name: GaugeMetricFamily(name, text, labels=["province"])
            for name, text in GAUGES.items()
        }
        lag_family = GaugeMetricFamily(
            "xsettle_consumer_lag",
            "Inbox records not yet read, per topic partition.",
            labels=["province", "topic", "partition"],
        )
        for node in self._nodes:
            snap = _snapshot(node.metrics)
            for name, labels, value in snap.counters:
                if name in counters:
                    label = COUNTERS[name][0]
                    counters[name].add_metric([node.province, labels.get(label, "")], value)
            for name, labels, counts, total, _n in snap.histograms:
                if name in hists:
                    label = HISTOGRAMS[name][0]
                    hists[name].add_metric(
                        [node.province, labels.get(label, "")], cumulative(counts), total
                    )
            for name, reading in snap.gauges.items():
                if name in gauges:
                    gauges[name].add_metric([node.province], reading)
            lags = self._lag(node)
            for part, value in sorted((lags or {}).items(), key=lambda x: str(x[0])):
                lag_family.add_metric([node.province, part.topic, str(part.partition)], value)
        yield from counters.values()
        yield from gauges.values()
        yield from hists.values()
        yield lag_family


def registry_for(
    nodes: Iterable[MetricsSource], loop: asyncio.AbstractEventLoop | None = None
) -> tuple[CollectorRegistry, NodeCollector]:
    """A fresh registry (not the global default) holding a collector of ``nodes``."""
    registry = CollectorRegistry(auto_describe=False)
    collector = NodeCollector(nodes, loop)
    registry.register(collector)
    return registry, collector


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)


CONTENT_TYPE = CONTENT_TYPE_LATEST
"""Content type of the text exposition."""


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _MetricsHandler(BaseHTTPRequestHandler):
    registry: ClassVar[CollectorRegistry]

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/", "/metrics"):
            self.send_error(404)
            return
        body = render(self.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


def start_exporter(
    nodes: Iterable[MetricsSource], host: str = "127.0.0.1", port: int = 0
) -> tuple[ThreadingHTTPServer, int]:
    """Serve ``/metrics`` for ``nodes`` from a daemon thread; returns (server, port).

    Call it from the nodes' event loop so consumer lag can be read; stop with
    ``server.shutdown(); server.server_close()``.
    """
    registry, _collector = registry_for(nodes, _running_loop())
    handler = type("MetricsHandler", (_MetricsHandler,), {"registry": registry})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="xsettle-exporter", daemon=True)
    thread.start()
    return server, int(server.server_address[1])
