"""The gateway's ops router on the real embedded broker: Hainan's gateway (460000) with its
console, a planted error report (Hebei must act), a dead letter from Hebei, an overdue answer
Hainan owes Hebei. Every ops endpoint answers 200 to the ops token, 401 without a token or
with a wrong one, 403 to another role; an unknown dead letter is a 404; a replay without
``confirm`` or with bad coordinates is a 422 and replays nothing. A console pointed at a
closed port shows an alarm, not zero."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from adapters.directory import Directory
from adapters.gateway.api_ops import create_ops_app
from adapters.gateway.panels import (
    age_text,
    build_panels,
    overdue_claims_panel,
    settlement_stats_panel,
)
from adapters.gateway.service import Gateway
from adapters.gateway.testing import (
    TEST_TOKENS,
    client,
    fixed_token_config,
    gateway_config,
    running_gateway,
)
from bus.broker import create_contract_topics
from bus.codec import Codec
from bus.console import Console
from bus.constants import topic
from bus.envelope import Envelope, now_ms
from bus.models import ClaimPackage, ErrorCode, ErrorReport
from bus.node import report
from bus.settings import BusSettings
from bus.store import OPEN, PENDING, Obligation, OutRecord, PendingRequest
from simulators import samples
from tests.helpers import eventually, produce_raw

pytestmark = pytest.mark.broker

HOME, HOST = "130000", "460000"
"""Hebei (home), Hainan (host: the gateway here)."""
PLANTED = "ops-planted-1"
"""Correlation id of the planted error report."""
JUNK = "ops-junk-1"
"""Message id of the record Hainan cannot read (its dead letter)."""

GETS = (
    "/v1/ops/overview",
    "/v1/ops/pending",
    "/v1/ops/errors",
    "/v1/ops/dlq",
    "/v1/ops/panels",
)


def envelope(message_id: str, source: str, target: str, **kw: Any) -> Envelope:
    """Headers of a message from ``source`` to ``target``."""
    return Envelope(
        message_id=message_id,
        message_type=kw.pop("message_type", ClaimPackage.avro_name),
        source=source,
        target=target,
        sent_at_ms=now_ms(),
        **kw,
    )


@pytest.fixture(scope="module")
async def gateway(
    broker: str, settings: BusSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    """Hainan's gateway, with a planted error report, a dead letter, an overdue obligation
    to Hebei and a request waiting for Hebei's answer."""
    await create_contract_topics(settings, broker, [HOME, HOST])
    cfg = gateway_config(HOST, broker, tmp_path_factory.mktemp("gw-ops"), settings=settings)
    async with running_gateway(cfg) as gw:
        # Hainan's own copy of a deadline it reports: Hebei did not answer, Hebei must act.
        rep = report(
            ErrorCode.DEADLINE_EXCEEDED,
            f"no answer from {HOME} about person {samples.PERSON}",
            detected_by=HOST,
            origin=HOST,
            responsible=HOME,
            retriable=True,
        )
        env = envelope(
            "ops-report-1",
            HOST,
            HOST,
            message_type=ErrorReport.avro_name,
            correlation_id=PLANTED,
        )
        await produce_raw(
            broker,
            settings,
            topic("error", HOST),
            Codec().encode(rep),
            env.to_headers(),
            samples.PERSON.encode(),
        )
        junk = envelope(
            JUNK,
            HOME,
            HOST,
            reply_to=topic("reply", HOME),
            deadline_ms=now_ms() + 600_000,
        )
        await produce_raw(
            broker,
            settings,
            topic("claim", HOST),
            b"\x02not avro",
            junk.to_headers(),
            samples.PERSON.encode(),
        )
        store = gw.system.node.store
        now = now_ms()
        store.add_obligation(
            Obligation("owed-review-1", ClaimPackage.avro_name, HOME, samples.PERSON.encode(),
                       now - 1_000, now - 7_200_000, OPEN)
        )  # fmt: skip
        waiting = envelope("awaited-1", HOST, HOME, deadline_ms=now + 86_400_000)
        store.add_pending(
            PendingRequest(
                message_id="awaited-1",
                message_type=ClaimPackage.avro_name,
                target=HOME,
                record=OutRecord(
                    topic("claim", HOME), samples.PERSON.encode(), b"", waiting.to_headers()
                ),
                attempt=1,
                sent_at_ms=now - 2_000,
                deadline_ms=now + 86_400_000,
                state=PENDING,
            )
        )
        console = gw.ctx.console if gw.ctx is not None else None
        assert console is not None

        def planted() -> bool:
            errors = console.errors_json()
            return errors["total"] == 1 and any(d.message_id == JUNK for d in console.letters())

        await eventually(planted, timeout_s=30)
        yield gw


@pytest.fixture
async def ops(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """A client signed in as ops."""
    async with client(gateway, "ops") as c:
        yield c


async def junk_letter(ops: httpx.AsyncClient) -> dict[str, Any]:
    """The first dead letter of the junk record (a replay of it is dead-lettered again)."""
    letters = (await ops.get("/v1/ops/dlq")).json()["letters"]
    return min(
        (x for x in letters if x["message_id"] == JUNK), key=lambda x: (x["at"], x["offset"])
    )


def letter_path(letter: dict[str, Any]) -> str:
    return f"/v1/ops/dlq/{letter['topic']}/{letter['partition']}/{letter['offset']}"


class TestAccess:
    async def test_every_ops_endpoint_needs_the_ops_token(
        self, gateway: Gateway, ops: httpx.AsyncClient
    ) -> None:
        """200 with the ops token; 401 (with WWW-Authenticate) without one and with a wrong
        one; 403 with the hospital's token — for every ops endpoint, the replay included."""
        letter = await junk_letter(ops)
        gets = (*GETS, letter_path(letter))
        replay = {"letters": [{k: letter[k] for k in ("topic", "partition", "offset")}]}
        replay_confirmed = {**replay, "confirm": True}
        for path in gets:
            assert (await ops.get(path)).status_code == 200, path
        async with client(gateway) as anonymous, client(gateway, "hospital") as hospital:
            wrong = client(gateway, headers={"Authorization": "Bearer not-a-token"})
            async with wrong:
                for path in gets:
                    r = await anonymous.get(path)
                    assert r.status_code == 401, path
                    assert r.headers["www-authenticate"].startswith("Bearer")
                    assert r.headers["content-type"] == "application/problem+json"
                    assert (await wrong.get(path)).status_code == 401, path
                    r = await hospital.get(path)
                    assert r.status_code == 403, path
                    assert "ops" in r.json()["detail"]
                url = "/v1/ops/dlq/replay"
                assert (await anonymous.post(url, json=replay_confirmed)).status_code == 401
                assert (await wrong.post(url, json=replay_confirmed)).status_code == 401
                assert (await hospital.post(url, json=replay_confirmed)).status_code == 403
                reviewer = client(gateway, "reviewer")
                async with reviewer:
                    assert (await reviewer.post(url, json=replay_confirmed)).status_code == 403
        assert (await junk_letter(ops))["replayed_at"] is None  # none of those replayed it

    async def test_metrics_and_page_need_no_token(self, gateway: Gateway) -> None:
        """``/metrics`` is Prometheus text without a token (counts only, no person ids);
        ``/console`` is the page, framed by nobody and never cached."""
        async with client(gateway) as anonymous:
            r = await anonymous.get("/metrics")
            page = await anonymous.get("/console")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        letters = 'xsettle_dead_letters_total{kind="bad_marker",'
        assert f'{letters}province="{HOST}",responsible="{HOME}"}} 1.0' in r.text
        assert f'xsettle_pending_requests{{province="{HOST}"}} 1.0' in r.text
        assert samples.PERSON not in r.text
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        assert 'id="alarms"' in page.text
        assert TEST_TOKENS["ops"] not in page.text


class TestViews:
    async def test_overview_alarms_first_then_counts(self, ops: httpx.AsyncClient) -> None:
        """No alarm on a healthy gateway; the counts of its province: the planted report,
        the dead letter, one request awaited from Hebei, one overdue answer owed to it."""
        body = (await ops.get("/v1/ops/overview")).json()
        assert list(body)[:6] == ["scope", "scope_name", "at", "ok", "alarms", "counts"]
        assert body["scope"] == HOST
        assert body["scope_name"] == "海南省"
        assert body["alarms"] == []
        assert body["ok"] is True
        assert body["counts"] == {
            "errors": 1,
            "dead_letters": 1,
            "dead_letters_not_replayed": 1,
            "awaited": 1,
            "awaited_overdue": 0,
            "owed": 1,
            "owed_overdue": 1,
        }
        assert body["broker"]["reachable"] is True
        assert [r["phase"] for r in body["readers"]] == ["reading", "reading"]
        assert body["nodes"][0]["province"] == HOST
        assert body["nodes"][0]["ok"] is True

    async def test_errors_by_code_and_responsible_province_with_names(
        self, ops: httpx.AsyncClient
    ) -> None:
        """The planted report counts under DEADLINE_EXCEEDED × Hebei (河北省), and the newest
        list shows it with its person id masked."""
        body = (await ops.get("/v1/ops/errors")).json()
        assert body["known"] is True
        assert body["total"] == 1
        assert body["by_code_responsible"] == [
            {
                "code": "DEADLINE_EXCEEDED",
                "responsible": HOME,
                "responsible_name": "河北省",
                "count": 1,
            }
        ]
        assert body["by_responsible"] == [{"province": HOME, "name": "河北省", "count": 1}]
        newest = body["newest"][0]
        assert newest["correlation_id"] == PLANTED
        assert newest["origin_name"] == "海南省"
        assert samples.PERSON not in str(body)
        assert samples.PERSON[:6] in newest["message"]

    async def test_pending_by_counterparty_with_age(self, ops: httpx.AsyncClient) -> None:
        """What Hainan waits for from Hebei and what it owes Hebei, with names and ages; the
        overdue obligation is listed as overdue with its two hours."""
        body = (await ops.get("/v1/ops/pending")).json()
        [awaited] = body["awaited"]
        assert (awaited["counterparty"], awaited["name"], awaited["total"]) == (
            HOME,
            "河北省",
            1,
        )
        assert awaited["requests"][0]["message_id"] == "awaited-1"
        assert awaited["requests"][0]["status"] == "waiting"
        assert awaited["requests"][0]["province"] == HOST
        [owed] = body["owed"]
        assert (owed["counterparty"], owed["name"], owed["overdue"]) == (HOME, "河北省", 1)
        request = owed["requests"][0]
        assert request["status"] == "overdue"
        assert 7_190 < request["age_s"] < 7_400
        assert request["remaining_s"] < 0
        assert samples.PERSON not in str(body)

    async def test_dead_letters_with_sender_and_one_decoded(self, ops: httpx.AsyncClient) -> None:
        """The dead letter names its sender (Hebei); one letter decodes as far as it can;
        an unknown one is a 404, bad coordinates a 422."""
        letter = await junk_letter(ops)
        assert letter["sender"] == HOME
        assert letter["sender_name"] == "河北省"
        assert letter["error_kind"] == "bad_marker"
        assert letter["province"] == HOST
        assert letter["key"] is not None
        assert samples.PERSON not in letter["key"]
        shown = await ops.get(letter_path(letter))
        assert shown.status_code == 200
        preview = shown.json()["preview"]
        assert preview["envelope"]["message_id"] == JUNK
        assert preview["decode_error"].startswith("bad_marker")
        unknown = await ops.get(f"/v1/ops/dlq/{letter['topic']}/{letter['partition']}/999999")
        assert unknown.status_code == 404
        assert unknown.headers["content-type"] == "application/problem+json"
        for bad in (
            "/v1/ops/dlq/xsettle.claim.460000/0/0",  # not a DLQ topic
            f"/v1/ops/dlq/{letter['topic']}/-1/0",
            f"/v1/ops/dlq/{letter['topic']}/0/x",
        ):
            r = await ops.get(bad)
            assert r.status_code == 422, bad
            assert r.json()["errors"], bad

    async def test_panels_from_the_adapters(self, ops: httpx.AsyncClient) -> None:
        """The gateway shows the adapters' panels: overdue claims and settlements."""
        body = (await ops.get("/v1/ops/panels")).json()
        titles = [p["title"] for p in body["panels"]]
        assert titles == ["Overdue claims", "Settlements by province pair and month"]
        assert body["panels"][1]["columns"][-2:] == ["total (元)", "fund (元)"]
        assert body["panels"][1]["rows"] == []


class TestReplay:
    async def test_replay_needs_confirm_and_known_coordinates(
        self, gateway: Gateway, ops: httpx.AsyncClient
    ) -> None:
        """Without ``confirm: true`` (absent, false, a string) → 422 naming ``confirm``; bad
        coordinates → 422 naming the field; an unknown letter → 404: nothing replayed. With
        confirm the letter is replayed once and shown as replayed."""
        letter = await junk_letter(ops)
        ref = {k: letter[k] for k in ("topic", "partition", "offset")}
        url = "/v1/ops/dlq/replay"
        for body in ({"letters": [ref]}, {"letters": [ref], "confirm": False},
                     {"letters": [ref], "confirm": "yes"}):  # fmt: skip
            r = await ops.post(url, json=body)
            assert r.status_code == 422, body
            assert r.json()["errors"][0]["field"] == "confirm"
        bad = [
            ({"letters": [{**ref, "topic": "xsettle.claim.460000"}], "confirm": True},
             "letters.0.topic"),
            ({"letters": [{**ref, "partition": -1}], "confirm": True}, "letters.0.partition"),
            ({"letters": [{**ref, "offset": "x"}], "confirm": True}, "letters.0.offset"),
            ({"letters": [], "confirm": True}, "letters"),
            ({"letters": [ref], "confirm": True, "extra": 1}, "extra"),
        ]  # fmt: skip
        for body, field in bad:
            r = await ops.post(url, json=body)
            assert r.status_code == 422, body
            assert r.json()["errors"][0]["field"] == field
        unknown = {"letters": [ref, {**ref, "offset": 999_999}], "confirm": True}
        r = await ops.post(url, json=unknown)
        assert r.status_code == 404
        assert "999999" in r.json()["detail"]
        assert (await junk_letter(ops))["replayed_at"] is None  # all or none

        metrics = gateway.system.node.metrics
        before = metrics.get("xsettle_dead_letters_total", kind="bad_marker")
        r = await ops.post(url, json={"letters": [ref], "confirm": True})
        assert r.status_code == 200
        assert r.json() == {"replayed": 1, "letters": [letter["coordinates"]]}
        assert (await junk_letter(ops))["replayed_at"] is not None
        # The replayed junk is read again and dead-lettered again (it is still junk).
        await eventually(
            lambda: metrics.get("xsettle_dead_letters_total", kind="bad_marker") == before + 1
        )


class TestAlarms:
    async def test_unreachable_broker_is_an_alarm_not_zero(self, settings: BusSettings) -> None:
        """The same router over a console whose broker is a closed port: the overview's first
        alarm is the broker, and the counts it cannot know are null, not 0."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = f"127.0.0.1:{s.getsockname()[1]}"
        console = Console(settings, closed)
        app = create_ops_app(console, Directory.default(), tokens=fixed_token_config())
        headers = {"Authorization": f"Bearer {TEST_TOKENS['ops']}"}
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url="http://ops", headers=headers
            ) as c:
                await c.get("/v1/ops/overview")  # starts the console
                await eventually(lambda: console.broker.reachable is False, timeout_s=10)
                body = (await c.get("/v1/ops/overview")).json()
                errors = (await c.get("/v1/ops/errors")).json()
                dlq = (await c.get("/v1/ops/dlq")).json()
        finally:
            await console.stop()
        assert body["ok"] is False
        assert body["alarms"][0]["kind"] == "broker"
        assert closed in body["alarms"][0]["text"]
        assert body["counts"]["errors"] is None
        assert body["counts"]["dead_letters"] is None
        assert errors["total"] is None
        assert dlq["count"] is None


class FakeOffice:
    """A host back office with one month of settlements and one overdue claim."""

    def settlement_stats(self, host: str) -> list[dict[str, object]]:
        return [
            {"home": HOME, "host": host, "month": "2026-05", "settlements": 3,
             "total_fen": 1_234_567, "fund_fen": 864_197},
        ]  # fmt: skip

    def claims(self, *, open_only: bool = False) -> list[Any]:
        from adapters.backoffice import ClaimState, HostClaim

        claim = samples.claim(home="130100", host="460100", claim_id="C-460100-9")
        return [
            HostClaim(
                claim=claim,
                request_id="r-9",
                state=ClaimState.OVERDUE,
                advance_collected_fen=625_000,
                overdue_since_ms=1_000_000,
            ),
            HostClaim(claim=claim, request_id="r-8", state=ClaimState.ACKNOWLEDGED),
        ]


def test_panels_in_yuan_with_province_names() -> None:
    """The statistics panel shows yuan and province names; the overdue-claims panel lists
    only OVERDUE claims with their age; a panel that fails says so instead of failing."""
    directory = Directory.default()
    office = FakeOffice()
    stats = settlement_stats_panel({HOST: office}, directory)()
    assert stats.rows == (
        ("2026-05", "河北省 130000", "海南省 460000", 3, "12,345.67", "8,641.97"),
    )
    assert "12,345.67 yuan" in stats.note
    overdue = overdue_claims_panel({HOST: office}, directory, clock=lambda: 1_000_000 + 7_200_000)()
    assert overdue.rows == (
        ("C-460100-9", "河北省 130000", "海南省 460000", "DELAYED", "2.0 h", "6,250.00", 0),
    )
    assert samples.PERSON not in str(overdue)
    assert age_text(45) == "45 s"

    def broken() -> Any:
        raise RuntimeError(f"cannot read {samples.PERSON}")

    [failed] = build_panels([broken])
    assert "unavailable" in failed.title
    assert samples.PERSON not in failed.note
    assert "RuntimeError" in failed.note
