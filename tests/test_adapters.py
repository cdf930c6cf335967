"""Province adapters end to end over the real broker: Hebei (home) and Hainan (host)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters.backoffice import ClaimState, HostClaim, Person
from adapters.directory import Directory
from adapters.fixtures import (
    LAO_ZHANG_HOME_REGION,
    LAO_ZHANG_HOSPITAL,
    LAO_ZHANG_PERSON_ID,
    lao_zhang_items,
)
from adapters.host import AdmissionRefused
from adapters.province import ProvinceSystem
from bus.broker import create_contract_topics
from bus.codec import Codec
from bus.constants import H_CORRELATION_ID, topic
from bus.models import (
    ClaimItem,
    ErrorCode,
    ErrorReport,
    FilingAction,
    FilingChannel,
    FilingReason,
    FilingUpload,
    InsuranceType,
    SettlementMode,
    VisitType,
    now,
)
from bus.settings import BusSettings
from tests.helpers import eventually, hdr, read_topic

pytestmark = pytest.mark.broker

HEBEI, HAINAN = "130000", "460000"
ADMITTED = dt.datetime(2026, 5, 8, 9, 30, tzinfo=dt.UTC)


@dataclass
class Country:
    """Hebei and Hainan systems on the session broker."""

    hebei: ProvinceSystem
    hainan: ProvinceSystem
    bootstrap: str
    settings: BusSettings


@pytest.fixture(scope="module")
async def country(
    broker: str, settings: BusSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Country]:
    """Hebei and Hainan started once for the module (a group join costs seconds)."""
    directory = Directory.default()
    await create_contract_topics(settings, broker, [HEBEI, HAINAN])
    state = tmp_path_factory.mktemp("country")
    systems = [
        ProvinceSystem(
            code, settings, bootstrap=broker, directory=directory, state_dir=state,
            instant_deadline_s=1.5,
        )
        for code in (HEBEI, HAINAN)
    ]  # fmt: skip
    await asyncio.gather(*(s.start() for s in systems))
    await asyncio.gather(*(s.node.wait_ready() for s in systems))
    yield Country(systems[0], systems[1], broker, settings)
    for s in systems:
        await s.stop()
        s.close()


_counter = iter(range(1, 10_000))


def enrol(country: Country, person_id: str | None = None) -> str:
    """A Hebei employee (Lao Zhang's kind) enrolled at the home."""
    pid = person_id or f"1301021950{next(_counter):06d}X"
    country.hebei.backoffice.add_person(
        Person(pid, "张建国", InsuranceType.EMPLOYEE, LAO_ZHANG_HOME_REGION)
    )
    return pid


async def file(
    country: Country, person_id: str, action: FilingAction = FilingAction.CREATE, **kw: object
) -> None:
    """File the person from Hebei to Hainan and wait until Hainan registered it."""
    filing = FilingUpload(
        filing_id=f"F-{LAO_ZHANG_HOME_REGION}-{person_id}",
        action=action,
        person_id=person_id,
        person_name="张建国",
        insurance_type=InsuranceType.EMPLOYEE,
        home_region=LAO_ZHANG_HOME_REGION,
        host_region=HAINAN,
        reason=FilingReason.RELOCATED_RETIREE,
        channel=FilingChannel.COUNTER,
        valid_from=dt.date(2026, 1, 1),
        filed_at=now(),
        **kw,  # type: ignore[arg-type]
    )
    await country.hebei.home.file(filing)
    await eventually(lambda: country.hainan.backoffice.filing_for(person_id) == filing)


async def settle_stay(
    country: Country,
    person_id: str,
    *,
    mode: SettlementMode | None = None,
    items: tuple[ClaimItem, ...] | None = None,
    tamper: dict[str, object] | None = None,
) -> HostClaim:
    """Admit, package Lao Zhang's bill, submit, and wait for a terminal state."""
    host = country.hainan.host
    admission = await host.admit(person_id, LAO_ZHANG_HOME_REGION, LAO_ZHANG_HOSPITAL, ADMITTED)
    claim = host.package(
        admission,
        items or lao_zhang_items(),
        visit_type=VisitType.INPATIENT,
        diagnoses=("I25.1",),
        discharged_at=ADMITTED + dt.timedelta(days=15),
    )
    if mode is not None and mode is not claim.settlement_mode:
        claim = claim.model_copy(update={"settlement_mode": mode, "advance_fen": 0})
    if tamper:
        claim = claim.model_copy(update=tamper)
    await host.submit(claim)
    return await terminal(country, claim.claim_id)


async def terminal(country: Country, claim_id: str, timeout_s: float = 20.0) -> HostClaim:
    """Wait until the host's claim is settled or refused."""
    office = country.hainan.backoffice

    def done() -> bool:
        c = office.claim(claim_id)
        return c is not None and c.state in (ClaimState.SETTLED, ClaimState.REFUSED)

    await eventually(done, timeout_s)
    found = office.claim(claim_id)
    assert found is not None
    return found


class TestLaoZhang:
    async def test_delayed_advance_then_top_up(self, country: Country) -> None:
        """25,000 yuan in DELAYED mode: 6,250 advance, review 17,500 fund / 7,500 personal,
        then a 1,250 top-up, and Hebei receives the settlement notice."""
        await file(country, enrol(country, LAO_ZHANG_PERSON_ID))
        claim = await settle_stay(country, LAO_ZHANG_PERSON_ID)
        assert claim.state is ClaimState.SETTLED
        assert claim.review is not None
        assert claim.claim.total_fen == 2_500_000
        assert claim.review.fund_fen == 1_750_000
        assert claim.review.personal_fen == 750_000
        payments = country.hainan.backoffice.payments(claim.claim.claim_id)
        assert [(k, f) for _, k, f in payments] == [("ADVANCE", 625_000), ("TOP_UP", 125_000)]
        await eventually(
            lambda: any(
                n.claim_id == claim.claim.claim_id for n in country.hebei.backoffice.settlements()
            )
        )

    async def test_instant_settles_at_discharge(self, country: Country) -> None:
        """The same stay in INSTANT mode: no advance, the patient pays 7,500 at discharge."""
        pid = enrol(country)
        await file(country, pid)
        claim = await settle_stay(country, pid, mode=SettlementMode.INSTANT)
        assert claim.state is ClaimState.SETTLED
        assert claim.review is not None
        assert claim.review.fund_fen == 1_750_000
        payments = country.hainan.backoffice.payments(claim.claim.claim_id)
        assert [(k, f) for _, k, f in payments] == [("TOP_UP", 750_000)]

    async def test_cap_is_carried_to_the_second_claim(self, country: Country) -> None:
        """A second stay in the same year sees the fund use of the first."""
        pid = enrol(country)
        await file(country, pid)
        await settle_stay(country, pid)
        usage = country.hebei.backoffice.year_usage(pid, ADMITTED.year)
        assert usage.fund_used_fen == 1_750_000


class TestErrorCodes:
    async def _report_for(self, country: Country, person_id: str, code: ErrorCode) -> None:
        codec = Codec()
        records = await read_topic(
            country.bootstrap,
            country.settings,
            topic("error", HEBEI),
            expect=1,
            where=lambda r: r.key == person_id.encode(),
        )
        reports = [codec.decode(r.value or b"") for r in records]
        assert any(isinstance(r, ErrorReport) and r.code is code for r in reports)

    async def test_not_filed_refused_at_admission_and_reported(self, country: Country) -> None:
        """A patient with no filing is refused at the desk and Hebei gets NOT_FILED."""
        pid = enrol(country)
        with pytest.raises(AdmissionRefused) as info:
            await country.hainan.host.admit(
                pid, LAO_ZHANG_HOME_REGION, LAO_ZHANG_HOSPITAL, ADMITTED
            )
        assert info.value.code is ErrorCode.NOT_FILED
        await self._report_for(country, pid, ErrorCode.NOT_FILED)

    async def test_revoked_filing_is_no_longer_accepted(self, country: Country) -> None:
        """After REVOKE the host refuses with FILING_EXPIRED; an UPDATE restores it."""
        pid = enrol(country)
        await file(country, pid)
        await country.hainan.host.admit(pid, LAO_ZHANG_HOME_REGION, LAO_ZHANG_HOSPITAL, ADMITTED)
        await file(country, pid, FilingAction.REVOKE)
        with pytest.raises(AdmissionRefused) as info:
            await country.hainan.host.admit(
                pid, LAO_ZHANG_HOME_REGION, LAO_ZHANG_HOSPITAL, ADMITTED
            )
        assert info.value.code is ErrorCode.FILING_EXPIRED
        await self._report_for(country, pid, ErrorCode.FILING_EXPIRED)
        await file(country, pid, FilingAction.UPDATE, valid_until=dt.date(2026, 3, 1))
        with pytest.raises(AdmissionRefused):  # valid only until March: May is outside
            await country.hainan.host.admit(
                pid, LAO_ZHANG_HOME_REGION, LAO_ZHANG_HOSPITAL, ADMITTED
            )
        await file(country, pid, FilingAction.UPDATE)
        await country.hainan.host.admit(pid, LAO_ZHANG_HOME_REGION, LAO_ZHANG_HOSPITAL, ADMITTED)

    async def test_hospital_not_designated(self, country: Country) -> None:
        """A hospital that is not a Hainan designated hospital is refused and reported."""
        pid = enrol(country)
        await file(country, pid)
        with pytest.raises(AdmissionRefused) as info:
            await country.hainan.host.admit(pid, LAO_ZHANG_HOME_REGION, "H13010001", ADMITTED)
        assert info.value.code is ErrorCode.HOSPITAL_NOT_DESIGNATED
        await self._report_for(country, pid, ErrorCode.HOSPITAL_NOT_DESIGNATED)

    async def test_region_not_connected(self, country: Country) -> None:
        """A home region without an agreement with Hainan is refused as not connected."""
        with pytest.raises(AdmissionRefused) as info:
            await country.hainan.host.admit("130999", "130200", LAO_ZHANG_HOSPITAL, ADMITTED)
        assert info.value.code is ErrorCode.REGION_NOT_CONNECTED

    async def test_amount_mismatch_answered_by_the_home(self, country: Country) -> None:
        """A claim whose total is not the sum of its items is answered AMOUNT_MISMATCH."""
        pid = enrol(country)
        await file(country, pid)
        claim = await settle_stay(country, pid, tamper={"total_fen": 1})
        assert claim.state is ClaimState.REFUSED
        assert claim.error_code == ErrorCode.AMOUNT_MISMATCH.value
        errors = await read_topic(
            country.bootstrap, country.settings, topic("error", HAINAN), expect=1,
            where=lambda r: r.key == pid.encode(),
        )  # fmt: skip
        assert hdr(errors[0], H_CORRELATION_ID) == claim.request_id

    async def test_catalogue_item_unknown(self, country: Country) -> None:
        """An item not in Hainan's catalogue is answered CATALOGUE_ITEM_UNKNOWN."""
        pid = enrol(country)
        await file(country, pid)
        items = lao_zhang_items()
        odd = items[0].model_copy(update={"item_code": "NOPE-1"})
        claim = await settle_stay(country, pid, items=(odd, *items[1:]))
        assert claim.error_code == ErrorCode.CATALOGUE_ITEM_UNKNOWN.value

    async def test_duplicate_claim(self, country: Country) -> None:
        """The same claim id sent again as a new message is answered DUPLICATE_CLAIM and
        settles nothing twice."""
        pid = enrol(country)
        await file(country, pid)
        first = await settle_stay(country, pid)
        assert first.state is ClaimState.SETTLED
        answer = await country.hainan.node.ask(first.claim, deadline_s=10)
        assert answer.code is ErrorCode.DUPLICATE_CLAIM
        usage = country.hebei.backoffice.year_usage(pid, ADMITTED.year)
        assert usage.fund_used_fen == first.review.fund_fen if first.review else False


class TestFallback:
    async def test_instant_falls_back_to_delayed_then_settles(
        self, country: Country, tmp_path: Path
    ) -> None:
        """With Hebei down, an instant claim passes its deadline: the host collects the
        advance and keeps the claim; when Hebei returns, its late review settles it."""
        pid = enrol(country)
        await file(country, pid)
        await country.hebei.node.stop()
        try:
            host = country.hainan.host
            admission = await host.admit(pid, LAO_ZHANG_HOME_REGION, LAO_ZHANG_HOSPITAL, ADMITTED)
            claim = host.package(
                admission,
                lao_zhang_items(),
                visit_type=VisitType.INPATIENT,
                diagnoses=("I25.1",),
                discharged_at=ADMITTED + dt.timedelta(days=3),
            ).model_copy(update={"settlement_mode": SettlementMode.INSTANT, "advance_fen": 0})
            await host.submit(claim)
            office = country.hainan.backoffice

            def fell_back() -> bool:
                c = office.claim(claim.claim_id)
                return c is not None and c.state is ClaimState.FALLBACK

            await eventually(fell_back)
        finally:
            await country.hebei.node.start()
            await country.hebei.node.wait_ready()
        settled = await terminal(country, claim.claim_id, timeout_s=30)
        assert settled.state is ClaimState.SETTLED
        payments = [(k, f) for _, k, f in office.payments(claim.claim_id)]
        assert payments == [("ADVANCE", 625_000), ("TOP_UP", 125_000)]
