"""The home role (参保地): files persons to hosts, and reviews their claims under home policy.

Checks before paying, each with the contract's code: the claim's home region has a policy and
an agreement with the host (``REGION_NOT_CONNECTED``), the hospital is designated and allowed
(``HOSPITAL_NOT_DESIGNATED``), the person has a valid filing for that host (``NOT_FILED``,
``FILING_EXPIRED``), the amounts add up (``AMOUNT_MISMATCH``), every item is in the host
catalogue (``CATALOGUE_ITEM_UNKNOWN``), and the claim was not answered before under another
message id (``DUPLICATE_CLAIM``). The review itself is :func:`adapters.rules.review`.

Without a review desk every claim is reviewed and answered at once. With one
(``HomeRole(..., review_desk=ReviewDeskSettings(...))``, :mod:`adapters.review_desk`), a DELAYED
claim that passes the checks is queued with the rules' proposal and its usage reserved, and the
answer waits for a reviewer's decision; INSTANT and POINT_TO_POINT claims are still answered at
once, against usage that counts the open reservations.
"""

from __future__ import annotations

import datetime as dt
from typing import Protocol, runtime_checkable

import structlog

from adapters.backoffice import HomeBackOffice, Person, ReviewRecord
from adapters.directory import Directory, province_of
from adapters.review_desk import ReviewDesk, ReviewDeskSettings
from adapters.rules import (
    REVERSAL_WINDOW_DAYS,
    ReversalRefusal,
    add_usage,
    check_amounts,
    remove_usage,
    review,
    review_result,
    spent,
)
from bus import errors
from bus.db import Database
from bus.models import (
    ClaimPackage,
    ErrorCode,
    ErrorReport,
    FilingAction,
    FilingReason,
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
    now,
)
from bus.node import Answer, Context, Deferred, Node

log = structlog.get_logger(__name__)

FILING_DEADLINE_S = 60.0
"""A host registers a filing in real time (seed 000: uploaded at once); a minute is generous."""


@runtime_checkable
class PersonRegistry(Protocol):
    """A home back office that also enrols persons (optional: the agency API files with the
    person's data; :class:`adapters.backoffice.SqlBackOffice` is one)."""

    def add_person(self, person: Person) -> None:
        """Enrol a person, or replace what is known of them (an upsert)."""


def filing_covers(filing: FilingUpload, host_region: str, on: dt.date) -> ErrorCode | None:
    """Why ``filing`` does not cover a visit in ``host_region`` on day ``on`` (None: it does).

    A filing names a province or a city, never a hospital; a city filing covers that city only.
    """
    if filing.action is FilingAction.REVOKE:
        return ErrorCode.FILING_EXPIRED
    target = filing.host_region
    if target.endswith("0000"):
        if province_of(host_region) != target:
            return ErrorCode.FILING_EXPIRED
    elif target != host_region:
        return ErrorCode.FILING_EXPIRED
    if on < filing.valid_from:
        return ErrorCode.FILING_EXPIRED
    if filing.valid_until is not None and on > filing.valid_until:
        return ErrorCode.FILING_EXPIRED
    return None


class HomeRole:
    """The home agency of one province on the bus."""

    def __init__(
        self,
        node: Node,
        directory: Directory,
        backoffice: HomeBackOffice,
        *,
        reviewer: str | None = None,
        review_desk: ReviewDeskSettings | None = None,
        db: Database | None = None,
    ) -> None:
        """``review_desk``: hold DELAYED claims for a reviewer (None: review every claim at
        once, as before); ``db``: the province's database the desk's queue lives in (default:
        the node's store's)."""
        self.node = node
        self.directory = directory
        self.backoffice = backoffice
        self.reviewer = reviewer or f"{node.province}-auto"
        self.desk: ReviewDesk | None = (
            None if review_desk is None else ReviewDesk(self, review_desk, db=db)
        )
        """The review desk, when DELAYED claims wait for a reviewer."""
        self.reports: list[ErrorReport] = []
        """Error reports addressed to this province that answered nothing of ours."""
        node.on(ClaimPackage)(self._on_claim)
        node.on(ReversalRequest)(self._on_reversal)
        node.on(SettlementNotice)(self._on_settlement)
        node.on(ErrorReport)(self._on_report)
        node.on_answer(FilingUpload)(self._on_receipt)

    async def file(self, filing: FilingUpload, person: Person | None = None) -> str:
        """Register a filing here and upload it to the host, in one step; returns the
        request id. ``person`` (the agency counter's data of the insured) is enrolled or
        updated in the same step, so the filing and its person commit together; it needs a
        back office that enrols persons (:class:`PersonRegistry`)."""
        registry = None
        if person is not None:
            if not isinstance(self.backoffice, PersonRegistry):
                raise TypeError("this back office does not enrol persons (no add_person)")
            registry = self.backoffice
        async with self.node.step() as step:
            if registry is not None and person is not None:
                registry.add_person(person)
            self.backoffice.record_filing(filing)
            request_id = await self.node.request(filing, deadline_s=FILING_DEADLINE_S)
        await self.node.delivered(step)  # the counter waits for the broker, not the receipt
        return request_id

    async def _on_receipt(self, answer: Answer) -> None:
        if isinstance(answer.message, FilingReceipt):
            self.backoffice.record_receipt(answer.message.filing_id, answer.message.status)
        else:
            log.warning("filing_not_registered", code=str(answer.code), target=answer.target)

    async def _on_settlement(self, message: Message, ctx: Context) -> None:
        """Record a settlement of a claim this home reviewed for the sending host; a notice
        about any other claim is reported to its sender, never stored."""
        assert isinstance(message, SettlementNotice)
        host = self.backoffice.reviewed_for(message.claim_id)
        if host != ctx.envelope.source:
            why = (
                "was never reviewed here"
                if host is None
                else f"was sent by {host}, not {ctx.envelope.source}"
            )
            raise errors.Rejection(
                ErrorCode.INVALID_MESSAGE,
                f"settlement notice for claim {message.claim_id}, which {why}",
                details={"responsible": ctx.envelope.source, "reason": "unknown_claim"},
            )
        self.backoffice.record_settlement(message)

    async def _on_report(self, message: Message, ctx: Context) -> None:
        assert isinstance(message, ErrorReport)
        self.reports.append(message)
        log.info(
            "error_report_received",
            code=message.code.value,
            origin=message.origin,
            detected_by=message.detected_by,
            correlation_id=ctx.envelope.correlation_id,
        )

    def _refuse(self, code: ErrorCode, text: str, *, responsible: str) -> errors.Rejection:
        return errors.Rejection(code, text, details={"responsible": responsible})

    async def _on_claim(self, message: Message, ctx: Context) -> ReviewResult | Deferred:
        assert isinstance(message, ClaimPackage)
        claim = message
        host = ctx.envelope.source
        done = self.backoffice.review_of(claim.claim_id)
        if done is not None:
            request_id, result = done
            if request_id == ctx.envelope.message_id:
                return result  # handled before a crash: same answer again
            raise self._refuse(
                ErrorCode.DUPLICATE_CLAIM,
                f"claim {claim.claim_id} was already answered (request {request_id})",
                responsible=host,
            )
        queued = self.desk.request_of(claim.claim_id) if self.desk is not None else None
        if queued is not None and queued != ctx.envelope.message_id:
            raise self._refuse(
                ErrorCode.DUPLICATE_CLAIM,
                f"claim {claim.claim_id} is already under review (request {queued})",
                responsible=host,
            )
        policy = self.directory.policy(claim.home_region)
        agreement = self.directory.agreement(claim.home_region, host)
        if policy is None or agreement is None:
            raise self._refuse(
                ErrorCode.REGION_NOT_CONNECTED,
                f"region {claim.home_region} has no agreement with {host}",
                responsible=host,
            )
        hospital = self.directory.hospital(claim.hospital_code)
        if hospital is None or hospital.province != host:
            raise self._refuse(
                ErrorCode.HOSPITAL_NOT_DESIGNATED,
                f"{claim.hospital_code} is not a designated hospital of {host}",
                responsible=host,
            )
        if not self.directory.allows(agreement, claim.hospital_code):
            raise self._refuse(
                ErrorCode.HOSPITAL_NOT_DESIGNATED,
                f"{claim.hospital_code} is not allowed by {claim.home_region}'s agreement",
                responsible=host,
            )
        person = self.backoffice.person(claim.person_id)
        filings = self.backoffice.filings_of(claim.person_id)
        if person is None or not filings:
            raise self._refuse(
                ErrorCode.NOT_FILED, "no filing for this person", responsible=self.node.province
            )
        latest = filings[-1]
        visit_day = claim.admitted_at.date()
        why = filing_covers(latest, claim.host_region, visit_day)
        if why is not None and latest.reason is not FilingReason.EMERGENCY:
            raise self._refuse(
                why,
                f"filing {latest.filing_id} does not cover {claim.host_region} on {visit_day}",
                responsible=self.node.province,
            )
        problems = check_amounts(
            claim, max_advance_permille=self.directory.max_advance_permille(host)
        )
        if problems:
            raise self._refuse(ErrorCode.AMOUNT_MISMATCH, "; ".join(problems), responsible=host)
        catalogue = self.directory.catalogue(host)
        unknown = [i.item_code for i in claim.items if i.item_code not in catalogue]
        if unknown:
            raise self._refuse(
                ErrorCode.CATALOGUE_ITEM_UNKNOWN,
                f"not in {host}'s catalogue: {', '.join(unknown[:10])}",
                responsible=host,
            )
        year = claim.discharged_at.year
        committed = self.backoffice.year_usage(claim.person_id, year)
        desk = self.desk
        # With a desk, open reviews of the person reserve part of the caps: count them.
        usage = committed if desk is None else desk.usage_for(claim.person_id, year)
        outcome = review(
            claim,
            policy,
            usage,
            insurance_type=person.insurance_type,
            assistance_eligible=person.assistance_eligible,
            catalogue_classes=self.directory.catalogue_classes(host),
        )
        if (
            desk is not None
            and claim.settlement_mode is SettlementMode.DELAYED
            and desk.holds(outcome)
        ):
            return desk.open(
                claim,
                outcome,
                request_id=ctx.envelope.message_id,
                host=host,
                deadline_ms=ctx.envelope.deadline_ms,
            )
        result = review_result(outcome, claim.claim_id, self.reviewer, now())
        request_id, stored = self.backoffice.record_review(
            claim.claim_id,
            claim.person_id,
            ctx.envelope.message_id,
            result,
            year,
            add_usage(committed, spent(outcome)),
            host=host,
            spent=spent(outcome),
        )
        if request_id != ctx.envelope.message_id:
            raise self._refuse(
                ErrorCode.DUPLICATE_CLAIM,
                f"claim {claim.claim_id} was already answered (request {request_id})",
                responsible=host,
            )
        log.info(
            "claim_reviewed",
            claim_id=claim.claim_id,
            decision=stored.decision.value,
            fund_fen=stored.fund_fen,
            personal_fen=stored.personal_fen,
        )
        return stored

    # --- reversals (冲正, contract v1.3) ------------------------------------------------------
    async def _on_reversal(self, message: Message, ctx: Context) -> ReversalResult:
        """A host cancels a claim it settled: confirmed, the review is void and its amounts
        go back to the person's year (so the next claim gets the money); refused, nothing
        changes. Either answer is kept under the reversal id and given again to the same
        reversal, whatever message id it comes under; a second reversal of a cancelled claim
        is refused (``ALREADY_REVERSED``)."""
        assert isinstance(message, ReversalRequest)
        r = message
        host = ctx.envelope.source
        answered = self.backoffice.reversal(r.reversal_id)
        if answered is not None:
            return answered
        if r.reason is ReversalReason.UNKNOWN:  # (check() refuses it before: defence in depth)
            raise self._refuse(ErrorCode.INVALID_MESSAGE, "unknown reason", responsible=host)
        record = self.backoffice.review_record(r.claim_id)
        refusal = self._reversal_refusal(r, host, record)
        if refusal is not None or record is None:
            code, note = refusal or (ReversalRefusal.NOT_REVIEWED, "")
            result = ReversalResult(
                reversal_id=r.reversal_id, claim_id=r.claim_id,
                decision=ReversalDecision.REFUSED, refusal_code=code.value, note=note,
                decided_at=now(),
            )  # fmt: skip
            stored = self.backoffice.record_reversal(result, host=host, usage=None)
            log.info("reversal_refused", reversal_id=r.reversal_id, claim_id=r.claim_id,
                     code=code.value)  # fmt: skip
            return stored
        person_id = record.person_id or r.person_id
        year = record.year if record.year is not None else record.result.reviewed_at.year
        before = self.backoffice.year_usage(person_id, year)
        after = remove_usage(before, record.spent)
        result = ReversalResult(
            reversal_id=r.reversal_id,
            claim_id=r.claim_id,
            decision=ReversalDecision.CONFIRMED,
            note=f"review of {r.claim_id} cancelled ({r.reason.value})",
            fund_restored_fen=before.fund_used_fen - after.fund_used_fen,
            critical_illness_restored_fen=before.critical_illness_used_fen
            - after.critical_illness_used_fen,
            assistance_restored_fen=before.assistance_used_fen - after.assistance_used_fen,
            decided_at=now(),
        )
        stored = self.backoffice.record_reversal(result, host=host, usage=(person_id, year, after))
        log.info(
            "reversal_confirmed", reversal_id=r.reversal_id, claim_id=r.claim_id,
            reason=r.reason.value, fund_restored_fen=stored.fund_restored_fen,
        )  # fmt: skip
        return stored

    def _reversal_refusal(
        self, r: ReversalRequest, host: str, record: ReviewRecord | None
    ) -> tuple[ReversalRefusal, str] | None:
        """Why the home refuses the reversal ``r`` (None: it confirms it)."""
        if record is None or record.host not in (None, host):
            return ReversalRefusal.NOT_REVIEWED, f"no review of {r.claim_id} from {host}"
        done = self.backoffice.confirmed_reversal_of(r.claim_id)
        if done is not None:
            return ReversalRefusal.ALREADY_REVERSED, f"reversed by {done.reversal_id}"
        if record.request_id != r.claim_request_id:
            return ReversalRefusal.WRONG_REQUEST, f"reviewed under {record.request_id}"
        reviewed = record.result
        asked = (r.fund_fen, r.critical_illness_fen, r.assistance_fen)
        if asked != (reviewed.fund_fen, reviewed.critical_illness_fen, reviewed.assistance_fen):
            return ReversalRefusal.AMOUNT_MISMATCH, (
                f"fund {r.fund_fen} fen asked, {reviewed.fund_fen} fen reviewed"
            )
        if r.requested_at - reviewed.reviewed_at > dt.timedelta(days=REVERSAL_WINDOW_DAYS):
            return ReversalRefusal.WINDOW_CLOSED, (
                f"reviewed {reviewed.reviewed_at:%Y-%m-%d}, over {REVERSAL_WINDOW_DAYS} days ago"
            )
        return None
