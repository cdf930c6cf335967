"""The five public queries of the gateway, on the real broker.

Lao Zhang (seed 000) is filed at the Hebei gateway (130000, home; no review desk, so the rules
answer at once), admitted and discharged at the Hainan gateway (460000, host) with his
25,000-yuan bill; the queries then read what each side knows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from adapters.backoffice import ClaimState, SqlBackOffice
from adapters.directory import default
from adapters.fixtures import (
    LAO_ZHANG_HOSPITAL,
    LAO_ZHANG_PERSON_ID,
    lao_zhang_claim,
    lao_zhang_items,
)
from adapters.gateway.service import Gateway
from adapters.gateway.testing import client, gateway_config
from bus.broker import create_contract_topics
from bus.db import SqliteDatabase
from bus.models import (
    FilingAction,
    FilingChannel,
    FilingReason,
    FilingStatus,
    FilingUpload,
    InsuranceType,
    ReviewDecision,
    ReviewResult,
    now,
)
from bus.settings import BusSettings
from tests.helpers import eventually

pytestmark = pytest.mark.broker

HEBEI, HAINAN = "130000", "460000"
PID = LAO_ZHANG_PERSON_ID
MASKED_PID = "130102**********34"
STRANGER = "110101199001011234"
"""An ID number neither gateway knows."""
DIRECTORY = default()
"""The directory both gateways run with."""
WRONG_TOKEN = {"Authorization": "Bearer not-a-token"}


@dataclass(frozen=True)
class Case:
    """The running gateways and Lao Zhang's filing and claim."""

    hebei: Gateway
    hainan: Gateway
    filing_id: str
    claim_id: str


@pytest.fixture(scope="module")
async def case(
    broker: str, settings: BusSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Case]:
    """Both gateways, Lao Zhang filed, treated, reviewed and settled."""
    await create_contract_topics(settings, broker, [HEBEI, HAINAN])
    root: Path = tmp_path_factory.mktemp("public")
    hebei = Gateway(
        gateway_config(HEBEI, broker, root / "hebei", settings=settings, review_desk=False)
    )
    hainan = Gateway(gateway_config(HAINAN, broker, root / "hainan", settings=settings))
    await asyncio.gather(hebei.start(), hainan.start())
    try:
        await asyncio.gather(hebei.system.node.wait_ready(), hainan.system.node.wait_ready())
        async with client(hebei, "agency") as agency:
            filed = await agency.post(
                "/v1/filings",
                json={
                    "person_id": PID,
                    "person_name": "张老汉",
                    "insurance_type": "EMPLOYEE",
                    "home_region": "130100",
                    "host_region": HAINAN,
                    "reason": "RELOCATED_RETIREE",
                    "valid_from": "2026-01-01",
                },
            )
            assert filed.status_code == 202, filed.text
        filing_id = filed.json()["filing_id"]
        await eventually(lambda: hainan.system.backoffice.filing_for(PID) is not None)
        async with client(hainan, "hospital") as desk:
            admitted = await desk.post(
                "/v1/admissions",
                json={"person_id": PID, "home_region": "130100", "hospital_code": "H46010001"},
            )
            assert admitted.status_code == 201, admitted.text
            items = [
                {
                    "item_code": i.item_code,
                    "quantity_milli": i.quantity_milli,
                    "unit_price_fen": i.unit_price_fen,
                }
                for i in lao_zhang_items()
            ]
            discharged = await desk.post(
                f"/v1/admissions/{admitted.json()['admission_id']}/discharge",
                json={"visit_type": "INPATIENT", "diagnoses": ["I25.1"], "items": items},
            )
            assert discharged.status_code == 201, discharged.text
        claim_id = discharged.json()["claim_id"]

        def settled() -> bool:
            claim = hainan.system.backoffice.claim(claim_id)
            done = claim is not None and claim.state is ClaimState.SETTLED
            return done and len(hebei.system.backoffice.settlements()) == 1

        await eventually(settled)
        yield Case(hebei, hainan, filing_id, claim_id)
    finally:
        await asyncio.gather(hebei.stop(), hainan.stop())


async def public_get(gw: Gateway, path: str, role: str | None = None, **params: Any) -> Any:
    """GET a query, without a token unless ``role``."""
    async with client(gw, role) as http:
        return await http.get(path, params=params)


async def public_post(gw: Gateway, path: str, body: Any, role: str | None = None) -> Any:
    """POST a query, without a token unless ``role``."""
    async with client(gw, role) as http:
        return await http.post(path, json=body)


def fields(response: Any) -> list[str]:
    """The fields a 422 names."""
    assert response.status_code == 422, response.text
    return [e["field"] for e in response.json()["errors"]]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/public/hospitals", None),
        ("GET", "/v1/public/agencies", None),
        ("GET", "/v1/public/regions", None),
        ("POST", "/v1/public/filing-status", {"person_id": PID}),
        ("POST", "/v1/public/costs", {"person_id": PID}),
    ],
)
async def test_public_without_token_but_not_with_a_wrong_one(
    case: Case, method: str, path: str, body: Any
) -> None:
    """Every public query answers without a token and with any role's token (no 403 here);
    a token no role has is 401."""
    for role in (None, "hospital", "agency", "reviewer", "ops"):
        async with client(case.hebei, role) as http:
            response = await http.request(method, path, json=body)
        assert response.status_code == 200, (role, response.text)
    async with client(case.hebei, headers=WRONG_TOKEN) as forged:
        refused = await forged.request(method, path, json=body)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")


class TestHospitals:
    async def test_filters(self, case: Case) -> None:
        """Hospitals by province, region and level, with region and province names."""
        everything = (await public_get(case.hebei, "/v1/public/hospitals")).json()["hospitals"]
        assert len(everything) == len(DIRECTORY.data.hospitals)
        hainan = (await public_get(case.hebei, "/v1/public/hospitals", province=HAINAN)).json()[
            "hospitals"
        ]
        assert {h["province"] for h in hainan} == {HAINAN}
        first = next(h for h in hainan if h["code"] == LAO_ZHANG_HOSPITAL)
        assert first == {
            "code": "H46010001",
            "name": "海南省人民医院",
            "level": 3,
            "region": "460100",
            "region_name": "海口市",
            "province": HAINAN,
            "province_name": "海南省",
        }
        sanya = (
            await public_get(case.hebei, "/v1/public/hospitals", region="460200", level=2)
        ).json()["hospitals"]
        assert sanya
        assert all(h["region"] == "460200" and h["level"] == 2 for h in sanya)
        assert len(sanya) < len(hainan)

    async def test_unknown_and_bad(self, case: Case) -> None:
        """An unknown province or region is 404; a malformed one or level 4 is 422."""
        hospitals = "/v1/public/hospitals"
        assert (await public_get(case.hebei, hospitals, province="990000")).status_code == 404
        assert (await public_get(case.hebei, hospitals, region="469999")).status_code == 404
        assert fields(await public_get(case.hebei, hospitals, province="46")) == ["province"]
        assert fields(await public_get(case.hebei, hospitals, level=4)) == ["level"]


class TestFilingStatus:
    async def test_home_sees_its_filing_with_the_receipt(self, case: Case) -> None:
        """At the home, the filing it made shows REGISTERED with the receipt; masked without
        a token, unmasked with an agency token."""
        masked = await public_post(case.hebei, "/v1/public/filing-status", {"person_id": PID})
        assert masked.status_code == 200, masked.text
        data = masked.json()
        assert (data["person_id"], data["person_name"]) == (MASKED_PID, "张**")
        assert PID not in masked.text
        assert "张老汉" not in masked.text
        (filing,) = data["filings"]
        assert (filing["side"], filing["filing_id"]) == ("HOME", case.filing_id)
        assert (filing["state"], filing["receipt"]["status"]) == ("REGISTERED", "REGISTERED")
        assert (filing["home_region_name"], filing["host_name"]) == ("石家庄市", "海南省")
        assert filing["active_today"] is True
        plain = (
            await public_post(case.hebei, "/v1/public/filing-status", {"person_id": PID}, "agency")
        ).json()
        assert (plain["person_id"], plain["person_name"]) == (PID, "张老汉")

    async def test_host_sees_the_registered_filing(self, case: Case) -> None:
        """At the host, the registered filing shows as HOST, without a receipt."""
        data = (
            await public_post(case.hainan, "/v1/public/filing-status", {"person_id": PID})
        ).json()
        (filing,) = data["filings"]
        assert (filing["side"], filing["state"], filing["receipt"]) == ("HOST", "REGISTERED", None)

    async def test_unknown_person_and_bad_input(self, case: Case) -> None:
        """A person nobody filed is 404; a malformed ID, a missing or an extra field is 422."""
        status = "/v1/public/filing-status"
        assert (await public_post(case.hebei, status, {"person_id": STRANGER})).status_code == 404
        assert fields(await public_post(case.hebei, status, {"person_id": "1301"})) == ["person_id"]
        assert fields(await public_post(case.hebei, status, {})) == ["person_id"]
        extra = await public_post(case.hebei, status, {"person_id": PID, "name": "x"})
        assert fields(extra) == ["name"]


class TestAgencies:
    async def test_by_province(self, case: Case) -> None:
        """Hebei's agencies with their contacts; all provinces' without a filter."""
        hebei = (await public_get(case.hainan, "/v1/public/agencies", province=HEBEI)).json()[
            "agencies"
        ]
        assert [a["name"] for a in hebei] == [
            "河北省医疗保障局异地就医结算中心",
            "石家庄市医疗保障事务中心",
        ]
        assert hebei[0]["phone"].startswith("0311-12333")
        assert (hebei[0]["region_name"], hebei[0]["province_name"]) == ("石家庄市", "河北省")
        every = (await public_get(case.hainan, "/v1/public/agencies")).json()["agencies"]
        assert {a["province"] for a in every} == {p.code for p in DIRECTORY.data.provinces}

    async def test_unknown_and_bad(self, case: Case) -> None:
        """An unknown province is 404; a region code where a province is asked is 422."""
        agencies = "/v1/public/agencies"
        assert (await public_get(case.hainan, agencies, province="990000")).status_code == 404
        assert fields(await public_get(case.hainan, agencies, province="130100")) == ["province"]


class TestCosts:
    async def test_home_costs_are_the_reviewed_split(self, case: Case) -> None:
        """At the home: Lao Zhang's 25,000 yuan, fund 17,500, personal 7,500, settled."""
        response = await public_post(case.hebei, "/v1/public/costs", {"person_id": PID})
        assert response.status_code == 200, response.text
        data = response.json()
        assert (data["person_id"], data["as_host"]) == (MASKED_PID, None)
        (claim,) = data["as_home"]["claims"]
        assert claim["claim_id"] == case.claim_id
        assert (claim["host"], claim["host_name"]) == (HAINAN, "海南省")
        assert (claim["total_fen"], claim["fund_fen"], claim["personal_fen"]) == (
            2_500_000,
            1_750_000,
            750_000,
        )
        assert (claim["total_yuan"], claim["fund_yuan"], claim["personal_yuan"]) == (
            "25,000.00",
            "17,500.00",
            "7,500.00",
        )
        assert claim["settled_at"] is not None
        totals = data["as_home"]["totals"]
        assert (totals["claims"], totals["total_fen"], totals["personal_yuan"]) == (
            1,
            2_500_000,
            "7,500.00",
        )

    async def test_host_costs_are_the_claims(self, case: Case) -> None:
        """At the host: the claim's total, the 25% advance and its state, unmasked for a
        hospital token."""
        data = (
            await public_post(case.hainan, "/v1/public/costs", {"person_id": PID}, "hospital")
        ).json()
        assert (data["person_id"], data["as_home"]) == (PID, None)
        (claim,) = data["as_host"]["claims"]
        assert (claim["claim_id"], claim["state"], claim["mode"]) == (
            case.claim_id,
            "SETTLED",
            "DELAYED",
        )
        assert (claim["total_fen"], claim["advance_fen"], claim["advance_yuan"]) == (
            2_500_000,
            625_000,
            "6,250.00",
        )
        assert (claim["fund_fen"], claim["hospital_name"]) == (1_750_000, "海南省人民医院")
        assert data["as_host"]["totals"]["advance_fen"] == 625_000

    async def test_year_filter_unknown_and_bad(self, case: Case) -> None:
        """Another year or an unknown person is 404; a year before 2000 or a malformed ID
        is 422."""
        costs = "/v1/public/costs"
        year = case.hainan.system.backoffice.claims()[0].claim.discharged_at.year
        this_year = await public_post(case.hebei, costs, {"person_id": PID, "year": year})
        assert this_year.json()["as_home"]["totals"]["claims"] == 1
        other = await public_post(case.hebei, costs, {"person_id": PID, "year": year - 1})
        assert other.status_code == 404
        assert (await public_post(case.hainan, costs, {"person_id": STRANGER})).status_code == 404
        assert fields(await public_post(case.hebei, costs, {"person_id": PID, "year": 1990})) == [
            "year"
        ]
        assert fields(await public_post(case.hebei, costs, {"person_id": "x"})) == ["person_id"]


class TestRegions:
    async def test_connections(self, case: Case) -> None:
        """Shijiazhuang settles DELAYED at every Hainan hospital; Haikou's three connections
        include point-to-point with three Zhanjiang hospitals."""
        regions = "/v1/public/regions"
        (shijiazhuang,) = (await public_get(case.hebei, regions, home="130100")).json()["regions"]
        hainan_hospitals = len(DIRECTORY.hospitals_of(HAINAN))
        assert shijiazhuang == {
            "home_region": "130100",
            "home_region_name": "石家庄市",
            "home": HEBEI,
            "home_name": "河北省",
            "host": HAINAN,
            "host_name": "海南省",
            "mode": "DELAYED",
            "hospitals": "all",
            "hospital_count": hainan_hospitals,
        }
        haikou = (await public_get(case.hebei, regions, home=HAINAN)).json()["regions"]
        assert {r["host"] for r in haikou} == {"440000", "530000", HEBEI}
        (p2p,) = (await public_get(case.hebei, regions, host="440800")).json()["regions"]
        assert (p2p["mode"], p2p["hospital_count"]) == ("POINT_TO_POINT", 3)
        assert p2p["hospitals"] == ["H44080001", "H44080002", "H44080003"]
        into_hainan = (await public_get(case.hebei, regions, host=HAINAN)).json()["regions"]
        assert len(into_hainan) == 10

    async def test_unknown_and_bad(self, case: Case) -> None:
        """An unknown home region or host province is 404; a malformed code is 422."""
        regions = "/v1/public/regions"
        assert (await public_get(case.hebei, regions, home="139999")).status_code == 404
        assert (await public_get(case.hebei, regions, host="990000")).status_code == 404
        assert fields(await public_get(case.hebei, regions, home="abc")) == ["home"]


def test_back_office_file_from_before_the_public_queries_opens(tmp_path: Path) -> None:
    """A province file whose reviews and filings tables predate the public queries opens
    with the new columns: its old rows read as before, with no person or receipt time."""
    path = tmp_path / "old.sqlite3"
    old = SqliteDatabase(path)
    old.migrate(
        "old-tables",
        "CREATE TABLE reviews (claim_id TEXT PRIMARY KEY, request_id TEXT, data TEXT, host TEXT);"
        "CREATE TABLE home_filings (seq INTEGER PRIMARY KEY AUTOINCREMENT, filing_id TEXT, "
        "person_id TEXT, data TEXT, receipt TEXT);",
    )
    claim = lao_zhang_claim()
    result = ReviewResult(
        claim_id=claim.claim_id, decision=ReviewDecision.APPROVED, total_fen=100, eligible_fen=100,
        deductible_fen=0, fund_fen=80, critical_illness_fen=0, assistance_fen=0, personal_fen=20,
        advance_fen=0, balance_fen=20, adjustments=(), reviewer="r", reviewed_at=now(),
    )  # fmt: skip
    filing = FilingUpload(
        filing_id="F-130100-OLD", action=FilingAction.CREATE, person_id=PID,
        person_name="张老汉", insurance_type=InsuranceType.EMPLOYEE, home_region="130100",
        host_region=HAINAN, reason=FilingReason.RELOCATED_RETIREE,
        channel=FilingChannel.COUNTER, valid_from=now().date(), filed_at=now(),
    )  # fmt: skip
    with old.write() as cur:
        cur.execute(
            "INSERT INTO reviews VALUES (?, ?, ?, ?)",
            (claim.claim_id, "req-1", result.model_dump_json(), HAINAN),
        )
        cur.execute(
            "INSERT INTO home_filings (filing_id, person_id, data, receipt) VALUES (?, ?, ?, ?)",
            ("F-130100-OLD", PID, filing.model_dump_json(), "REGISTERED"),
        )
    old.close()
    office = SqlBackOffice(path)
    try:
        assert office.review_of(claim.claim_id) == ("req-1", result)
        assert office.reviews_of(PID) == []
        stored = office.home_filing("F-130100-OLD")
        assert stored is not None
        assert (stored.receipt, stored.receipt_at_ms) == (FilingStatus.REGISTERED, None)
        office.record_receipt("F-130100-OLD", FilingStatus.REGISTERED)
        again = office.home_filing("F-130100-OLD")
        assert again is not None
        assert again.receipt_at_ms is not None
    finally:
        office.close()
