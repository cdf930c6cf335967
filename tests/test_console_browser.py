"""The ops console page in a real headless Chromium, served by the gateway's ops router (as
``xsettle ops console`` serves it): a page without a token shows the 401 problem line and
another role's token the 403; a planted error shows the responsible province by name; a dead
letter is replayed only after the in-page confirmation, and the table fits 1280 px; an overdue
request shows its counterparty and age; a console whose broker is unreachable shows a red
alarm and "unknown", not 0.

Needs a chromium binary (``scripts/install-browser.sh`` installs Debian's) and Playwright for
Python, which drives that binary (no Playwright browser download).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from adapters.directory import Directory
from adapters.gateway.api_ops import ConsoleServer, create_ops_app
from adapters.gateway.panels import Panel
from adapters.gateway.testing import TEST_TOKENS, fixed_token_config
from bus.broker import create_contract_topics
from bus.console import Console
from bus.constants import topic
from bus.envelope import Envelope, now_ms
from bus.models import ClaimPackage
from bus.node import Node
from bus.settings import BusSettings
from bus.store import PENDING, OutRecord, PendingRequest, SqlStore
from simulators import samples
from simulators.keys import demo_trust
from tests.helpers import produce_raw

pytestmark = pytest.mark.broker

HOME, HOST = "130000", "460000"
"""Hebei, Hainan (the node whose inbox gets the junk)."""
JUNK = "browser-junk-1"
SCREENSHOT = Path("/tmp/xsettle-console.png")  # noqa: S108 (a fixed path people can open)
RED = "rgb(192, 38, 45)"
"""``--red`` of the page."""
WIDTH = 1280


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


def hebei_store(path: Path) -> SqlStore:
    """Hebei's store: a claim sent to Hainan two minutes ago, its deadline passed a minute
    ago (nothing sweeps it here: no Hebei node runs), and one still in time."""
    store = SqlStore(path)
    now = now_ms()
    for mid, sent, deadline in (
        ("overdue-req-1", now - 120_000, now - 60_000),
        ("waiting-req-1", now - 1_000, now + 3_600_000),
    ):
        env = Envelope(
            message_id=mid,
            message_type=ClaimPackage.avro_name,
            source=HOME,
            target=HOST,
            sent_at_ms=sent,
            reply_to=topic("reply", HOME),
            deadline_ms=deadline,
        )
        store.add_pending(
            PendingRequest(
                message_id=mid,
                message_type=ClaimPackage.avro_name,
                target=HOST,
                record=OutRecord(
                    topic("claim", HOST), samples.PERSON.encode(), b"", env.to_headers()
                ),
                attempt=1,
                sent_at_ms=sent,
                deadline_ms=deadline,
                state=PENDING,
            )
        )
    return store


@dataclass
class Stack:
    """The served console over a running Hainan node, and one over a closed port."""

    broker: str
    settings: BusSettings
    console: Console
    live: ConsoleServer
    dead: ConsoleServer


def stats_panel() -> Panel:
    """A panel as the adapters give it: money already in yuan."""
    return Panel(
        title="Settlements by province pair and month",
        columns=("month", "home", "host", "settlements", "total (元)"),
        rows=(("2026-05", "河北省 130000", "海南省 460000", 3, "12,345.67"),),
        numeric=("settlements", "total (元)"),
    )


@pytest.fixture(scope="module")
async def stack(
    broker: str, settings: BusSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """Hainan's node, Hebei's store, a cluster-wide console served on a free port; and a
    console whose broker is a closed port."""
    if chromium() is None:
        pytest.skip("no chromium binary found: run scripts/install-browser.sh (or set "
                    "XSETTLE_CHROMIUM)")  # fmt: skip
    pytest.importorskip("playwright.async_api")
    state = tmp_path_factory.mktemp("console-browser")
    await create_contract_topics(settings, broker, [HOME, HOST])
    node_settings = settings.model_copy(update={"state_dir": state})
    node = Node(HOST, node_settings, bootstrap=broker, trust=demo_trust(HOST, node_settings))
    await node.start()
    store = hebei_store(state / "province-130000.sqlite3")
    directory = Directory.default()
    console = Console(settings, broker, nodes=[node], stores={HOME: store})
    live_app = create_ops_app(console, directory, tokens=fixed_token_config(), panels=[stats_panel])
    live = await ConsoleServer(live_app, console, "127.0.0.1", 0).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    dead_console = Console(settings, closed)
    dead_app = create_ops_app(dead_console, directory, tokens=fixed_token_config())
    dead = await ConsoleServer(dead_app, dead_console, "127.0.0.1", 0).start()
    try:
        await node.wait_ready()
        yield Stack(broker, settings, console, live, dead)
    finally:
        await live.stop()
        await dead.stop()
        await node.stop()
        node.store.close()
        store.close()


@pytest.fixture(scope="module")
async def browser(stack: Stack) -> AsyncIterator[Any]:
    """A headless Chromium (Debian's binary driven by Playwright)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=chromium(), args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield launched
        finally:
            await launched.close()


async def open_page(browser: Any, url: str, role: str | None) -> Any:
    """A new tab at 1280 px on ``url``, signed in as ``role`` through the page's form."""
    page = await browser.new_page(viewport={"width": WIDTH, "height": 1000})
    await page.goto(url)
    if role is not None:
        await page.fill("#token", TEST_TOKENS[role])
        await page.click("#signin-button")
    return page


async def color(locator: Any) -> str:
    """The computed text colour of an element."""
    value: str = await locator.evaluate("el => getComputedStyle(el).color")
    return value


async def test_without_the_ops_token_the_page_shows_the_problem(stack: Stack, browser: Any) -> None:
    """No token: the 401 problem line and the sign-in form, no dead letter, no replay
    button; the hospital's token: the 403 line."""
    page = await open_page(browser, stack.live.url, None)
    try:
        problem = page.locator("#problem")
        await page.wait_for_selector("#problem.shown", timeout=10_000)
        assert (await problem.inner_text()).startswith("401 Unauthorized")
        assert "ops" in await problem.inner_text()
        assert await page.locator("#signin.shown").count() == 1
        assert await page.locator("button[data-action='replay']").count() == 0
        await page.fill("#token", TEST_TOKENS["hospital"])
        await page.click("#signin-button")
        await page.wait_for_selector("#problem:has-text('403')", timeout=10_000)
        assert (
            await page.evaluate("sessionStorage.getItem('xsettle-ops-token')")
            == (TEST_TOKENS["hospital"])
        )
    finally:
        await page.close()


async def test_error_by_province_name_and_replay_after_confirming(
    stack: Stack, browser: Any
) -> None:
    """Junk from Hebei in Hainan's inbox: the error shows 河北省 as the province that must act;
    its dead letter shows the sender 河北省; replay asks in an in-page dialog, Cancel sends
    nothing, Replay replays it; no horizontal overflow at 1280 px."""
    page = await open_page(browser, stack.live.url, "ops")
    try:
        await page.wait_for_selector("#status:has-text('updated')", timeout=15_000)
        env = Envelope(
            message_id=JUNK,
            message_type=ClaimPackage.avro_name,
            source=HOME,
            target=HOST,
            sent_at_ms=now_ms(),
            reply_to=topic("reply", HOME),
            deadline_ms=now_ms() + 600_000,
        )
        await produce_raw(
            stack.broker,
            stack.settings,
            topic("claim", HOST),
            b"\x02not avro",
            env.to_headers(),
            samples.PERSON.encode(),
        )
        cause = page.locator(f"#by-code-responsible tr[data-responsible='{HOME}']")
        await cause.wait_for(timeout=30_000)
        assert "河北省" in await cause.inner_text()
        assert await cause.get_attribute("data-code") == "INVALID_MESSAGE"
        newest = page.locator(f"#newest tr[data-correlation-id='{JUNK}']")
        await newest.wait_for(timeout=10_000)
        assert "河北省 130000" in await newest.inner_text()
        assert samples.PERSON not in await page.content()

        dead = page.locator(f"#letters tr.is-dead[data-sender='{HOME}']", has_text=JUNK)
        await dead.wait_for(timeout=15_000)
        assert "河北省" in await dead.inner_text()
        coordinates = await dead.get_attribute("data-coordinates")
        assert coordinates is not None
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
        box = await dead.locator("button[data-action='replay']").bounding_box()
        assert box is not None
        assert box["x"] + box["width"] <= WIDTH

        await dead.locator("button[data-action='replay']").click()
        dialog = page.locator("dialog#confirm")
        await dialog.wait_for(state="visible", timeout=5_000)
        assert coordinates in await page.locator("#confirm-text").inner_text()
        await page.click("#cancel-replay")
        await dialog.wait_for(state="hidden", timeout=5_000)
        await page.wait_for_timeout(1_500)
        letter = stack.console.dlq_letter(coordinates)
        assert letter is not None
        assert letter.replayed_at_ms is None  # cancelled: nothing sent

        row = page.locator(f"#letters tr[data-coordinates='{coordinates}']")
        await row.locator("button[data-action='replay']").click()
        await dialog.wait_for(state="visible", timeout=5_000)
        await page.click("#confirm-replay")
        await page.locator(f"#letters tr.is-replayed[data-coordinates='{coordinates}']").wait_for(
            timeout=15_000
        )
        letter = stack.console.dlq_letter(coordinates)
        assert letter is not None
        assert letter.replayed_at_ms is not None
        assert await page.locator("#problem.shown").count() == 0
        panel = page.locator("#panel-list .panel", has_text="Settlements")
        assert "12,345.67" in await panel.inner_text()
        await page.screenshot(path=str(SCREENSHOT), full_page=True)
    finally:
        await page.close()


async def test_overdue_request_shows_its_counterparty_and_age(stack: Stack, browser: Any) -> None:
    """Hebei's claim to Hainan, past its deadline: listed under 海南省 460000 as overdue, in
    red, with its age (two minutes), before the one still in time."""
    page = await open_page(browser, stack.live.url, "ops")
    try:
        overdue = page.locator(f"#awaited tr.overdue[data-counterparty='{HOST}']")
        await overdue.first.wait_for(timeout=15_000)
        assert await overdue.count() == 1
        head = page.locator("#awaited .cp.has-overdue")
        assert "海南省 460000" in await head.inner_text()
        assert "1 overdue" in await head.inner_text()
        age = await overdue.locator("td.age").inner_text()
        assert re.fullmatch(r"2\.\d min", age), age
        assert "overdue-req-1" in await overdue.inner_text()
        assert await color(overdue.locator("td").first) == RED
        rows = page.locator(f"#awaited tr[data-counterparty='{HOST}']")
        assert await rows.count() == 2
        assert await rows.nth(1).get_attribute("data-status") == "waiting"
        counts = page.locator("#counts")
        assert "1 overdue of 2 awaited" in await counts.inner_text()
    finally:
        await page.close()


async def test_unreachable_broker_is_a_red_alarm_not_zero(stack: Stack, browser: Any) -> None:
    """A console whose broker is a closed port: a red broker alarm at the top, and the error
    and dead-letter counts "unknown", never 0."""
    page = await open_page(browser, stack.dead.url, "ops")
    try:
        alarm = page.locator("#alarm-list li.alarm[data-kind='broker']")
        await alarm.wait_for(timeout=15_000)
        assert "unreachable" in await alarm.inner_text()
        assert await color(alarm) == RED
        first = page.locator("#alarm-list li").first
        assert await first.get_attribute("data-kind") == "broker"
        assert (await page.locator("#err-total").inner_text()).startswith("unknown")
        assert (await page.locator("#dlq-total").inner_text()).startswith("unknown")
        assert await page.locator("#letters td.empty").inner_text() == (
            "unknown: the reader cannot read"
        )
        alarms_box = await page.locator("#alarms").bounding_box()
        pending_box = await page.locator("#pending").bounding_box()
        assert alarms_box is not None
        assert pending_box is not None
        assert alarms_box["y"] < pending_box["y"]  # alarms first
    finally:
        await page.close()
