"""Reversal of a settled claim (冲正, contract v1.3), between a host and a home on the real
embedded broker: the home confirms or refuses, the year's cap comes back, the patient's money
goes back, each side records it once, and a reversal is answered once per reversal id."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.backoffice import ClaimEventKind, ClaimState
from adapters.fixtures import LAO_ZHANG_PERSON_ID
from adapters.host import ClaimActionRefused
from adapters.rules import ReversalRefusal, YearUsage
from bus.models import (
    ReversalDecision,
    ReversalReason,
    ReversalRequest,
    ReversalResult,
    ReviewResult,
    now,
)
from bus.settings import BusSettings
from tests.conftest import ProvincePool
from tests.helpers import eventually
from tests.test_crash_safety import Pair
from tests.test_review_desk import review_of_lao_zhang

pytestmark = pytest.mark.broker

CAP = 30_000_000
"""Annual fund cap of a Hebei employee (300,000 yuan)."""
LAO_ZHANG_FUND = 1_750_000
"""What the fund pays of Lao Zhang's stay (17,500 yuan)."""


@pytest.fixture(name="pair")
async def two_provinces(
    broker: str, settings: BusSettings, tmp_path: Path, province_pool: ProvincePool
) -> AsyncIterator[Pair]:
    """A host and a home on the module's broker (tests/test_crash_safety.py's ``Pair``)."""
    made = Pair(broker, settings, tmp_path, province_pool)
    yield made
    await made.stop()


async def settled_claim(pair: Pair) -> str:
    claim = await pair.claim()
    await pair.host.host.submit(claim)
    await pair.settled(claim.claim_id)
    return claim.claim_id


async def reversed_or_refused(pair: Pair, claim_id: str) -> str:
    def answered() -> bool:
        c = pair.host.backoffice.claim(claim_id)
        return c is not None and c.reversal_state not in (None, "REQUESTED")

    await eventually(answered, 30)
    c = pair.host.backoffice.claim(claim_id)
    assert c is not None
    assert c.reversal_state is not None
    return c.reversal_state


def ask(pair: Pair, of: str, reversal_id: str, **changes: Any) -> ReversalRequest:
    """A ReversalRequest of claim ``of`` as the host would send it, with ``changes``."""
    c = pair.host.backoffice.claim(of)
    assert c is not None
    assert c.review is not None
    request = ReversalRequest(
        reversal_id=reversal_id, claim_id=of,
        claim_request_id=c.reviewed_request_id or "", person_id=c.claim.person_id,
        home_region=c.claim.home_region, host_region=c.claim.host_region,
        reason=ReversalReason.DUPLICATE_BILL, fund_fen=c.review.fund_fen,
        critical_illness_fen=c.review.critical_illness_fen,
        assistance_fen=c.review.assistance_fen, personal_paid_fen=c.review.personal_fen,
        requested_at=now(),
    )  # fmt: skip
    return request.model_copy(update=changes)


class TestReversal:
    async def test_a_reversal_gives_the_cap_back_so_the_next_claim_gets_the_money(
        self, pair: Pair
    ) -> None:
        await pair.start()
        await pair.file_lao_zhang()
        year = 2026
        # Lao Zhang has room for exactly one of his stays this year.
        pair.home.backoffice.record_review(
            "C-EARLIER", LAO_ZHANG_PERSON_ID, "earlier",
            ReviewResult.model_validate({**review_of_lao_zhang().model_dump(),
                                         "claim_id": "C-EARLIER"}),
            year, YearUsage(fund_used_fen=CAP - LAO_ZHANG_FUND), host=pair.host_code,
        )  # fmt: skip
        first = await settled_claim(pair)
        settled = pair.host.backoffice.claim(first)
        assert settled is not None
        assert settled.review is not None
        assert settled.review.fund_fen == LAO_ZHANG_FUND
        assert pair.home.backoffice.year_usage(LAO_ZHANG_PERSON_ID, year).fund_used_fen == CAP

        rid = await pair.host.host.reverse_claim(
            first, ReversalReason.DUPLICATE_BILL, "billed twice", "billing-office"
        )
        assert await reversed_or_refused(pair, first) == "CONFIRMED"
        after = pair.host.backoffice.claim(first)
        assert after is not None
        assert after.state is ClaimState.REVERSED
        paid = settled.advance_collected_fen + max(settled.balance_fen, 0)
        payments = pair.host.backoffice.payments(first)
        assert payments[-1] == (first, "REVERSAL_REFUND", paid)  # (his balance was a top-up)
        sign = {"ADVANCE": 1, "TOP_UP": 1, "REFUND": -1, "REVERSAL_REFUND": -1,
                "REVERSAL_RECOVERY": 1}  # fmt: skip
        assert sum(sign[kind] * fen for _, kind, fen in payments) == 0
        status = pair.host.host.claim_status(first)
        assert status is not None
        assert status.patient_paid_fen == 0  # everything he paid for the void bill came back
        assert status.reversal_refund_fen == paid
        kinds = [e.kind for e in status.timeline]
        assert kinds[-2:] == [ClaimEventKind.REVERSAL_REQUESTED, ClaimEventKind.REVERSED]
        confirmed = pair.home.backoffice.confirmed_reversal_of(first)
        assert confirmed is not None
        assert confirmed.reversal_id == rid
        assert confirmed.fund_restored_fen == LAO_ZHANG_FUND
        usage = pair.home.backoffice.year_usage(LAO_ZHANG_PERSON_ID, year)
        assert usage.fund_used_fen == CAP - LAO_ZHANG_FUND

        second = await settled_claim(pair)  # the same stay billed right
        again = pair.host.backoffice.claim(second)
        assert again is not None
        assert again.review is not None
        assert again.review.fund_fen == LAO_ZHANG_FUND  # without the reversal: 0, at the cap

    async def test_a_reversal_is_answered_once_and_never_twice_for_a_claim(
        self, pair: Pair
    ) -> None:
        await pair.start()
        await pair.file_lao_zhang()
        claim_id = await settled_claim(pair)
        rid = await pair.host.host.reverse_claim(
            claim_id, "WRONG_PATIENT", "", "billing-office", reversal_id=f"V-{pair.host_code}-1"
        )
        assert await reversed_or_refused(pair, claim_id) == "CONFIRMED"
        node = pair.host.node
        # The same reversal id under a new message: the same answer, nothing restored twice.
        same = await node.ask(ask(pair, claim_id, rid), deadline_s=20)
        assert isinstance(same.message, ReversalResult)
        assert same.message.decision is ReversalDecision.CONFIRMED
        assert same.message == pair.home.backoffice.reversal(rid)
        # Another reversal of the cancelled claim: a reversal of a reversal, refused.
        other = await node.ask(ask(pair, claim_id, f"V-{pair.host_code}-2"), deadline_s=20)
        assert isinstance(other.message, ReversalResult)
        assert other.message.decision is ReversalDecision.REFUSED
        assert other.message.refusal_code == ReversalRefusal.ALREADY_REVERSED.value
        # The host refuses to ask again for a claim that is no longer settled.
        with pytest.raises(ClaimActionRefused, match="reversal"):
            await pair.host.host.reverse_claim(claim_id, "WRONG_PATIENT", "", "ops")

    async def test_refusals_change_nothing(self, pair: Pair) -> None:
        await pair.start()
        await pair.file_lao_zhang()
        claim_id = await settled_claim(pair)
        node = pair.host.node
        usage = pair.home.backoffice.year_usage(LAO_ZHANG_PERSON_ID, 2026)
        cases: dict[ReversalRefusal, dict[str, Any]] = {
            ReversalRefusal.AMOUNT_MISMATCH: {"fund_fen": 1},
            ReversalRefusal.WRONG_REQUEST: {"claim_request_id": "another-request"},
            ReversalRefusal.NOT_REVIEWED: {"claim_id": f"C-{pair.host_code}-NEVER"},
            ReversalRefusal.WINDOW_CLOSED: {"requested_at": now() + dt.timedelta(days=31)},
        }
        for n, (code, change) in enumerate(cases.items()):  # change: dict[str, Any]
            answer = await node.ask(
                ask(pair, claim_id, f"V-{pair.host_code}-R{n}", **change), deadline_s=20
            )
            assert isinstance(answer.message, ReversalResult), code
            assert answer.message.decision is ReversalDecision.REFUSED
            assert answer.message.refusal_code == code.value
        assert pair.home.backoffice.year_usage(LAO_ZHANG_PERSON_ID, 2026) == usage
        assert pair.home.backoffice.confirmed_reversal_of(claim_id) is None
        # A refusal through the host: the settlement stands and an operator may ask again.
        claim = pair.host.backoffice.claim(claim_id)
        assert claim is not None
        assert claim.review is not None
        late = dataclasses.replace(claim, reviewed_request_id="not-the-reviewed-one")
        pair.host.backoffice.save_claim(late)
        await pair.host.host.reverse_claim(claim_id, "DUPLICATE_BILL", "", "ops")
        assert await reversed_or_refused(pair, claim_id) == "REFUSED:WRONG_REQUEST"
        stands = pair.host.backoffice.claim(claim_id)
        assert stands is not None
        assert stands.state is ClaimState.SETTLED

    async def test_the_host_checks_before_asking(self, pair: Pair) -> None:
        await pair.start()
        await pair.file_lao_zhang()
        claim = await pair.claim()
        await pair.host.host.submit(claim)
        with pytest.raises(ClaimActionRefused, match="reason 'UNKNOWN'"):
            await pair.host.host.reverse_claim(claim.claim_id, "UNKNOWN", "", "ops")
        with pytest.raises(ClaimActionRefused, match="operator"):
            await pair.host.host.reverse_claim(claim.claim_id, "OTHER", "", " ")
        with pytest.raises(ClaimActionRefused, match="no claim"):
            await pair.host.host.reverse_claim("C-nope", "OTHER", "", "ops")
        await pair.settled(claim.claim_id)
        old = pair.host.backoffice.claim(claim.claim_id)
        assert old is not None
        assert old.review is not None
        long_ago = old.review.reviewed_at - dt.timedelta(days=31)
        pair.host.backoffice.save_claim(
            dataclasses.replace(old, review=old.review.model_copy(update={"reviewed_at": long_ago}))
        )
        with pytest.raises(ClaimActionRefused, match="past the reversal window"):
            await pair.host.host.reverse_claim(claim.claim_id, "OTHER", "", "ops")
