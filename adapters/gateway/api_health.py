"""Health: ``/healthz`` (the process answers) and ``/readyz`` (fit to take traffic).

``/readyz`` is 200 only when every check passes, else 503 with the failing ones named:

- ``broker``: the last probe (a metadata request, every 5 s) was answered;
- ``partitions``: the consumer group assigned this province's inbox to this gateway (all of
  it on SQLite, the only instance; on a shared PostgreSQL database, a share of it: the
  province's other instances hold the rest);
- ``store``: the province's database takes a write;
- ``workers``: no worker died and no partition has a record in hand for over 60 s;
- ``draining``: the gateway is not stopping.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from adapters.gateway.app import GatewayContext, context
from bus.db import Database
from bus.envelope import now_ms

router = APIRouter(tags=["health"])

_HEARTBEAT = "CREATE TABLE IF NOT EXISTS gateway_heartbeat (id INTEGER PRIMARY KEY, at_ms INTEGER)"


class Check(BaseModel):
    name: str
    ok: bool
    detail: str


class Readiness(BaseModel):
    ready: bool
    province: str
    checks: list[Check]


class Liveness(BaseModel):
    status: str
    province: str


@router.get("/healthz", response_model=Liveness)
async def healthz(ctx: GatewayContext = Depends(context)) -> Liveness:
    """The process is up and answering."""
    return Liveness(status="ok", province=ctx.province)


def setup(app: FastAPI, ctx: GatewayContext) -> None:
    """The heartbeat table ``/readyz`` writes to, made once."""
    migrate_heartbeat(ctx.system.db)


def migrate_heartbeat(db: Database) -> None:
    """Make the heartbeat table (before the node starts: the gateway does)."""
    db.migrate("gateway-heartbeat/1", _HEARTBEAT)


def _store_writable(ctx: GatewayContext) -> str | None:
    db = ctx.system.db
    try:
        with db.write() as cur:
            cur.execute(
                "INSERT INTO gateway_heartbeat VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET "
                "at_ms = excluded.at_ms",
                (now_ms(),),
            )
    except Exception as exc:  # any failure to write is the answer
        return str(exc)[:200]
    return None


def readiness(ctx: GatewayContext) -> Readiness:
    """Every check of ``/readyz``."""
    node = ctx.system.node
    broker = ctx.console.broker if ctx.console is not None else None
    checked = broker.checked_ms if broker is not None else None
    age = "" if checked is None else f"{(now_ms() - checked) / 1000:.0f} s ago"
    reachable = broker is not None and broker.reachable is True
    checks = [
        Check(
            name="broker",
            ok=reachable,
            detail=f"answered {age}"
            if reachable
            else f"unreachable: {(broker.error if broker else None) or 'not probed yet'}",
        )
    ]
    assigned = node.assigned_partitions()
    expected = len(node.inbox) * node.settings.partitions
    if ctx.system.db.dialect == "sqlite":  # the only instance: it must hold the whole inbox
        ok, detail = assigned >= expected, f"{assigned} of {expected} inbox partitions assigned"
    else:  # one of several instances on a shared database: each holds a share
        ok = assigned > 0
        detail = (
            f"{assigned} of {expected} inbox partitions assigned here (the province's other "
            "instances hold the rest)"
        )
    checks.append(Check(name="partitions", ok=ok, detail=detail))
    store_error = _store_writable(ctx)
    checks.append(Check(name="store", ok=store_error is None, detail=store_error or "writable"))
    stalled = [f"{p.topic}:{p.partition}" for p in node.stalled()]
    failure = node.failure
    checks.append(
        Check(
            name="workers",
            ok=failure is None and not stalled,
            detail=f"a worker died: {failure!r}"[:200]
            if failure is not None
            else (f"stalled: {', '.join(stalled)}" if stalled else "running"),
        )
    )
    checks.append(
        Check(
            name="draining",
            ok=not ctx.draining,
            detail="stopping" if ctx.draining else "serving",
        )
    )
    return Readiness(ready=all(c.ok for c in checks), province=ctx.province, checks=checks)


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready: the failing checks"}},
)
async def readyz(ctx: GatewayContext = Depends(context)) -> JSONResponse:
    """Ready for traffic: broker reachable, partitions assigned, store writable, no dead
    worker or stalled partition, not draining."""
    result = readiness(ctx)
    return JSONResponse(result.model_dump(), status_code=200 if result.ready else 503)
