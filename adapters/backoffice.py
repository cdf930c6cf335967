"""The back-office seam: how each role reaches its province's own systems.

A real province joins the bus by implementing :class:`HomeBackOffice` (persons and their
insurance, filings, the fund ledger and annual cap use, reviews) and :class:`HostBackOffice`
(filings received, hospitals' claims, patients' payments and refunds). The roles never touch
anything else. :class:`SqlBackOffice` is the durable reference implementation used by the
demo and ``xsettle province``; simulators drive it from outside, like a hospital desk would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from adapters.rules import YearUsage
from bus.db import Cursor, Database, open_database
from bus.envelope import now_ms
from bus.models import (
    ClaimPackage,
    FilingStatus,
    FilingUpload,
    InsuranceType,
    ReversalDecision,
    ReversalResult,
    ReviewResult,
    SettlementNotice,
)


@dataclass(frozen=True, slots=True)
class Person:
    """An insured person as the home agency knows them."""

    person_id: str
    """Social security number (the 18-digit resident ID)."""
    name: str
    """Full name (personal data: never logged unmasked)."""
    insurance_type: InsuranceType
    """Employee, resident or retired cadre."""
    home_region: str
    """Pooling region where the person is insured."""
    assistance_eligible: bool = False
    """Marked eligible for medical assistance (医疗救助)."""


class ClaimState(StrEnum):
    """Where a claim stands at the host (the hospital desk's view).

    ==================  ===========================================  ==========================
    from                event                                        to
    ==================  ===========================================  ==========================
    (desk)              submit                                       SUBMITTED
    SUBMITTED           acknowledgement                              ACKNOWLEDGED
    SUBMITTED, ACK.     deadline, INSTANT / POINT_TO_POINT           FALLBACK (advance taken)
    SUBMITTED, ACK.     deadline, DELAYED or after a fallback        OVERDUE (escalated)
    FALLBACK            no late review within the delayed deadline   OVERDUE (escalated)
    OVERDUE, FALLBACK   operator re-send (a new request)             SUBMITTED
    SUBMITTED, ACK.     DUPLICATE_CLAIM to an operator's re-send     OVERDUE (or FALLBACK)
    any open            review (late ones too)                       SETTLED
    any open            error report                                 REFUSED
    OVERDUE, FALLBACK   operator close                               CLOSED_BY_OPERATOR
    SETTLED             reversal confirmed by the home               REVERSED
    ==================  ===========================================  ==========================

    The values are stored: ``SUBMITTED`` keeps the value ``"AWAITING_REVIEW"`` of older files
    and reports, and ``AWAITING_REVIEW`` is the same member under its former name.
    """

    SUBMITTED = "AWAITING_REVIEW"
    """Sent to the home, neither answered nor acknowledged yet."""
    AWAITING_REVIEW = "AWAITING_REVIEW"  # the former name of SUBMITTED (an alias)
    ACKNOWLEDGED = "ACKNOWLEDGED"
    """The home acknowledged the request (accepted for review, expected by a date)."""
    FALLBACK = "FALLBACK"
    """Instant review did not come in time: advance collected, waiting as delayed."""
    OVERDUE = "OVERDUE"
    """No answer by the deadline (or the home has it under an earlier request): escalated,
    waiting for a late answer, an operator's re-send or an operator's close."""
    SETTLED = "SETTLED"
    """Reviewed and settled with the patient (terminal)."""
    REFUSED = "REFUSED"
    """The home answered with an error report: the patient pays in full (terminal)."""
    CLOSED_BY_OPERATOR = "CLOSED_BY_OPERATOR"
    """Closed by an operator's decision without a review (terminal; see
    :class:`CloseDecision`)."""
    REVERSED = "REVERSED"
    """Settled, then cancelled by a reversal the home confirmed (冲正, contract v1.3): the
    patient's payments given back, the home's funds owe nothing for it (terminal)."""


TERMINAL_STATES = frozenset(
    {ClaimState.SETTLED, ClaimState.REFUSED, ClaimState.CLOSED_BY_OPERATOR, ClaimState.REVERSED}
)


class CloseDecision(StrEnum):
    """What an operator decides when closing a claim the home never answered."""

    KEEP_ADVANCE = "KEEP_ADVANCE"
    """The advance the patient paid stands as their payment; nothing more moves."""
    REFUND_ADVANCE = "REFUND_ADVANCE"
    """The advance is refunded to the patient (a ``REFUND`` payment)."""


class ClaimEventKind(StrEnum):
    """What happened to a claim at the host (one row of its timeline)."""

    SUBMITTED = "submitted"
    ACKNOWLEDGED = "acknowledged"
    REVIEWED = "reviewed"
    SETTLED = "settled"
    REFUSED = "refused"
    FELL_BACK = "fell_back"
    OVERDUE = "overdue"
    RESENT = "resent"
    ALREADY_AT_HOME = "already_at_home"
    """The home answered a re-send with DUPLICATE_CLAIM: it has the claim under an earlier
    request, whose answer settles it."""
    ANSWER_IGNORED = "answer_ignored"
    """An answer came for a claim already closed (late, or to a re-send)."""
    CLOSED_BY_OPERATOR = "closed_by_operator"
    REVERSAL_REQUESTED = "reversal_requested"
    REVERSED = "reversed"
    REVERSAL_REFUSED = "reversal_refused"
    """The home refused the reversal (or answered it with an error): the settlement stands."""


EventData = dict[str, str | int | None]
"""Structured detail of a timeline event (amounts in fen, times in epoch ms)."""


@dataclass(frozen=True, slots=True)
class ClaimEvent:
    """One transition of a claim, as recorded in the step that made it."""

    claim_id: str
    """The claim."""
    seq: int
    """1, 2, ... per claim."""
    at_ms: int
    """When, epoch milliseconds."""
    kind: ClaimEventKind
    """What happened."""
    state: ClaimState
    """Where the claim stands after it."""
    detail: str
    """One line for a person (no names or ID numbers)."""
    data: EventData = field(default_factory=dict)
    """The same, structured."""


@dataclass(frozen=True, slots=True)
class HostClaim:
    """A claim as the host keeps it."""

    claim: ClaimPackage
    """The package as sent."""
    request_id: str | None
    """``xs-message-id`` it was sent with."""
    state: ClaimState
    """Where it stands."""
    advance_collected_fen: int = 0
    """Advance the patient paid before review."""
    review: ReviewResult | None = None
    """The home's review, once come."""
    balance_fen: int = 0
    """Personal share − advance collected: > 0 top-up, < 0 refund."""
    error_code: str | None = None
    """The home's error code when refused."""
    submitted_at_ms: int | None = None
    """When the claim was first sent (None in rows of older versions: see ``submitted_at``)."""
    deadline_ms: int | None = None
    """When the answer to the request in flight is due (None: no request in flight)."""
    acknowledged_at_ms: int | None = None
    """When the home acknowledged the request in flight (None: not acknowledged)."""
    expected_by_ms: int | None = None
    """When the home expects to answer, by its latest acknowledgement."""
    fell_back_at_ms: int | None = None
    """When an instant claim fell back to delayed."""
    overdue_since_ms: int | None = None
    """When it was escalated as overdue (the latest time)."""
    resent_as: tuple[str, ...] = ()
    """Request ids of operators' re-sends as new requests, oldest first (the first send is
    ``request_id``); an answer to any of them is an answer about this claim."""
    close_decision: CloseDecision | None = None
    """The operator's decision, when closed by an operator."""
    close_reason: str | None = None
    """Why, in the operator's words."""
    closed_by: str | None = None
    """The operator who closed it."""
    reviewed_request_id: str | None = None
    """The request whose answer settled it (the first send, or a re-send)."""
    settled_at_ms: int | None = None
    """When it was settled with the patient."""
    reversal_id: str | None = None
    """The latest reversal asked for (``V-<code>-…``), if any."""
    reversal_request_id: str | None = None
    """The ``xs-message-id`` of that reversal's request."""
    reversal_state: str | None = None
    """``REQUESTED``, ``CONFIRMED``, ``REFUSED:<code>`` or ``FAILED:<code>`` (an error
    report, or no answer by the deadline)."""
    reversal_reason: str | None = None
    """Why, as asked (a :class:`bus.models.ReversalReason` value)."""

    @property
    def requests(self) -> tuple[str, ...]:
        """Every request id the claim was sent with, the latest last."""
        return ((self.request_id,) if self.request_id else ()) + self.resent_as

    @property
    def latest_request_id(self) -> str | None:
        """The request id of the latest send."""
        return self.requests[-1] if self.requests else None


@dataclass(frozen=True, slots=True)
class HomeFiling:
    """A filing as the home agency keeps it: its latest upload and the host's receipt."""

    filing: FilingUpload
    """The latest upload of the filing (CREATE, UPDATE or REVOKE)."""
    receipt: FilingStatus | None
    """The host's receipt of that upload (None: not come yet)."""
    receipt_at_ms: int | None
    """When the home recorded the receipt, epoch ms (None: not come yet, or recorded before
    the time was kept)."""


@dataclass(frozen=True, slots=True)
class PersonReview:
    """A review the home made of one of a person's claims, and the host's settlement of it."""

    claim_id: str
    """The claim."""
    host: str | None
    """The host province that sent the claim."""
    year: int | None
    """The year of discharge (whose caps the claim counts against)."""
    result: ReviewResult
    """The review as answered."""
    settlement: SettlementNotice | None
    """The host's settlement notice, once come."""


@dataclass(frozen=True, slots=True)
class ReviewRecord:
    """A review as the home keeps it: what a reversal is checked against and gives back."""

    request_id: str
    """The request the review answered."""
    result: ReviewResult
    """The review as answered."""
    person_id: str | None
    """Whose claim (None in rows older than the column)."""
    year: int | None
    """The year whose caps it counted against (None in old rows)."""
    host: str | None
    """The host province that sent the claim."""
    spent: YearUsage
    """What it added to the person's year (old rows: its fund, critical-illness and
    assistance shares; their eligible co-payment was not kept)."""


class HomeBackOffice(Protocol):
    """The home agency's systems (参保地经办机构)."""

    def person(self, person_id: str) -> Person | None:
        """An insured person of this province, or None."""

    def record_filing(self, filing: FilingUpload) -> None:
        """Keep a filing the agency registered (create, update or revoke)."""

    def filings_of(self, person_id: str) -> list[FilingUpload]:
        """The person's filings, latest last."""

    def record_receipt(self, filing_id: str, status: FilingStatus) -> None:
        """The host acknowledged a filing."""

    def year_usage(self, person_id: str, year: int) -> YearUsage:
        """What the person used of this year's caps."""

    def review_of(self, claim_id: str) -> tuple[str, ReviewResult] | None:
        """(request id, result) of a claim already reviewed."""

    def reviewed_for(self, claim_id: str) -> str | None:
        """The host province whose claim ``claim_id`` this home reviewed, or None."""

    def record_review(
        self,
        claim_id: str,
        person_id: str,
        request_id: str,
        result: ReviewResult,
        year: int,
        usage: YearUsage,
        *,
        host: str,
        spent: YearUsage | None = None,
    ) -> tuple[str, ReviewResult]:
        """Store a review of ``host``'s claim and the person's new usage atomically; if the
        claim was reviewed before, change nothing and return the earlier (request id,
        result). ``spent``: what the review added to the year (kept for a reversal)."""

    def record_settlement(self, notice: SettlementNotice) -> None:
        """The host closed a claim (basis of monthly clearing)."""

    def review_record(self, claim_id: str) -> ReviewRecord | None:
        """The review of a claim, with whose it was and what it added to the year."""

    def reversal(self, reversal_id: str) -> ReversalResult | None:
        """The answer given to a reversal id, if any (a reversal is answered once)."""

    def confirmed_reversal_of(self, claim_id: str) -> ReversalResult | None:
        """The reversal that cancelled the claim, if one did."""

    def record_reversal(
        self, result: ReversalResult, *, host: str, usage: tuple[str, int, YearUsage] | None
    ) -> ReversalResult:
        """Keep the answer to a reversal and, when confirmed, the person's year after it
        (person id, year, usage), atomically; a reversal id answered before keeps its first
        answer, which is returned."""


class HostBackOffice(Protocol):
    """The host's systems (就医地: filing registry, hospitals' bills, patients' payments)."""

    def register_filing(self, filing: FilingUpload) -> FilingStatus:
        """Apply a filing upload to the registry; the receipt status."""

    def filing_for(self, person_id: str) -> FilingUpload | None:
        """The person's current filing here (the revoked one too, to tell apart)."""

    def save_claim(self, claim: HostClaim, payments: Sequence[tuple[str, int]] = ()) -> None:
        """Insert or replace a claim together with the payments (kind, fen) that moved it
        there, in one transaction: a crash never records money without the state."""

    def claim(self, claim_id: str) -> HostClaim | None:
        """A claim by id."""

    def claim_by_request(self, request_id: str) -> HostClaim | None:
        """The claim sent with this request id (its first send, or one of
        ``HostClaim.resent_as``)."""

    def claims(self, *, open_only: bool = False) -> list[HostClaim]:
        """All claims (or only those not in a terminal state)."""


@runtime_checkable
class ClaimTimeline(Protocol):
    """A host back office that also keeps each claim's timeline (optional: the host role
    keeps it in memory for a back office without one). An event is recorded in the step of
    the transition it describes, so it commits with the claim's new state or not at all."""

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
        """Append an event to the claim's timeline."""

    def timeline(self, claim_id: str) -> list[ClaimEvent]:
        """The claim's events, oldest first."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS persons (person_id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS home_filings (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, filing_id TEXT, person_id TEXT, data TEXT,
    receipt TEXT);
CREATE INDEX IF NOT EXISTS home_filings_person ON home_filings (person_id);
CREATE TABLE IF NOT EXISTS usage (person_id TEXT, year INTEGER, data TEXT,
    PRIMARY KEY (person_id, year));
CREATE TABLE IF NOT EXISTS reviews (claim_id TEXT PRIMARY KEY, request_id TEXT, data TEXT,
    host TEXT);
CREATE TABLE IF NOT EXISTS settlements (claim_id TEXT PRIMARY KEY, data TEXT);
CREATE TABLE IF NOT EXISTS host_filings (person_id TEXT PRIMARY KEY, data TEXT);
CREATE TABLE IF NOT EXISTS claims (claim_id TEXT PRIMARY KEY, request_id TEXT, state TEXT,
    data TEXT);
CREATE INDEX IF NOT EXISTS claims_request ON claims (request_id);
CREATE TABLE IF NOT EXISTS payments (seq INTEGER PRIMARY KEY AUTOINCREMENT, claim_id TEXT,
    kind TEXT, amount_fen INTEGER);
"""


_CLAIM_TIMELINE_SCHEMA = """
CREATE INDEX IF NOT EXISTS claims_state ON claims (state);
CREATE TABLE IF NOT EXISTS claim_requests (request_id TEXT PRIMARY KEY, claim_id TEXT);
CREATE TABLE IF NOT EXISTS claim_events (claim_id TEXT, seq INTEGER, at_ms INTEGER, kind TEXT,
    state TEXT, detail TEXT, data TEXT, PRIMARY KEY (claim_id, seq));
"""
"""The host's claim index by state, the request ids of operators' re-sends, and the claims'
timelines (added in 1.2: created beside the tables of older files)."""

_ADDED_COLUMNS: dict[str, dict[str, str]] = {
    "home_filings": {"receipt_at_ms": "INTEGER"},
    "reviews": {"person_id": "TEXT", "year": "INTEGER", "spent": "TEXT"},
}
"""Columns added for the gateway's queries (when a filing's receipt came; whose claim a review
was, and its year): added to older files at open, NULL in their old rows."""

_REVERSALS_SCHEMA = """
CREATE TABLE IF NOT EXISTS reversals (reversal_id TEXT PRIMARY KEY, claim_id TEXT NOT NULL,
    host TEXT, decision TEXT NOT NULL, data TEXT NOT NULL, at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS reversals_claim ON reversals (claim_id, decision);
"""
"""The home's answers to reversals (contract v1.3), one per reversal id."""

_PUBLIC_QUERY_SCHEMA = """
CREATE INDEX IF NOT EXISTS home_filings_id ON home_filings (filing_id);
CREATE INDEX IF NOT EXISTS reviews_person ON reviews (person_id, year);
"""


def _dump_claim(c: HostClaim) -> str:
    return json.dumps(
        {
            "claim": c.claim.model_dump(mode="json"),
            "request_id": c.request_id,
            "state": c.state.value,
            "advance": c.advance_collected_fen,
            "review": c.review.model_dump(mode="json") if c.review else None,
            "balance": c.balance_fen,
            "error_code": c.error_code,
            "submitted_at_ms": c.submitted_at_ms,
            "deadline_ms": c.deadline_ms,
            "acknowledged_at_ms": c.acknowledged_at_ms,
            "expected_by_ms": c.expected_by_ms,
            "fell_back_at_ms": c.fell_back_at_ms,
            "overdue_since_ms": c.overdue_since_ms,
            "resent_as": list(c.resent_as),
            "close_decision": c.close_decision.value if c.close_decision else None,
            "close_reason": c.close_reason,
            "closed_by": c.closed_by,
            "reviewed_request_id": c.reviewed_request_id,
            "settled_at_ms": c.settled_at_ms,
            "reversal_id": c.reversal_id,
            "reversal_request_id": c.reversal_request_id,
            "reversal_state": c.reversal_state,
            "reversal_reason": c.reversal_reason,
        }
    )


def _load_claim(text: str) -> HostClaim:
    d = json.loads(text)
    decision = d.get("close_decision")
    return HostClaim(
        claim=ClaimPackage.model_validate(d["claim"]),
        request_id=d["request_id"],
        state=ClaimState(d["state"]),
        advance_collected_fen=d["advance"],
        review=ReviewResult.model_validate(d["review"]) if d["review"] else None,
        balance_fen=d["balance"],
        error_code=d["error_code"],
        submitted_at_ms=d.get("submitted_at_ms"),
        deadline_ms=d.get("deadline_ms"),
        acknowledged_at_ms=d.get("acknowledged_at_ms"),
        expected_by_ms=d.get("expected_by_ms"),
        fell_back_at_ms=d.get("fell_back_at_ms"),
        overdue_since_ms=d.get("overdue_since_ms"),
        resent_as=tuple(d.get("resent_as") or ()),
        close_decision=CloseDecision(decision) if decision else None,
        close_reason=d.get("close_reason"),
        closed_by=d.get("closed_by"),
        reviewed_request_id=d.get("reviewed_request_id"),
        settled_at_ms=d.get("settled_at_ms"),
        reversal_id=d.get("reversal_id"),
        reversal_request_id=d.get("reversal_request_id"),
        reversal_state=d.get("reversal_state"),
        reversal_reason=d.get("reversal_reason"),
    )


def _home_filing(row: tuple[Any, ...]) -> HomeFiling:
    data, receipt, at_ms = row
    return HomeFiling(
        filing=FilingUpload.model_validate_json(data),
        receipt=FilingStatus(receipt) if receipt else None,
        receipt_at_ms=None if at_ms is None else int(at_ms),
    )


def _terminal_values() -> tuple[str, ...]:
    return tuple(sorted(s.value for s in TERMINAL_STATES))


def _marks(n: int) -> str:
    """``?, ?, ?`` for ``n`` parameters."""
    return ", ".join("?" * n)


class SqlBackOffice:
    """Reference back office of one province (both roles), in the province's database.

    It shares :class:`bus.db.Database` with the bus's store, so the writes a role makes while
    handling a record join that record's step: the claim row, its payment, the processed mark
    and the outgoing notice commit together or not at all.
    """

    def __init__(self, db: Database | Path | str) -> None:
        self.db = db if isinstance(db, Database) else open_database(db)
        self.db.migrate("backoffice/1", _SCHEMA)
        self.db.migrate("backoffice/2-claim-timeline", _CLAIM_TIMELINE_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            self.db.add_columns(table, columns)
        self.db.migrate("backoffice/3-public-queries", _PUBLIC_QUERY_SCHEMA)
        self.db.migrate("backoffice/4-reversals", _REVERSALS_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[Cursor]:
        with self.db.write() as cur:
            yield cur

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.db.query(sql, args)

    def _locking(self) -> str:
        """Inside a step, the suffix that locks the rows read until the step ends: another
        instance of the province (PostgreSQL) changing the same claim waits for this one."""
        return self.db.for_update if self.db.current() is not None else ""

    def close(self) -> None:
        """Release the file (shared with the bus's store: close after the node stopped)."""
        self.db.close()

    # --- home -----------------------------------------------------------------------------
    def add_person(self, person: Person) -> None:
        """Enrol a person (the simulators' and tests' way in)."""
        data = {
            "person_id": person.person_id,
            "name": person.name,
            "insurance_type": person.insurance_type.value,
            "home_region": person.home_region,
            "assistance_eligible": person.assistance_eligible,
        }
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO persons VALUES (?, ?) ON CONFLICT (person_id) DO UPDATE SET "
                "data = excluded.data",
                (person.person_id, json.dumps(data)),
            )

    def person(self, person_id: str) -> Person | None:
        rows = self._all("SELECT data FROM persons WHERE person_id = ?", (person_id,))
        if not rows:
            return None
        d = json.loads(rows[0][0])
        return Person(
            person_id=d["person_id"],
            name=d["name"],
            insurance_type=InsuranceType(d["insurance_type"]),
            home_region=d["home_region"],
            assistance_eligible=d["assistance_eligible"],
        )

    def record_filing(self, filing: FilingUpload) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO home_filings (filing_id, person_id, data) VALUES (?, ?, ?)",
                (filing.filing_id, filing.person_id, filing.model_dump_json()),
            )

    def filings_of(self, person_id: str) -> list[FilingUpload]:
        rows = self._all(
            "SELECT data FROM home_filings WHERE person_id = ? ORDER BY seq", (person_id,)
        )
        return [FilingUpload.model_validate_json(r[0]) for r in rows]

    def record_receipt(self, filing_id: str, status: FilingStatus) -> None:
        with self._tx() as cur:
            cur.execute(
                "UPDATE home_filings SET receipt = ?, receipt_at_ms = ? WHERE filing_id = ?",
                (status.value, now_ms(), filing_id),
            )

    def receipted_hosts(self) -> set[str]:
        """The host regions that answered a filing of this agency with a receipt: the hosts
        known to be on the bus (a host states its days to the homes that filed with it)."""
        rows = self._all("SELECT data FROM home_filings WHERE receipt IS NOT NULL")
        return {FilingUpload.model_validate_json(r[0]).host_region for r in rows}

    def home_filing(self, filing_id: str) -> HomeFiling | None:
        """A filing this agency made, as it stands (its latest upload), or None."""
        rows = self._all(
            "SELECT data, receipt, receipt_at_ms FROM home_filings WHERE filing_id = ? "
            "ORDER BY seq DESC LIMIT 1",
            (filing_id,),
        )
        return _home_filing(rows[0]) if rows else None

    def home_filings_of(self, person_id: str) -> list[HomeFiling]:
        """The filings this agency made for a person, as they stand, oldest first."""
        rows = self._all(
            "SELECT data, receipt, receipt_at_ms FROM home_filings WHERE seq IN "
            "(SELECT max(seq) FROM home_filings WHERE person_id = ? GROUP BY filing_id) "
            "ORDER BY seq",
            (person_id,),
        )
        return [_home_filing(r) for r in rows]

    def receipts(self) -> dict[str, int]:
        """Filings by receipt status ("" for none yet)."""
        rows = self._all("SELECT COALESCE(receipt, ''), count(*) FROM home_filings GROUP BY 1")
        return {str(k): int(v) for k, v in rows}

    def year_usage(self, person_id: str, year: int) -> YearUsage:
        if self.db.current() is not None:
            # Read to be changed: a review desk decision on another instance waits (the row
            # may not exist yet, so a named lock rather than a row lock).
            self.db.lock(f"usage:{person_id}:{year}")
        rows = self._all(
            "SELECT data FROM usage WHERE person_id = ? AND year = ?", (person_id, year)
        )
        return YearUsage.model_validate_json(rows[0][0]) if rows else YearUsage()

    def review_of(self, claim_id: str) -> tuple[str, ReviewResult] | None:
        rows = self._all("SELECT request_id, data FROM reviews WHERE claim_id = ?", (claim_id,))
        if not rows:
            return None
        return str(rows[0][0]), ReviewResult.model_validate_json(rows[0][1])

    def record_review(
        self,
        claim_id: str,
        person_id: str,
        request_id: str,
        result: ReviewResult,
        year: int,
        usage: YearUsage,
        *,
        host: str,
        spent: YearUsage | None = None,
    ) -> tuple[str, ReviewResult]:
        with self._tx() as cur:
            self.db.lock(f"review:{claim_id}")
            row = cur.execute(
                "SELECT request_id, data FROM reviews WHERE claim_id = ?", (claim_id,)
            ).fetchone()
            if row is not None:
                return str(row[0]), ReviewResult.model_validate_json(row[1])
            cur.execute(
                "INSERT INTO reviews (claim_id, request_id, data, host, person_id, year, spent) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (claim_id, request_id, result.model_dump_json(), host, person_id, year,
                 spent.model_dump_json() if spent is not None else None),
            )  # fmt: skip
            cur.execute(
                "INSERT INTO usage VALUES (?, ?, ?) ON CONFLICT (person_id, year) DO UPDATE SET "
                "data = excluded.data",
                (person_id, year, usage.model_dump_json()),
            )
        return request_id, result

    def review_record(self, claim_id: str) -> ReviewRecord | None:
        rows = self._all(
            "SELECT request_id, data, person_id, year, host, spent FROM reviews "  # noqa: S608
            "WHERE claim_id = ?" + self._locking(),
            (claim_id,),
        )
        if not rows:
            return None
        request_id, data, person_id, year, host, spent = rows[0]
        result = ReviewResult.model_validate_json(data)
        return ReviewRecord(
            request_id=str(request_id),
            result=result,
            person_id=None if person_id is None else str(person_id),
            year=None if year is None else int(year),
            host=None if host is None else str(host),
            spent=YearUsage.model_validate_json(spent)
            if spent
            else YearUsage(
                fund_used_fen=result.fund_fen,
                critical_illness_used_fen=result.critical_illness_fen,
                assistance_used_fen=result.assistance_fen,
            ),
        )

    def reversal(self, reversal_id: str) -> ReversalResult | None:
        rows = self._all("SELECT data FROM reversals WHERE reversal_id = ?", (reversal_id,))
        return ReversalResult.model_validate_json(rows[0][0]) if rows else None

    def confirmed_reversal_of(self, claim_id: str) -> ReversalResult | None:
        rows = self._all(
            "SELECT data FROM reversals WHERE claim_id = ? AND decision = ?",
            (claim_id, ReversalDecision.CONFIRMED.value),
        )
        return ReversalResult.model_validate_json(rows[0][0]) if rows else None

    def record_reversal(
        self, result: ReversalResult, *, host: str, usage: tuple[str, int, YearUsage] | None
    ) -> ReversalResult:
        with self._tx() as cur:
            self.db.lock(f"reversal:{result.claim_id}")
            row = cur.execute(
                "SELECT data FROM reversals WHERE reversal_id = ?", (result.reversal_id,)
            ).fetchone()
            if row is not None:
                return ReversalResult.model_validate_json(row[0])
            cur.execute(
                "INSERT INTO reversals VALUES (?, ?, ?, ?, ?, ?)",
                (result.reversal_id, result.claim_id, host, result.decision.value,
                 result.model_dump_json(), now_ms()),
            )  # fmt: skip
            if usage is not None:
                person_id, year, after = usage
                cur.execute(
                    "INSERT INTO usage VALUES (?, ?, ?) ON CONFLICT (person_id, year) DO UPDATE "
                    "SET data = excluded.data",
                    (person_id, year, after.model_dump_json()),
                )
        return result

    def reviewed_for(self, claim_id: str) -> str | None:
        rows = self._all("SELECT host FROM reviews WHERE claim_id = ?", (claim_id,))
        return str(rows[0][0]) if rows and rows[0][0] is not None else None

    def reviews(self) -> list[ReviewResult]:
        """Every review made (the demo's report reads these)."""
        return [
            ReviewResult.model_validate_json(r[0]) for r in self._all("SELECT data FROM reviews")
        ]

    def reviews_of(self, person_id: str, year: int | None = None) -> list[PersonReview]:
        """The reviews of a person's claims (of one discharge year, if given), oldest first,
        each with its settlement notice once come. Reviews stored before the person was kept
        with them are not found."""
        sql = (
            "SELECT r.claim_id, r.host, r.year, r.data, s.data FROM reviews r "
            "LEFT JOIN settlements s ON s.claim_id = r.claim_id WHERE r.person_id = ?"
        )
        args: tuple[Any, ...] = (person_id,)
        if year is not None:
            sql += " AND r.year = ?"
            args += (year,)
        return [
            PersonReview(
                claim_id=str(claim_id),
                host=None if host is None else str(host),
                year=None if y is None else int(y),
                result=ReviewResult.model_validate_json(data),
                settlement=None if notice is None else SettlementNotice.model_validate_json(notice),
            )
            for claim_id, host, y, data, notice in self._all(
                sql + f" ORDER BY {self.db.json_text('r.data', 'reviewed_at')}, r.claim_id", args
            )
        ]

    def record_settlement(self, notice: SettlementNotice) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO settlements VALUES (?, ?) ON CONFLICT (claim_id) DO NOTHING",
                (notice.claim_id, notice.model_dump_json()),
            )

    def settlements(self) -> list[SettlementNotice]:
        """Every settlement notice received."""
        return [
            SettlementNotice.model_validate_json(r[0])
            for r in self._all("SELECT data FROM settlements")
        ]

    # --- host -----------------------------------------------------------------------------
    def register_filing(self, filing: FilingUpload) -> FilingStatus:
        status = {
            "CREATE": FilingStatus.REGISTERED,
            "UPDATE": FilingStatus.UPDATED,
            "REVOKE": FilingStatus.REVOKED,
        }[filing.action.value]
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO host_filings VALUES (?, ?) ON CONFLICT (person_id) DO UPDATE SET "
                "data = excluded.data",
                (filing.person_id, filing.model_dump_json()),
            )
        return status

    def filing_for(self, person_id: str) -> FilingUpload | None:
        rows = self._all("SELECT data FROM host_filings WHERE person_id = ?", (person_id,))
        return FilingUpload.model_validate_json(rows[0][0]) if rows else None

    def host_filings(self) -> list[FilingUpload]:
        """Every filing registered here (latest per person), by person id."""
        rows = self._all("SELECT data FROM host_filings ORDER BY person_id")
        return [FilingUpload.model_validate_json(r[0]) for r in rows]

    def save_claim(self, claim: HostClaim, payments: Sequence[tuple[str, int]] = ()) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO claims VALUES (?, ?, ?, ?) ON CONFLICT (claim_id) DO UPDATE SET "
                "request_id = excluded.request_id, state = excluded.state, data = excluded.data",
                (claim.claim.claim_id, claim.request_id, claim.state.value, _dump_claim(claim)),
            )
            cur.executemany(
                "INSERT INTO claim_requests VALUES (?, ?) ON CONFLICT (request_id) DO NOTHING",
                [(request_id, claim.claim.claim_id) for request_id in claim.resent_as],
            )
            cur.executemany(
                "INSERT INTO payments (claim_id, kind, amount_fen) VALUES (?, ?, ?)",
                [(claim.claim.claim_id, kind, fen) for kind, fen in payments if fen],
            )

    def claim(self, claim_id: str) -> HostClaim | None:
        rows = self._all(
            "SELECT data FROM claims WHERE claim_id = ?" + self._locking(),  # noqa: S608
            (claim_id,),
        )
        return _load_claim(rows[0][0]) if rows else None

    def claims_of(self, person_id: str) -> list[HostClaim]:
        """A person's claims at this host, oldest submission first (only theirs are
        decoded)."""
        j = self.db.json_text
        rows = self._all(
            f"SELECT data FROM claims WHERE {j('data', 'claim', 'person_id')} = ? "  # noqa: S608
            f"ORDER BY {j('data', 'claim', 'submitted_at')}, claim_id",
            (person_id,),
        )
        return [_load_claim(r[0]) for r in rows]

    def claim_by_request(self, request_id: str) -> HostClaim | None:
        lock = self._locking()
        rows = self._all(
            "SELECT data FROM claims WHERE request_id = ?" + lock,  # noqa: S608
            (request_id,),
        )
        if not rows:
            rows = self._all(
                "SELECT c.data FROM claim_requests r JOIN claims c "  # noqa: S608
                "ON c.claim_id = r.claim_id WHERE r.request_id = ?"
                + lock.replace("UPDATE", "UPDATE OF c"),
                (request_id,),
            )
        return _load_claim(rows[0][0]) if rows else None

    def claims(
        self, *, open_only: bool = False, state: ClaimState | None = None
    ) -> list[HostClaim]:
        """All claims, only those not in a terminal state, or only those in ``state``."""
        if state is not None:
            rows = self._all("SELECT data FROM claims WHERE state = ?", (state.value,))
        elif open_only:
            done = _terminal_values()
            rows = self._all(
                f"SELECT data FROM claims WHERE state NOT IN ({_marks(len(done))})",  # noqa: S608
                done,
            )
        else:
            rows = self._all("SELECT data FROM claims")
        return [_load_claim(r[0]) for r in rows]

    def count_open_claims(self) -> int:
        """How many claims are not in a terminal state (a count, no claim decoded)."""
        done = _terminal_values()
        rows = self._all(
            f"SELECT count(*) FROM claims WHERE state NOT IN ({_marks(len(done))})",  # noqa: S608
            done,
        )
        return int(rows[0][0])

    def count_claims(self, state: ClaimState) -> int:
        """How many claims are in ``state`` (the overdue gauge reads it)."""
        rows = self._all("SELECT count(*) FROM claims WHERE state = ?", (state.value,))
        return int(rows[0][0])

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
        with self._tx() as cur:
            row = cur.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM claim_events WHERE claim_id = ?",
                (claim_id,),
            ).fetchone()
            event = ClaimEvent(claim_id, int(row[0]), at_ms, kind, state, detail, dict(data or {}))
            cur.execute(
                "INSERT INTO claim_events VALUES (?, ?, ?, ?, ?, ?, ?)",
                (claim_id, event.seq, at_ms, kind.value, state.value, detail,
                 json.dumps(event.data, ensure_ascii=False)),
            )  # fmt: skip
        return event

    def timeline(self, claim_id: str) -> list[ClaimEvent]:
        rows = self._all(
            "SELECT seq, at_ms, kind, state, detail, data FROM claim_events WHERE claim_id = ? "
            "ORDER BY seq",
            (claim_id,),
        )
        return [
            ClaimEvent(
                claim_id, int(seq), int(at), ClaimEventKind(kind), ClaimState(state), str(detail),
                json.loads(data) if data else {},
            )
            for seq, at, kind, state, detail, data in rows
        ]  # fmt: skip

    def settlement_stats(self, host: str) -> list[dict[str, object]]:
        """Settled claims of this host by home province and month of discharge: the monthly
        figures an ops lead reports (settlements, total costs, fund paid)."""
        j, n = self.db.json_text, self.db.json_int
        rows = self._all(
            f"SELECT substr({j('data', 'claim', 'home_region')}, 1, 2) || '0000', "  # noqa: S608
            f"substr({j('data', 'claim', 'discharged_at')}, 1, 7), count(*), "
            f"sum({n('data', 'claim', 'total_fen')}), sum({n('data', 'review', 'fund_fen')}) "
            "FROM claims WHERE state = ? GROUP BY 1, 2 ORDER BY 2, 1",
            (ClaimState.SETTLED.value,),
        )
        return [
            {"home": h, "host": host, "month": m, "settlements": int(c), "total_fen": int(t or 0),
             "fund_fen": int(f or 0)}
            for h, m, c, t, f in rows
        ]  # fmt: skip

    def payments(self, claim_id: str | None = None) -> list[tuple[str, str, int]]:
        """(claim id, kind, fen) of every payment, optionally of one claim."""
        if claim_id is None:
            rows = self._all("SELECT claim_id, kind, amount_fen FROM payments ORDER BY seq")
        else:
            rows = self._all(
                "SELECT claim_id, kind, amount_fen FROM payments WHERE claim_id = ? ORDER BY seq",
                (claim_id,),
            )
        return [(str(a), str(b), int(c)) for a, b, c in rows]

    # --- daily reconciliation (对账, contract v1.3) -------------------------------------------
    def settled_claims(
        self, since_ms: int, until_ms: int, *, home: str | None = None
    ) -> list[HostClaim]:
        """The host's claims settled with the patient in ``[since_ms, until_ms)`` (reversed
        ones too: they stay on their day's statement, flagged), of one home province or all,
        by claim id."""
        n, j = self.db.json_int, self.db.json_text
        sql = (
            f"SELECT data FROM claims WHERE state IN (?, ?) "  # noqa: S608
            f"AND {n('data', 'settled_at_ms')} >= ? AND {n('data', 'settled_at_ms')} < ?"
        )
        args: tuple[Any, ...] = (
            ClaimState.SETTLED.value, ClaimState.REVERSED.value, since_ms, until_ms,
        )  # fmt: skip
        if home is not None:
            sql += f" AND substr({j('data', 'claim', 'home_region')}, 1, 2) = ?"
            args += (home[:2],)
        return [_load_claim(r[0]) for r in self._all(sql + " ORDER BY claim_id", args)]

    def settlements_from(
        self,
        host: str,
        *,
        on_utc_dates: Sequence[str] = (),
        claim_ids: Sequence[str] = (),
    ) -> list[tuple[SettlementNotice, int | None, bool]]:
        """The home's settlement notices from ``host`` whose ``settled_at`` falls on one of
        the UTC dates ``on_utc_dates`` (``YYYY-MM-DD``; the caller cuts its day out of them),
        and those of ``claim_ids`` whatever their day: each as (notice, the reviewed total in
        fen (None in rows without it), True when a reversal of the claim was confirmed)."""
        j = self.db.json_text
        select = (
            f"SELECT s.data, {self.db.json_int('r.data', 'total_fen')}, EXISTS (SELECT 1 FROM "  # noqa: S608
            "reversals v WHERE v.claim_id = s.claim_id AND v.decision = ?) "
            "FROM settlements s JOIN reviews r ON r.claim_id = s.claim_id WHERE r.host = ? AND "
        )
        confirmed = ReversalDecision.CONFIRMED.value
        rows: list[tuple[Any, ...]] = []
        if on_utc_dates:
            rows += self._all(
                select + f"substr({j('s.data', 'settled_at')}, 1, 10) IN "
                f"({_marks(len(on_utc_dates))})",
                (confirmed, host, *on_utc_dates),
            )
        ids = list(dict.fromkeys(claim_ids))
        for at in range(0, len(ids), 500):  # bounded parameter lists (SQLite allows 32,766)
            chunk = ids[at : at + 500]
            rows += self._all(
                select + f"s.claim_id IN ({_marks(len(chunk))})", (confirmed, host, *chunk)
            )
        found: dict[str, tuple[SettlementNotice, int | None, bool]] = {}
        for data, total, reversed_ in rows:
            notice = SettlementNotice.model_validate_json(data)
            found[notice.claim_id] = (
                notice, None if total is None else int(total), bool(reversed_),
            )  # fmt: skip
        return [found[c] for c in sorted(found)]

    # --- monthly clearing (清算, contract v1.3) -----------------------------------------------
    def clearing_books(
        self, host: str, claim_ids: Sequence[str]
    ) -> dict[str, tuple[ReviewResult, bool, bool]]:
        """The home's books on ``claim_ids`` reviewed for ``host`` (others are left out): claim
        id → (the review, True when the host's settlement notice came, True when a reversal of
        the claim was confirmed)."""
        select = (
            "SELECT r.claim_id, r.data, EXISTS (SELECT 1 FROM settlements s WHERE s.claim_id = "
            "r.claim_id), EXISTS (SELECT 1 FROM reversals v WHERE v.claim_id = r.claim_id AND "
            "v.decision = ?) FROM reviews r WHERE r.host = ? AND r.claim_id IN "
        )
        confirmed = ReversalDecision.CONFIRMED.value
        ids = list(dict.fromkeys(claim_ids))
        found: dict[str, tuple[ReviewResult, bool, bool]] = {}
        for at in range(0, len(ids), 500):  # bounded parameter lists (SQLite allows 32,766)
            chunk = ids[at : at + 500]
            for claim_id, data, settled, reversed_ in self._all(
                select + f"({_marks(len(chunk))})", (confirmed, host, *chunk)
            ):
                found[str(claim_id)] = (
                    ReviewResult.model_validate_json(data), bool(settled), bool(reversed_),
                )  # fmt: skip
        return found
