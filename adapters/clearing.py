"""Monthly clearing (清算, contract v1.3): what a home's funds owe a host for a month.

After a month the host sends each home it settled claims with a
:class:`~bus.models.ClearingStatement`: one line per claim it settled with that home in the
month (the fund, critical-illness and assistance shares the home reviewed, reversed claims
flagged and owing 0) and the totals, ``owed_fen`` being what the home owes. The home checks
each line against its own books (its review of the claim for that host, the host's
``SettlementNotice``, the reversals it confirmed) and answers with one
:class:`~bus.models.ClearingResponse`: CONFIRMED, or DISPUTED with one dispute per line it does
not accept (:func:`judge`); what it accepts is ``confirmed_fen``, and ``confirmed_fen +
disputed_fen`` is always the statement's ``owed_fen``. Each dispute also goes to the host as an
``ErrorReport`` (``CLEARING_DISPUTED``) in the step of the answer.

A disputed line is resolved and re-stated: once the cause is fixed (a lost notice re-sent, a
reversal's answer recorded) or the host accepts to drop the line, :meth:`Clearing.restate`
sends the month again as a new statement (version + 1) that ``replaces`` the old one; the
latest version of a month and pair is the one that counts (:meth:`Clearing.overview`).

Months are calendar months in China Standard Time (UTC+8) of the claims' ``settled_at``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from adapters.backoffice import ClaimState, HostClaim, SqlBackOffice
from adapters.directory import province_of
from adapters.reconciliation import CHINA, wait_answered
from bus.db import Database
from bus.envelope import new_id, now_ms
from bus.errors import Rejection
from bus.models import (
    ClearingDecision,
    ClearingDispute,
    ClearingLine,
    ClearingResponse,
    ClearingStatement,
    ErrorCode,
    ErrorReport,
    Message,
    ReviewResult,
    Severity,
    now,
)
from bus.node import Answer, Context, Node, report

log = structlog.get_logger(__name__)

CLEARING_DEADLINE_S = 3600.0
"""The home checks at once; an hour leaves room for a home that is down for a while."""


MAX_REPORTS = 100
"""At most this many ErrorReports per statement (one per dispute): a month whose notices were
all lost is one problem to act on, not thousands of reports; the answer lists them all."""

SENT = "SENT"
"""A statement sent, not answered yet."""

FAILED = "FAILED"
"""A statement answered with an error report, or not by its deadline."""

MONTH_RE = re.compile(r"^[0-9]{4}-(0[1-9]|1[0-2])$")
"""A month as the contract writes it: ``YYYY-MM``."""

# The reasons a home disputes a line, in the order they are tried (the first that applies).
DUPLICATE_LINE = "DUPLICATE_LINE"
NOT_REVIEWED = "NOT_REVIEWED"
REVERSAL_DIFFERS = "REVERSAL_DIFFERS"
NOT_SETTLED = "NOT_SETTLED"
AMOUNT_DIFFERS = "AMOUNT_DIFFERS"
REASON_CODES = (DUPLICATE_LINE, NOT_REVIEWED, REVERSAL_DIFFERS, NOT_SETTLED, AMOUNT_DIFFERS)
"""Every ``reason_code`` of contract v1.3, in the order :func:`judge` tries them."""

_ACTIONS = {
    DUPLICATE_LINE: "state the claim once",
    NOT_REVIEWED: "check the claim id and home, or drop the line",
    REVERSAL_DIFFERS: "check the reversal's answer, then state the month again",
    NOT_SETTLED: "re-send the settlement notice, then state the month again",
    AMOUNT_DIFFERS: "correct the shares to the home's review, then state the month again",
}
"""What the host does about each reason (the reports' ``action``)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clearing_answers (
    statement_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    month TEXT NOT NULL,
    version INTEGER NOT NULL,
    replaces TEXT,
    decision TEXT NOT NULL,
    claims INTEGER NOT NULL,
    owed_fen INTEGER NOT NULL,
    confirmed_claims INTEGER NOT NULL,
    confirmed_fen INTEGER NOT NULL,
    disputed_claims INTEGER NOT NULL,
    disputed_fen INTEGER NOT NULL,
    result TEXT NOT NULL,
    at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS clearing_answers_month ON clearing_answers (month, host, version);
CREATE TABLE IF NOT EXISTS clearing_statements (
    statement_id TEXT PRIMARY KEY,
    home TEXT NOT NULL,
    month TEXT NOT NULL,
    version INTEGER NOT NULL,
    replaces TEXT,
    request_id TEXT NOT NULL,
    stated_at_ms INTEGER NOT NULL,
    claims INTEGER NOT NULL,
    reversed_claims INTEGER NOT NULL,
    owed_fen INTEGER NOT NULL,
    dropped TEXT NOT NULL,
    outcome TEXT NOT NULL,
    confirmed_claims INTEGER,
    confirmed_fen INTEGER,
    disputed_fen INTEGER,
    disputes TEXT NOT NULL,
    error_code TEXT,
    answered_at_ms INTEGER,
    UNIQUE (home, month, version));
"""
"""The home's answers, one per statement id; the host's statements and their answers (one
version number per month and home: two re-statements racing, one fails and sends nothing)."""

_COLUMNS = (
    "statement_id, home, month, version, replaces, request_id, stated_at_ms, claims, "
    "reversed_claims, owed_fen, dropped, outcome, confirmed_claims, confirmed_fen, "
    "disputed_fen, disputes, error_code, answered_at_ms"
)


# --- months and statements ---------------------------------------------------------------------
def china_month(at: dt.datetime) -> str:
    """The China Standard Time calendar month of an aware instant, ``YYYY-MM``."""
    return at.astimezone(CHINA).strftime("%Y-%m")


def month_bounds_ms(month: str) -> tuple[int, int]:
    """``[start, end)`` of a China Standard Time month (``YYYY-MM``), in epoch milliseconds."""
    if not MONTH_RE.match(month):
        raise ValueError(f"month {month!r} is not YYYY-MM")
    year, number = int(month[:4]), int(month[5:])
    start = dt.datetime(year, number, 1, tzinfo=CHINA)
    end = dt.datetime(year + number // 12, number % 12 + 1, 1, tzinfo=CHINA)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def owed(line: ClearingLine) -> int:
    """What a line owes, in fen: its three shares, 0 when reversed."""
    if line.reversed:
        return 0
    return line.fund_fen + line.critical_illness_fen + line.assistance_fen


def line_of(claim: HostClaim) -> ClearingLine:
    """A settled (or reversed) claim as the host states it: the shares the home reviewed."""
    review = claim.review
    assert review is not None, "a settled claim has its review"
    return ClearingLine(
        claim_id=claim.claim.claim_id,
        fund_fen=review.fund_fen,
        critical_illness_fen=review.critical_illness_fen,
        assistance_fen=review.assistance_fen,
        reversed=claim.state is ClaimState.REVERSED,
    )


@dataclass(frozen=True, slots=True)
class Totals:
    """A statement's totals: over the lines not reversed, and the count of those reversed."""

    claims: int = 0
    fund_fen: int = 0
    critical_illness_fen: int = 0
    assistance_fen: int = 0
    reversed_claims: int = 0
    owed_fen: int = 0

    @classmethod
    def of(cls, lines: Iterable[ClearingLine]) -> Totals:
        """The totals of ``lines``."""
        all_lines = list(lines)
        live = [x for x in all_lines if not x.reversed]
        return cls(
            claims=len(live),
            fund_fen=sum(x.fund_fen for x in live),
            critical_illness_fen=sum(x.critical_illness_fen for x in live),
            assistance_fen=sum(x.assistance_fen for x in live),
            reversed_claims=len(all_lines) - len(live),
            owed_fen=sum(owed(x) for x in live),
        )

    @classmethod
    def stated(cls, s: ClearingStatement) -> Totals:
        """The totals as the statement states them."""
        return cls(
            s.claims, s.fund_fen, s.critical_illness_fen, s.assistance_fen, s.reversed_claims,
            s.owed_fen,
        )  # fmt: skip


def statement_of(
    host: str,
    home: str,
    month: str,
    lines: Iterable[ClearingLine],
    statement_id: str,
    *,
    version: int = 1,
    replaces: str | None = None,
) -> ClearingStatement:
    """The statement of ``lines`` (put in claim id order) with its totals."""
    ordered = tuple(sorted(lines, key=lambda line: line.claim_id.encode("utf-8")))
    t = Totals.of(ordered)
    return ClearingStatement(
        statement_id=statement_id, host=host, home=home, month=month, version=version,
        replaces=replaces, claims=t.claims, fund_fen=t.fund_fen,
        critical_illness_fen=t.critical_illness_fen, assistance_fen=t.assistance_fen,
        reversed_claims=t.reversed_claims, owed_fen=t.owed_fen, lines=ordered, stated_at=now(),
    )  # fmt: skip


def statement_flaw(s: ClearingStatement) -> str | None:
    """Why the statement contradicts itself (None: it is well formed and its totals are the
    sums of its lines). A claim on two lines is no flaw: the home disputes the second."""
    if not MONTH_RE.match(s.month):
        return f"month {s.month!r} is not YYYY-MM"
    if s.version < 1:
        return f"version {s.version} is below 1"
    if (s.version == 1) != (s.replaces is None):
        return "version 1 replaces nothing, and a later version replaces a statement"
    if s.replaces == s.statement_id:
        return "a statement cannot replace itself"
    t, stated = Totals.of(s.lines), Totals.stated(s)
    if t != stated:
        return f"the totals are not the sums of the lines ({stated} stated, {t} summed)"
    return None


def judge(
    s: ClearingStatement, books: dict[str, tuple[ReviewResult, bool, bool]]
) -> list[ClearingDispute]:
    """The lines the home disputes, in line order: the first reason that applies of
    :data:`REASON_CODES`. ``books``: claim id → (the home's review of it for this host, its
    settlement notice came, a reversal of it was confirmed). A line reversed on both sides
    owes 0 and is not disputed."""
    out: list[ClearingDispute] = []
    seen: set[str] = set()
    for line in s.lines:
        claim_id = line.claim_id
        book = books.get(claim_id)
        home_owed: int | None = None
        reason: str | None = None
        detail = ""
        shares, settled, reversed_ = (0, 0, 0), False, False
        if book is not None:
            review, settled, reversed_ = book
            shares = (review.fund_fen, review.critical_illness_fen, review.assistance_fen)
            home_owed = 0 if reversed_ or not settled else sum(shares)
        if claim_id in seen:
            reason, detail = DUPLICATE_LINE, "the claim is on an earlier line"
        elif book is None:
            reason, detail = NOT_REVIEWED, f"the home reviewed no such claim for {s.host}"
        elif line.reversed != reversed_:
            side = "host" if line.reversed else "home"
            reason, detail = REVERSAL_DIFFERS, f"reversed at the {side} only"
        elif not line.reversed and not settled:
            reason, detail = NOT_SETTLED, "no settlement notice at the home"
        elif not line.reversed:
            ours = (line.fund_fen, line.critical_illness_fen, line.assistance_fen)
            if ours != shares:
                labels = ("fund", "critical illness", "assistance")
                detail = "; ".join(
                    f"{label} {a} fen stated, {b} fen reviewed"
                    for label, a, b in zip(labels, ours, shares, strict=True)
                    if a != b
                )
                reason = AMOUNT_DIFFERS
        seen.add(claim_id)
        if reason is not None:
            out.append(ClearingDispute(
                claim_id=claim_id, reason_code=reason, home_owed_fen=home_owed,
                note=f"{claim_id}: {detail}: {s.host} {_ACTIONS[reason]}",
            ))  # fmt: skip
    return out


def response_to(s: ClearingStatement, disputes: Sequence[ClearingDispute]) -> ClearingResponse:
    """The home's answer given its disputes: what it confirms is the rest of ``owed_fen``."""
    disputed_fen = _disputed_fen(s, disputes)
    return ClearingResponse(
        statement_id=s.statement_id, month=s.month,
        decision=ClearingDecision.DISPUTED if disputes else ClearingDecision.CONFIRMED,
        confirmed_fen=s.owed_fen - disputed_fen, disputed_fen=disputed_fen,
        disputes=tuple(disputes), decided_at=now(),
    )  # fmt: skip


def _disputed_lines(
    s: ClearingStatement, disputes: Sequence[ClearingDispute]
) -> list[ClearingLine]:
    """The statement's lines the disputes are about (a duplicate's dispute: a later line)."""
    left = Counter(d.claim_id for d in disputes)
    picked: list[ClearingLine] = []
    # Disputes of duplicates are about the later lines: walk from the end.
    for line in reversed(s.lines):
        if left[line.claim_id] > 0:
            left[line.claim_id] -= 1
            picked.append(line)
    return picked


def _disputed_fen(s: ClearingStatement, disputes: Sequence[ClearingDispute]) -> int:
    return sum(owed(x) for x in _disputed_lines(s, disputes))


def _confirmed_claims(s: ClearingStatement, disputes: Sequence[ClearingDispute]) -> int:
    return s.claims - sum(1 for x in _disputed_lines(s, disputes) if not x.reversed)


# --- the host's view and ops' view ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClearingRecord:
    """A statement the host sent, and its answer once come."""

    statement_id: str
    """The statement."""
    home: str
    """The home province it went to."""
    month: str
    """Its month (``YYYY-MM``, China Standard Time)."""
    version: int
    """1, + 1 for each re-statement of the month and home."""
    replaces: str | None
    """The statement it replaces (None for version 1)."""
    request_id: str
    """The ``xs-message-id`` it was sent with."""
    stated_at_ms: int
    """When it was drawn up."""
    claims: int
    """Claims stated (not reversed)."""
    reversed_claims: int
    """Reversed claims stated (owing 0)."""
    owed_fen: int
    """What it says the home owes, in fen."""
    dropped: tuple[str, ...]
    """Claims the host dropped from this month after the home disputed them (carried into
    every later version)."""
    outcome: str
    """``SENT`` (no answer yet), ``CONFIRMED``, ``DISPUTED`` or ``FAILED`` (an error report,
    or no answer by the deadline: see ``error_code``)."""
    confirmed_claims: int | None
    """Claims the home confirmed (None until answered)."""
    confirmed_fen: int | None
    """What the home confirmed it owes, in fen (None until answered)."""
    disputed_fen: int | None
    """The disputed lines' stated shares, in fen (None until answered)."""
    disputes: tuple[ClearingDispute, ...]
    """The home's disputes (empty unless DISPUTED)."""
    error_code: str | None
    """The error report's code when FAILED."""
    answered_at_ms: int | None
    """When the answer came."""

    @property
    def answered(self) -> bool:
        """True once the home answered (or the deadline passed)."""
        return self.outcome != SENT


def _record(row: tuple[Any, ...]) -> ClearingRecord:
    (sid, home, month, version, replaces, rid, at, claims, rev, owed_fen, dropped, outcome,
     c_claims, c_fen, d_fen, disputes, code, answered) = row  # fmt: skip
    return ClearingRecord(
        statement_id=str(sid), home=str(home), month=str(month), version=int(version),
        replaces=None if replaces is None else str(replaces), request_id=str(rid),
        stated_at_ms=int(at), claims=int(claims), reversed_claims=int(rev),
        owed_fen=int(owed_fen), dropped=tuple(json.loads(str(dropped))), outcome=str(outcome),
        confirmed_claims=None if c_claims is None else int(c_claims),
        confirmed_fen=None if c_fen is None else int(c_fen),
        disputed_fen=None if d_fen is None else int(d_fen),
        disputes=tuple(ClearingDispute.model_validate(d) for d in json.loads(str(disputes))),
        error_code=None if code is None else str(code),
        answered_at_ms=None if answered is None else int(answered),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ClearingView:
    """One month and province pair as ops see it (the latest version stated or answered)."""

    side: str
    """``host`` (this province stated it) or ``home`` (this province answered it)."""
    month: str
    """``YYYY-MM``."""
    host: str
    """The creditor province."""
    home: str
    """The debtor province."""
    statement_id: str
    """The latest statement of the month and pair."""
    version: int
    """Its version."""
    outcome: str
    """``SENT``, ``CONFIRMED``, ``DISPUTED`` or ``FAILED``."""
    stated_claims: int
    """Claims stated (not reversed)."""
    stated_fen: int
    """What the host stated the home owes, in fen."""
    confirmed_claims: int
    """Claims confirmed by the home (0 until answered)."""
    confirmed_fen: int
    """What the home confirmed it owes, in fen (0 until answered)."""
    disputed_claims: int
    """Lines disputed."""
    disputed_fen: int
    """Their stated shares, in fen."""


class Clearing:
    """Both sides of monthly clearing for one province: as host it states its months, as home
    it answers the statements of its hosts. Its tables live in the province's database beside
    the node's store and the back office, so an answer, its reports and the processed mark
    commit in one step."""

    def __init__(self, node: Node, backoffice: SqlBackOffice, db: Database) -> None:
        self.node = node
        self.province = node.province
        self.backoffice = backoffice
        self.db = db
        db.migrate("clearing/1", _SCHEMA)
        node.on(ClearingStatement)(self._on_statement)
        node.on_answer(ClearingStatement)(self._on_response)

    # --- host: stating a month ------------------------------------------------------------
    async def state_month(
        self, home: str, month: str, *, deadline_s: float = CLEARING_DEADLINE_S
    ) -> str:
        """Send ``home`` the statement of ``month`` (one step: the request and its row here);
        returns the statement id. The first of the month and home is version 1; when one was
        sent before, this is the next version and replaces the latest (claims dropped from it
        stay dropped). A month without settlements is stated too (owing 0)."""
        latest = self.latest(home, month)
        if latest is None:
            return await self._state(home, month, 1, None, (), deadline_s)
        return await self._state(
            home, month, latest.version + 1, latest.statement_id, latest.dropped, deadline_s
        )

    async def state_all(self, month: str, *, deadline_s: float = CLEARING_DEADLINE_S) -> list[str]:
        """One statement per home this host settled claims with in ``month``; their ids."""
        since, until = month_bounds_ms(month)
        homes = sorted(
            {province_of(c.claim.home_region) for c in self.backoffice.settled_claims(since, until)}
        )
        return [await self.state_month(home, month, deadline_s=deadline_s) for home in homes]

    async def restate(
        self,
        statement_id: str,
        *,
        drop: Sequence[str] = (),
        deadline_s: float = CLEARING_DEADLINE_S,
    ) -> str:
        """State the month of ``statement_id`` again, as the next version replacing it, from
        the books as they are now (a lost notice re-sent, a reversal recorded), without the
        disputed claims in ``drop`` that the host accepts to remove. Only the latest version of
        a month and home can be re-stated; ``drop`` names claims the home disputed on it."""
        old = self.statement(statement_id)
        if old is None:
            raise KeyError(f"{self.province} sent no clearing statement {statement_id}")
        latest = self.latest(old.home, old.month)
        assert latest is not None
        if latest.statement_id != old.statement_id:
            raise ValueError(
                f"{statement_id} is version {old.version} of {old.month} with {old.home}: "
                f"version {latest.version} ({latest.statement_id}) replaced it"
            )
        disputed = {d.claim_id for d in old.disputes}
        stray = sorted(set(drop) - disputed)
        if stray:
            raise ValueError(f"not disputed on {statement_id}: {', '.join(stray)}")
        dropped = tuple(sorted(set(old.dropped) | set(drop)))
        return await self._state(
            old.home, old.month, old.version + 1, old.statement_id, dropped, deadline_s
        )

    async def _state(
        self,
        home: str,
        month: str,
        version: int,
        replaces: str | None,
        dropped: tuple[str, ...],
        deadline_s: float,
    ) -> str:
        since, until = month_bounds_ms(month)
        skip = set(dropped)
        lines = [
            line_of(c)
            for c in self.backoffice.settled_claims(since, until, home=home)
            if c.claim.claim_id not in skip
        ]
        statement = statement_of(
            self.province, home, month, lines, f"S-{self.province}-{new_id()[:13]}",
            version=version, replaces=replaces,
        )  # fmt: skip
        async with self.node.step() as step:
            self.db.lock(f"clearing:{home}:{month}")
            request_id = await self.node.request(statement, deadline_s=deadline_s)
            with self.db.write() as cur:
                cur.execute(
                    f"INSERT INTO clearing_statements ({_COLUMNS}) "  # noqa: S608
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (statement.statement_id, home, month, version, replaces, request_id,
                     int(statement.stated_at.timestamp() * 1000), statement.claims,
                     statement.reversed_claims, statement.owed_fen, json.dumps(list(dropped)),
                     SENT, None, None, None, "[]", None, None),
                )  # fmt: skip
        await self.node.delivered(step)
        log.info(
            "clearing_stated", statement_id=statement.statement_id, home=home, month=month,
            version=version, replaces=replaces, claims=statement.claims,
            reversed_claims=statement.reversed_claims, owed_fen=statement.owed_fen,
            dropped=len(dropped),
        )  # fmt: skip
        return statement.statement_id

    async def _on_response(self, answer: Answer) -> None:
        """The home's answer (or an error report, or our DEADLINE_EXCEEDED), in the step that
        stores it."""
        request = answer.request
        asked = self.node.codec.decode(request.record.value) if request is not None else None
        if not isinstance(asked, ClearingStatement):
            log.warning("clearing_answer_without_request", request_id=answer.request_id)
            return
        message: Message = answer.message
        if isinstance(message, ClearingResponse):
            outcome, code = message.decision.value, None
            values: tuple[Any, ...] = (
                _confirmed_claims(asked, message.disputes), message.confirmed_fen,
                message.disputed_fen,
                json.dumps([d.model_dump(mode="json") for d in message.disputes]),
            )  # fmt: skip
        else:
            assert isinstance(message, ErrorReport)
            outcome, code, values = FAILED, message.code.value, (None, None, None, "[]")
        with self.db.write() as cur:
            cur.execute(
                "UPDATE clearing_statements SET outcome = ?, confirmed_claims = ?, "
                "confirmed_fen = ?, disputed_fen = ?, disputes = ?, error_code = ?, "
                "answered_at_ms = ? WHERE statement_id = ?",
                (outcome, *values, code, now_ms(), asked.statement_id),
            )
        log.info(
            "clearing_answered", statement_id=asked.statement_id, home=asked.home,
            month=asked.month, version=asked.version, outcome=outcome, code=code,
            confirmed_fen=values[1], disputed_fen=values[2], late=answer.late,
        )  # fmt: skip

    def statements(
        self, *, month: str | None = None, home: str | None = None
    ) -> list[ClearingRecord]:
        """The statements this host sent (of one month, one home, or all), by month, home and
        version."""
        sql = f"SELECT {_COLUMNS} FROM clearing_statements WHERE 1 = 1"  # noqa: S608
        args: tuple[object, ...] = ()
        if month is not None:
            sql += " AND month = ?"
            args += (month,)
        if home is not None:
            sql += " AND home = ?"
            args += (home,)
        rows = self.db.query(sql + " ORDER BY month, home, version", args)
        return [_record(r) for r in rows]

    def statement(self, statement_id: str) -> ClearingRecord | None:
        """One statement this host sent, with its answer once come."""
        rows = self.db.query(
            f"SELECT {_COLUMNS} FROM clearing_statements WHERE statement_id = ?",  # noqa: S608
            (statement_id,),
        )
        return _record(rows[0]) if rows else None

    def latest(self, home: str, month: str) -> ClearingRecord | None:
        """The latest version this host stated of ``month`` with ``home`` (None: none yet)."""
        rows = self.db.query(
            f"SELECT {_COLUMNS} FROM clearing_statements "  # noqa: S608
            "WHERE home = ? AND month = ? ORDER BY version DESC LIMIT 1",
            (home, month),
        )
        return _record(rows[0]) if rows else None

    async def wait_answered(
        self, statement_ids: Sequence[str], timeout_s: float
    ) -> list[ClearingRecord]:
        """The records of ``statement_ids`` once every one is answered; ``TimeoutError``
        naming the unanswered ones after ``timeout_s``."""
        return await wait_answered(self.statement, statement_ids, timeout_s, "clearing statement")

    # --- ops: per month and pair --------------------------------------------------------------
    def overview(self, month: str | None = None) -> list[ClearingView]:
        """Per month and province pair, the latest version: as host (what this province stated
        and how it was answered) and as home (what it was stated and how it answered), by
        month, side, host and home. For the gateway's ops API and the demo's table."""
        month_sql, args = ("", ()) if month is None else (" AND s.month = ?", (month,))
        views: list[ClearingView] = []
        for row in self.db.query(
            "SELECT s.month, s.home, s.statement_id, s.version, s.outcome, s.claims, "  # noqa: S608
            "s.owed_fen, s.confirmed_claims, s.confirmed_fen, s.disputed_fen, s.disputes "
            "FROM clearing_statements s WHERE s.version = (SELECT max(t.version) FROM "
            "clearing_statements t WHERE t.home = s.home AND t.month = s.month)" + month_sql,
            args,
        ):
            m, home, sid, v, outcome, claims, owed_fen, c_claims, c_fen, d_fen, disputes = row
            views.append(ClearingView(
                side="host", month=str(m), host=self.province, home=str(home),
                statement_id=str(sid), version=int(v), outcome=str(outcome),
                stated_claims=int(claims), stated_fen=int(owed_fen),
                confirmed_claims=int(c_claims or 0), confirmed_fen=int(c_fen or 0),
                disputed_claims=len(json.loads(str(disputes))), disputed_fen=int(d_fen or 0),
            ))  # fmt: skip
        for row in self.db.query(
            "SELECT s.month, s.host, s.statement_id, s.version, s.decision, s.claims, "  # noqa: S608
            "s.owed_fen, s.confirmed_claims, s.confirmed_fen, s.disputed_claims, s.disputed_fen "
            "FROM clearing_answers s WHERE s.version = (SELECT max(t.version) FROM "
            "clearing_answers t WHERE t.host = s.host AND t.month = s.month)" + month_sql,
            args,
        ):
            m, host, sid, v, decision, claims, owed_fen, c_claims, c_fen, d_claims, d_fen = row
            views.append(ClearingView(
                side="home", month=str(m), host=str(host), home=self.province,
                statement_id=str(sid), version=int(v), outcome=str(decision),
                stated_claims=int(claims), stated_fen=int(owed_fen),
                confirmed_claims=int(c_claims), confirmed_fen=int(c_fen),
                disputed_claims=int(d_claims), disputed_fen=int(d_fen),
            ))  # fmt: skip
        return sorted(views, key=lambda x: (x.month, x.side != "host", x.host, x.home))

    # --- home: answering a statement ---------------------------------------------------------
    def answer_to(self, statement_id: str) -> ClearingResponse | None:
        """The answer this home gave to a statement (None: none yet)."""
        rows = self.db.query(
            "SELECT result FROM clearing_answers WHERE statement_id = ?", (statement_id,)
        )
        return ClearingResponse.model_validate_json(rows[0][0]) if rows else None

    async def _on_statement(self, message: Message, ctx: Context) -> ClearingResponse:
        """Check a host's month against this home's books: the answer, and one ErrorReport per
        dispute to the host, commit with the processed mark. A statement answered before (under
        any message id) gets its stored answer and no new reports."""
        assert isinstance(message, ClearingStatement)
        s = message
        host = ctx.envelope.source
        self.db.lock(f"clearing:{s.statement_id}")
        done = self.answer_to(s.statement_id)
        if done is not None:
            return done
        flaw = statement_flaw(s) or self._replaces_flaw(s, host)
        if flaw is not None:
            raise Rejection(
                ErrorCode.INVALID_MESSAGE,
                f"clearing statement {s.statement_id}: {flaw}",
                details={"responsible": host, "statement_id": s.statement_id},
            )
        books = self.backoffice.clearing_books(host, [x.claim_id for x in s.lines])
        disputes = judge(s, books)
        result = response_to(s, disputes)
        with self.db.write() as cur:
            cur.execute(
                "INSERT INTO clearing_answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (s.statement_id, host, s.month, s.version, s.replaces, result.decision.value,
                 s.claims, s.owed_fen, _confirmed_claims(s, disputes), result.confirmed_fen,
                 len(disputes), result.disputed_fen, result.model_dump_json(), now_ms()),
            )  # fmt: skip
        for d in disputes[:MAX_REPORTS]:
            await self._report(s, d, ctx)
        log.info(
            "clearing_decided", statement_id=s.statement_id, host=host, month=s.month,
            version=s.version, decision=result.decision.value, disputes=len(disputes),
            owed_fen=s.owed_fen, confirmed_fen=result.confirmed_fen,
            disputed_fen=result.disputed_fen,
        )  # fmt: skip
        return result

    def _replaces_flaw(self, s: ClearingStatement, host: str) -> str | None:
        """Why ``replaces`` cannot be right, as far as this home knows (a statement it never
        got may be replaced: it was lost, or refused)."""
        if s.replaces is None:
            return None
        rows = self.db.query(
            "SELECT host, month, version FROM clearing_answers WHERE statement_id = ?",
            (s.replaces,),
        )
        if not rows:
            return None
        r_host, r_month, r_version = rows[0]
        if (str(r_host), str(r_month)) != (host, s.month):
            return f"it replaces {s.replaces}, a statement of another month or host"
        if int(r_version) >= s.version:
            return f"version {s.version} replaces version {r_version}"
        return None

    async def _report(self, s: ClearingStatement, d: ClearingDispute, ctx: Context) -> None:
        """One dispute as an ErrorReport to the host (no correlation id: it is no answer to the
        statement, the ClearingResponse is)."""
        stated = next((owed(x) for x in reversed(s.lines) if x.claim_id == d.claim_id), 0)
        rep = report(
            ErrorCode.CLEARING_DISPUTED,
            f"clearing {s.statement_id} of {s.month} (version {s.version}): {d.reason_code}: "
            f"{d.note}",
            detected_by=self.province,
            origin=s.host,
            responsible=s.host,
            severity=Severity.ERROR,
            ref=ctx.envelope,
            record=ctx.record,
            details={
                "statement_id": s.statement_id,
                "month": s.month,
                "version": str(s.version),
                "claim_id": d.claim_id,
                "reason_code": d.reason_code,
                "stated_fen": str(stated),
                "home_owed_fen": "" if d.home_owed_fen is None else str(d.home_owed_fen),
                "action": _ACTIONS.get(d.reason_code, "check the line"),
            },
        )
        await self.node.send_report(
            rep, to=s.host, key=f"{s.host}:{s.month}".encode(), correlation_id=None
        )
