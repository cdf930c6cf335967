"""The home's review desk (审核): DELAYED claims waiting for a reviewer, and the desk's page.

- ``GET /v1/reviews?limit=100`` (reviewer, ops): the open reviews, the earliest expected answer
  first, with the rules' proposal.
- ``GET /v1/reviews/{claim_id}`` (reviewer, ops): one review, open or decided: the visit, the
  items with their billed and proposed amounts, the usage it reserves, and once decided the
  result, the reviewer and when.
- ``POST /v1/reviews/{claim_id}/decision`` (reviewer): approve the proposal, adjust items
  (approved amount per item code, with a reason code and a note) or reject (with a reason).
  The decision, the person's year usage and the one ``ReviewResult`` to the host commit in one
  step (:class:`adapters.review_desk.ReviewDesk`); the answer is the result and what the host
  will settle with the patient (top-up or refund). Input is checked against the claim's items
  *before* the desk is called, so a 422 writes and sends nothing; a review decided already is
  a 409 naming who decided it.
- ``GET /desk`` (public page, no data without a reviewer token): the reviewers' page, static
  HTML and vanilla JS from ``adapters/gateway/static/desk.*``.

Persons appear only as masked ID numbers (``130102**********34``), never by name. A gateway
whose review desk is off (``review_desk.enabled = false``: the rules answer every claim at
once) answers every review endpoint with 404 ``review-desk-off``: there is no such resource
here, and nothing a reviewer could do would change that.
"""

from __future__ import annotations

import datetime as dt
import re
from importlib import resources
from typing import Annotated, Final, Literal

import structlog
from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field, field_validator

from adapters.gateway.app import GatewayContext, context
from adapters.gateway.auth import Caller, require
from adapters.gateway.problems import (
    PROBLEM_RESPONSES,
    FieldProblem,
    In,
    Problem,
    bad_field,
    not_found,
)
from adapters.review_desk import (
    REASON_REJECTED,
    ItemProposal,
    QueuedReview,
    ReviewClosed,
    ReviewDesk,
    ReviewFile,
    ReviewState,
    UnknownReview,
)
from bus.models import CatalogueClass, ItemAdjustment, ReviewDecision, ReviewResult, yuan

log = structlog.get_logger(__name__)

router = APIRouter(tags=["review desk"], responses=PROBLEM_RESPONSES)

ClaimId = Annotated[str, Path(pattern=r"^C-\d{6}-[A-Za-z0-9-]{1,60}$", max_length=72)]
MAX_LIMIT: Final = 1000
"""The most reviews one list returns."""
PAGE_FILES: Final = {
    "desk.html": "text/html; charset=utf-8",
    "desk.js": "text/javascript; charset=utf-8",
    "desk.css": "text/css; charset=utf-8",
}
"""The page's files under ``adapters/gateway/static/`` and their media types."""
PAGE_HEADERS: Final = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}
"""Headers of the page's files: same-origin scripts only, no framing, no referrer."""


# --- shapes -----------------------------------------------------------------------------------
class _In(In):
    """A request body of this module (see :class:`adapters.gateway.problems.In`)."""


_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_LINES: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _text(value: str | None, controls: re.Pattern[str]) -> str | None:
    if value is None:
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    if controls.search(value):
        raise ValueError("must not contain control characters")
    return value


def _one_line(value: str | None) -> str | None:
    """A name or code: one line of text, not blank."""
    value = _text(value, _CONTROL)
    if value is not None and not value.strip():
        raise ValueError("must not be blank")
    return value


def _lines(value: str | None) -> str | None:
    """A note or reason: text, line breaks and tabs allowed."""
    return _text(value, _CONTROL_BUT_LINES)


class AdjustmentIn(_In):
    """A reviewer's word on one item code: its approved (eligible) amount."""

    item_code: str = Field(min_length=1, max_length=32, description="an item code of the claim")
    approved_fen: int = Field(
        ge=0, le=10_000_000_000_000, description="approved amount in fen, ≤ the billed amount"
    )
    reason_code: str = Field(
        min_length=1, max_length=64, description="why (OVER_QUANTITY, NOT_INDICATED, …)"
    )
    note: str = Field(default="", max_length=500, description="for the host and the patient")

    _check_codes = field_validator("item_code", "reason_code")(_one_line)
    _check_note = field_validator("note")(_lines)


class DecisionIn(_In):
    """A reviewer's decision on one review."""

    action: Literal["approve", "adjust", "reject"]
    reviewer: str = Field(min_length=1, max_length=64, description="the reviewer's name")
    adjustments: list[AdjustmentIn] | None = Field(
        default=None, max_length=1000, description="adjust: one per item code (at least one)"
    )
    reason: str | None = Field(default=None, max_length=500, description="reject: why")
    reason_code: str | None = Field(
        default=None, max_length=64, description=f"reject: default {REASON_REJECTED}"
    )

    _check_names = field_validator("reviewer", "reason_code")(_one_line)
    _check_reason = field_validator("reason")(_lines)


class AmountsOut(BaseModel):
    """A split of a claim (proposed or decided), fen with the same amounts in yuan."""

    decision: ReviewDecision
    eligible_fen: int
    fund_fen: int
    critical_illness_fen: int
    assistance_fen: int
    personal_fen: int
    balance_fen: int
    """Personal − advance: > 0 the patient tops up, < 0 the patient is refunded."""
    eligible_yuan: str
    fund_yuan: str
    critical_illness_yuan: str
    assistance_yuan: str
    personal_yuan: str
    balance_yuan: str


class ReviewSummaryOut(BaseModel):
    """An open (or decided) review as a line of the queue."""

    claim_id: str
    person: str
    """Masked ID number; names are never shown here."""
    host: str
    host_name: str
    total_fen: int
    advance_fen: int
    """What the patient paid before review (≤ 25% of the bill)."""
    total_yuan: str
    advance_yuan: str
    proposal: AmountsOut
    """The rules' split: what an approval pays, usage permitting."""
    accepted_at: dt.datetime
    expected_by: dt.datetime
    """When the host was told to expect the answer."""
    due_at: dt.datetime
    """The host request's deadline."""
    overdue: bool
    """Open past ``expected_by``: the host was promised an answer by now."""
    past_deadline: bool
    """Open past ``due_at``: the host's claim is overdue too."""
    state: ReviewState


class ReviewListOut(BaseModel):
    """The open reviews."""

    count_open: int
    reviews: list[ReviewSummaryOut]


class HospitalOut(BaseModel):
    """The hospital of the visit."""

    code: str
    name: str | None
    """From the directory (None: a hospital the directory no longer lists)."""
    level: int


class ItemOut(BaseModel):
    """One item code of the claim (its lines summed) with the rules' proposal."""

    item_code: str
    item_name: str
    catalogue_class: CatalogueClass
    """Class under the host catalogue."""
    amount_fen: int
    """Billed."""
    proposed_fen: int
    """Eligible as proposed (what an approval keeps)."""
    reason_code: str | None
    note: str | None
    amount_yuan: str
    proposed_yuan: str


class UsageOut(BaseModel):
    """Year usage reserved for an open review (zero once decided)."""

    fund_fen: int
    critical_illness_fen: int
    assistance_fen: int
    copayment_fen: int


class AdjustmentOut(BaseModel):
    """An item the decision pays less of than billed: its approved amount and why."""

    item_code: str
    approved_fen: int
    approved_yuan: str
    reason_code: str
    note: str


class ResultOut(AmountsOut):
    """A decision: the split sent to the host and what the host settles with the patient."""

    claim_id: str
    total_fen: int
    deductible_fen: int
    advance_fen: int
    top_up_fen: int
    """What the patient pays at settlement (少补)."""
    refund_fen: int
    """What is refunded to the patient (多退)."""
    total_yuan: str
    deductible_yuan: str
    advance_yuan: str
    top_up_yuan: str
    refund_yuan: str
    adjustments: list[AdjustmentOut]
    reviewer: str
    reviewed_at: dt.datetime


class ReviewOut(ReviewSummaryOut):
    """One review as a reviewer opens it."""

    hospital: HospitalOut
    visit_type: str
    admitted_at: dt.datetime
    discharged_at: dt.datetime
    diagnoses: list[str]
    items: list[ItemOut]
    reserved: UsageOut
    result: ResultOut | None
    """Once decided: the answer sent to the host."""
    reviewer: str | None
    decided_at: dt.datetime | None


# --- mapping ----------------------------------------------------------------------------------
def _amounts(
    decision: ReviewDecision,
    eligible: int,
    fund: int,
    critical_illness: int,
    assistance: int,
    personal: int,
    balance: int,
) -> dict[str, object]:
    return {
        "decision": decision,
        "eligible_fen": eligible,
        "fund_fen": fund,
        "critical_illness_fen": critical_illness,
        "assistance_fen": assistance,
        "personal_fen": personal,
        "balance_fen": balance,
        "eligible_yuan": yuan(eligible),
        "fund_yuan": yuan(fund),
        "critical_illness_yuan": yuan(critical_illness),
        "assistance_yuan": yuan(assistance),
        "personal_yuan": yuan(personal),
        "balance_yuan": yuan(balance),
    }


def _summary_fields(q: QueuedReview, ctx: GatewayContext, now: dt.datetime) -> dict[str, object]:
    p = q.proposal
    is_open = q.state is ReviewState.OPEN
    return {
        "claim_id": q.claim_id,
        "person": q.person,
        "host": q.host,
        "host_name": ctx.directory.province_name(q.host),
        "total_fen": q.total_fen,
        "advance_fen": q.advance_fen,
        "total_yuan": yuan(q.total_fen),
        "advance_yuan": yuan(q.advance_fen),
        "proposal": AmountsOut.model_validate(
            _amounts(
                p.decision,
                p.eligible_fen,
                p.fund_fen,
                p.critical_illness_fen,
                p.assistance_fen,
                p.personal_fen,
                p.balance_fen,
            )
        ),
        "accepted_at": q.accepted_at,
        "expected_by": q.expected_by,
        "due_at": q.due_at,
        "overdue": is_open and now >= q.expected_by,
        "past_deadline": is_open and now >= q.due_at,
        "state": q.state,
    }


def result_out(r: ReviewResult) -> ResultOut:
    """The API shape of a decision (the ``ReviewResult`` sent to the host)."""
    return ResultOut.model_validate(
        {
            **_amounts(
                r.decision,
                r.eligible_fen,
                r.fund_fen,
                r.critical_illness_fen,
                r.assistance_fen,
                r.personal_fen,
                r.balance_fen,
            ),
            "claim_id": r.claim_id,
            "total_fen": r.total_fen,
            "deductible_fen": r.deductible_fen,
            "advance_fen": r.advance_fen,
            "top_up_fen": max(r.balance_fen, 0),
            "refund_fen": max(-r.balance_fen, 0),
            "total_yuan": yuan(r.total_fen),
            "deductible_yuan": yuan(r.deductible_fen),
            "advance_yuan": yuan(r.advance_fen),
            "top_up_yuan": yuan(max(r.balance_fen, 0)),
            "refund_yuan": yuan(max(-r.balance_fen, 0)),
            "adjustments": [
                AdjustmentOut(
                    item_code=a.item_code,
                    approved_fen=a.approved_fen,
                    approved_yuan=yuan(a.approved_fen),
                    reason_code=a.reason_code,
                    note=a.note,
                )
                for a in r.adjustments
            ],
            "reviewer": r.reviewer,
            "reviewed_at": r.reviewed_at,
        }
    )


def _item_out(i: ItemProposal) -> ItemOut:
    return ItemOut(
        item_code=i.item_code,
        item_name=i.item_name,
        catalogue_class=i.catalogue_class,
        amount_fen=i.amount_fen,
        proposed_fen=i.proposed_fen,
        reason_code=i.reason_code,
        note=i.note,
        amount_yuan=yuan(i.amount_fen),
        proposed_yuan=yuan(i.proposed_fen),
    )


def review_out(f: ReviewFile, ctx: GatewayContext) -> ReviewOut:
    """The API shape of one review."""
    hospital = ctx.directory.hospital(f.hospital_code)
    r = f.reserved
    return ReviewOut.model_validate(
        {
            **_summary_fields(f.summary, ctx, dt.datetime.now(dt.UTC)),
            "hospital": HospitalOut(
                code=f.hospital_code,
                name=hospital.name if hospital is not None else None,
                level=f.hospital_level,
            ),
            "visit_type": f.visit_type,
            "admitted_at": f.admitted_at,
            "discharged_at": f.discharged_at,
            "diagnoses": list(f.diagnoses),
            "items": [_item_out(i) for i in f.items],
            "reserved": UsageOut(
                fund_fen=r.fund_used_fen,
                critical_illness_fen=r.critical_illness_used_fen,
                assistance_fen=r.assistance_used_fen,
                copayment_fen=r.copayment_fen,
            ),
            "result": None if f.result is None else result_out(f.result),
            "reviewer": f.reviewer,
            "decided_at": f.decided_at,
        }
    )


# --- the desk and its checks ------------------------------------------------------------------
def desk_of(ctx: GatewayContext) -> ReviewDesk:
    """The province's review desk, or 404 ``review-desk-off`` when it runs without one."""
    desk = ctx.system.home.desk
    if desk is None:
        raise Problem(
            404,
            "review-desk-off",
            f"{ctx.province} runs without a review desk (review_desk.enabled = false): "
            "its claims are reviewed by the rules at once",
        )
    return desk


def _load(desk: ReviewDesk, claim_id: str, ctx: GatewayContext) -> ReviewFile:
    try:
        return desk.get(claim_id)
    except UnknownReview:
        raise not_found(f"no review of claim {claim_id} at {ctx.province}'s desk") from None


def _closed(f: ReviewFile) -> Problem:
    by = f" by {f.reviewer}" if f.reviewer else ""
    at = f" at {f.decided_at.isoformat(timespec='seconds')}" if f.decided_at else ""
    decision = f" ({f.result.decision.value})" if f.result is not None else ""
    return Problem(
        409,
        "review-closed",
        f"the review of claim {f.summary.claim_id} was decided already{by}{at}{decision}",
    )


def checked_adjustments(body: DecisionIn, f: ReviewFile) -> list[ItemAdjustment]:
    """The adjustments of an ``adjust`` decision, checked against the claim's items: each
    names an item code of the claim once and approves at most its billed amount. 422 naming
    ``adjustments.N.item_code`` or ``adjustments.N.approved_fen`` otherwise."""
    if not body.adjustments:
        raise bad_field("adjustments", "adjust needs at least one item adjustment")
    billed = {i.item_code: i.amount_fen for i in f.items}
    problems: list[FieldProblem] = []
    seen: set[str] = set()
    for n, a in enumerate(body.adjustments):
        if a.item_code not in billed:
            problems.append(
                FieldProblem(
                    field=f"adjustments.{n}.item_code",
                    message=f"claim {f.summary.claim_id} has no item {a.item_code}",
                )
            )
        elif a.item_code in seen:
            problems.append(
                FieldProblem(
                    field=f"adjustments.{n}.item_code",
                    message=f"item {a.item_code} is adjusted twice",
                )
            )
        elif a.approved_fen > billed[a.item_code]:
            problems.append(
                FieldProblem(
                    field=f"adjustments.{n}.approved_fen",
                    message=f"{a.approved_fen} is more than item {a.item_code}'s billed "
                    f"{billed[a.item_code]} fen",
                )
            )
        seen.add(a.item_code)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise Problem(
            422, "invalid-request", f"{first.field}: {first.message}{more}", errors=problems
        )
    return [
        ItemAdjustment(
            item_code=a.item_code,
            approved_fen=a.approved_fen,
            reason_code=a.reason_code.strip(),
            note=a.note,
        )
        for a in body.adjustments
    ]


def _check_shape(body: DecisionIn) -> None:
    """Fields that belong to another action, and a rejection's reason."""
    if body.action != "adjust" and body.adjustments is not None:
        raise bad_field("adjustments", f"only with action adjust, not {body.action}")
    if body.action != "reject":
        for name in ("reason", "reason_code"):
            if getattr(body, name) is not None:
                raise bad_field(name, f"only with action reject, not {body.action}")
    elif body.reason is None or not body.reason.strip():
        raise bad_field("reason", "a rejection needs a reason")


# --- routes -----------------------------------------------------------------------------------
@router.get("/v1/reviews", response_model=ReviewListOut)
async def list_reviews(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    ctx: GatewayContext = Depends(context),
    _: Caller = Depends(require("reviewer", "ops")),
) -> ReviewListOut:
    """Open reviews, the earliest expected answer first, with how many are open in all."""
    desk = desk_of(ctx)
    now = dt.datetime.now(dt.UTC)
    return ReviewListOut(
        count_open=desk.count_open(),
        reviews=[
            ReviewSummaryOut.model_validate(_summary_fields(q, ctx, now))
            for q in desk.open_reviews(limit)
        ],
    )


@router.get("/v1/reviews/{claim_id}", response_model=ReviewOut)
async def get_review(
    claim_id: ClaimId,
    ctx: GatewayContext = Depends(context),
    _: Caller = Depends(require("reviewer", "ops")),
) -> ReviewOut:
    """One review, open or decided: the visit, the items and the proposal, the result."""
    return review_out(_load(desk_of(ctx), claim_id, ctx), ctx)


@router.post("/v1/reviews/{claim_id}/decision", response_model=ResultOut)
async def decide(
    claim_id: ClaimId,
    body: DecisionIn,
    ctx: GatewayContext = Depends(context),
    who: Caller = Depends(require("reviewer")),
) -> ResultOut:
    """Approve, adjust or reject an open review; the one answer leaves for the host with the
    decision, in one step. 409 when it was decided already (by whom); 422 (nothing written,
    nothing sent) for an item the claim lacks or an amount above its billed amount."""
    desk = desk_of(ctx)
    f = _load(desk, claim_id, ctx)
    if f.summary.state is not ReviewState.OPEN:
        raise _closed(f)
    _check_shape(body)
    reviewer = body.reviewer.strip()
    try:
        if body.action == "approve":
            result = await desk.approve(claim_id, reviewer)
        elif body.action == "adjust":
            result = await desk.adjust(claim_id, checked_adjustments(body, f), reviewer)
        else:
            assert body.reason is not None
            result = await desk.reject(
                claim_id,
                body.reason.strip(),
                reviewer,
                reason_code=(body.reason_code or REASON_REJECTED).strip(),
            )
    except ReviewClosed:
        raise _closed(_load(desk, claim_id, ctx)) from None
    except UnknownReview:
        raise not_found(f"no review of claim {claim_id} at {ctx.province}'s desk") from None
    except ValueError as exc:  # the desk's own checks: the step rolled back
        raise Problem(422, "invalid-request", str(exc)) from None
    log.info(
        "review_decided_over_http",
        claim_id=claim_id,
        action=body.action,
        decision=result.decision.value,
        caller=who.name,
    )
    return result_out(result)


def _page_file(name: str) -> Response:
    body = resources.files("adapters.gateway").joinpath("static", name).read_bytes()
    return Response(body, media_type=PAGE_FILES[name], headers=PAGE_HEADERS)


@router.get("/desk", include_in_schema=False)
async def desk_page() -> Response:
    """The reviewers' page (审核台): static; every datum comes from the API with a token."""
    return _page_file("desk.html")


@router.get("/desk/desk.js", include_in_schema=False)
async def desk_script() -> Response:
    """The page's script."""
    return _page_file("desk.js")


@router.get("/desk/desk.css", include_in_schema=False)
async def desk_style() -> Response:
    """The page's style sheet."""
    return _page_file("desk.css")
