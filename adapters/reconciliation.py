"""Daily reconciliation (对账, contract v1.3): host and home compare one day's settlements.

At the end of a day the host sends each home it settled with a
:class:`~bus.models.ReconciliationStatement`: the day's totals (对总账) and one line per claim
(对明细账), with a digest of the lines. The home compares it with the settlement notices it
recorded from that host on that day and with the reversals it confirmed, and answers with one
:class:`~bus.models.ReconciliationResult`: MATCHED, or MISMATCHED with the differing claims.
Each difference also goes to the province that must act as an ``ErrorReport``
(``RECONCILIATION_MISMATCH``), in the step of the answer. The host keeps the answers; a day is
closed when every statement of it is answered (:meth:`Reconciler.wait_reconciled`).

Days are calendar days in China Standard Time (UTC+8), whatever the machine's zone.

The digest is the lower-case hex SHA-256 of the canonical lines: the lines sorted by claim id
(the byte order of its UTF-8), each ``claim_id|total|fund|ci|assistance|personal|advance|r``
and a line feed, amounts in fen as decimal integers, ``r`` 1 for a reversed claim else 0,
encoded in UTF-8 (:func:`canonical_lines`). Totals leave reversed lines out; the digest covers
them all, so a reversal seen on one side only changes it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog

from adapters.backoffice import ClaimState, HostClaim, SqlBackOffice
from adapters.directory import province_of
from bus.db import Database
from bus.envelope import new_id, now_ms
from bus.errors import Rejection
from bus.models import (
    DifferenceKind,
    ErrorCode,
    ErrorReport,
    Message,
    ReconciliationDifference,
    ReconciliationLine,
    ReconciliationOutcome,
    ReconciliationResult,
    ReconciliationStatement,
    SettlementNotice,
    Severity,
    now,
)
from bus.node import Answer, Context, Node, report

log = structlog.get_logger(__name__)

CHINA = dt.timezone(dt.timedelta(hours=8), "CST")
"""China Standard Time: the contract's days are its calendar days (no daylight saving)."""

RECONCILIATION_DEADLINE_S = 3600.0
"""The home compares at once; an hour leaves room for a home that is down for a while."""

POLL_S = 0.1
"""How often :meth:`Reconciler.wait_reconciled` looks at the stored answers."""

MAX_REPORTS = 100
"""At most this many ErrorReports per statement (one per difference): a day whose notices
were all lost is one problem to act on, not thousands of reports; the answer lists them all."""

SENT = "SENT"
"""A statement sent, not answered yet."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reconciliation_answers (
    statement_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    day TEXT NOT NULL,
    outcome TEXT NOT NULL,
    result TEXT NOT NULL,
    at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reconciliation_statements (
    statement_id TEXT PRIMARY KEY,
    home TEXT NOT NULL,
    day TEXT NOT NULL,
    request_id TEXT NOT NULL,
    stated_at_ms INTEGER NOT NULL,
    count INTEGER NOT NULL,
    fund_fen INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    differences TEXT NOT NULL,
    error_code TEXT,
    answered_at_ms INTEGER);
CREATE INDEX IF NOT EXISTS reconciliation_statements_day ON reconciliation_statements (day, home);
"""
"""The home's answers, one per statement id; the host's statements and their answers."""

_COLUMNS = (
    "statement_id, home, day, request_id, stated_at_ms, count, fund_fen, outcome, differences, "
    "error_code, answered_at_ms"
)


# --- days and the canonical form --------------------------------------------------------------
def china_day(at: dt.datetime) -> dt.date:
    """The China Standard Time calendar day of an aware instant."""
    return at.astimezone(CHINA).date()


def day_bounds_ms(day: dt.date) -> tuple[int, int]:
    """``[start, end)`` of a China Standard Time day, in epoch milliseconds."""
    start = dt.datetime.combine(day, dt.time(), tzinfo=CHINA)
    end = start + dt.timedelta(days=1)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def utc_dates(day: dt.date) -> tuple[str, str]:
    """The two UTC dates a China day overlaps (its first eight hours are the UTC day
    before), as ``YYYY-MM-DD``."""
    return (day - dt.timedelta(days=1)).isoformat(), day.isoformat()


def canonical_lines(lines: Iterable[ReconciliationLine]) -> bytes:
    """The canonical form the digest is taken over (see the module's doc)."""
    ordered = sorted(lines, key=lambda line: line.claim_id.encode("utf-8"))
    return "".join(
        f"{x.claim_id}|{x.total_fen}|{x.fund_fen}|{x.critical_illness_fen}|{x.assistance_fen}|"
        f"{x.personal_fen}|{x.advance_fen}|{int(x.reversed)}\n"
        for x in ordered
    ).encode("utf-8")


def digest(lines: Iterable[ReconciliationLine]) -> str:
    """Hex SHA-256 of :func:`canonical_lines`."""
    return hashlib.sha256(canonical_lines(lines)).hexdigest()


@dataclass(frozen=True, slots=True)
class Totals:
    """Counts and sums over the lines that are not reversed."""

    count: int = 0
    total_fen: int = 0
    fund_fen: int = 0
    critical_illness_fen: int = 0
    assistance_fen: int = 0
    personal_fen: int = 0
    advance_fen: int = 0

    @classmethod
    def of(cls, lines: Iterable[ReconciliationLine]) -> Totals:
        """The totals of ``lines`` (reversed ones left out)."""
        live = [x for x in lines if not x.reversed]
        return cls(
            count=len(live),
            total_fen=sum(x.total_fen for x in live),
            fund_fen=sum(x.fund_fen for x in live),
            critical_illness_fen=sum(x.critical_illness_fen for x in live),
            assistance_fen=sum(x.assistance_fen for x in live),
            personal_fen=sum(x.personal_fen for x in live),
            advance_fen=sum(x.advance_fen for x in live),
        )


def line_of(claim: HostClaim) -> ReconciliationLine:
    """A settled (or reversed) claim as the host states it."""
    review = claim.review
    assert review is not None, "a settled claim has its review"
    return ReconciliationLine(
        claim_id=claim.claim.claim_id,
        total_fen=review.total_fen,
        fund_fen=review.fund_fen,
        critical_illness_fen=review.critical_illness_fen,
        assistance_fen=review.assistance_fen,
        personal_fen=review.personal_fen,
        advance_fen=claim.advance_collected_fen,
        reversed=claim.state is ClaimState.REVERSED,
    )


def statement_of(
    host: str, home: str, day: dt.date, lines: Iterable[ReconciliationLine], statement_id: str
) -> ReconciliationStatement:
    """The statement of ``lines`` with its totals and digest."""
    ordered = tuple(sorted(lines, key=lambda line: line.claim_id.encode("utf-8")))
    t = Totals.of(ordered)
    return ReconciliationStatement(
        statement_id=statement_id, host=host, home=home, day=day, count=t.count,
        total_fen=t.total_fen, fund_fen=t.fund_fen,
        critical_illness_fen=t.critical_illness_fen, assistance_fen=t.assistance_fen,
        personal_fen=t.personal_fen, advance_fen=t.advance_fen, digest=digest(ordered),
        lines=ordered, stated_at=now(),
    )  # fmt: skip


def home_line(
    notice: SettlementNotice, total_fen: int | None, reversed_: bool
) -> tuple[ReconciliationLine, bool]:
    """A notice as the home's line, and whether the home knows its advance (notices of
    writers before v1.3 carry none; the reviewed total is the home's own figure)."""
    known = notice.advance_fen is not None
    return (
        ReconciliationLine(
            claim_id=notice.claim_id,
            total_fen=total_fen if total_fen is not None else 0,
            fund_fen=notice.fund_fen,
            critical_illness_fen=notice.critical_illness_fen,
            assistance_fen=notice.assistance_fen,
            personal_fen=notice.personal_paid_fen,
            advance_fen=notice.advance_fen or 0,
            reversed=reversed_,
        ),
        known and total_fen is not None,
    )


_AMOUNTS = (
    ("total_fen", "total"),
    ("fund_fen", "fund"),
    ("critical_illness_fen", "critical illness"),
    ("assistance_fen", "assistance"),
    ("personal_fen", "personal"),
    ("advance_fen", "advance"),
)


def compare(
    statement: ReconciliationStatement,
    home: dict[str, tuple[ReconciliationLine, bool]],
    *,
    on_day: set[str],
) -> list[ReconciliationDifference]:
    """The differences between the statement and the home's lines (claim id → (line, whether
    the home knows all its amounts)); ``on_day``: the home's claims settled that day (a claim
    the home has from another day is no MISSING_AT_HOST of this one). All are the host's to
    act on: it re-sends a notice the home lacks, or corrects its books."""
    host = statement.host
    out: list[ReconciliationDifference] = []
    stated = {x.claim_id: x for x in statement.lines}
    for claim_id in sorted(stated.keys() | on_day, key=lambda c: c.encode("utf-8")):
        ours = stated.get(claim_id)
        theirs, complete = home.get(claim_id, (None, False))
        if ours is None:
            assert theirs is not None
            out.append(ReconciliationDifference(
                claim_id=claim_id, kind=DifferenceKind.MISSING_AT_HOST, host_fund_fen=None,
                home_fund_fen=theirs.fund_fen, responsible=host,
                note=f"{claim_id}: the home has a settlement notice of {statement.day} from "
                f"{host}, the statement has no line: {host} checks its books and states it",
            ))  # fmt: skip
            continue
        if theirs is None:
            out.append(ReconciliationDifference(
                claim_id=claim_id, kind=DifferenceKind.MISSING_AT_HOME,
                host_fund_fen=ours.fund_fen, home_fund_fen=None, responsible=host,
                note=f"{claim_id}: on the statement, no settlement notice at the home: "
                f"{host} re-sends the notice",
            ))  # fmt: skip
            continue
        if ours.reversed != theirs.reversed:
            side = "host" if ours.reversed else "home"
            out.append(ReconciliationDifference(
                claim_id=claim_id, kind=DifferenceKind.REVERSAL_DIFFERS,
                host_fund_fen=ours.fund_fen, home_fund_fen=theirs.fund_fen, responsible=host,
                note=f"{claim_id}: reversed at the {side} only: {host} checks the reversal's "
                "answer and corrects its books",
            ))  # fmt: skip
        checked = _AMOUNTS if complete else _AMOUNTS[1:5]
        differ = [
            f"{label} {getattr(ours, name)} fen stated, {getattr(theirs, name)} fen at home"
            for name, label in checked
            if getattr(ours, name) != getattr(theirs, name)
        ]
        if differ:
            out.append(ReconciliationDifference(
                claim_id=claim_id, kind=DifferenceKind.AMOUNT_DIFFERS,
                host_fund_fen=ours.fund_fen, home_fund_fen=theirs.fund_fen, responsible=host,
                note=f"{claim_id}: {'; '.join(differ)}: {host} corrects its books or re-sends "
                "the notice",
            ))  # fmt: skip
    return out


def statement_flaw(s: ReconciliationStatement) -> str | None:
    """Why the statement contradicts itself (None: its totals and digest fit its lines)."""
    ids = [x.claim_id for x in s.lines]
    if len(set(ids)) != len(ids):
        return "a claim is on two lines"
    t = Totals.of(s.lines)
    stated = Totals(
        s.count, s.total_fen, s.fund_fen, s.critical_illness_fen, s.assistance_fen,
        s.personal_fen, s.advance_fen,
    )  # fmt: skip
    if t != stated:
        return f"the totals are not the sums of the lines ({stated} stated, {t} summed)"
    if digest(s.lines) != s.digest:
        return "the digest is not the SHA-256 of the canonical lines"
    return None


class _Answerable(Protocol):
    @property
    def statement_id(self) -> str: ...

    @property
    def answered(self) -> bool: ...


R = TypeVar("R", bound=_Answerable)


async def wait_answered(
    lookup: Callable[[str], R | None], statement_ids: Sequence[str], timeout_s: float, what: str
) -> list[R]:
    """The records ``lookup`` gives for ``statement_ids`` once every one is answered (or
    failed); ``KeyError`` for an id never sent, ``TimeoutError`` naming the unanswered ones
    after ``timeout_s``. Shared by the day's and the month's statements."""
    limit = time.monotonic() + timeout_s
    while True:
        records = [lookup(s) for s in statement_ids]
        unknown = [s for s, r in zip(statement_ids, records, strict=True) if r is None]
        if unknown:
            raise KeyError(f"no {what} {', '.join(unknown)} was sent")
        done = [r for r in records if r is not None and r.answered]
        if len(done) == len(records):
            return done
        if time.monotonic() >= limit:
            waiting = [r.statement_id for r in records if r is not None and not r.answered]
            raise TimeoutError(
                f"{len(waiting)} {what}(s) unanswered after {timeout_s:.0f} s: "
                + ", ".join(waiting[:10])
            )
        await asyncio.sleep(POLL_S)


# --- the host's view -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StatementRecord:
    """A statement the host sent, and its answer once come."""

    statement_id: str
    """The statement."""
    home: str
    """The home province it went to."""
    day: dt.date
    """Its day (China Standard Time)."""
    request_id: str
    """The ``xs-message-id`` it was sent with."""
    stated_at_ms: int
    """When it was drawn up."""
    count: int
    """Claims stated (not reversed)."""
    fund_fen: int
    """Their fund shares, in fen."""
    outcome: str
    """``SENT`` (no answer yet), ``MATCHED``, ``MISMATCHED`` or ``FAILED`` (an error report, or
    no answer by the deadline: see ``error_code``)."""
    differences: tuple[ReconciliationDifference, ...]
    """The home's differences (empty unless MISMATCHED)."""
    error_code: str | None
    """The error report's code when FAILED."""
    answered_at_ms: int | None
    """When the answer came."""

    @property
    def answered(self) -> bool:
        """True once the home answered (or the deadline passed)."""
        return self.outcome != SENT


def _record(row: tuple[Any, ...]) -> StatementRecord:
    sid, home, day, rid, at, count, fund, outcome, diffs, code, answered = row
    return StatementRecord(
        statement_id=str(sid), home=str(home), day=dt.date.fromisoformat(str(day)),
        request_id=str(rid), stated_at_ms=int(at), count=int(count), fund_fen=int(fund),
        outcome=str(outcome),
        differences=tuple(
            ReconciliationDifference.model_validate(d) for d in json.loads(str(diffs))
        ),
        error_code=None if code is None else str(code),
        answered_at_ms=None if answered is None else int(answered),
    )  # fmt: skip


class Reconciler:
    """Both sides of daily reconciliation for one province: as host it states its days, as
    home it answers the statements of its hosts. Its tables live in the province's database
    beside the node's store and the back office, so an answer, its reports and the processed
    mark commit in one step."""

    def __init__(self, node: Node, backoffice: SqlBackOffice, db: Database) -> None:
        self.node = node
        self.province = node.province
        self.backoffice = backoffice
        self.db = db
        db.migrate("reconciliation/1", _SCHEMA)
        node.on(ReconciliationStatement)(self._on_statement)
        node.on_answer(ReconciliationStatement)(self._on_result)

    # --- host: stating a day ----------------------------------------------------------------
    async def reconcile_day(
        self, home: str, day: dt.date, *, deadline_s: float = RECONCILIATION_DEADLINE_S
    ) -> str:
        """Send ``home`` the statement of ``day`` (one step: the request and its row here);
        returns the statement id. A day without settlements is stated too (count 0): the home
        then checks it has none either."""
        since, until = day_bounds_ms(day)
        claims = self.backoffice.settled_claims(since, until, home=home)
        return await self._state(home, day, [line_of(c) for c in claims], deadline_s)

    async def reconcile_all(
        self, day: dt.date, *, deadline_s: float = RECONCILIATION_DEADLINE_S
    ) -> list[str]:
        """One statement per home this host settled claims with on ``day``; their ids."""
        since, until = day_bounds_ms(day)
        by_home: dict[str, list[ReconciliationLine]] = {}
        for claim in self.backoffice.settled_claims(since, until):
            by_home.setdefault(province_of(claim.claim.home_region), []).append(line_of(claim))
        return [
            await self._state(home, day, lines, deadline_s)
            for home, lines in sorted(by_home.items())
        ]

    async def _state(
        self, home: str, day: dt.date, lines: list[ReconciliationLine], deadline_s: float
    ) -> str:
        statement = statement_of(
            self.province, home, day, lines, f"S-{self.province}-{new_id()[:13]}"
        )
        async with self.node.step() as step:
            request_id = await self.node.request(statement, deadline_s=deadline_s)
            with self.db.write() as cur:
                cur.execute(
                    f"INSERT INTO reconciliation_statements ({_COLUMNS}) "  # noqa: S608
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (statement.statement_id, home, day.isoformat(), request_id,
                     int(statement.stated_at.timestamp() * 1000), statement.count,
                     statement.fund_fen, SENT, "[]", None, None),
                )  # fmt: skip
        await self.node.delivered(step)
        log.info(
            "reconciliation_stated", statement_id=statement.statement_id, home=home,
            day=day.isoformat(), count=statement.count, fund_fen=statement.fund_fen,
        )  # fmt: skip
        return statement.statement_id

    async def _on_result(self, answer: Answer) -> None:
        """The home's answer (or an error report, or our DEADLINE_EXCEEDED), in the step that
        stores it."""
        request = answer.request
        asked = self.node.codec.decode(request.record.value) if request is not None else None
        if not isinstance(asked, ReconciliationStatement):
            log.warning("reconciliation_answer_without_request", request_id=answer.request_id)
            return
        message: Message = answer.message
        if isinstance(message, ReconciliationResult):
            outcome, code = message.outcome.value, None
            diffs = json.dumps([d.model_dump(mode="json") for d in message.differences])
        else:
            assert isinstance(message, ErrorReport)
            outcome, code, diffs = "FAILED", message.code.value, "[]"
        with self.db.write() as cur:
            cur.execute(
                "UPDATE reconciliation_statements SET outcome = ?, differences = ?, "
                "error_code = ?, answered_at_ms = ? WHERE statement_id = ?",
                (outcome, diffs, code, now_ms(), asked.statement_id),
            )
        log.info(
            "reconciliation_answered", statement_id=asked.statement_id, home=asked.home,
            day=asked.day.isoformat(), outcome=outcome, code=code, late=answer.late,
        )  # fmt: skip

    def statements(
        self, *, day: dt.date | None = None, home: str | None = None
    ) -> list[StatementRecord]:
        """The statements this host sent (of one day, one home, or all), by day, home and
        time: the demo's table and ops' view."""
        sql = f"SELECT {_COLUMNS} FROM reconciliation_statements WHERE 1 = 1"  # noqa: S608
        args: tuple[object, ...] = ()
        if day is not None:
            sql += " AND day = ?"
            args += (day.isoformat(),)
        if home is not None:
            sql += " AND home = ?"
            args += (home,)
        rows = self.db.query(sql + " ORDER BY day, home, stated_at_ms, statement_id", args)
        return [_record(r) for r in rows]

    def statement(self, statement_id: str) -> StatementRecord | None:
        """One statement this host sent, with its answer once come."""
        rows = self.db.query(
            f"SELECT {_COLUMNS} FROM reconciliation_statements "  # noqa: S608
            "WHERE statement_id = ?",
            (statement_id,),
        )
        return _record(rows[0]) if rows else None

    async def wait_reconciled(
        self, statement_ids: Sequence[str], timeout_s: float
    ) -> list[StatementRecord]:
        """The records of ``statement_ids`` once every one is answered (the end-of-day
        signal); ``TimeoutError`` naming the unanswered ones after ``timeout_s``."""
        return await wait_answered(self.statement, statement_ids, timeout_s, "statement")

    # --- home: answering a statement ----------------------------------------------------------
    def answer_to(self, statement_id: str) -> ReconciliationResult | None:
        """The answer this home gave to a statement (None: none yet)."""
        rows = self.db.query(
            "SELECT result FROM reconciliation_answers WHERE statement_id = ?", (statement_id,)
        )
        return ReconciliationResult.model_validate_json(rows[0][0]) if rows else None

    def answered_hosts(self, days: Iterable[dt.date]) -> dict[str, str]:
        """Per host, the outcome of the latest statement of one of ``days`` this home
        answered: whether a host's day is closed here (MATCHED), or still differs."""
        wanted = sorted({d.isoformat() for d in days})
        marks = ", ".join("?" * len(wanted))
        rows = self.db.query(
            f"SELECT host, outcome FROM reconciliation_answers WHERE day IN ({marks}) "  # noqa: S608
            "ORDER BY at_ms, statement_id",
            tuple(wanted),
        )
        return {str(host): str(outcome) for host, outcome in rows}

    async def _on_statement(self, message: Message, ctx: Context) -> ReconciliationResult:
        """Compare a host's day with this home's books: the answer, and one ErrorReport per
        difference to the province that must act, commit with the processed mark. A statement
        answered before (under any message id) gets its stored answer and no new reports."""
        assert isinstance(message, ReconciliationStatement)
        s = message
        host = ctx.envelope.source
        self.db.lock(f"reconciliation:{s.statement_id}")
        done = self.answer_to(s.statement_id)
        if done is not None:
            return done
        flaw = statement_flaw(s)
        if flaw is not None:
            raise Rejection(
                ErrorCode.INVALID_MESSAGE,
                f"statement {s.statement_id}: {flaw}",
                details={"responsible": host, "statement_id": s.statement_id},
            )
        since, until = day_bounds_ms(s.day)
        found = self.backoffice.settlements_from(
            host, on_utc_dates=utc_dates(s.day), claim_ids=[x.claim_id for x in s.lines]
        )
        home: dict[str, tuple[ReconciliationLine, bool]] = {}
        on_day: set[str] = set()
        for notice, total, reversed_ in found:
            home[notice.claim_id] = home_line(notice, total, reversed_)
            if since <= int(notice.settled_at.timestamp() * 1000) < until:
                on_day.add(notice.claim_id)
        stated = {x.claim_id for x in s.lines}
        ours = [home[c][0] for c in sorted(on_day | (stated & home.keys()))]
        mine = Totals.of(ours)
        quick = digest(ours) == s.digest  # the same lines, amounts and flags: nothing differs
        differences = [] if quick else compare(s, home, on_day=on_day)
        result = ReconciliationResult(
            statement_id=s.statement_id, day=s.day,
            outcome=ReconciliationOutcome.MISMATCHED if differences
            else ReconciliationOutcome.MATCHED,
            count=mine.count, fund_fen=mine.fund_fen,
            critical_illness_fen=mine.critical_illness_fen, assistance_fen=mine.assistance_fen,
            personal_fen=mine.personal_fen, differences=tuple(differences), reconciled_at=now(),
        )  # fmt: skip
        with self.db.write() as cur:
            cur.execute(
                "INSERT INTO reconciliation_answers VALUES (?, ?, ?, ?, ?, ?)",
                (s.statement_id, host, s.day.isoformat(), result.outcome.value,
                 result.model_dump_json(), now_ms()),
            )  # fmt: skip
        for d in differences[:MAX_REPORTS]:
            await self._report(s, d, ctx)
        log.info(
            "reconciliation_compared", statement_id=s.statement_id, host=host,
            day=s.day.isoformat(), outcome=result.outcome.value, differences=len(differences),
            stated_count=s.count, home_count=mine.count, quick=quick,
        )  # fmt: skip
        return result

    async def _report(
        self, s: ReconciliationStatement, d: ReconciliationDifference, ctx: Context
    ) -> None:
        """One difference as an ErrorReport to the province that must act (no correlation id:
        it is no answer to the statement, the ReconciliationResult is)."""
        rep = report(
            ErrorCode.RECONCILIATION_MISMATCH,
            f"reconciliation {s.statement_id} of {s.day}: {d.kind.value}: {d.note}",
            detected_by=self.province,
            origin=s.host,
            responsible=d.responsible,
            severity=Severity.ERROR,
            ref=ctx.envelope,
            record=ctx.record,
            details={
                "statement_id": s.statement_id,
                "day": s.day.isoformat(),
                "claim_id": d.claim_id,
                "kind": d.kind.value,
                "host_fund_fen": "" if d.host_fund_fen is None else str(d.host_fund_fen),
                "home_fund_fen": "" if d.home_fund_fen is None else str(d.home_fund_fen),
                "action": "re-send the settlement notice"
                if d.kind is DifferenceKind.MISSING_AT_HOME
                else "correct the books, then state the day again",
            },
        )
        await self.node.send_report(
            rep, to=d.responsible, key=f"{s.host}:{s.day.isoformat()}".encode(), correlation_id=None
        )
