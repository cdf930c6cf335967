"""Sample messages of every family, valid under the contract, for tests and the benchmark."""

from __future__ import annotations

import datetime as dt

from bus.models import (
    AckState,
    CatalogueClass,
    ClaimItem,
    ClaimPackage,
    ClearingDecision,
    ClearingLine,
    ClearingResponse,
    ClearingStatement,
    ErrorCode,
    ErrorReport,
    FilingAction,
    FilingChannel,
    FilingReason,
    FilingReceipt,
    FilingStatus,
    FilingUpload,
    InsuranceType,
    ItemAdjustment,
    ItemCategory,
    Message,
    ReconciliationLine,
    ReconciliationOutcome,
    ReconciliationResult,
    ReconciliationStatement,
    RequestAcknowledgement,
    ReversalDecision,
    ReversalReason,
    ReversalRequest,
    ReversalResult,
    ReviewDecision,
    ReviewResult,
    SettlementMode,
    SettlementNotice,
    Severity,
    VisitType,
)

AT = dt.datetime(2026, 5, 17, 9, 30, 12, 345000, tzinfo=dt.UTC)
PERSON = "130102195001011234"


def filing(home: str = "130100", host: str = "460100", person: str = PERSON) -> FilingUpload:
    """A CREATE filing from ``home`` region to ``host`` region."""
    return FilingUpload(
        filing_id=f"F-{home}-1",
        action=FilingAction.CREATE,
        person_id=person,
        person_name="张建国",
        insurance_type=InsuranceType.EMPLOYEE,
        home_region=home,
        host_region=host,
        reason=FilingReason.RELOCATED_RETIREE,
        channel=FilingChannel.APP,
        valid_from=dt.date(2026, 1, 1),
        valid_until=None,
        referral_hospital=None,
        filed_at=AT,
    )


def claim(
    home: str = "130100",
    host: str = "460100",
    claim_id: str | None = None,
    person: str = PERSON,
) -> ClaimPackage:
    """A DELAYED inpatient claim of 250 yuan with two items."""
    items = (
        ClaimItem(
            item_code="D001",
            item_name="阿莫西林胶囊",
            category=ItemCategory.DRUG,
            catalogue_class=CatalogueClass.A,
            quantity_milli=2000,
            unit_price_fen=5000,
            amount_fen=10000,
        ),
        ClaimItem(
            item_code="F001",
            item_name="床位费",
            category=ItemCategory.FACILITY,
            catalogue_class=CatalogueClass.B,
            quantity_milli=3000,
            unit_price_fen=5000,
            amount_fen=15000,
        ),
    )
    return ClaimPackage(
        claim_id=claim_id or f"C-{host}-1",
        filing_id=f"F-{home}-1",
        person_id=person,
        home_region=home,
        host_region=host,
        hospital_code="H46010001",
        hospital_level=3,
        settlement_mode=SettlementMode.DELAYED,
        visit_type=VisitType.INPATIENT,
        admitted_at=AT,
        discharged_at=AT + dt.timedelta(days=3),
        diagnoses=("K35.8",),
        items=items,
        total_fen=25000,
        advance_fen=6250,
        submitted_at=AT + dt.timedelta(days=3, hours=1),
    )


def receipt() -> FilingReceipt:
    """A receipt for :func:`filing`."""
    return FilingReceipt(
        filing_id="F-130100-1",
        person_id=PERSON,
        host_region="460100",
        status=FilingStatus.REGISTERED,
        received_at=AT,
    )


def review(claim_id: str = "C-460100-1") -> ReviewResult:
    """A partial review of :func:`claim`."""
    return ReviewResult(
        claim_id=claim_id,
        decision=ReviewDecision.PARTIAL,
        total_fen=25000,
        eligible_fen=23500,
        deductible_fen=0,
        fund_fen=18800,
        critical_illness_fen=0,
        assistance_fen=0,
        personal_fen=6200,
        advance_fen=6250,
        balance_fen=-50,
        adjustments=(
            ItemAdjustment(
                item_code="F001", approved_fen=13500, reason_code="B_SELF_SHARE", note="10%"
            ),
        ),
        reviewer="130100-auto",
        reviewed_at=AT,
    )


def notice() -> SettlementNotice:
    """A settlement notice for :func:`claim`."""
    return SettlementNotice(
        claim_id="C-460100-1",
        personal_paid_fen=6200,
        fund_fen=18800,
        critical_illness_fen=0,
        assistance_fen=0,
        settled_at=AT,
    )


def error_report() -> ErrorReport:
    """A NOT_FILED report."""
    return ErrorReport(
        error_id="E-1",
        code=ErrorCode.NOT_FILED,
        message="no filing",
        ref_message_id="m-1",
        ref_message_type="xsettle.v1.ClaimPackage",
        ref_topic="xsettle.claim.130000",
        ref_partition=1,
        ref_offset=42,
        detected_by="460000",
        origin="460000",
        responsible="130000",
        retriable=False,
        severity=Severity.ERROR,
        occurred_at=AT,
        details={"hospital": "H46010001"},
    )


def acknowledgement(claim_id: str = "C-460100-1") -> RequestAcknowledgement:
    """The home's acknowledgement of :func:`claim`: accepted for review, due in two weeks."""
    return RequestAcknowledgement(
        request_type=ClaimPackage.avro_name,
        subject_id=claim_id,
        state=AckState.ACCEPTED_FOR_REVIEW,
        expected_by=AT + dt.timedelta(days=14),
        note="delayed review",
        acknowledged_at=AT,
    )


def reversal_request() -> ReversalRequest:
    """The host's reversal of :func:`claim` as settled by :func:`notice`."""
    settled, paid = claim(), notice()
    return ReversalRequest(
        reversal_id="V-460100-1",
        claim_id=settled.claim_id,
        claim_request_id="6f9d2a4e-3b1c-4e8f-9a7d-2c5b8e1f4a63",
        person_id=settled.person_id,
        home_region=settled.home_region,
        host_region=settled.host_region,
        reason=ReversalReason.DUPLICATE_BILL,
        note="billed twice",
        fund_fen=paid.fund_fen,
        critical_illness_fen=paid.critical_illness_fen,
        assistance_fen=paid.assistance_fen,
        personal_paid_fen=paid.personal_paid_fen,
        requested_at=AT + dt.timedelta(days=5),
    )


def reversal_result() -> ReversalResult:
    """The home's confirmation of :func:`reversal_request`."""
    request = reversal_request()
    return ReversalResult(
        reversal_id=request.reversal_id,
        claim_id=request.claim_id,
        decision=ReversalDecision.CONFIRMED,
        fund_restored_fen=request.fund_fen,
        decided_at=AT + dt.timedelta(days=5, minutes=1),
    )


def reconciliation_statement() -> ReconciliationStatement:
    """The host's statement of the day :func:`notice` settled, with its one claim."""
    from adapters.reconciliation import china_day, digest

    settled, paid = claim(), notice()
    line = ReconciliationLine(
        claim_id=settled.claim_id,
        total_fen=settled.total_fen,
        fund_fen=paid.fund_fen,
        critical_illness_fen=paid.critical_illness_fen,
        assistance_fen=paid.assistance_fen,
        personal_fen=paid.personal_paid_fen,
        advance_fen=settled.advance_fen,
        reversed=False,
    )
    return ReconciliationStatement(
        statement_id="S-460000-20260517-1",
        host="460000",
        home="130000",
        day=china_day(paid.settled_at),
        count=1,
        total_fen=line.total_fen,
        fund_fen=line.fund_fen,
        critical_illness_fen=line.critical_illness_fen,
        assistance_fen=line.assistance_fen,
        personal_fen=line.personal_fen,
        advance_fen=line.advance_fen,
        digest=digest([line]),
        lines=(line,),
        stated_at=AT + dt.timedelta(hours=16),
    )


def reconciliation_result() -> ReconciliationResult:
    """The home's MATCHED answer to :func:`reconciliation_statement`."""
    stated = reconciliation_statement()
    return ReconciliationResult(
        statement_id=stated.statement_id,
        day=stated.day,
        outcome=ReconciliationOutcome.MATCHED,
        count=stated.count,
        fund_fen=stated.fund_fen,
        critical_illness_fen=stated.critical_illness_fen,
        assistance_fen=stated.assistance_fen,
        personal_fen=stated.personal_fen,
        differences=(),
        reconciled_at=AT + dt.timedelta(hours=16, minutes=1),
    )


def clearing_statement() -> ClearingStatement:
    """The host's first clearing statement of the month :func:`notice` settled, with its one
    claim (the shares the home reviewed in :func:`review`)."""
    from adapters.clearing import china_month

    paid = notice()
    line = ClearingLine(
        claim_id=paid.claim_id,
        fund_fen=paid.fund_fen,
        critical_illness_fen=paid.critical_illness_fen,
        assistance_fen=paid.assistance_fen,
        reversed=False,
    )
    owed = line.fund_fen + line.critical_illness_fen + line.assistance_fen
    return ClearingStatement(
        statement_id="S-460000-202605-1",
        host="460000",
        home="130000",
        month=china_month(paid.settled_at),
        version=1,
        replaces=None,
        claims=1,
        fund_fen=line.fund_fen,
        critical_illness_fen=line.critical_illness_fen,
        assistance_fen=line.assistance_fen,
        reversed_claims=0,
        owed_fen=owed,
        lines=(line,),
        stated_at=AT + dt.timedelta(days=15),
    )


def clearing_response() -> ClearingResponse:
    """The home's CONFIRMED answer to :func:`clearing_statement`."""
    stated = clearing_statement()
    return ClearingResponse(
        statement_id=stated.statement_id,
        month=stated.month,
        decision=ClearingDecision.CONFIRMED,
        confirmed_fen=stated.owed_fen,
        disputed_fen=0,
        disputes=(),
        decided_at=AT + dt.timedelta(days=15, minutes=1),
    )


ALL: tuple[Message, ...] = (
    filing(),
    receipt(),
    claim(),
    review(),
    notice(),
    error_report(),
    acknowledgement(),
    reversal_request(),
    reversal_result(),
    reconciliation_statement(),
    reconciliation_result(),
    clearing_statement(),
    clearing_response(),
)
"""One valid message of every family."""
