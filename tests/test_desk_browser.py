"""The review desk page in a real headless Chromium: Lao Zhang's DELAYED claim waits at Hebei's
desk; a reviewer signs in, opens it, cuts the class-A stent (T018) to 8,000.29 yuan, confirms
in the page's dialog, and Hainan's claim settles with exactly what that adjustment implies.

Needs a chromium binary and a CJK font (``scripts/install-browser.sh`` installs Debian's
``chromium`` and ``fonts-noto-cjk``) and Playwright for Python, which drives that binary (no
Playwright browser download). Skips without chromium.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
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
from adapters.gateway.config import ReviewDeskConfig
from adapters.gateway.service import Gateway
from adapters.gateway.testing import TEST_TOKENS, client, gateway_config
from adapters.rules import YearUsage, review_adjusted
from bus.broker import create_contract_topics
from bus.logs import mask_id
from bus.models import (
    FilingAction,
    FilingChannel,
    FilingReason,
    FilingUpload,
    InsuranceType,
    ItemAdjustment,
    now,
    yuan,
)
from bus.settings import BusSettings
from simulators.population import id_number
from tests.helpers import eventually
from tests.test_console_browser import chromium

pytestmark = pytest.mark.broker

HEBEI, HAINAN = "130000", "460000"
SCREENSHOT = Path("/tmp/xsettle-desk.png")  # noqa: S108 (a fixed path people can open)
LAO_ZHANG_NAME = "张建国"
OTHER_NAME = "李秀英"
STENT_APPROVED_FEN = 800_029
"""8,000.29 yuan: typed as a decimal string, must arrive as exactly this many fen."""


@dataclass
class World:
    home: Gateway
    host: Gateway
    claim_id: str
    """Lao Zhang's claim."""
    other_claim_id: str
    """Another person's claim, which a second reviewer decides while the page shows it."""


async def file_and_discharge(home: Gateway, host: Gateway, person: Person) -> str:
    """``person`` enrolled and filed at Hebei, admitted and discharged at Hainan with Lao
    Zhang's bill over the hospital API; the claim id, once it waits at Hebei's desk."""
    home.system.backoffice.add_person(person)
    await home.system.home.file(
        FilingUpload(
            filing_id=f"F-{LAO_ZHANG_HOME_REGION}-DESK-{person.person_id[-6:]}",
            action=FilingAction.CREATE,
            person_id=person.person_id,
            person_name=person.name,
            insurance_type=person.insurance_type,
            home_region=LAO_ZHANG_HOME_REGION,
            host_region=HAINAN,
            reason=FilingReason.RELOCATED_RETIREE,
            channel=FilingChannel.COUNTER,
            valid_from=dt.date.today() - dt.timedelta(days=30),
            filed_at=now(),
        )
    )
    office = host.system.backoffice
    await eventually(lambda: office.filing_for(person.person_id) is not None, 30)
    async with client(host, "hospital") as hospital:
        admitted = await hospital.post(
            "/v1/admissions",
            json={
                "person_id": person.person_id,
                "home_region": LAO_ZHANG_HOME_REGION,
                "hospital_code": LAO_ZHANG_HOSPITAL,
            },
        )
        assert admitted.status_code == 201, admitted.text
        items = [
            {"item_code": i.item_code, "quantity_milli": i.quantity_milli,
             "unit_price_fen": i.unit_price_fen}
            for i in lao_zhang_items()
        ]  # fmt: skip
        sent = await hospital.post(
            f"/v1/admissions/{admitted.json()['admission_id']}/discharge",
            json={"visit_type": "INPATIENT", "diagnoses": ["I25.1", "I10"], "items": items},
        )
        assert sent.status_code == 201, sent.text
        assert sent.json()["mode"] == "DELAYED"
    claim_id: str = sent.json()["claim_id"]
    desk = home.system.home.desk
    assert desk is not None
    await eventually(lambda: desk.request_of(claim_id) is not None, 30)
    return claim_id


@pytest.fixture(scope="module")
async def world(
    broker: str, settings: BusSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    """Hebei (home, desk; the host is told to expect answers within a second, so a waiting
    review is overdue at once) and Hainan; Lao Zhang and one other person filed, admitted,
    discharged."""
    await create_contract_topics(settings, broker, [HEBEI, HAINAN])
    folder = tmp_path_factory.mktemp("desk-browser")
    home_cfg = gateway_config(HEBEI, broker, folder / "home", settings=settings)
    home_cfg = home_cfg.model_copy(update={"review_desk": ReviewDeskConfig(review_period_s=1.0)})
    home = Gateway(home_cfg)
    host = Gateway(gateway_config(HAINAN, broker, folder / "host", settings=settings))
    started = await asyncio.gather(home.start(), host.start(), return_exceptions=True)
    try:
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        await asyncio.gather(home.system.node.wait_ready(60), host.system.node.wait_ready(60))
        lao_zhang = Person(
            LAO_ZHANG_PERSON_ID, LAO_ZHANG_NAME, InsuranceType.EMPLOYEE, LAO_ZHANG_HOME_REGION
        )
        other = Person(
            id_number(LAO_ZHANG_HOME_REGION, dt.date(1960, 6, 1), 7),
            OTHER_NAME,
            InsuranceType.EMPLOYEE,
            LAO_ZHANG_HOME_REGION,
        )
        claim_id = await file_and_discharge(home, host, lao_zhang)
        other_claim_id = await file_and_discharge(home, host, other)
        yield World(home, host, claim_id, other_claim_id)
    finally:
        await asyncio.gather(home.stop(), host.stop())


def expected_review(world: World) -> Any:
    """What the rules make of Lao Zhang's claim with the stent approved at 8,000.29 yuan (no
    usage before: his only claim of the year)."""
    stored = world.host.system.backoffice.claim(world.claim_id)
    assert stored is not None
    directory = world.home.system.directory
    policy = directory.policy(LAO_ZHANG_HOME_REGION)
    assert policy is not None
    override = ItemAdjustment(
        item_code="T018",
        approved_fen=STENT_APPROVED_FEN,
        reason_code="OVER_STANDARD",
        note="超出收费标准",
    )
    return review_adjusted(
        stored.claim,
        policy,
        YearUsage(),
        [override],
        insurance_type=InsuranceType.EMPLOYEE,
        assistance_eligible=False,
        catalogue_classes=directory.catalogue_classes(HAINAN),
    )


async def host_claim_settled(world: World) -> dict[str, Any]:
    """Hainan's claim over the hospital API, once SETTLED."""
    async with client(world.host, "hospital") as hospital:
        body: dict[str, Any] = {}
        for _ in range(300):
            body = (await hospital.get(f"/v1/claims/{world.claim_id}")).json()
            if body.get("state") == "SETTLED":
                return body
            await asyncio.sleep(0.1)
    raise AssertionError(f"the host's claim did not settle: {body}")


def cjk_fonts() -> str | None:
    """``fc-list :lang=zh`` (None when fontconfig's fc-list is not installed)."""
    binary = shutil.which("fc-list")
    if binary is None:
        return None
    return subprocess.run(
        [binary, ":lang=zh"], capture_output=True, text=True, check=False, timeout=30
    ).stdout


async def test_reviewer_adjusts_the_stent_and_the_host_settles(world: World) -> None:
    """Sign in, open Lao Zhang's overdue review, adjust T018, confirm, see the result; the
    host settles exactly the adjusted split; Chinese renders; API problems (a 409 when a
    colleague decided first, a 401 for a bad token) show in one line."""
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary found: run scripts/install-browser.sh (or set "
                    "XSETTLE_CHROMIUM)")  # fmt: skip
    playwright_api = pytest.importorskip("playwright.async_api")
    expected = expected_review(world)
    claim_id = world.claim_id

    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=binary, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = await browser.new_page(viewport={"width": 1500, "height": 1200})
            await page.goto(world.home.url + "/desk")
            await page.locator("#signin").wait_for(state="visible", timeout=10_000)
            await page.fill("#token", TEST_TOKENS["reviewer"])
            await page.fill("#reviewer-name", "王审核")
            await page.click("#signin-button")

            row = page.locator(f"#review-rows tr[data-claim-id='{claim_id}']")
            await row.wait_for(timeout=15_000)
            assert "overdue" in (await row.get_attribute("class") or "")
            row_text = await row.inner_text()
            assert mask_id(LAO_ZHANG_PERSON_ID) in row_text
            assert "25,000.00" in row_text
            assert "已逾期" in row_text
            content = await page.content()
            assert LAO_ZHANG_PERSON_ID not in content
            assert LAO_ZHANG_NAME not in content
            assert "待审核" in await page.locator("#queue h2").inner_text()
            kept = await page.evaluate("sessionStorage.getItem('xsettle.desk.token')")
            assert kept == TEST_TOKENS["reviewer"]

            money = await page.evaluate(
                """() => [deskMoney.yuanToFen('8,000.29'), deskMoney.yuanToFen('0.29'),
                          deskMoney.yuanToFen('1.1'), deskMoney.yuanToFen('19.99'),
                          deskMoney.yuanToFen('1.234'), deskMoney.yuanToFen('-1'),
                          deskMoney.yuanToFen('abc'), deskMoney.fenToYuan(-125000),
                          deskMoney.fenToYuan(5)]"""
            )
            assert money == [800_029, 29, 110, 1999, None, None, None, "-1,250.00", "0.05"]

            await row.get_by_role("button", name="审核 Review").click()
            stent = page.locator("#item-rows tr[data-item-code='T018']")
            await stent.wait_for(timeout=10_000)
            assert "11,785.60" in await stent.inner_text()
            assert "海南省人民医院" in await page.locator("#review-facts").inner_text()
            assert await page.locator("#item-rows tr").count() == 25

            await stent.locator("input[name=approved]").fill("8,000.29")
            await page.click("#adjust")  # no reason code yet: refused in the page, in one line
            error = page.locator("#error")
            await error.wait_for(state="visible", timeout=5_000)
            assert "T018" in await error.inner_text()
            assert not await page.locator("#confirm").is_visible()

            await stent.locator("input[name=reason_code]").fill("OVER_STANDARD")
            await stent.locator("input[name=note]").fill("超出收费标准")
            await page.click("#adjust")
            dialog = page.locator("#confirm")
            await dialog.wait_for(state="visible", timeout=5_000)
            asked = await dialog.inner_text()
            assert "11,785.60 → 8,000.29" in asked
            assert "OVER_STANDARD" in asked
            await page.click("#confirm-yes")

            result = page.locator("#result")
            await result.wait_for(state="visible", timeout=15_000)
            assert await result.get_attribute("data-decision") == "PARTIAL"
            shown = await result.inner_text()
            assert f"基金支付 fund pays {yuan(expected.fund_fen)} 元" in shown
            assert f"患者补缴 top-up {yuan(expected.balance_fen)} 元" in shown
            assert not await error.is_visible()
            await page.locator(f"#review-rows tr[data-claim-id='{claim_id}']").wait_for(
                state="detached", timeout=10_000
            )
            await page.screenshot(path=str(SCREENSHOT), full_page=True)

            # Another reviewer decides the other review while the page shows it: the page's
            # approval is a 409, shown in one line naming who, and the review shows as decided.
            other_id = world.other_claim_id
            other = page.locator(f"#review-rows tr[data-claim-id='{other_id}']")
            await other.get_by_role("button", name="审核 Review").click()
            await page.locator("#review-claim", has_text=other_id).wait_for(timeout=10_000)
            async with client(world.home, "reviewer") as colleague:
                first = await colleague.post(
                    f"/v1/reviews/{other_id}/decision",
                    json={"action": "approve", "reviewer": "李审核"},
                )
            assert first.status_code == 200, first.text
            await page.click("#approve")
            await dialog.wait_for(state="visible", timeout=5_000)
            await page.click("#confirm-yes")
            await page.locator("#error", has_text="409").wait_for(timeout=10_000)
            conflict = await error.inner_text()
            assert "李审核" in conflict
            assert "\n" not in conflict
            await page.locator("#review-state", has_text="DECIDED").wait_for(timeout=10_000)
            assert await page.locator("#approve").is_disabled()

            # An API problem is shown in one line: a token no role has (401) signs out.
            await page.evaluate("sessionStorage.setItem('xsettle.desk.token', 'wrong')")
            await page.reload()
            await error.wait_for(state="visible", timeout=10_000)
            line = await error.inner_text()
            assert line.startswith("401")
            assert "\n" not in line
            assert await page.locator("#signin").is_visible()
        finally:
            await browser.close()

    desk = world.home.system.home.desk
    assert desk is not None
    decided = desk.get(claim_id)
    assert decided.reviewer == "王审核"
    assert decided.result is not None
    assert decided.result.fund_fen == expected.fund_fen
    assert [(a.item_code, a.approved_fen) for a in decided.result.adjustments if
            a.item_code == "T018"] == [("T018", STENT_APPROVED_FEN)]  # fmt: skip

    host = await host_claim_settled(world)
    assert host["review"]["decision"] == "PARTIAL"
    assert host["review"]["fund_fen"] == expected.fund_fen
    assert host["review"]["personal_fen"] == expected.personal_fen
    assert host["top_up_fen"] == expected.balance_fen
    assert expected.fund_fen < 1_750_000  # less than the proposal: the cut counted

    fonts = cjk_fonts()
    if fonts is not None:
        assert fonts.strip(), "no CJK font: run scripts/install-browser.sh (fonts-noto-cjk)"
    assert await asyncio.to_thread(lambda: SCREENSHOT.stat().st_size) > 10_000
