"""The home's review desk: DELAYED claims wait for a reviewer, decisions answer once.

Unit tests run Hebei's home on a province that is never started (no broker): a claim is handed
to the node's handler in a step as the consumer would, and what the home answers is read from
its outbox. Integration tests run a home and a host on the embedded broker (``Pair`` of
tests/test_crash_safety.py) and check what the host settles.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.backoffice import ClaimState, Person
from adapters.directory import Directory
from adapters.fixtures import (
    LAO_ZHANG_HOME_REGION,
    LAO_ZHANG_PERSON_ID,
    lao_zhang_claim,
    lao_zhang_items,
)
from adapters.province import ProvinceSystem
from adapters.review_desk import (
    REASON_REJECTED,
    ReviewClosed,
    ReviewDesk,
    ReviewDeskSettings,
    ReviewState,
    UnknownReview,
)
from adapters.rules import (
    YearUsage,
    add_usage,
    max_advance_fen,
    review,
    review_adjusted,
    spent,
)
from bus.broker import create_contract_topics
from bus.constants import H_CORRELATION_ID, H_MESSAGE_ID, H_MESSAGE_TYPE, topic
from bus.envelope import Envelope, new_id, now_ms
from bus.models import (
    CatalogueClass,
    ClaimPackage,
    ErrorCode,
    ErrorReport,
    FilingAction,
    FilingChannel,
    FilingReason,
    FilingUpload,
    InsuranceType,
    ItemAdjustment,
    Message,
    ReviewDecision,
    ReviewResult,
    SettlementMode,
    now,
)
from bus.settings import BusSettings
from bus.transport import Record
from simulators.reviewers import SimulatedReviewer
from tests.conftest import ProvincePool
from tests.helpers import eventually, hdr, read_topic
from tests.test_crash_safety import LAO_ZHANG_PAYMENTS, Pair

HEBEI, HAINAN = "130000", "460000"
YEAR = 2017
CAP = 30_000_000
"""Annual fund cap of a Hebei employee (300,000 yuan)."""
LAO_ZHANG_REVIEW = {"fund_fen": 1_750_000, "personal_fen": 750_000, "balance_fen": 125_000}
WEEK_MS = 7 * 24 * 3600 * 1000


def check_one_bill(r: ReviewResult) -> None:
    """The one-bill identities of a review."""
    assert r.personal_fen == r.total_fen - r.fund_fen - r.critical_illness_fen - r.assistance_fen
    assert r.balance_fen == r.personal_fen - r.advance_fen


# --- a home without a broker ------------------------------------------------------------------
class Home:
    """Hebei's home role with a desk, on a province that is never started: claims are handed
    to the node's handler in a step, answers are read from the outbox."""

    def __init__(self, folder: Path, settings: BusSettings, desk: ReviewDeskSettings) -> None:
        self.folder = folder
        self.settings = settings
        self.desk_settings = desk
        self.system = self._open()
        self._offset = 0

    def _open(self) -> ProvinceSystem:
        return ProvinceSystem(
            HEBEI,
            self.settings,
            bootstrap="127.0.0.1:9",
            directory=Directory.default(),
            state_dir=self.folder,
            review_desk=self.desk_settings,
        )

    @property
    def desk(self) -> ReviewDesk:
        assert self.system.home.desk is not None
        return self.system.home.desk

    def restart(self) -> None:
        """A new process on the same state folder."""
        self.system.close()
        self.system = self._open()

    def enrol(self, person_id: str = LAO_ZHANG_PERSON_ID) -> str:
        office = self.system.backoffice
        office.add_person(
            Person(person_id, "张建国", InsuranceType.EMPLOYEE, LAO_ZHANG_HOME_REGION)
        )
        office.record_filing(
            FilingUpload(
                filing_id=f"F-{LAO_ZHANG_HOME_REGION}-{person_id}", action=FilingAction.CREATE,
                person_id=person_id, person_name="张建国", insurance_type=InsuranceType.EMPLOYEE,
                home_region=LAO_ZHANG_HOME_REGION, host_region=HAINAN,
                reason=FilingReason.RELOCATED_RETIREE, channel=FilingChannel.COUNTER,
                valid_from=dt.date(2017, 1, 1), filed_at=now(),
            )
        )  # fmt: skip
        return person_id

    async def deliver(self, claim: ClaimPackage, message_id: str | None = None) -> str:
        """Hand ``claim`` from Hainan to the home's handler as the consumer would; its id."""
        env = Envelope(
            message_id=message_id or new_id(), message_type=claim.avro_name, source=HAINAN,
            target=HEBEI, sent_at_ms=now_ms(), reply_to=topic("reply", HAINAN),
            deadline_ms=now_ms() + WEEK_MS,
        )  # fmt: skip
        self._offset += 1
        node = self.system.node
        rec = Record(
            topic("claim", HEBEI), 0, self._offset, now_ms(), claim.person_id.encode(),
            node.codec.encode(claim), env.to_headers(),
        )  # fmt: skip
        async with node.step():
            if node.store.processed(env.message_id) is not None:
                return env.message_id  # a redelivery: the node never hands it on again
            await node._handle(rec, env, claim)
        return env.message_id

    def answers(self) -> list[tuple[str, Message]]:
        """(correlation id, ReviewResult or ErrorReport) of every answer the home queued."""
        node = self.system.node
        out = []
        for _, record in node.store.outbox(10_000):
            if hdr_of(record.headers, H_MESSAGE_TYPE) in (
                ReviewResult.avro_name,
                ErrorReport.avro_name,
            ):
                out.append(
                    (
                        hdr_of(record.headers, H_CORRELATION_ID) or "",
                        node.codec.decode(record.value),
                    )
                )
        return out


def hdr_of(headers: Any, name: str) -> str | None:
    return next((v.decode() for k, v in headers if k == name), None)


def claim_no(n: int, mode: SettlementMode = SettlementMode.DELAYED, **kw: Any) -> ClaimPackage:
    return lao_zhang_claim(mode, claim_id=f"C-{HAINAN}-2017-{n:06d}", **kw)


@pytest.fixture(params=["sqlite", "postgresql"])
def home(request: pytest.FixtureRequest, tmp_path: Path, settings: BusSettings) -> Iterator[Home]:
    """Hebei's home with a desk, its state on each backend (the SQLite file; a fresh
    PostgreSQL database)."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        settings = settings.model_copy(update={"database_url": url})
    made = Home(tmp_path, settings, ReviewDeskSettings())
    made.enrol()
    yield made
    made.system.close()


class TestQueue:
    async def test_a_delayed_claim_waits_until_approved(self, home: Home) -> None:
        """Queued with the rules' proposal and its reservation, nothing answered, the
        obligation stored; approval answers once with the rules' review and commits the
        usage."""
        claim = claim_no(1)
        request_id = await home.deliver(claim)
        assert home.answers() == []
        assert [o.request_id for o in home.system.node.owed()] == [request_id]
        [line] = home.desk.open_reviews()
        assert line.claim_id == claim.claim_id
        assert line.request_id == request_id
        assert line.person == "130102**********34"  # masked
        assert LAO_ZHANG_PERSON_ID not in repr(line)
        assert line.host == HAINAN
        assert line.total_fen == 2_500_000
        assert line.proposal.fund_fen == 1_750_000
        assert line.proposal.decision is ReviewDecision.PARTIAL
        assert line.expected_by <= line.due_at
        file = home.desk.get(claim.claim_id)
        assert sum(i.amount_fen for i in file.items) == claim.total_fen
        assert sum(i.proposed_fen for i in file.items) == 2_307_500  # eligible
        assert {i.item_code: i.reason_code for i in file.items}["D020"] == "SELF_PAY"
        assert file.reserved.fund_used_fen == 1_750_000
        assert home.system.backoffice.year_usage(LAO_ZHANG_PERSON_ID, YEAR) == YearUsage()
        assert home.system.backoffice.review_of(claim.claim_id) is None

        result = await home.desk.approve(claim.claim_id, "reviewer-li")
        assert [(cid, m) for cid, m in home.answers()] == [(request_id, result)]
        assert result.reviewer == "reviewer-li"
        assert {k: getattr(result, k) for k in LAO_ZHANG_REVIEW} == LAO_ZHANG_REVIEW
        check_one_bill(result)
        assert home.system.backoffice.review_of(claim.claim_id) == (request_id, result)
        usage = home.system.backoffice.year_usage(LAO_ZHANG_PERSON_ID, YEAR)
        assert usage.fund_used_fen == 1_750_000
        assert home.desk.reserved(LAO_ZHANG_PERSON_ID, YEAR) == YearUsage()
        assert home.desk.open_reviews() == []
        assert home.desk.get(claim.claim_id).summary.state is ReviewState.DECIDED
        assert home.system.node.owed() == []

    async def test_a_second_decision_is_refused_and_sends_nothing(self, home: Home) -> None:
        claim = claim_no(2)
        await home.deliver(claim)
        first = await home.desk.approve(claim.claim_id, "reviewer-li")
        with pytest.raises(ReviewClosed, match="decided already by reviewer-li"):
            await home.desk.approve(claim.claim_id, "reviewer-wang")
        with pytest.raises(ReviewClosed):
            await home.desk.reject(claim.claim_id, "no", "reviewer-wang")
        assert [m for _, m in home.answers()] == [first]

    async def test_two_reviewers_at_once_answer_once(self, home: Home) -> None:
        claim = claim_no(3)
        await home.deliver(claim)
        outcomes = await asyncio.gather(
            home.desk.approve(claim.claim_id, "reviewer-li"),
            home.desk.reject(claim.claim_id, "duplicate bill", "reviewer-wang"),
            return_exceptions=True,
        )
        assert sum(isinstance(o, ReviewResult) for o in outcomes) == 1
        assert sum(isinstance(o, ReviewClosed) for o in outcomes) == 1
        assert len(home.answers()) == 1

    @pytest.mark.parametrize(
        ("call", "message"),
        [
            (lambda d, c: d.approve("C-460000-NONE", "li"), "no review of claim C-460000-NONE"),
            (lambda d, c: d.approve(c, " "), "the reviewer is empty"),
            (lambda d, c: d.adjust(c, [], "li"), "no item adjusted"),
            (lambda d, c: d.adjust(c, [("X999", 0, "R", "")], "li"), "has no item X999"),
            (lambda d, c: d.adjust(c, [("T018", 1_178_561, "R", "")], "li"), "not within"),
            (lambda d, c: d.adjust(c, [("T018", -1, "R", "")], "li"), "not within"),
            (lambda d, c: d.adjust(c, [("T018", 5, " ", "")], "li"), "reason code is empty"),
            (
                lambda d, c: d.adjust(c, [("T018", 5, "R", ""), ("T018", 6, "R", "")], "li"),
                "adjusted twice",
            ),
            (lambda d, c: d.reject(c, "", "li"), "needs a reason"),
        ],
    )
    async def test_bad_input_changes_nothing(self, home: Home, call: Any, message: str) -> None:
        claim = claim_no(4)
        await home.deliver(claim)
        before = home.desk.get(claim.claim_id)
        with pytest.raises(ValueError, match=message):
            await call(home.desk, claim.claim_id)
        assert home.desk.get(claim.claim_id) == before
        assert home.answers() == []
        assert home.system.backoffice.review_of(claim.claim_id) is None
        assert home.system.backoffice.year_usage(LAO_ZHANG_PERSON_ID, YEAR) == YearUsage()

    async def test_unknown_review_is_a_value_error(self, home: Home) -> None:
        with pytest.raises(UnknownReview):
            home.desk.get("C-460000-NONE")

    async def test_a_crash_inside_the_decision_leaves_nothing(
        self, home: Home, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The review record, usage, queue state and answer are one step: a failure before
        its commit leaves the review open and nothing recorded or sent."""
        claim = claim_no(5)
        await home.deliver(claim)
        node = home.system.node

        async def power_cut(*args: Any, **kw: Any) -> Any:
            raise RuntimeError("power cut")

        monkeypatch.setattr(node, "answer", power_cut)
        with pytest.raises(RuntimeError):
            await home.desk.approve(claim.claim_id, "reviewer-li")
        monkeypatch.undo()
        assert home.desk.get(claim.claim_id).summary.state is ReviewState.OPEN
        assert home.system.backoffice.review_of(claim.claim_id) is None
        assert home.system.backoffice.year_usage(LAO_ZHANG_PERSON_ID, YEAR) == YearUsage()
        assert home.answers() == []
        await home.desk.approve(claim.claim_id, "reviewer-li")
        assert len(home.answers()) == 1

    async def test_the_queue_survives_a_restart(self, home: Home) -> None:
        claim = claim_no(6)
        request_id = await home.deliver(claim)
        home.restart()
        [line] = home.desk.open_reviews()
        assert line.request_id == request_id
        result = await home.desk.approve(claim.claim_id, "reviewer-li")
        assert home.answers() == [(request_id, result)]


class TestDecisions:
    async def test_an_adjustment_pays_the_adjusted_amount(self, home: Home) -> None:
        """The stent approved at 5,785.60 instead of 11,785.60 yuan: eligible −6,000, fund
        −4,800 (80%), PARTIAL with the reviewer's adjustment beside the rules' ones."""
        claim = claim_no(7)
        request_id = await home.deliver(claim)
        mine = ItemAdjustment(
            item_code="T018", approved_fen=578_560, reason_code="OVER_STANDARD", note="限价"
        )
        result = await home.desk.adjust(claim.claim_id, [mine], "reviewer-li")
        assert result.decision is ReviewDecision.PARTIAL
        assert result.eligible_fen == 2_307_500 - 600_000
        assert result.fund_fen == 1_270_000
        assert result.personal_fen == 1_230_000
        assert result.balance_fen == 1_230_000 - 625_000
        check_one_bill(result)
        codes = {a.item_code: a.reason_code for a in result.adjustments}
        assert codes["T018"] == "OVER_STANDARD"
        assert codes["D020"] == "SELF_PAY"
        assert codes["T001"] == "B_SELF_SHARE"
        assert home.answers() == [(request_id, result)]
        usage = home.system.backoffice.year_usage(LAO_ZHANG_PERSON_ID, YEAR)
        assert usage.fund_used_fen == 1_270_000

    async def test_adjust_takes_tuples_and_may_lift_a_rules_cut(self, home: Home) -> None:
        """A reviewer may approve a class B item in full: no adjustment is left for it."""
        claim = claim_no(8)
        await home.deliver(claim)
        result = await home.desk.adjust(
            claim.claim_id, [("T001", 48_000, "CLINICALLY_NEEDED", "全额")], "reviewer-li"
        )
        assert "T001" not in {a.item_code for a in result.adjustments}
        assert result.eligible_fen == 2_307_500 + 4_800  # the 10% self share of 480 yuan
        check_one_bill(result)

    async def test_reject_pays_nothing_and_releases_the_reservation(self, home: Home) -> None:
        claim = claim_no(9)
        request_id = await home.deliver(claim)
        assert home.desk.reserved(LAO_ZHANG_PERSON_ID, YEAR).fund_used_fen == 1_750_000
        result = await home.desk.reject(claim.claim_id, "病历资料不全", "reviewer-li")
        assert result.decision is ReviewDecision.REJECTED
        assert (result.eligible_fen, result.fund_fen, result.critical_illness_fen) == (0, 0, 0)
        assert result.personal_fen == claim.total_fen
        assert result.balance_fen == claim.total_fen - claim.advance_fen
        check_one_bill(result)
        assert {a.item_code for a in result.adjustments} == {i.item_code for i in claim.items}
        assert all(a.approved_fen == 0 for a in result.adjustments)
        assert {a.reason_code for a in result.adjustments} == {REASON_REJECTED}
        assert home.desk.reserved(LAO_ZHANG_PERSON_ID, YEAR) == YearUsage()
        assert home.system.backoffice.year_usage(LAO_ZHANG_PERSON_ID, YEAR) == YearUsage()
        assert home.answers() == [(request_id, result)]


class TestAnsweredAtOnce:
    @pytest.mark.parametrize("mode", [SettlementMode.INSTANT, SettlementMode.POINT_TO_POINT])
    async def test_instant_and_point_to_point_are_not_held(
        self, home: Home, mode: SettlementMode
    ) -> None:
        claim = claim_no(10, mode)
        request_id = await home.deliver(claim)
        [(correlation, answer)] = home.answers()
        assert correlation == request_id
        assert isinstance(answer, ReviewResult)
        assert answer.fund_fen == 1_750_000
        assert home.desk.open_reviews() == []

    async def test_refusals_are_answered_at_once(self, home: Home) -> None:
        """The checks refuse a DELAYED claim at once, as before (here: not filed)."""
        claim = claim_no(11).model_copy(update={"person_id": "130102195001010000"})
        await home.deliver(claim)
        [(_, answer)] = home.answers()
        assert isinstance(answer, ErrorReport)
        assert answer.code is ErrorCode.NOT_FILED
        assert home.desk.open_reviews() == []

    async def test_auto_approve_answers_a_clean_claim_and_holds_the_rest(
        self, tmp_path: Path, settings: BusSettings
    ) -> None:
        """With auto_approve_clean, a claim of class A items only (nothing to adjust) is
        answered at once; Lao Zhang's (class B and self-pay items) still waits."""
        auto = Home(tmp_path, settings, ReviewDeskSettings(auto_approve_clean=True))
        try:
            auto.enrol()
            items = tuple(i for i in lao_zhang_items() if i.catalogue_class is CatalogueClass.A)
            total = sum(i.amount_fen for i in items)
            clean = claim_no(12).model_copy(
                update={"items": items, "total_fen": total, "advance_fen": max_advance_fen(total)}
            )
            request_id = await auto.deliver(clean)
            [(correlation, answer)] = auto.answers()
            assert correlation == request_id
            assert isinstance(answer, ReviewResult)
            assert answer.decision is ReviewDecision.APPROVED
            assert answer.adjustments == ()
            await auto.deliver(claim_no(13))
            assert len(auto.answers()) == 1
            assert [r.claim_id for r in auto.desk.open_reviews()] == [claim_no(13).claim_id]
        finally:
            auto.system.close()


class TestDuplicates:
    async def test_a_resend_while_open_is_silent_and_another_request_is_a_duplicate(
        self, home: Home
    ) -> None:
        claim = claim_no(14)
        request_id = await home.deliver(claim)
        await home.deliver(claim, message_id=request_id)
        assert home.answers() == []
        other = await home.deliver(claim)
        [(correlation, answer)] = home.answers()
        assert correlation == other
        assert isinstance(answer, ErrorReport)
        assert answer.code is ErrorCode.DUPLICATE_CLAIM
        assert "under review" in answer.message
        result = await home.desk.approve(claim.claim_id, "reviewer-li")
        third = await home.deliver(claim)
        answers = home.answers()
        assert answers[1] == (request_id, result)
        assert answers[2][0] == third
        assert isinstance(answers[2][1], ErrorReport)
        assert answers[2][1].code is ErrorCode.DUPLICATE_CLAIM


class TestCapReservations:
    """Lao Zhang with 10,000 yuan of fund room left this year: each of his stays alone
    would take 17,500."""

    ROOM = 1_000_000

    def near_the_cap(self, home: Home) -> None:
        home.system.backoffice.record_review(
            f"C-{HAINAN}-EARLIER", LAO_ZHANG_PERSON_ID, "earlier",
            ReviewResult.model_validate(
                {**review_of_lao_zhang().model_dump(), "claim_id": f"C-{HAINAN}-EARLIER"}
            ),
            YEAR, YearUsage(fund_used_fen=CAP - self.ROOM), host=HAINAN,
        )  # fmt: skip

    async def test_the_second_proposal_sees_the_first_reservation(self, home: Home) -> None:
        self.near_the_cap(home)
        first, second = claim_no(20), claim_no(21)
        await home.deliver(first)
        await home.deliver(second)
        proposals = {r.claim_id: r.proposal.fund_fen for r in home.desk.open_reviews()}
        assert proposals == {first.claim_id: self.ROOM, second.claim_id: 0}
        assert home.desk.reserved(LAO_ZHANG_PERSON_ID, YEAR).fund_used_fen == self.ROOM
        # An instant claim reviewed meanwhile sees the reservation too.
        await home.deliver(claim_no(22, SettlementMode.INSTANT))
        [(_, instant)] = home.answers()
        assert isinstance(instant, ReviewResult)
        assert instant.fund_fen == 0
        # Decided in the other order: the second still gets nothing, the first its room.
        b = await home.desk.approve(second.claim_id, "reviewer-li")
        a = await home.desk.approve(first.claim_id, "reviewer-li")
        assert (a.fund_fen, b.fund_fen) == (self.ROOM, 0)
        usage = home.system.backoffice.year_usage(LAO_ZHANG_PERSON_ID, YEAR)
        assert usage.fund_used_fen == CAP
        for r in (a, b, instant):
            check_one_bill(r)

    async def test_rejecting_the_first_frees_its_room_for_the_second(self, home: Home) -> None:
        self.near_the_cap(home)
        first, second = claim_no(23), claim_no(24)
        await home.deliver(first)
        await home.deliver(second)
        rejected = await home.desk.reject(first.claim_id, "非医保支付范围", "reviewer-li")
        assert home.desk.reserved(LAO_ZHANG_PERSON_ID, YEAR).fund_used_fen == 0
        approved = await home.desk.approve(second.claim_id, "reviewer-li")
        assert (rejected.fund_fen, approved.fund_fen) == (0, self.ROOM)
        assert home.system.backoffice.year_usage(LAO_ZHANG_PERSON_ID, YEAR).fund_used_fen == CAP

    async def test_any_order_of_decisions_stays_within_the_cap(self, home: Home) -> None:
        """Five open stays, decided in a random order with random adjustments and
        rejections: the fund paid never exceeds the room, and committed usage + open
        reservations never exceed the cap."""
        self.near_the_cap(home)
        rng = random.Random(5)
        claims = [claim_no(30 + n) for n in range(5)]
        for c in claims:
            await home.deliver(c)
        rng.shuffle(claims)
        paid = 0
        for c in claims:
            roll = rng.random()
            if roll < 0.3:
                r = await home.desk.reject(c.claim_id, "no", "li")
            elif roll < 0.6:
                r = await home.desk.adjust(c.claim_id, [("T018", 100_000, "R", "")], "li")
            else:
                r = await home.desk.approve(c.claim_id, "li")
            paid += r.fund_fen
            committed = home.system.backoffice.year_usage(LAO_ZHANG_PERSON_ID, YEAR)
            reserved = home.desk.reserved(LAO_ZHANG_PERSON_ID, YEAR)
            assert add_usage(committed, reserved).fund_used_fen <= CAP
        assert paid <= self.ROOM


def review_of_lao_zhang() -> ReviewResult:
    from adapters.fixtures import hebei_policy
    from adapters.rules import review_result

    outcome = review(
        lao_zhang_claim(),
        hebei_policy(),
        YearUsage(),
        insurance_type=InsuranceType.EMPLOYEE,
        assistance_eligible=False,
    )
    return review_result(outcome, "C-X", "auto", now())


class TestRules:
    """The pure re-computation with a reviewer's amounts."""

    def test_no_override_is_the_plain_review(self) -> None:
        from adapters.fixtures import hebei_policy

        kw: Any = {"insurance_type": InsuranceType.EMPLOYEE, "assistance_eligible": True}
        plain = review(lao_zhang_claim(), hebei_policy(), YearUsage(), **kw)
        same = review_adjusted(lao_zhang_claim(), hebei_policy(), YearUsage(), [], **kw)
        assert same == plain
        assert spent(plain) == YearUsage(
            fund_used_fen=plain.fund_fen,
            critical_illness_used_fen=plain.critical_illness_fen,
            assistance_used_fen=plain.assistance_fen,
            copayment_fen=plain.copayment_fen,
        )

    def test_a_code_on_two_lines_is_adjusted_as_one(self) -> None:
        from adapters.fixtures import hebei_policy

        claim = lao_zhang_claim()
        stent = next(i for i in claim.items if i.item_code == "T018")
        items = (*claim.items, stent)
        claim = claim.model_copy(
            update={"items": items, "total_fen": claim.total_fen + stent.amount_fen}
        )
        kw: Any = {"insurance_type": InsuranceType.EMPLOYEE, "assistance_eligible": False}
        cut = ItemAdjustment(
            item_code="T018", approved_fen=stent.amount_fen, reason_code="R", note=""
        )
        r = review_adjusted(claim, hebei_policy(), YearUsage(), [cut], **kw)
        assert r.eligible_fen == 2_307_500  # the second stent line is not paid
        assert [a.item_code for a in r.adjustments].count("T018") == 1
        over = cut.model_copy(update={"approved_fen": 2 * stent.amount_fen + 1})
        with pytest.raises(ValueError, match="not within"):
            review_adjusted(claim, hebei_policy(), YearUsage(), [over], **kw)


class TestSimulatedReviewer:
    async def test_it_works_the_queue_with_the_set_shares(self, home: Home) -> None:
        for n in range(40):
            pid = home.enrol(f"13010219500101{n:03d}9")
            await home.deliver(claim_no(100 + n).model_copy(update={"person_id": pid}))
        assert home.desk.count_open() == 40
        reviewer = SimulatedReviewer(
            home.desk, pace_per_s=1000, adjust_share=0.3, reject_share=0.2,
            rng=random.Random(1), name="sim-1",
        )  # fmt: skip
        await reviewer.drain()
        assert home.desk.count_open() == 0
        d = reviewer.decided
        assert d["approve"] + d["adjust"] + d["reject"] == 40
        assert d["adjust"] > 0
        assert d["reject"] > 0
        assert d["failed"] == 0
        results = [m for _, m in home.answers() if isinstance(m, ReviewResult)]
        assert len(results) == 40
        assert sum(r.decision is ReviewDecision.REJECTED for r in results) == d["reject"]
        for r in results:
            check_one_bill(r)

    async def test_as_a_task_it_decides_what_arrives_and_stops(self, home: Home) -> None:
        reviewer = SimulatedReviewer(
            home.desk, pace_per_s=200, adjust_share=0, reject_share=0, rng=random.Random(2)
        )
        reviewer.start()
        await home.deliver(claim_no(200))
        await eventually(lambda: reviewer.decided["approve"] == 1, 5)
        await reviewer.stop()
        await reviewer.stop()
        await home.deliver(claim_no(201))
        await asyncio.sleep(0.3)
        assert home.desk.count_open() == 1

    def test_shares_are_checked(self, home: Home) -> None:
        with pytest.raises(ValueError, match="exceed 1"):
            SimulatedReviewer(
                home.desk, pace_per_s=1, adjust_share=0.7, reject_share=0.5, rng=random.Random()
            )
        with pytest.raises(ValueError, match="pace_per_s"):
            SimulatedReviewer(
                home.desk, pace_per_s=0, adjust_share=0, reject_share=0, rng=random.Random()
            )


# --- home and host on the embedded broker -------------------------------------------------------
class DeskPair(Pair):
    """Pair whose home holds DELAYED claims for a reviewer."""

    desk_settings = ReviewDeskSettings()

    async def start(self, *codes: str) -> None:
        await create_contract_topics(self.settings, self.broker, list(self.state))
        chosen = codes or tuple(self.state)
        for code in chosen:
            self.systems[code] = ProvinceSystem(
                code, self.settings, bootstrap=self.broker, directory=self.directory,
                state_dir=self.state[code], instant_deadline_s=30.0,
                review_desk=self.desk_settings if code == self.home_code else None,
            )  # fmt: skip
        await asyncio.gather(*(self.systems[c].start() for c in chosen))
        await asyncio.gather(*(self.systems[c].node.wait_ready(60) for c in chosen))

    @property
    def desk(self) -> ReviewDesk:
        desk = self.home.home.desk
        assert desk is not None
        return desk

    async def queued(self, claim: ClaimPackage) -> str:
        """Submit ``claim`` at the host and wait until it waits at the home's desk."""
        request_id = await self.host.host.submit(claim)
        await eventually(lambda: self.desk.request_of(claim.claim_id) == request_id, 20)
        return request_id

    async def results_on_the_wire(self, expect: int) -> list[Any]:
        return await read_topic(
            self.broker, self.settings, topic("reply", self.host_code), expect=expect,
            where=lambda r: hdr(r, H_MESSAGE_TYPE) == ReviewResult.avro_name,
        )  # fmt: skip


@pytest.fixture
async def desk_pair(
    broker: str, settings: BusSettings, tmp_path: Path, province_pool: ProvincePool
) -> AsyncIterator[DeskPair]:
    made = DeskPair(broker, settings, tmp_path, province_pool)
    yield made
    await made.stop()


@pytest.mark.broker
class TestOnTheBus:
    @pytest.mark.timeout(120)
    async def test_nothing_settles_until_approved_then_the_host_settles(
        self, desk_pair: DeskPair
    ) -> None:
        pair = desk_pair
        await pair.start()
        await pair.file_lao_zhang()
        claim = await pair.claim()
        request_id = await pair.queued(claim)
        await asyncio.sleep(1.0)
        waiting = pair.host.backoffice.claim(claim.claim_id)
        assert waiting is not None
        assert waiting.state is ClaimState.ACKNOWLEDGED
        assert await pair.results_on_the_wire(0) == []
        await pair.desk.approve(claim.claim_id, "reviewer-li")
        settled = await pair.settled(claim.claim_id)
        assert settled.review is not None
        assert settled.review.reviewer == "reviewer-li"
        payments = [(k, f) for _, k, f in pair.host.backoffice.payments(claim.claim_id)]
        assert payments == LAO_ZHANG_PAYMENTS
        [sent] = await pair.results_on_the_wire(1)
        assert hdr(sent, H_CORRELATION_ID) == request_id

    @pytest.mark.timeout(120)
    async def test_an_adjustment_changes_the_top_up(self, desk_pair: DeskPair) -> None:
        pair = desk_pair
        await pair.start()
        await pair.file_lao_zhang()
        claim = await pair.claim()
        await pair.queued(claim)
        await pair.desk.adjust(
            claim.claim_id, [("T018", 578_560, "OVER_STANDARD", "限价")], "reviewer-li"
        )
        settled = await pair.settled(claim.claim_id)
        assert settled.review is not None
        assert settled.review.decision is ReviewDecision.PARTIAL
        assert settled.review.fund_fen == 1_270_000
        payments = [(k, f) for _, k, f in pair.host.backoffice.payments(claim.claim_id)]
        assert payments == [("ADVANCE", 625_000), ("TOP_UP", 605_000)]
        await eventually(
            lambda: [n.fund_fen for n in pair.home.backoffice.settlements()] == [1_270_000], 20
        )

    @pytest.mark.timeout(150)
    async def test_decided_after_a_restart_and_twice_is_answered_once(
        self, desk_pair: DeskPair
    ) -> None:
        """The home is killed while the claim waits; the restarted home's desk still has it;
        two decisions at once and a third later make one answer on the wire, one settlement."""
        pair = desk_pair
        await pair.start()
        await pair.file_lao_zhang()
        claim = await pair.claim()
        request_id = await pair.queued(claim)
        await pair.kill(pair.home_code)
        await pair.start(pair.home_code)
        assert [r.request_id for r in pair.desk.open_reviews()] == [request_id]
        outcomes = await asyncio.gather(
            pair.desk.approve(claim.claim_id, "reviewer-li"),
            pair.desk.approve(claim.claim_id, "reviewer-wang"),
            return_exceptions=True,
        )
        assert sorted(type(o).__name__ for o in outcomes) == ["ReviewClosed", "ReviewResult"]
        with pytest.raises(ReviewClosed):
            await pair.desk.reject(claim.claim_id, "too late", "reviewer-zhao")
        await pair.settled(claim.claim_id)
        payments = [(k, f) for _, k, f in pair.host.backoffice.payments(claim.claim_id)]
        assert payments == LAO_ZHANG_PAYMENTS
        # One answer: the restarted home may read the claim again (its offset was not
        # committed before the kill) and re-send the stored answer, same message id.
        sent = await pair.results_on_the_wire(1)
        assert len({hdr(r, H_MESSAGE_ID) for r in sent}) == 1
        assert {hdr(r, H_CORRELATION_ID) for r in sent} == {request_id}

    @pytest.mark.timeout(120)
    async def test_reject_settles_in_full_and_instant_is_answered_at_once(
        self, desk_pair: DeskPair
    ) -> None:
        """A rejected claim: the patient pays the rest of the bill. An INSTANT claim to the
        same home is answered at once, with the desk on."""
        pair = desk_pair
        await pair.start()
        await pair.file_lao_zhang()
        claim = await pair.claim()
        await pair.queued(claim)
        instant = claim.model_copy(
            update={
                "claim_id": f"C-{pair.host_code}-INSTANT1",
                "settlement_mode": SettlementMode.INSTANT,
                "advance_fen": 0,
            }
        )
        answer = await pair.host.node.ask(instant, deadline_s=20)
        assert isinstance(answer.message, ReviewResult)
        assert answer.message.fund_fen == 1_750_000  # 17,500 reserved, 282,500 of room left
        await pair.desk.reject(claim.claim_id, "病历资料不全", "reviewer-li")
        settled = await pair.settled(claim.claim_id)
        assert settled.review is not None
        assert settled.review.decision is ReviewDecision.REJECTED
        payments = [(k, f) for _, k, f in pair.host.backoffice.payments(claim.claim_id)]
        assert payments == [("ADVANCE", 625_000), ("TOP_UP", 1_875_000)]


@pytest.mark.timeout(150)
async def test_acknowledged_at_once_decided_after_both_sides_restarted(
    desk_pair: DeskPair,
) -> None:
    """Issue 13's path end to end: a DELAYED claim is acknowledged before anyone looks at it
    (the host's pending request shows it, with expected_by); the home is killed and
    restarted, the host is killed; the reviewer decides while the host is down; the
    restarted host settles it once, with the one answer."""
    pair = desk_pair
    await pair.start()
    await pair.file_lao_zhang()
    claim = await pair.claim()
    request_id = await pair.queued(claim)

    def acknowledged() -> bool:
        pending = pair.host.node.store.get_pending(request_id)
        return pending is not None and pending.acknowledged_at_ms is not None

    await eventually(acknowledged, 10)
    pending = pair.host.node.store.get_pending(request_id)
    assert pending is not None
    assert pending.ack_state == "ACCEPTED_FOR_REVIEW"
    assert pending.expected_by_ms is not None
    assert pending.expected_by_ms > pending.sent_at_ms
    assert pending.state == "pending"
    await pair.kill(pair.home_code)
    await pair.start(pair.home_code)
    await pair.kill(pair.host_code)
    result = await pair.desk.approve(claim.claim_id, "reviewer-li")
    await pair.start(pair.host_code)
    settled = await pair.settled(claim.claim_id)
    assert settled.review == result
    payments = [(k, f) for _, k, f in pair.host.backoffice.payments(claim.claim_id)]
    assert payments == LAO_ZHANG_PAYMENTS
    sent = await pair.results_on_the_wire(1)
    assert len({hdr(r, H_MESSAGE_ID) for r in sent}) == 1
    assert [r.claim_id for r in pair.home.backoffice.reviews()] == [claim.claim_id]


class TestTwoInstances:
    """Two instances of Hebei (two processes' worth: two pools, two instance names) on one
    PostgreSQL database: the desk is one desk."""

    async def test_a_review_decided_on_one_instance_is_answered_once(
        self, tmp_path: Path, settings: BusSettings, postgres_url: str
    ) -> None:
        shared = settings.model_copy(update={"database_url": postgres_url})
        a = Home(tmp_path / "a", shared, ReviewDeskSettings())
        b = Home(tmp_path / "b", shared, ReviewDeskSettings())
        try:
            a.enrol()
            claim = claim_no(7)
            await a.deliver(claim)
            assert [r.claim_id for r in b.desk.open_reviews()] == [claim.claim_id]
            decided = await b.desk.adjust(claim.claim_id, [("T018", 500_000, "R", "")], "li")
            with pytest.raises(ReviewClosed, match="decided already by li"):
                await a.desk.approve(claim.claim_id, "wang")
            assert a.desk.open_reviews() == []
            # One answer in the shared outbox, owned by the instance that decided.
            assert [m for _, m in b.answers()] == [decided]
            assert a.answers() == []
            usage = a.system.backoffice.year_usage(LAO_ZHANG_PERSON_ID, YEAR)
            assert usage.fund_used_fen == decided.fund_fen
        finally:
            a.system.close()
            b.system.close()
