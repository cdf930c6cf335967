"""Ops monitoring on the real embedded broker: planted faults show up with the right code and
the province that must act, metrics are exported, and a dead letter replayed after its cause
is fixed is processed exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
import urllib.request
from pathlib import Path

import pytest

from bus.broker import create_contract_topics
from bus.codec import Codec, SchemaStore
from bus.console import Console, by_counterparty
from bus.constants import topic
from bus.envelope import Envelope, new_id, now_ms
from bus.errors import Rejection
from bus.exporter import start_exporter
from bus.metrics import Metrics
from bus.models import ClaimPackage, ErrorCode, Message, yuan
from bus.node import Context, Node
from bus.ops import (
    ErrorAggregate,
    ErrorEvent,
    follow_errors,
    list_dead_letters,
    owed_report,
    parse_coords,
    pending_report,
    pending_summary,
    replay,
)
from bus.settings import BusSettings
from bus.store import OPEN, PENDING, Obligation, OutRecord, PendingRequest, SqlStore
from schemas import SCHEMA_DIR
from simulators import samples
from simulators.cli import build_parser
from simulators.keys import demo_trust
from tests.conftest import NodeFactory, ProvincePool
from tests.helpers import eventually, produce_raw, read_topic

pytestmark = pytest.mark.broker


def region(province: str) -> str:
    """The first pooling region of a province."""
    return province[:2] + "0100"


def claim_envelope(host: str, home: str, message_id: str | None = None) -> Envelope:
    """Headers of a claim request from ``host`` to ``home``."""
    return Envelope(
        message_id=message_id or new_id(),
        message_type=ClaimPackage.avro_name,
        source=host,
        target=home,
        sent_at_ms=now_ms(),
        reply_to=topic("reply", host),
        deadline_ms=now_ms() + 600_000,
    )


def claim_value(codec: Codec, host: str, home: str) -> bytes:
    """A valid encoded claim from ``host`` to ``home``."""
    return codec.encode(samples.claim(home=region(home), host=region(host)))


async def collect(
    settings: BusSettings, broker: str, province: str | None, want: int, since: int | str
) -> list[ErrorEvent]:
    """Error events addressed to ``province`` until ``want`` arrived (or 20 s passed)."""
    out: list[ErrorEvent] = []
    source = follow_errors(
        settings,
        broker,
        province=province,
        since=since,  # type: ignore[arg-type]
        stop_after_s=20,
    )
    async with contextlib.aclosing(source) as events:
        async for event in events:
            out.append(event)
            if len(out) >= want:
                break
    return out


def http_get(url: str) -> str:
    """GET ``url`` and return its body as text (run in a thread)."""
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback URL)
        body: bytes = response.read()
    return body.decode("utf-8")


class Reviewer:
    """A home handler that approves every claim and counts how often it ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, message: Message, ctx: Context) -> Message | None:
        assert isinstance(message, ClaimPackage)
        self.calls.append(message.claim_id)
        return samples.review(message.claim_id)


class TestErrorsAndMetrics:
    async def test_planted_faults_show_code_responsible_and_metrics(
        self,
        broker: str,
        settings: BusSettings,
        make_node: NodeFactory,
        province_pool: ProvincePool,
        codec: Codec,
    ) -> None:
        """Garbage in a claim inbox → INVALID_MESSAGE for the sender; a handler's refusal →
        NOT_FILED for the sender; both in follow_errors (one province and all provinces),
        in the exported metrics, and the garbage in the DLQ with a readable preview."""
        started = now_ms()
        host, home = province_pool.take(), province_pool.take()
        await create_contract_topics(settings, broker, [host])
        node = await make_node(home, start=False)

        @node.on(ClaimPackage)
        async def refuse(message: Message, ctx: Context) -> Message | None:
            raise Rejection(ErrorCode.NOT_FILED, f"no filing for {samples.PERSON}")

        await node.start()
        await node.wait_ready()
        claims = topic("claim", home)
        garbage = claim_envelope(host, home, "garbage-1")
        await produce_raw(
            broker, settings, claims, b"\x00garbage", garbage.to_headers(), samples.PERSON.encode()
        )
        refused = claim_envelope(host, home, "refused-1")
        await produce_raw(
            broker,
            settings,
            claims,
            claim_value(codec, host, home),
            refused.to_headers(),
            samples.PERSON.encode(),
        )

        events = await collect(settings, broker, host, 2, "beginning")
        by_corr = {e.correlation_id: e for e in events}
        assert set(by_corr) == {"garbage-1", "refused-1"}
        assert by_corr["garbage-1"].code == ErrorCode.INVALID_MESSAGE.value
        assert by_corr["refused-1"].code == ErrorCode.NOT_FILED.value
        for event in events:
            assert event.report is not None
            assert event.report.responsible == host
            assert event.report.origin == host
            assert event.report.detected_by == home
            text = json.dumps(event.to_json(), ensure_ascii=False)
            assert samples.PERSON not in text  # the key and the message are masked
            assert samples.PERSON[:6] in text
        everywhere = await _events_for(settings, broker, host, started)
        assert {e.correlation_id for e in everywhere} == {"garbage-1", "refused-1"}

        agg = ErrorAggregate()
        for event in events + events:  # the same reports twice count once
            agg.add(event)
        assert agg.total == 2
        assert agg.by_responsible[host] == 2
        assert agg.by_code[ErrorCode.NOT_FILED.value] == 1

        server, port = start_exporter([node])
        try:
            text = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
        finally:
            server.shutdown()
            server.server_close()
        mine = f'province="{home}",responsible="{host}"}} 1.0'
        assert f'xsettle_dead_letters_total{{kind="bad_marker",{mine}' in text
        assert f'xsettle_errors_total{{code="INVALID_MESSAGE",{mine}' in text
        assert f'xsettle_errors_total{{code="NOT_FILED",{mine}' in text
        claims_in = f'counterparty="{host}",family="claim",province="{home}"'
        assert f"xsettle_messages_in_total{{{claims_in}}} 1.0" in text
        assert f'xsettle_pending_requests{{province="{home}"}} 0.0' in text
        assert f'xsettle_consumer_lag{{partition="0",province="{home}"' in text

        letters = await list_dead_letters(settings, broker, home)
        assert len(letters) == 1
        letter = letters[0]
        assert letter.error_kind == "bad_marker"
        assert letter.original_topic == claims
        assert letter.message_id == "garbage-1"
        assert letter.replayed_at_ms is None
        assert parse_coords(letter.coordinates) == (letter.topic, letter.partition, letter.offset)
        preview = letter.decoded_preview(codec)
        assert preview["envelope"]["source"] == host
        assert preview["decode_error"].startswith("bad_marker")
        assert preview["value_hex"].startswith("00 67 61")
        assert samples.PERSON not in json.dumps(letter.to_json())


async def _events_for(
    settings: BusSettings, broker: str, province: str, since_ms: int
) -> list[ErrorEvent]:
    """Events addressed to ``province`` read through the all-provinces pattern reader."""
    out: list[ErrorEvent] = []
    source = follow_errors(
        settings, broker, province=None, since=since_ms, stop_after_s=20, until_caught_up=True
    )
    async with contextlib.aclosing(source) as events:
        async for event in events:
            if event.addressee == province:
                out.append(event)
    return out


def codec_without_claims() -> Codec:
    """A codec whose schema store lacks ClaimPackage: the schema not yet deployed."""
    store = SchemaStore()
    for path in sorted(SCHEMA_DIR.glob("*.avsc")):
        if path.stem != "ClaimPackage":
            store.add(json.loads(path.read_text(encoding="utf-8")), source=str(path), current=True)
    return Codec(store)


class TestReplay:
    async def test_replay_after_the_fix_is_processed_exactly_once(
        self,
        broker: str,
        settings: BusSettings,
        province_pool: ProvincePool,
        codec: Codec,
        tmp_path: Path,
    ) -> None:
        """A claim the home cannot read (schema not deployed) is dead-lettered; after the
        schema is deployed a replay runs the handler once, and a second replay of the same
        letter does not run it again (idempotent by xs-message-id)."""
        host, home = province_pool.take(), province_pool.take()
        await create_contract_topics(settings, broker, [host, home])
        node_settings = settings.model_copy(update={"state_dir": tmp_path})
        before = Node(
            home,
            node_settings,
            bootstrap=broker,
            trust=demo_trust(home),
            codec=codec_without_claims(),
        )
        await before.start()
        try:
            await before.wait_ready()
            env = claim_envelope(host, home)
            await produce_raw(
                broker,
                settings,
                topic("claim", home),
                claim_value(codec, host, home),
                env.to_headers(),
                samples.PERSON.encode(),
            )
            await eventually(
                lambda: (
                    before.metrics.get("xsettle_dead_letters_total", kind="unknown_fingerprint")
                    == 1
                )
            )
        finally:
            await before.stop()
            before.store.close()
        letters = await list_dead_letters(settings, broker, home)
        assert [d.error_kind for d in letters] == ["unknown_fingerprint"]
        assert letters[0].message_id == env.message_id

        # The schema is deployed now.
        after = Node(home, node_settings, bootstrap=broker, trust=demo_trust(home))
        reviewer = Reviewer()
        after.on(ClaimPackage)(reviewer)
        await after.start()
        try:
            await after.wait_ready()
            assert await replay(settings, broker, letters) == 1
            await eventually(lambda: len(reviewer.calls) == 1)
            replies = await read_topic(broker, settings, topic("reply", host), expect=1)
            assert len(replies) == 1
            listed = await list_dead_letters(settings, broker, home)
            assert len(listed) == 1  # the replay marker is no dead letter
            assert listed[0].replayed_at_ms is not None

            # Replayed again, the same signed record is a replay (the first replay was
            # accepted at other coordinates): dead-lettered as such, not handled, not answered.
            assert await replay(settings, broker, listed) == 1
            await eventually(
                lambda: after.metrics.get("xsettle_dead_letters_total", kind="replayed") == 1
            )
            await asyncio.sleep(0.3)
            assert reviewer.calls == [samples.claim(home=region(home), host=region(host)).claim_id]
            replies = await read_topic(broker, settings, topic("reply", host), expect=1)
            assert len(replies) == 1
        finally:
            await after.stop()
            after.store.close()


class TestPending:
    def test_what_we_owe_is_listed_overdue_first(self, tmp_path: Path) -> None:
        """Deferred answers this province owes are listed by requester, overdue first,
        with the person's key masked; answered ones are not listed."""
        store = SqlStore(tmp_path / "province-130000.sqlite3")
        now = 10_000_000
        for rid, source, deadline in (
            ("late-one", "460000", now - 1_000),
            ("fresh-one", "530000", now + 3_600_000),
            ("done-one", "460000", now - 5_000),
        ):
            store.add_obligation(
                Obligation(rid, "xsettle.v1.ClaimPackage", source, samples.PERSON.encode(),
                           deadline, now - 60_000, OPEN)
            )  # fmt: skip
        store.settle_obligation("done-one", OutRecord("t", None, b"v", ()), now)
        rows = owed_report(store, "130000", now)
        store.close()
        assert [(r.message_id, r.source, r.status) for r in rows] == [
            ("late-one", "460000", "overdue"),
            ("fresh-one", "530000", "waiting"),
        ]
        assert {r.direction for r in rows} == {"owed"}
        assert all(r.target == "130000" for r in rows)
        assert all(r.key is not None and samples.PERSON not in r.key for r in rows)

    def test_overdue_first_then_near_then_waiting(self, tmp_path: Path) -> None:
        """Overdue requests come first, then those within 10 % of their window or 60 s."""
        store = SqlStore(tmp_path / "bus-130000.sqlite3")
        now = 10_000_000
        cases = {
            "overdue": (now - 100_000, now - 1_000),  # deadline passed
            "near-60s": (now - 1_000, now + 30_000),  # 30 s left of a 31 s window
            "near-10pct": (now - 9_000_000, now + 500_000),  # 0.5 of 9.5 ks: within 10 %
            "waiting": (now - 1_000, now + 3_600_000),
        }
        for mid, (sent, deadline) in cases.items():
            env = claim_envelope("130000", "460000", mid)
            store.add_pending(
                PendingRequest(
                    message_id=mid,
                    message_type=ClaimPackage.avro_name,
                    target="460000" if mid != "waiting" else "530000",
                    record=OutRecord("t", samples.PERSON.encode(), b"v", env.to_headers()),
                    attempt=1,
                    sent_at_ms=sent,
                    deadline_ms=deadline,
                    state=PENDING,
                )
            )
        rows = pending_report(store, now)
        store.close()
        assert [r.message_id for r in rows] == ["overdue", "near-60s", "near-10pct", "waiting"]
        assert [r.status for r in rows] == ["overdue", "near", "near", "waiting"]
        assert rows[0].key is not None
        assert samples.PERSON not in rows[0].key
        assert rows[0].source == "130000"
        summary = pending_summary(rows)
        assert [s["target"] for s in summary] == ["460000", "530000"]
        assert summary[0]["overdue"] == 1
        assert summary[0]["near"] == 2


class TestConsoleHelpers:
    def test_money_in_yuan(self) -> None:
        """Fen become yuan with two decimals and thousands separators (for the adapters'
        panels: the console itself holds no money)."""
        assert yuan(123456789) == "1,234,567.89"
        assert yuan(-5) == "-0.05"

    def test_pending_and_owed_by_counterparty_oldest_first(
        self, settings: BusSettings, tmp_path: Path
    ) -> None:
        """The console lists what we wait for by the province that owes the answer and what
        we owe by the province that asked, overdue groups first, oldest request first."""
        store = SqlStore(tmp_path / "province-130000.sqlite3")
        now = now_ms()
        for mid, target, sent, deadline in (
            ("to-hainan-new", "460000", now - 5_000, now + 3_600_000),
            ("to-hainan-old", "460000", now - 600_000, now - 1_000),
            ("to-yunnan", "530000", now - 900_000, now + 3_600_000),
        ):
            env = claim_envelope("130000", target, mid)
            store.add_pending(
                PendingRequest(
                    message_id=mid,
                    message_type=ClaimPackage.avro_name,
                    target=target,
                    record=OutRecord("t", samples.PERSON.encode(), b"v", env.to_headers()),
                    attempt=1,
                    sent_at_ms=sent,
                    deadline_ms=deadline,
                    state=PENDING,
                )
            )
        store.add_obligation(
            Obligation("owed-1", ClaimPackage.avro_name, "440000", samples.PERSON.encode(),
                       now - 1_000, now - 7_200_000, OPEN)
        )  # fmt: skip
        console = Console(settings, "127.0.0.1:1", stores={"130000": store})
        try:
            data = console.pending_json(now)
            overview = console.overview_json()
        finally:
            store.close()
        awaited = data["awaited"]
        assert [g["counterparty"] for g in awaited] == ["460000", "530000"]  # overdue first
        assert [r["message_id"] for r in awaited[0]["requests"]] == [
            "to-hainan-old",
            "to-hainan-new",
        ]
        assert awaited[0]["overdue"] == 1
        assert awaited[0]["oldest_age_s"] == pytest.approx(600, abs=1)
        assert awaited[0]["requests"][0]["province"] == "130000"
        owed = data["owed"]
        assert [(g["counterparty"], g["overdue"]) for g in owed] == [("440000", 1)]
        assert owed[0]["requests"][0]["age_s"] == pytest.approx(7200, abs=1)
        assert samples.PERSON not in json.dumps(data)
        assert overview["counts"]["awaited_overdue"] == 1
        assert overview["counts"]["owed_overdue"] == 1
        # Not started: the counts it would read are unknown, and that is an alarm.
        assert overview["counts"]["errors"] is None
        assert overview["alarms"][0]["text"] == "the console's readers are not running"
        assert by_counterparty([], owed=False) == []

    async def test_unreachable_broker_is_an_alarm_not_zero(self, settings: BusSettings) -> None:
        """A console pointed at a closed port says the broker is unreachable (an alarm) and
        gives no counts, rather than 0 reports; its readers say they cannot read."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = f"127.0.0.1:{s.getsockname()[1]}"
        console = Console(settings, closed)
        await console.start()
        try:
            await eventually(lambda: console.broker.reachable is False, timeout_s=10)
            overview = console.overview_json()
            errors = console.errors_json()
            dlq = console.dlq_json()
        finally:
            await console.stop()
        assert overview["ok"] is False
        kinds = [a["kind"] for a in overview["alarms"]]
        assert kinds[0] == "broker"
        assert closed in overview["alarms"][0]["text"]
        assert overview["counts"]["errors"] is None
        assert overview["counts"]["dead_letters"] is None
        assert errors["total"] is None
        assert errors["known"] is False
        assert dlq["count"] is None

    def test_dead_worker_and_stalled_partition_are_alarms(self, settings: BusSettings) -> None:
        """A node whose worker died, or with a partition stalled, is an alarm naming it."""

        class Sick:
            province = "460000"
            metrics = Metrics()

            def health(self) -> dict[str, object]:
                return {
                    "province": self.province,
                    "ok": False,
                    "running": True,
                    "failure": "RuntimeError('boom')",
                    "stalled": ["xsettle.claim.460000:2"],
                }

        console = Console(settings, "127.0.0.1:1", nodes=[Sick()])
        alarms = {a.kind: a for a in console.alarms()}
        assert "boom" in alarms["worker"].text
        assert alarms["worker"].province == "460000"
        assert "xsettle.claim.460000:2" in alarms["stalled"].text


class TestCli:
    async def test_ops_commands(
        self,
        broker: str,
        make_node: NodeFactory,
        province_pool: ProvincePool,
        settings: BusSettings,
        capsys: pytest.CaptureFixture[str],
        tmp_path: Path,
    ) -> None:
        """``ops errors --no-follow --json``, ``ops dlq`` (list, show, replay) and
        ``ops pending`` work against the broker; a missing --bootstrap is an error."""
        host, home = province_pool.take(), province_pool.take()
        await create_contract_topics(settings, broker, [host])
        store_dir = tmp_path / "state"
        await make_node(home, state=store_dir)
        # No wait for the group: the record waits in the topic until the node reads it.
        await produce_raw(
            broker,
            settings,
            topic("claim", home),
            b"\x01junk",
            claim_envelope(host, home, "junk-1").to_headers(),
            samples.PERSON.encode(),
        )
        parser = build_parser()

        async def run(*argv: str) -> tuple[int, list[str]]:
            """Run one command; its output lines (log lines, which structlog prints to
            stdout in tests, left out)."""
            args = parser.parse_args(list(argv))
            code: int = await args.run(args)
            lines = capsys.readouterr().out.splitlines()
            return code, [line for line in lines if not line[:4].isdigit()]

        deadline = time.monotonic() + 30
        out: list[str] = []
        while time.monotonic() < deadline and not any("junk-1" in line for line in out):
            code, out = await run(
                "ops", "errors", "--bootstrap", broker, "--province", host, "--no-follow", "--json"
            )
            assert code == 0
        line = json.loads(out[0])
        assert line["code"] == "INVALID_MESSAGE"
        assert line["responsible"] == host
        assert samples.PERSON not in "\n".join(out)

        code, out = await run("ops", "dlq", "--bootstrap", broker, "--province", home)
        assert code == 0
        rows = [r for r in out if r.startswith("xsettle.dlq.")]
        assert len(rows) == 1
        assert "bad_marker" in rows[0]
        assert " dead " in rows[0]
        where = rows[0].split()[0]
        code, out = await run("ops", "dlq", "--bootstrap", broker, "--show", where)
        assert code == 0
        assert json.loads("\n".join(out))["preview"]["envelope"]["message_id"] == "junk-1"
        code, out = await run("ops", "dlq", "--bootstrap", broker, "--replay", where)
        assert code == 0
        assert "replayed 1 dead letter(s)" in out
        code, out = await run("ops", "dlq", "--bootstrap", broker, "--province", home)
        assert " replayed " in next(r for r in out if r.startswith(where))

        args = parser.parse_args(["ops", "dlq"])
        args.bootstrap = None
        assert await args.run(args) == 2
        assert "--bootstrap" in capsys.readouterr().err

        code, out = await run("ops", "pending", "--state-dir", str(tmp_path))
        assert code == 1  # no node store in that folder
        code, out = await run("ops", "pending", "--state-dir", str(store_dir), "--province", home)
        assert code == 0
        assert "nothing pending" in out


def test_the_newest_reports_are_ordered_by_time_across_topics() -> None:
    """Records of several error topics arrive interleaved: the newest list is by the time of
    each report, newest first, and a report read twice (two topics) counts once."""
    from bus.ops import ErrorEvent

    base = samples.error_report()
    events = []
    for i, at_s in enumerate((30, 10, 50, 20, 40)):
        rep = base.model_copy(
            update={
                "error_id": f"E-{i}",
                "occurred_at": dt.datetime.fromtimestamp(1_700_000_000 + at_s, dt.UTC),
            }
        )
        events.append(
            ErrorEvent(
                topic=f"xsettle.error.{'460000' if i % 2 else '130000'}", partition=0,
                offset=i, timestamp_ms=0, correlation_id=None, source="460000", report=rep,
                decode_error=None,
            )
        )  # fmt: skip
    agg = ErrorAggregate(newest_n=4)
    for event in [*events, events[2]]:
        agg.add(event)
    assert agg.total == 5
    newest = [e["error_id"] for e in agg.to_json()["newest"]]
    assert newest == ["E-2", "E-4", "E-0", "E-3"]  # 50, 40, 30, 20 s; the oldest (10) dropped
