"""The agency counter API: filings created, updated, revoked and read, on the real broker.

A Hebei gateway (130000, the home) files to a Hainan gateway (460000, the host); both run for
the whole module.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.gateway.service import Gateway
from adapters.gateway.testing import client, gateway_config
from bus.broker import create_contract_topics
from bus.models import FilingAction
from bus.settings import BusSettings
from bus.store import ANSWERED, DELIVERED, EXPIRED, LATE, PENDING
from tests.helpers import eventually

pytestmark = pytest.mark.broker

HEBEI, HAINAN = "130000", "460000"
_serial = itertools.count(1)


def new_person_id() -> str:
    """An ID number no other test of the module uses (Shijiazhuang, born 1952-03-15)."""
    return f"13010219520315{next(_serial):04d}"


def filing_body(person_id: str, /, **changes: Any) -> dict[str, Any]:
    """A valid filing of a Shijiazhuang retiree to Hainan."""
    body: dict[str, Any] = {
        "person_id": person_id,
        "person_name": "张建国",
        "insurance_type": "EMPLOYEE",
        "home_region": "130100",
        "host_region": HAINAN,
        "reason": "RELOCATED_RETIREE",
        "valid_from": "2026-01-01",
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def requests_sent(gw: Gateway) -> int:
    """How many requests the province ever sent (in any state)."""
    store = gw.system.node.store
    return sum(store.count(s) for s in (PENDING, ANSWERED, DELIVERED, EXPIRED, LATE))


@pytest.fixture(scope="module")
async def gateways(
    broker: str, settings: BusSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Hebei and Hainan gateways on the module's broker, started together."""
    await create_contract_topics(settings, broker, [HEBEI, HAINAN])
    root: Path = tmp_path_factory.mktemp("agency")
    hebei = Gateway(gateway_config(HEBEI, broker, root / "hebei", settings=settings))
    hainan = Gateway(gateway_config(HAINAN, broker, root / "hainan", settings=settings))
    await asyncio.gather(hebei.start(), hainan.start())
    try:
        await asyncio.gather(hebei.system.node.wait_ready(), hainan.system.node.wait_ready())
        yield hebei, hainan
    finally:
        await asyncio.gather(hebei.stop(), hainan.stop())


@pytest.fixture
def hebei(gateways: tuple[Gateway, Gateway]) -> Gateway:
    """The home gateway."""
    return gateways[0]


@pytest.fixture
def hainan(gateways: tuple[Gateway, Gateway]) -> Gateway:
    """The host gateway."""
    return gateways[1]


async def file(gw: Gateway, body: dict[str, Any]) -> httpx.Response:
    """POST a filing as the agency."""
    async with client(gw, "agency") as http:
        return await http.post("/v1/filings", json=body)


async def state_of(gw: Gateway, filing_id: str) -> dict[str, Any]:
    """GET a filing as the agency (must be 200)."""
    async with client(gw, "agency") as http:
        response = await http.get(f"/v1/filings/{filing_id}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def wait_state(gw: Gateway, filing_id: str, state: str) -> dict[str, Any]:
    """The filing once its state is ``state`` (fails after 10 s)."""
    for _ in range(200):
        data = await state_of(gw, filing_id)
        if data["state"] == state:
            return data
        await asyncio.sleep(0.05)
    raise AssertionError(f"{filing_id} never reached {state}: {data}")


class TestCreate:
    async def test_filing_reaches_the_host_and_is_registered(
        self, hebei: Gateway, hainan: Gateway
    ) -> None:
        """A filing made at the Hebei counter is registered in Hainan; the home shows
        REGISTERED with the receipt within seconds; the person is enrolled with it."""
        pid = new_person_id()
        response = await file(hebei, filing_body(pid, assistance_eligible=True))
        assert response.status_code == 202, response.text
        sent = response.json()
        assert re.fullmatch(r"F-130100-\d{8}-[0-9A-F]{6}", sent["filing_id"])
        assert (sent["action"], sent["host"], sent["host_name"]) == ("CREATE", HAINAN, "海南省")
        assert sent["person_id"] == pid
        assert sent["person_name"] == "张**"
        assert sent["channel"] == "COUNTER"
        person = hebei.system.backoffice.person(pid)
        assert person is not None
        assert (person.name, person.home_region, person.assistance_eligible) == (
            "张建国",
            "130100",
            True,
        )
        done = await wait_state(hebei, sent["filing_id"], "REGISTERED")
        assert done["receipt"]["status"] == "REGISTERED"
        assert done["receipt"]["received_at"] is not None
        registered = hainan.system.backoffice.filing_for(pid)
        assert registered is not None
        assert registered.filing_id == sent["filing_id"]

    async def test_host_public_status_masked_without_token(
        self, hebei: Gateway, hainan: Gateway
    ) -> None:
        """At the host, the public filing-status query shows the filing masked without a
        token and unmasked with a hospital token; an invalid token is 401."""
        pid = new_person_id()
        sent = (await file(hebei, filing_body(pid, host_region="460100"))).json()
        await eventually(lambda: hainan.system.backoffice.filing_for(pid) is not None)
        async with client(hainan) as public:
            masked = await public.post("/v1/public/filing-status", json={"person_id": pid})
        assert masked.status_code == 200, masked.text
        data = masked.json()
        assert data["person_id"] == pid[:6] + "*" * 10 + pid[-2:]
        assert data["person_name"] == "张**"
        (filing,) = data["filings"]
        assert (filing["side"], filing["filing_id"], filing["state"]) == (
            "HOST",
            sent["filing_id"],
            "REGISTERED",
        )
        assert filing["host_region_name"] == "海口市"
        async with client(hainan, "hospital") as desk:
            plain = (await desk.post("/v1/public/filing-status", json={"person_id": pid})).json()
        assert (plain["person_id"], plain["person_name"]) == (pid, "张建国")
        async with client(hainan, headers={"Authorization": "Bearer wrong"}) as forged:
            refused = await forged.post("/v1/public/filing-status", json={"person_id": pid})
        assert refused.status_code == 401

    async def test_given_filing_id_is_idempotent(self, hebei: Gateway) -> None:
        """The same filing id with the same content is 200 and sends nothing; with other
        content it is 409 and changes nothing."""
        pid = new_person_id()
        body = filing_body(pid, filing_id="F-130100-COUNTER-0001", channel="PHONE")
        first = await file(hebei, body)
        assert first.status_code == 202, first.text
        sent = requests_sent(hebei)
        again = await file(hebei, body)
        assert again.status_code == 200
        assert again.json()["filing_id"] == "F-130100-COUNTER-0001"
        other = await file(hebei, {**body, "host_region": "460200"})
        assert other.status_code == 409
        assert other.headers["content-type"] == "application/problem+json"
        assert requests_sent(hebei) == sent
        assert len(hebei.system.backoffice.filings_of(pid)) == 1

    async def test_province_code_in_filing_id_accepted(self, hebei: Gateway) -> None:
        """A given id may carry the province's own code instead of a region's."""
        response = await file(hebei, filing_body(new_person_id(), filing_id="F-130000-X1"))
        assert response.status_code == 202, response.text


BAD_FILINGS = [
    ("home_region", {"home_region": "460100"}),
    ("home_region", {"home_region": "139999"}),
    ("host_region", {"host_region": "469999"}),
    ("host_region", {"host_region": "130100"}),
    ("host_region", {"host_region": "440100"}),  # Shijiazhuang has no agreement with Guangdong
    ("valid_until", {"valid_from": "2026-06-01", "valid_until": "2026-05-31"}),
    ("referral_hospital", {"referral_hospital": "H13010001"}),
    ("filing_id", {"filing_id": "F-460100-1"}),
    ("filing_id", {"filing_id": "X-130100-1"}),
    ("person_id", {"person_id": "13010219520315123"}),
    ("person_name", {"person_name": "   "}),
    ("insurance_type", {"insurance_type": "GOLD"}),
    ("filed_at", {"filed_at": "2026-05-02T09:30:00"}),
    ("extra", {"extra": 1}),
]


@pytest.mark.parametrize(("field", "changes"), BAD_FILINGS, ids=[f for f, _ in BAD_FILINGS])
async def test_bad_filing_is_422_naming_the_field_and_nothing_is_stored(
    hebei: Gateway, field: str, changes: dict[str, Any]
) -> None:
    """Bad input is a 422 naming the field; no filing, person or request is stored."""
    pid = new_person_id()
    sent = requests_sent(hebei)
    response = await file(hebei, filing_body(pid, **changes))
    assert response.status_code == 422, response.text
    problem = response.json()
    assert field in [e["field"] for e in problem["errors"]]
    assert pid not in response.text  # input values are never echoed
    assert hebei.system.backoffice.filings_of(pid) == []
    assert hebei.system.backoffice.person(pid) is None
    assert requests_sent(hebei) == sent


class TestAccess:
    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("POST", "/v1/filings"),
            ("GET", "/v1/filings/F-130100-1"),
            ("PUT", "/v1/filings/F-130100-1"),
            ("POST", "/v1/filings/F-130100-1/revoke"),
        ],
    )
    async def test_tokens(self, hebei: Gateway, method: str, path: str) -> None:
        """No token and a wrong token are 401 (with WWW-Authenticate); a hospital token
        is 403."""
        body: dict[str, Any] | None = {} if method != "GET" else None
        async with client(hebei) as anonymous:
            response = await anonymous.request(method, path, json=body)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        async with client(hebei, headers={"Authorization": "Bearer nope"}) as forged:
            assert (await forged.request(method, path, json=body)).status_code == 401
        async with client(hebei, "hospital") as desk:
            assert (await desk.request(method, path, json=body)).status_code == 403

    async def test_ops_may_read_but_not_file(self, hebei: Gateway) -> None:
        """Ops reads filings (404 for an unknown one) but may not file."""
        async with client(hebei, "ops") as ops:
            assert (await ops.get("/v1/filings/F-130100-NONE")).status_code == 404
            response = await ops.post("/v1/filings", json=filing_body(new_person_id()))
        assert response.status_code == 403


class TestRead:
    async def test_unknown_filing_is_404(self, hebei: Gateway) -> None:
        """An unknown filing id is 404 for GET, PUT and revoke."""
        async with client(hebei, "agency") as http:
            assert (await http.get("/v1/filings/F-130100-NONE")).status_code == 404
            put = await http.put("/v1/filings/F-130100-NONE", json={"reason": "REFERRAL"})
            assert put.status_code == 404
            revoke = await http.post("/v1/filings/F-130100-NONE/revoke")
            assert revoke.status_code == 404

    @pytest.mark.parametrize("bad", ["F-13010-1", "G-130100-1", "F-130100-" + "x" * 61])
    async def test_bad_filing_id_in_path_is_422(self, hebei: Gateway, bad: str) -> None:
        """A path that is not a filing id is a 422 naming ``filing_id``."""
        async with client(hebei, "agency") as http:
            response = await http.get(f"/v1/filings/{bad}")
        assert response.status_code == 422
        assert [e["field"] for e in response.json()["errors"]] == ["filing_id"]


class TestUpdateAndRevoke:
    async def test_update_keeps_unspecified_fields(self, hebei: Gateway, hainan: Gateway) -> None:
        """An update changes what it names, keeps the rest, and the host registers it as
        UPDATED."""
        pid = new_person_id()
        created = (await file(hebei, filing_body(pid, valid_until="2026-12-31"))).json()
        fid = created["filing_id"]
        await wait_state(hebei, fid, "REGISTERED")
        async with client(hebei, "agency") as http:
            response = await http.put(
                f"/v1/filings/{fid}",
                json={"host_region": "460200", "valid_until": "2027-06-30"},
            )
        assert response.status_code == 202, response.text
        updated = response.json()
        assert (updated["action"], updated["state"]) == ("UPDATE", "SENT")
        assert (updated["host_region"], updated["valid_until"]) == ("460200", "2027-06-30")
        assert (updated["reason"], updated["valid_from"]) == ("RELOCATED_RETIREE", "2026-01-01")
        done = await wait_state(hebei, fid, "UPDATED")
        assert done["receipt"]["status"] == "UPDATED"
        at_host = hainan.system.backoffice.filing_for(pid)
        assert at_host is not None
        assert (at_host.action, at_host.host_region) == (FilingAction.UPDATE, "460200")

    async def test_update_checks_its_fields(self, hebei: Gateway) -> None:
        """An update to another province, an end before the start, a null reason and an
        empty body are 422 naming the field; nothing is sent."""
        fid = (await file(hebei, filing_body(new_person_id()))).json()["filing_id"]
        sent = requests_sent(hebei)
        cases = [
            ({"host_region": "530100"}, "host_region"),  # Yunnan: another province
            ({"valid_until": "2025-12-31"}, "valid_until"),
            ({"reason": None}, "reason"),
            ({}, "body"),
            ({"person_id": "130102195203151234"}, "person_id"),
        ]
        async with client(hebei, "agency") as http:
            for body, field in cases:
                response = await http.put(f"/v1/filings/{fid}", json=body)
                assert response.status_code == 422, (body, response.text)
                assert [e["field"] for e in response.json()["errors"]] == [field]
        assert requests_sent(hebei) == sent
        assert (await state_of(hebei, fid))["action"] == "CREATE"

    async def test_revoke_once_then_200_and_update_409(
        self, hebei: Gateway, hainan: Gateway
    ) -> None:
        """Revoking sends a REVOKE the host registers; revoking again is 200 and sends
        nothing; updating a revoked filing is 409."""
        pid = new_person_id()
        fid = (await file(hebei, filing_body(pid))).json()["filing_id"]
        async with client(hebei, "agency") as http:
            first = await http.post(f"/v1/filings/{fid}/revoke")
            assert first.status_code == 202, first.text
            assert first.json()["action"] == "REVOKE"
            await wait_state(hebei, fid, "REVOKED")
            sent = requests_sent(hebei)
            second = await http.post(f"/v1/filings/{fid}/revoke")
            assert second.status_code == 200
            assert second.json()["state"] == "REVOKED"
            put = await http.put(f"/v1/filings/{fid}", json={"reason": "REFERRAL"})
            assert put.status_code == 409
        assert requests_sent(hebei) == sent
        at_host = hainan.system.backoffice.filing_for(pid)
        assert at_host is not None
        assert at_host.action is FilingAction.REVOKE
