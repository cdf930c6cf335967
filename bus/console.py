"""The ops web console: what is failing, who must act, what is overdue — in a browser.

Served by the running process: a stdlib ``ThreadingHTTPServer`` in a daemon thread answers
HTTP, while the console's readers (every error topic and every DLQ topic, from the
beginning) run as tasks in the asyncio loop of the node(s). State crosses between the two under
one lock; a replay asked for over HTTP runs in the loop. JSON endpoints:

=========================  =====================================================================
``GET /api/errors``         counts by code, origin, responsible province; newest reports (masked)
``GET /api/dlq``            dead letters, newest first, with their replay state
``GET /api/dlq/show?c=``    one dead letter decoded as far as possible (``c=topic:part:offset``)
``POST /api/dlq/replay``    body ``[{"topic", "partition", "offset"}, ...]``: replay those letters
``GET /api/pending``        requests waiting for an answer, overdue first, and per target
``GET /api/stats``          settlements by province pair and month (injected provider), in yuan
``GET /metrics``            Prometheus text exposition of the nodes' metrics
=========================  =====================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import structlog

from bus.codec import Codec
from bus.constants import DLQ_TOPIC_PATTERN, ERROR_TOPIC_PATTERN, FAMILY_DLQ, FAMILY_ERROR, topic
from bus.envelope import now_ms
from bus.errors import BusError
from bus.exporter import CONTENT_TYPE, MetricsSource, registry_for, render
from bus.models import yuan
from bus.ops import (
    DeadLetter,
    DeadLetterBook,
    ErrorAggregate,
    coords,
    error_event,
    follow_records,
    owed_report,
    pending_report,
    pending_summary,
    replay,
)
from bus.settings import BusSettings
from bus.store import Store

log = structlog.get_logger(__name__)

StatsProvider = Callable[[], Iterable[Mapping[str, Any]]]
"""Returns rows ``{home, host, month, settlements, total_fen, fund_fen}``; called from the
HTTP thread at each ``/api/stats`` request, so it must be thread-safe and quick."""

REPLAY_TIMEOUT_S = 30.0
"""Longest a replay asked for over HTTP may take."""
RETRY_S = 2.0
"""Pause before a reader that lost the broker starts again."""
MAX_BODY = 1 << 20
"""Largest POST body accepted (bytes)."""


def stats_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Settlement statistics rows with their money also in yuan, by month, home, host."""
    out: list[dict[str, Any]] = []
    for row in rows:
        total = int(row.get("total_fen", 0))
        fund = int(row.get("fund_fen", 0))
        out.append(
            {
                "home": str(row.get("home", "")),
                "host": str(row.get("host", "")),
                "month": str(row.get("month", "")),
                "settlements": int(row.get("settlements", 0)),
                "total_fen": total,
                "fund_fen": fund,
                "total_yuan": yuan(total),
                "fund_yuan": yuan(fund),
            }
        )
    return sorted(out, key=lambda r: (r["month"], r["home"], r["host"]))


class Console:
    """The ops console of one process: readers in the loop, HTTP in a thread."""

    def __init__(
        self,
        settings: BusSettings,
        bootstrap: str,
        *,
        nodes: Sequence[MetricsSource] = (),
        stores: Mapping[str, Store] | None = None,
        stats: StatsProvider | None = None,
        province: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        newest_n: int = 50,
        codec: Codec | None = None,
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.nodes = list(nodes)
        self.stores: dict[str, Store] = dict(stores or {})
        for node in self.nodes:
            store = getattr(node, "store", None)
            if store is not None:
                self.stores.setdefault(node.province, store)
        self.stats = stats
        self.province = province
        self.codec = codec or Codec()
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._errors = ErrorAggregate(newest_n=newest_n)
        self._book = DeadLetterBook()
        self._tasks: list[asyncio.Task[None]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._registry = registry_for(self.nodes)[0]
        self.started_ms = 0

    # --- lifecycle ------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port the console listens on (after start)."""
        assert self._server is not None, "start the console first"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://host:port/`` of the console."""
        return f"http://{self._host}:{self.port}/"

    async def start(self) -> Console:
        """Start the readers and the HTTP server."""
        self._loop = asyncio.get_running_loop()
        self._registry = registry_for(self.nodes, self._loop)[0]
        self.started_ms = now_ms()
        self._tasks = [
            asyncio.create_task(self._read_errors(), name="console-errors"),
            asyncio.create_task(self._read_dlq(), name="console-dlq"),
        ]
        handler = type("ConsoleHandler", (_Handler,), {"console": self})
        self._server = ThreadingHTTPServer((self._host, self._port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="xsettle-console", daemon=True
        )
        self._thread.start()
        log.info("console_started", url=self.url)
        return self

    async def stop(self) -> None:
        """Stop HTTP and the readers; harmless twice."""
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)
            server.server_close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def __aenter__(self) -> Console:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- readers (in the loop) ------------------------------------------------------------
    def _source(self, family: str, pattern: str) -> dict[str, Any]:
        if self.province:
            return {"topics": [topic(family, self.province)]}
        return {"pattern": pattern}

    async def _read_errors(self) -> None:
        while True:
            try:
                source = follow_records(
                    self.settings,
                    self.bootstrap,
                    since="beginning",
                    name="console-errors",
                    **self._source(FAMILY_ERROR, ERROR_TOPIC_PATTERN),
                )
                async with contextlib.aclosing(source) as records:
                    async for rec in records:
                        event = error_event(rec, self.codec)
                        with self._lock:
                            self._errors.add(event)
            except BusError as exc:
                log.warning("console_reader_failed", reader="errors", error=str(exc))
            await asyncio.sleep(RETRY_S)
            with self._lock:  # read again from the beginning: start counting afresh
                self._errors = ErrorAggregate(newest_n=self._errors.newest_n)

    async def _read_dlq(self) -> None:
        while True:
            try:
                source = follow_records(
                    self.settings,
                    self.bootstrap,
                    since="beginning",
                    name="console-dlq",
                    **self._source(FAMILY_DLQ, DLQ_TOPIC_PATTERN),
                )
                async with contextlib.aclosing(source) as records:
                    async for rec in records:
                        with self._lock:
                            self._book.add(rec)
            except BusError as exc:
                log.warning("console_reader_failed", reader="dlq", error=str(exc))
            await asyncio.sleep(RETRY_S)

    # --- answers (in the HTTP thread) -----------------------------------------------------
    def errors_json(self) -> dict[str, Any]:
        """``/api/errors``."""
        with self._lock:
            return self._errors.to_json()

    def dlq_json(self) -> dict[str, Any]:
        """``/api/dlq``."""
        with self._lock:
            letters = self._book.letters()
        return {
            "count": len(letters),
            "replayed": sum(1 for d in letters if d.replayed_at_ms is not None),
            "letters": [d.to_json() for d in reversed(letters)],
        }

    def dlq_show(self, letter: str) -> dict[str, Any] | None:
        """``/api/dlq/show``: one dead letter decoded, or None."""
        with self._lock:
            found = self._book.get(letter)
        if found is None:
            return None
        return {**found.to_json(), "preview": found.decoded_preview(self.codec)}

    def replay(self, wanted: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """``POST /api/dlq/replay``: replay the letters named by topic/partition/offset."""
        letters: list[DeadLetter] = []
        missing: list[str] = []
        with self._lock:
            for item in wanted:
                name = coords(str(item["topic"]), int(item["partition"]), int(item["offset"]))
                found = self._book.get(name)
                if found is None:
                    missing.append(name)
                else:
                    letters.append(found)
        count = 0
        if letters:
            assert self._loop is not None
            fut = asyncio.run_coroutine_threadsafe(
                replay(self.settings, self.bootstrap, letters), self._loop
            )
            count = fut.result(REPLAY_TIMEOUT_S)
            at = now_ms()
            with self._lock:
                for letter in letters[:count]:
                    self._book.mark_replayed(letter.coordinates, at)
        return {"replayed": count, "missing": missing}

    def pending_json(self) -> dict[str, Any]:
        """``/api/pending``."""
        now = now_ms()
        rows = [row for store in self.stores.values() for row in pending_report(store, now)]
        rows.sort(key=lambda r: ({"overdue": 0, "near": 1}.get(r.status, 2), r.deadline_ms))
        owed = [row for p, store in self.stores.items() for row in owed_report(store, p, now)]
        return {
            "now_ms": now,
            "rows": [r.to_json() for r in rows],
            "by_target": pending_summary(rows),
            "owed": [r.to_json() for r in owed],
        }

    def stats_json(self) -> dict[str, Any]:
        """``/api/stats``."""
        if self.stats is None:
            return {"available": False, "rows": []}
        return {"available": True, "rows": stats_rows(self.stats())}

    def metrics_text(self) -> bytes:
        """``/metrics``."""
        return render(self._registry)


def index_html() -> bytes:
    """The console page."""
    return resources.files("bus").joinpath("console_static/index.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    console: ClassVar[Console]
    server_version = "xsettle-console"

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, data: Any, status: int = 200) -> None:
        body = json.dumps(data, ensure_ascii=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8")

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        console = self.console
        try:
            if url.path in ("/", "/index.html"):
                self._send(200, index_html(), "text/html; charset=utf-8")
            elif url.path == "/api/errors":
                self._json(console.errors_json())
            elif url.path == "/api/dlq":
                self._json(console.dlq_json())
            elif url.path == "/api/dlq/show":
                shown = console.dlq_show(parse_qs(url.query).get("c", [""])[0])
                if shown is None:
                    self._json({"error": "no such dead letter"}, 404)
                else:
                    self._json(shown)
            elif url.path == "/api/pending":
                self._json(console.pending_json())
            elif url.path == "/api/stats":
                self._json(console.stats_json())
            elif url.path == "/metrics":
                self._send(200, console.metrics_text(), CONTENT_TYPE)
            elif url.path == "/api/health":
                self._json({"ok": True, "time_ms": int(time.time() * 1000)})
            else:
                self._json({"error": "not found"}, 404)
        except Exception as exc:
            log.exception("console_request_failed", path=url.path)
            self._json({"error": type(exc).__name__}, 500)

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/api/dlq/replay":
            self._json({"error": "not found"}, 404)
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._json({"error": "body too large"}, 413)
                return
            body = json.loads(self.rfile.read(length) or b"[]")
            if isinstance(body, dict):
                body = body.get("letters", [])
            if not isinstance(body, list) or not all(isinstance(x, dict) for x in body):
                raise ValueError("expected a list of {topic, partition, offset}")
            self._json(self.console.replay(body))
        except (ValueError, KeyError, TypeError) as exc:
            self._json({"error": f"bad request: {exc}"}, 400)
        except Exception as exc:
            log.exception("console_replay_failed")
            self._json({"error": type(exc).__name__}, 500)

    def log_message(self, format: str, *args: Any) -> None:
        return
