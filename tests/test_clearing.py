"""Monthly clearing (清算, contract v1.3) between a host and a home on the real embedded broker:
a month whose books agree is CONFIRMED for the sum of the settled claims' shares; a reversed
claim owes nothing and is flagged on both sides; a lost notice and a changed amount are
disputed with their reason, reported to the host, and resolved by a re-statement that replaces
the disputed one; a statement is answered once per statement id. And the months, the home's
rules line by line, the records' round trip through the codec."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.clearing import (
    AMOUNT_DIFFERS,
    DUPLICATE_LINE,
    NOT_REVIEWED,
    NOT_SETTLED,
    REVERSAL_DIFFERS,
    ClearingRecord,
    china_month,
    judge,
    month_bounds_ms,
    response_to,
    statement_flaw,
    statement_of,
)
from bus.codec import Codec
from bus.envelope import Envelope, check, new_id, now_ms
from bus.errors import DecodeError
from bus.models import (
    ClearingDecision,
    ClearingDispute,
    ClearingLine,
    ClearingResponse,
    ClearingStatement,
    ErrorCode,
    ErrorReport,
    ReversalReason,
    ReviewResult,
    now,
)
from bus.settings import BusSettings
from simulators import samples
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


async def settled_month(pair: Pair, claims: int) -> tuple[str, list[str]]:
    """``claims`` of Lao Zhang's stays settled, their notices recorded at the home: the China
    month they were settled in, and their ids (sorted)."""
    await pair.start()
    await pair.file_lao_zhang()
    ids: list[str] = []
    for _ in range(claims):
        claim = await pair.claim()
        await pair.host.host.submit(claim)
        ids.append(claim.claim_id)
    settled = [await pair.settled(c) for c in ids]
    await eventually(lambda: len(pair.home.backoffice.settlements()) == claims, 20)
    months = {china_month(dt.datetime.fromtimestamp((c.settled_at_ms or 0) / 1000, dt.UTC))
              for c in settled}  # fmt: skip
    assert len(months) == 1, "settled across a month's end (China time): run again"
    return months.pop(), sorted(ids)


def shares(pair: Pair, claim_id: str) -> int:
    """The fund + critical-illness + assistance shares the host settled a claim with."""
    claim = pair.host.backoffice.claim(claim_id)
    assert claim is not None
    assert claim.review is not None
    r = claim.review
    return r.fund_fen + r.critical_illness_fen + r.assistance_fen


async def cleared(pair: Pair, statement_id: str) -> ClearingRecord:
    (record,) = await pair.host.clearing.wait_answered([statement_id], 30)
    return record


def stated(pair: Pair, record: ClearingRecord) -> ClearingStatement:
    """The statement as it went on the wire (from the host's store)."""
    request = pair.host.node.store.get_pending(record.request_id)
    assert request is not None
    statement = pair.host.node.codec.decode(request.record.value)
    assert isinstance(statement, ClearingStatement)
    return statement


def disputed_reports(pair: Pair) -> list[ErrorReport]:
    """CLEARING_DISPUTED reports the host received."""
    return [r for r in pair.host.home.reports if r.code is ErrorCode.CLEARING_DISPUTED]


async def at_home(pair: Pair, sql: str, *args: object) -> None:
    """A write to the home's books in a step of its own (the node is running)."""
    async with pair.home.node.step():
        with pair.home.db.write() as cur:
            cur.execute(sql, args)


@pytest.mark.broker
class TestClearing:
    async def test_a_month_whose_books_agree_is_confirmed(self, pair: Pair) -> None:
        month, ids = await settled_month(pair, 2)
        first = await pair.host.clearing.state_month(pair.home_code, month)
        record = await cleared(pair, first)
        owed = sum(shares(pair, c) for c in ids)
        assert owed > 0
        assert (record.outcome, record.version, record.replaces) == ("CONFIRMED", 1, None)
        assert (record.claims, record.reversed_claims, record.owed_fen) == (2, 0, owed)
        assert (record.confirmed_claims, record.confirmed_fen, record.disputed_fen) == (
            2, owed, 0,
        )  # fmt: skip
        statement = stated(pair, record)
        assert [x.claim_id for x in statement.lines] == ids
        assert statement.month == month
        answer = pair.home.clearing.answer_to(first)
        assert answer is not None
        assert (answer.decision, answer.confirmed_fen, answer.disputes) == (
            ClearingDecision.CONFIRMED, owed, (),
        )  # fmt: skip
        # state_all states the month again: version 2, replacing version 1, same money.
        (second,) = await pair.host.clearing.state_all(month)
        again = await cleared(pair, second)
        assert (again.version, again.replaces, again.outcome, again.owed_fen) == (
            2, first, "CONFIRMED", owed,
        )  # fmt: skip
        # Ops: the latest version per month and pair, on both sides.
        (host_view,) = pair.host.clearing.overview(month)
        (home_view,) = pair.home.clearing.overview(month)
        for view, side in ((host_view, "host"), (home_view, "home")):
            assert (view.side, view.host, view.home, view.statement_id) == (
                side, pair.host_code, pair.home_code, second,
            )  # fmt: skip
            assert (view.outcome, view.stated_claims, view.stated_fen) == ("CONFIRMED", 2, owed)
            assert (view.confirmed_claims, view.confirmed_fen) == (2, owed)
            assert (view.disputed_claims, view.disputed_fen) == (0, 0)
        assert pair.host.clearing.overview("1999-01") == []
        assert disputed_reports(pair) == []

    async def test_a_reversed_claim_owes_nothing_and_is_flagged(self, pair: Pair) -> None:
        month, (gone, kept) = await settled_month(pair, 2)
        await pair.host.host.reverse_claim(gone, ReversalReason.DUPLICATE_BILL, "", "ops")

        def confirmed() -> bool:
            c = pair.host.backoffice.claim(gone)
            return c is not None and c.reversal_state == "CONFIRMED"

        await eventually(confirmed, 30)
        record = await cleared(pair, await pair.host.clearing.state_month(pair.home_code, month))
        assert record.outcome == "CONFIRMED"
        assert (record.claims, record.reversed_claims) == (1, 1)
        assert record.owed_fen == record.confirmed_fen == shares(pair, kept)
        lines = stated(pair, record).lines
        assert [(x.claim_id, x.reversed) for x in lines] == [(gone, True), (kept, False)]
        books = pair.home.backoffice.clearing_books(pair.host_code, [gone, kept])
        assert {c: b[2] for c, b in books.items()} == {gone: True, kept: False}
        # Were the reversal unknown at the home, the flags would differ: disputed, for 0 fen.
        await at_home(pair, "DELETE FROM reversals WHERE claim_id = ?", gone)
        again = await cleared(pair, await pair.host.clearing.restate(record.statement_id))
        assert again.outcome == "DISPUTED"
        (dispute,) = again.disputes
        assert (dispute.claim_id, dispute.reason_code) == (gone, REVERSAL_DIFFERS)
        assert dispute.home_owed_fen == shares(pair, gone)
        assert (again.disputed_fen, again.confirmed_fen) == (0, shares(pair, kept))

    async def test_a_lost_notice_is_disputed_then_restated_and_confirmed(self, pair: Pair) -> None:
        month, (lost, kept) = await settled_month(pair, 2)
        (row,) = pair.home.db.query("SELECT data FROM settlements WHERE claim_id = ?", (lost,))
        await at_home(pair, "DELETE FROM settlements WHERE claim_id = ?", lost)
        first = await pair.host.clearing.state_month(pair.home_code, month)
        record = await cleared(pair, first)
        assert record.outcome == "DISPUTED"
        (dispute,) = record.disputes
        assert (dispute.claim_id, dispute.reason_code, dispute.home_owed_fen) == (
            lost, NOT_SETTLED, 0,
        )  # fmt: skip
        assert "re-send the settlement notice" in dispute.note
        assert (record.confirmed_claims, record.confirmed_fen, record.disputed_fen) == (
            1, shares(pair, kept), shares(pair, lost),
        )  # fmt: skip
        assert (record.confirmed_fen or 0) + (record.disputed_fen or 0) == record.owed_fen
        await eventually(lambda: len(disputed_reports(pair)) == 1, 20)
        (rep,) = disputed_reports(pair)
        assert (rep.responsible, rep.origin, rep.detected_by) == (
            pair.host_code, pair.host_code, pair.home_code,
        )  # fmt: skip
        assert rep.details["statement_id"] == first
        assert rep.details["claim_id"] == lost
        assert rep.details["reason_code"] == NOT_SETTLED
        assert rep.details["stated_fen"] == str(shares(pair, lost))
        assert rep.ref_message_id == record.request_id
        # The same statement again, under a new message id: the stored answer, no new report.
        same = await pair.host.node.ask(stated(pair, record), deadline_s=20)
        assert same.request_id != record.request_id
        assert same.message == pair.home.clearing.answer_to(first)
        await asyncio.sleep(1.0)  # a second report would have come by now (it leaves first)
        assert len(disputed_reports(pair)) == 1
        assert pair.home.db.query("SELECT count(*) FROM clearing_answers")[0][0] == 1
        # Fixed (the notice re-sent), the month is stated again: version 2 replaces 1.
        await at_home(pair, "INSERT INTO settlements VALUES (?, ?)", lost, row[0])
        second = await pair.host.clearing.restate(first)
        fixed = await cleared(pair, second)
        assert (fixed.version, fixed.replaces, fixed.outcome) == (2, first, "CONFIRMED")
        assert fixed.confirmed_fen == fixed.owed_fen == shares(pair, lost) + shares(pair, kept)
        answered = pair.home.clearing.answer_to(second)
        assert answered is not None
        assert answered.decision is ClearingDecision.CONFIRMED
        views = pair.host.clearing.overview(month) + pair.home.clearing.overview(month)
        assert [(v.side, v.version, v.outcome, v.disputed_claims) for v in views] == [
            ("host", 2, "CONFIRMED", 0), ("home", 2, "CONFIRMED", 0),
        ]  # fmt: skip
        with pytest.raises(ValueError, match="replaced"):  # only the latest is re-stated
            await pair.host.clearing.restate(first)

    async def test_a_changed_amount_is_disputed_and_can_be_dropped(self, pair: Pair) -> None:
        month, (changed, kept) = await settled_month(pair, 2)
        (row,) = pair.home.db.query("SELECT data FROM reviews WHERE claim_id = ?", (changed,))
        data = json.loads(row[0])
        data["fund_fen"] += 100
        await at_home(
            pair, "UPDATE reviews SET data = ? WHERE claim_id = ?", json.dumps(data), changed
        )
        record = await cleared(pair, await pair.host.clearing.state_month(pair.home_code, month))
        assert record.outcome == "DISPUTED"
        (dispute,) = record.disputes
        assert (dispute.claim_id, dispute.reason_code) == (changed, AMOUNT_DIFFERS)
        assert dispute.home_owed_fen == shares(pair, changed) + 100
        assert "fund" in dispute.note
        await eventually(lambda: len(disputed_reports(pair)) == 1, 20)
        assert disputed_reports(pair)[0].details["reason_code"] == AMOUNT_DIFFERS
        with pytest.raises(ValueError, match="not disputed"):
            await pair.host.clearing.restate(record.statement_id, drop=(kept,))
        # The host accepts to take the line out: version 2 without it is confirmed.
        second = await cleared(
            pair, await pair.host.clearing.restate(record.statement_id, drop=(changed,))
        )
        assert (second.version, second.outcome, second.claims) == (2, "CONFIRMED", 1)
        assert second.owed_fen == second.confirmed_fen == shares(pair, kept)
        assert second.dropped == (changed,)
        # A later statement of the month keeps it dropped.
        third = await cleared(pair, await pair.host.clearing.state_month(pair.home_code, month))
        assert (third.version, third.claims, third.dropped) == (3, 1, (changed,))

    async def test_a_statement_that_contradicts_itself_is_refused(self, pair: Pair) -> None:
        await pair.start()
        line = ClearingLine(
            claim_id=f"C-{pair.host_code}-X", fund_fen=60, critical_illness_fen=5,
            assistance_fen=0, reversed=False,
        )  # fmt: skip
        good = statement_of(pair.host_code, pair.home_code, china_month(now()), [line],
                            f"S-{pair.host_code}-{new_id()[:8]}")  # fmt: skip
        bad = good.model_copy(update={"owed_fen": 66})
        answer = await pair.host.node.ask(bad, deadline_s=20)
        assert isinstance(answer.message, ErrorReport)
        assert answer.message.code is ErrorCode.INVALID_MESSAGE
        assert "totals" in answer.message.message
        assert pair.home.clearing.answer_to(bad.statement_id) is None
        # Well formed but about a claim the home never reviewed: disputed, not refused.
        ok = await pair.host.node.ask(good, deadline_s=20)
        assert isinstance(ok.message, ClearingResponse)
        assert [(d.reason_code, d.home_owed_fen) for d in ok.message.disputes] == [
            (NOT_REVIEWED, None)
        ]


def review(claim_id: str, fund: int, ci: int = 0, assistance: int = 0) -> ReviewResult:
    return samples.review(claim_id).model_copy(
        update={"fund_fen": fund, "critical_illness_fen": ci, "assistance_fen": assistance}
    )


class TestRules:
    def test_china_months(self) -> None:
        start, end = month_bounds_ms("2026-03")
        assert start == int(dt.datetime(2026, 2, 28, 16, tzinfo=dt.UTC).timestamp() * 1000)
        assert end == int(dt.datetime(2026, 3, 31, 16, tzinfo=dt.UTC).timestamp() * 1000)
        dec, jan = month_bounds_ms("2025-12"), month_bounds_ms("2026-01")
        assert dec[1] == jan[0]
        assert china_month(dt.datetime(2026, 2, 28, 16, tzinfo=dt.UTC)) == "2026-03"
        assert china_month(dt.datetime(2026, 2, 28, 15, 59, tzinfo=dt.UTC)) == "2026-02"
        with pytest.raises(ValueError, match="YYYY-MM"):
            month_bounds_ms("2026-13")

    def test_the_home_judges_each_line_by_the_first_reason_that_applies(self) -> None:
        def line(c: str, fund: int, reversed_: bool = False) -> ClearingLine:
            return ClearingLine(claim_id=c, fund_fen=fund, critical_illness_fen=10,
                                assistance_fen=0, reversed=reversed_)  # fmt: skip

        lines = [
            line("C-a", 100),
            line("C-a", 100),  # the second is a duplicate
            line("C-b", 100),  # never reviewed
            line("C-c", 100, True),  # reversed at the host only
            line("C-d", 100),  # no notice
            line("C-e", 100),  # fund reviewed as 90
            line("C-f", 100, True),  # reversed on both sides, no notice: owes 0, agreed
            line("C-g", 100),  # all agree
        ]
        s = statement_of("460000", "130000", "2026-05", lines, "S-460000-1")
        assert statement_flaw(s) is None  # a duplicate is disputed, not refused
        books = {
            "C-a": (review("C-a", 100, 10), True, False),
            "C-c": (review("C-c", 100, 10), True, False),
            "C-d": (review("C-d", 100, 10), False, False),
            "C-e": (review("C-e", 90, 10), True, False),
            "C-f": (review("C-f", 100, 10), False, True),
            "C-g": (review("C-g", 100, 10), True, False),
        }
        disputes = judge(s, books)
        assert [(d.claim_id, d.reason_code, d.home_owed_fen) for d in disputes] == [
            ("C-a", DUPLICATE_LINE, 110),
            ("C-b", NOT_REVIEWED, None),
            ("C-c", REVERSAL_DIFFERS, 110),
            ("C-d", NOT_SETTLED, 0),
            ("C-e", AMOUNT_DIFFERS, 100),
        ]
        result = response_to(s, disputes)
        assert result.decision is ClearingDecision.DISPUTED
        assert s.owed_fen == 6 * 110
        # Disputed: the duplicate, C-b, C-d and C-e (110 each); C-c is reversed as stated (0).
        assert (result.confirmed_fen, result.disputed_fen) == (2 * 110, 4 * 110)
        clean = statement_of("460000", "130000", "2026-05", [line("C-g", 100)], "S-460000-2")
        assert response_to(clean, judge(clean, books)).decision is ClearingDecision.CONFIRMED

    def test_statement_flaws(self) -> None:
        line = ClearingLine(claim_id="C-a", fund_fen=5, critical_illness_fen=1, assistance_fen=2,
                            reversed=False)  # fmt: skip
        s = statement_of("460000", "130000", "2026-05", [line], "S-460000-1")
        assert (s.claims, s.owed_fen, s.reversed_claims) == (1, 8, 0)
        assert statement_flaw(s) is None
        for update, why in (
            ({"month": "2026-5"}, "YYYY-MM"),
            ({"version": 2}, "replaces"),
            ({"replaces": "S-460000-0"}, "replaces"),
            ({"version": 2, "replaces": "S-460000-1"}, "itself"),
            ({"owed_fen": 9}, "totals"),
            ({"reversed_claims": 1}, "totals"),
        ):
            flaw = statement_flaw(s.model_copy(update=update))
            assert flaw is not None
            assert why in flaw


class TestWire:
    def test_both_records_round_trip_and_pass_the_header_rules(self) -> None:
        codec = Codec()
        statement = samples.clearing_statement()
        restated = statement.model_copy(
            update={"statement_id": "S-460000-202605-2", "version": 2,
                    "replaces": statement.statement_id}
        )  # fmt: skip
        response = samples.clearing_response()
        disputed = response.model_copy(update={
            "decision": ClearingDecision.DISPUTED, "confirmed_fen": 0,
            "disputed_fen": statement.owed_fen,
            "disputes": (ClearingDispute(claim_id=statement.lines[0].claim_id,
                                         reason_code=NOT_SETTLED, note="re-send the notice",
                                         home_owed_fen=0),),
        })  # fmt: skip
        for message in (statement, restated, response, disputed):
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
        with pytest.raises(DecodeError):  # from its host to its home only
            check(request, statement.model_copy(update={"home": "440000"}),
                  "xsettle.settlement.130000")  # fmt: skip
        reply = Envelope(
            message_id=new_id(), message_type=response.avro_name, source="130000",
            target="460000", sent_at_ms=now_ms(), correlation_id=request.message_id,
        )  # fmt: skip
        check(reply, response, "xsettle.reply.460000")
        with pytest.raises(DecodeError, match="correlation"):
            check(Envelope(message_id=new_id(), message_type=response.avro_name,
                           source="130000", target="460000", sent_at_ms=now_ms()),
                  response, "xsettle.reply.460000")  # fmt: skip
        unknown = response.model_copy(update={"decision": ClearingDecision.UNKNOWN})
        with pytest.raises(DecodeError, match="UNKNOWN"):
            check(reply, unknown, "xsettle.reply.460000")

    def test_the_record_key_is_host_and_month(self) -> None:
        from bus.node import message_key

        assert message_key(samples.clearing_statement()) == b"460000:2026-05"
