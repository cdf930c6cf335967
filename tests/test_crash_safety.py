"""Crash-safe by construction, on the real embedded broker: each defect found by killing and
fuzzing a province has a test here that failed before the step/outbox design.

A crash *inside* a step is modelled by an exception before its commit (SQLite then keeps
nothing of it, as after kill -9); a crash *after* a commit but before the records left is
modelled by dropping the relay's dispatch and killing the node. ``xsettle chaos`` does the
same with real kill -9 of province processes (tests/test_chaos.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from adapters.backoffice import ClaimState, HostClaim, Person
from adapters.directory import Directory
from adapters.fixtures import LAO_ZHANG_PERSON_ID, lao_zhang_items
from adapters.province import ProvinceSystem
from bus import testing
from bus.broker import create_contract_topics
from bus.codec import Codec
from bus.constants import H_DLQ_ERROR_KIND, H_DLQ_OFFSET, H_MESSAGE_ID, topic
from bus.envelope import Envelope, new_id, now_ms
from bus.models import (
    ClaimPackage,
    ErrorCode,
    ErrorReport,
    FilingAction,
    FilingChannel,
    FilingReason,
    FilingUpload,
    InsuranceType,
    SettlementMode,
    VisitType,
    now,
)
from bus.node import Node
from bus.settings import BusSettings
from bus.store import OutRecord
from bus.transport import RawRecord, write_raw_records
from simulators import samples
from simulators.keys import sign_as, without_keys
from tests.conftest import NodeFactory, ProvincePool
from tests.helpers import eventually, hdr, produce_raw, read_topic

pytestmark = pytest.mark.broker

# first_send_after_topic: on the embedded broker, a record batched with the producer's first
# send to a topic created after the producer started is refused (NotLeaderForPartition) until
# the request times out (30 s), then the outbox sends it again. Provinces create their topics
# before they start; so do these tests, or they would wait 30 s for a dead letter.

ADMITTED = dt.datetime(2026, 5, 8, 9, 30, tzinfo=dt.UTC)


def remapped_directory(folder: Path, home: str, host: str) -> Directory:
    """The default directory with Hebei renamed ``home`` and Hainan ``host`` (fresh province
    codes, so these tests own their consumer groups and can kill and restart them)."""
    prefix = {"13": home[:2], "46": host[:2]}
    text = (Path(__file__).parents[1] / "adapters" / "default_directory.toml").read_text("utf-8")
    text = without_keys(text)
    text = re.sub(
        r'"(H?)(13|46)(\d+)"', lambda m: f'"{m[1]}{prefix[m[2]]}{m[3]}"', text
    )  # every quoted code of the two provinces
    path = folder / "directory.toml"
    path.write_text(text, encoding="utf-8")
    return Directory.load(path)


class Pair:
    """A home (Hebei's rules) and a host (Hainan's) under fresh codes, restartable."""

    def __init__(
        self, broker: str, settings: BusSettings, folder: Path, pool: ProvincePool
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.home_code, self.host_code = pool.take(), pool.take()
        self.directory = remapped_directory(folder, self.home_code, self.host_code)
        self.state = {self.home_code: folder / "home", self.host_code: folder / "host"}
        self.systems: dict[str, ProvinceSystem] = {}

    @property
    def home(self) -> ProvinceSystem:
        return self.systems[self.home_code]

    @property
    def host(self) -> ProvinceSystem:
        return self.systems[self.host_code]

    @property
    def home_region(self) -> str:
        return self.home_code[:2] + "0100"

    async def start(self, *codes: str) -> None:
        """Start (or restart on their state folders) the named provinces, or both."""
        await create_contract_topics(self.settings, self.broker, list(self.state))
        chosen = codes or tuple(self.state)
        for code in chosen:
            self.systems[code] = ProvinceSystem(
                code, self.settings, bootstrap=self.broker, directory=self.directory,
                state_dir=self.state[code], instant_deadline_s=30.0,
            )  # fmt: skip
        await asyncio.gather(*(self.systems[c].start() for c in chosen))
        await asyncio.gather(*(self.systems[c].node.wait_ready(60) for c in chosen))

    async def kill(self, code: str) -> None:
        """A crash: no drain, no commit, the database closed as it is."""
        system = self.systems.pop(code)
        await testing.kill(system.node)
        system.close()

    async def stop(self) -> None:
        for system in self.systems.values():
            await system.stop()
            system.close()
        self.systems.clear()

    async def file_lao_zhang(self) -> None:
        """Lao Zhang enrolled and filed at the home, registered at the host."""
        self.home.backoffice.add_person(
            Person(LAO_ZHANG_PERSON_ID, "张建国", InsuranceType.EMPLOYEE, self.home_region)
        )
        filing = FilingUpload(
            filing_id=f"F-{self.home_region}-{new_id()[:8]}",
            action=FilingAction.CREATE,
            person_id=LAO_ZHANG_PERSON_ID,
            person_name="张建国",
            insurance_type=InsuranceType.EMPLOYEE,
            home_region=self.home_region,
            host_region=self.host_code,
            reason=FilingReason.RELOCATED_RETIREE,
            channel=FilingChannel.COUNTER,
            valid_from=dt.date(2026, 1, 1),
            filed_at=now(),
        )
        await self.home.home.file(filing)
        await eventually(
            lambda: self.host.backoffice.filing_for(LAO_ZHANG_PERSON_ID) is not None, 20
        )

    async def claim(self) -> ClaimPackage:
        """Lao Zhang's 25,000-yuan stay packaged at the host (DELAYED)."""
        host = self.host.host
        hospital = f"H{self.host_code[:2]}010001"
        admission = await host.admit(LAO_ZHANG_PERSON_ID, self.home_region, hospital, ADMITTED)
        claim = host.package(
            admission,
            lao_zhang_items(),
            visit_type=VisitType.INPATIENT,
            diagnoses=("I25.1",),
            discharged_at=ADMITTED + dt.timedelta(days=15),
        )
        assert claim.settlement_mode is SettlementMode.DELAYED
        return claim

    async def settled(self, claim_id: str, timeout_s: float = 40.0) -> HostClaim:
        def done() -> bool:
            c = self.host.backoffice.claim(claim_id)
            return c is not None and c.state is ClaimState.SETTLED

        await eventually(done, timeout_s)
        found = self.host.backoffice.claim(claim_id)
        assert found is not None
        return found


@pytest.fixture
async def pair(
    broker: str, settings: BusSettings, tmp_path: Path, province_pool: ProvincePool
) -> Any:
    made = Pair(broker, settings, tmp_path, province_pool)
    yield made
    await made.stop()


def drop_dispatch(node: Node, keep: Callable[[OutRecord], bool] = lambda r: False) -> None:
    """From now on, committed outbox rows that ``keep`` rejects never reach the producer:
    the state after a crash between a step's commit and its records leaving."""
    relay = node._relay
    real = relay.dispatch

    def dispatch(rows: Sequence[tuple[int, OutRecord]]) -> list[asyncio.Future[None]]:
        return real([(i, r) for i, r in rows if keep(r)])

    relay.dispatch = dispatch  # type: ignore[method-assign]


LAO_ZHANG_PAYMENTS = [("ADVANCE", 625_000), ("TOP_UP", 125_000)]


class TestCrashWindows:
    @pytest.mark.timeout(120)
    async def test_crash_inside_the_submit_step_charges_nothing(self, pair: Pair) -> None:
        """A crash after the claim row and its advance were written but before the step
        committed leaves no claim, no advance, no request; submitting again settles once."""
        await pair.start()
        await pair.file_lao_zhang()
        claim = await pair.claim()
        office = pair.host.backoffice
        real_save = office.save_claim

        def save_then_crash(*args: Any, **kw: Any) -> None:
            real_save(*args, **kw)
            raise RuntimeError("power cut")

        office.save_claim = save_then_crash  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await pair.host.host.submit(claim)
        office.save_claim = real_save  # type: ignore[method-assign]
        assert office.claim(claim.claim_id) is None
        assert office.payments(claim.claim_id) == []
        await eventually(lambda: pair.host.node.store.outbox_size() == 0)
        assert pair.host.node.store.count() == 0
        await pair.host.host.submit(claim)
        await pair.settled(claim.claim_id)
        assert [(k, f) for _, k, f in office.payments(claim.claim_id)] == LAO_ZHANG_PAYMENTS

    @pytest.mark.timeout(150)
    async def test_request_stored_but_never_sent_leaves_after_restart(self, pair: Pair) -> None:
        """Killed after the claim, its advance and its pending request committed but before
        the record left: the restarted host sends it from the outbox (same id, attempt 2),
        the home reviews it once, the host settles it once."""
        await pair.start()
        await pair.file_lao_zhang()
        claim = await pair.claim()
        drop_dispatch(pair.host.node)
        request_id = await pair.host.host.submit(claim)
        await eventually(lambda: pair.host.node.store.outbox_size() == 1)  # only the claim
        await pair.kill(pair.host_code)
        await pair.start(pair.host_code)
        found = await pair.settled(claim.claim_id)
        assert found.request_id == request_id
        payments = [(k, f) for _, k, f in pair.host.backoffice.payments(claim.claim_id)]
        assert payments == LAO_ZHANG_PAYMENTS
        assert [r.claim_id for r in pair.home.backoffice.reviews()] == [claim.claim_id]
        sent = await read_topic(
            pair.broker, pair.settings, topic("claim", pair.home_code), expect=1
        )
        assert [hdr(r, H_MESSAGE_ID) for r in sent] == [request_id]
        assert hdr(sent[0], "xs-attempt") == "2"
        await eventually(lambda: pair.host.node.store.outbox_size() == 0)

    @pytest.mark.timeout(150)
    async def test_notice_committed_with_the_settlement_survives_a_kill(self, pair: Pair) -> None:
        """Killed after settling with the patient but before the SettlementNotice left: the
        notice was committed with the settlement and is sent after the restart, once."""
        await pair.start()
        await pair.file_lao_zhang()
        claim = await pair.claim()
        drop_dispatch(pair.host.node, keep=lambda r: ".settlement." not in r.topic)
        await pair.host.host.submit(claim)
        await pair.settled(claim.claim_id)
        assert pair.host.node.store.outbox_size() >= 1
        await pair.kill(pair.host_code)
        await pair.start(pair.host_code)
        await eventually(
            lambda: [n.claim_id for n in pair.home.backoffice.settlements()] == [claim.claim_id],
            30,
        )
        payments = [(k, f) for _, k, f in pair.host.backoffice.payments(claim.claim_id)]
        assert payments == LAO_ZHANG_PAYMENTS
        await eventually(lambda: pair.host.node.store.outbox_size() == 0)

    @pytest.mark.timeout(90)
    async def test_notice_for_a_claim_never_reviewed_is_reported(
        self, pair: Pair, codec: Codec
    ) -> None:
        """A SettlementNotice about a claim the home never reviewed is reported to its
        sender as INVALID_MESSAGE and not stored."""
        await pair.start(pair.home_code)
        notice = samples.notice().model_copy(update={"claim_id": "C-NEVER-SEEN"})
        env = Envelope(
            message_id=new_id(), message_type=notice.avro_name, source=pair.host_code,
            target=pair.home_code, sent_at_ms=now_ms(),
        )  # fmt: skip
        await produce_raw(
            pair.broker, pair.settings, topic("settlement", pair.home_code),
            codec.encode(notice), env.to_headers(),
        )  # fmt: skip
        errors = await read_topic(
            pair.broker, pair.settings, topic("error", pair.host_code), expect=1
        )
        rep = codec.decode(errors[0].value or b"")
        assert isinstance(rep, ErrorReport)
        assert rep.code is ErrorCode.INVALID_MESSAGE
        assert rep.ref_message_id == env.message_id
        assert pair.home.backoffice.settlements() == []


def claim_to(host: str, home: str, claim_id: str | None = None) -> ClaimPackage:
    return samples.claim(
        home=home[:2] + "0100",
        host=host[:2] + "0100",
        claim_id=claim_id or f"C-{host}-1",
        person=samples.PERSON,
    )


def answer_headers(source: str, target: str, request_id: str, message_type: str, **kw: Any) -> Any:
    return Envelope(
        message_id=new_id(), message_type=message_type, source=source, target=target,
        sent_at_ms=now_ms(), correlation_id=request_id, **kw,
    ).to_headers()  # fmt: skip


class TestAnswersAreChecked:
    async def test_forged_answers_are_refused_and_the_request_stays_open(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """An answer from a third province, of a family not paired with the request, or
        about another claim is reported and changes nothing; the true answer then closes
        the request once."""
        host_code, home_code, third = (province_pool.take() for _ in range(3))
        host = await make_node(host_code)
        await host.wait_ready()
        got: list[str] = []

        @host.on_answer(ClaimPackage)
        async def collect(answer: Any) -> None:
            got.append(answer.request_id)

        request_id = await host.request(claim_to(host_code, home_code), deadline_s=60)
        reply_topic = topic("reply", host_code)
        forgeries = [
            (third, samples.review(f"C-{host_code}-1")),  # from a province nobody asked
            (home_code, samples.receipt()),  # a FilingReceipt cannot answer a claim
            (home_code, samples.review("C-OTHER")),  # about another claim
        ]
        for source, message in forgeries:
            await produce_raw(
                host.bootstrap, host.settings, reply_topic, codec.encode(message),
                answer_headers(source, host_code, request_id, message.avro_name),
            )  # fmt: skip
        await eventually(lambda: host.metrics.get("xsettle_answers_total", outcome="refused") == 3)
        pending = host.store.get_pending(request_id)
        assert pending is not None
        assert pending.state == "pending"
        assert got == []
        reports = await read_topic(host.bootstrap, host.settings, topic("error", third), expect=1)
        rep = codec.decode(reports[0].value or b"")
        assert isinstance(rep, ErrorReport)
        assert rep.code is ErrorCode.INVALID_MESSAGE
        true = samples.review(f"C-{host_code}-1")
        await produce_raw(
            host.bootstrap, host.settings, reply_topic, codec.encode(true),
            answer_headers(home_code, host_code, request_id, true.avro_name),
        )  # fmt: skip
        await eventually(lambda: got == [request_id])
        pending = host.store.get_pending(request_id)
        assert pending is not None
        assert pending.state == "delivered"

    async def test_reply_to_pointing_elsewhere_is_dead_lettered(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """A request whose xs-reply-to is not the sender's own reply topic is dead-lettered
        with INVALID_MESSAGE to the sender; nothing is written where it pointed."""
        host_code, home_code, victim = (province_pool.take() for _ in range(3))
        # Every topic exists before the home's producer starts (see first_send_after_topic).
        await make_node(victim, start=False)  # nobody reads its topics
        await make_node(host_code, start=False)
        home = await make_node(home_code)
        calls: list[str] = []

        @home.on(ClaimPackage)
        async def review(message: Any, ctx: Any) -> Any:
            calls.append(message.claim_id)
            return samples.review(message.claim_id)

        await home.wait_ready()
        claim = claim_to(host_code, home_code)
        env = Envelope(
            message_id=new_id(), message_type=claim.avro_name, source=host_code,
            target=home_code, sent_at_ms=now_ms(), reply_to=topic("claim", victim),
            deadline_ms=now_ms() + 60_000,
        )  # fmt: skip
        await produce_raw(
            home.bootstrap, home.settings, topic("claim", home_code), codec.encode(claim),
            env.to_headers(),
        )  # fmt: skip
        dead = await read_topic(home.bootstrap, home.settings, topic("dlq", home_code), expect=1)
        assert hdr(dead[0], H_DLQ_ERROR_KIND) == "header_mismatch"
        errors = await read_topic(
            home.bootstrap, home.settings, topic("error", host_code), expect=1
        )
        rep = codec.decode(errors[0].value or b"")
        assert isinstance(rep, ErrorReport)
        assert rep.code is ErrorCode.INVALID_MESSAGE
        assert calls == []
        elsewhere = await read_topic(
            home.bootstrap, home.settings, topic("claim", victim), expect=0, timeout_s=1.0
        )
        assert elsewhere == []


class TestBadRecordsNeverStopAPartition:
    async def test_non_utf8_header_value_is_dead_lettered_not_mangled(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """A message id that is not UTF-8 is a dead letter, never a mangled correlation id."""
        host_code, home_code = province_pool.take(), province_pool.take()
        await make_node(host_code, start=False)  # its error topic exists first
        home = await make_node(home_code)
        await home.wait_ready()
        env = Envelope(
            message_id="x", message_type=samples.notice().avro_name, source=host_code,
            target=home_code, sent_at_ms=now_ms(),
        )  # fmt: skip
        headers = tuple(
            (k, b"\xff\xfe-id" if k == H_MESSAGE_ID else v) for k, v in env.to_headers()
        )
        await produce_raw(
            home.bootstrap, home.settings, topic("settlement", home_code),
            codec.encode(samples.notice()), headers,
        )  # fmt: skip
        dead = await read_topic(home.bootstrap, home.settings, topic("dlq", home_code), expect=1)
        assert hdr(dead[0], H_DLQ_ERROR_KIND) == "undecodable_header"
        errors = await read_topic(
            home.bootstrap, home.settings, topic("error", host_code), expect=1
        )
        assert hdr(errors[0], "xs-correlation-id") is None

    async def test_two_megabyte_record_is_dead_lettered_and_the_partition_goes_on(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """A 2 MB record becomes a dead letter with its size and digest instead of its bytes,
        its sender gets INVALID_MESSAGE, and the next record of the partition is handled."""
        host_code, home_code = province_pool.take(), province_pool.take()
        await make_node(host_code, start=False)  # its error topic exists first
        home = await make_node(home_code)
        seen: list[str] = []

        @home.on(samples.notice().__class__)
        async def notice(message: Any, ctx: Any) -> None:
            seen.append(ctx.envelope.message_id)

        await home.wait_ready()
        settlement = topic("settlement", home_code)

        def headers() -> Any:
            return Envelope(
                message_id=new_id(), message_type=samples.notice().avro_name,
                source=host_code, target=home_code, sent_at_ms=now_ms(),
            ).to_headers()  # fmt: skip

        big = codec.encode(samples.notice()) + b"\x00" * 2_000_000
        after = sign_as(host_code, headers(), b"same", codec.encode(samples.notice()))
        raw = [
            RawRecord(b"same", value, [(k.encode(), v) for k, v in hs])
            for value, hs in ((big, headers()), (codec.encode(samples.notice()), after))
        ]
        await write_raw_records(home.bootstrap, settlement, 0, raw)
        await eventually(lambda: len(seen) == 1, 20)
        assert seen == [dict(after)[H_MESSAGE_ID].decode()]
        dead = await read_topic(home.bootstrap, home.settings, topic("dlq", home_code), expect=1)
        assert hdr(dead[0], H_DLQ_ERROR_KIND) == "oversized"
        assert hdr(dead[0], H_DLQ_OFFSET) is not None
        assert len(dead[0].value or b"") == 0
        assert hdr(dead[0], "xs-dlq-original-sha256") is not None

    async def test_non_utf8_header_key_is_dead_lettered_and_the_partition_goes_on(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """A header key the Kafka client cannot decode no longer stops the province: the
        record is dead-lettered by its coordinates and the next one is handled."""
        host_code, home_code = province_pool.take(), province_pool.take()
        await make_node(host_code, start=False)  # its error topic exists first
        home = await make_node(home_code)
        seen: list[str] = []

        @home.on(samples.notice().__class__)
        async def notice(message: Any, ctx: Any) -> None:
            seen.append(ctx.envelope.message_id)

        await home.wait_ready()
        value = codec.encode(samples.notice())
        good = sign_as(host_code, Envelope(
            message_id=new_id(), message_type=samples.notice().avro_name, source=host_code,
            target=home_code, sent_at_ms=now_ms(),
        ).to_headers(), b"k", value)  # fmt: skip
        offsets = await write_raw_records(
            home.bootstrap,
            topic("settlement", home_code),
            1,
            [
                RawRecord(b"k", value, [(b"\xff\xfe", b"x")]),
                RawRecord(b"k", value, [(k.encode(), v) for k, v in good]),
            ],
        )
        await eventually(lambda: seen == [dict(good)[H_MESSAGE_ID].decode()], 20)
        dead = await read_topic(home.bootstrap, home.settings, topic("dlq", home_code), expect=1)
        assert hdr(dead[0], H_DLQ_ERROR_KIND) == "undecodable_header"
        assert hdr(dead[0], H_DLQ_OFFSET) == str(offsets[0])
        assert home.failure is None

    async def test_an_unexpected_worker_error_is_loud_and_fatal(
        self, make_node: NodeFactory, province_pool: ProvincePool
    ) -> None:
        """A bug that escapes a partition worker is logged with its traceback, counted, and
        sets ``failed`` so the process exits non-zero: never a live process that stopped."""
        host_code, home_code = province_pool.take(), province_pool.take()
        home = await make_node(home_code)
        await home.wait_ready()

        async def broken(*args: Any) -> None:
            raise RuntimeError("a bug in dead-lettering")

        home._dead_letter = broken  # type: ignore[method-assign,assignment]
        env = Envelope(
            message_id=new_id(), message_type=samples.notice().avro_name, source=host_code,
            target=home_code, sent_at_ms=now_ms(),
        )  # fmt: skip
        with structlog.testing.capture_logs() as logs:
            await produce_raw(
                home.bootstrap, home.settings, topic("settlement", home_code), b"garbage",
                env.to_headers(),
            )  # fmt: skip
            await asyncio.wait_for(home.failed.wait(), 20)
        assert isinstance(home.failure, RuntimeError)
        assert home.metrics.total("xsettle_worker_crashes_total") == 1
        assert any(e["event"] == "worker_crashed" for e in logs)
        assert home.health()["ok"] is False
