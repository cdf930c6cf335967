"""Lao Zhang's case end to end through two gateways on the embedded broker, with nothing but
HTTP: Hebei's agency files him, Hainan's hospital admits and discharges him (DELAYED: he pays
a 6,250-yuan advance), Hebei's reviewer approves the claim at the review desk, and Hainan's
claim status shows the 1,250-yuan top-up (personal share 7,500 − advance 6,250)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from adapters.fixtures import LAO_ZHANG_HOSPITAL, LAO_ZHANG_PERSON_ID
from adapters.gateway.service import Gateway
from adapters.gateway.testing import client, gateway_config, running_gateway
from bus.broker import create_contract_topics
from bus.settings import BusSettings
from tests.test_gateway_hospital import DISCHARGE, bill

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
async def hebei_hainan(
    broker: str, settings: BusSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    await create_contract_topics(settings, broker, ["130000", "460000"])
    state = tmp_path_factory.mktemp("e2e")
    async with (
        running_gateway(gateway_config("130000", broker, state, settings=settings)) as hebei,
        running_gateway(gateway_config("460000", broker, state, settings=settings)) as hainan,
    ):
        await asyncio.gather(hebei.system.node.wait_ready(60), hainan.system.node.wait_ready(60))
        yield hebei, hainan


async def until(get: Any, done: Any, *, timeout_s: float = 20.0) -> Any:
    """Poll ``get()`` (an awaitable factory) until ``done(result)``."""
    for _ in range(int(timeout_s / 0.1)):
        result = await get()
        if done(result):
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"not done after {timeout_s} s: {result}")


@pytest.mark.timeout(120)
async def test_lao_zhang_through_the_apis(hebei_hainan: tuple[Gateway, Gateway]) -> None:
    hebei, hainan = hebei_hainan
    async with (
        client(hebei, "agency") as agency,
        client(hainan, "hospital") as desk,
        client(hebei, "reviewer") as reviewer,
    ):
        filed = await agency.post(
            "/v1/filings",
            json={
                "person_id": LAO_ZHANG_PERSON_ID,
                "person_name": "张建国",
                "insurance_type": "EMPLOYEE",
                "home_region": "130100",
                "host_region": "460000",
                "reason": "RELOCATED_RETIREE",
                "valid_from": "2026-01-01",
            },
        )
        assert filed.status_code == 202, filed.text
        filing_id = filed.json()["filing_id"]

        async def filing() -> httpx.Response:
            return await agency.get(f"/v1/filings/{filing_id}")

        registered = await until(filing, lambda r: r.json()["state"] == "REGISTERED")
        assert registered.json()["receipt"]["status"] == "REGISTERED"

        admitted = await desk.post(
            "/v1/admissions",
            json={
                "person_id": LAO_ZHANG_PERSON_ID,
                "home_region": "130100",
                "hospital_code": LAO_ZHANG_HOSPITAL,
                "admitted_at": "2026-05-08T09:30:00+08:00",
            },
        )
        assert admitted.status_code == 201, admitted.text
        assert admitted.json()["mode"] == "DELAYED"
        admission = admitted.json()["admission_id"]
        sent = await desk.post(
            f"/v1/admissions/{admission}/discharge", json={**DISCHARGE, "items": bill()}
        )
        assert sent.status_code == 201, sent.text
        claim_id = sent.json()["claim_id"]
        assert (sent.json()["advance_fen"], sent.json()["advance_yuan"]) == (625_000, "6,250.00")

        async def queue() -> httpx.Response:
            return await reviewer.get("/v1/reviews")

        waiting = await until(
            queue, lambda r: any(x["claim_id"] == claim_id for x in r.json()["reviews"])
        )
        line = next(x for x in waiting.json()["reviews"] if x["claim_id"] == claim_id)
        assert "1234" not in line["person"]  # masked ID number
        opened = (await reviewer.get(f"/v1/reviews/{claim_id}")).json()
        assert len(opened["items"]) == 25

        async def claim() -> httpx.Response:
            return await desk.get(f"/v1/claims/{claim_id}")

        acknowledged = await until(claim, lambda r: r.json()["state"] == "ACKNOWLEDGED")
        assert acknowledged.json()["expected_by"] is not None

        decided = await reviewer.post(
            f"/v1/reviews/{claim_id}/decision", json={"action": "approve", "reviewer": "王审核"}
        )
        assert decided.status_code == 200, decided.text

        settled = (await until(claim, lambda r: r.json()["state"] == "SETTLED")).json()
    assert (settled["advance_fen"], settled["top_up_fen"], settled["refund_fen"]) == (
        625_000,
        125_000,
        0,
    )
    assert (settled["advance_yuan"], settled["top_up_yuan"]) == ("6,250.00", "1,250.00")
    assert settled["review"]["fund_fen"] == 1_750_000
    assert settled["review"]["personal_fen"] == 750_000
    kinds = [e["kind"] for e in settled["timeline"]]
    assert kinds[0] == "submitted"
    assert "acknowledged" in kinds
    assert kinds[-1] == "settled"
