"""A province node: publishes, consumes its inbox, answers requests, and tracks its own.

One node per province process. It knows the contract, not medical rules: handlers registered
with :meth:`Node.on` do the work. Outcomes, one table (the contract's promise made true):

============================================  ==============================================
what happens                                   outcome
============================================  ==============================================
value/headers cannot be decoded or disagree    record copied byte for byte to
(bad marker, unknown fingerprint, truncated,   ``xsettle.dlq.<self>`` with diagnostic headers;
missing/contradicting header)                  ``INVALID_MESSAGE`` to ``xsettle.error.<sender>``
                                               when ``xs-source`` names a province
handler raises :class:`Rejection`              ``ErrorReport`` with its code to the sender's
                                               error topic, ``xs-correlation-id`` set
handler fails transiently (any other error)    retried with capped exponential backoff in its
                                               own partition; after the last try
                                               ``INTERNAL_ERROR`` (retriable) to the sender
                                               and to ops (``xsettle.error.<self>``)
same ``xs-message-id`` received again          not handled again; the stored answer is re-sent
reply/ErrorReport for a pending request        delivered to the caller once (future/callback)
reply for a request already answered           ignored, logged
reply matching no request                      ``ORPHAN_REPLY`` to the replier's error topic
answer after the deadline                      delivered as a *late* answer, not terminal
deadline passes with no answer                 ``DEADLINE_EXCEEDED`` to the caller, to
                                               ``xsettle.error.<target>`` and to ops
============================================  ==============================================

Offsets are committed only for records whose outcome is durable: the answer stored and
acknowledged by the broker (or the dead letter written). Order is kept per partition, work
runs concurrently across partitions, and a partition with a long queue is paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from bus.codec import Codec
from bus.constants import (
    ERROR_TEXT_MAX,
    FAMILY_DLQ,
    FAMILY_ERROR,
    FAMILY_REPLY,
    H_DLQ_DETECTED_AT,
    H_DLQ_ERROR,
    H_DLQ_ERROR_KIND,
    H_DLQ_GROUP,
    H_DLQ_OFFSET,
    H_DLQ_PARTITION,
    H_DLQ_TIMESTAMP,
    H_DLQ_TOPIC,
    H_MESSAGE_ID,
    INBOX_FAMILIES,
    PROVINCE_RE,
    province_of,
    topic,
)
from bus.envelope import (
    FAMILY_OF,
    REPLY_OF,
    REQUESTS,
    ROUTES,
    Envelope,
    check,
    header_dict,
    new_id,
    now_ms,
    sender_of,
)
from bus.errors import BusError, DecodeError, Rejection, RoutingError
from bus.metrics import Metrics
from bus.models import (
    ErrorCode,
    ErrorReport,
    FilingReceipt,
    Message,
    ReviewResult,
    Severity,
    now,
)
from bus.settings import BusSettings
from bus.store import EXPIRED, EXPIRING, PENDING, OutRecord, PendingRequest, SqliteStore, Store
from bus.transport import Consumer, Headers, Partition, Producer, Record

log = structlog.get_logger(__name__)

M = TypeVar("M", bound=Message)

QUEUE_HIGH = 1_000
"""Records queued for one partition before fetching from it pauses (memory bound)."""
QUEUE_LOW = 200
"""Queue length at which a paused partition is resumed."""
COMMIT_INTERVAL_S = 0.1
"""Done offsets are committed at most this often (and on revoke and stop)."""
SWEEP_BATCH = 1_000
"""Overdue requests handled per sweep round."""
DRAIN_TIMEOUT_S = 10.0
"""Longest a graceful stop waits for in-flight work."""
FETCH_TIMEOUT_MS = 100
"""Longest one fetch blocks, so a stop is noticed quickly."""


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler knows about the record it handles."""

    node: Node
    """The node, to publish or request from inside a handler."""
    envelope: Envelope
    """The record's contract headers."""
    record: Record
    """Where the record came from (topic, partition, offset, key)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """The terminal answer to a request this node sent, or a late one."""

    request_id: str
    """``xs-message-id`` of the request."""
    request_type: str
    """Full Avro name of the request."""
    target: str
    """Province that owed the answer."""
    message: Message
    """The reply, or the ErrorReport (including our own DEADLINE_EXCEEDED)."""
    late: bool = False
    """True for an answer that came after the deadline had already been reported."""
    latency_s: float = 0.0
    """Time from first send to this answer."""
    request: PendingRequest | None = None
    """The stored request (its record, key, attempts)."""

    @property
    def ok(self) -> bool:
        """True when the answer is a reply, not an error report."""
        return not isinstance(self.message, ErrorReport)

    @property
    def code(self) -> ErrorCode | None:
        """The error code when the answer is an ErrorReport."""
        return self.message.code if isinstance(self.message, ErrorReport) else None


Handler = Callable[[Any, Context], Awaitable[Message | None]]
AnswerCallback = Callable[[Answer], Awaitable[None]]


@dataclass
class _Sent:
    record: OutRecord
    future: asyncio.Future[Any]


@dataclass
class _Worker:
    """Sequential processing of one partition."""

    part: Partition
    queue: deque[Record] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    done: deque[tuple[int, list[_Sent]]] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    paused: bool = False
    stopping: bool = False
    current: int | None = None


def report(
    code: ErrorCode,
    text: str,
    *,
    detected_by: str,
    origin: str,
    responsible: str,
    retriable: bool = False,
    severity: Severity = Severity.ERROR,
    ref: Envelope | None = None,
    record: Record | None = None,
    details: dict[str, str] | None = None,
) -> ErrorReport:
    """An ErrorReport about a message (``ref``) read from ``record``."""
    return ErrorReport(
        error_id=new_id(),
        code=code,
        message=text[:ERROR_TEXT_MAX],
        ref_message_id=ref.message_id if ref else None,
        ref_message_type=ref.message_type if ref else None,
        ref_topic=record.topic if record else None,
        ref_partition=record.partition if record else None,
        ref_offset=record.offset if record else None,
        detected_by=detected_by,
        origin=origin,
        responsible=responsible,
        retriable=retriable,
        severity=severity,
        occurred_at=now(),
        details=details or {},
    )


def message_key(message: Message) -> bytes | None:
    """The record key of a message: its person id, UTF-8 (None if it carries none)."""
    person = getattr(message, "person_id", None)
    return person.encode("utf-8") if isinstance(person, str) else None


class Node:
    """One province's endpoint on the bus."""

    def __init__(
        self,
        province: str,
        settings: BusSettings,
        *,
        bootstrap: str,
        store: Store | None = None,
        codec: Codec | None = None,
        group: str | None = None,
    ) -> None:
        if not PROVINCE_RE.match(province):
            raise RoutingError(f"{province!r} is not a province code (6 digits ending 0000)")
        self.province = province
        self.settings = settings
        self.bootstrap = bootstrap
        self.codec = codec or Codec()
        self.store: Store = store or SqliteStore(settings.state_dir / f"bus-{province}.sqlite3")
        self.group = group or f"xsettle-{province}"
        self.metrics = Metrics()
        self.metrics.gauge("xsettle_pending_requests", lambda: float(self.store.count(PENDING)))
        self._handlers: dict[type[Message], Handler] = {}
        self._answer_callbacks: dict[str, AnswerCallback] = {}
        self._waiters: dict[str, asyncio.Future[Answer]] = {}
        self._workers: dict[Partition, _Worker] = {}
        self._producer = Producer(settings, bootstrap, name=f"{province}-out")
        self._consumer: Consumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._stop_event = asyncio.Event()
        self._last_commit = 0.0
        self._log = log.bind(province=province)

    # --- registration ------------------------------------------------------------------
    def on(self, model: type[M]) -> Callable[[Handler], Handler]:
        """Register the handler of inbox messages of ``model``.

        A handler of a request returns the reply (``FilingReceipt``/``ReviewResult``) or
        raises :class:`Rejection`; other handlers return None.
        """

        def register(handler: Handler) -> Handler:
            self._handlers[model] = handler
            return handler

        return register

    def on_answer(self, request_model: type[Message]) -> Callable[[AnswerCallback], AnswerCallback]:
        """Register the callback that receives answers to requests of ``request_model``
        (including DEADLINE_EXCEEDED and late answers). It must be idempotent: after a crash
        an answer not yet acknowledged by the callback is given again."""

        def register(callback: AnswerCallback) -> AnswerCallback:
            self._answer_callbacks[request_model.avro_name] = callback
            return callback

        return register

    # --- lifecycle ------------------------------------------------------------------------
    @property
    def inbox(self) -> list[str]:
        """Topics this node consumes."""
        return [topic(family, self.province) for family in INBOX_FAMILIES]

    async def start(self, *, consume: bool = True) -> Node:
        """Connect, redeliver answers a crash left undelivered, and start consuming."""
        if self._running:
            return self
        self._running = True
        self._stop_event.clear()
        await self._producer.start()
        if consume:
            self._consumer = Consumer(
                self.settings, self.bootstrap, group=self.group, name=f"{self.province}-in"
            )
            self._consumer.subscribe(
                self.inbox, on_revoked=self._on_revoked, on_assigned=self._on_assigned
            )
            await self._consumer.start()
            self._tasks.append(asyncio.create_task(self._fetch_loop(), name="fetch"))
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="sweep"))
        for pending in self.store.undelivered():
            if pending.state == EXPIRING:
                await self._expire(pending)
            else:
                assert pending.answer is not None
                await self._deliver(pending, self.codec.decode(pending.answer.value), late=False)
        self._log.info("node_started", group=self.group, inbox=self.inbox)
        return self

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the group assigned every partition of the inbox to this node."""
        if self._consumer is None:
            return
        deadline = time.monotonic() + timeout_s
        expected = len(self.inbox) * self.settings.partitions
        while len(self._consumer.assignment()) < expected:
            if time.monotonic() > deadline:
                raise BusError(f"{self.province}: inbox not assigned within {timeout_s} s")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop fetching, drain in-flight work, commit what is done, disconnect. Idempotent."""
        if not self._running:
            return
        self._running = False
        self._stop_event.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain(list(self._workers)), DRAIN_TIMEOUT_S)
        await self._commit(force=True)
        for worker in self._workers.values():
            if worker.task is not None:
                worker.task.cancel()
        self._workers.clear()
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        await self._producer.stop()
        await self.store.sync()
        for fut in self._waiters.values():
            fut.cancel()
        self._waiters.clear()
        self._log.info("node_stopped")

    async def kill(self) -> None:
        """Simulate a crash: drop everything without committing or draining (tests)."""
        self._running = False
        for task in self._tasks:
            task.cancel()
        for worker in self._workers.values():
            if worker.task is not None:
                worker.task.cancel()
        self._workers.clear()
        self._tasks.clear()
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        await self._producer.stop()

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- sending --------------------------------------------------------------------------
    def _envelope(self, message: Message, target: str, **extra: Any) -> Envelope:
        return Envelope(
            message_id=new_id(),
            message_type=message.avro_name,
            source=self.province,
            target=target,
            sent_at_ms=now_ms(),
            **extra,
        )

    def _out(self, message: Message, env: Envelope, key: bytes | None, dest: str) -> OutRecord:
        return OutRecord(dest, key, self.codec.encode(message), env.to_headers())

    async def _send(self, record: OutRecord, family: str) -> asyncio.Future[Any]:
        fut = await self._producer.send(record.topic, record.key, record.value, record.headers)
        self.metrics.inc("xsettle_messages_out_total", family=family)
        return fut

    async def publish(
        self,
        message: Message,
        *,
        target: str,
        key: bytes | None = None,
        correlation_id: str | None = None,
        wait: bool | None = None,
    ) -> Envelope:
        """Send a message that is not a request (a notice, a report) to ``target``'s inbox.

        By default, inside a handler or answer callback the send is not awaited but tied to
        the record being processed: its offset is committed only once the broker has
        acknowledged this message too. Elsewhere the default waits for the acknowledgement.
        """
        if type(message) in REQUESTS:
            raise RoutingError(f"{message.avro_name} is a request: use request() or ask()")
        env = self._envelope(message, target, correlation_id=correlation_id)
        family = FAMILY_OF[type(message)]
        record = self._out(message, env, key or message_key(message), topic(family, target))
        fut = await self._send(record, family)
        outputs = _OUTPUTS.get()
        if wait is None and outputs is not None:
            outputs.append(_Sent(record, fut))
        elif wait is not False:
            await fut
        return env

    def _target_of(self, message: Message) -> str:
        route = ROUTES.get(type(message))
        if route is None:
            raise RoutingError(f"{message.avro_name} is not a request")
        return province_of(str(getattr(message, route[1])))

    async def request(self, message: Message, *, deadline_s: float) -> str:
        """Send a request; the answer goes to the :meth:`on_answer` callback. Returns its id.

        The pending request is stored durably before the record is sent.
        """
        request_id, fut = await self._request(message, deadline_s, waiter=False)
        await fut
        return request_id

    async def ask(self, message: Message, *, deadline_s: float) -> Answer:
        """Send a request and wait for its terminal answer (or DEADLINE_EXCEEDED)."""
        request_id, fut = await self._request(message, deadline_s, waiter=True)
        await fut
        waiter = self._waiters[request_id]
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), deadline_s + 30.0)
        finally:
            self._waiters.pop(request_id, None)

    async def _request(
        self, message: Message, deadline_s: float, *, waiter: bool
    ) -> tuple[str, asyncio.Future[Any]]:
        target = self._target_of(message)
        sent = now_ms()
        env = self._envelope(
            message,
            target,
            reply_to=topic(FAMILY_REPLY, self.province),
            deadline_ms=sent + int(deadline_s * 1000),
        )
        family = FAMILY_OF[type(message)]
        record = self._out(message, env, message_key(message), topic(family, target))
        self.store.add_pending(
            PendingRequest(
                message_id=env.message_id,
                message_type=message.avro_name,
                target=target,
                record=record,
                attempt=1,
                sent_at_ms=sent,
                deadline_ms=env.deadline_ms or sent,
                state=PENDING,
            )
        )
        await self.store.sync()  # durable before the record leaves
        if waiter:
            self._waiters[env.message_id] = asyncio.get_running_loop().create_future()
        fut = await self._send(record, family)
        self._log.debug(
            "request_sent", message_id=env.message_id, type=message.avro_name, target=target
        )
        return env.message_id, fut

    async def resend(self, request_id: str) -> bool:
        """Send an unanswered request again: same id, ``xs-attempt`` + 1. False if answered."""
        pending = self.store.get_pending(request_id)
        if pending is None or pending.state != PENDING:
            return False
        env = Envelope.from_headers(pending.record.headers).resent()
        record = OutRecord(
            pending.record.topic, pending.record.key, pending.record.value, env.to_headers()
        )
        self.store.bump_attempt(request_id, record)
        await (await self._send(record, FAMILY_OF_NAME.get(pending.message_type, "?")))
        self.metrics.inc("xsettle_resends_total")
        self._log.info("request_resent", message_id=request_id, attempt=env.attempt)
        return True

    async def resend_unanswered(self, older_than_s: float) -> int:
        """Re-send every pending request first sent more than ``older_than_s`` ago."""
        cutoff = now_ms() - int(older_than_s * 1000)
        count = 0
        for pending in self.store.pending_requests(100_000):
            if pending.sent_at_ms <= cutoff and await self.resend(pending.message_id):
                count += 1
        return count

    async def send_raw(
        self, topic_name: str, key: bytes | None, value: bytes, headers: Headers
    ) -> None:
        """Write a record exactly as given (fault injection, dead-letter replay)."""
        await (await self._producer.send(topic_name, key, value, headers))

    async def lag(self) -> dict[Partition, int]:
        """Records not yet read per assigned inbox partition."""
        return await self._consumer.lag() if self._consumer is not None else {}

    async def send_report(
        self, rep: ErrorReport, *, to: str, key: bytes | None, correlation_id: str | None
    ) -> asyncio.Future[Any]:
        """Send an ErrorReport to ``xsettle.error.<to>`` without waiting for the ack."""
        record = self._report_out(rep, to, key, correlation_id)
        return await self._send(record, FAMILY_ERROR)

    # --- consuming ------------------------------------------------------------------------
    async def _on_assigned(self, parts: list[Partition]) -> None:
        self._log.info("partitions_assigned", partitions=len(parts))

    async def _on_revoked(self, parts: list[Partition]) -> None:
        """Finish the record in hand for revoked partitions, drop the rest, commit."""
        mine = [p for p in parts if p in self._workers]
        for part in mine:
            worker = self._workers[part]
            worker.stopping = True
            worker.queue.clear()
            worker.wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain(mine), DRAIN_TIMEOUT_S)
        await self._commit(force=True, only=mine)
        for part in mine:
            worker = self._workers.pop(part)
            if worker.task is not None:
                worker.task.cancel()
        self._log.info("partitions_revoked", partitions=len(parts))

    async def _drain(self, parts: list[Partition]) -> None:
        for part in parts:
            worker = self._workers.get(part)
            if worker is None:
                continue
            worker.stopping = True
            worker.wake.set()
            if worker.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await worker.task
            for _, sent in worker.done:
                for s in sent:
                    with contextlib.suppress(Exception):
                        await s.future

    async def _fetch_loop(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while self._running:
            try:
                records = await consumer.fetch(FETCH_TIMEOUT_MS, self.settings.fetch_max_records)
            except BusError as exc:
                self._log.warning("fetch_failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            for rec in records:
                part = rec.where
                worker = self._workers.get(part)
                if worker is None:
                    worker = self._workers[part] = _Worker(part)
                    worker.task = asyncio.create_task(self._work(worker), name=f"work-{part}")
                worker.queue.append(rec)
                worker.wake.set()
                if not worker.paused and len(worker.queue) >= QUEUE_HIGH:
                    consumer.pause(part)
                    worker.paused = True
            await self._commit()

    async def _work(self, worker: _Worker) -> None:
        while True:
            if not worker.queue:
                if worker.stopping:
                    return
                worker.wake.clear()
                await worker.wake.wait()
                continue
            rec = worker.queue.popleft()
            worker.current = rec.offset
            sent = await self._process(rec)
            worker.done.append((rec.offset, sent))
            worker.current = None
            if worker.paused and len(worker.queue) <= QUEUE_LOW and self._consumer is not None:
                self._consumer.resume(worker.part)
                worker.paused = False

    async def _commit(self, *, force: bool = False, only: list[Partition] | None = None) -> None:
        if self._consumer is None:
            return
        if not force and time.monotonic() - self._last_commit < COMMIT_INTERVAL_S:
            return
        self._last_commit = time.monotonic()
        offsets: dict[Partition, int] = {}
        for part, worker in list(self._workers.items()):
            if only is not None and part not in only:
                continue
            ready = await self._acknowledged(worker)
            if ready is not None:
                offsets[part] = ready + 1
        if offsets:
            try:
                await self.store.sync()  # state first, then the offsets that depend on it
                await self._consumer.commit(offsets)
            except BusError as exc:
                self._log.warning("commit_failed", error=str(exc))

    async def _acknowledged(self, worker: _Worker) -> int | None:
        """Highest offset whose outputs the broker has all acknowledged."""
        ready: int | None = None
        while worker.done:
            offset, sent = worker.done[0]
            for s in sent:
                if not s.future.done():
                    return ready
                if s.future.exception() is not None:
                    self._log.warning("produce_failed_resending", topic=s.record.topic)
                    s.future = await self._send(s.record, "retry")
                    return ready
            worker.done.popleft()
            ready = offset
        return ready

    # --- processing one record ------------------------------------------------------------
    async def _process(self, rec: Record) -> list[_Sent]:
        outputs: list[_Sent] = []
        token = _OUTPUTS.set(outputs)
        try:
            return await self._process_record(rec) + outputs
        finally:
            _OUTPUTS.reset(token)

    async def _process_record(self, rec: Record) -> list[_Sent]:
        self.metrics.inc("xsettle_records_in_total", topic_family=rec.topic.split(".")[1])
        try:
            env = Envelope.from_headers(rec.headers)
            if rec.value is None:
                raise DecodeError("malformed", "the record has no value")
            message = self.codec.decode(rec.value)
            check(env, message, rec.topic)
        except DecodeError as exc:
            return await self._dead_letter(rec, exc)
        family = FAMILY_OF[type(message)]
        self.metrics.inc("xsettle_messages_in_total", family=family)
        seen = self.store.processed(env.message_id)
        if seen is not None:
            self.metrics.inc("xsettle_duplicates_total", family=family)
            self._log.info(
                "duplicate_ignored",
                message_id=env.message_id,
                type=env.message_type,
                attempt=env.attempt,
                resent_answer=seen.answer is not None,
            )
            if seen.answer is None:
                return []
            fut = await self._send(seen.answer, seen.answer.topic.split(".")[1])
            return [_Sent(seen.answer, fut)]
        if self._is_answer(env, message):
            return await self._on_answer(rec, env, message)
        return await self._handle(rec, env, message)

    def _is_answer(self, env: Envelope, message: Message) -> bool:
        if isinstance(message, FilingReceipt | ReviewResult):
            return True
        # An ErrorReport answers our request when another province sent it about one of ours;
        # our own copies to ops are not answers.
        return (
            isinstance(message, ErrorReport)
            and env.correlation_id is not None
            and env.source != self.province
            and self.store.get_pending(env.correlation_id) is not None
        )

    async def _on_answer(self, rec: Record, env: Envelope, message: Message) -> list[_Sent]:
        assert env.correlation_id is not None
        answer = OutRecord(rec.topic, rec.key, rec.value or b"", rec.headers)
        before, pending = self.store.record_answer(
            env.correlation_id,
            answer,
            now_ms(),
            answer_id=env.message_id,
            answer_type=env.message_type,
        )
        bound = self._log.bind(
            message_id=env.message_id,
            correlation_id=env.correlation_id,
            type=env.message_type,
            source=env.source,
        )
        if before is None:
            bound.warning("orphan_reply")
            self.metrics.inc("xsettle_answers_total", outcome="orphan")
            rep = report(
                ErrorCode.ORPHAN_REPLY,
                f"{env.message_type} answers {env.correlation_id}, which {self.province} "
                "never sent",
                detected_by=self.province,
                origin=env.source,
                responsible=env.source,
                severity=Severity.WARNING,
                ref=env,
                record=rec,
            )
            rec_out = await self._report_record(rep, env.source, rec.key, env.message_id)
            return [rec_out]
        assert pending is not None
        if before == PENDING:
            self.metrics.inc("xsettle_answers_total", outcome="ok" if not isinstance(
                message, ErrorReport) else "error")  # fmt: skip
            await self._deliver(pending, message, late=False)
        elif before in (EXPIRING, EXPIRED):
            bound.info("late_answer")
            self.metrics.inc("xsettle_answers_total", outcome="late")
            await self._deliver(pending, message, late=True)
        else:
            bound.info("duplicate_answer_ignored", state=before)
            self.metrics.inc("xsettle_answers_total", outcome="duplicate")
        return []

    async def _deliver(self, pending: PendingRequest, message: Message, *, late: bool) -> None:
        latency = max(0.0, (now_ms() - pending.sent_at_ms) / 1000)
        answer = Answer(
            request_id=pending.message_id,
            request_type=pending.message_type,
            target=pending.target,
            message=message,
            late=late,
            latency_s=latency,
            request=pending,
        )
        if not late:
            family = FAMILY_OF_NAME.get(pending.message_type, "?")
            self.metrics.observe("xsettle_answer_latency_seconds", latency, family=family)
        waiter = self._waiters.get(pending.message_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)
        callback = self._answer_callbacks.get(pending.message_type)
        if callback is not None:
            try:
                await callback(answer)
            except Exception:
                # Left in state "answered": given again at the next start.
                self._log.exception("answer_callback_failed", message_id=pending.message_id)
                return
        self.store.mark_delivered(pending.message_id)

    async def _handle(self, rec: Record, env: Envelope, message: Message) -> list[_Sent]:
        ctx = Context(self, env, rec)
        is_request = type(message) in REQUESTS
        handler = self._handlers.get(type(message))
        answer: OutRecord | None = None
        extra: list[OutRecord] = []
        try:
            if handler is None:
                if is_request:
                    raise Rejection(
                        ErrorCode.INTERNAL_ERROR,
                        f"{self.province} has no handler for {env.message_type}",
                    )
                self._log.debug("no_handler", type=env.message_type)
                result = None
            else:
                result = await self._run_with_retries(handler, message, ctx)
            if is_request:
                expected = REPLY_OF[type(message)]
                if not isinstance(result, expected):
                    raise Rejection(
                        ErrorCode.INTERNAL_ERROR,
                        f"the {env.message_type} handler answered {type(result).__name__}",
                    )
                reply_env = self._envelope(result, env.source, correlation_id=env.message_id)
                assert env.reply_to is not None
                answer = self._out(result, reply_env, rec.key, env.reply_to)
        except Rejection as rej:
            rep = report(
                rej.reject_code,
                rej.text,
                detected_by=self.province,
                origin=env.source,
                responsible=rej.details.pop("responsible", env.source),
                retriable=rej.is_retriable,
                severity=Severity.ERROR,
                ref=env,
                record=rec,
                details=rej.details,
            )
            answer = self._report_out(rep, env.source, rec.key, env.message_id)
        except _GaveUp as exc:
            rep = report(
                ErrorCode.INTERNAL_ERROR,
                f"{self.province} failed to handle {env.message_type}: {exc}",
                detected_by=self.province,
                origin=env.source,
                responsible=self.province,
                retriable=True,
                severity=Severity.CRITICAL,
                ref=env,
                record=rec,
            )
            answer = self._report_out(rep, env.source, rec.key, env.message_id)
            if env.source != self.province:
                extra.append(self._report_out(rep, self.province, rec.key, env.message_id))
        self.store.mark_processed(env.message_id, env.message_type, answer, now_ms())
        await self.store.sync()  # the answer is stored before it is sent
        sent: list[_Sent] = []
        for out in ([answer] if answer else []) + extra:
            sent.append(_Sent(out, await self._send(out, out.topic.split(".")[1])))
        return sent

    async def _run_with_retries(
        self, handler: Handler, message: Message, ctx: Context
    ) -> Message | None:
        delay = self.settings.retry_initial_ms / 1000
        attempts = self.settings.retry_attempts
        for attempt in range(1, attempts + 1):
            try:
                return await handler(message, ctx)
            except Rejection:
                raise
            except Exception as exc:
                if isinstance(exc, BusError) and not exc.retriable:
                    raise _GaveUp(repr(exc)) from exc
                self.metrics.inc("xsettle_handler_retries_total", type=ctx.envelope.message_type)
                self._log.warning(
                    "handler_failed",
                    message_id=ctx.envelope.message_id,
                    type=ctx.envelope.message_type,
                    attempt=attempt,
                    error=repr(exc)[:ERROR_TEXT_MAX],
                )
                if attempt == attempts:
                    raise _GaveUp(repr(exc)[:ERROR_TEXT_MAX]) from exc
                # Sleep in this partition only; a stop cuts the wait short.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), delay)
                if self._stop_event.is_set():
                    raise asyncio.CancelledError from exc
                delay = min(delay * 2, self.settings.retry_max_ms / 1000)
        raise AssertionError("unreachable")  # pragma: no cover

    def _report_out(
        self, rep: ErrorReport, to: str, key: bytes | None, correlation_id: str | None
    ) -> OutRecord:
        env = self._envelope(rep, to, correlation_id=correlation_id)
        self.metrics.inc("xsettle_errors_total", code=rep.code.value)
        self._log.info(
            "error_reported",
            code=rep.code.value,
            to=to,
            correlation_id=correlation_id,
            responsible=rep.responsible,
        )
        return self._out(rep, env, key, topic(FAMILY_ERROR, to))

    async def _report_record(
        self, rep: ErrorReport, to: str, key: bytes | None, correlation_id: str | None
    ) -> _Sent:
        out = self._report_out(rep, to, key, correlation_id)
        return _Sent(out, await self._send(out, FAMILY_ERROR))

    async def _dead_letter(self, rec: Record, exc: DecodeError) -> list[_Sent]:
        """Copy the record byte for byte to our DLQ; tell the sender when we know who it is."""
        self.metrics.inc("xsettle_dead_letters_total", kind=exc.kind)
        diag = (
            (H_DLQ_TOPIC, rec.topic),
            (H_DLQ_PARTITION, str(rec.partition)),
            (H_DLQ_OFFSET, str(rec.offset)),
            (H_DLQ_TIMESTAMP, str(rec.timestamp_ms)),
            (H_DLQ_ERROR_KIND, exc.kind),
            (H_DLQ_ERROR, str(exc)[:ERROR_TEXT_MAX]),
            (H_DLQ_GROUP, self.group),
            (H_DLQ_DETECTED_AT, str(now_ms())),
        )
        headers: Headers = rec.headers + tuple((k, v.encode("utf-8")) for k, v in diag)
        letter = OutRecord(topic(FAMILY_DLQ, self.province), rec.key, rec.value or b"", headers)
        if rec.value is None:
            letter = OutRecord(letter.topic, rec.key, b"", headers)
        sent = [_Sent(letter, await self._send(letter, FAMILY_DLQ))]
        hdrs = header_dict(rec.headers)
        sender = sender_of(rec.headers)
        self._log.warning(
            "dead_lettered",
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            kind=exc.kind,
            error=str(exc)[:ERROR_TEXT_MAX],
            message_id=hdrs.get(H_MESSAGE_ID),
            source=sender,
        )
        if sender is not None:
            ref = None
            with contextlib.suppress(DecodeError):
                ref = Envelope.from_headers(rec.headers)
            rep = report(
                ErrorCode.INVALID_MESSAGE,
                f"{rec.topic}@{rec.partition}:{rec.offset} cannot be read: {exc}",
                detected_by=self.province,
                origin=sender,
                responsible=sender,
                ref=ref,
                record=rec,
                details={"kind": exc.kind, "dlq_topic": letter.topic},
            )
            sent.append(await self._report_record(rep, sender, rec.key, hdrs.get(H_MESSAGE_ID)))
        return sent

    # --- deadlines ------------------------------------------------------------------------
    async def sweep(self) -> int:
        """Turn overdue requests into DEADLINE_EXCEEDED; returns how many."""
        expired = self.store.expire_due(now_ms(), SWEEP_BATCH)
        if expired:
            await self.store.sync()
        for pending in expired:
            await self._expire(pending)
        return len(expired)

    async def _expire(self, pending: PendingRequest) -> None:
        """Report DEADLINE_EXCEEDED for one request and hand it to the caller."""
        env = Envelope.from_headers(pending.record.headers)
        rep = report(
            ErrorCode.DEADLINE_EXCEEDED,
            f"no answer from {pending.target} to {pending.message_type} "
            f"{pending.message_id} by its deadline",
            detected_by=self.province,
            origin=self.province,
            responsible=pending.target,
            retriable=True,
            severity=Severity.WARNING,
            ref=env,
            details={"deadline_ms": str(pending.deadline_ms), "attempts": str(pending.attempt)},
        )
        key = pending.record.key
        for to in (pending.target, self.province):
            await (await self.send_report(rep, to=to, key=key, correlation_id=env.message_id))
        self.metrics.inc("xsettle_answers_total", outcome="deadline")
        await self._deliver(pending, rep, late=False)

    async def _sweep_loop(self) -> None:
        interval = self.settings.sweep_interval_ms / 1000
        last_prune = 0.0
        while self._running:
            try:
                while await self.sweep() == SWEEP_BATCH:
                    pass
                if time.monotonic() - last_prune > 3600:
                    last_prune = time.monotonic()
                    pruned = self.store.prune(now_ms() - self.settings.retention_s * 1000)
                    self._log.debug("store_pruned", rows=pruned)
            except BusError as exc:
                self._log.warning("sweep_failed", error=str(exc))
            await asyncio.sleep(interval)


_OUTPUTS: contextvars.ContextVar[list[_Sent] | None] = contextvars.ContextVar(
    "xsettle_outputs", default=None
)
"""Sends made while one record is processed; its offset waits for their acknowledgement."""


class _GaveUp(Exception):
    """A handler failed after every retry, or with a non-retriable bus error."""


FAMILY_OF_NAME: dict[str, str] = {m.avro_name: f for m, f in FAMILY_OF.items()}
"""Topic family by full Avro name."""
