"""The simulators' desks (``simulators/desks.py``) on a real gateway pair, Hebei home with its
review desk and Hainan host: Lao Zhang filed at the agency counter, admitted and discharged at
the hospital desk, his claim decided by a simulated reviewer over HTTP and settled; and the
hospital desk's journal that lets a restarted simulation resume."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from adapters.backoffice import Person
from adapters.fixtures import (
    LAO_ZHANG_HOME_REGION,
    LAO_ZHANG_HOSPITAL,
    LAO_ZHANG_PERSON_ID,
    lao_zhang_items,
)
from adapters.gateway.service import Gateway
from adapters.gateway.testing import gateway_config, running_gateway
from bus.broker import create_contract_topics
from bus.models import (
    FilingAction,
    FilingChannel,
    FilingReason,
    FilingUpload,
    InsuranceType,
    ItemAdjustment,
    VisitType,
)
from bus.settings import BusSettings
from simulators.demo import DeskJournal
from simulators.desks import Admitted, DeskError, GatewayDesks, Refused
from simulators.reviewers import SimulatedReviewer

pytestmark = pytest.mark.broker

CST = dt.timezone(dt.timedelta(hours=8))
ADMITTED = dt.datetime(2026, 5, 8, 9, 30, tzinfo=CST)
DISCHARGED = dt.datetime(2026, 5, 23, 10, 0, tzinfo=CST)
LAO_ZHANG = Person(LAO_ZHANG_PERSON_ID, "张建国", InsuranceType.EMPLOYEE, LAO_ZHANG_HOME_REGION)
CONNECTIONS = {"agency": 2, "hospital": 2, "reviewer": 2}


def filing_of(person: Person, filing_id: str) -> FilingUpload:
    """A filing of ``person`` to Hainan, as the counter takes it."""
    return FilingUpload(
        filing_id=filing_id,
        action=FilingAction.CREATE,
        person_id=person.person_id,
        person_name=person.name,
        insurance_type=person.insurance_type,
        home_region=person.home_region,
        host_region="460000",
        reason=FilingReason.RELOCATED_RETIREE,
        channel=FilingChannel.COUNTER,
        valid_from=dt.date(2026, 1, 1),
        filed_at=dt.datetime(2026, 1, 2, 9, 0, tzinfo=CST),
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 20) -> None:
    """Until ``check()`` holds, or fail."""
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - the condition is a request to a gateway
            await asyncio.sleep(0.05)


class Pair:
    """Hebei's and Hainan's gateways and their desks' clients."""

    def __init__(self, home: Gateway, host: Gateway) -> None:
        self.home, self.host = home, host
        self.hebei = GatewayDesks(home.url, CONNECTIONS)
        self.hainan = GatewayDesks(host.url, CONNECTIONS)

    async def filed(self, person: Person, filing_id: str) -> None:
        """File ``person`` at Hebei's counter and wait for the receipt."""
        got = await self.hebei.agency.file(person, filing_of(person, filing_id))
        assert got.sent

        async def registered() -> bool:
            state = await self.hebei.agency.get(filing_id)
            return state is not None and state.state == "REGISTERED"

        await eventually(registered)

    async def admitted(self, person_id: str = LAO_ZHANG_PERSON_ID) -> Admitted:
        got = await self.hainan.hospital.admit(
            person_id, LAO_ZHANG_HOME_REGION, LAO_ZHANG_HOSPITAL, ADMITTED
        )
        assert isinstance(got, Admitted), got
        return got

    async def discharged(self, admission_id: str) -> str:
        sent = await self.hainan.hospital.discharge(
            admission_id, visit_type=VisitType.INPATIENT, diagnoses=("I25.1", "I10"),
            items=lao_zhang_items(), at=DISCHARGED,
        )  # fmt: skip
        return sent.claim_id

    async def queued(self, claim_id: str) -> None:
        """Until the claim waits at Hebei's review desk."""

        async def waiting() -> bool:
            return claim_id in {r.claim_id for r in await self.hebei.reviewer.open_reviews(100)}

        await eventually(waiting)


@pytest.fixture(scope="module")
async def pair(
    broker: str, settings: BusSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Pair]:
    await create_contract_topics(settings, broker, ["130000", "460000"])
    state = tmp_path_factory.mktemp("desks")
    home_cfg = gateway_config("130000", broker, state, settings=settings)
    host_cfg = gateway_config("460000", broker, state, settings=settings)
    async with running_gateway(home_cfg) as home, running_gateway(host_cfg) as host:
        await asyncio.gather(home.system.node.wait_ready(60), host.system.node.wait_ready(60))
        p = Pair(home, host)
        await p.filed(LAO_ZHANG, "F-130100-LAOZHANG")
        try:
            yield p
        finally:
            await p.hebei.aclose()
            await p.hainan.aclose()


class TestAgencyCounter:
    async def test_the_same_filing_again_sends_nothing(self, pair: Pair) -> None:
        """A counter that files again after a restart gets the filing back, nothing sent."""
        again = await pair.hebei.agency.file(LAO_ZHANG, filing_of(LAO_ZHANG, "F-130100-LAOZHANG"))
        assert not again.sent
        assert again.state == "REGISTERED"

    async def test_a_revoked_filing_refuses_admission(self, pair: Pair) -> None:
        """Filed, revoked at the counter: Hainan's desk refuses with FILING_EXPIRED."""
        person = Person("130102196001011235", "李秀英", InsuranceType.RESIDENT, "130100")
        await pair.filed(person, "F-130100-REVOKED")
        revoked = await pair.hebei.agency.revoke("F-130100-REVOKED")
        assert revoked.sent
        again = await pair.hebei.agency.revoke("F-130100-REVOKED")
        assert not again.sent

        async def refused() -> bool:
            got = await pair.hainan.hospital.admit(
                person.person_id, "130100", LAO_ZHANG_HOSPITAL, ADMITTED
            )
            return isinstance(got, Refused) and got.code == "FILING_EXPIRED"

        await eventually(refused)

    async def test_an_unknown_filing_is_none(self, pair: Pair) -> None:
        assert await pair.hebei.agency.get("F-130100-NOSUCH") is None


class TestHospitalDesk:
    async def test_an_unfiled_patient_is_refused_with_the_contracts_code(self, pair: Pair) -> None:
        got = await pair.hainan.hospital.admit(
            "130102198001011111", LAO_ZHANG_HOME_REGION, LAO_ZHANG_HOSPITAL, ADMITTED
        )
        assert isinstance(got, Refused)
        assert got.code == "NOT_FILED"

    async def test_a_discharge_sent_twice_is_one_claim(self, pair: Pair) -> None:
        """Lao Zhang's 25,000-yuan bill: DELAYED, advance 6,250 yuan; the desk's retry of
        the discharge gets the same claim back."""
        admission = await pair.admitted()
        assert admission.mode.value == "DELAYED"
        first = await pair.hainan.hospital.discharge(
            admission.admission_id, visit_type=VisitType.INPATIENT, diagnoses=("I25.1",),
            items=lao_zhang_items(), at=DISCHARGED,
        )  # fmt: skip
        assert (first.total_fen, first.advance_fen, first.repeated) == (2_500_000, 625_000, False)
        assert first.claim_id == "C-" + admission.admission_id.removeprefix("A-")
        again = await pair.hainan.hospital.discharge(
            admission.admission_id, visit_type=VisitType.INPATIENT, diagnoses=("I25.1",),
            items=lao_zhang_items(), at=DISCHARGED,
        )  # fmt: skip
        assert again.claim_id == first.claim_id
        assert again.repeated
        await pair.queued(first.claim_id)
        await pair.hebei.reviewer.reject(first.claim_id, "测试", "tester")  # leave no review open

    async def test_a_line_the_catalogue_lacks_is_a_desk_error_naming_it(self, pair: Pair) -> None:
        admission = await pair.admitted()
        bad = lao_zhang_items()[0].model_copy(update={"item_code": "NOSUCH"})
        with pytest.raises(DeskError, match=r"HTTP 422: .*items\.0\.item_code") as caught:
            await pair.hainan.hospital.discharge(
                admission.admission_id, visit_type=VisitType.INPATIENT, diagnoses=("I10",),
                items=(bad,), at=DISCHARGED,
            )  # fmt: skip
        assert caught.value.status == 422


class TestReviewer:
    async def test_an_approval_settles_lao_zhang_with_a_top_up(self, pair: Pair) -> None:
        """Approved over HTTP: Hainan settles the top-up of 1,250 yuan; a second decision is
        ReviewClosed, as at the desk itself."""
        from adapters.review_desk import ReviewClosed

        claim_id = await pair.discharged((await pair.admitted()).admission_id)
        await pair.queued(claim_id)
        items = await pair.hebei.reviewer.proposed_items(claim_id)
        assert sum(i.amount_fen for i in items) == 2_500_000
        await pair.hebei.reviewer.approve(claim_id, "王审核")
        with pytest.raises(ReviewClosed):
            await pair.hebei.reviewer.approve(claim_id, "王审核")

        async def settled() -> bool:
            return bool((await pair.hainan.hospital.claim(claim_id))["state"] == "SETTLED")

        await eventually(settled)
        claim = await pair.hainan.hospital.claim(claim_id)
        assert (claim["advance_fen"], claim["top_up_fen"]) == (625_000, 125_000)

    async def test_an_adjustment_cuts_the_fund_share(self, pair: Pair) -> None:
        claim_id = await pair.discharged((await pair.admitted()).admission_id)
        await pair.queued(claim_id)
        stent = next(
            i for i in await pair.hebei.reviewer.proposed_items(claim_id) if i.proposed_fen > 0
        )
        cut = ItemAdjustment(
            item_code=stent.item_code, approved_fen=stent.proposed_fen // 2,
            reason_code="OVER_STANDARD", note="超出收费标准",
        )  # fmt: skip
        await pair.hebei.reviewer.adjust(claim_id, [cut], "王审核")

        async def settled() -> bool:
            return bool((await pair.hainan.hospital.claim(claim_id))["state"] == "SETTLED")

        await eventually(settled)
        claim = await pair.hainan.hospital.claim(claim_id)
        assert claim["review"]["decision"] == "PARTIAL"
        assert claim["top_up_fen"] > 125_000  # the patient pays more than after an approval

    async def test_a_team_of_simulated_reviewers_decides_every_open_review(
        self, pair: Pair
    ) -> None:
        """Two reviewers, one seat each, over HTTP: every queued claim is decided once."""
        claims = [await pair.discharged((await pair.admitted()).admission_id) for _ in range(6)]
        for claim_id in claims:
            await pair.queued(claim_id)
        team = [
            SimulatedReviewer(
                pair.hebei.reviewer,
                pace_per_s=200,
                adjust_share=0.3,
                reject_share=0.2,
                rng=random.Random(n),
                name=f"sim-{n}",
                seed="7",
                seat=n,
                seats=2,
            )
            for n in range(2)
        ]
        await asyncio.gather(*(r.drain() for r in team))
        decided = sum(r.decided[k] for r in team for k in ("approve", "adjust", "reject"))
        assert decided == 6
        assert all(r.decided["failed"] == 0 for r in team)
        assert await pair.hebei.reviewer.count_open() == 0

    async def test_a_seat_outside_the_team_is_refused(self, pair: Pair) -> None:
        with pytest.raises(ValueError, match="seat 2"):
            SimulatedReviewer(
                pair.hebei.reviewer, pace_per_s=1, adjust_share=0, reject_share=0,
                rng=random.Random(), seat=2, seats=2,
            )  # fmt: skip


class TestDeskJournal:
    def test_a_restarted_desk_knows_its_admissions_and_claims(self, tmp_path: Path) -> None:
        """What the journal noted comes back after a restart; a line cut short by a kill is
        skipped (its visit is done again)."""
        journal = DeskJournal(tmp_path, "460000")
        journal.admitted("visit-000001", "A-460000-1")
        journal.discharged("visit-000001", "C-460000-1")
        journal.admitted("visit-000002", "A-460000-2")
        journal.close()
        with (tmp_path / "hospital-desk-460000.jsonl").open("a") as f:
            f.write('{"visit": "visit-000003", "admiss')
        again = DeskJournal(tmp_path, "460000")
        assert again.claims == {"visit-000001": "C-460000-1"}
        assert again.admissions == {"visit-000001": "A-460000-1", "visit-000002": "A-460000-2"}
        again.discharged("visit-000002", "C-460000-2")
        again.close()
        assert DeskJournal(tmp_path, "460000").claims["visit-000002"] == "C-460000-2"
