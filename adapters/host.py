"""The host role (就医地): registers filings, admits patients, packages and settles claims.

At admission the host checks filing, validity, host region, designation and agreement; on
failure it refuses locally *and* tells the home with an ErrorReport (报错联系处理机制). At
discharge it packages the bill under the agreement's mode: DELAYED collects an advance of at
most 25% (the province may set less) and settles the balance after review (多退少补); INSTANT
and POINT_TO_POINT wait seconds for the review and, past the deadline, fall back to DELAYED
instead of failing the patient: the advance is collected and the late review settles it.
Settlement is idempotent by claim id, so a redelivered or late review never settles twice.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

import structlog

from adapters.backoffice import TERMINAL_STATES, ClaimState, HostBackOffice, HostClaim
from adapters.directory import Directory, province_of
from adapters.home import filing_covers
from adapters.rules import max_advance_fen
from bus.envelope import new_id
from bus.errors import Rejection
from bus.models import (
    ClaimItem,
    ClaimPackage,
    ErrorCode,
    ErrorReport,
    FilingReceipt,
    FilingUpload,
    Message,
    ReviewResult,
    SettlementMode,
    SettlementNotice,
    Severity,
    VisitType,
    now,
)
from bus.node import Answer, Context, Node, report

log = structlog.get_logger(__name__)

INSTANT_DEADLINE_S = 5.0
"""Instant settlement: the patient stands at the discharge desk; seconds, not minutes."""
DELAYED_DEADLINE_S = 7 * 24 * 3600.0
"""Delayed settlement: the home agency reviews by hand within days."""


class AdmissionRefused(Exception):
    """The patient cannot settle directly here; the home was told."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(f"{code.value}: {text}")
        self.code = code
        self.text = text


@dataclass(frozen=True, slots=True)
class Admission:
    """A patient admitted for direct settlement."""

    person_id: str
    """Who."""
    filing: FilingUpload
    """The filing that covers the visit."""
    hospital_code: str
    """Where."""
    hospital_level: int
    """The hospital's grade."""
    mode: SettlementMode
    """Settlement mode of the home's agreement with this province."""
    admitted_at: dt.datetime
    """When."""


class HostRole:
    """The host side of one province on the bus."""

    def __init__(
        self,
        node: Node,
        directory: Directory,
        backoffice: HostBackOffice,
        *,
        instant_deadline_s: float = INSTANT_DEADLINE_S,
        delayed_deadline_s: float = DELAYED_DEADLINE_S,
        advance_permille: int | None = None,
    ) -> None:
        self.node = node
        self.province = node.province
        self.directory = directory
        self.backoffice = backoffice
        self.instant_deadline_s = instant_deadline_s
        self.delayed_deadline_s = delayed_deadline_s
        self.advance_permille = min(
            advance_permille if advance_permille is not None else 250,
            directory.max_advance_permille(self.province),
        )
        self.latencies: list[tuple[str, float]] = []
        """(settlement mode, seconds from claim sent to its terminal answer), for reports."""
        node.on(FilingUpload)(self._on_filing)
        node.on_answer(ClaimPackage)(self._on_review)

    # --- filings --------------------------------------------------------------------------
    async def _on_filing(self, message: Message, ctx: Context) -> FilingReceipt:
        assert isinstance(message, FilingUpload)
        if self.directory.agreement(message.home_region, self.province) is None:
            raise Rejection(
                ErrorCode.REGION_NOT_CONNECTED,
                f"region {message.home_region} has no agreement with {self.province}",
                details={"responsible": ctx.envelope.source},
            )
        status = self.backoffice.register_filing(message)
        log.info("filing_registered", filing_id=message.filing_id, status=status.value)
        return FilingReceipt(
            filing_id=message.filing_id,
            person_id=message.person_id,
            host_region=message.host_region,
            status=status,
            received_at=now(),
        )

    # --- admission --------------------------------------------------------------------------
    async def admit(
        self, person_id: str, home_region: str, hospital_code: str, at: dt.datetime
    ) -> Admission:
        """Check that the patient can settle directly; refuse and tell the home if not."""
        hospital = self.directory.hospital(hospital_code)
        if hospital is None or hospital.province != self.province:
            await self._refuse(
                ErrorCode.HOSPITAL_NOT_DESIGNATED,
                f"{hospital_code} is not a cross-province designated hospital",
                person_id,
                home_region,
            )
        assert hospital is not None
        agreement = self.directory.agreement(home_region, self.province)
        if agreement is None:
            await self._refuse(
                ErrorCode.REGION_NOT_CONNECTED,
                f"{home_region} has no agreement with {self.province}",
                person_id,
                home_region,
            )
        assert agreement is not None
        if not self.directory.allows(agreement, hospital_code):
            await self._refuse(
                ErrorCode.HOSPITAL_NOT_DESIGNATED,
                f"{hospital_code} is not allowed by {home_region}'s agreement",
                person_id,
                home_region,
            )
        filing = self.backoffice.filing_for(person_id)
        if filing is None:
            await self._refuse(ErrorCode.NOT_FILED, "no filing", person_id, home_region)
        assert filing is not None
        why = filing_covers(filing, hospital.region, at.date())
        if why is not None:
            await self._refuse(
                why, f"filing {filing.filing_id} does not cover this visit", person_id, home_region
            )
        return Admission(
            person_id=person_id,
            filing=filing,
            hospital_code=hospital_code,
            hospital_level=hospital.level,
            mode=agreement.mode,
            admitted_at=at,
        )

    async def _refuse(self, code: ErrorCode, text: str, person_id: str, home_region: str) -> None:
        home = province_of(home_region)
        rep = report(
            code,
            text,
            detected_by=self.province,
            origin=self.province,
            responsible=home,
            severity=Severity.WARNING,
            details={"stage": "admission"},
        )
        await self.node.send_report(
            rep, to=home, key=person_id.encode("utf-8"), correlation_id=None
        )
        log.info("admission_refused", code=code.value, person_id=person_id, home=home)
        raise AdmissionRefused(code, text)

    # --- discharge ---------------------------------------------------------------------------
    def package(
        self,
        admission: Admission,
        items: tuple[ClaimItem, ...],
        *,
        visit_type: VisitType,
        diagnoses: tuple[str, ...],
        discharged_at: dt.datetime,
        claim_id: str | None = None,
    ) -> ClaimPackage:
        """Package the visit's bill (打包) under the agreement's mode."""
        total = sum(i.amount_fen for i in items)
        hospital = self.directory.hospital(admission.hospital_code)
        assert hospital is not None
        advance = 0
        if admission.mode is SettlementMode.DELAYED:
            advance = max_advance_fen(total, self.advance_permille)
        return ClaimPackage(
            claim_id=claim_id or f"C-{self.province}-{new_id()[:13]}",
            filing_id=admission.filing.filing_id,
            person_id=admission.person_id,
            home_region=admission.filing.home_region,
            host_region=hospital.region,
            hospital_code=admission.hospital_code,
            hospital_level=admission.hospital_level,
            settlement_mode=admission.mode,
            visit_type=visit_type,
            admitted_at=admission.admitted_at,
            discharged_at=discharged_at,
            diagnoses=diagnoses,
            items=items,
            total_fen=total,
            advance_fen=advance,
            submitted_at=now(),
        )

    async def submit(self, claim: ClaimPackage) -> str:
        """Collect the advance (DELAYED) and send the claim to the home, in one step: the
        claim row, its advance, the pending request and the outgoing record commit together,
        so a crash never charges an advance without the claim leaving, nor twice. Submitting
        a claim id again returns the first request id and changes nothing."""
        deadline = (
            self.delayed_deadline_s
            if claim.settlement_mode is SettlementMode.DELAYED
            else self.instant_deadline_s
        )
        async with self.node.step() as step:
            existing = self.backoffice.claim(claim.claim_id)
            if existing is not None and existing.request_id is not None:
                return existing.request_id
            request_id = await self.node.request(claim, deadline_s=deadline)
            self.backoffice.save_claim(
                HostClaim(
                    claim=claim,
                    request_id=request_id,
                    state=ClaimState.AWAITING_REVIEW,
                    advance_collected_fen=claim.advance_fen,
                ),
                payments=[("ADVANCE", claim.advance_fen)],
            )
        await self.node.delivered(step)  # the desk waits for the broker, not for the review
        return request_id

    # --- answers -------------------------------------------------------------------------------
    async def _on_review(self, answer: Answer) -> None:
        """The home's answer, in the step that stores it: settle, refuse or fall back."""
        claim = self.backoffice.claim_by_request(answer.request_id)
        if claim is None:
            log.warning("review_for_unknown_claim", request_id=answer.request_id)
            return
        if claim.state in TERMINAL_STATES:
            log.info("claim_already_closed", claim_id=claim.claim.claim_id, late=answer.late)
            return
        message = answer.message
        if not answer.late:
            self.latencies.append((claim.claim.settlement_mode.value, answer.latency_s))
        if isinstance(message, ReviewResult):
            await self._settle(claim, message)
        elif isinstance(message, ErrorReport):
            if message.code is ErrorCode.DEADLINE_EXCEEDED:
                self._fallback(claim)
            else:
                self._refused(claim, message)

    def _fallback(self, claim: HostClaim) -> None:
        """No answer in time: instant falls back to delayed; delayed stays pending (overdue)."""
        c = claim.claim
        if c.settlement_mode is SettlementMode.DELAYED:
            log.warning("delayed_review_overdue", claim_id=c.claim_id)
            return
        advance = max_advance_fen(c.total_fen, self.advance_permille)
        self.backoffice.save_claim(
            _with(claim, state=ClaimState.FALLBACK, advance_collected_fen=advance),
            payments=[("ADVANCE", advance)],
        )
        log.warning("instant_fell_back_to_delayed", claim_id=c.claim_id, advance_fen=advance)

    def _refused(self, claim: HostClaim, rep: ErrorReport) -> None:
        c = claim.claim
        rest = c.total_fen - claim.advance_collected_fen
        self.backoffice.save_claim(
            _with(claim, state=ClaimState.REFUSED, error_code=rep.code.value, balance_fen=rest),
            payments=[("FULL", rest)],
        )
        log.info("claim_refused", claim_id=c.claim_id, code=rep.code.value)

    async def _settle(self, claim: HostClaim, result: ReviewResult) -> None:
        c = claim.claim
        balance = result.personal_fen - claim.advance_collected_fen
        payment = ("TOP_UP", balance) if balance > 0 else ("REFUND", -balance)
        self.backoffice.save_claim(
            _with(claim, state=ClaimState.SETTLED, review=result, balance_fen=balance),
            payments=[payment],
        )
        log.info(
            "claim_settled",
            claim_id=c.claim_id,
            personal_fen=result.personal_fen,
            advance_fen=claim.advance_collected_fen,
            balance_fen=balance,
        )
        await self._notify(claim, result)

    async def _notify(self, claim: HostClaim, result: ReviewResult) -> None:
        """Tell the home the claim is settled, in the settlement's step (idempotent at the
        home by claim id)."""
        c = claim.claim
        notice = SettlementNotice(
            claim_id=c.claim_id,
            personal_paid_fen=result.personal_fen,
            fund_fen=result.fund_fen,
            critical_illness_fen=result.critical_illness_fen,
            assistance_fen=result.assistance_fen,
            settled_at=now(),
        )
        await self.node.publish(
            notice, target=province_of(c.home_region), key=c.person_id.encode("utf-8")
        )


def _with(claim: HostClaim, **changes: object) -> HostClaim:
    return replace(claim, **changes)  # type: ignore[arg-type]
