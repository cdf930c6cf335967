"""The gateway's web app: the HTTP API of one province for its own systems, and its pages.

Routers, by who calls them (each in its own module):

================  ==============================  ============================================
router            role                            module
================  ==============================  ============================================
agency            agency (home counters)          :mod:`adapters.gateway.api_agency`
hospital          hospital (host desks)           :mod:`adapters.gateway.api_hospital`
review            reviewer (home review desk)     :mod:`adapters.gateway.api_review`
public            anyone; masked unless a role    :mod:`adapters.gateway.api_public`
ops               ops (console, dead letters)     :mod:`adapters.gateway.api_ops`
money             ops (reconciliation, clearing)  :mod:`adapters.gateway.api_money`
health            anyone (``/healthz``, ``/readyz``)  :mod:`adapters.gateway.api_health`
================  ==============================  ============================================

The routers reach the province through :class:`GatewayContext` (``request.app.state.ctx``).
Person ids travel in request bodies, never in URLs, so no access log or proxy keeps them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import structlog
from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.gateway import problems
from adapters.gateway.config import GatewayConfig

if TYPE_CHECKING:
    from adapters.directory import Directory
    from adapters.gateway.admissions import AdmissionBook
    from adapters.province import ProvinceSystem
    from bus.console import Console

log = structlog.get_logger(__name__)

API_VERSION: Final = "1.0"


@dataclass(slots=True)
class GatewayContext:
    """What the routers need of the running gateway."""

    config: GatewayConfig
    system: ProvinceSystem
    directory: Directory
    admissions: AdmissionBook
    console: Console | None = None
    draining: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def province(self) -> str:
        return self.system.province


async def context(request: Request) -> GatewayContext:
    """Dependency: the gateway the request reached."""
    ctx: GatewayContext = request.app.state.ctx
    return ctx


def create_app(ctx: GatewayContext) -> FastAPI:
    """The web app of one province gateway."""
    from adapters.gateway import (
        api_agency,
        api_health,
        api_hospital,
        api_money,
        api_ops,
        api_public,
        api_review,
    )

    name = ctx.directory.province_name(ctx.province)
    app = FastAPI(
        title=f"xsettle gateway {ctx.province} {name}",
        version=API_VERSION,
        description=(
            "The HTTP API of one province on the xsettle bus (异地就医直接结算): agency filings, "
            "hospital admissions and discharges, the review desk, public queries, ops. Errors "
            "are RFC 9457 problem details. Money is integer fen (`*_fen`); `*_yuan` fields are "
            "the same amounts as decimal strings for display."
        ),
        responses={},
    )
    app.state.ctx = ctx
    app.state.tokens = ctx.config.tokens
    problems.install(app)
    app.add_middleware(RequestLog)
    for module in (
        api_agency, api_hospital, api_review, api_public, api_ops, api_money, api_health
    ):  # fmt: skip
        app.include_router(module.router)
        setup = getattr(module, "setup", None)
        if callable(setup):
            setup(app, ctx)
    return app


class RequestLog:
    """One log line per request: method, path (ids in paths are claim, admission or filing
    ids, never person ids), status, milliseconds. uvicorn's access log is off. A plain ASGI
    middleware: Starlette's ``BaseHTTPMiddleware`` costs a task and a stream per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            log.info(
                "http_request",
                method=scope.get("method"),
                path=scope.get("path"),
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 1),
            )
