"""Daily reconciliation (对账, contract v1.3) between a host and a home on the real embedded
broker: a day whose books agree is MATCHED; a notice lost at the home and an amount changed
there are found, attributed to the host and reported to it; a reversal seen by both sides
matches; a statement is answered once per statement id. And the digest's canonical form, the
records' round trip through the codec."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.reconciliation import (
    CHINA,
    StatementRecord,
    canonical_lines,
    china_day,
    day_bounds_ms,
    statement_flaw,
    statement_of,
)
from bus.codec import Codec
from bus.envelope import Envelope, check, new_id, now_ms
from bus.errors import DecodeError
from bus.models import (
    DifferenceKind,
    ErrorCode,
    ErrorReport,
    ReconciliationDifference,
    ReconciliationLine,
    ReconciliationOutcome,
    ReconciliationResult,
    ReconciliationStatement,
    ReversalReason,
    now,
)
from bus.settings import BusSettings
from tests.conftest import ProvincePool
from tests.helpers import eventually
from tests.test_crash_safety import Pair


@pytest.fixture(name="pair")
async def two_provinces(
    broker: str, settings: BusSettings, tmp_path: Path, province_pool: ProvincePool
) -> AsyncIterator[Pair]:
    """A host and a home on the module's broker (tests/test_crash_safety.py's ``Pair``)."""
    made = Pair(broker, settings, tmp_path, province_pool)
    yield made
    await made.stop()


async def settled_day(pair: Pair, claims: int) -> tuple[dt.date, list[str]]:
    """``claims`` of Lao Zhang's stays settled, their notices recorded at the home: the
    China day they were settled on, and their ids."""
    await pair.start()
    await pair.file_lao_zhang()
    ids: list[str] = []
    for _ in range(claims):
        claim = await pair.claim()
        await pair.host.host.submit(claim)
        ids.append(claim.claim_id)
    settled = [await pair.settled(c) for c in ids]
    await eventually(lambda: len(pair.home.backoffice.settlements()) == claims, 20)
    days = {china_day(dt.datetime.fromtimestamp((c.settled_at_ms or 0) / 1000, dt.UTC))
            for c in settled}  # fmt: skip
    assert len(days) == 1, "settled across midnight (China time): run again"
    return days.pop(), ids


async def reconciled(pair: Pair, day: dt.date) -> StatementRecord:
    statement_id = await pair.host.reconciler.reconcile_day(pair.home_code, day)
    (record,) = await pair.host.reconciler.wait_reconciled([statement_id], 30)
    return record


def mismatch_reports(pair: Pair) -> list[ErrorReport]:
    """RECONCILIATION_MISMATCH reports the host received."""
    return [r for r in pair.host.home.reports if r.code is ErrorCode.RECONCILIATION_MISMATCH]


async def at_home(pair: Pair, sql: str, *args: object) -> None:
    """A write to the home's books in a step of its own (the node is running)."""
    async with pair.home.node.step():
        with pair.home.db.write() as cur:
            cur.execute(sql, args)


@pytest.mark.broker
class TestReconciliation:
    async def test_a_day_whose_books_agree_is_matched(self, pair: Pair) -> None:
        day, ids = await settled_day(pair, 2)
        record = await reconciled(pair, day)
        assert record.outcome == ReconciliationOutcome.MATCHED.value
        assert record.differences == ()
        claims = [pair.host.backoffice.claim(c) for c in ids]
        fund = sum(c.review.fund_fen for c in claims if c is not None and c.review is not None)
        assert (record.count, record.fund_fen) == (2, fund)
        answer = pair.home.reconciler.answer_to(record.statement_id)
        assert answer is not None
        assert answer.outcome is ReconciliationOutcome.MATCHED
        assert (answer.count, answer.fund_fen) == (2, fund)
        # The day before has nothing, on both sides: matched too (count 0).
        empty = await reconciled(pair, day - dt.timedelta(days=1))
        assert (empty.outcome, empty.count) == ("MATCHED", 0)
        # reconcile_all states one statement per home settled with that day.
        all_ids = await pair.host.reconciler.reconcile_all(day)
        assert len(all_ids) == 1
        (again,) = await pair.host.reconciler.wait_reconciled(all_ids, 30)
        assert again.outcome == "MATCHED"
        listed = {r.statement_id for r in pair.host.reconciler.statements(day=day)}
        assert listed == {record.statement_id, all_ids[0]}
        assert mismatch_reports(pair) == []

    async def test_a_lost_notice_is_missing_at_home_and_reported_once(self, pair: Pair) -> None:
        day, ids = await settled_day(pair, 2)
        lost = sorted(ids)[0]
        await at_home(pair, "DELETE FROM settlements WHERE claim_id = ?", lost)
        record = await reconciled(pair, day)
        assert record.outcome == ReconciliationOutcome.MISMATCHED.value
        (diff,) = record.differences
        claim = pair.host.backoffice.claim(lost)
        assert claim is not None
        assert claim.review is not None
        assert diff.claim_id == lost
        assert diff.kind is DifferenceKind.MISSING_AT_HOME
        assert (diff.host_fund_fen, diff.home_fund_fen) == (claim.review.fund_fen, None)
        assert diff.responsible == pair.host_code
        await eventually(lambda: len(mismatch_reports(pair)) == 1, 20)
        (rep,) = mismatch_reports(pair)
        assert rep.responsible == pair.host_code
        assert rep.detected_by == pair.home_code
        assert rep.details["claim_id"] == lost
        assert rep.details["kind"] == "MISSING_AT_HOME"
        assert rep.details["action"] == "re-send the settlement notice"
        # The same statement again, under a new message id: the stored answer, no new report.
        request = pair.host.node.store.get_pending(record.request_id)
        assert request is not None
        statement = pair.host.node.codec.decode(request.record.value)
        assert isinstance(statement, ReconciliationStatement)
        same = await pair.host.node.ask(statement, deadline_s=20)
        assert same.request_id != record.request_id
        assert same.message == pair.home.reconciler.answer_to(record.statement_id)
        await asyncio.sleep(1.0)  # a second report would have come by now (it leaves first)
        assert len(mismatch_reports(pair)) == 1
        rows = pair.home.db.query("SELECT count(*) FROM reconciliation_answers")
        assert rows[0][0] == 1

    async def test_an_amount_changed_at_home_is_found(self, pair: Pair) -> None:
        day, ids = await settled_day(pair, 2)
        changed = sorted(ids)[1]
        (row,) = pair.home.db.query("SELECT data FROM settlements WHERE claim_id = ?", (changed,))
        data = json.loads(row[0])
        data["fund_fen"] += 100
        await at_home(
            pair, "UPDATE settlements SET data = ? WHERE claim_id = ?", json.dumps(data), changed
        )
        record = await reconciled(pair, day)
        assert record.outcome == "MISMATCHED"
        (diff,) = record.differences
        assert (diff.claim_id, diff.kind) == (changed, DifferenceKind.AMOUNT_DIFFERS)
        assert diff.host_fund_fen is not None
        assert diff.home_fund_fen == diff.host_fund_fen + 100
        assert "fund" in diff.note
        await eventually(lambda: len(mismatch_reports(pair)) == 1, 20)
        assert mismatch_reports(pair)[0].details["kind"] == "AMOUNT_DIFFERS"

    async def test_a_reversal_flagged_on_both_sides_matches(self, pair: Pair) -> None:
        day, ids = await settled_day(pair, 2)
        gone, kept = sorted(ids)
        await pair.host.host.reverse_claim(gone, ReversalReason.DUPLICATE_BILL, "", "ops")

        def confirmed() -> bool:
            c = pair.host.backoffice.claim(gone)
            return c is not None and c.reversal_state == "CONFIRMED"

        await eventually(confirmed, 30)
        record = await reconciled(pair, day)
        assert record.outcome == "MATCHED"
        other = pair.host.backoffice.claim(kept)
        assert other is not None
        assert other.review is not None
        assert (record.count, record.fund_fen) == (1, other.review.fund_fen)
        request = pair.host.node.store.get_pending(record.request_id)
        assert request is not None
        statement = pair.host.node.codec.decode(request.record.value)
        assert isinstance(statement, ReconciliationStatement)
        assert [(x.claim_id, x.reversed) for x in statement.lines] == [(gone, True), (kept, False)]
        # Were the reversal unknown at the home, the flags would differ.
        await at_home(pair, "DELETE FROM reversals WHERE claim_id = ?", gone)
        differs = await reconciled(pair, day)
        assert [(d.claim_id, d.kind) for d in differs.differences] == [
            (gone, DifferenceKind.REVERSAL_DIFFERS)
        ]

    async def test_a_statement_that_contradicts_itself_is_refused(self, pair: Pair) -> None:
        await pair.start()
        line = ReconciliationLine(
            claim_id=f"C-{pair.host_code}-X", total_fen=100, fund_fen=60, critical_illness_fen=0,
            assistance_fen=0, personal_fen=40, advance_fen=25, reversed=False,
        )  # fmt: skip
        good = statement_of(pair.host_code, pair.home_code, china_day(now()), [line],
                            f"S-{pair.host_code}-{new_id()[:8]}")  # fmt: skip
        bad = good.model_copy(update={"fund_fen": 61})
        answer = await pair.host.node.ask(bad, deadline_s=20)
        assert isinstance(answer.message, ErrorReport)
        assert answer.message.code is ErrorCode.INVALID_MESSAGE
        assert "totals" in answer.message.message
        assert pair.home.reconciler.answer_to(bad.statement_id) is None


class TestWire:
    def test_the_canonical_form_and_digest(self) -> None:
        lines = [
            ReconciliationLine(claim_id="C-b", total_fen=10, fund_fen=6, critical_illness_fen=1,
                               assistance_fen=0, personal_fen=3, advance_fen=-2, reversed=True),
            ReconciliationLine(claim_id="C-a", total_fen=5, fund_fen=5, critical_illness_fen=0,
                               assistance_fen=0, personal_fen=0, advance_fen=0, reversed=False),
        ]  # fmt: skip
        canonical = canonical_lines(lines)
        assert canonical == b"C-a|5|5|0|0|0|0|0\nC-b|10|6|1|0|3|-2|1\n"
        s = statement_of("460000", "130000", dt.date(2026, 3, 1), lines, "S-460000-1")
        assert s.digest == hashlib.sha256(canonical).hexdigest()
        assert (s.count, s.total_fen, s.fund_fen, s.advance_fen) == (1, 5, 5, 0)
        assert [x.claim_id for x in s.lines] == ["C-a", "C-b"]
        assert statement_flaw(s) is None
        assert statement_flaw(s.model_copy(update={"digest": "0" * 64})) is not None

    def test_china_days(self) -> None:
        start, end = day_bounds_ms(dt.date(2026, 3, 1))
        assert end - start == 86_400_000
        assert start == int(dt.datetime(2026, 2, 28, 16, tzinfo=dt.UTC).timestamp() * 1000)
        assert china_day(dt.datetime(2026, 2, 28, 16, tzinfo=dt.UTC)) == dt.date(2026, 3, 1)
        assert china_day(dt.datetime(2026, 2, 28, 15, 59, tzinfo=dt.UTC)) == dt.date(2026, 2, 28)
        assert CHINA.utcoffset(None) == dt.timedelta(hours=8)

    def test_both_records_round_trip_and_pass_the_header_rules(self) -> None:
        codec = Codec()
        line = ReconciliationLine(
            claim_id="C-460100-H46010001-1", total_fen=2_500_000, fund_fen=1_750_000,
            critical_illness_fen=0, assistance_fen=0, personal_fen=750_000, advance_fen=625_000,
            reversed=False,
        )  # fmt: skip
        statement = statement_of("460000", "130000", dt.date(2026, 3, 1), [line], "S-460000-1")
        result = ReconciliationResult(
            statement_id="S-460000-1", day=dt.date(2026, 3, 1),
            outcome=ReconciliationOutcome.MISMATCHED, count=0, fund_fen=0,
            critical_illness_fen=0, assistance_fen=0, personal_fen=0,
            differences=(ReconciliationDifference(
                claim_id=line.claim_id, kind=DifferenceKind.MISSING_AT_HOME,
                host_fund_fen=1_750_000, home_fund_fen=None, responsible="460000",
                note="re-send the notice",
            ),),
            reconciled_at=now(),
        )  # fmt: skip
        for message in (statement, result):
            assert codec.decode(codec.encode(message)) == message
        request = Envelope(
            message_id=new_id(), message_type=statement.avro_name, source="460000",
            target="130000", sent_at_ms=now_ms(), reply_to="xsettle.reply.460000",
            deadline_ms=now_ms() + 1000,
        )  # fmt: skip
        check(request, statement, "xsettle.settlement.130000")
        with pytest.raises(DecodeError):  # a statement only its host may issue
            check(request, statement.model_copy(update={"statement_id": "S-130000-1"}),
                  "xsettle.settlement.130000")  # fmt: skip
        with pytest.raises(DecodeError):  # it travels on the settlement family only
            check(request, statement, "xsettle.claim.130000")
        reply = Envelope(
            message_id=new_id(), message_type=result.avro_name, source="130000",
            target="460000", sent_at_ms=now_ms(), correlation_id=request.message_id,
        )  # fmt: skip
        check(reply, result, "xsettle.reply.460000")
        unknown = result.model_copy(update={"outcome": ReconciliationOutcome.UNKNOWN})
        with pytest.raises(DecodeError, match="UNKNOWN"):
            check(reply, unknown, "xsettle.reply.460000")
