"""The outbox relay: the only way a record leaves a province node.

A step writes the records it causes into the outbox table in its own transaction
(:meth:`Store.add_outbox`); once the step committed, :meth:`Relay.dispatch` hands them to the
producer. A row is removed only after the broker acknowledged it. A send that fails is tried
again with capped exponential backoff, for ever and loudly (log, metric): never dropped. At
start, rows a crash left behind are sent again with the same message id and ``xs-attempt`` + 1.
The futures :meth:`dispatch` returns resolve on the acknowledgement, which is what the
consumer waits for before committing the offset of the record that caused them.

Several instances of one province may share the store (PostgreSQL). Each row belongs to the
instance whose step wrote it, and only that instance's relay sends it: nothing is sent twice
while its instance lives. Every :data:`ADOPT_INTERVAL_S`, each relay looks for rows of
instances that are no longer alive (:meth:`Store.alive`: a killed process's session lock is
gone) and adopts them in one UPDATE, so each row goes to one survivor, which sends it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Callable, Sequence

import structlog

from bus.audit import AuditEntry
from bus.constants import FAMILY_DLQ, TOPIC_RE
from bus.envelope import Envelope
from bus.errors import BusError, DecodeError
from bus.metrics import Metrics
from bus.store import OutRecord, Store
from bus.transport import Producer

log = structlog.get_logger(__name__)

FLUSH_INTERVAL_S = 0.05
"""Acknowledged rows are deleted in one write at most this often (one write per batch)."""
RESEND_INITIAL_S = 0.1
"""First wait before a failed send is tried again."""
RESEND_MAX_S = 10.0
"""A send that keeps failing is tried at least this often."""
RESUME_CHUNK = 1_000
"""Rows read at once when resuming after a crash (bounded memory)."""
ADOPT_INTERVAL_S = 1.0
"""How often a relay looks for rows left by an instance that died."""


@functools.lru_cache(maxsize=1024)
def route_of_topic(name: str) -> tuple[str, str]:
    """(family, province) of a topic name, ``("?", "?")`` outside the contract: the labels
    of a record sent there. Cached: a node sends to and reads from a few dozen topics."""
    parsed = TOPIC_RE.match(name)
    return (parsed.group(1), parsed.group(2)) if parsed else ("?", "?")


def family_of_topic(name: str) -> str:
    """The contract family of a topic name (``?`` for a topic outside the contract)."""
    return route_of_topic(name)[0]


def resent(record: OutRecord) -> OutRecord:
    """The record sent again: same message id, ``xs-attempt`` + 1. Dead letters are copies
    of someone else's record and are re-sent unchanged."""
    if family_of_topic(record.topic) == FAMILY_DLQ:
        return record
    try:
        env = Envelope.from_headers(record.headers)
    except DecodeError:
        return record
    return OutRecord(record.topic, record.key, record.value, env.resent().to_headers())


Seal = Callable[[OutRecord], OutRecord]
"""Turns a committed record into the record as it leaves now (sent-at, signature)."""
Describe = Callable[[OutRecord], AuditEntry | None]
"""The message-log entry of a record the broker acknowledged (None: not logged)."""


def unsealed(record: OutRecord) -> OutRecord:
    """A :data:`Seal` that leaves the record as it is."""
    return record


class Relay:
    """Sends committed outbox rows and forgets them once the broker has them.

    Each record is *sealed* just before it is sent (``xs-sent-at`` of this send, signature):
    a record that waited in the outbox while the broker was away still leaves with a fresh
    sent-at the receiver's window accepts. Dead letters are copies and leave unchanged. What
    the broker acknowledged is removed from the outbox and appended to the signed message
    log in one write, exactly as it was sent.
    """

    def __init__(
        self,
        store: Store,
        producer: Producer,
        metrics: Metrics,
        province: str,
        *,
        seal: Seal = unsealed,
        describe: Describe | None = None,
    ) -> None:
        self._store = store
        self._seal = seal
        self._describe = describe
        self._logged: list[AuditEntry] = []
        self._producer = producer
        self._metrics = metrics
        self._log = log.bind(province=province)
        self._acked: list[int] = []
        self._inflight: dict[int, tuple[asyncio.Future[None], float]] = {}
        """Rows handed over and not yet acknowledged: their future and when (monotonic) they
        were dispatched, in dispatch order."""
        self._queue: deque[tuple[int, OutRecord, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._adopter: asyncio.Task[None] | None = None
        self._running = False

    @property
    def in_flight(self) -> int:
        """Rows handed to the producer and not yet acknowledged."""
        return len(self._inflight)

    def oldest_age_s(self) -> float:
        """Seconds since the oldest row not yet acknowledged was dispatched (0: none): rows
        the broker does not take (down, refusing) make it grow. Read from another thread by
        the exporter, hence the retry when the loop changes the dict meanwhile."""
        for _ in range(5):
            try:
                first = next(iter(self._inflight.values()), None)
            except RuntimeError:  # dictionary changed size during iteration
                continue
            return 0.0 if first is None else max(0.0, time.monotonic() - first[1])
        return 0.0

    async def start(self) -> int:
        """Send again what a crash left in the outbox; start removing acknowledged rows.
        Returns how many rows were resumed."""
        if self._running:
            return 0
        self._running = True
        self._sender = asyncio.create_task(self._send_loop(), name="outbox-send")
        resumed = 0
        last = 0
        while True:
            rows = self._store.outbox(RESUME_CHUNK, after_id=last)
            if not rows:
                break
            await self._send_again(rows)
            resumed += len(rows)
            last = rows[-1][0]
        if resumed:
            self._log.warning("outbox_resumed", records=resumed)
            self._metrics.inc("xsettle_outbox_resumed_total", resumed)
        resumed += await self.adopt()
        self._flusher = asyncio.create_task(self._flush_loop(), name="outbox-flush")
        self._adopter = asyncio.create_task(self._adopt_loop(), name="outbox-adopt")
        return resumed

    async def _send_again(self, rows: Sequence[tuple[int, OutRecord]]) -> None:
        again = [(i, resent(r)) for i, r in rows]
        async with self._store.step():
            for i, r in again:
                self._store.outbox_replace(i, r)
        self.dispatch(again)

    async def adopt(self) -> int:
        """Adopt and send the rows of instances that are no longer alive; returns how many."""
        adopted = 0
        for owner in self._store.outbox_owners():
            if self._store.alive(owner):
                continue
            rows = self._store.adopt_outbox(owner)
            if not rows:
                continue  # another survivor was quicker
            await self._send_again(rows)
            adopted += len(rows)
            self._log.warning("outbox_adopted", records=len(rows), instance=owner)
            self._metrics.inc("xsettle_outbox_adopted_total", len(rows))
        return adopted

    async def _adopt_loop(self) -> None:
        while self._running:
            await asyncio.sleep(ADOPT_INTERVAL_S)
            try:
                await self.adopt()
            except BusError as exc:
                self._log.error("outbox_adopt_failed", error=str(exc))

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) for rows in flight, remove the acknowledged ones. Idempotent."""
        if not self._running:
            return
        pending = [f for f, _ in self._inflight.values() if not f.done()]
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*pending), timeout_s)
        self._running = False
        for task in [*self._tasks, self._sender, self._adopter]:
            if task is not None:
                task.cancel()
        self._sender = self._adopter = None
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await self.flush()

    def abandon(self) -> None:
        """Drop everything in memory without touching the store (a simulated crash)."""
        self._running = False
        for task in [*self._tasks, self._sender, self._flusher, self._adopter]:
            if task is not None:
                task.cancel()
        for fut, _ in self._inflight.values():
            fut.cancel()
        self._inflight.clear()
        self._queue.clear()
        self._acked.clear()
        self._logged.clear()

    def dispatch(self, rows: Sequence[tuple[int, OutRecord]]) -> list[asyncio.Future[None]]:
        """Queue committed rows for sending, in commit order (so records about one key keep
        their order); each future resolves when the broker acknowledged its row."""
        loop = asyncio.get_running_loop()
        at = time.monotonic()
        out = []
        for row_id, record in rows:
            done: asyncio.Future[None] = loop.create_future()
            self._inflight[row_id] = (done, at)
            self._queue.append((row_id, record, done))
            out.append(done)
        if rows:
            self._wake.set()
        return out

    async def _send_loop(self) -> None:
        while True:
            while self._queue:
                row_id, record, done = self._queue.popleft()
                await self._send(row_id, record, done, RESEND_INITIAL_S)
            self._wake.clear()
            await self._wake.wait()

    async def _send(
        self, row_id: int, record: OutRecord, done: asyncio.Future[None], delay: float
    ) -> None:
        wire = record if family_of_topic(record.topic) == FAMILY_DLQ else self._seal(record)
        try:
            fut = await self._producer.send(wire.topic, wire.key, wire.value, wire.headers)
        except BusError as exc:
            self._retry_later(row_id, record, done, delay, exc)
            return
        fut.add_done_callback(lambda f: self._on_ack(row_id, record, wire, done, delay, f))

    def _on_ack(
        self,
        row_id: int,
        record: OutRecord,
        wire: OutRecord,
        done: asyncio.Future[None],
        delay: float,
        fut: asyncio.Future[object],
    ) -> None:
        if done.done():
            return
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            self._retry_later(row_id, record, done, delay, exc)
            return
        family, to = route_of_topic(record.topic)
        self._metrics.inc("xsettle_messages_out_total", family=family, counterparty=to)
        self._acked.append(row_id)
        if self._describe is not None:
            entry = self._describe(wire)
            if entry is not None:
                self._logged.append(entry)
        self._inflight.pop(row_id, None)
        done.set_result(None)

    def _retry_later(
        self,
        row_id: int,
        record: OutRecord,
        done: asyncio.Future[None],
        delay: float,
        exc: BaseException | None,
    ) -> None:
        if not self._running:
            return  # stays in the outbox: sent again at the next start
        self._metrics.inc(
            "xsettle_outbox_send_failures_total", family=family_of_topic(record.topic)
        )
        self._log.error(
            "outbox_send_failed",
            topic=record.topic,
            row=row_id,
            size=len(record.value),
            retry_in_s=delay,
            error=repr(exc)[:300],
        )

        async def again() -> None:
            await asyncio.sleep(delay)
            await self._send(row_id, record, done, min(delay * 2, RESEND_MAX_S))

        task = asyncio.create_task(again(), name=f"outbox-resend-{row_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Remove acknowledged rows now (one write)."""
        if not self._acked:
            return
        ids, self._acked = self._acked, []
        logged, self._logged = self._logged, []
        try:
            async with self._store.step():
                self._store.outbox_sent(ids)
                self._store.audit.append(logged)
        except BusError:
            self._acked.extend(ids)  # kept: removed at the next flush, or re-sent after a crash
            self._logged[:0] = logged
            raise

    async def _flush_loop(self) -> None:
        while self._running:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self.flush()
            except BusError as exc:
                self._log.error("outbox_flush_failed", error=str(exc))
