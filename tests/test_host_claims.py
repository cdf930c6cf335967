"""The host's claim state machine on the real embedded broker: submitted → acknowledged →
settled, overdue and escalated, re-sent, closed by an operator, fallen back; every transition
on the claim's timeline, in the step that made it, surviving restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog.testing

from adapters.backoffice import ClaimEventKind, ClaimState, CloseDecision, HostClaim
from adapters.fixtures import LAO_ZHANG_PERSON_ID
from adapters.host import ClaimActionRefused, ClaimStatus
from adapters.province import ProvinceSystem
from bus.broker import create_contract_topics
from bus.envelope import now_ms
from bus.errors import Rejection
from bus.models import ClaimPackage, ErrorCode, Message, ReviewResult, SettlementMode
from bus.node import Context, Deferred
from bus.settings import BusSettings
from simulators.cli import build_parser
from tests.conftest import ProvincePool
from tests.helpers import eventually
from tests.test_crash_safety import LAO_ZHANG_PAYMENTS, Pair

pytestmark = pytest.mark.broker

K = ClaimEventKind
DAY_MS = 86_400_000


class ClaimPair(Pair):
    """:class:`Pair` with the host's deadlines chosen by the test."""

    instant_deadline_s = 30.0
    delayed_deadline_s = 7 * 24 * 3600.0

    async def start(self, *codes: str) -> None:
        await create_contract_topics(self.settings, self.broker, list(self.state))
        chosen = codes or tuple(self.state)
        for code in chosen:
            self.systems[code] = ProvinceSystem(
                code, self.settings, bootstrap=self.broker, directory=self.directory,
                state_dir=self.state[code], instant_deadline_s=self.instant_deadline_s,
                delayed_deadline_s=self.delayed_deadline_s,
            )  # fmt: skip
        await asyncio.gather(*(self.systems[c].start() for c in chosen))
        await asyncio.gather(*(self.systems[c].node.wait_ready(60) for c in chosen))

    async def halt(self, code: str) -> None:
        """A clean stop of one province (its state folder stays)."""
        system = self.systems.pop(code)
        await system.stop()
        system.close()

    def status(self, claim_id: str) -> ClaimStatus:
        found = self.host.host.claim_status(claim_id)
        assert found is not None
        return found

    def state_of(self, claim_id: str) -> ClaimState | None:
        c = self.host.backoffice.claim(claim_id)
        return c.state if c is not None else None

    async def reaches(self, claim_id: str, state: ClaimState, timeout_s: float = 20) -> None:
        await eventually(lambda: self.state_of(claim_id) is state, timeout_s)

    def kinds(self, claim_id: str) -> list[ClaimEventKind]:
        return [e.kind for e in self.status(claim_id).timeline]

    def payments(self, claim_id: str) -> list[tuple[str, int]]:
        return [(k, f) for _, k, f in self.host.backoffice.payments(claim_id)]

    def notices_at_home(self, claim_id: str) -> int:
        return sum(1 for n in self.home.backoffice.settlements() if n.claim_id == claim_id)


@pytest.fixture
async def pair(
    broker: str, settings: BusSettings, tmp_path: Path, province_pool: ProvincePool
) -> AsyncIterator[ClaimPair]:
    made = ClaimPair(broker, settings, tmp_path, province_pool)
    yield made
    await made.stop()


class HeldAtHome:
    """Replaces the home's ClaimPackage handler: each claim is acknowledged and held for a
    reviewer (as the home's review desk does), a second request for a held claim is answered
    DUPLICATE_CLAIM (as the home does), and :meth:`review` answers a held request later with
    the home's own checks and rules (so the home records the review, and accepts the notice)."""

    def __init__(self, pair: ClaimPair, expected_by_ms: int) -> None:
        self.pair = pair
        self.expected_by_ms = expected_by_ms
        self.held: dict[str, tuple[ClaimPackage, Context]] = {}
        pair.home.node.on(ClaimPackage)(self)

    async def __call__(self, message: Message, ctx: Context) -> Deferred:
        assert isinstance(message, ClaimPackage)
        earlier = next(
            (rid for rid, (m, _) in self.held.items() if m.claim_id == message.claim_id), None
        )
        if earlier is not None and earlier != ctx.envelope.message_id:
            raise Rejection(
                ErrorCode.DUPLICATE_CLAIM,
                f"claim {message.claim_id} is already under review (request {earlier})",
                details={"responsible": ctx.envelope.source},
            )
        self.held[ctx.envelope.message_id] = (message, ctx)
        return Deferred(note="queued for a reviewer", expected_by_ms=self.expected_by_ms)

    async def review(self, request_id: str) -> ReviewResult:
        home = self.pair.home
        message, ctx = self.held[request_id]
        async with home.node.step():
            result = await home.home._on_claim(message, ctx)
            assert isinstance(result, ReviewResult)
            await home.node.answer(request_id, result)
        return result


async def submitted(pair: ClaimPair, **changes: object) -> tuple[ClaimPackage, str]:
    """Lao Zhang's stay packaged (with ``changes``) and submitted at the host."""
    claim = await pair.claim()
    if changes:
        claim = claim.model_copy(update=changes)
    return claim, await pair.host.host.submit(claim)


class TestAcknowledged:
    @pytest.mark.timeout(120)
    async def test_deferred_claim_is_acknowledged_survives_a_restart_then_settles(
        self, pair: ClaimPair
    ) -> None:
        """The desk sees "acknowledged, expected by E" within a second; a host restart keeps
        it; the answer settles it; the timeline tells the story; a settled claim cannot be
        closed."""
        await pair.start()
        await pair.file_lao_zhang()
        expected = now_ms() + 14 * DAY_MS
        held = HeldAtHome(pair, expected)
        began = now_ms()
        claim, request_id = await submitted(pair)
        cid = claim.claim_id
        await pair.reaches(cid, ClaimState.ACKNOWLEDGED, 10)
        status = pair.status(cid)
        assert status.acknowledged_at_ms is not None
        assert status.acknowledged_at_ms - began < 1_000
        assert status.expected_by_ms == expected
        assert status.deadline_ms is not None
        assert status.deadline_ms > now_ms() + 6 * DAY_MS
        assert status.advance_fen == 625_000
        with pytest.raises(ClaimActionRefused, match="ACKNOWLEDGED"):
            await pair.host.host.close_claim(cid, CloseDecision.KEEP_ADVANCE, "why", "ops-li")

        await pair.halt(pair.host_code)
        await pair.start(pair.host_code)
        status = pair.status(cid)
        assert status.state is ClaimState.ACKNOWLEDGED
        assert status.expected_by_ms == expected
        assert [e.kind for e in status.timeline] == [K.SUBMITTED, K.ACKNOWLEDGED]
        assert "expected by" in status.timeline[1].detail

        await held.review(request_id)
        await pair.settled(cid)
        status = pair.status(cid)
        assert [e.kind for e in status.timeline] == [
            K.SUBMITTED, K.ACKNOWLEDGED, K.REVIEWED, K.SETTLED,
        ]  # fmt: skip
        assert [e.seq for e in status.timeline] == [1, 2, 3, 4]
        assert [e.state for e in status.timeline[2:]] == [ClaimState.SETTLED] * 2
        assert status.timeline[3].data["payment"] == "TOP_UP"
        assert "top-up 1,250.00 yuan" in status.timeline[3].detail
        assert (status.top_up_fen, status.refund_fen, status.patient_paid_fen) == (
            125_000, 0, 750_000,
        )  # fmt: skip
        assert pair.payments(cid) == LAO_ZHANG_PAYMENTS
        await eventually(lambda: pair.notices_at_home(cid) == 1)
        with pytest.raises(ClaimActionRefused, match="already SETTLED"):
            await pair.host.host.close_claim(cid, CloseDecision.REFUND_ADVANCE, "why", "ops-li")
        with pytest.raises(ClaimActionRefused, match="already SETTLED"):
            await pair.host.host.resend_claim(cid)
        assert pair.payments(cid) == LAO_ZHANG_PAYMENTS

    @pytest.mark.timeout(120)
    async def test_a_resend_in_flight_keeps_the_request_id(self, pair: ClaimPair) -> None:
        """An operator's re-send of a claim still waiting within its deadline is the same
        request again (attempt 2): the home, idempotent by message id, acknowledges it again
        and holds it once; the timeline records the re-send, not a second acknowledgement."""
        await pair.start()
        await pair.file_lao_zhang()
        held = HeldAtHome(pair, now_ms() + DAY_MS)
        claim, request_id = await submitted(pair)
        cid = claim.claim_id
        await pair.reaches(cid, ClaimState.ACKNOWLEDGED, 10)
        acks = pair.host.node.metrics.get("xsettle_acknowledgements_total", outcome="ok")
        assert await pair.host.host.resend_claim(cid, operator="ops-li") == request_id
        await eventually(
            lambda: (
                pair.host.node.metrics.get("xsettle_acknowledgements_total", outcome="ok")
                == acks + 1
            )
        )
        status = pair.status(cid)
        assert status.state is ClaimState.ACKNOWLEDGED
        assert status.requests == (request_id,)
        assert [e.kind for e in status.timeline] == [K.SUBMITTED, K.ACKNOWLEDGED, K.RESENT]
        assert status.timeline[-1].data["attempt"] == 2
        assert list(held.held) == [request_id]
        pending = pair.host.node.store.get_pending(request_id)
        assert pending is not None
        assert pending.attempt == 2


class TestOverdue:
    @pytest.mark.timeout(120)
    async def test_a_lost_claim_goes_overdue_is_escalated_and_a_resend_settles_it(
        self, pair: ClaimPair
    ) -> None:
        """The claim never reaches the home: past its deadline it is overdue (event, warning,
        metric, gauge); the operator's re-send goes as a new request, which the home reviews."""
        pair.delayed_deadline_s = 2.0
        await pair.start()
        await pair.file_lao_zhang()
        host = pair.host
        relay = host.node._relay
        real = relay.dispatch
        relay.dispatch = lambda rows: real(  # type: ignore[method-assign]
            [(i, r) for i, r in rows if not r.topic.startswith("xsettle.claim.")]
        )  # the claim record is lost on its way (the rest goes out)
        with structlog.testing.capture_logs() as logs:
            claim, first = await submitted(pair)
            cid = claim.claim_id
            await pair.reaches(cid, ClaimState.OVERDUE)
        relay.dispatch = real  # type: ignore[method-assign]
        assert pair.kinds(cid) == [K.SUBMITTED, K.OVERDUE]
        overdue = [e for e in logs if e["event"] == "claim_overdue"]
        assert len(overdue) == 1
        assert overdue[0]["log_level"] == "warning"
        assert LAO_ZHANG_PERSON_ID not in repr(logs)
        assert host.node.metrics.get("xsettle_claims_overdue_total", mode="DELAYED") == 1
        gauges = host.node.metrics.snapshot()["gauges"]
        assert isinstance(gauges, dict)
        assert gauges["xsettle_claims_overdue"] == 1.0
        status = pair.status(cid)
        assert status.overdue_since_ms is not None
        assert status.deadline_ms is None

        host.host.delayed_deadline_s = 60.0
        again = await host.host.resend_claim(cid, operator="ops-li")
        assert again != first
        status = pair.status(cid)
        assert status.requests == (first, again)
        assert status.timeline[-1].kind is K.RESENT
        assert status.timeline[-1].data["expired_request_id"] == first
        await pair.settled(cid)
        assert pair.kinds(cid) == [K.SUBMITTED, K.OVERDUE, K.RESENT, K.REVIEWED, K.SETTLED]
        assert pair.payments(cid) == LAO_ZHANG_PAYMENTS
        await eventually(lambda: pair.notices_at_home(cid) == 1)
        assert host.backoffice.claim_by_request(again) == host.backoffice.claim(cid)

    @pytest.mark.timeout(120)
    async def test_a_resend_of_a_claim_the_home_has_waits_for_the_first_answer(
        self, pair: ClaimPair
    ) -> None:
        """The home held the claim past the deadline: the re-send is answered DUPLICATE_CLAIM,
        which is no refusal (the claim stays overdue), and the home's late answer to the first
        request settles the overdue claim once."""
        pair.delayed_deadline_s = 2.0
        await pair.start()
        await pair.file_lao_zhang()
        held = HeldAtHome(pair, now_ms() + DAY_MS)
        claim, first = await submitted(pair)
        cid = claim.claim_id
        await pair.reaches(cid, ClaimState.ACKNOWLEDGED, 10)
        await pair.reaches(cid, ClaimState.OVERDUE)
        pair.host.host.delayed_deadline_s = 60.0
        again = await pair.host.host.resend_claim(cid)
        await eventually(lambda: K.ALREADY_AT_HOME in pair.kinds(cid))
        status = pair.status(cid)
        assert status.state is ClaimState.OVERDUE
        assert status.error_code is None
        assert status.timeline[-1].data["request_id"] == again
        assert pair.payments(cid) == [("ADVANCE", 625_000)]

        await held.review(first)
        await pair.settled(cid)
        assert pair.kinds(cid) == [
            K.SUBMITTED, K.ACKNOWLEDGED, K.OVERDUE, K.RESENT, K.ALREADY_AT_HOME, K.REVIEWED,
            K.SETTLED,
        ]  # fmt: skip
        assert "(late)" in pair.status(cid).timeline[-2].detail
        assert pair.payments(cid) == LAO_ZHANG_PAYMENTS
        await eventually(lambda: pair.notices_at_home(cid) == 1)

    @pytest.mark.timeout(120)
    async def test_a_resend_after_the_home_was_down_settles_once(self, pair: ClaimPair) -> None:
        """The home was down past the deadline and has the first request waiting: it reviews
        that one (a late answer settles the claim) and answers the re-send DUPLICATE_CLAIM,
        which changes nothing."""
        pair.delayed_deadline_s = 2.0
        await pair.start()
        await pair.file_lao_zhang()
        await pair.halt(pair.home_code)
        claim, _ = await submitted(pair)
        cid = claim.claim_id
        await pair.reaches(cid, ClaimState.OVERDUE)
        pair.host.host.delayed_deadline_s = 60.0
        await pair.host.host.resend_claim(cid)
        await pair.start(pair.home_code)
        await pair.settled(cid)
        # The review (reply topic) and the DUPLICATE_CLAIM (error topic) come in either
        # order: before the review the duplicate only notes that the home has the claim,
        # after it the duplicate is ignored.
        duplicate = {K.ALREADY_AT_HOME, K.ANSWER_IGNORED}
        await eventually(lambda: bool(duplicate & set(pair.kinds(cid))))
        events = pair.status(cid).timeline
        noted = [e for e in events if e.kind in duplicate]
        assert len(noted) == 1
        assert "DUPLICATE_CLAIM" in noted[0].detail
        assert [e.kind for e in events if e.kind not in duplicate] == [
            K.SUBMITTED, K.OVERDUE, K.RESENT, K.REVIEWED, K.SETTLED,
        ]  # fmt: skip
        assert pair.payments(cid) == LAO_ZHANG_PAYMENTS
        await eventually(lambda: pair.notices_at_home(cid) == 1)
        assert sum(1 for r in pair.home.backoffice.reviews() if r.claim_id == cid) == 1


class TestClosedByOperator:
    @pytest.mark.timeout(120)
    async def test_overdue_claims_closed_with_each_decision_money_consistent(
        self, pair: ClaimPair, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """REFUND_ADVANCE refunds the advance, KEEP_ADVANCE moves nothing; both are terminal,
        tell the home nothing, refuse a second action; a review that still comes is recorded
        and ignored. ``ops claims`` shows them."""
        pair.delayed_deadline_s = 2.0
        await pair.start()
        await pair.file_lao_zhang()
        held = HeldAtHome(pair, now_ms() + DAY_MS)
        refunded, first = await submitted(pair)
        kept, _ = await submitted(pair)
        for c in (refunded, kept):
            await pair.reaches(c.claim_id, ClaimState.OVERDUE)
        host = pair.host.host
        with pytest.raises(ClaimActionRefused, match="expected one of"):
            await host.close_claim(refunded.claim_id, "PAY_NOTHING", "why", "ops-li")
        with pytest.raises(ClaimActionRefused, match="reason"):
            await host.close_claim(refunded.claim_id, CloseDecision.REFUND_ADVANCE, " ", "ops-li")

        closed = await host.close_claim(
            refunded.claim_id, CloseDecision.REFUND_ADVANCE, "home unreachable for 3 weeks",
            "ops-li",
        )  # fmt: skip
        assert isinstance(closed, HostClaim)
        status = pair.status(refunded.claim_id)
        assert status.state is ClaimState.CLOSED_BY_OPERATOR
        assert (status.close_decision, status.closed_by) == (
            CloseDecision.REFUND_ADVANCE, "ops-li",
        )  # fmt: skip
        assert status.close_reason == "home unreachable for 3 weeks"
        assert (status.advance_fen, status.refund_fen, status.patient_paid_fen) == (
            625_000, 625_000, 0,
        )  # fmt: skip
        assert pair.payments(refunded.claim_id) == [("ADVANCE", 625_000), ("REFUND", 625_000)]
        assert status.timeline[-1].kind is K.CLOSED_BY_OPERATOR
        assert status.timeline[-1].data["decision"] == "REFUND_ADVANCE"

        await host.close_claim(kept.claim_id, "KEEP_ADVANCE", "patient agreed", "ops-wang")
        status = pair.status(kept.claim_id)
        assert status.state is ClaimState.CLOSED_BY_OPERATOR
        assert (status.refund_fen, status.patient_paid_fen) == (0, 625_000)
        assert pair.payments(kept.claim_id) == [("ADVANCE", 625_000)]
        metrics = pair.host.node.metrics
        assert metrics.total("xsettle_claims_closed_by_operator_total") == 2

        for action in (
            host.close_claim(kept.claim_id, CloseDecision.REFUND_ADVANCE, "again", "ops-li"),
            host.resend_claim(kept.claim_id),
        ):
            with pytest.raises(ClaimActionRefused, match="already CLOSED_BY_OPERATOR"):
                await action
        assert pair.payments(kept.claim_id) == [("ADVANCE", 625_000)]

        with structlog.testing.capture_logs() as logs:
            await held.review(first)
            await eventually(lambda: K.ANSWER_IGNORED in pair.kinds(refunded.claim_id))
        assert any(e["event"] == "review_after_operator_close" for e in logs)
        assert pair.state_of(refunded.claim_id) is ClaimState.CLOSED_BY_OPERATOR
        assert pair.payments(refunded.claim_id) == [("ADVANCE", 625_000), ("REFUND", 625_000)]
        await asyncio.sleep(1.0)
        assert pair.notices_at_home(refunded.claim_id) == 0

        parser = build_parser()

        async def ops(*argv: str) -> tuple[int, str]:
            args = parser.parse_args(["ops", "claims", "--state-dir",
                                      str(pair.state[pair.host_code]), "--province",
                                      pair.host_code, *argv])  # fmt: skip
            code: int = await args.run(args)
            lines = capsys.readouterr().out.splitlines()  # less the nodes' log lines
            return code, "\n".join(line for line in lines if not line[:4].isdigit())

        code, out = await ops()
        assert code == 0
        assert "CLOSED_BY_OPERATOR 2" in out
        assert refunded.claim_id in out
        assert kept.claim_id in out
        code, out = await ops("--state", "OVERDUE")
        assert (code, out.strip()) == (0, "no claims in state OVERDUE")
        code, out = await ops("--open")
        assert (code, out.strip()) == (0, "no claims open")
        code, out = await ops("--claim", refunded.claim_id)
        assert code == 0
        for text in ("submitted", "acknowledged", "overdue", "closed_by_operator",
                     "answer_ignored", "REFUND 6,250.00"):  # fmt: skip
            assert text in out
        assert LAO_ZHANG_PERSON_ID not in out
        code, _ = await ops("--claim", "C-nope")
        assert code == 1


class TestFallback:
    @pytest.mark.timeout(120)
    async def test_instant_claim_falls_back_is_escalated_and_the_late_review_settles_it(
        self, pair: ClaimPair
    ) -> None:
        """An INSTANT claim acknowledged but not reviewed in time falls back to delayed (the
        advance collected, the acknowledgement kept); left too long it is escalated as
        overdue; the late review settles it."""
        pair.instant_deadline_s = 1.5
        await pair.start()
        await pair.file_lao_zhang()
        expected = now_ms() + DAY_MS
        held = HeldAtHome(pair, expected)
        claim, request_id = await submitted(
            pair, settlement_mode=SettlementMode.INSTANT, advance_fen=0
        )
        cid = claim.claim_id
        await pair.reaches(cid, ClaimState.FALLBACK)
        status = pair.status(cid)
        assert status.advance_fen == 625_000
        assert status.expected_by_ms == expected
        assert pair.kinds(cid) == [K.SUBMITTED, K.ACKNOWLEDGED, K.FELL_BACK]
        assert pair.payments(cid) == [("ADVANCE", 625_000)]

        assert await pair.host.host.escalate_fallbacks() == []  # not yet a delayed deadline
        assert await pair.host.host.escalate_fallbacks(older_than_s=0) == [cid]
        assert pair.state_of(cid) is ClaimState.OVERDUE
        metrics = pair.host.node.metrics
        assert metrics.get("xsettle_claims_overdue_total", mode="INSTANT") == 1

        await held.review(request_id)
        await pair.settled(cid)
        assert pair.kinds(cid) == [
            K.SUBMITTED, K.ACKNOWLEDGED, K.FELL_BACK, K.OVERDUE, K.REVIEWED, K.SETTLED,
        ]  # fmt: skip
        assert pair.payments(cid) == LAO_ZHANG_PAYMENTS
        await eventually(lambda: pair.notices_at_home(cid) == 1)
