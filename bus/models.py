"""Typed messages of wire contract v1, one pydantic model per Avro record.

Kept in lockstep with ``schemas/*.avsc`` by ``tests/test_models_match_schemas.py``: a field
added, renamed or retyped on one side and not the other fails that test. Money is ``int`` fen,
times are timezone-aware UTC datetimes truncated to the millisecond (what ``timestamp-millis``
carries), dates are ``datetime.date``.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _utc_millis(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    value = value.astimezone(dt.UTC)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


Timestamp = Annotated[dt.datetime, AfterValidator(_utc_millis)]
"""A UTC instant at millisecond precision (Avro ``timestamp-millis``)."""

Fen = Annotated[int, Field(strict=True)]
"""An amount of money in fen (1 yuan = 100 fen). Never a float."""


def yuan(fen: int) -> str:
    """Fen as a yuan string with two decimals and thousands separators: ``-1,250.00``."""
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(int(fen)), 100)
    return f"{sign}{whole:,}.{cents:02d}"


def now() -> dt.datetime:
    """The current instant, as a :data:`Timestamp` value."""
    return _utc_millis(dt.datetime.now(dt.UTC))


# --- Enums (symbols exactly as in the .avsc files) -------------------------------------------
# Every enum ends with UNKNOWN, its Avro default (contract v1.3): a reader maps a symbol added
# after its version to UNKNOWN instead of failing; writers never send it, and a required field
# that reads UNKNOWN is refused as INVALID_MESSAGE (bus.envelope.check). ErrorCode's UNKNOWN is
# a code like the others ("a code added later"), and AckState's is a state.
class FilingAction(StrEnum):
    CREATE = "CREATE"
    UPDATE = "UPDATE"
    REVOKE = "REVOKE"
    UNKNOWN = "UNKNOWN"


class InsuranceType(StrEnum):
    EMPLOYEE = "EMPLOYEE"
    RESIDENT = "RESIDENT"
    RETIRED_CADRE = "RETIRED_CADRE"
    UNKNOWN = "UNKNOWN"


class FilingReason(StrEnum):
    RELOCATED_RETIREE = "RELOCATED_RETIREE"
    LONG_TERM_RESIDENT = "LONG_TERM_RESIDENT"
    STATIONED_WORKER = "STATIONED_WORKER"
    REFERRAL = "REFERRAL"
    MIGRANT_WORKER = "MIGRANT_WORKER"
    EMERGENCY = "EMERGENCY"
    TEMPORARY = "TEMPORARY"
    UNKNOWN = "UNKNOWN"


class FilingChannel(StrEnum):
    COUNTER = "COUNTER"
    PHONE = "PHONE"
    FAX = "FAX"
    APP = "APP"
    WEB = "WEB"
    UNKNOWN = "UNKNOWN"


class FilingStatus(StrEnum):
    REGISTERED = "REGISTERED"
    UPDATED = "UPDATED"
    REVOKED = "REVOKED"
    UNKNOWN = "UNKNOWN"


class SettlementMode(StrEnum):
    INSTANT = "INSTANT"
    DELAYED = "DELAYED"
    POINT_TO_POINT = "POINT_TO_POINT"
    UNKNOWN = "UNKNOWN"


class VisitType(StrEnum):
    INPATIENT = "INPATIENT"
    OUTPATIENT = "OUTPATIENT"
    CHRONIC_OUTPATIENT = "CHRONIC_OUTPATIENT"
    PHARMACY = "PHARMACY"
    UNKNOWN = "UNKNOWN"


class ItemCategory(StrEnum):
    DRUG = "DRUG"
    TREATMENT = "TREATMENT"
    FACILITY = "FACILITY"
    UNKNOWN = "UNKNOWN"


class CatalogueClass(StrEnum):
    A = "A"
    B = "B"
    SELF_PAY = "SELF_PAY"
    UNKNOWN = "UNKNOWN"


class ReviewDecision(StrEnum):
    APPROVED = "APPROVED"
    PARTIAL = "PARTIAL"
    REJECTED = "REJECTED"
    UNKNOWN = "UNKNOWN"


class ErrorCode(StrEnum):
    NOT_FILED = "NOT_FILED"
    FILING_EXPIRED = "FILING_EXPIRED"
    HOSPITAL_NOT_DESIGNATED = "HOSPITAL_NOT_DESIGNATED"
    REGION_NOT_CONNECTED = "REGION_NOT_CONNECTED"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    AMOUNT_MISMATCH = "AMOUNT_MISMATCH"
    CATALOGUE_ITEM_UNKNOWN = "CATALOGUE_ITEM_UNKNOWN"
    DUPLICATE_CLAIM = "DUPLICATE_CLAIM"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    ORPHAN_REPLY = "ORPHAN_REPLY"
    SIGNATURE_INVALID = "SIGNATURE_INVALID"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    UNKNOWN = "UNKNOWN"
    # Symbols are only appended (after UNKNOWN too): an old reader reads a new one as UNKNOWN.
    RECONCILIATION_MISMATCH = "RECONCILIATION_MISMATCH"
    CLEARING_DISPUTED = "CLEARING_DISPUTED"


class Severity(StrEnum):
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"
    UNKNOWN = "UNKNOWN"


# --- Records ---------------------------------------------------------------------------------
class Message(BaseModel):
    """Base of every top-level message; ``avro_name`` is its full Avro name."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    avro_name: ClassVar[str] = ""
    """Full Avro name, also the ``xs-message-type`` header."""


class FilingUpload(Message):
    avro_name: ClassVar[str] = "xsettle.v1.FilingUpload"
    filing_id: str
    action: FilingAction
    person_id: str
    person_name: str
    insurance_type: InsuranceType
    home_region: str
    host_region: str
    reason: FilingReason
    channel: FilingChannel
    valid_from: dt.date
    valid_until: dt.date | None = None
    referral_hospital: str | None = None
    filed_at: Timestamp


class FilingReceipt(Message):
    avro_name: ClassVar[str] = "xsettle.v1.FilingReceipt"
    filing_id: str
    person_id: str
    host_region: str
    status: FilingStatus
    received_at: Timestamp


class ClaimItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    item_code: str
    item_name: str
    category: ItemCategory
    catalogue_class: CatalogueClass
    quantity_milli: int
    unit_price_fen: Fen
    amount_fen: Fen


class ClaimPackage(Message):
    avro_name: ClassVar[str] = "xsettle.v1.ClaimPackage"
    claim_id: str
    filing_id: str
    person_id: str
    home_region: str
    host_region: str
    hospital_code: str
    hospital_level: int
    settlement_mode: SettlementMode
    visit_type: VisitType
    admitted_at: Timestamp
    discharged_at: Timestamp
    diagnoses: tuple[str, ...]
    items: tuple[ClaimItem, ...]
    total_fen: Fen
    advance_fen: Fen
    submitted_at: Timestamp
    insurance_type: InsuranceType | None = None


class ItemAdjustment(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    item_code: str
    approved_fen: Fen
    reason_code: str
    note: str


class ReviewResult(Message):
    avro_name: ClassVar[str] = "xsettle.v1.ReviewResult"
    claim_id: str
    decision: ReviewDecision
    total_fen: Fen
    eligible_fen: Fen
    deductible_fen: Fen
    fund_fen: Fen
    critical_illness_fen: Fen
    assistance_fen: Fen
    personal_fen: Fen
    advance_fen: Fen
    balance_fen: Fen
    adjustments: tuple[ItemAdjustment, ...]
    reviewer: str
    reviewed_at: Timestamp


class SettlementNotice(Message):
    avro_name: ClassVar[str] = "xsettle.v1.SettlementNotice"
    claim_id: str
    personal_paid_fen: Fen
    fund_fen: Fen
    critical_illness_fen: Fen
    assistance_fen: Fen
    settled_at: Timestamp
    advance_fen: Fen | None = None
    balance_fen: Fen | None = None


class ErrorReport(Message):
    avro_name: ClassVar[str] = "xsettle.v1.ErrorReport"
    error_id: str
    code: ErrorCode = ErrorCode.UNKNOWN
    message: str
    ref_message_id: str | None = None
    ref_message_type: str | None = None
    ref_topic: str | None = None
    ref_partition: int | None = None
    ref_offset: int | None = None
    detected_by: str
    origin: str
    responsible: str
    retriable: bool
    severity: Severity
    occurred_at: Timestamp
    details: dict[str, str] = Field(default_factory=dict)


class AckState(StrEnum):
    """Where an acknowledged request stands (contract v1.2)."""

    RECEIVED = "RECEIVED"
    ACCEPTED_FOR_REVIEW = "ACCEPTED_FOR_REVIEW"
    UNKNOWN = "UNKNOWN"


class RequestAcknowledgement(Message):
    """Non-terminal: the request arrived and its answer is expected by ``expected_by``."""

    avro_name: ClassVar[str] = "xsettle.v1.RequestAcknowledgement"
    request_type: str
    subject_id: str
    state: AckState = AckState.UNKNOWN
    expected_by: Timestamp | None = None
    note: str = ""
    acknowledged_at: Timestamp


class ReversalReason(StrEnum):
    """Why a host cancels a settled claim (冲正/撤销, contract v1.3)."""

    WRONG_PATIENT = "WRONG_PATIENT"
    DUPLICATE_BILL = "DUPLICATE_BILL"
    READMISSION_BILLED_APART = "READMISSION_BILLED_APART"
    OTHER = "OTHER"
    UNKNOWN = "UNKNOWN"


class ReversalDecision(StrEnum):
    """The home's answer to a reversal (contract v1.3)."""

    CONFIRMED = "CONFIRMED"
    REFUSED = "REFUSED"
    UNKNOWN = "UNKNOWN"


class ReversalRequest(Message):
    """The host cancels a claim it settled (request, claim family, contract v1.3)."""

    avro_name: ClassVar[str] = "xsettle.v1.ReversalRequest"
    reversal_id: str
    claim_id: str
    claim_request_id: str
    person_id: str
    home_region: str
    host_region: str
    reason: ReversalReason
    note: str = ""
    fund_fen: Fen
    critical_illness_fen: Fen
    assistance_fen: Fen
    personal_paid_fen: Fen
    requested_at: Timestamp


class ReversalResult(Message):
    """The home's one terminal answer to a reversal (reply, contract v1.3)."""

    avro_name: ClassVar[str] = "xsettle.v1.ReversalResult"
    reversal_id: str
    claim_id: str
    decision: ReversalDecision
    refusal_code: str | None = None
    note: str = ""
    fund_restored_fen: Fen = 0
    critical_illness_restored_fen: Fen = 0
    assistance_restored_fen: Fen = 0
    decided_at: Timestamp


class ReconciliationOutcome(StrEnum):
    """The home's verdict on a day's statement (对账, contract v1.3)."""

    MATCHED = "MATCHED"
    MISMATCHED = "MISMATCHED"
    UNKNOWN = "UNKNOWN"


class DifferenceKind(StrEnum):
    """How host and home disagree about one claim (contract v1.3)."""

    MISSING_AT_HOME = "MISSING_AT_HOME"
    MISSING_AT_HOST = "MISSING_AT_HOST"
    AMOUNT_DIFFERS = "AMOUNT_DIFFERS"
    REVERSAL_DIFFERS = "REVERSAL_DIFFERS"
    UNKNOWN = "UNKNOWN"


class ReconciliationLine(BaseModel):
    """One claim a host settled with a home on the statement's day."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    claim_id: str
    total_fen: Fen
    fund_fen: Fen
    critical_illness_fen: Fen
    assistance_fen: Fen
    personal_fen: Fen
    advance_fen: Fen
    reversed: bool


class ReconciliationStatement(Message):
    """The host's totals and lines of one day with one home (request, settlement family,
    contract v1.3); see ``adapters.reconciliation`` for the digest's canonical form."""

    avro_name: ClassVar[str] = "xsettle.v1.ReconciliationStatement"
    statement_id: str
    host: str
    home: str
    day: dt.date
    count: int
    total_fen: Fen
    fund_fen: Fen
    critical_illness_fen: Fen
    assistance_fen: Fen
    personal_fen: Fen
    advance_fen: Fen
    digest: str
    lines: tuple[ReconciliationLine, ...]
    stated_at: Timestamp


class ReconciliationDifference(BaseModel):
    """One claim on which host and home disagree."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    claim_id: str
    kind: DifferenceKind
    host_fund_fen: Fen | None = None
    home_fund_fen: Fen | None = None
    responsible: str
    note: str


class ReconciliationResult(Message):
    """The home's one terminal answer to a statement (reply, contract v1.3)."""

    avro_name: ClassVar[str] = "xsettle.v1.ReconciliationResult"
    statement_id: str
    day: dt.date
    outcome: ReconciliationOutcome
    count: int
    fund_fen: Fen
    critical_illness_fen: Fen
    assistance_fen: Fen
    personal_fen: Fen
    differences: tuple[ReconciliationDifference, ...]
    reconciled_at: Timestamp


class ClearingDecision(StrEnum):
    """The home's answer to a month's clearing statement (清算, contract v1.3)."""

    CONFIRMED = "CONFIRMED"
    DISPUTED = "DISPUTED"
    UNKNOWN = "UNKNOWN"


class ClearingLine(BaseModel):
    """One claim a host settled with a home in the statement's month."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    claim_id: str
    fund_fen: Fen
    critical_illness_fen: Fen
    assistance_fen: Fen
    reversed: bool


class ClearingStatement(Message):
    """What the home's funds owe the host for one month (request, settlement family, contract
    v1.3); see ``adapters.clearing``."""

    avro_name: ClassVar[str] = "xsettle.v1.ClearingStatement"
    statement_id: str
    host: str
    home: str
    month: str
    version: int
    replaces: str | None = None
    claims: int
    fund_fen: Fen
    critical_illness_fen: Fen
    assistance_fen: Fen
    reversed_claims: int
    owed_fen: Fen
    lines: tuple[ClearingLine, ...]
    stated_at: Timestamp


class ClearingDispute(BaseModel):
    """One line of a clearing statement the home does not accept."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    claim_id: str
    reason_code: str
    note: str
    home_owed_fen: Fen | None = None


class ClearingResponse(Message):
    """The home's one terminal answer to a clearing statement (reply, contract v1.3)."""

    avro_name: ClassVar[str] = "xsettle.v1.ClearingResponse"
    statement_id: str
    month: str
    decision: ClearingDecision
    confirmed_fen: Fen
    disputed_fen: Fen
    disputes: tuple[ClearingDispute, ...]
    decided_at: Timestamp


MESSAGE_TYPES: tuple[type[Message], ...] = (
    FilingUpload,
    FilingReceipt,
    ClaimPackage,
    ReviewResult,
    SettlementNotice,
    ErrorReport,
    RequestAcknowledgement,
    ReversalRequest,
    ReversalResult,
    ReconciliationStatement,
    ReconciliationResult,
    ClearingStatement,
    ClearingResponse,
)
"""Every top-level family, in contract order."""

MODEL_BY_NAME: dict[str, type[Message]] = {m.avro_name: m for m in MESSAGE_TYPES}
"""Model class by full Avro name (the ``xs-message-type`` header)."""
