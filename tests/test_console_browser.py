"""The ops console in a real headless Chromium: a planted error appears live, a dead letter is
replayed with its button and shown as replayed, overdue requests are red, money is in yuan.

Needs a chromium binary (``scripts/install-browser.sh`` installs Debian's) and Playwright for
Python, which drives that binary (no Playwright browser download).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bus.broker import create_contract_topics
from bus.codec import Codec
from bus.console import Console
from bus.constants import topic
from bus.envelope import Envelope, now_ms
from bus.models import ClaimPackage
from bus.settings import BusSettings
from bus.store import PENDING, OutRecord, PendingRequest, SqliteStore
from simulators import samples
from tests.conftest import NodeFactory, ProvincePool
from tests.helpers import produce_raw

pytestmark = pytest.mark.broker

SCREENSHOT = Path("/tmp/xsettle-console.png")  # noqa: S108 (a fixed path people can open)


def chromium() -> str | None:
    """Path of a Chromium binary: ``XSETTLE_CHROMIUM`` or the first one on PATH."""
    explicit = os.environ.get("XSETTLE_CHROMIUM")
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def overdue_store(path: Path, home: str) -> SqliteStore:
    """A store holding one request that is past its deadline and one that is not."""
    store = SqliteStore(path)
    now = now_ms()
    for mid, sent, deadline in (
        ("overdue-req-1", now - 120_000, now - 60_000),
        ("waiting-req-1", now - 1_000, now + 3_600_000),
    ):
        env = Envelope(
            message_id=mid,
            message_type=ClaimPackage.avro_name,
            source="460000",
            target=home,
            sent_at_ms=sent,
            reply_to=topic("reply", "460000"),
            deadline_ms=deadline,
        )
        store.add_pending(
            PendingRequest(
                message_id=mid,
                message_type=ClaimPackage.avro_name,
                target=home,
                record=OutRecord(topic("claim", home), samples.PERSON.encode(), b"", ()),
                attempt=1,
                sent_at_ms=sent,
                deadline_ms=deadline,
                state=PENDING,
            )
        )
        assert env.message_id == mid
    return store


async def test_console_shows_errors_and_replays_dead_letters(
    broker: str,
    settings: BusSettings,
    make_node: NodeFactory,
    province_pool: ProvincePool,
    codec: Codec,
    tmp_path: Path,
) -> None:
    """Load the console, see a planted INVALID_MESSAGE appear, replay its dead letter."""
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary found: run scripts/install-browser.sh (or set "
                    "XSETTLE_CHROMIUM)")  # fmt: skip
    playwright_api = pytest.importorskip("playwright.async_api")

    host, home = province_pool.take(), province_pool.take()
    await create_contract_topics(settings, broker, [host])
    node = await make_node(home)
    store = overdue_store(tmp_path / "other.sqlite3", home)
    stats = [
        {"home": host, "host": home, "month": "2026-05", "settlements": 3,
         "total_fen": 1234567, "fund_fen": 864197},
    ]  # fmt: skip
    console = Console(settings, broker, nodes=[node], stores={"460000": store}, stats=lambda: stats)
    await console.start()
    try:
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=binary, args=["--no-sandbox", "--disable-dev-shm-usage"]
            )
            try:
                page = await browser.new_page(viewport={"width": 1500, "height": 1100})
                await page.goto(console.url)
                await page.wait_for_selector("#status:has-text('updated')", timeout=15_000)

                env = Envelope(
                    message_id="browser-junk-1",
                    message_type=ClaimPackage.avro_name,
                    source=host,
                    target=home,
                    sent_at_ms=now_ms(),
                    reply_to=topic("reply", host),
                    deadline_ms=now_ms() + 600_000,
                )
                await produce_raw(
                    broker,
                    settings,
                    topic("claim", home),
                    b"\x02not avro",
                    env.to_headers(),
                    samples.PERSON.encode(),
                )
                error_row = page.locator("#newest tr[data-correlation-id='browser-junk-1']")
                await error_row.wait_for(timeout=30_000)
                assert await error_row.get_attribute("data-code") == "INVALID_MESSAGE"
                text = await error_row.inner_text()
                assert host in text
                assert samples.PERSON not in await page.content()

                letter = page.locator("#letters tr.is-dead", has_text="browser-junk-1")
                await letter.wait_for(timeout=15_000)
                await letter.get_by_role("button", name="replay").click()
                replayed = page.locator("#letters tr.is-replayed", has_text="browser-junk-1")
                await replayed.wait_for(timeout=15_000)
                assert "replayed" in await replayed.inner_text()

                overdue = page.locator("#pending-rows tr.overdue")
                await overdue.first.wait_for(timeout=10_000)
                assert await overdue.count() == 1
                color = await overdue.first.locator("td").first.evaluate(
                    "el => getComputedStyle(el).color"
                )
                assert color == "rgb(192, 38, 45)"  # --red
                assert "12,345.67" in await page.locator("#stats-rows").inner_text()
                await page.screenshot(path=str(SCREENSHOT), full_page=True)
            finally:
                await browser.close()
    finally:
        await console.stop()
        store.close()
