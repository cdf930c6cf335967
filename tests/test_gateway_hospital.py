"""The hospital desk's API on a real gateway pair (Hebei home with its review desk, Hainan
host): admit or refuse, discharge into a claim, the claim's status, the operators' actions;
and what every endpoint answers without a token, with another role's, or with bad input."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.backoffice import Person
from adapters.fixtures import (
    LAO_ZHANG_HOME_REGION,
    LAO_ZHANG_HOSPITAL,
    LAO_ZHANG_PERSON_ID,
    lao_zhang_items,
)
from adapters.gateway.service import Gateway
from adapters.gateway.testing import client, gateway_config, running_gateway
from bus.broker import create_contract_topics
from bus.models import FilingAction, FilingChannel, FilingReason, FilingUpload, InsuranceType
from bus.settings import BusSettings
from tests.helpers import eventually

pytestmark = pytest.mark.broker

CST = dt.timezone(dt.timedelta(hours=8))
ADMITTED_AT = "2026-05-08T09:30:00+08:00"
UNFILED = "130102198001011111"


def bill() -> list[dict[str, Any]]:
    """Lao Zhang's bill as a hospital system sends it: codes, quantities, prices."""
    return [
        {"item_code": i.item_code, "quantity_milli": i.quantity_milli,
         "unit_price_fen": i.unit_price_fen}
        for i in lao_zhang_items()
    ]  # fmt: skip


DISCHARGE = {
    "visit_type": "INPATIENT",
    "diagnoses": ["I25.1", "I10"],
    "discharged_at": "2026-05-23T10:00:00+08:00",
}


async def file_at_home(home: Gateway, person_id: str) -> None:
    """File a person at the home (as its counter would)."""
    person = Person(person_id, "张建国", InsuranceType.EMPLOYEE, LAO_ZHANG_HOME_REGION)
    home.system.backoffice.add_person(person)
    await home.system.home.file(
        FilingUpload(
            filing_id=f"F-130100-{person_id[-6:]}",
            action=FilingAction.CREATE,
            person_id=person_id,
            person_name=person.name,
            insurance_type=person.insurance_type,
            home_region=LAO_ZHANG_HOME_REGION,
            host_region="460000",
            reason=FilingReason.RELOCATED_RETIREE,
            channel=FilingChannel.COUNTER,
            valid_from=dt.date(2026, 1, 1),
            filed_at=dt.datetime(2026, 1, 2, 9, 0, tzinfo=CST),
        )
    )


async def file_person(home: Gateway, host: Gateway, person_id: str) -> None:
    """File a person at the home and wait for the host to have the filing."""
    await file_at_home(home, person_id)
    for _ in range(200):
        if host.system.backoffice.filing_for(person_id) is not None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the filing never reached the host")


@pytest.fixture(scope="module")
async def pair(
    broker: str, settings: BusSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    await create_contract_topics(settings, broker, ["130000", "460000"])
    state = tmp_path_factory.mktemp("gateways")
    home_cfg = gateway_config("130000", broker, state, settings=settings)
    host_cfg = gateway_config("460000", broker, state, settings=settings)
    async with running_gateway(home_cfg) as home, running_gateway(host_cfg) as host:
        await asyncio.gather(home.system.node.wait_ready(60), host.system.node.wait_ready(60))
        await file_person(home, host, LAO_ZHANG_PERSON_ID)
        yield home, host


async def admit(host: Gateway, person_id: str = LAO_ZHANG_PERSON_ID, **extra: Any) -> Any:
    body = {
        "person_id": person_id,
        "home_region": LAO_ZHANG_HOME_REGION,
        "hospital_code": LAO_ZHANG_HOSPITAL,
        "admitted_at": ADMITTED_AT,
        **extra,
    }
    async with client(host, "hospital") as c:
        return await c.post("/v1/admissions", json=body)


class TestAdmit:
    async def test_a_filed_patient_is_admitted_under_the_agreements_mode(
        self, pair: tuple[Gateway, Gateway]
    ) -> None:
        _, host = pair
        r = await admit(host)
        assert r.status_code == 201
        body = r.json()
        assert body["outcome"] == "ADMITTED"
        assert body["mode"] == "DELAYED"
        assert body["admission_id"].startswith("A-460000-")
        assert body["filing_id"] == "F-130100-151234"

    async def test_an_unfiled_patient_is_refused_with_code_and_desk_text(
        self, pair: tuple[Gateway, Gateway]
    ) -> None:
        home, host = pair
        before = len(home.system.home.reports)
        r = await admit(host, UNFILED)
        assert r.status_code == 200
        body = r.json()
        assert body["outcome"] == "REFUSED"
        assert body["code"] == "NOT_FILED"
        assert "备案" in body["desk_text"]
        assert "admission_id" not in body
        for _ in range(100):  # the home is told (报错联系)
            if len(home.system.home.reports) > before:
                break
            await asyncio.sleep(0.05)
        assert home.system.home.reports[-1].code.value == "NOT_FILED"

    async def test_no_token_wrong_token_and_another_role(
        self, pair: tuple[Gateway, Gateway]
    ) -> None:
        _, host = pair
        body = {"person_id": LAO_ZHANG_PERSON_ID, "home_region": "130100", "hospital_code": "H1"}
        async with client(host) as c:
            r = await c.post("/v1/admissions", json=body)
            assert r.status_code == 401
            assert r.headers["content-type"] == "application/problem+json"
            assert r.headers["www-authenticate"].startswith("Bearer")
            wrong = await c.post(
                "/v1/admissions", json=body, headers={"Authorization": "Bearer nope"}
            )
            assert wrong.status_code == 401
        async with client(host, "agency") as c:
            r = await c.post("/v1/admissions", json=body)
            assert r.status_code == 403
            assert r.json()["detail"] == "role agency may not do this (needs hospital)"

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"person_id": "13010219520315123"}, "person_id"),
            ({"home_region": "999900"}, "home_region"),
            ({"home_region": "460100"}, "home_region"),
            ({"admitted_at": "2026-05-08T09:30:00"}, "admitted_at"),
            ({"hospital_code": ""}, "hospital_code"),
            ({"extra": 1}, "extra"),
        ],
    )
    async def test_bad_input_names_the_field(
        self, pair: tuple[Gateway, Gateway], change: dict[str, Any], field: str
    ) -> None:
        _, host = pair
        r = await admit(host, **change)
        assert r.status_code == 422
        problem = r.json()
        assert problem["status"] == 422
        assert problem["errors"][0]["field"] == field
        assert problem["detail"].startswith(f"{field}: ")
        assert LAO_ZHANG_PERSON_ID not in r.text  # input is never echoed


class TestDischarge:
    async def test_discharge_sends_the_claim_and_collects_the_advance(
        self, pair: tuple[Gateway, Gateway]
    ) -> None:
        _, host = pair
        admission = (await admit(host)).json()["admission_id"]
        async with client(host, "hospital") as c:
            r = await c.post(
                f"/v1/admissions/{admission}/discharge", json={**DISCHARGE, "items": bill()}
            )
            assert r.status_code == 201
            sent = r.json()
            assert sent["claim_id"] == "C-" + admission.removeprefix("A-")
            assert (sent["mode"], sent["total_fen"]) == ("DELAYED", 2_500_000)
            assert (sent["advance_fen"], sent["advance_yuan"]) == (625_000, "6,250.00")
            again = await c.post(
                f"/v1/admissions/{admission}/discharge", json={**DISCHARGE, "items": bill()}
            )
            assert again.status_code == 200
            assert again.json()["claim_id"] == sent["claim_id"]
            assert len(host.system.backoffice.payments(sent["claim_id"])) == 1  # one advance
            seen = await c.get(f"/v1/admissions/{admission}")
            assert seen.json()["claim_id"] == sent["claim_id"]
            status = await c.get(f"/v1/claims/{sent['claim_id']}")
        assert status.status_code == 200
        claim = status.json()
        assert claim["advance_fen"] == 625_000
        assert claim["timeline"][0]["kind"] == "submitted"

    async def test_an_item_not_in_the_catalogue_is_named_and_nothing_is_sent(
        self, pair: tuple[Gateway, Gateway]
    ) -> None:
        _, host = pair
        admission = (await admit(host)).json()["admission_id"]
        items = bill()
        items[3] = {**items[3], "item_code": "NOPE"}
        async with client(host, "hospital") as c:
            r = await c.post(
                f"/v1/admissions/{admission}/discharge", json={**DISCHARGE, "items": items}
            )
        assert r.status_code == 422
        assert r.json()["errors"] == [
            {"field": "items.3.item_code", "message": "NOPE is not in 460000's catalogue"}
        ]
        assert host.system.backoffice.claim("C-" + admission.removeprefix("A-")) is None

    async def test_discharge_before_admission_and_unknown_admission(
        self, pair: tuple[Gateway, Gateway]
    ) -> None:
        _, host = pair
        admission = (await admit(host)).json()["admission_id"]
        early = {**DISCHARGE, "discharged_at": "2026-05-01T10:00:00+08:00", "items": bill()}
        async with client(host, "hospital") as c:
            r = await c.post(f"/v1/admissions/{admission}/discharge", json=early)
            assert r.status_code == 422
            assert r.json()["errors"][0]["field"] == "discharged_at"
            missing = await c.post(
                "/v1/admissions/A-460000-NOSUCH/discharge", json={**DISCHARGE, "items": bill()}
            )
            assert missing.status_code == 404
            bad_id = await c.get("/v1/admissions/not-an-id")
            assert bad_id.status_code == 422
        async with client(host, "reviewer") as c:
            r = await c.post(f"/v1/admissions/{admission}/discharge", json=early)
            assert r.status_code == 403


class TestClaims:
    async def test_unknown_claim_and_roles(self, pair: tuple[Gateway, Gateway]) -> None:
        _, host = pair
        async with client(host, "hospital") as c:
            assert (await c.get("/v1/claims/C-460000-NOSUCH")).status_code == 404
        async with client(host, "ops") as c:
            assert (await c.get("/v1/claims/C-460000-NOSUCH")).status_code == 404
            r = await c.post("/v1/claims/C-460000-NOSUCH/resend")
            assert r.status_code == 404
        async with client(host, "reviewer") as c:
            assert (await c.get("/v1/claims/C-460000-NOSUCH")).status_code == 403
        async with client(host) as c:
            assert (await c.get("/v1/claims/C-460000-NOSUCH")).status_code == 401

    async def test_a_claim_within_its_deadline_cannot_be_closed(
        self, pair: tuple[Gateway, Gateway]
    ) -> None:
        _, host = pair
        admission = (await admit(host)).json()["admission_id"]
        async with client(host, "hospital") as c:
            sent = await c.post(
                f"/v1/admissions/{admission}/discharge", json={**DISCHARGE, "items": bill()}
            )
            claim_id = sent.json()["claim_id"]
            forbidden = await c.post(
                f"/v1/claims/{claim_id}/close",
                json={"decision": "KEEP_ADVANCE", "reason": "x", "operator": "li"},
            )
            assert forbidden.status_code == 403
        async with client(host, "ops") as c:
            r = await c.post(
                f"/v1/claims/{claim_id}/close",
                json={"decision": "KEEP_ADVANCE", "reason": "no answer", "operator": "li"},
            )
            assert r.status_code == 409
            assert "can be closed once overdue" in r.json()["detail"]
            bad = await c.post(
                f"/v1/claims/{claim_id}/close",
                json={"decision": "KEEP_IT", "reason": "x", "operator": "li"},
            )
            assert bad.status_code == 422
            assert bad.json()["errors"][0]["field"] == "decision"
        status = host.system.host.claim_status(claim_id)
        assert status is not None
        assert status.close_decision is None


def state_of(host: Gateway, claim_id: str) -> str | None:
    claim = host.system.backoffice.claim(claim_id)
    return None if claim is None else claim.state.name


async def settle_one(home: Gateway, host: Gateway) -> str:
    """Admit, discharge, approve at the home's desk, wait until settled; the claim id."""
    admission = (await admit(host)).json()["admission_id"]
    async with client(host, "hospital") as c:
        sent = await c.post(
            f"/v1/admissions/{admission}/discharge", json={**DISCHARGE, "items": bill()}
        )
    claim_id: str = sent.json()["claim_id"]
    desk = home.system.home.desk
    assert desk is not None
    await eventually(lambda: desk.request_of(claim_id) is not None, 20)
    async with client(home, "reviewer") as r:
        decided = await r.post(
            f"/v1/reviews/{claim_id}/decision", json={"action": "approve", "reviewer": "li"}
        )
    assert decided.status_code == 200
    await eventually(lambda: state_of(host, claim_id) == "SETTLED", 20)
    return claim_id


class TestReversal:
    async def test_a_settled_claim_is_reversed_once(self, pair: tuple[Gateway, Gateway]) -> None:
        """Discharge, the reviewer approves, the claim settles; the hospital asks for a
        reversal (202), the home confirms, the claim shows REVERSED with the patient's money
        given back; asking again is a 409, a bad reason a 422, another role a 403."""
        home, host = pair
        claim_id = await settle_one(home, host)
        body = {"reason": "DUPLICATE_BILL", "note": "billed twice", "operator": "billing-wang"}
        async with client(host, "hospital") as c:
            asked = await c.post(f"/v1/claims/{claim_id}/reversal", json=body)
            assert asked.status_code == 202, asked.text
            assert asked.json()["state"] == "REQUESTED"
            await eventually(lambda: state_of(host, claim_id) == "REVERSED", 20)
            shown = (await c.get(f"/v1/claims/{claim_id}")).json()
            assert shown["state"] == "REVERSED"
            assert shown["reversal_state"] == "CONFIRMED"
            assert shown["patient_paid_fen"] == 0
            assert shown["reversal_refund_fen"] == shown["advance_fen"] + shown["top_up_fen"]
            again = await c.post(f"/v1/claims/{claim_id}/reversal", json=body)
            assert again.status_code == 409
            unknown = {**body, "reason": "UNKNOWN"}
            bad = await c.post(f"/v1/claims/{claim_id}/reversal", json=unknown)
            assert bad.status_code == 422
            assert bad.json()["errors"][0]["field"] == "reason"
            missing = await c.post("/v1/claims/C-460000-NOPE/reversal", json=body)
            assert missing.status_code == 404
        async with client(host, "agency") as other:
            refused = await other.post(f"/v1/claims/{claim_id}/reversal", json=body)
            assert refused.status_code == 403


async def test_the_openapi_document_lists_the_hospital_routes(
    pair: tuple[Gateway, Gateway], tmp_path: Path
) -> None:
    _, host = pair
    async with client(host) as c:
        doc = (await c.get("/openapi.json")).json()
        docs = await c.get("/docs")
    assert docs.status_code == 200
    assert {
        "/v1/admissions",
        "/v1/admissions/{admission_id}/discharge",
        "/v1/claims/{claim_id}",
    } <= (set(doc["paths"]))
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


async def test_readyz_names_what_fails(pair: tuple[Gateway, Gateway]) -> None:
    """Ready with every check passing; the console's broker probe failing makes it 503
    with the broker check named (the gateway has one probe: its console's)."""
    _, host = pair
    async with client(host) as c:
        ready = await c.get("/readyz")
        assert ready.status_code == 200
        assert {x["name"] for x in ready.json()["checks"] if x["ok"]} == {
            "broker", "partitions", "store", "workers", "draining"
        }  # fmt: skip
        assert host.ctx is not None
        assert host.ctx.console is not None
        broker = host.ctx.console.broker
        broker.set("no answer within 5 s")
        try:
            down = await c.get("/readyz")
        finally:
            broker.set(None)
    assert down.status_code == 503
    failing = [x for x in down.json()["checks"] if not x["ok"]]
    assert [(x["name"], x["detail"]) for x in failing] == [
        ("broker", "unreachable: no answer within 5 s")
    ]


async def test_ops_state_and_see_the_day_and_the_month(pair: tuple[Gateway, Gateway]) -> None:
    """Ops of the host state today's reconciliation and this month's clearing over the API
    and see the homes' answers; a bad month is a 422 naming it; another role a 403."""
    home, host = pair
    await settle_one(home, host)
    async with client(host, "ops") as c:
        day = await c.post("/v1/ops/reconciliation", json={})
        month = await c.post("/v1/ops/clearing", json={})
        assert (day.status_code, month.status_code) == (202, 202)

        async def answered(path: str, key: str) -> list[dict[str, Any]]:
            for _ in range(100):
                rows: list[dict[str, Any]] = (await c.get(path)).json()[key]
                if rows and all(r["outcome"] != "SENT" for r in rows):
                    return rows
                await asyncio.sleep(0.2)
            raise AssertionError(f"{path}: not answered")

        stated = await answered("/v1/ops/reconciliation", "statements")
        assert {s["statement_id"] for s in stated} >= set(day.json()["statement_ids"])
        assert all(s["outcome"] == "MATCHED" for s in stated)
        cleared = await answered("/v1/ops/clearing", "months")
        mine = [m for m in cleared if m["statement_id"] in month.json()["statement_ids"]]
        assert mine
        assert all(m["outcome"] == "CONFIRMED" for m in mine)
        assert all(m["confirmed_fen"] == m["stated_fen"] for m in mine)
        bad = await c.post("/v1/ops/clearing", json={"month": "2026-13"})
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["field"] == "month"
    async with client(host, "hospital") as other:
        assert (await other.get("/v1/ops/clearing")).status_code == 403
