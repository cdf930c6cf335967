"""The hospital desk (host side): admit, discharge (package + submit), a claim's status.

- ``POST /v1/admissions`` (hospital): admit a patient: ``ADMITTED`` with an admission id and
  the mode, or ``REFUSED`` with the contract's code and the text the desk shows the patient.
- ``GET /v1/admissions/{admission_id}`` (hospital, ops): an admission, its claim once
  discharged.
- ``POST /v1/admissions/{admission_id}/discharge`` (hospital): package the bill and send the
  claim: claim id, mode, the advance to collect.
- ``GET /v1/claims/{claim_id}`` (hospital, ops): where the claim stands, its money (advance,
  then top-up or refund) and its timeline.
- ``POST /v1/claims/{claim_id}/resend`` (ops): send an open (overdue) claim again.
- ``POST /v1/claims/{claim_id}/close`` (ops): close an open claim, keeping or refunding the
  advance.
- ``POST /v1/claims/{claim_id}/reversal`` (hospital, ops): ask the home to cancel a settled
  claim (冲正: wrong patient, duplicate bill, readmission billed apart); the home's answer
  shows in the claim: ``REVERSED`` with the patient's money given back, or the refusal.

Item names, categories and classes come from the host catalogue, not from the desk: the desk
sends codes, quantities and prices; a code the catalogue lacks is a 422 naming the line.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Final, Literal

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, Field, field_validator

from adapters.backoffice import ClaimEvent, CloseDecision
from adapters.directory import province_of
from adapters.gateway.app import GatewayContext, context
from adapters.gateway.auth import require
from adapters.gateway.problems import PROBLEM_RESPONSES, In, Problem, bad_field, not_found
from adapters.host import AdmissionRefused, ClaimActionRefused, ClaimStatus
from adapters.rules import item_amount_fen
from bus.models import ClaimItem, ErrorCode, ReversalReason, SettlementMode, VisitType, yuan

router = APIRouter(prefix="/v1", tags=["hospital desk"], responses=PROBLEM_RESPONSES)

PERSON_ID_PATTERN: Final = r"^\d{17}[\dX]$"
"""An 18-character resident ID number."""
DESK_TEXT: Final = {
    ErrorCode.NOT_FILED: "未查询到您的异地就医备案，暂不能直接结算。请先在参保地办理备案，"
    "或本次先全额垫付，回参保地报销。",
    ErrorCode.FILING_EXPIRED: "您的异地就医备案不在有效期内或不含本地，暂不能直接结算。"
    "请在参保地更新备案。",
    ErrorCode.HOSPITAL_NOT_DESIGNATED: "本院不是您参保地开通的跨省异地就医定点医疗机构，"
    "暂不能直接结算。",
    ErrorCode.REGION_NOT_CONNECTED: "您的参保地尚未与本省开通跨省异地就医直接结算。",
}
"""What the desk shows the patient when admission is refused (by the contract's code)."""

ClaimId = Annotated[str, Path(pattern=r"^C-\d{6}-[A-Za-z0-9-]{1,60}$", max_length=72)]
AdmissionId = Annotated[str, Path(pattern=r"^A-\d{6}-[A-Za-z0-9-]{1,60}$", max_length=72)]


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError("needs a time zone, e.g. 2026-05-08T09:30:00+08:00")
    return value


class _In(In):
    """A request body of this module (see :class:`adapters.gateway.problems.In`)."""


class AdmitIn(_In):
    """A patient at the admission desk."""

    person_id: str = Field(pattern=PERSON_ID_PATTERN, description="resident ID number")
    home_region: str = Field(pattern=r"^\d{6}$", description="insured region (参保地统筹区)")
    hospital_code: str = Field(pattern=r"^[A-Z0-9]{1,32}$", description="this hospital's code")
    admitted_at: dt.datetime | None = Field(default=None, description="default: now")

    _check_at = field_validator("admitted_at")(_aware)


class AdmitOut(BaseModel):
    """Admitted (with an admission id and the mode), or refused with the reason."""

    outcome: Literal["ADMITTED", "REFUSED"]
    admission_id: str | None = None
    mode: SettlementMode | None = None
    filing_id: str | None = None
    hospital_code: str
    admitted_at: dt.datetime | None = None
    code: ErrorCode | None = None
    """The contract's error code of a refusal (the home was told with an ErrorReport)."""
    text: str | None = None
    """Why, for the desk."""
    desk_text: str | None = None
    """What the desk shows the patient."""


class ItemIn(_In):
    """One line of the bill, as the hospital's system has it."""

    item_code: str = Field(min_length=1, max_length=32, description="host catalogue code")
    quantity_milli: int = Field(gt=0, le=1_000_000_000, description="quantity × 1000")
    unit_price_fen: int = Field(ge=0, le=10_000_000_000, description="unit price in fen")


class DischargeIn(_In):
    """The bill at discharge."""

    visit_type: VisitType
    diagnoses: list[Annotated[str, Field(pattern=r"^[A-Z][0-9A-Z.]{1,9}$")]] = Field(
        min_length=1, max_length=20, description="ICD-10 codes"
    )
    items: list[ItemIn] = Field(min_length=1, max_length=1000)
    discharged_at: dt.datetime | None = Field(default=None, description="default: now")

    _check_at = field_validator("discharged_at")(_aware)


class ClaimSent(BaseModel):
    """A claim packaged and sent to the home."""

    claim_id: str
    admission_id: str
    mode: SettlementMode
    total_fen: int
    advance_fen: int
    """What the desk collects now (DELAYED: ≤25% of the bill; else 0)."""
    total_yuan: str
    advance_yuan: str
    state: str


class AdmissionOut(BaseModel):
    admission_id: str
    mode: SettlementMode
    hospital_code: str
    filing_id: str
    admitted_at: dt.datetime
    claim_id: str | None
    """Set once discharged."""


class EventOut(BaseModel):
    seq: int
    at: dt.datetime
    kind: str
    state: str
    detail: str


class ReviewOut(BaseModel):
    decision: str
    eligible_fen: int
    deductible_fen: int
    fund_fen: int
    critical_illness_fen: int
    assistance_fen: int
    personal_fen: int
    balance_fen: int
    reviewer: str
    reviewed_at: dt.datetime


class ClaimOut(BaseModel):
    """A claim as the hospital desk sees it."""

    claim_id: str
    state: str
    mode: SettlementMode
    home: str
    total_fen: int
    advance_fen: int
    top_up_fen: int
    """What the patient pays at settlement (少补)."""
    refund_fen: int
    """What is refunded to the patient (多退)."""
    paid_in_full_fen: int
    patient_paid_fen: int
    total_yuan: str
    advance_yuan: str
    top_up_yuan: str
    refund_yuan: str
    submitted_at: dt.datetime | None
    deadline: dt.datetime | None
    acknowledged_at: dt.datetime | None
    expected_by: dt.datetime | None
    overdue_since: dt.datetime | None
    review: ReviewOut | None
    error_code: str | None
    close_decision: str | None
    close_reason: str | None
    reversal_id: str | None = None
    reversal_state: str | None = Field(
        default=None, description="REQUESTED, CONFIRMED, REFUSED:<code> or FAILED:<code>"
    )
    reversal_refund_fen: int = Field(
        default=0, description="given back to the patient when the reversal was confirmed"
    )
    reversal_recovery_fen: int = Field(
        default=0, description="taken back from the patient (a refund he had been paid)"
    )
    timeline: list[EventOut]


class ResendOut(BaseModel):
    claim_id: str
    request_id: str


class ReversalIn(_In):
    """Why the settled claim is cancelled, and who asks."""

    reason: ReversalReason
    note: str = Field(default="", max_length=500, description="for the home's desk")
    operator: str = Field(min_length=1, max_length=64)
    reversal_id: str | None = Field(
        default=None,
        pattern=r"^V-\d{6}-[0-9A-Za-z-]{1,40}$",
        description="default: V-<province>-<unique>; the same id again asks nothing new",
    )


class ReversalOut(BaseModel):
    claim_id: str
    reversal_id: str
    state: str
    """The claim's reversal state: REQUESTED until the home answers."""


class CloseIn(_In):
    decision: CloseDecision
    reason: str = Field(min_length=1, max_length=500)
    operator: str = Field(min_length=1, max_length=64)


def _ms(ms: int | None) -> dt.datetime | None:
    return None if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _event(e: ClaimEvent) -> EventOut:
    at = _ms(e.at_ms)
    assert at is not None
    return EventOut(seq=e.seq, at=at, kind=e.kind.value, state=e.state.name, detail=e.detail)


def claim_out(s: ClaimStatus) -> ClaimOut:
    """The API shape of a claim's status."""
    r = s.review
    return ClaimOut(
        claim_id=s.claim_id,
        state=s.state.name,
        mode=s.mode,
        home=s.home,
        total_fen=s.total_fen,
        advance_fen=s.advance_fen,
        top_up_fen=s.top_up_fen,
        refund_fen=s.refund_fen,
        paid_in_full_fen=s.paid_in_full_fen,
        patient_paid_fen=s.patient_paid_fen,
        total_yuan=yuan(s.total_fen),
        advance_yuan=yuan(s.advance_fen),
        top_up_yuan=yuan(s.top_up_fen),
        refund_yuan=yuan(s.refund_fen),
        submitted_at=_ms(s.submitted_at_ms),
        deadline=_ms(s.deadline_ms),
        acknowledged_at=_ms(s.acknowledged_at_ms),
        expected_by=_ms(s.expected_by_ms),
        overdue_since=_ms(s.overdue_since_ms),
        review=None
        if r is None
        else ReviewOut(
            decision=r.decision.value,
            eligible_fen=r.eligible_fen,
            deductible_fen=r.deductible_fen,
            fund_fen=r.fund_fen,
            critical_illness_fen=r.critical_illness_fen,
            assistance_fen=r.assistance_fen,
            personal_fen=r.personal_fen,
            balance_fen=r.balance_fen,
            reviewer=r.reviewer,
            reviewed_at=r.reviewed_at,
        ),
        error_code=s.error_code,
        close_decision=None if s.close_decision is None else s.close_decision.value,
        close_reason=s.close_reason,
        reversal_id=s.reversal_id,
        reversal_state=s.reversal_state,
        reversal_refund_fen=s.reversal_refund_fen,
        reversal_recovery_fen=s.reversal_recovery_fen,
        timeline=[_event(e) for e in s.timeline],
    )


@router.post("/admissions", response_model=AdmitOut, response_model_exclude_none=True)
async def admit(
    body: AdmitIn,
    response: Response,
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("hospital")),
) -> AdmitOut:
    """Admit a patient for direct settlement (201), or refuse (200, ``REFUSED``: the home is
    told with an ErrorReport, as the contract's 报错联系 asks)."""
    region = ctx.directory.region(body.home_region)
    if region is None:
        raise bad_field("home_region", f"unknown region {body.home_region}")
    if province_of(body.home_region) == ctx.province:
        raise bad_field(
            "home_region", f"a region of {ctx.province} itself: not a cross-province visit"
        )
    at = body.admitted_at or dt.datetime.now(dt.UTC)
    try:
        admission = await ctx.system.host.admit(
            body.person_id, body.home_region, body.hospital_code, at
        )
    except AdmissionRefused as refused:
        return AdmitOut(
            outcome="REFUSED",
            hospital_code=body.hospital_code,
            code=refused.code,
            text=refused.text,
            desk_text=DESK_TEXT.get(refused.code, "暂不能直接结算，请咨询参保地经办机构。"),
        )
    stored = ctx.admissions.add(admission)
    response.status_code = 201
    return AdmitOut(
        outcome="ADMITTED",
        admission_id=stored.admission_id,
        mode=admission.mode,
        filing_id=admission.filing.filing_id,
        hospital_code=admission.hospital_code,
        admitted_at=admission.admitted_at,
    )


@router.get("/admissions/{admission_id}", response_model=AdmissionOut)
async def get_admission(
    admission_id: AdmissionId,
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("hospital", "ops")),
) -> AdmissionOut:
    """An admission, and its claim id once discharged."""
    stored = ctx.admissions.get(admission_id)
    if stored is None:
        raise not_found(f"no admission {admission_id} at {ctx.province}")
    a = stored.admission
    claimed = ctx.system.backoffice.claim(stored.claim_id)
    return AdmissionOut(
        admission_id=stored.admission_id,
        mode=a.mode,
        hospital_code=a.hospital_code,
        filing_id=a.filing.filing_id,
        admitted_at=a.admitted_at,
        claim_id=stored.claim_id if claimed is not None else None,
    )


@router.post(
    "/admissions/{admission_id}/discharge",
    response_model=ClaimSent,
    status_code=201,
    responses={200: {"model": ClaimSent, "description": "discharged before: the same claim"}},
)
async def discharge(
    admission_id: AdmissionId,
    body: DischargeIn,
    response: Response,
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("hospital")),
) -> ClaimSent:
    """Package the bill (打包) under the agreement's mode and send the claim to the home. The
    claim, its advance and the outgoing record commit in one step; the answer comes when the
    record is with the broker. A second discharge of the same admission returns the claim
    sent the first time (200) and sends nothing."""
    stored = ctx.admissions.get(admission_id)
    if stored is None:
        raise not_found(f"no admission {admission_id} at {ctx.province}")
    host = ctx.system.host
    existing = ctx.system.backoffice.claim(stored.claim_id)
    if existing is not None:
        response.status_code = 200
        return _sent(stored.admission_id, existing.claim.claim_id, ctx)
    catalogue = ctx.directory.catalogue(ctx.province)
    items: list[ClaimItem] = []
    for n, line in enumerate(body.items):
        entry = catalogue.get(line.item_code)
        if entry is None:
            raise bad_field(
                f"items.{n}.item_code", f"{line.item_code} is not in {ctx.province}'s catalogue"
            )
        items.append(
            ClaimItem(
                item_code=entry.item_code,
                item_name=entry.item_name,
                category=entry.category,
                catalogue_class=entry.catalogue_class,
                quantity_milli=line.quantity_milli,
                unit_price_fen=line.unit_price_fen,
                amount_fen=item_amount_fen(line.quantity_milli, line.unit_price_fen),
            )
        )
    admission = stored.admission
    discharged = body.discharged_at or dt.datetime.now(dt.UTC)
    if discharged < admission.admitted_at:
        raise bad_field("discharged_at", "before the admission")
    claim = host.package(
        admission,
        tuple(items),
        visit_type=body.visit_type,
        diagnoses=tuple(body.diagnoses),
        discharged_at=discharged,
        claim_id=stored.claim_id,
    )
    await host.submit(claim)
    return _sent(stored.admission_id, claim.claim_id, ctx)


def _sent(admission_id: str, claim_id: str, ctx: GatewayContext) -> ClaimSent:
    status = ctx.system.host.claim_status(claim_id)
    assert status is not None
    return ClaimSent(
        claim_id=claim_id,
        admission_id=admission_id,
        mode=status.mode,
        total_fen=status.total_fen,
        advance_fen=status.advance_fen,
        total_yuan=yuan(status.total_fen),
        advance_yuan=yuan(status.advance_fen),
        state=status.state.name,
    )


@router.get("/claims/{claim_id}", response_model=ClaimOut)
async def get_claim(
    claim_id: ClaimId,
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("hospital", "ops")),
) -> ClaimOut:
    """Where the claim stands: its money (advance, then top-up or refund) and timeline."""
    status = ctx.system.host.claim_status(claim_id)
    if status is None:
        raise not_found(f"no claim {claim_id} at {ctx.province}")
    return claim_out(status)


@router.post("/claims/{claim_id}/resend", response_model=ResendOut)
async def resend_claim(
    claim_id: ClaimId,
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("ops")),
) -> ResendOut:
    """Send an open claim again as a new request (an overdue one, typically)."""
    if ctx.system.backoffice.claim(claim_id) is None:
        raise not_found(f"no claim {claim_id} at {ctx.province}")
    try:
        request_id = await ctx.system.host.resend_claim(claim_id, operator="ops")
    except ClaimActionRefused as exc:
        raise Problem(409, "conflict", str(exc)) from None
    return ResendOut(claim_id=claim_id, request_id=request_id)


@router.post("/claims/{claim_id}/close", response_model=ClaimOut)
async def close_claim(
    claim_id: ClaimId,
    body: CloseIn,
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("ops")),
) -> ClaimOut:
    """Close an open claim by an operator's decision (keep or refund the advance)."""
    if ctx.system.backoffice.claim(claim_id) is None:
        raise not_found(f"no claim {claim_id} at {ctx.province}")
    try:
        await ctx.system.host.close_claim(
            claim_id, body.decision, reason=body.reason, operator=body.operator
        )
    except ClaimActionRefused as exc:
        raise Problem(409, "conflict", str(exc)) from None
    status = ctx.system.host.claim_status(claim_id)
    assert status is not None
    return claim_out(status)


@router.post("/claims/{claim_id}/reversal", response_model=ReversalOut, status_code=202)
async def reverse_claim(
    claim_id: ClaimId,
    body: ReversalIn,
    ctx: GatewayContext = Depends(context),
    _: object = Depends(require("hospital", "ops")),
) -> ReversalOut:
    """Ask the home to cancel a settled claim (冲正); 202: asked, the home answers later
    (``GET /v1/claims/{claim_id}``: ``REVERSED``, or the refusal). 409: not settled, past
    the 30-day window, or a reversal asked or confirmed already."""
    if ctx.system.backoffice.claim(claim_id) is None:
        raise not_found(f"no claim {claim_id} at {ctx.province}")
    try:
        reversal_id = await ctx.system.host.reverse_claim(
            claim_id, body.reason, body.note, body.operator, reversal_id=body.reversal_id
        )
    except ClaimActionRefused as exc:
        raise Problem(409, "conflict", str(exc)) from None
    claim = ctx.system.backoffice.claim(claim_id)
    state = claim.reversal_state if claim is not None else None
    return ReversalOut(claim_id=claim_id, reversal_id=reversal_id, state=state or "REQUESTED")
