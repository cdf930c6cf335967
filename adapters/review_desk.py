"""The home's review desk (审核): DELAYED claims wait in a durable queue for a reviewer.

When a DELAYED claim passes the home's checks (:class:`adapters.home.HomeRole`), the rules
compute a *proposal* (:func:`adapters.rules.review`); the claim, its proposal and its
reservation are stored in the ``review_desk`` table in the step that accepts the claim, and the
handler defers the answer (:class:`bus.node.Deferred`): the host hears nothing more until a
reviewer decides. A decision — :meth:`ReviewDesk.approve`, :meth:`ReviewDesk.adjust` (approved
amount per item, with a reason code and a note: usually ``PARTIAL``) or
:meth:`ReviewDesk.reject` (``REJECTED``: every item self-pay, the fund pays nothing) — is *one
step*: the final review, the person's year usage and the review record
(:meth:`HomeBackOffice.record_review`, so redeliveries and ``DUPLICATE_CLAIM`` work as for
immediate reviews), the queue row marked decided, and the one ``ReviewResult`` answer queued in
the outbox (:meth:`bus.node.Node.answer`). A crash leaves all of it or none of it; the answer
leaves after the commit. A second decision raises :class:`ReviewClosed` and sends nothing; bad
input raises ``ValueError`` and changes nothing.

INSTANT and POINT_TO_POINT claims are still reviewed at once. With
:attr:`ReviewDeskSettings.auto_approve_clean`, a DELAYED claim whose proposal adjusts no item
(every item eligible in full: the rules' adjustments are empty) is answered at once too.

**Annual caps: when usage is reserved and released.** A person's committed usage of a year is
what :meth:`HomeBackOffice.year_usage` returns (decided reviews). On top of it:

- *reserved when the review is opened*: the proposal's usage — fund, critical illness and
  assistance toward their annual caps, and the eligible co-payment toward the critical-illness
  threshold — is reserved for the claim, in the step that queues it;
- *counted by every later review of that person and year*: proposals of other DELAYED claims,
  INSTANT and POINT_TO_POINT claims reviewed at once, and decisions all compute against
  committed usage + the open reservations of the person's *other* reviews, so two open reviews
  never both spend the same remaining cap;
- *replaced at decision*: the final amounts are computed at the decision against committed
  usage + the other open reservations (they may differ from the proposal when the person's
  usage moved meanwhile, in either direction, never beyond a cap); the reservation is dropped
  and the final usage is committed with the review, in one step;
- *released entirely on reject*: a rejected claim adds nothing to the year.

So at every commit, committed usage + open reservations stays within each cap, and whatever
the order of decisions, the fund paid to a person in a year never exceeds the annual cap.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

import structlog

from adapters.backoffice import HomeBackOffice
from adapters.directory import Directory
from adapters.rules import (
    Policy,
    Review,
    YearUsage,
    add_usage,
    classify_item,
    code_amounts,
    review,
    review_adjusted,
    review_result,
    spent,
)
from bus.db import Database
from bus.envelope import now_ms
from bus.logs import mask_id
from bus.models import (
    CatalogueClass,
    ClaimPackage,
    ItemAdjustment,
    ReviewDecision,
    ReviewResult,
    now,
)
from bus.node import Deferred, Node

if TYPE_CHECKING:
    from adapters.home import HomeRole

log = structlog.get_logger(__name__)

REVIEW_PERIOD_S: Final = 3 * 24 * 3600.0
"""How long a DELAYED claim waits for a reviewer, as told to the host (``expected_by``)."""

REASON_REJECTED: Final = "REVIEW_REJECTED"
"""Reason code on every item of a claim a reviewer rejected (the reason text is the note)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS review_desk (
    claim_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    person_id TEXT NOT NULL,
    year INTEGER NOT NULL,
    host TEXT NOT NULL,
    state TEXT NOT NULL,
    claim TEXT NOT NULL,
    proposal TEXT NOT NULL,
    items TEXT NOT NULL,
    res_fund_fen INTEGER NOT NULL,
    res_critical_illness_fen INTEGER NOT NULL,
    res_assistance_fen INTEGER NOT NULL,
    res_copayment_fen INTEGER NOT NULL,
    accepted_at_ms INTEGER NOT NULL,
    deadline_ms INTEGER,
    expected_by_ms INTEGER NOT NULL,
    decision TEXT,
    reviewer TEXT,
    decided_at_ms INTEGER,
    result TEXT);
CREATE INDEX IF NOT EXISTS review_desk_open ON review_desk (state, expected_by_ms);
CREATE INDEX IF NOT EXISTS review_desk_person ON review_desk (person_id, year, state);
"""

_COLUMNS = (
    "claim_id, request_id, person_id, year, host, state, claim, proposal, items, res_fund_fen, "
    "res_critical_illness_fen, res_assistance_fen, res_copayment_fen, accepted_at_ms, "
    "deadline_ms, expected_by_ms, decision, reviewer, decided_at_ms, result"
)
_SELECT = f"SELECT {_COLUMNS} FROM review_desk"  # noqa: S608 (the module's constant columns)
_MARKS = ",".join("?" * 20)
_INSERT = (
    f"INSERT INTO review_desk ({_COLUMNS}) VALUES ({_MARKS})"  # noqa: S608
    " ON CONFLICT (claim_id) DO NOTHING"
)


class ReviewState(StrEnum):
    """Where a review stands at the desk."""

    OPEN = "OPEN"
    """Waiting for a reviewer; its usage is reserved."""
    DECIDED = "DECIDED"
    """Decided and answered (terminal)."""


class ReviewClosed(ValueError):
    """The review was decided already: nothing changed, nothing sent."""


class UnknownReview(ValueError):
    """No review of that claim is at the desk."""


@dataclass(frozen=True, slots=True)
class ReviewDeskSettings:
    """How a home's desk works."""

    auto_approve_clean: bool = False
    """Answer at once a DELAYED claim whose proposal adjusts no item (every item eligible in
    full); off: every DELAYED claim waits for a reviewer."""
    review_period_s: float = REVIEW_PERIOD_S
    """The answer is expected this long after the claim was accepted (never later than the
    request's deadline)."""

    def __post_init__(self) -> None:
        if self.review_period_s <= 0:
            raise ValueError(f"review_period_s must be positive, not {self.review_period_s}")


@dataclass(frozen=True, slots=True)
class ItemProposal:
    """One item code of a claim as the rules propose to pay it (lines of one code together)."""

    item_code: str
    item_name: str
    catalogue_class: CatalogueClass
    """Class under the host catalogue (of the code's first line)."""
    amount_fen: int
    """Billed."""
    proposed_fen: int
    """Eligible as proposed (what an approval keeps)."""
    reason_code: str | None = None
    """The rules' reason when less than billed (``B_SELF_SHARE``, ``SELF_PAY``)."""
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Proposal:
    """The rules' split of a claim (what an approval pays, usage permitting)."""

    decision: ReviewDecision
    eligible_fen: int
    fund_fen: int
    critical_illness_fen: int
    assistance_fen: int
    personal_fen: int
    balance_fen: int
    """Personal − advance: > 0 top-up, < 0 refund."""


@dataclass(frozen=True, slots=True)
class QueuedReview:
    """A line of the queue, fit for display: the person's ID number is masked."""

    claim_id: str
    person: str
    """Masked ID number (``130102**********34``); names are never kept here."""
    host: str
    """The host province that sent the claim."""
    total_fen: int
    advance_fen: int
    proposal: Proposal
    accepted_at: dt.datetime
    expected_by: dt.datetime
    """When the host was told to expect the answer."""
    due_at: dt.datetime
    """The request's deadline (``expected_by`` when it carried none)."""
    request_id: str
    state: ReviewState


@dataclass(frozen=True, slots=True)
class ReviewFile:
    """One review as a reviewer opens it: the visit, the items with their proposal, and the
    decision once made."""

    summary: QueuedReview
    hospital_code: str
    hospital_level: int
    visit_type: str
    admitted_at: dt.datetime
    discharged_at: dt.datetime
    diagnoses: tuple[str, ...]
    items: tuple[ItemProposal, ...]
    reserved: YearUsage
    """The usage reserved for it while open (zero once decided)."""
    result: ReviewResult | None = None
    """The answer sent, once decided."""
    reviewer: str | None = None
    decided_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class _Row:
    claim_id: str
    request_id: str
    person_id: str
    year: int
    host: str
    state: ReviewState
    claim: ClaimPackage
    proposal: Review
    items: tuple[ItemProposal, ...]
    reserved: YearUsage
    accepted_at_ms: int
    deadline_ms: int | None
    expected_by_ms: int
    reviewer: str | None
    decided_at_ms: int | None
    result: ReviewResult | None


def _at(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _row(r: tuple[Any, ...]) -> _Row:
    items = tuple(
        ItemProposal(**{**d, "catalogue_class": CatalogueClass(d["catalogue_class"])})
        for d in json.loads(r[8])
    )
    return _Row(
        claim_id=str(r[0]),
        request_id=str(r[1]),
        person_id=str(r[2]),
        year=int(r[3]),
        host=str(r[4]),
        state=ReviewState(r[5]),
        claim=ClaimPackage.model_validate_json(r[6]),
        proposal=Review.model_validate_json(r[7]),
        items=items,
        reserved=YearUsage(
            fund_used_fen=int(r[9]),
            critical_illness_used_fen=int(r[10]),
            assistance_used_fen=int(r[11]),
            copayment_fen=int(r[12]),
        ),
        accepted_at_ms=int(r[13]),
        deadline_ms=None if r[14] is None else int(r[14]),
        expected_by_ms=int(r[15]),
        reviewer=None if r[17] is None else str(r[17]),
        decided_at_ms=None if r[18] is None else int(r[18]),
        result=None if r[19] is None else ReviewResult.model_validate_json(r[19]),
    )


def _summary(row: _Row) -> QueuedReview:
    p = row.proposal
    return QueuedReview(
        claim_id=row.claim_id,
        person=mask_id(row.person_id),
        host=row.host,
        total_fen=row.claim.total_fen,
        advance_fen=row.claim.advance_fen,
        proposal=Proposal(
            decision=p.decision,
            eligible_fen=p.eligible_fen,
            fund_fen=p.fund_fen,
            critical_illness_fen=p.critical_illness_fen,
            assistance_fen=p.assistance_fen,
            personal_fen=p.personal_fen,
            balance_fen=p.balance_fen,
        ),
        accepted_at=_at(row.accepted_at_ms),
        expected_by=_at(row.expected_by_ms),
        due_at=_at(row.deadline_ms if row.deadline_ms is not None else row.expected_by_ms),
        request_id=row.request_id,
        state=row.state,
    )


def _database_of(role: HomeRole) -> Database:
    """The province's database, which the node's store and the back office share."""
    store_db = getattr(role.node.store, "db", None)
    office_db = getattr(role.backoffice, "db", None)
    db = store_db if isinstance(store_db, Database) else office_db
    if not isinstance(db, Database):
        raise TypeError("the review desk needs the province's Database: pass db=")
    return db


class ReviewDesk:
    """The review queue of one home province, and the reviewers' API.

    Lives in the province's database beside the node's store and the back office: a decision
    and its answer commit in one step. Built by :class:`adapters.home.HomeRole` when it is given
    :class:`ReviewDeskSettings` (``HomeRole(..., review_desk=ReviewDeskSettings())``).
    """

    def __init__(
        self, role: HomeRole, settings: ReviewDeskSettings, *, db: Database | None = None
    ) -> None:
        self.node: Node = role.node
        self.directory: Directory = role.directory
        self.backoffice: HomeBackOffice = role.backoffice
        self.settings = settings
        self.db = db or _database_of(role)
        store_db = getattr(self.node.store, "db", None)
        if isinstance(store_db, Database) and store_db is not self.db:
            raise ValueError("the review desk must share the node's database (one step)")
        self.db.migrate("review-desk/1", _SCHEMA)

    # --- reservations -----------------------------------------------------------------------
    def reserved(self, person_id: str, year: int, *, excluding: str | None = None) -> YearUsage:
        """What the person's open reviews of ``year`` reserve (but ``excluding``'s)."""
        rows = self.db.query(
            "SELECT COALESCE(sum(res_fund_fen), 0), COALESCE(sum(res_critical_illness_fen), 0), "
            "COALESCE(sum(res_assistance_fen), 0), COALESCE(sum(res_copayment_fen), 0) "
            "FROM review_desk WHERE person_id = ? AND year = ? AND state = ? AND claim_id != ?",
            (person_id, year, ReviewState.OPEN.value, excluding or ""),
        )
        fund, ci, aid, copay = rows[0]
        return YearUsage(
            fund_used_fen=int(fund),
            critical_illness_used_fen=int(ci),
            assistance_used_fen=int(aid),
            copayment_fen=int(copay),
        )

    def usage_for(self, person_id: str, year: int, *, excluding: str | None = None) -> YearUsage:
        """Committed usage + the open reservations (but ``excluding``'s): what a review of the
        person in ``year`` computes against."""
        return add_usage(
            self.backoffice.year_usage(person_id, year),
            self.reserved(person_id, year, excluding=excluding),
        )

    # --- the home's side ---------------------------------------------------------------------
    def request_of(self, claim_id: str) -> str | None:
        """The request id of the claim's review at the desk (open or decided), or None."""
        rows = self.db.query("SELECT request_id FROM review_desk WHERE claim_id = ?", (claim_id,))
        return str(rows[0][0]) if rows else None

    def holds(self, proposal: Review) -> bool:
        """Whether a DELAYED claim with this proposal waits for a reviewer (else: answered at
        once, auto-approved because it has nothing to adjust)."""
        return not (self.settings.auto_approve_clean and not proposal.adjustments)

    def open(
        self,
        claim: ClaimPackage,
        proposal: Review,
        *,
        request_id: str,
        host: str,
        deadline_ms: int | None,
    ) -> Deferred:
        """Queue a checked DELAYED claim with its proposal and reserve the proposal's usage,
        inside the running step (the handler's); the :class:`Deferred` the handler returns."""
        policy = self.directory.policy(claim.home_region)
        assert policy is not None  # checked by the home before
        classes = self.directory.catalogue_classes(host)
        accepted = now_ms()
        expected_by = accepted + int(self.settings.review_period_s * 1000)
        if deadline_ms is not None:
            expected_by = min(expected_by, deadline_ms)
        items = _item_proposals(claim, policy, classes)
        reserve = spent(proposal)
        with self.db.write() as cur:
            cur.execute(
                _INSERT,
                (
                    claim.claim_id, request_id, claim.person_id, claim.discharged_at.year, host,
                    ReviewState.OPEN.value, claim.model_dump_json(), proposal.model_dump_json(),
                    json.dumps([_item_json(i) for i in items], ensure_ascii=False),
                    reserve.fund_used_fen, reserve.critical_illness_used_fen,
                    reserve.assistance_used_fen, reserve.copayment_fen,
                    accepted, deadline_ms, expected_by, None, None, None, None,
                ),
            )  # fmt: skip
        log.info(
            "claim_queued_for_review",
            claim_id=claim.claim_id,
            host=host,
            proposed_fund_fen=proposal.fund_fen,
            adjustments=len(proposal.adjustments),
        )
        return Deferred(
            note=f"claim {claim.claim_id} queued for review at {self.node.province}",
            expected_by_ms=expected_by,
        )

    # --- the reviewers' side -----------------------------------------------------------------
    def open_reviews(self, limit: int = 100) -> list[QueuedReview]:
        """Open reviews, the earliest expected answer first."""
        rows = self.db.query(
            _SELECT + " WHERE state = ? ORDER BY expected_by_ms, accepted_at_ms LIMIT ?",
            (ReviewState.OPEN.value, limit),
        )
        return [_summary(_row(r)) for r in rows]

    def count_open(self) -> int:
        """How many reviews wait for a reviewer."""
        rows = self.db.query(
            "SELECT count(*) FROM review_desk WHERE state = ?", (ReviewState.OPEN.value,)
        )
        return int(rows[0][0])

    def get(self, claim_id: str) -> ReviewFile:
        """A review by claim id, open or decided; :class:`UnknownReview` if none."""
        row = self._load(claim_id)
        c = row.claim
        return ReviewFile(
            summary=_summary(row),
            hospital_code=c.hospital_code,
            hospital_level=c.hospital_level,
            visit_type=c.visit_type.value,
            admitted_at=c.admitted_at,
            discharged_at=c.discharged_at,
            diagnoses=c.diagnoses,
            items=row.items,
            reserved=row.reserved,
            result=row.result,
            reviewer=row.reviewer,
            decided_at=None if row.decided_at_ms is None else _at(row.decided_at_ms),
        )

    async def approve(self, claim_id: str, reviewer: str) -> ReviewResult:
        """Approve the rules' proposal (recomputed against the person's usage now) and answer."""
        return await self._decide(claim_id, reviewer, approve=True)

    async def adjust(
        self,
        claim_id: str,
        adjustments: Sequence[ItemAdjustment | tuple[str, int, str, str]],
        reviewer: str,
    ) -> ReviewResult:
        """Set the approved (eligible) amount of some items — ``(item_code, approved_fen,
        reason_code, note)`` each, 0 ≤ approved ≤ the code's billed amount, a reason code
        required — keep the rules for the others, and answer (usually ``PARTIAL``)."""
        given = [
            a
            if isinstance(a, ItemAdjustment)
            else ItemAdjustment(item_code=a[0], approved_fen=a[1], reason_code=a[2], note=a[3])
            for a in adjustments
        ]
        if not given:
            raise ValueError(f"claim {claim_id}: no item adjusted (approve it instead)")
        return await self._decide(claim_id, reviewer, overrides=given)

    async def reject(
        self, claim_id: str, reason: str, reviewer: str, *, reason_code: str = REASON_REJECTED
    ) -> ReviewResult:
        """Reject the claim: every item self-pay, the fund pays nothing (``REJECTED``), the
        reservation released; ``reason`` is each item's note."""
        if not reason.strip():
            raise ValueError(f"claim {claim_id}: a rejection needs a reason")
        if not reason_code.strip():
            raise ValueError(f"claim {claim_id}: the reason code is empty")
        return await self._decide(claim_id, reviewer, reject=(reason_code, reason))

    # --- one decision, one step --------------------------------------------------------------
    def _load(self, claim_id: str) -> _Row:
        # Locked until the decision commits: a second decision on another instance waits,
        # then finds it decided.
        lock = self.db.for_update if self.db.current() is not None else ""
        rows = self.db.query(_SELECT + " WHERE claim_id = ?" + lock, (claim_id,))
        if not rows:
            raise UnknownReview(f"no review of claim {claim_id} at {self.node.province}'s desk")
        return _row(rows[0])

    async def _decide(
        self,
        claim_id: str,
        reviewer: str,
        *,
        approve: bool = False,
        overrides: Sequence[ItemAdjustment] = (),
        reject: tuple[str, str] | None = None,
    ) -> ReviewResult:
        if not reviewer.strip():
            raise ValueError(f"claim {claim_id}: the reviewer is empty")
        async with self.node.step():
            row = self._load(claim_id)
            if row.state is not ReviewState.OPEN:
                by = f" by {row.reviewer}" if row.reviewer else ""
                raise ReviewClosed(f"the review of claim {claim_id} was decided already{by}")
            outcome = self._final(row, approve=approve, overrides=overrides, reject=reject)
            result = review_result(outcome, claim_id, reviewer, now())
            if reject is not None:
                result = result.model_copy(update={"decision": ReviewDecision.REJECTED})
            committed = self.backoffice.year_usage(row.person_id, row.year)
            request_id, stored = self.backoffice.record_review(
                claim_id,
                row.person_id,
                row.request_id,
                result,
                row.year,
                add_usage(committed, spent(outcome)),
                host=row.host,
                spent=spent(outcome),
            )
            if request_id != row.request_id:
                raise ReviewClosed(
                    f"claim {claim_id} was answered already (request {request_id})"
                )  # rolled back with the step
            with self.db.write() as cur:
                cur.execute(
                    "UPDATE review_desk SET state = ?, decision = ?, reviewer = ?, "
                    "decided_at_ms = ?, result = ?, res_fund_fen = 0, "
                    "res_critical_illness_fen = 0, res_assistance_fen = 0, "
                    "res_copayment_fen = 0 WHERE claim_id = ? AND state = ?",
                    (
                        ReviewState.DECIDED.value, stored.decision.value, reviewer, now_ms(),
                        stored.model_dump_json(), claim_id, ReviewState.OPEN.value,
                    ),
                )  # fmt: skip
            await self.node.answer(row.request_id, stored)
        log.info(
            "claim_review_decided",
            claim_id=claim_id,
            decision=stored.decision.value,
            reviewer=reviewer,
            fund_fen=stored.fund_fen,
            personal_fen=stored.personal_fen,
        )
        return stored

    def _final(
        self,
        row: _Row,
        *,
        approve: bool,
        overrides: Sequence[ItemAdjustment],
        reject: tuple[str, str] | None,
    ) -> Review:
        """The final review: against committed usage + the other open reservations."""
        claim = row.claim
        policy = self.directory.policy(claim.home_region)
        person = self.backoffice.person(row.person_id)
        if policy is None or person is None:
            raise ValueError(
                f"claim {row.claim_id}: the home no longer knows its "
                + ("policy" if policy is None else "person")
            )
        usage = self.usage_for(row.person_id, row.year, excluding=row.claim_id)
        classes = self.directory.catalogue_classes(row.host)
        kw: dict[str, Any] = {
            "insurance_type": person.insurance_type,
            "assistance_eligible": person.assistance_eligible,
            "catalogue_classes": classes,
        }
        if approve:
            return review(claim, policy, usage, **kw)
        if reject is not None:
            code, reason = reject
            everything = [
                ItemAdjustment(item_code=c, approved_fen=0, reason_code=code, note=reason)
                for c in code_amounts(claim)
            ]
            return review_adjusted(claim, policy, usage, everything, **kw)
        return review_adjusted(claim, policy, usage, overrides, **kw)


def _item_proposals(
    claim: ClaimPackage, policy: Policy, classes: Mapping[str, CatalogueClass]
) -> tuple[ItemProposal, ...]:
    """The rules' proposal per item code (lines of one code summed)."""
    out: dict[str, ItemProposal] = {}
    for item in claim.items:
        approved, adjustment = classify_item(item, policy, classes)
        cls = classes.get(item.item_code, item.catalogue_class)
        before = out.get(item.item_code)
        if before is None:
            out[item.item_code] = ItemProposal(
                item_code=item.item_code,
                item_name=item.item_name,
                catalogue_class=cls,
                amount_fen=item.amount_fen,
                proposed_fen=approved,
                reason_code=adjustment.reason_code if adjustment else None,
                note=adjustment.note if adjustment else None,
            )
        else:
            out[item.item_code] = ItemProposal(
                item_code=before.item_code,
                item_name=before.item_name,
                catalogue_class=before.catalogue_class,
                amount_fen=before.amount_fen + item.amount_fen,
                proposed_fen=before.proposed_fen + approved,
                reason_code=before.reason_code or (adjustment.reason_code if adjustment else None),
                note=before.note or (adjustment.note if adjustment else None),
            )
    return tuple(out.values())


def _item_json(item: ItemProposal) -> dict[str, Any]:
    return {
        "item_code": item.item_code,
        "item_name": item.item_name,
        "catalogue_class": item.catalogue_class.value,
        "amount_fen": item.amount_fen,
        "proposed_fen": item.proposed_fen,
        "reason_code": item.reason_code,
        "note": item.note,
    }
