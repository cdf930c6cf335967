"""Prometheus text exposition of the nodes' :class:`bus.metrics.Metrics`, over HTTP.

A custom collector reads every node's snapshot on each scrape (nothing is copied in between),
so the numbers are the ones ``Metrics`` holds. Every series carries a ``province`` label (the
node's own); what concerns another province carries it too, as ``counterparty`` (the province
asked, or that sent) or ``responsible`` (the province that must act): province codes only, so
the series stay few. Consumer lag is read from :meth:`Node.lag` in the nodes' event loop when
the scrape runs in another thread (the HTTP server's), with a short timeout; otherwise it is
left out. Each registry also serves ``xsettle_build_info`` and the process's own metrics
(``process_resident_memory_bytes``, ``process_cpu_seconds_total``, ``process_open_fds``,
``process_start_time_seconds``, ``python_info``) from prometheus_client's collectors.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import platform
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Protocol

import structlog
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bus.metrics import LATENCY_BUCKETS_S, Metrics
from bus.transport import Partition
from schemas import CONTRACT_VERSION

log = structlog.get_logger(__name__)

LAG_TIMEOUT_S = 2.0
"""Longest a scrape waits for one node's consumer lag."""


def _version() -> str:
    """The installed distribution's version (``0+unknown`` when not installed)."""
    try:
        return importlib.metadata.version("xsettle")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


BUILD: tuple[str, str, str] = (_version(), CONTRACT_VERSION, platform.python_version())
"""The labels of ``xsettle_build_info``: version, contract, python."""

COUNTERS: dict[str, tuple[tuple[str, ...], str]] = {
    "xsettle_messages_in_total": (
        ("family", "counterparty"),
        "Messages decoded from the inbox, by family and the province that sent them.",
    ),
    "xsettle_messages_out_total": (
        ("family", "counterparty"),
        "Records the broker acknowledged, by topic family and the province whose topic.",
    ),
    "xsettle_requests_sent_total": (
        ("family", "counterparty"),
        "Requests this node sent (re-sends not counted), by family and the province asked.",
    ),
    "xsettle_answers_total": (
        ("outcome", "counterparty"),
        "Answers to this node's requests, by outcome (deadline: none in time) and the "
        "province asked.",
    ),
    "xsettle_acknowledgements_total": (
        ("outcome", "counterparty"),
        "Acknowledgements of this node's requests, by outcome and the province asked.",
    ),
    "xsettle_resends_total": (
        ("counterparty",),
        "Requests sent again (an operator's or the unacknowledged re-send), by province asked.",
    ),
    "xsettle_unacknowledged_resends_total": (
        ("counterparty",),
        "Requests sent again because the province asked neither answered nor acknowledged.",
    ),
    "xsettle_deadline_failures_total": (
        ("counterparty",),
        "Requests past their deadline whose DEADLINE_EXCEEDED step failed (tried again).",
    ),
    "xsettle_errors_total": (
        ("code", "responsible"),
        "ErrorReport records this node sent, by code and the province that must act.",
    ),
    "xsettle_error_reports_total": (
        ("code", "responsible"),
        "ErrorReports this node received, by code and the province that must act.",
    ),
    "xsettle_dead_letters_total": (
        ("kind", "responsible"),
        "Records dead-lettered, by decode error kind and the province that must act (the "
        "sender; this province when the sender is unknown).",
    ),
    "xsettle_duplicates_total": (
        ("family",),
        "Messages received again and not handled twice.",
    ),
    "xsettle_worker_crashes_total": (("task",), "Workers that died of an unexpected error."),
}
"""Exported counters: name → (their labels besides ``province``, help text)."""

GAUGES: dict[str, str] = {
    "xsettle_pending_requests": "Requests sent and still waiting for an answer.",
    "xsettle_outbox_records": "Records committed and not yet acknowledged by the broker.",
    "xsettle_outbox_oldest_age_seconds": (
        "Seconds the oldest record this process dispatched has waited for the broker (0: none)."
    ),
    "xsettle_stalled_partitions": "Inbox partitions whose record in hand is over 60 s old.",
    "xsettle_open_obligations": "Requests this node deferred and owes an answer to.",
    "xsettle_claims_overdue": "The host's claims past their deadline with no answer.",
}
"""Exported gauges (label ``province``): name → help text. A node that does not register
one (``xsettle_claims_overdue`` comes from the host role) has no series of it."""

GAUGES_BY: dict[str, tuple[str, str]] = {
    "xsettle_pending_requests_by_counterparty": (
        "counterparty",
        "Requests still waiting for an answer, by the province asked.",
    ),
    "xsettle_overdue_requests": (
        "counterparty",
        "Requests past their deadline not yet answered nor expired, by the province asked.",
    ),
    "xsettle_oldest_pending_request_age_seconds": (
        "counterparty",
        "Seconds since the first send of the oldest request still waiting, by province asked.",
    ),
}
"""Exported labelled gauges: name → (their label besides ``province``, help text). A
counterparty with nothing waiting has no series."""

HISTOGRAMS: dict[str, tuple[tuple[str, ...], str]] = {
    "xsettle_answer_latency_seconds": (
        ("family", "counterparty"),
        "Time from first send of a request to its terminal answer, by the province asked.",
    ),
}
"""Exported histograms: name → (their labels besides ``province``, help text)."""


class MetricsSource(Protocol):
    """What the exporter needs of a node: its province and metrics (``bus.node.Node``)."""

    province: str
    metrics: Metrics


@dataclass(frozen=True, slots=True)
class _Snap:
    counters: list[tuple[str, dict[str, str], int]]
    gauges: dict[str, float]
    histograms: list[tuple[str, dict[str, str], list[int], float, int]]
    gauges_by: dict[str, dict[str, float]]


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
            by: dict[str, dict[str, float]] = {}
            for name, (_label, read_by) in list(metrics.gauges_by.items()):
                try:
                    by[name] = {value: float(v) for value, v in read_by().items()}
                except Exception as exc:  # a gauge must never break a scrape
                    log.warning("gauge_failed", gauge=name, error=repr(exc))
            return _Snap(counters, gauges, hists, by)
        except RuntimeError:  # dictionary changed size during iteration
            continue
    return _Snap([], {}, [], {})


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
            name: CounterMetricFamily(name, text, labels=["province", *labels])
            for name, (labels, text) in COUNTERS.items()
        }
        hists = {
            name: HistogramMetricFamily(name, text, labels=["province", *labels])
            for name, (labels, text) in HISTOGRAMS.items()
        }
        gauges = {
            name: GaugeMetricFamily(name, text, labels=["province"])
            for name, text in GAUGES.items()
        }
        gauges_by = {
            name: GaugeMetricFamily(name, text, labels=["province", label])
            for name, (label, text) in GAUGES_BY.items()
        }
        build = GaugeMetricFamily(
            "xsettle_build_info",
            "Always 1: the xsettle version, the wire contract and the Python a node runs.",
            labels=["province", "version", "contract", "python"],
        )
        lag_family = GaugeMetricFamily(
            "xsettle_consumer_lag",
            "Inbox records not yet read, per topic partition.",
            labels=["province", "topic", "partition"],
        )
        for node in self._nodes:
            snap = _snapshot(node.metrics)
            build.add_metric([node.province, *BUILD], 1.0)
            for name, labels, count in snap.counters:
                if name in counters:
                    values = [labels.get(label, "") for label in COUNTERS[name][0]]
                    counters[name].add_metric([node.province, *values], count)
            for name, labels, counts, total, _n in snap.histograms:
                if name in hists:
                    values = [labels.get(label, "") for label in HISTOGRAMS[name][0]]
                    hists[name].add_metric([node.province, *values], cumulative(counts), total)
            for name, reading in snap.gauges.items():
                if name in gauges:
                    gauges[name].add_metric([node.province], reading)
            for name, readings in snap.gauges_by.items():
                if name in gauges_by:
                    for label_value, reading in sorted(readings.items()):
                        gauges_by[name].add_metric([node.province, label_value], reading)
            lags = self._lag(node)
            for part, value in sorted((lags or {}).items(), key=lambda x: str(x[0])):
                lag_family.add_metric([node.province, part.topic, str(part.partition)], value)
        yield build
        yield from counters.values()
        yield from gauges.values()
        yield from gauges_by.values()
        yield from hists.values()
        yield lag_family


def registry_for(
    nodes: Iterable[MetricsSource], loop: asyncio.AbstractEventLoop | None = None
) -> tuple[CollectorRegistry, NodeCollector]:
    """A fresh registry (not the global default) holding a collector of ``nodes`` and of
    this process (memory, CPU, open files, start time; the Python)."""
    registry = CollectorRegistry(auto_describe=False)
    collector = NodeCollector(nodes, loop)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
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
