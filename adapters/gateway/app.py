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
health            anyone (``/healthz``, ``/readyz``)  :mod:`adapters.gateway.api_health`
================  ==============================  ============================================

The routers reach the province through :class:`GatewayContext` (``request.app.state.ctx``).
Person ids travel in request bodies, never in URLs, so no access log or proxy keeps them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import structlog
from fastapi import FastAPI, Request, Response

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
class Readiness:
    """What ``/readyz`` reports, kept up to date by the gateway's probe."""

    broker_ok: bool = False
    broker_checked_ms: int = 0
    broker_error: str | None = None


@dataclass(slots=True)
class GatewayContext:
    """What the routers need of the running gateway."""

    config: GatewayConfig
    system: ProvinceSystem
    directory: Directory
    admissions: AdmissionBook
    console: Console | None = None
    readiness: Readiness = field(default_factory=Readiness)
    draining: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def province(self) -> str:
        return self.system.province


def context(request: Request) -> GatewayContext:
    """Dependency: the gateway the request reached."""
    ctx: GatewayContext = request.app.state.ctx
    return ctx


def create_app(ctx: GatewayContext) -> FastAPI:
    """The web app of one province gateway."""
    from adapters.gateway import api_hospital

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
    app.middleware("http")(_log_requests)
    app.include_router(api_hospital.router)
    for module_name in ("api_agency", "api_review", "api_public", "api_ops", "api_health"):
        module = _optional(module_name)
        if module is not None:
            app.include_router(module.router)
            setup = getattr(module, "setup", None)
            if callable(setup):
                setup(app, ctx)
    return app


def _optional(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(f"adapters.gateway.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"adapters.gateway.{name}":
            raise
        return None


async def _log_requests(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """One log line per request: method, path (ids in paths are claim ids, never person
    ids), status, milliseconds. uvicorn's access log is off."""
    started = time.perf_counter()
    response = await call_next(request)
    log.info(
        "http_request",
        method=request.method,
        path=request.url.path,
        status=response.status_code,
        ms=round((time.perf_counter() - started) * 1000, 1),
    )
    return response
