"""Money between provinces, for ops (contract v1.3): the daily reconciliation (对账) and the
monthly clearing (清算) of this province with each other one, as host and as home.

- ``GET /v1/ops/reconciliation`` (ops): the statements this province sent as host, by day and
  home, each with its outcome and the differences the home found.
- ``POST /v1/ops/reconciliation`` (ops): state a day to every home this province settled with
  (default: today, China time); returns the statement ids.
- ``GET /v1/ops/clearing`` (ops): per month and province pair, the latest version: stated,
  confirmed, disputed, with their claims and amounts, as host and as home.
- ``POST /v1/ops/clearing`` (ops): state a month to every home this province settled with.
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from adapters.clearing import MONTH_RE, china_month
from adapters.gateway.app import GatewayContext, context
from adapters.gateway.auth import require
from adapters.gateway.problems import PROBLEM_RESPONSES, In
from adapters.reconciliation import china_day
from bus.models import yuan

router = APIRouter(prefix="/v1/ops", tags=["money between provinces"], responses=PROBLEM_RESPONSES)

MONTH_PATTERN = MONTH_RE.pattern


class DifferenceOut(BaseModel):
    claim_id: str
    kind: str
    responsible: str
    host_fund_fen: int | None
    home_fund_fen: int | None
    note: str


class StatementOut(BaseModel):
    statement_id: str
    home: str
    day: dt.date
    outcome: str = Field(description="SENT, MATCHED, MISMATCHED or FAILED")
    claims: int
    fund_fen: int
    fund_yuan: str
    differences: list[DifferenceOut]
    error_code: str | None


class ReconciliationOut(BaseModel):
    province: str
    statements: list[StatementOut]


class ClearingOut(BaseModel):
    side: str = Field(description="host: this province stated it; home: it answered it")
    month: str
    host: str
    home: str
    statement_id: str
    version: int
    outcome: str = Field(description="SENT, CONFIRMED, DISPUTED or FAILED")
    stated_claims: int
    stated_fen: int
    stated_yuan: str
    confirmed_claims: int
    confirmed_fen: int
    confirmed_yuan: str
    disputed_claims: int
    disputed_fen: int
    disputed_yuan: str


class ClearingListOut(BaseModel):
    province: str
    months: list[ClearingOut]


class StateDayIn(In):
    day: dt.date | None = Field(default=None, description="default: today, China time")


class StateMonthIn(In):
    month: str | None = Field(
        default=None, pattern=MONTH_PATTERN, description="YYYY-MM; default: this month"
    )


class StatedOut(BaseModel):
    statement_ids: list[str]


@router.get("/reconciliation", response_model=ReconciliationOut)
async def reconciliation(
    day: dt.date | None = Query(default=None, description="one day only"),
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("ops")),
) -> ReconciliationOut:
    """The days this province stated as host, newest first, with the homes' answers."""
    records = ctx.system.reconciler.statements(day=day)
    return ReconciliationOut(
        province=ctx.province,
        statements=[
            StatementOut(
                statement_id=r.statement_id, home=r.home, day=r.day, outcome=r.outcome,
                claims=r.count, fund_fen=r.fund_fen, fund_yuan=yuan(r.fund_fen),
                differences=[
                    DifferenceOut(
                        claim_id=d.claim_id, kind=d.kind.value, responsible=d.responsible,
                        host_fund_fen=d.host_fund_fen, home_fund_fen=d.home_fund_fen,
                        note=d.note,
                    )
                    for d in r.differences
                ],
                error_code=r.error_code,
            )
            for r in sorted(records, key=lambda r: (r.day, r.stated_at_ms), reverse=True)
        ],
    )  # fmt: skip


@router.post("/reconciliation", response_model=StatedOut, status_code=202)
async def state_day(
    body: StateDayIn,
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("ops")),
) -> StatedOut:
    """State a day to every home this province settled claims with; the answers come later
    (``GET``)."""
    day = body.day or china_day(dt.datetime.now(dt.UTC))
    return StatedOut(statement_ids=await ctx.system.reconciler.reconcile_all(day))


@router.get("/clearing", response_model=ClearingListOut)
async def clearing(
    month: str | None = Query(default=None, pattern=MONTH_PATTERN, description="YYYY-MM"),
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("ops")),
) -> ClearingListOut:
    """Per month and province pair, the latest statement: stated, confirmed, disputed."""
    return ClearingListOut(
        province=ctx.province,
        months=[
            ClearingOut(
                side=v.side, month=v.month, host=v.host, home=v.home,
                statement_id=v.statement_id, version=v.version, outcome=v.outcome,
                stated_claims=v.stated_claims, stated_fen=v.stated_fen,
                stated_yuan=yuan(v.stated_fen), confirmed_claims=v.confirmed_claims,
                confirmed_fen=v.confirmed_fen, confirmed_yuan=yuan(v.confirmed_fen),
                disputed_claims=v.disputed_claims, disputed_fen=v.disputed_fen,
                disputed_yuan=yuan(v.disputed_fen),
            )
            for v in ctx.system.clearing.overview(month)
        ],
    )  # fmt: skip


@router.post("/clearing", response_model=StatedOut, status_code=202)
async def state_month(
    body: StateMonthIn,
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("ops")),
) -> StatedOut:
    """State a month to every home this province settled claims with (each a new version
    replacing the latest); the answers come later (``GET``)."""
    month = body.month or china_month(dt.datetime.now(dt.UTC))
    return StatedOut(statement_ids=await ctx.system.clearing.state_all(month))
