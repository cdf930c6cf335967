"""The review desk's HTTP API on two real gateways: Hebei (130000, home, with its desk) and
Hainan (460000, host) on the module's embedded broker.

Claims reach Hebei's desk the way they do in production: persons are enrolled and filed at the
home, the host's hospital desk admits and discharges them over its own API (Lao Zhang's 25-line
bill each, DELAYED), and the reviews are then read and decided over ``/v1/reviews``. Each
decision is followed to the host, whose claim settles with what the decision implies.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.backoffice import Person
from adapters.fixtures import LAO_ZHANG_HOME_REGION, LAO_ZHANG_HOSPITAL, lao_zhang_items
from adapters.gateway.service import Gateway
from adapters.gateway.testing import client, gateway_config
from adapters.review_desk import ReviewDesk
from adapters.rules import YearUsage, review_adjusted
from bus.broker import create_contract_topics
from bus.logs import mask_id
from bus.models import InsuranceType, ItemAdjustment, ReviewDecision, now
from bus.settings import BusSettings
from simulators.population import id_number, make_filing
from tests.helpers import eventually

pytestmark = pytest.mark.broker

HEBEI, HAINAN = "130000", "460000"
NAMES = ("王建国", "李秀英", "赵志强", "陈玉兰", "刘海燕")
"""The persons' names: never in any answer of the review API."""
LAO_ZHANG_SPLIT = {"fund_fen": 1_750_000, "personal_fen": 750_000, "balance_fen": 125_000}
"""Lao Zhang's bill for a Hebei employee with no usage yet: fund, personal, top-up."""
ADVANCE_FEN = 625_000
TOTAL_FEN = 2_500_000


@dataclass
class Desk:
    """The two gateways and the claims waiting at Hebei's desk, one per test that decides."""

    home: Gateway
    host: Gateway
    claims: dict[str, str]
    """Purpose (``approve``, ``adjust``, ``reject``, ``bad``, ``race``) → claim id."""
    persons: dict[str, str]
    """Claim id → the person's ID number."""

    @property
    def desk(self) -> ReviewDesk:
        desk = self.home.system.home.desk
        assert desk is not None
        return desk


def bill() -> list[dict[str, Any]]:
    """Lao Zhang's bill as the hospital's system sends it."""
    return [
        {
            "item_code": i.item_code,
            "quantity_milli": i.quantity_milli,
            "unit_price_fen": i.unit_price_fen,
        }
        for i in lao_zhang_items()
    ]


async def submit(hospital: httpx.AsyncClient, person_id: str) -> str:
    """Admit and discharge ``person_id`` at Hainan over the hospital API; the claim id."""
    admitted = await hospital.post(
        "/v1/admissions",
        json={
            "person_id": person_id,
            "home_region": LAO_ZHANG_HOME_REGION,
            "hospital_code": LAO_ZHANG_HOSPITAL,
        },
    )
    assert admitted.status_code == 201, admitted.text
    admission_id = admitted.json()["admission_id"]
    sent = await hospital.post(
        f"/v1/admissions/{admission_id}/discharge",
        json={"visit_type": "INPATIENT", "diagnoses": ["I25.1", "I10"], "items": bill()},
    )
    assert sent.status_code == 201, sent.text
    body = sent.json()
    assert body["mode"] == "DELAYED"
    assert body["advance_fen"] == ADVANCE_FEN
    claim_id: str = body["claim_id"]
    return claim_id


@pytest.fixture(scope="module")
async def world(
    broker: str, settings: BusSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Desk]:
    """Hebei and Hainan gateways, five filed persons, five claims queued at Hebei's desk."""
    await create_contract_topics(settings, broker, [HEBEI, HAINAN])
    folder: Path = tmp_path_factory.mktemp("gateway-review")
    home = Gateway(gateway_config(HEBEI, broker, folder / "home", settings=settings))
    host = Gateway(gateway_config(HAINAN, broker, folder / "host", settings=settings))
    started = await asyncio.gather(home.start(), host.start(), return_exceptions=True)
    try:
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        await asyncio.gather(home.system.node.wait_ready(60), host.system.node.wait_ready(60))
        persons: list[str] = []
        for n, name in enumerate(NAMES):
            person = Person(
                id_number(LAO_ZHANG_HOME_REGION, dt.date(1955, 3, 1 + n), 100 + n),
                name,
                InsuranceType.EMPLOYEE,
                LAO_ZHANG_HOME_REGION,
            )
            home.system.backoffice.add_person(person)
            await home.system.home.file(
                make_filing(random.Random(n), person, HAINAN, filed_at=now())
            )
            persons.append(person.person_id)
        office = host.system.backoffice
        await eventually(lambda: all(office.filing_for(p) is not None for p in persons), 30)
        async with client(host, "hospital") as hospital:
            claim_ids = [await submit(hospital, p) for p in persons]
        desk = home.system.home.desk
        assert desk is not None
        await eventually(lambda: all(desk.request_of(c) is not None for c in claim_ids), 30)
        purposes = ("approve", "adjust", "reject", "bad", "race")
        yield Desk(
            home,
            host,
            dict(zip(purposes, claim_ids, strict=True)),
            dict(zip(claim_ids, persons, strict=True)),
        )
    finally:
        await asyncio.gather(home.stop(), host.stop())


async def settled(world: Desk, claim_id: str) -> dict[str, Any]:
    """The host's claim (over the hospital API) once it has settled."""
    async with client(world.host, "hospital") as hospital:
        body: dict[str, Any] = {}

        async def poll() -> bool:
            nonlocal body
            body = (await hospital.get(f"/v1/claims/{claim_id}")).json()
            return body.get("state") == "SETTLED"

        for _ in range(300):
            if await poll():
                return body
            await asyncio.sleep(0.1)
    raise AssertionError(f"claim {claim_id} did not settle at the host: {body}")


# --- reading ----------------------------------------------------------------------------------
async def test_list_open_reviews_earliest_first_masked(world: Desk) -> None:
    """The queue lists our five claims, earliest expected answer first, persons masked, the
    proposal in fen and yuan; ops may read it too; limit bounds it."""
    async with client(world.home, "reviewer") as reviewer:
        resp = await reviewer.get("/v1/reviews")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    listed = {r["claim_id"]: r for r in body["reviews"]}
    assert set(world.claims.values()) <= set(listed)
    assert body["count_open"] == world.desk.count_open() >= 5
    times = [r["expected_by"] for r in body["reviews"]]
    assert times == sorted(times)
    for claim_id, person_id in world.persons.items():
        r = listed[claim_id]
        assert r["person"] == mask_id(person_id)
        assert person_id not in resp.text
        assert (r["host"], r["host_name"]) == (HAINAN, "海南省")
        assert (r["total_fen"], r["total_yuan"]) == (TOTAL_FEN, "25,000.00")
        assert (r["advance_fen"], r["advance_yuan"]) == (ADVANCE_FEN, "6,250.00")
        p = r["proposal"]
        assert {k: p[k] for k in LAO_ZHANG_SPLIT} == LAO_ZHANG_SPLIT
        assert (p["fund_yuan"], p["balance_yuan"]) == ("17,500.00", "1,250.00")
        assert p["decision"] == "PARTIAL"
        assert r["state"] == "OPEN"
        assert r["overdue"] is False
        assert r["accepted_at"] <= r["expected_by"] <= r["due_at"]
    for name in NAMES:
        assert name not in resp.text

    async with client(world.home, "ops") as ops:
        one = await ops.get("/v1/reviews", params={"limit": 1})
        zero = await ops.get("/v1/reviews", params={"limit": 0})
    assert one.status_code == 200
    assert len(one.json()["reviews"]) == 1
    assert one.json()["count_open"] == body["count_open"]
    assert zero.status_code == 422
    assert zero.json()["errors"][0]["field"] == "limit"


async def test_get_one_review_with_items(world: Desk) -> None:
    """One review: the hospital from the directory, the visit, every item code with billed and
    proposed amounts and the rules' reason, the reserved usage; no result while open."""
    claim_id = world.claims["adjust"]
    async with client(world.home, "reviewer") as reviewer:
        resp = await reviewer.get(f"/v1/reviews/{claim_id}")
    assert resp.status_code == 200, resp.text
    r = resp.json()
    assert r["hospital"] == {"code": LAO_ZHANG_HOSPITAL, "name": "海南省人民医院", "level": 3}
    assert r["visit_type"] == "INPATIENT"
    assert r["diagnoses"] == ["I25.1", "I10"]
    assert r["person"] == mask_id(world.persons[claim_id])
    items = {i["item_code"]: i for i in r["items"]}
    assert len(items) == 25
    assert sum(i["amount_fen"] for i in r["items"]) == TOTAL_FEN
    stent = items["T018"]
    assert stent["catalogue_class"] == "A"
    assert (stent["amount_fen"], stent["proposed_fen"]) == (1_178_560, 1_178_560)
    assert (stent["amount_yuan"], stent["item_name"]) == ("11,785.60", "冠状动脉药物洗脱支架")
    escort = items["F007"]  # self-pay: nothing proposed, with the rules' reason
    assert escort["catalogue_class"] == "SELF_PAY"
    assert (escort["amount_fen"], escort["proposed_fen"]) == (100_000, 0)
    assert escort["reason_code"]
    ct = items["T001"]  # class B: 10% self-share
    assert (ct["amount_fen"], ct["proposed_fen"]) == (48_000, 43_200)
    assert r["reserved"]["fund_fen"] == LAO_ZHANG_SPLIT["fund_fen"]
    assert r["result"] is None
    assert r["reviewer"] is None
    assert r["decided_at"] is None
    for name in NAMES:
        assert name not in resp.text


async def test_unknown_and_malformed_claims(world: Desk) -> None:
    """An unknown claim is a 404 to read and to decide; a malformed claim id a 422."""
    unknown = "C-460000-20990101-NOPE"
    async with client(world.home, "reviewer") as reviewer:
        got = await reviewer.get(f"/v1/reviews/{unknown}")
        decided = await reviewer.post(
            f"/v1/reviews/{unknown}/decision", json={"action": "approve", "reviewer": "张审核"}
        )
        malformed = await reviewer.get("/v1/reviews/not-a-claim")
    assert got.status_code == 404
    assert got.headers["content-type"].startswith("application/problem+json")
    assert unknown in got.json()["detail"]
    assert decided.status_code == 404
    assert malformed.status_code == 422
    assert malformed.json()["errors"][0]["field"] == "claim_id"


async def test_tokens_and_roles(world: Desk) -> None:
    """401 without or with a wrong token; 403 for the hospital and agency; ops reads but may
    not decide (403), and nothing is decided by those attempts."""
    claim_id = world.claims["approve"]
    path, decision = f"/v1/reviews/{claim_id}", {"action": "approve", "reviewer": "运维"}
    async with client(world.home) as anonymous:
        assert (await anonymous.get("/v1/reviews")).status_code == 401
        missing = await anonymous.post(f"{path}/decision", json=decision)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = await anonymous.get(path, headers={"Authorization": "Bearer not-a-token"})
        assert wrong.status_code == 401
    for role in ("hospital", "agency"):
        async with client(world.home, role) as other:
            assert (await other.get("/v1/reviews")).status_code == 403
            assert (await other.get(path)).status_code == 403
            assert (await other.post(f"{path}/decision", json=decision)).status_code == 403
    async with client(world.home, "ops") as ops:
        assert (await ops.get(path)).status_code == 200
        refused = await ops.post(f"{path}/decision", json=decision)
    assert refused.status_code == 403
    assert "reviewer" in refused.json()["detail"]
    assert world.desk.get(claim_id).summary.state.value == "OPEN"


# --- bad input writes nothing -----------------------------------------------------------------
BAD_DECISIONS: list[tuple[dict[str, Any], str]] = [
    (
        {"action": "adjust", "adjustments": [
            {"item_code": "T018", "approved_fen": 1, "reason_code": "OVER_STANDARD"},
            {"item_code": "X999", "approved_fen": 1, "reason_code": "OVER_STANDARD"},
        ]},
        "adjustments.1.item_code",
    ),
    (
        {"action": "adjust", "adjustments": [
            {"item_code": "T018", "approved_fen": 1_178_561, "reason_code": "OVER_STANDARD"},
        ]},
        "adjustments.0.approved_fen",
    ),
    (
        {"action": "adjust", "adjustments": [
            {"item_code": "T018", "approved_fen": 10, "reason_code": "A"},
            {"item_code": "T018", "approved_fen": 20, "reason_code": "B"},
        ]},
        "adjustments.1.item_code",
    ),
    (
        {"action": "adjust", "adjustments": [
            {"item_code": "T018", "approved_fen": -1, "reason_code": "OVER_STANDARD"},
        ]},
        "adjustments.0.approved_fen",
    ),
    (
        {"action": "adjust", "adjustments": [
            {"item_code": "T018", "approved_fen": 5, "reason_code": "  "},
        ]},
        "adjustments.0.reason_code",
    ),
    ({"action": "adjust", "adjustments": []}, "adjustments"),
    ({"action": "adjust"}, "adjustments"),
    ({"action": "approve", "adjustments": []}, "adjustments"),
    ({"action": "reject"}, "reason"),
    ({"action": "reject", "reason": "   "}, "reason"),
    ({"action": "approve", "reason": "why not"}, "reason"),
    ({"action": "maybe"}, "action"),
    ({"action": "approve", "reviewer": ""}, "reviewer"),
    ({"action": "approve", "reviewer": "x" * 65}, "reviewer"),
    ({"action": "approve", "reviewer": "   "}, "reviewer"),
    ({"action": "approve", "reviewer": "张\ud800"}, "reviewer"),
    ({"action": "approve", "reviewer": "张\n审核"}, "reviewer"),
    (
        {"action": "adjust", "adjustments": [
            {"item_code": "T018", "approved_fen": 5, "reason_code": "X", "note": "a\x00b"},
        ]},
        "adjustments.0.note",
    ),
    ({"action": "approve", "extra": 1}, "extra"),
]  # fmt: skip


async def test_bad_input_is_422_and_writes_nothing(world: Desk) -> None:
    """Each bad decision is a 422 naming the field; afterwards the review is still open, its
    usage still reserved, nothing was recorded or sent to the host, and it can be decided."""
    claim_id = world.claims["bad"]
    path = f"/v1/reviews/{claim_id}/decision"
    async with client(world.home, "reviewer") as reviewer:
        for body, field in BAD_DECISIONS:
            sent = {"reviewer": "张审核", **body}
            raw = json.dumps(sent)  # escaped: a lone surrogate travels as \ud800
            resp = await reviewer.post(
                path, content=raw, headers={"Content-Type": "application/json"}
            )
            assert resp.status_code == 422, (body, resp.text)
            fields = [e["field"] for e in resp.json()["errors"]]
            assert field in fields, (body, fields)
        after = (await reviewer.get(f"/v1/reviews/{claim_id}")).json()
    assert after["state"] == "OPEN"
    assert after["result"] is None
    assert after["reserved"]["fund_fen"] == LAO_ZHANG_SPLIT["fund_fen"]
    home = world.home.system
    assert home.backoffice.reviewed_for(claim_id) is None
    request_id = world.desk.request_of(claim_id)
    assert any(o.request_id == request_id for o in home.node.owed())
    host_claim = world.host.system.host.claim_status(claim_id)
    assert host_claim is not None
    assert host_claim.review is None
    assert host_claim.state.name != "SETTLED"

    async with client(world.home, "reviewer") as reviewer:
        ok = await reviewer.post(path, json={"action": "approve", "reviewer": "张审核"})
    assert ok.status_code == 200, ok.text
    assert (await settled(world, claim_id))["top_up_fen"] == LAO_ZHANG_SPLIT["balance_fen"]


# --- decisions --------------------------------------------------------------------------------
async def test_approve_settles_and_a_second_decision_is_409(world: Desk) -> None:
    """Approving pays the proposal; the host settles the top-up; the review leaves the queue;
    any second decision is a 409 naming who decided."""
    claim_id = world.claims["approve"]
    path = f"/v1/reviews/{claim_id}"
    async with client(world.home, "reviewer") as reviewer:
        resp = await reviewer.post(
            f"{path}/decision", json={"action": "approve", "reviewer": "张审核"}
        )
        assert resp.status_code == 200, resp.text
        r = resp.json()
        assert r["decision"] == "PARTIAL"  # class B self-share and self-pay items
        assert {k: r[k] for k in LAO_ZHANG_SPLIT} == LAO_ZHANG_SPLIT
        assert (r["top_up_fen"], r["top_up_yuan"]) == (125_000, "1,250.00")
        assert (r["refund_fen"], r["advance_fen"]) == (0, ADVANCE_FEN)
        assert r["reviewer"] == "张审核"

        again = await reviewer.post(
            f"{path}/decision", json={"action": "reject", "reviewer": "李审核", "reason": "迟了"}
        )
        assert again.status_code == 409
        assert "张审核" in again.json()["detail"]
        shown = (await reviewer.get(path)).json()
        queue = (await reviewer.get("/v1/reviews")).json()
    assert shown["state"] == "DECIDED"
    assert shown["reviewer"] == "张审核"
    assert shown["decided_at"] is not None
    assert shown["result"]["fund_fen"] == LAO_ZHANG_SPLIT["fund_fen"]
    assert shown["reserved"]["fund_fen"] == 0
    assert claim_id not in {q["claim_id"] for q in queue["reviews"]}

    host = await settled(world, claim_id)
    assert (host["top_up_fen"], host["refund_fen"]) == (125_000, 0)
    assert host["review"]["fund_fen"] == LAO_ZHANG_SPLIT["fund_fen"]
    assert host["review"]["reviewer"] == "张审核"


async def test_adjust_one_item_settles_what_the_rules_imply(world: Desk) -> None:
    """Adjusting the stent to 8,000.29 yuan: the answer is the rules' review with that
    override, and the host settles exactly that."""
    claim_id = world.claims["adjust"]
    approved = 800_029
    async with client(world.home, "reviewer") as reviewer:
        resp = await reviewer.post(
            f"/v1/reviews/{claim_id}/decision",
            json={
                "action": "adjust",
                "reviewer": "王审核",
                "adjustments": [
                    {
                        "item_code": "T018",
                        "approved_fen": approved,
                        "reason_code": " OVER_STANDARD ",
                        "note": "超出收费标准",
                    },
                ],
            },
        )
    assert resp.status_code == 200, resp.text
    r = resp.json()

    stored = world.host.system.backoffice.claim(claim_id)
    assert stored is not None
    directory = world.home.ctx.directory if world.home.ctx else None
    assert directory is not None
    policy = directory.policy(LAO_ZHANG_HOME_REGION)
    assert policy is not None
    override = ItemAdjustment(
        item_code="T018", approved_fen=approved, reason_code="OVER_STANDARD", note="超出收费标准"
    )
    expected = review_adjusted(
        stored.claim,
        policy,
        YearUsage(),
        [override],
        insurance_type=InsuranceType.EMPLOYEE,
        assistance_eligible=False,
        catalogue_classes=directory.catalogue_classes(HAINAN),
    )
    assert r["decision"] == ReviewDecision.PARTIAL.value == expected.decision.value
    for name in ("eligible_fen", "fund_fen", "personal_fen", "balance_fen", "deductible_fen"):
        assert r[name] == getattr(expected, name), name
    assert r["fund_fen"] < LAO_ZHANG_SPLIT["fund_fen"]
    assert r["top_up_fen"] == expected.balance_fen > 125_000
    stent = [a for a in r["adjustments"] if a["item_code"] == "T018"]
    assert stent == [
        {"item_code": "T018", "approved_fen": approved, "approved_yuan": "8,000.29",
         "reason_code": "OVER_STANDARD", "note": "超出收费标准"},
    ]  # fmt: skip

    host = await settled(world, claim_id)
    assert host["top_up_fen"] == expected.balance_fen
    assert host["review"]["fund_fen"] == expected.fund_fen
    assert host["review"]["decision"] == "PARTIAL"


async def test_reject_the_patient_pays_in_full(world: Desk) -> None:
    """A rejection: the fund pays nothing, every item carries the reason, the patient tops up
    the whole bill less the advance."""
    claim_id = world.claims["reject"]
    async with client(world.home, "reviewer") as reviewer:
        resp = await reviewer.post(
            f"/v1/reviews/{claim_id}/decision",
            json={
                "action": "reject",
                "reviewer": "赵审核",
                "reason": "病历资料不全",
                "reason_code": "NO_RECORDS",
            },
        )
    assert resp.status_code == 200, resp.text
    r = resp.json()
    assert r["decision"] == "REJECTED"
    assert (r["fund_fen"], r["eligible_fen"]) == (0, 0)
    assert r["personal_fen"] == TOTAL_FEN
    assert r["top_up_fen"] == TOTAL_FEN - ADVANCE_FEN
    assert r["top_up_yuan"] == "18,750.00"
    assert len(r["adjustments"]) == 25
    assert {(a["reason_code"], a["note"]) for a in r["adjustments"]} == {
        ("NO_RECORDS", "病历资料不全")
    }
    host = await settled(world, claim_id)
    assert host["top_up_fen"] == TOTAL_FEN - ADVANCE_FEN
    assert host["review"]["decision"] == "REJECTED"


async def test_two_reviewers_at_once_one_wins(world: Desk) -> None:
    """Two decisions of one review at the same time: one 200, one 409 naming the winner."""
    claim_id = world.claims["race"]
    path = f"/v1/reviews/{claim_id}/decision"
    async with client(world.home, "reviewer") as reviewer:
        first, second = await asyncio.gather(
            reviewer.post(path, json={"action": "approve", "reviewer": "甲"}),
            reviewer.post(path, json={"action": "reject", "reviewer": "乙", "reason": "重复"}),
        )
    statuses = sorted([first.status_code, second.status_code])
    assert statuses == [200, 409], (first.text, second.text)
    winner = first if first.status_code == 200 else second
    loser = second if winner is first else first
    assert winner.json()["reviewer"] in loser.json()["detail"]
    host = await settled(world, claim_id)
    assert host["review"]["reviewer"] == winner.json()["reviewer"]


# --- without a desk, and the page -------------------------------------------------------------
async def test_without_a_desk_every_review_endpoint_is_404(
    world: Desk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway whose desk is off answers 404 review-desk-off, clearly."""
    monkeypatch.setattr(world.home.system.home, "desk", None)
    claim_id = world.claims["approve"]
    async with client(world.home, "reviewer") as reviewer:
        answers = [
            await reviewer.get("/v1/reviews"),
            await reviewer.get(f"/v1/reviews/{claim_id}"),
            await reviewer.post(
                f"/v1/reviews/{claim_id}/decision", json={"action": "approve", "reviewer": "x"}
            ),
        ]
    for resp in answers:
        assert resp.status_code == 404
        assert resp.json()["type"].endswith("/review-desk-off")
        assert "review_desk.enabled" in resp.json()["detail"]


async def test_desk_page_is_served(world: Desk) -> None:
    """``/desk`` and its script and style: public, same-origin only, no CDN."""
    async with client(world.home) as anonymous:
        page = await anonymous.get("/desk")
        script = await anonymous.get("/desk/desk.js")
        style = await anonymous.get("/desk/desk.css")
        missing = await anonymous.get("/desk/other.js")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "待审核" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'src="desk/desk.js"' in page.text
    assert "://" not in page.text + script.text + style.text  # nothing from elsewhere
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert "yuanToFen" in script.text
    assert style.status_code == 200
    assert style.headers["content-type"].startswith("text/css")
    assert missing.status_code == 404
