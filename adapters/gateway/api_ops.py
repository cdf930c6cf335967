"""The ops console: what is failing, who must act, what is overdue — JSON for the ops role, a
page, and the Prometheus metrics.

- ``GET /v1/ops/overview`` (ops): alarms first (broker unreachable, a reader that cannot
  read, a dead worker, a stalled partition), then the counts — ``null`` where unknown, never
  a zero that only means "could not look".
- ``GET /v1/ops/pending`` (ops): what we wait for from each province and what we owe each,
  by counterparty, oldest first, with ages.
- ``GET /v1/ops/errors`` (ops): error reports by code × responsible province (with the
  province's name), and the newest (personal data masked).
- ``GET /v1/ops/dlq`` (ops): dead letters, newest first, with their sender.
- ``GET /v1/ops/dlq/{topic}/{partition}/{offset}`` (ops): one dead letter decoded.
- ``POST /v1/ops/dlq/replay`` (ops): replay dead letters; the body must say
  ``"confirm": true``. All or none: an unknown letter is a 404 and nothing is sent.
- ``GET /v1/ops/panels`` (ops): the panels the adapters add (overdue claims, settlements by
  province pair and month in yuan).
- ``GET /metrics`` (no token: counts only, no personal data): Prometheus text.
- ``GET /console``: the page (static HTML and script; it asks for the ops token once and
  keeps it in the tab's sessionStorage).

In a gateway the console watches the gateway's province only (its error and DLQ topics, its
node and store) and starts in :func:`setup` without delaying the gateway's start.
``xsettle ops console`` and ``xsettle demo --console`` serve the same router cluster-wide
with :func:`create_ops_app` and :class:`ConsoleServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import socket
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, Final

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field, StrictBool

from adapters.directory import Directory
from adapters.gateway import problems
from adapters.gateway.app import GatewayContext
from adapters.gateway.auth import require
from adapters.gateway.config import TokenConfig
from adapters.gateway.panels import (
    Cell,
    PanelSource,
    build_panels,
    overdue_claims_panel,
    settlement_stats_panel,
)
from adapters.gateway.problems import PROBLEM_RESPONSES, In, Problem, not_found
from bus.console import Console, NotReplayable, UnknownDeadLetters
from bus.constants import DLQ_TOPIC_PATTERN
from bus.errors import BusError
from bus.exporter import CONTENT_TYPE

router = APIRouter(tags=["ops"], responses=PROBLEM_RESPONSES)

PAGE_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
"""The page's headers: nothing loaded from elsewhere, never framed, never cached."""

DlqTopic = Annotated[str, Path(pattern=DLQ_TOPIC_PATTERN, max_length=64)]


@dataclass(slots=True)
class OpsView:
    """What the ops routes read: the console, the directory (province names), the panels."""

    console: Console
    directory: Directory
    panels: Sequence[PanelSource] = field(default_factory=tuple)
    scope: str | None = None
    """The province the console is restricted to (a gateway's), None: every province."""


async def ops_view(request: Request) -> OpsView:
    """Dependency: the app's ops view (its console started if it was not yet)."""
    view: OpsView | None = getattr(request.app.state, "ops", None)
    if view is None:
        raise Problem(503, "unavailable", "the ops console is not running in this process")
    if not view.console.started:
        view.console.launch()
    return view


def setup(app: FastAPI, ctx: GatewayContext) -> None:
    """Create the gateway's console (its province's topics, its node and store), start it
    (tasks only: the gateway's start does not wait for the broker) and keep it in
    ``ctx.console``, which the gateway stops on ``stop()``."""
    cfg = ctx.config
    console = Console(
        cfg.bus_settings(),
        cfg.bus.bootstrap or "",
        nodes=[ctx.system.node],
        province=ctx.province,
    )
    ctx.console = console
    office = {ctx.province: ctx.system.backoffice}
    app.state.ops = OpsView(
        console=console,
        directory=ctx.directory,
        panels=(
            overdue_claims_panel(office, ctx.directory),
            settlement_stats_panel(office, ctx.directory),
        ),
        scope=ctx.province,
    )
    with contextlib.suppress(RuntimeError):  # no running loop: started by the first request
        console.launch()


# --- output models ----------------------------------------------------------------------------
class _In(In):
    """A request body of this module (see :class:`adapters.gateway.problems.In`)."""


class AlarmOut(BaseModel):
    """Something to look at now."""

    kind: str
    """``broker``, ``reader``, ``worker``, ``stalled`` or ``node``."""
    text: str
    province: str | None
    province_name: str | None
    since: dt.datetime | None


class CountsOut(BaseModel):
    """The counts; ``null`` where unknown (broker unreachable, reader not reading)."""

    errors: int | None
    dead_letters: int | None
    dead_letters_not_replayed: int | None
    awaited: int
    """Requests we wait for an answer to."""
    awaited_overdue: int
    owed: int
    """Deferred answers we owe."""
    owed_overdue: int


class BrokerOut(BaseModel):
    bootstrap: str
    reachable: bool | None
    """None: not probed yet."""
    error: str | None
    checked_at: dt.datetime | None


class ReaderOut(BaseModel):
    """One reader of the console (error topics, DLQ topics)."""

    name: str
    phase: str
    """``connecting``, ``reading`` or ``failed``."""
    since: dt.datetime
    error: str | None
    records: int
    failures: int


class NodeHealthOut(BaseModel):
    """A node's ``health()``."""

    province: str
    province_name: str | None
    ok: bool
    running: bool | None = None
    failure: str | None = None
    """A worker that died, else None."""
    stalled: list[str] = []
    """Partitions with a record in hand for over 60 s."""
    outbox: int | None = None
    pending: int | None = None


class OverviewOut(BaseModel):
    """Alarms first, then the counts."""

    scope: str
    """The province watched, or ``all``."""
    scope_name: str | None
    at: dt.datetime
    ok: bool
    """No alarm."""
    alarms: list[AlarmOut]
    counts: CountsOut
    broker: BrokerOut
    readers: list[ReaderOut]
    nodes: list[NodeHealthOut]


class RequestOut(BaseModel):
    """A request waiting for its answer (awaited) or a deferred answer we owe."""

    message_id: str
    message_type: str
    province: str | None
    """Ours: the province waiting (awaited) or owing (owed)."""
    counterparty: str
    status: str
    """``overdue``, ``near`` (its deadline) or ``waiting``."""
    age_s: float
    remaining_s: float
    """Seconds to the deadline (negative: overdue)."""
    sent_at: dt.datetime
    deadline: dt.datetime
    attempt: int
    acknowledged: bool
    expected_by: dt.datetime | None
    ack_state: str | None
    key: str | None
    """The record key (person id), masked."""


class CounterpartyOut(BaseModel):
    """The requests between us and one province, oldest first (at most 50 listed)."""

    counterparty: str
    name: str | None
    total: int
    overdue: int
    near: int
    oldest_age_s: float
    requests: list[RequestOut]


class PendingOut(BaseModel):
    at: dt.datetime
    awaited: list[CounterpartyOut]
    """What we wait for, by the province that owes the answer."""
    owed: list[CounterpartyOut]
    """What we owe, by the province that asked."""


class CodeCountOut(BaseModel):
    code: str
    responsible: str
    responsible_name: str | None
    count: int


class ProvinceCountOut(BaseModel):
    province: str
    name: str | None
    count: int


class ErrorEventOut(BaseModel):
    """One error report (masked)."""

    at: dt.datetime
    code: str
    origin: str | None
    origin_name: str | None
    responsible: str | None
    responsible_name: str | None
    detected_by: str | None
    correlation_id: str | None
    message: str | None
    severity: str | None
    record: str
    """``topic:partition:offset`` of the report."""
    key: str | None


class ErrorsOut(BaseModel):
    known: bool
    """False: the counts are unknown (broker unreachable or reader not reading)."""
    reader: ReaderOut
    total: int | None
    by_code_responsible: list[CodeCountOut]
    by_code: dict[str, int]
    by_responsible: list[ProvinceCountOut]
    newest: list[ErrorEventOut]


class DeadLetterOut(BaseModel):
    """A record a province could not take, kept in its DLQ topic."""

    coordinates: str
    topic: str
    partition: int
    offset: int
    at: dt.datetime
    province: str | None
    """The province that dead-lettered it."""
    sender: str | None
    """The province that sent the record (its ``xs-source``), if it says."""
    sender_name: str | None
    original: str | None
    error_kind: str | None
    error: str | None
    message_id: str | None
    key: str | None
    value_len: int
    replayable: bool
    replayed_at: dt.datetime | None


class DeadLettersOut(BaseModel):
    known: bool
    reader: ReaderOut
    count: int | None
    not_replayed: int | None
    letters: list[DeadLetterOut]


class DeadLetterShown(DeadLetterOut):
    preview: dict[str, Any]
    """Decoded as far as possible: headers, envelope, payload or the decode error (masked)."""


class LetterRef(_In):
    """A dead letter by its coordinates."""

    topic: str = Field(pattern=DLQ_TOPIC_PATTERN, max_length=64, description="xsettle.dlq.<P>")
    partition: int = Field(ge=0, le=100_000)
    offset: int = Field(ge=0)


class ReplayIn(_In):
    """Dead letters to send again to their original topic."""

    letters: list[LetterRef] = Field(min_length=1, max_length=500)
    confirm: StrictBool = Field(
        default=False, description="must be true: a replay re-sends the original records"
    )


class ReplayOut(BaseModel):
    replayed: int
    letters: list[str]


class PanelOut(BaseModel):
    """A panel of the adapters: plain strings and counts, money already in yuan."""

    title: str
    columns: list[str]
    rows: list[list[Cell]]
    numeric: list[str]
    note: str
    empty: str


class PanelsOut(BaseModel):
    panels: list[PanelOut]


# --- helpers ----------------------------------------------------------------------------------
def _at(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _maybe_at(ms: object) -> dt.datetime | None:
    return _at(ms) if isinstance(ms, int) and ms > 0 else None


def _name(directory: Directory, code: object) -> str | None:
    """The province's name in the directory, or None."""
    if not isinstance(code, str) or not code.isdigit() or len(code) != 6:
        return None
    name = directory.province_name(code)
    return None if name == code else name


def _reader(data: dict[str, Any]) -> ReaderOut:
    return ReaderOut(
        name=data["name"],
        phase=data["phase"],
        since=_at(data["since_ms"]),
        error=data["error"],
        records=data["records"],
        failures=data["failures"],
    )


def _letter(data: dict[str, Any], directory: Directory) -> dict[str, Any]:
    return {
        "coordinates": data["coordinates"],
        "topic": data["topic"],
        "partition": data["partition"],
        "offset": data["offset"],
        "at": _at(data["timestamp_ms"]),
        "province": data["province"],
        "sender": data["sender"],
        "sender_name": _name(directory, data["sender"]),
        "original": data["original"],
        "error_kind": data["error_kind"],
        "error": data["error"],
        "message_id": data["message_id"],
        "key": data["key"],
        "value_len": data["value_len"],
        "replayable": data["replayable"],
        "replayed_at": _maybe_at(data["replayed_at_ms"]),
    }


# --- routes -----------------------------------------------------------------------------------
@router.get("/v1/ops/overview", response_model=OverviewOut)
async def overview(
    _: object = Depends(require("ops")), view: OpsView = Depends(ops_view)
) -> OverviewOut:
    """Alarms first (broker unreachable, a reader that cannot read, a dead worker, a stalled
    partition, a node not running), then the counts (``null`` where unknown)."""
    d = view.directory
    data = view.console.overview_json()
    broker = data["broker"]
    return OverviewOut(
        scope=view.scope or "all",
        scope_name=_name(d, view.scope),
        at=_at(data["now_ms"]),
        ok=data["ok"],
        alarms=[
            AlarmOut(
                kind=a["kind"],
                text=a["text"],
                province=a["province"],
                province_name=_name(d, a["province"]),
                since=_maybe_at(a["since_ms"]),
            )
            for a in data["alarms"]
        ],
        counts=CountsOut(**data["counts"]),
        broker=BrokerOut(
            bootstrap=broker["bootstrap"],
            reachable=broker["reachable"],
            error=broker["error"],
            checked_at=_maybe_at(broker["checked_ms"]),
        ),
        readers=[_reader(r) for r in data["readers"]],
        nodes=[
            NodeHealthOut(
                province=str(n.get("province", "")),
                province_name=_name(d, n.get("province")),
                ok=bool(n.get("ok")),
                running=n.get("running"),
                failure=n.get("failure"),
                stalled=list(n.get("stalled") or []),
                outbox=n.get("outbox"),
                pending=n.get("pending"),
            )
            for n in data["nodes"]
        ],
    )


def _groups(groups: list[dict[str, Any]], directory: Directory) -> list[CounterpartyOut]:
    return [
        CounterpartyOut(
            counterparty=g["counterparty"],
            name=_name(directory, g["counterparty"]),
            total=g["total"],
            overdue=g["overdue"],
            near=g["near"],
            oldest_age_s=g["oldest_age_s"],
            requests=[
                RequestOut(
                    message_id=r["message_id"],
                    message_type=r["message_type"],
                    province=r["province"],
                    counterparty=r["counterparty"],
                    status=r["status"],
                    age_s=r["age_s"],
                    remaining_s=r["remaining_s"],
                    sent_at=_at(r["sent_at_ms"]),
                    deadline=_at(r["deadline_ms"]),
                    attempt=r["attempt"],
                    acknowledged=r["acknowledged"],
                    expected_by=_maybe_at(r["expected_by_ms"]),
                    ack_state=r["ack_state"],
                    key=r["key"],
                )
                for r in g["requests"]
            ],
        )
        for g in groups
    ]


@router.get("/v1/ops/pending", response_model=PendingOut)
async def pending(
    _: object = Depends(require("ops")), view: OpsView = Depends(ops_view)
) -> PendingOut:
    """What we wait for from each province and what we owe each, by counterparty, overdue
    ones first, each counterparty's requests oldest first, with their ages."""
    data = view.console.pending_json()
    return PendingOut(
        at=_at(data["now_ms"]),
        awaited=_groups(data["awaited"], view.directory),
        owed=_groups(data["owed"], view.directory),
    )


@router.get("/v1/ops/errors", response_model=ErrorsOut)
async def errors(
    _: object = Depends(require("ops")),
    view: OpsView = Depends(ops_view),
    newest: int = Query(20, ge=0, le=50, description="how many of the newest reports"),
) -> ErrorsOut:
    """Error reports by code × responsible province (the province that must act, with its
    name), by code, by responsible province, and the newest; personal data masked."""
    d = view.directory
    data = view.console.errors_json(newest)
    return ErrorsOut(
        known=data["known"],
        reader=_reader(data["reader"]),
        total=data["total"],
        by_code_responsible=[
            CodeCountOut(
                code=c["code"],
                responsible=c["responsible"],
                responsible_name=_name(d, c["responsible"]),
                count=c["count"],
            )
            for c in data["by_code_responsible"]
        ],
        by_code=data["by_code"],
        by_responsible=[
            ProvinceCountOut(province=p, name=_name(d, p), count=n)
            for p, n in data["by_responsible"].items()
        ],
        newest=[
            ErrorEventOut(
                at=_at(e["timestamp_ms"]),
                code=e["code"],
                origin=e.get("origin") or e.get("source"),
                origin_name=_name(d, e.get("origin") or e.get("source")),
                responsible=e.get("responsible") or e.get("addressee"),
                responsible_name=_name(d, e.get("responsible") or e.get("addressee")),
                detected_by=e.get("detected_by"),
                correlation_id=e.get("correlation_id"),
                message=e.get("message") or e.get("decode_error"),
                severity=e.get("severity"),
                record=f"{e['topic']}:{e['partition']}:{e['offset']}",
                key=e.get("key"),
            )
            for e in data["newest"]
        ],
    )


@router.get("/v1/ops/dlq", response_model=DeadLettersOut)
async def dead_letters(
    _: object = Depends(require("ops")),
    view: OpsView = Depends(ops_view),
    limit: int = Query(200, ge=1, le=5000, description="newest letters listed at most"),
) -> DeadLettersOut:
    """Dead letters, newest first, with the province that sent each and its replay state."""
    data = view.console.dlq_json(limit)
    return DeadLettersOut(
        known=data["known"],
        reader=_reader(data["reader"]),
        count=data["count"],
        not_replayed=data["not_replayed"],
        letters=[DeadLetterOut(**_letter(x, view.directory)) for x in data["letters"]],
    )


@router.get("/v1/ops/dlq/{topic}/{partition}/{offset}", response_model=DeadLetterShown)
async def dead_letter(
    topic: DlqTopic,
    partition: Annotated[int, Path(ge=0, le=100_000)],
    offset: Annotated[int, Path(ge=0)],
    _: object = Depends(require("ops")),
    view: OpsView = Depends(ops_view),
) -> DeadLetterShown:
    """One dead letter decoded as far as possible (headers, envelope, the message or why it
    could not be decoded and its first bytes), personal data masked."""
    shown = view.console.dlq_show(f"{topic}:{partition}:{offset}")
    if shown is None:
        raise not_found(f"no dead letter {topic}:{partition}:{offset} in this console")
    return DeadLetterShown(**_letter(shown, view.directory), preview=shown["preview"])


@router.post("/v1/ops/dlq/replay", response_model=ReplayOut)
async def replay_dead_letters(
    body: ReplayIn,
    _: object = Depends(require("ops")),
    view: OpsView = Depends(ops_view),
) -> ReplayOut:
    """Send the dead letters' original records again to their topics (message ids kept, so
    receivers stay idempotent) and mark them replayed. ``confirm`` must be true. All or
    none: an unknown letter (404) or one that holds no copy of its record (409) stops the
    replay before anything is sent."""
    if body.confirm is not True:
        raise problems.bad_field("confirm", "must be true: a replay re-sends the original records")
    try:
        done = await view.console.replay((x.topic, x.partition, x.offset) for x in body.letters)
    except UnknownDeadLetters as exc:
        raise not_found(str(exc)) from None
    except NotReplayable as exc:
        raise Problem(409, "conflict", str(exc)) from None
    except (BusError, TimeoutError) as exc:
        raise Problem(
            503, "unavailable", f"the replay failed (some letters may have been sent): {exc}"
        ) from None
    return ReplayOut(replayed=done["replayed"], letters=done["letters"])


@router.get("/v1/ops/panels", response_model=PanelsOut)
async def panels(
    _: object = Depends(require("ops")), view: OpsView = Depends(ops_view)
) -> PanelsOut:
    """The panels the adapters add (overdue claims; settlements by province pair and month,
    in yuan)."""
    return PanelsOut(
        panels=[
            PanelOut(
                title=p.title,
                columns=list(p.columns),
                rows=[list(r) for r in p.rows],
                numeric=list(p.numeric),
                note=p.note,
                empty=p.empty,
            )
            for p in build_panels(view.panels)
        ]
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text"}},
)
async def metrics(view: OpsView = Depends(ops_view)) -> Response:
    """The nodes' metrics in the Prometheus text format (no token: counts only, no personal
    data)."""
    return Response(await view.console.metrics(), media_type=CONTENT_TYPE)


@functools.cache
def console_html() -> str:
    """The console page (``static/console.html``)."""
    return resources.files("adapters.gateway").joinpath("static/console.html").read_text("utf-8")


@router.get("/console", response_class=HTMLResponse, include_in_schema=False)
async def console_page() -> HTMLResponse:
    """The ops console page (it asks for the ops token and reads the JSON above)."""
    return HTMLResponse(console_html(), headers=PAGE_HEADERS)


# --- the console on its own (xsettle ops console, xsettle demo --console) ----------------------
def create_ops_app(
    console: Console,
    directory: Directory,
    *,
    tokens: TokenConfig,
    panels: Sequence[PanelSource] = (),
    scope: str | None = None,
) -> FastAPI:
    """A web app with only the ops router, the page and ``/metrics`` (``/`` leads to the
    page); ``tokens``: the hashes of the tokens that sign in (only ``ops`` is used)."""
    app = FastAPI(
        title="xsettle ops console",
        description="What is failing, who must act, what is overdue (异地就医直接结算). Errors "
        "are RFC 9457 problem details.",
        version="1.0",
    )
    app.state.tokens = tokens
    app.state.ops = OpsView(console=console, directory=directory, panels=panels, scope=scope)
    problems.install(app)
    app.include_router(router)

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/console")

    return app


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the command decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ConsoleServer:
    """An ops app served by uvicorn on ``host:port`` (0: a free port), with its console."""

    def __init__(self, app: FastAPI, console: Console, host: str, port: int) -> None:
        self.app = app
        self.console = console
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port`` (loopback when bound to every address)."""
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host  # noqa: S104
        return f"http://{shown}:{self.port}"

    @property
    def url(self) -> str:
        """The page."""
        return f"{self.base_url}/console"

    async def start(self) -> ConsoleServer:
        """Bind (``GatewayRefused`` when the port is taken), start the console, serve."""
        from adapters.gateway.service import bind

        self._sock = bind(self.host, self.port)
        self.port = int(self._sock.getsockname()[1])
        self.console.launch()
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", server_header=False
        )
        self._server = _Server(config)
        self._serving = asyncio.create_task(
            self._server.serve(sockets=[self._sock]), name="ops-http"
        )
        while not self._server.started:
            if self._serving.done():
                self._serving.result()
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        """Stop serving and stop the console; harmless twice."""
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._serving
        self._server = None
        self._serving = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        await self.console.stop()

    async def __aenter__(self) -> ConsoleServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
