"""The host role (就医地): registers filings, admits patients, packages and settles claims.

At admission the host checks filing, validity, host region, designation and agreement; on
failure it refuses locally *and* tells the home with an ErrorReport (报错联系处理机制). At
discharge it packages the bill under the agreement's mode: DELAYED collects an advance of at
most 25% (the province may set less) and settles the balance after review (多退少补); INSTANT
and POINT_TO_POINT wait seconds for the review and, past the deadline, fall back to DELAYED
instead of failing the patient: the advance is collected and the late review settles it.
Settlement is idempotent by claim id, so a redelivered or late review never settles twice.

Every claim has a visible state (:class:`ClaimState`) and a timeline, each transition recorded
in the step that makes it: submitted → acknowledged (expected by) → settled or refused; past
the deadline an instant claim falls back, any other is overdue (escalated: logged, counted,
reported by the bus to the home and our ops). An operator re-sends an open claim
(:meth:`HostRole.resend_claim`) or closes an overdue one (:meth:`HostRole.close_claim`);
:meth:`HostRole.claim_status` is the desk's view.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

import structlog

from adapters.backoffice import (
    TERMINAL_STATES,
    ClaimEvent,
    ClaimEventKind,
    ClaimState,
    ClaimTimeline,
    CloseDecision,
    EventData,
    HostBackOffice,
    HostClaim,
)
from adapters.directory import Directory, province_of
from adapters.home import filing_covers
from adapters.rules import REVERSAL_WINDOW_DAYS, max_advance_fen
from bus.envelope import new_id, now_ms
from bus.errors import Rejection
from bus.models import (
    ClaimItem,
    ClaimPackage,
    ErrorCode,
    ErrorReport,
    FilingReceipt,
    FilingUpload,
    Message,
    ReversalDecision,
    ReversalReason,
    ReversalRequest,
    ReversalResult,
    ReviewResult,
    SettlementMode,
    SettlementNotice,
    Severity,
    VisitType,
    now,
    yuan,
)
from bus.node import Acknowledged, Answer, Context, Node, report

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


class ClaimActionRefused(Exception):
    """An operator's action on a claim that its state does not allow (nothing changed)."""


@dataclass(frozen=True, slots=True)
class ClaimStatus:
    """A claim as the hospital desk sees it: where it stands, its money, its timeline."""

    claim_id: str
    """The claim."""
    state: ClaimState
    """Where it stands."""
    mode: SettlementMode
    """Settlement mode it was sent under."""
    home: str
    """The home province that owes the review."""
    total_fen: int
    """The bill."""
    advance_fen: int
    """Advance collected from the patient before review."""
    top_up_fen: int
    """What the patient paid at settlement (多退少补: 少补)."""
    refund_fen: int
    """What was refunded to the patient (at settlement, or the advance by an operator)."""
    paid_in_full_fen: int
    """What the patient paid on a refusal (the bill less the advance)."""
    patient_paid_fen: int
    """What the patient paid in all (advance + top-up + in full − refund)."""
    submitted_at_ms: int | None
    """When it was first sent."""
    deadline_ms: int | None
    """When the answer to the request in flight is due (None: none in flight)."""
    acknowledged_at_ms: int | None
    """When the home acknowledged the request in flight."""
    expected_by_ms: int | None
    """When the home expects to answer."""
    overdue_since_ms: int | None
    """When it was escalated as overdue."""
    requests: tuple[str, ...]
    """Request ids it was sent with, the latest last."""
    review: ReviewResult | None
    """The home's review, once come."""
    error_code: str | None
    """The home's error code when refused."""
    close_decision: CloseDecision | None
    """The operator's decision, when closed by an operator."""
    close_reason: str | None
    """The operator's reason."""
    closed_by: str | None
    """The operator."""
    timeline: tuple[ClaimEvent, ...]
    """Every transition, oldest first."""
    reversal_id: str | None = None
    """The latest reversal asked for, if any (contract v1.3)."""
    reversal_state: str | None = None
    """``REQUESTED``, ``CONFIRMED``, ``REFUSED:<code>`` or ``FAILED:<code>``."""
    reversal_refund_fen: int = 0
    """Given back to the patient when the reversal was confirmed (advance and top-up)."""
    reversal_recovery_fen: int = 0
    """Taken back from the patient when confirmed (a refund he had been paid)."""


class MemoryClaimTimeline:
    """Timelines in memory, for a host back office that keeps none (lost on restart; an
    event of a step that failed stays)."""

    def __init__(self) -> None:
        self._events: dict[str, list[ClaimEvent]] = {}

    def record_claim_event(
        self,
        claim_id: str,
        kind: ClaimEventKind,
        state: ClaimState,
        detail: str,
        data: EventData | None = None,
        *,
        at_ms: int,
    ) -> ClaimEvent:
        events = self._events.setdefault(claim_id, [])
        event = ClaimEvent(claim_id, len(events) + 1, at_ms, kind, state, detail, dict(data or {}))
        events.append(event)
        return event

    def timeline(self, claim_id: str) -> list[ClaimEvent]:
        return list(self._events.get(claim_id, ()))


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
        self.timelines: ClaimTimeline = (
            backoffice if isinstance(backoffice, ClaimTimeline) else MemoryClaimTimeline()
        )
        """Where the claims' timelines are kept: the back office's, if it keeps them."""
        node.on(FilingUpload)(self._on_filing)
        node.on_answer(ClaimPackage)(self._on_review)
        node.on_answer(ReversalRequest)(self._on_reversal_answer)
        node.on_acknowledged(ClaimPackage)(self._on_acknowledged)
        count = getattr(backoffice, "count_claims", None)
        if callable(count):
            node.metrics.gauge("xsettle_claims_overdue", lambda: float(count(ClaimState.OVERDUE)))

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
            insurance_type=admission.filing.insurance_type,
        )

    async def submit(self, claim: ClaimPackage) -> str:
        """Collect the advance (DELAYED) and send the claim to the home, in one step: the
        claim row, its advance, the pending request, the outgoing record and the timeline's
        first event commit together, so a crash never charges an advance without the claim
        leaving, nor twice. Submitting a claim id again returns the first request id and
        changes nothing."""
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
            at = now_ms()
            due = self._deadline_of(request_id, at + int(deadline * 1000))
            saved = HostClaim(
                claim=claim,
                request_id=request_id,
                state=ClaimState.SUBMITTED,
                advance_collected_fen=claim.advance_fen,
                submitted_at_ms=at,
                deadline_ms=due,
            )
            self.backoffice.save_claim(saved, payments=[("ADVANCE", claim.advance_fen)])
            self._event(
                saved,
                ClaimEventKind.SUBMITTED,
                f"sent to {_home(saved)} ({claim.settlement_mode.value}): total "
                f"{yuan(claim.total_fen)} yuan, advance {yuan(claim.advance_fen)} yuan; "
                f"answer due by {_at(due)}",
                request_id=request_id,
                mode=claim.settlement_mode.value,
                total_fen=claim.total_fen,
                advance_fen=claim.advance_fen,
                deadline_ms=due,
            )
        await self.node.delivered(step)  # the desk waits for the broker, not for the review
        return request_id

    # --- acknowledgements and answers ------------------------------------------------------
    async def _on_acknowledged(self, ack: Acknowledged) -> None:
        """The home acknowledged a claim (in the step that stores the acknowledgement):
        submitted or overdue → acknowledged, with when the answer is expected; a fallen-back
        claim keeps its state and records the acknowledgement too."""
        claim = self._claim_for(ack.request_id)
        if claim is None:
            log.warning("acknowledgement_for_unknown_claim", request_id=ack.request_id)
            return
        if claim.state in TERMINAL_STATES or ack.request_id != claim.latest_request_id:
            log.info(
                "acknowledgement_ignored", claim_id=claim.claim.claim_id,
                state=claim.state.name, request_id=ack.request_id,
            )  # fmt: skip
            return
        at = now_ms()
        state = claim.state
        if state in (ClaimState.SUBMITTED, ClaimState.OVERDUE):
            state = ClaimState.ACKNOWLEDGED
        expected = ack.expected_by_ms if ack.expected_by_ms is not None else claim.deadline_ms
        if not ack.first and state is claim.state and expected == claim.expected_by_ms:
            return  # the same acknowledgement again (a re-send was acknowledged once more)
        updated = _with(
            claim,
            state=state,
            acknowledged_at_ms=claim.acknowledged_at_ms or at,
            expected_by_ms=expected,
        )
        self.backoffice.save_claim(updated)
        note = f": {ack.note}" if ack.note else ""
        self._event(
            updated,
            ClaimEventKind.ACKNOWLEDGED,
            f"acknowledged by {ack.target} ({ack.state}) at {_at(at)}, expected by "
            f"{_at(expected)}{'' if ack.expected_by_ms is not None else ' (the deadline)'}"
            f"{note}",
            request_id=ack.request_id,
            ack_state=ack.state,
            acknowledged_at_ms=at,
            expected_by_ms=expected,
            note=ack.note,
        )
        log.info(
            "claim_acknowledged", claim_id=claim.claim.claim_id, by=ack.target,
            ack_state=ack.state, expected_by_ms=expected,
        )  # fmt: skip

    async def _on_review(self, answer: Answer) -> None:
        """The home's answer, in the step that stores it: settle, refuse, fall back or
        escalate."""
        claim = self._claim_for(answer.request_id)
        if claim is None:
            log.warning("review_for_unknown_claim", request_id=answer.request_id)
            return
        if claim.state in TERMINAL_STATES:
            self._ignored(claim, answer)
            return
        message = answer.message
        if not answer.late:
            self.latencies.append((claim.claim.settlement_mode.value, answer.latency_s))
        if isinstance(message, ReviewResult):
            await self._settle(claim, message, late=answer.late, request_id=answer.request_id)
        elif isinstance(message, ErrorReport):
            if message.code is ErrorCode.DEADLINE_EXCEEDED:
                self._deadline_passed(claim, answer)
            elif message.code is ErrorCode.DUPLICATE_CLAIM and len(claim.requests) > 1:
                self._already_at_home(claim, answer)
            else:
                self._refused(claim, message)

    def _deadline_passed(self, claim: HostClaim, answer: Answer) -> None:
        """No answer by the deadline: an instant claim falls back to delayed (advance
        collected); any other claim is overdue: escalated (logged, counted; the bus has
        reported DEADLINE_EXCEEDED to the home and to our ops)."""
        c = claim.claim
        if answer.request_id != claim.latest_request_id:
            log.info("earlier_request_expired", claim_id=c.claim_id, request_id=answer.request_id)
            return
        at = now_ms()
        pending = answer.request
        due = pending.deadline_ms if pending is not None else claim.deadline_ms
        attempts = pending.attempt if pending is not None else None
        if (
            c.settlement_mode is not SettlementMode.DELAYED
            and claim.fell_back_at_ms is None
            and claim.state in (ClaimState.SUBMITTED, ClaimState.ACKNOWLEDGED)
        ):
            self._fallback(claim, at)
            return
        updated = _with(claim, state=ClaimState.OVERDUE, overdue_since_ms=at, deadline_ms=None)
        self.backoffice.save_claim(updated)
        self._event(
            updated,
            ClaimEventKind.OVERDUE,
            f"no answer from {_home(claim)} by {_at(due)} ({attempts or '?'} send(s)): "
            "escalated; reported to the home and to our ops",
            request_id=answer.request_id,
            deadline_ms=due,
            attempts=attempts,
        )
        self._escalated(updated, due, attempts)

    def _escalated(self, claim: HostClaim, due: int | None, attempts: int | None) -> None:
        c = claim.claim
        self.node.metrics.inc("xsettle_claims_overdue_total", mode=c.settlement_mode.value)
        log.warning(
            "claim_overdue", claim_id=c.claim_id, mode=c.settlement_mode.value,
            home=_home(claim), deadline_ms=due, attempts=attempts,
        )  # fmt: skip

    def _fallback(self, claim: HostClaim, at: int) -> None:
        """Instant review did not come in time: collect the advance and wait as delayed."""
        c = claim.claim
        advance = max_advance_fen(c.total_fen, self.advance_permille)
        updated = _with(
            claim,
            state=ClaimState.FALLBACK,
            advance_collected_fen=advance,
            fell_back_at_ms=at,
            deadline_ms=None,
        )
        self.backoffice.save_claim(updated, payments=[("ADVANCE", advance)])
        self._event(
            updated,
            ClaimEventKind.FELL_BACK,
            f"no review within the instant deadline: fell back to delayed, advance "
            f"{yuan(advance)} yuan collected; waiting for the late review",
            advance_fen=advance,
        )
        log.warning("instant_fell_back_to_delayed", claim_id=c.claim_id, advance_fen=advance)

    def _already_at_home(self, claim: HostClaim, answer: Answer) -> None:
        """DUPLICATE_CLAIM to one of several sends: the home has the claim under another of
        our requests (reviewed, or queued for a reviewer), and that request's answer settles
        it. Not a refusal; with no request left in flight the claim is overdue again (or
        fallen back, if that is where it was re-sent from)."""
        c = claim.claim
        state = claim.state
        deadline = claim.deadline_ms
        if answer.request_id == claim.latest_request_id:
            deadline = None
            if state in (ClaimState.SUBMITTED, ClaimState.ACKNOWLEDGED):
                resent_from_fallback = (
                    claim.fell_back_at_ms is not None and claim.overdue_since_ms is None
                )
                state = ClaimState.FALLBACK if resent_from_fallback else ClaimState.OVERDUE
        updated = _with(claim, state=state, deadline_ms=deadline)
        self.backoffice.save_claim(updated)
        self._event(
            updated,
            ClaimEventKind.ALREADY_AT_HOME,
            f"{_home(claim)} answered request {answer.request_id} with DUPLICATE_CLAIM: it "
            "has the claim under an earlier request, whose answer settles it",
            request_id=answer.request_id,
        )
        log.warning("claim_already_at_home", claim_id=c.claim_id, request_id=answer.request_id)

    def _ignored(self, claim: HostClaim, answer: Answer) -> None:
        """An answer about a claim already closed (late, or to a re-send): nothing moves.
        A review after an operator's close is a warning: the home's books count a review
        the host never settled."""
        c = claim.claim
        message = answer.message
        what = (
            f"review ({message.decision.value})"
            if isinstance(message, ReviewResult)
            else f"error report {answer.code.value if answer.code else '?'}"
        )
        self._event(
            claim,
            ClaimEventKind.ANSWER_IGNORED,
            f"{what} to request {answer.request_id} after the claim was {claim.state.name}: "
            "ignored",
            request_id=answer.request_id,
            late=int(answer.late),
        )
        if claim.state is ClaimState.CLOSED_BY_OPERATOR and isinstance(message, ReviewResult):
            log.warning(
                "review_after_operator_close", claim_id=c.claim_id, home=_home(claim),
                fund_fen=message.fund_fen,
            )  # fmt: skip
        else:
            log.info("claim_already_closed", claim_id=c.claim_id, late=answer.late)

    def _refused(self, claim: HostClaim, rep: ErrorReport) -> None:
        c = claim.claim
        rest = c.total_fen - claim.advance_collected_fen
        updated = _with(
            claim,
            state=ClaimState.REFUSED,
            error_code=rep.code.value,
            balance_fen=rest,
            deadline_ms=None,
        )
        self.backoffice.save_claim(updated, payments=[("FULL", rest)])
        self._event(
            updated,
            ClaimEventKind.REFUSED,
            f"refused by {_home(claim)}: {rep.code.value}; the patient pays the rest in full "
            f"({yuan(rest)} yuan)",
            code=rep.code.value,
            paid_in_full_fen=rest,
        )
        log.info("claim_refused", claim_id=c.claim_id, code=rep.code.value)

    async def _settle(
        self, claim: HostClaim, result: ReviewResult, *, late: bool, request_id: str | None = None
    ) -> None:
        c = claim.claim
        balance = result.personal_fen - claim.advance_collected_fen
        payment = ("TOP_UP", balance) if balance > 0 else ("REFUND", -balance)
        updated = _with(
            claim,
            state=ClaimState.SETTLED,
            review=result,
            balance_fen=balance,
            deadline_ms=None,
            reviewed_request_id=request_id,
            settled_at_ms=now_ms(),
        )
        self.backoffice.save_claim(updated, payments=[payment])
        self._event(
            updated,
            ClaimEventKind.REVIEWED,
            f"reviewed by {_home(claim)}{' (late)' if late else ''}: {result.decision.value}, "
            f"personal {yuan(result.personal_fen)} yuan, fund {yuan(result.fund_fen)} yuan, "
            f"balance {yuan(balance)} yuan",
            decision=result.decision.value,
            personal_fen=result.personal_fen,
            fund_fen=result.fund_fen,
            critical_illness_fen=result.critical_illness_fen,
            assistance_fen=result.assistance_fen,
            balance_fen=balance,
            late=int(late),
        )
        settled = (
            f"top-up {yuan(balance)} yuan"
            if balance > 0
            else f"refund {yuan(-balance)} yuan"
            if balance < 0
            else "nothing more to pay"
        )
        self._event(
            updated,
            ClaimEventKind.SETTLED,
            f"settled with the patient: {settled}; settlement notice to {_home(claim)}",
            payment=payment[0] if balance else None,
            amount_fen=abs(balance),
        )
        log.info(
            "claim_settled",
            claim_id=c.claim_id,
            personal_fen=result.personal_fen,
            advance_fen=claim.advance_collected_fen,
            balance_fen=balance,
        )
        await self._notify(updated, result)

    async def _notify(self, claim: HostClaim, result: ReviewResult) -> None:
        """Tell the home the claim is settled, in the settlement's step (idempotent at the
        home by claim id): what the funds pay, what the patient paid, and how (the advance,
        and the balance: > 0 a top-up, < 0 a refund; contract v1.3)."""
        c = claim.claim
        notice = SettlementNotice(
            claim_id=c.claim_id,
            personal_paid_fen=result.personal_fen,
            fund_fen=result.fund_fen,
            critical_illness_fen=result.critical_illness_fen,
            assistance_fen=result.assistance_fen,
            # The claim's own settlement time: the host's books and the home's notice put the
            # claim on the same day (reconciliation), even a millisecond before midnight.
            settled_at=now()
            if claim.settled_at_ms is None
            else dt.datetime.fromtimestamp(claim.settled_at_ms / 1000, dt.UTC),
            advance_fen=claim.advance_collected_fen,
            balance_fen=claim.balance_fen,
        )
        await self.node.publish(
            notice, target=province_of(c.home_region), key=c.person_id.encode("utf-8")
        )

    # --- operators ------------------------------------------------------------------------------
    async def resend_claim(self, claim_id: str, *, operator: str = "ops") -> str:
        """Send an open claim to its home again, in one step; returns the request id used.

        A request still in flight (submitted or acknowledged) is re-sent as it is: same
        request id, ``xs-attempt`` + 1; the home answers it with its stored answer or
        acknowledges it again. An expired one (an overdue or fallen-back claim) cannot be: the
        claim goes as a *new* request (new id, the delayed deadline from now) and the claim is
        submitted again. A home that never had the claim reviews it; a home that has it under
        the earlier request answers DUPLICATE_CLAIM, which is no refusal: the earlier
        request's (late) answer settles the claim. ``ClaimActionRefused`` for a closed claim.
        """
        async with self.node.step() as step:
            claim = self._open_claim(claim_id, "re-send")
            current = claim.latest_request_id
            if current is not None and await self.node.resend(current):
                pending = self.node.store.get_pending(current)
                attempt = pending.attempt if pending is not None else None
                self._event(
                    claim,
                    ClaimEventKind.RESENT,
                    f"re-sent by {operator}: the same request {current}, attempt {attempt}",
                    request_id=current,
                    attempt=attempt,
                    operator=operator,
                )
                request_id = current
            else:
                request_id = await self.node.request(
                    claim.claim, deadline_s=self.delayed_deadline_s
                )
                due = self._deadline_of(request_id, now_ms() + int(self.delayed_deadline_s * 1000))
                updated = _with(
                    claim,
                    state=ClaimState.SUBMITTED,
                    resent_as=(*claim.resent_as, request_id),
                    deadline_ms=due,
                    acknowledged_at_ms=None,
                    expected_by_ms=None,
                )
                self.backoffice.save_claim(updated)
                self._event(
                    updated,
                    ClaimEventKind.RESENT,
                    f"re-sent by {operator} as the new request {request_id} (request "
                    f"{current} had expired); answer due by {_at(due)}",
                    request_id=request_id,
                    expired_request_id=current,
                    deadline_ms=due,
                    operator=operator,
                )
        self.node.metrics.inc("xsettle_claims_resent_total")
        log.info(
            "claim_resent", claim_id=claim_id, request_id=request_id,
            new_request=request_id != current, operator=operator,
        )  # fmt: skip
        await self.node.delivered(step)
        return request_id

    async def close_claim(
        self, claim_id: str, decision: CloseDecision | str, reason: str, operator: str
    ) -> HostClaim:
        """Close an overdue or fallen-back claim by an operator's decision, in one step.

        ``KEEP_ADVANCE``: the advance stands as the patient's payment, nothing moves.
        ``REFUND_ADVANCE``: the advance is refunded (a ``REFUND`` payment). The home is sent
        nothing: a settlement notice would claim a settlement its review never priced (and a
        home that never reviewed the claim rejects it as ``unknown_claim``); a review that
        still comes is recorded on the timeline and logged, never settled. Claims still
        waiting within their deadline, and closed ones, are refused (``ClaimActionRefused``).
        """
        try:
            chosen = CloseDecision(decision)
        except ValueError:
            choices = ", ".join(d.value for d in CloseDecision)
            raise ClaimActionRefused(f"decision {decision!r}: expected one of {choices}") from None
        if not reason.strip() or not operator.strip():
            raise ClaimActionRefused("closing a claim needs the operator's name and a reason")
        async with self.node.step():
            claim = self._open_claim(claim_id, "close")
            if claim.state not in (ClaimState.OVERDUE, ClaimState.FALLBACK):
                raise ClaimActionRefused(
                    f"claim {claim_id} is {claim.state.name}: its answer is due by "
                    f"{_at(claim.deadline_ms)}; it can be closed once overdue"
                )
            advance = claim.advance_collected_fen
            refund = advance if chosen is CloseDecision.REFUND_ADVANCE else 0
            updated = _with(
                claim,
                state=ClaimState.CLOSED_BY_OPERATOR,
                balance_fen=-refund,
                deadline_ms=None,
                close_decision=chosen,
                close_reason=reason,
                closed_by=operator,
            )
            self.backoffice.save_claim(updated, payments=[("REFUND", refund)])
            money = (
                f"advance {yuan(advance)} yuan refunded"
                if refund
                else f"advance {yuan(advance)} yuan kept as the patient's payment"
            )
            self._event(
                updated,
                ClaimEventKind.CLOSED_BY_OPERATOR,
                f"closed by {operator}: {chosen.value}, {money}; reason: {reason}",
                decision=chosen.value,
                reason=reason,
                operator=operator,
                refund_fen=refund,
                advance_fen=advance,
            )
        self.node.metrics.inc("xsettle_claims_closed_by_operator_total", decision=chosen.value)
        log.warning(
            "claim_closed_by_operator", claim_id=claim_id, decision=chosen.value,
            operator=operator, refund_fen=refund,
        )  # fmt: skip
        return updated

    async def reverse_claim(
        self,
        claim_id: str,
        reason: ReversalReason | str,
        note: str,
        operator: str,
        *,
        reversal_id: str | None = None,
    ) -> str:
        """Ask the home to cancel a settled claim (冲正, contract v1.3): a wrong patient, a
        duplicate bill, a readmission billed apart. One step sends the ``ReversalRequest``
        and records it on the claim; the home's answer comes later (``_on_reversal_answer``):
        confirmed, the claim is REVERSED and the patient's payments are given back; refused,
        the settlement stands. Returns the reversal id. The same ``reversal_id`` again
        returns it and sends nothing; ``ClaimActionRefused`` for a claim that is not settled,
        is past the window (:data:`adapters.rules.REVERSAL_WINDOW_DAYS` after its review), or
        has a reversal asked or confirmed already."""
        try:
            why = ReversalReason(reason)
        except ValueError:
            why = ReversalReason.UNKNOWN
        if why is ReversalReason.UNKNOWN:
            choices = ", ".join(r.value for r in ReversalReason if r is not ReversalReason.UNKNOWN)
            raise ClaimActionRefused(f"reason {reason!r}: expected one of {choices}")
        if not operator.strip():
            raise ClaimActionRefused("a reversal needs the operator's name")
        async with self.node.step() as step:
            claim = self.backoffice.claim(claim_id)
            if claim is None:
                raise ClaimActionRefused(f"no claim {claim_id} at {self.province}")
            if reversal_id is not None and claim.reversal_id == reversal_id:
                return reversal_id  # asked before: nothing new to send
            if claim.reversal_state in ("REQUESTED", "CONFIRMED"):
                raise ClaimActionRefused(
                    f"claim {claim_id} has the reversal {claim.reversal_id} "
                    f"{claim.reversal_state.lower()} already"
                )
            if claim.state is not ClaimState.SETTLED or claim.review is None:
                raise ClaimActionRefused(
                    f"claim {claim_id} is {claim.state.name}: only a settled claim is reversed"
                )
            # The window runs from the review, which both sides know (the home refuses later).
            reviewed = _ms(claim.review.reviewed_at)
            if now_ms() - reviewed > REVERSAL_WINDOW_DAYS * 86_400_000:
                raise ClaimActionRefused(
                    f"claim {claim_id} was reviewed {_at(reviewed)}: more than "
                    f"{REVERSAL_WINDOW_DAYS} days ago, past the reversal window"
                )
            c, review = claim.claim, claim.review
            rid = reversal_id or f"V-{self.province}-{new_id()[:13]}"
            request = ReversalRequest(
                reversal_id=rid,
                claim_id=c.claim_id,
                claim_request_id=claim.reviewed_request_id or claim.latest_request_id or "",
                person_id=c.person_id,
                home_region=c.home_region,
                host_region=c.host_region,
                reason=why,
                note=note,
                fund_fen=review.fund_fen,
                critical_illness_fen=review.critical_illness_fen,
                assistance_fen=review.assistance_fen,
                personal_paid_fen=review.personal_fen,
                requested_at=now(),
            )
            request_id = await self.node.request(request, deadline_s=self.delayed_deadline_s)
            updated = _with(
                claim,
                reversal_id=rid,
                reversal_request_id=request_id,
                reversal_state="REQUESTED",
                reversal_reason=why.value,
            )
            self.backoffice.save_claim(updated)
            self._event(
                updated,
                ClaimEventKind.REVERSAL_REQUESTED,
                f"reversal {rid} asked by {operator} ({why.value}): the home cancels its review, "
                f"the patient is given back {yuan(review.personal_fen)} yuan once it confirms",
                reversal_id=rid,
                request_id=request_id,
                reason=why.value,
                operator=operator,
            )
        self.node.metrics.inc("xsettle_reversals_requested_total", reason=why.value)
        log.warning(
            "reversal_requested", claim_id=claim_id, reversal_id=rid, reason=why.value,
            operator=operator,
        )  # fmt: skip
        await self.node.delivered(step)
        return rid

    async def resend_notice(self, claim_id: str, *, operator: str = "ops") -> None:
        """Send a settled claim's SettlementNotice to its home again, in one step: what a
        reconciliation's ``MISSING_AT_HOME`` asks of the host (the home keeps a notice once
        per claim, so a second copy changes nothing). ``ClaimActionRefused`` unless SETTLED."""
        async with self.node.step() as step:
            claim = self.backoffice.claim(claim_id)
            if claim is None:
                raise ClaimActionRefused(f"no claim {claim_id} at {self.province}")
            if claim.state is not ClaimState.SETTLED or claim.review is None:
                raise ClaimActionRefused(
                    f"claim {claim_id} is {claim.state.name}: only a settled claim has a notice"
                )
            await self._notify(claim, claim.review)
            self._event(
                claim,
                ClaimEventKind.SETTLED,
                f"settlement notice sent to {_home(claim)} again by {operator}",
                operator=operator,
                notice_resent=1,
            )
        log.info("notice_resent", claim_id=claim_id, operator=operator)
        await self.node.delivered(step)

    async def _on_reversal_answer(self, answer: Answer) -> None:
        """The home's answer to a reversal, in the step that stores it. Confirmed: the claim
        is REVERSED and the patient is given back what he paid for it (the advance and a
        top-up refunded, a refund he was paid recovered: net, his personal share). Refused,
        or an error report, or no answer by the deadline: the settlement stands, and an
        operator may ask again."""
        request = answer.request
        asked = self.node.codec.decode(request.record.value) if request is not None else None
        if not isinstance(asked, ReversalRequest):
            log.warning("reversal_answer_without_request", request_id=answer.request_id)
            return
        claim = self.backoffice.claim(asked.claim_id)
        if claim is None or claim.reversal_id != asked.reversal_id:
            log.warning("reversal_answer_ignored", claim_id=asked.claim_id,
                        reversal_id=asked.reversal_id)  # fmt: skip
            return
        message = answer.message
        if isinstance(message, ReversalResult) and message.decision is ReversalDecision.CONFIRMED:
            if claim.state is ClaimState.REVERSED:
                return
            paid = claim.advance_collected_fen + max(claim.balance_fen, 0)
            refunded = max(-claim.balance_fen, 0)
            updated = _with(claim, state=ClaimState.REVERSED, reversal_state="CONFIRMED")
            self.backoffice.save_claim(
                updated, payments=[("REVERSAL_REFUND", paid), ("REVERSAL_RECOVERY", refunded)]
            )
            self._event(
                updated,
                ClaimEventKind.REVERSED,
                f"reversal {asked.reversal_id} confirmed by {_home(claim)}: refunded "
                f"{yuan(paid)} yuan to the patient"
                + (f", recovered the {yuan(refunded)} yuan refund" if refunded else "")
                + f"; {yuan(message.fund_restored_fen)} yuan back on the person's fund cap",
                reversal_id=asked.reversal_id,
                refund_fen=paid,
                recovery_fen=refunded,
                fund_restored_fen=message.fund_restored_fen,
            )
            self.node.metrics.inc("xsettle_reversals_total", outcome="confirmed")
            log.warning("claim_reversed", claim_id=asked.claim_id, reversal_id=asked.reversal_id,
                        refund_fen=paid, recovery_fen=refunded)  # fmt: skip
            return
        if isinstance(message, ReversalResult):
            code = message.refusal_code or "REFUSED"
            why = f"refused by {_home(claim)}: {code}" + (
                f" ({message.note})" if message.note else ""
            )
        else:
            assert isinstance(message, ErrorReport)
            code = message.code.value
            why = f"not done: {code} ({message.message[:200]})"
        state = "REFUSED" if isinstance(message, ReversalResult) else "FAILED"
        updated = _with(claim, reversal_state=f"{state}:{code}")
        self.backoffice.save_claim(updated)
        self._event(
            updated,
            ClaimEventKind.REVERSAL_REFUSED,
            f"reversal {asked.reversal_id} {why}; the settlement stands",
            reversal_id=asked.reversal_id,
            code=code,
        )
        self.node.metrics.inc("xsettle_reversals_total", outcome=state.lower())
        log.warning("reversal_not_done", claim_id=asked.claim_id, reversal_id=asked.reversal_id,
                    code=code)  # fmt: skip

    async def escalate_fallbacks(self, *, older_than_s: float | None = None) -> list[str]:
        """Escalate fallen-back claims whose late review has not come ``older_than_s``
        (default: the delayed deadline) after they fell back: overdue, one step each, like a
        delayed claim past its deadline. Returns their ids. A fallen-back claim has no
        request in flight any more, so nothing else would tell anyone; the province's loop
        (or an operator) calls this."""
        limit = self.delayed_deadline_s if older_than_s is None else older_than_s
        cutoff = now_ms() - int(limit * 1000)
        escalated = []
        for found in self.backoffice.claims(open_only=True):
            if found.state is not ClaimState.FALLBACK:
                continue
            since = (
                found.fell_back_at_ms or found.submitted_at_ms or _ms(found.claim.submitted_at)
            )  # rows of older versions know only when the claim was packaged
            if since > cutoff:
                continue
            async with self.node.step():
                claim = self.backoffice.claim(found.claim.claim_id)
                if claim is None or claim.state is not ClaimState.FALLBACK:
                    continue
                updated = _with(claim, state=ClaimState.OVERDUE, overdue_since_ms=now_ms())
                self.backoffice.save_claim(updated)
                self._event(
                    updated,
                    ClaimEventKind.OVERDUE,
                    f"no late review from {_home(claim)} {limit:.0f} s after falling back: "
                    "escalated",
                    fell_back_at_ms=claim.fell_back_at_ms,
                )
            self._escalated(updated, None, None)
            escalated.append(claim.claim.claim_id)
        return escalated

    # --- the desk's view ---------------------------------------------------------------------
    def claim_status(self, claim_id: str) -> ClaimStatus | None:
        """Where a claim stands, its money and its timeline (None for an unknown claim)."""
        claim = self.backoffice.claim(claim_id)
        if claim is None:
            return None
        c = claim.claim
        advance = claim.advance_collected_fen
        balance = claim.balance_fen
        top_up = refund = full = back = recovered = 0
        if claim.state is ClaimState.REFUSED:
            full = balance
        elif claim.state in (ClaimState.SETTLED, ClaimState.CLOSED_BY_OPERATOR):
            top_up, refund = max(balance, 0), max(-balance, 0)
        elif claim.state is ClaimState.REVERSED:
            top_up, refund = max(balance, 0), max(-balance, 0)
            back, recovered = advance + top_up, refund
        return ClaimStatus(
            claim_id=claim_id,
            state=claim.state,
            mode=c.settlement_mode,
            home=_home(claim),
            total_fen=c.total_fen,
            advance_fen=advance,
            top_up_fen=top_up,
            refund_fen=refund,
            paid_in_full_fen=full,
            patient_paid_fen=advance + top_up + full - refund - back + recovered,
            submitted_at_ms=claim.submitted_at_ms or _ms(c.submitted_at),
            deadline_ms=claim.deadline_ms,
            acknowledged_at_ms=claim.acknowledged_at_ms,
            expected_by_ms=claim.expected_by_ms,
            overdue_since_ms=claim.overdue_since_ms,
            requests=claim.requests,
            review=claim.review,
            error_code=claim.error_code,
            close_decision=claim.close_decision,
            close_reason=claim.close_reason,
            closed_by=claim.closed_by,
            timeline=tuple(self.timelines.timeline(claim_id)),
            reversal_id=claim.reversal_id,
            reversal_state=claim.reversal_state,
            reversal_refund_fen=back,
            reversal_recovery_fen=recovered,
        )

    # --- helpers ---------------------------------------------------------------------------------
    def _claim_for(self, request_id: str) -> HostClaim | None:
        """The claim a request id belongs to (its first send or an operator's re-send)."""
        claim = self.backoffice.claim_by_request(request_id)
        if claim is None and isinstance(self.timelines, MemoryClaimTimeline):
            # A back office of older design may index first sends only: look at the open
            # claims' re-sends (a back office that keeps timelines indexes them).
            claim = next(
                (c for c in self.backoffice.claims(open_only=True) if request_id in c.resent_as),
                None,
            )
        return claim

    def _open_claim(self, claim_id: str, action: str) -> HostClaim:
        claim = self.backoffice.claim(claim_id)
        if claim is None:
            raise ClaimActionRefused(f"no claim {claim_id} at {self.province}")
        if claim.state in TERMINAL_STATES:
            raise ClaimActionRefused(
                f"claim {claim_id} is already {claim.state.name}: nothing to {action}"
            )
        return claim

    def _deadline_of(self, request_id: str, default: int) -> int:
        pending = self.node.store.get_pending(request_id)
        return pending.deadline_ms if pending is not None else default

    def _event(self, claim: HostClaim, kind: ClaimEventKind, detail: str, **data: object) -> None:
        """Record a transition of ``claim`` (already in its new state), in the running step."""
        self.timelines.record_claim_event(
            claim.claim.claim_id,
            kind,
            claim.state,
            detail,
            {k: v if v is None or isinstance(v, int | str) else str(v) for k, v in data.items()},
            at_ms=now_ms(),
        )


def _with(claim: HostClaim, **changes: object) -> HostClaim:
    return replace(claim, **changes)  # type: ignore[arg-type]


def _home(claim: HostClaim) -> str:
    return province_of(claim.claim.home_region)


def _ms(at: dt.datetime) -> int:
    return int(at.timestamp() * 1000)


def _at(ms: int | None) -> str:
    """Epoch milliseconds as ``2026-05-08 09:30:00 UTC`` ("-" for None)."""
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
