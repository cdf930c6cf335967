"""A province node: publishes, consumes its inbox, answers requests, and tracks its own.

One node per province process. It knows the contract, not medical rules: handlers registered
with :meth:`Node.on` do the work. Every unit of work is a *step* (:meth:`Node.step`): one
transaction holding the state change, the processed mark and the records it causes (the
outbox); records leave only from the outbox, after the commit (:mod:`bus.outbox`). Outcomes,
one table (the contract's promise made true):

============================================  ==============================================
what happens                                   outcome
============================================  ==============================================
value/headers cannot be decoded or disagree    record copied byte for byte to
(bad marker, unknown fingerprint, truncated,   ``xsettle.dlq.<self>`` with diagnostic headers;
missing/contradicting header, non-UTF-8        ``INVALID_MESSAGE`` to ``xsettle.error.<sender>``
header value, ``xs-reply-to`` that is not      when ``xs-source`` names a province
``xsettle.reply.<xs-source>``)
signature missing, not verifying, by an        dead letter (kind ``unsigned``,
unknown key or a key of another province,      ``bad_signature``, ``unknown_key``,
outside the key's validity, ``xs-sent-at``     ``key_not_owned``, ``key_not_valid``,
too far ahead or too old, or the same signed   ``future``, ``stale``, ``replayed``...):
record accepted before at other coordinates    ``SIGNATURE_INVALID`` to the claimed sender
                                               and to our ops; never handled
a claim/filing id that does not name the       dead letter (``header_mismatch``),
sending province (``C-<xs-source>-…``)         ``INVALID_MESSAGE`` to the sender
header key the client cannot decode            dead letter with its coordinates, no bytes
(poison record)                                (kind ``undecodable_header``); the partition
                                               goes on after it
record over ``MAX_RECORD_BYTES`` (1 MiB:       dead letter (kind ``oversized``) with
key + value + headers)                         coordinates, size and SHA-256 instead of the
                                               bytes; ``INVALID_MESSAGE`` to the sender
handler raises :class:`Rejection`              its writes undone; ``ErrorReport`` with its
                                               code to the sender's error topic,
                                               ``xs-correlation-id`` set
handler fails transiently (any other error)    the whole step rolled back and retried with
                                               capped exponential backoff in its partition;
                                               after the last try ``INTERNAL_ERROR``
                                               (retriable) to the sender and to ops
same ``xs-message-id`` received again          not handled again; the stored answer is
(a re-send: new attempt and signature)         queued again (same id, ``xs-attempt`` + 1,
                                               signed anew as it leaves)
reply/ErrorReport for a pending request        handled by the caller's callback in the same
                                               step that stores it: delivered once
reply from another province than the one       ``INVALID_MESSAGE`` to the replier and to ops;
asked, of a family not paired with the         the request stays open
request, or about another claim/filing
handler returns :data:`DEFER`                   the obligation stored in the record's step,
                                               the partition freed, a RequestAcknowledgement
                                               sent at once; :meth:`Node.answer` later sends
                                               the one answer (a second call sends nothing);
                                               a redelivery while open: the acknowledgement
                                               again; after: the stored answer
acknowledgement of a request of ours           stored (acknowledged at, expected by), told to
                                               :meth:`Node.on_acknowledged`; the request stays
                                               open and is no longer re-sent. From another
                                               province or about another subject: refused
                                               like an answer
no answer nor acknowledgement for              the request is sent again (same id, attempt
``ack_window_s`` after a send                  + 1), at most ``unacknowledged_sends`` sends
reply for a request already answered           ignored, logged
reply matching no request                      ``ORPHAN_REPLY`` to the replier's error topic
answer after the deadline                      delivered as a *late* answer, not terminal
deadline passes with no answer                 ``DEADLINE_EXCEEDED`` to the caller, to
                                               ``xsettle.error.<target>`` and to ops, in one
                                               step with the caller's handling of it
crash anywhere                                 a step is all or nothing; at start the outbox
                                               is sent again (same id, ``xs-attempt`` + 1)
                                               and stored answers the caller has not handled
                                               are handed to it
a send fails                                   retried from the outbox until acknowledged
a record that fails is from a province that    dead letter; the report goes to our ops only
publishes no key, or arrived on an error       (no report to a topic nobody reads, no two
topic                                          provinces answering each other's reports)
unexpected error in the fetch loop or a        logged with its traceback, counted in
partition worker                               ``xsettle_worker_crashes_total``;
                                               :attr:`Node.failed` is set and the process
                                               exits non-zero (never a live process that
                                               stopped consuming)
============================================  ==============================================

Offsets are committed only for records whose step committed and whose outbox records the
broker acknowledged. Order is kept per partition, work runs concurrently across partitions
(steps of one province are serialised by its database), and a partition with a long queue is
paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from bus.audit import RECEIVED, SENT, AuditEntry
from bus.codec import Codec
from bus.constants import (
    ERROR_TEXT_MAX,
    FAMILY_ERROR,
    FAMILY_REPLY,
    H_CORRELATION_ID,
    H_MESSAGE_ID,
    INBOX_FAMILIES,
    MAX_RECORD_BYTES,
    PROVINCE_RE,
    province_of,
    topic,
)
from bus.db import Step
from bus.deadletter import dead_letter, record_size
from bus.envelope import (
    FAMILY_OF,
    KEY_OF,
    REPLY_OF,
    REQUESTS,
    ROUTES,
    SUBJECT_OF,
    Envelope,
    check,
    new_id,
    now_ms,
    sender_of,
    text_headers,
)
from bus.errors import BusError, DecodeError, Rejection, RoutingError, StoreError
from bus.metrics import Metrics
from bus.models import (
    AckState,
    ErrorCode,
    ErrorReport,
    Message,
    RequestAcknowledgement,
    Severity,
    now,
)
from bus.outbox import Relay, family_of_topic, resent
from bus.settings import BusSettings
from bus.signing import SignatureError, Trust, Verified, signature_of
from bus.store import (
    EXPIRED,
    OPEN,
    PENDING,
    Obligation,
    OutRecord,
    PendingRequest,
    SqlStore,
    Store,
)
from bus.transport import Consumer, Partition, Producer, Record

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
ASK_POLL_S = 0.25
"""How often :meth:`Node.ask` looks in the store for an answer another instance received."""
SUBJECTS_NOTED = 10_000
"""Subjects of records encoded here kept until the record is logged as sent (the message
log then need not decode it again); the oldest are forgotten first."""
BATCH_MAX = 256
"""Records of one partition handled in one step (one transaction) at most: what one fetch
returned, up to this many. A bigger batch holds the province's step longer (SQLite has one
writer) for little gain."""
DRAIN_TIMEOUT_S = 10.0
"""Longest a graceful stop waits for in-flight work."""
FETCH_TIMEOUT_MS = 100
"""Longest one fetch blocks, so a stop is noticed quickly."""
STALL_AFTER_S = 60.0
"""A partition whose record has been in hand this long (retries included: five tries with
backoff capped at 5 s take ~20 s) counts as stalled in :meth:`Node.stalled` and the metrics."""


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler knows about the record it handles."""

    node: Node
    """The node, to publish or request from inside a handler (joins the handler's step)."""
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


@dataclass(frozen=True, slots=True)
class Deferred:
    """What a request's handler returns to accept the request and answer it later with
    :meth:`Node.answer` (a review that takes days): the obligation is stored in the record's
    step, the offset committed and the partition freed at once."""

    note: str = ""
    """Why the answer waits: logged, and sent to the requester in the acknowledgement."""
    expected_by_ms: int | None = None
    """When the answer is expected (epoch milliseconds), told to the requester; None: by the
    request's deadline."""
    state: str = "ACCEPTED_FOR_REVIEW"
    """The acknowledgement's state: ``RECEIVED`` or ``ACCEPTED_FOR_REVIEW``."""


DEFER = Deferred()
"""The plain :class:`Deferred`."""


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """A request of ours acknowledged by its target (not an answer: the request stays open)."""

    request_id: str
    """``xs-message-id`` of the request."""
    request_type: str
    """Full Avro name of the request."""
    target: str
    """Province that acknowledged it (the one asked)."""
    state: str
    """``RECEIVED`` or ``ACCEPTED_FOR_REVIEW``."""
    expected_by_ms: int | None
    """When the answer is expected (None: by the deadline)."""
    note: str
    """The acknowledgement's note."""
    first: bool
    """True for the first acknowledgement of this request."""


Handler = Callable[[Any, Context], Awaitable[Message | Deferred | None]]
AnswerCallback = Callable[[Answer], Awaitable[None]]
AckCallback = Callable[[Acknowledged], Awaitable[None]]
_Read = tuple[Verified | None, Envelope, Message] | DecodeError
"""A record as read before its step: (signature, envelope, message), or why it cannot be."""


@dataclass
class _Worker:
    """Sequential processing of one partition."""

    part: Partition
    queue: deque[Record] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    done: deque[tuple[int, list[asyncio.Future[None]]]] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    paused: bool = False
    stopping: bool = False
    busy_since: float | None = None


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
    """The record key of a message: the contract's key of its family (a reconciliation
    statement: ``<host>:<day>``, a clearing statement: ``<host>:<month>``), else its person
    id, UTF-8 (None if it carries none)."""
    keyed = KEY_OF.get(type(message))
    if keyed is not None:
        return keyed(message).encode("utf-8")
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
        trust: Trust,
        store: Store | None = None,
        codec: Codec | None = None,
        group: str | None = None,
    ) -> None:
        if not PROVINCE_RE.match(province):
            raise RoutingError(f"{province!r} is not a province code (6 digits ending 0000)")
        self.province = province
        self.settings = settings
        self.bootstrap = bootstrap
        self.trust = trust
        """Signs what the node sends and checks what it receives (:mod:`bus.signing`)."""
        self._last_seal_ms = 0
        self._subjects: dict[bytes, str | None] = {}
        """Subjects of the records :meth:`_out` encoded lately (see :data:`SUBJECTS_NOTED`)."""
        self.codec = codec or Codec()
        self.store: Store = store or SqlStore(settings.state_dir / f"bus-{province}.sqlite3")
        self.group = group or f"xsettle-{province}"
        self.metrics = Metrics()
        self.metrics.gauge("xsettle_pending_requests", lambda: float(self.store.count(PENDING)))
        self.metrics.gauge("xsettle_outbox_records", lambda: float(self.store.outbox_size()))
        self.metrics.gauge("xsettle_stalled_partitions", lambda: float(len(self.stalled())))
        self.metrics.gauge(
            "xsettle_open_obligations", lambda: float(self.store.count_obligations(OPEN))
        )
        self.failure: BaseException | None = None
        """The unexpected error that stopped a worker; the process must exit non-zero."""
        self.failed = asyncio.Event()
        """Set when a worker died unexpectedly (see :attr:`failure`)."""
        self._handlers: dict[type[Message], Handler] = {}
        self._answer_callbacks: dict[str, AnswerCallback] = {}
        self._ack_callbacks: dict[str, AckCallback] = {}
        self._waiters: dict[str, asyncio.Future[Answer]] = {}
        self._workers: dict[Partition, _Worker] = {}
        self._producer = Producer(settings, bootstrap, name=f"{province}-out")
        self._relay = Relay(
            self.store,
            self._producer,
            self.metrics,
            province,
            seal=self._seal,
            describe=self._describe_sent,
        )
        self._consumer: Consumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._stop_event = asyncio.Event()
        self._last_commit = 0.0
        self._log = log.bind(province=province)

    # --- registration ------------------------------------------------------------------
    def on(self, model: type[M]) -> Callable[[Handler], Handler]:
        """Register the handler of inbox messages of ``model``.

        A handler runs inside the record's step: what it writes through the store's database
        and what it sends with :meth:`publish`/:meth:`request` commit together with the
        record's processed mark. A handler of a request returns the reply
        (``FilingReceipt``/``ReviewResult``) or raises :class:`Rejection`; other handlers
        return None (or raise :class:`Rejection` to report the record to its sender).
        """

        def register(handler: Handler) -> Handler:
            self._handlers[model] = handler
            return handler

        return register

    def on_answer(self, request_model: type[Message]) -> Callable[[AnswerCallback], AnswerCallback]:
        """Register the callback that receives answers to requests of ``request_model``
        (including DEADLINE_EXCEEDED and late answers). It runs inside the step that stores
        the answer, so its writes and sends commit with it, once."""

        def register(callback: AnswerCallback) -> AnswerCallback:
            self._answer_callbacks[request_model.avro_name] = callback
            return callback

        return register

    def on_acknowledged(self, request_model: type[Message]) -> Callable[[AckCallback], AckCallback]:
        """Register the callback told when a request of ``request_model`` is acknowledged (a
        claim accepted for review, expected by a date). It runs inside the step that stores
        the acknowledgement."""

        def register(callback: AckCallback) -> AckCallback:
            self._ack_callbacks[request_model.avro_name] = callback
            return callback

        return register

    # --- lifecycle ------------------------------------------------------------------------
    @property
    def inbox(self) -> list[str]:
        """Topics this node consumes."""
        return [topic(family, self.province) for family in INBOX_FAMILIES]

    async def start(self, *, consume: bool = True) -> Node:
        """Connect, send what a crash left in the outbox, hand undelivered answers to their
        callbacks, and start consuming."""
        if self._running:
            return self
        self._running = True
        self._stop_event.clear()
        await self._producer.start()
        await self._relay.start()
        for pending in self.store.undelivered():
            assert pending.answer is not None
            try:
                async with self.step():
                    # Marked first: of two instances starting at once, one delivers it.
                    if self.store.mark_delivered(pending.message_id):
                        await self._deliver(pending, self.codec.decode(pending.answer.value))
            except Exception:
                self._log.exception("answer_redelivery_failed", message_id=pending.message_id)
        if consume:
            self._consumer = Consumer(
                self.settings, self.bootstrap, group=self.group, name=f"{self.province}-in"
            )
            self._consumer.subscribe(
                self.inbox, on_revoked=self._on_revoked, on_assigned=self._on_assigned
            )
            await self._consumer.start()
            self._spawn(self._fetch_loop(), "fetch")
        self._spawn(self._sweep_loop(), "sweep")
        self._log.info("node_started", group=self.group, inbox=self.inbox)
        return self

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._fatal(task.get_name(), exc)

    def _fatal(self, where: str, exc: BaseException) -> None:
        """A worker died of an error nobody expected: loud, counted, and fatal."""
        self._log.critical("worker_crashed", task=where, error=repr(exc)[:300], exc_info=exc)
        self.metrics.inc("xsettle_worker_crashes_total", task=where.split(":")[0])
        if self.failure is None:
            self.failure = exc
        self.failed.set()

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the group assigned every partition of the inbox to this node."""
        if self._consumer is None:
            return
        deadline = time.monotonic() + timeout_s
        expected = len(self.inbox) * self.settings.partitions
        while len(self._consumer.assignment()) < expected:
            if self.failure is not None:
                raise BusError(f"{self.province}: a worker died: {self.failure!r}")
            if time.monotonic() > deadline:
                raise BusError(f"{self.province}: inbox not assigned within {timeout_s} s")
            await asyncio.sleep(0.05)

    def assigned_partitions(self) -> int:
        """How many inbox partitions the group assigned to this node now (0 when not
        consuming)."""
        return len(self._consumer.assignment()) if self._consumer is not None else 0

    def stalled(self) -> list[Partition]:
        """Partitions whose record in hand has not finished for :data:`STALL_AFTER_S`."""
        limit = time.monotonic() - STALL_AFTER_S
        return [
            part
            for part, w in self._workers.items()
            if w.busy_since is not None and w.busy_since < limit
        ]

    def health(self) -> dict[str, object]:
        """Liveness: failed worker, stalled partitions, outbox and pending sizes."""
        stalled = self.stalled()
        return {
            "province": self.province,
            "ok": self.failure is None and not stalled and self._running,
            "running": self._running,
            "failure": repr(self.failure) if self.failure is not None else None,
            "stalled": [f"{p.topic}:{p.partition}" for p in stalled],
            "outbox": self.store.outbox_size(),
            "in_flight": self._relay.in_flight,
            "pending": self.store.count(PENDING),
        }

    async def stop(self) -> None:
        """Stop fetching, drain in-flight work, commit what is done, disconnect. Idempotent."""
        if not self._running:
            return
        self._running = False
        self._stop_event.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain(list(self._workers)), DRAIN_TIMEOUT_S)
        await self._commit(force=True)
        for worker in self._workers.values():
            if worker.task is not None:
                worker.task.cancel()
        self._workers.clear()
        await self._relay.stop()
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        await self._producer.stop()
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
        self._relay.abandon()
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        await self._producer.stop()

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- steps and the outbox --------------------------------------------------------------
    @asynccontextmanager
    async def step(self) -> AsyncIterator[Step]:
        """One transaction over the province's state and the bus's: what is written inside,
        including records sent with :meth:`publish`, :meth:`request` or :meth:`send_report`,
        commits together; the records leave after the commit. Inside a step it joins it."""
        if self.store.current() is not None:
            async with self.store.step() as joined:
                yield joined
            return
        async with self.store.step() as st:
            yield st
        futures = self._relay.dispatch(st.outbox)  # no await in between: commit order kept
        st.sent = list(futures)
        outputs = _OUTPUTS.get()
        if outputs is not None:
            outputs.extend(futures)

    def _emit(self, record: OutRecord) -> None:
        """Queue a record in the running step's outbox."""
        st = self.store.current()
        if st is None:
            raise StoreError("a record can only be sent from inside a step")
        st.outbox.append((self.store.add_outbox(record), record))

    def _seal(self, record: OutRecord) -> OutRecord:
        """The record as it leaves now: sent-at of this send, signed (see the relay). The
        sent-at is strictly increasing per node, so two sends of one stored record (a stored
        answer re-sent twice within a millisecond) never have the same bytes, which the
        receiver would take for a replay."""
        at = max(now_ms(), self._last_seal_ms + 1)
        self._last_seal_ms = at
        headers = self.trust.seal(record.headers, record.key, record.value, at)
        return OutRecord(record.topic, record.key, record.value, headers)

    def _subject(self, value: bytes, message: Message | None = None) -> str | None:
        """The claim or filing id a record is about (None for reports: taken from the
        record they answer when logged); ``message`` when it is decoded already. A record
        this node encoded lately is not decoded again (:meth:`_out` noted its subject)."""
        if message is None:
            if value in self._subjects:
                return self._subjects.pop(value)
            try:
                message = self.codec.decode(value)
            except DecodeError:
                return None
        name = SUBJECT_OF.get(type(message))
        return str(getattr(message, name)) if name is not None else None

    def _audit_entry(
        self,
        direction: str,
        record: OutRecord,
        where: Record | None = None,
        message: Message | None = None,
    ) -> AuditEntry | None:
        hdrs = text_headers(record.headers)
        message_id = hdrs.get(H_MESSAGE_ID)
        if message_id is None:
            return None
        return AuditEntry(
            direction=direction,
            at_ms=now_ms(),
            topic=record.topic,
            partition=where.partition if where is not None else None,
            offset=where.offset if where is not None else None,
            key=record.key,
            value=record.value,
            headers=record.headers,
            message_id=message_id,
            correlation_id=hdrs.get(H_CORRELATION_ID),
            subject=self._subject(record.value, message),
            signature=signature_of(record.headers),
        )

    def _describe_sent(self, wire: OutRecord) -> AuditEntry | None:
        """The message-log entry of a record the broker acknowledged."""
        return self._audit_entry(SENT, wire)

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
        value = self.codec.encode(message)
        name = SUBJECT_OF.get(type(message))
        self._subjects[value] = str(getattr(message, name)) if name is not None else None
        if len(self._subjects) > SUBJECTS_NOTED:
            del self._subjects[next(iter(self._subjects))]  # the oldest: sent long ago
        return OutRecord(dest, key, value, env.to_headers())

    async def publish(
        self,
        message: Message,
        *,
        target: str,
        key: bytes | None = None,
        correlation_id: str | None = None,
    ) -> Envelope:
        """Send a message that is not a request (a notice, a report) to ``target``'s inbox,
        through the outbox of the running step (or a step of its own)."""
        if type(message) in REQUESTS:
            raise RoutingError(f"{message.avro_name} is a request: use request() or ask()")
        env = self._envelope(message, target, correlation_id=correlation_id)
        family = FAMILY_OF[type(message)]
        record = self._out(message, env, key or message_key(message), topic(family, target))
        async with self.step():
            self._emit(record)
        return env

    def _target_of(self, message: Message) -> str:
        route = ROUTES.get(type(message))
        if route is None:
            raise RoutingError(f"{message.avro_name} is not a request")
        return province_of(str(getattr(message, route[1])))

    def _request_record(self, message: Message, deadline_s: float) -> PendingRequest:
        target = self._target_of(message)
        sent = now_ms()
        env = self._envelope(
            message,
            target,
            reply_to=topic(FAMILY_REPLY, self.province),
            deadline_ms=sent + int(deadline_s * 1000),
        )
        family = FAMILY_OF[type(message)]
        return PendingRequest(
            message_id=env.message_id,
            message_type=message.avro_name,
            target=target,
            record=self._out(message, env, message_key(message), topic(family, target)),
            attempt=1,
            sent_at_ms=sent,
            deadline_ms=env.deadline_ms or sent,
            state=PENDING,
        )

    async def request(self, message: Message, *, deadline_s: float) -> str:
        """Send a request; the answer goes to the :meth:`on_answer` callback. Returns its id.

        The pending request and the record commit in one step (the running one, or its own;
        in its own step it returns once the broker has the record, so a caller sending many
        requests is held back by the broker's pace instead of filling the outbox)."""
        pending = self._request_record(message, deadline_s)
        joined = self.store.current() is not None
        async with self.step() as st:
            self.store.add_pending(pending)
            self._emit(pending.record)
        if not joined:
            await self.delivered(st)
        self._log.debug(
            "request_sent", message_id=pending.message_id, type=pending.message_type,
            target=pending.target,
        )  # fmt: skip
        return pending.message_id

    async def ask(self, message: Message, *, deadline_s: float) -> Answer:
        """Send a request and wait for its terminal answer (or DEADLINE_EXCEEDED)."""
        if self.store.current() is not None:
            raise RoutingError("ask() inside a step would wait for its own commit: use request()")
        pending = self._request_record(message, deadline_s)
        waiter: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiters[pending.message_id] = waiter
        try:
            async with self.step():
                self.store.add_pending(pending)
                self._emit(pending.record)
            return await self._await_answer(pending, waiter, deadline_s + 30.0)
        finally:
            self._waiters.pop(pending.message_id, None)

    async def _await_answer(
        self, pending: PendingRequest, waiter: asyncio.Future[Answer], timeout_s: float
    ) -> Answer:
        """The answer ``waiter`` is given when this instance receives it; when another
        instance of the province (sharing the store) received it, the store has it."""
        limit = time.monotonic() + timeout_s
        while True:
            left = limit - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {pending.message_id} in {timeout_s:.0f} s")
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(waiter), min(left, ASK_POLL_S))
            stored = self.store.get_pending(pending.message_id)
            if stored is None or stored.state == PENDING:
                continue
            if stored.answer is not None:
                message: Message = self.codec.decode(stored.answer.value)
            else:  # expired by another instance's sweep
                message = self._deadline_report(stored)
            return Answer(
                request_id=stored.message_id,
                request_type=stored.message_type,
                target=stored.target,
                message=message,
                latency_s=max(0.0, ((stored.answered_at_ms or now_ms()) - stored.sent_at_ms))
                / 1000,
                request=stored,
            )

    async def delivered(self, step: Step) -> None:
        """Wait until the broker acknowledged every record ``step`` sent (after its commit).
        Desk actions use it for back-pressure; durability never depends on it."""
        if step.sent:
            await asyncio.gather(*step.sent)

    async def resend(self, request_id: str, *, unless_sent_since_ms: int | None = None) -> bool:
        """Send an unanswered request again: same id, ``xs-attempt`` + 1. False if answered,
        or (``unless_sent_since_ms``) sent again since then, by another instance say."""
        async with self.step():
            pending = self.store.get_pending(request_id, lock=True)
            if pending is None or pending.state != PENDING:
                return False
            sent = pending.last_sent_ms
            if (
                unless_sent_since_ms is not None
                and sent is not None
                and sent > unless_sent_since_ms
            ):
                return False
            env = Envelope.from_headers(pending.record.headers).resent()
            record = OutRecord(
                pending.record.topic, pending.record.key, pending.record.value, env.to_headers()
            )
            self.store.bump_attempt(request_id, record, now_ms())
            self._emit(record)
        self.metrics.inc("xsettle_resends_total")
        self._log.info("request_resent", message_id=request_id, attempt=env.attempt)
        return True

    async def send_report(
        self, rep: ErrorReport, *, to: str, key: bytes | None, correlation_id: str | None
    ) -> None:
        """Send an ErrorReport to ``xsettle.error.<to>`` (through the outbox)."""
        async with self.step():
            self._emit(self._report_out(rep, to, key, correlation_id))

    async def send_raw(
        self, topic_name: str, key: bytes | None, value: bytes, headers: Any
    ) -> None:
        """Write a record exactly as given, bypassing the outbox (fault injection, dead-letter
        replay)."""
        await (await self._producer.send(topic_name, key, value, headers))

    async def lag(self) -> dict[Partition, int]:
        """Records not yet read per assigned inbox partition."""
        return await self._consumer.lag() if self._consumer is not None else {}

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
                # A worker that died was reported by _fatal already.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await worker.task
            for _, futures in worker.done:
                for fut in futures:
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await fut

    async def _fetch_loop(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while self._running:
            try:
                records = await consumer.fetch(FETCH_TIMEOUT_MS, self.settings.fetch_max_records)
            except BusError as exc:
                if not exc.retriable:
                    raise
                self._log.warning("fetch_failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            for rec in records:
                part = rec.where
                worker = self._workers.get(part)
                if worker is None:
                    worker = self._workers[part] = _Worker(part)
                    worker.task = self._spawn(
                        self._work(worker), f"work:{part.topic}:{part.partition}"
                    )
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
            batch = [worker.queue.popleft() for _ in range(min(len(worker.queue), BATCH_MAX))]
            worker.busy_since = time.monotonic()
            futures = await self._process_batch(batch)
            worker.busy_since = None
            worker.done.append((batch[-1].offset, futures))
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
            ready = _acknowledged(worker)
            if ready is not None:
                offsets[part] = ready + 1
        if offsets:
            try:
                await self._consumer.commit(offsets)
            except BusError as exc:
                self._log.warning("commit_failed", error=str(exc))

    # --- processing a batch of records ---------------------------------------------------
    async def _process_batch(self, records: list[Record]) -> list[asyncio.Future[None]]:
        """Handle a partition's records, in order, to their end; returns the
        acknowledgements the last one's offset waits for.

        All are read first (signature, envelope, decoding, contract checks: no transaction
        needed), then handled in one step, each record in a savepoint of its own. A record
        whose handling raises is undone alone (its savepoint, its outbox rows and commit
        callbacks), the ones before it commit, and it goes the one-record way with its
        retries and give-up (:meth:`_process_record`); the batch goes on after it."""
        outputs: list[asyncio.Future[None]] = []
        token = _OUTPUTS.set(outputs)
        try:
            read = [self._read(rec) for rec in records]
            at = 0
            while at < len(records):
                at, failure = await self._handle_batch(records, read, at)
                if at < len(records):
                    await self._process_record(records[at], read[at], failure)
                    at += 1
        finally:
            _OUTPUTS.reset(token)
        return outputs

    async def _handle_batch(
        self, records: list[Record], read: list[_Read], start: int
    ) -> tuple[int, BaseException | None]:
        """Handle ``records[start:]`` in one step, up to the first that fails; returns the
        index of the first record not done (``len(records)``: all done) and why it failed
        (None when the step's commit failed: it was not tried on its own)."""
        done = start
        failure: BaseException | None = None
        try:
            async with self.step() as st:
                for rec, got in zip(records[start:], read[start:], strict=True):
                    rows, callbacks = len(st.outbox), len(st.on_commit)
                    try:
                        async with self.step():  # a savepoint: a failure undoes this record
                            await self._handle_read(rec, got)
                    except Exception as exc:
                        del st.outbox[rows:]
                        del st.on_commit[callbacks:]
                        failure = exc
                        break
                    done += 1
        except Exception as exc:  # the commit itself failed: none of the batch is done
            self._log.warning(
                "batch_step_failed", records=done - start, error=repr(exc)[:ERROR_TEXT_MAX]
            )
            return start, None
        return done, failure

    async def _handle_read(self, rec: Record, got: _Read) -> None:
        """One read record inside the running step: dead-lettered, or checked for a replay
        and handled."""
        if isinstance(got, DecodeError):
            await self._dead_letter(rec, got)
            return
        verified, env, message = got
        if self._accept(rec, verified, message):
            await self._step(rec, env, message)
        else:
            await self._dead_letter(rec, _replayed(rec))

    def _read(self, rec: Record) -> _Read:
        """Everything about a record that needs no transaction: its signature, envelope,
        message and the contract's checks; the :class:`DecodeError` that dead-letters it."""
        self.metrics.inc("xsettle_records_in_total", topic_family=family_of_topic(rec.topic))
        try:
            if rec.poison is not None:
                raise DecodeError("undecodable_header", rec.poison)
            size = record_size(rec)
            if size > MAX_RECORD_BYTES:
                raise DecodeError(
                    "oversized", f"{size} bytes, over the contract's {MAX_RECORD_BYTES}"
                )
            verified = self._verify(rec)
            env = Envelope.from_headers(rec.headers)
            if rec.value is None:
                raise DecodeError("malformed", "the record has no value")
            message = self.codec.decode(rec.value)
            check(env, message, rec.topic)
        except DecodeError as exc:
            return exc
        self.metrics.inc("xsettle_messages_in_total", family=FAMILY_OF[type(message)])
        return verified, env, message

    async def _process_record(
        self, rec: Record, got: _Read, failure: BaseException | None = None
    ) -> None:
        """One record the batch could not handle (its first try raised ``failure``), in
        steps of its own: tried again with backoff, then given up (INTERNAL_ERROR answered,
        ops told)."""
        if isinstance(got, DecodeError):
            await self._dead_letter(rec, got)
            return
        verified, env, message = got
        delay = self.settings.retry_initial_ms / 1000
        attempts = self.settings.retry_attempts
        attempt = 0 if failure is None else 1
        while True:
            if failure is not None:
                self.metrics.inc("xsettle_handler_retries_total", type=env.message_type)
                self._log.warning(
                    "step_failed",
                    message_id=env.message_id,
                    type=env.message_type,
                    attempt=attempt,
                    error=repr(failure)[:ERROR_TEXT_MAX],
                )
                if isinstance(failure, BusError) and not failure.retriable:
                    break
                if attempt >= attempts:
                    break
                # Wait in this partition only; a stop cuts the wait short.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), delay)
                if self._stop_event.is_set():
                    raise asyncio.CancelledError from failure
                delay = min(delay * 2, self.settings.retry_max_ms / 1000)
            attempt += 1
            try:
                async with self.step():
                    if self._accept(rec, verified, message):
                        await self._step(rec, env, message)
                    else:
                        await self._dead_letter(rec, _replayed(rec))
                return
            except Exception as exc:
                failure = exc
        async with self.step():
            if self._accept(rec, verified, message):
                await self._give_up(rec, env, message, failure)

    def _on_bus(self, province: str) -> bool:
        """Whether ``province`` takes part in the bus (publishes a key; with checking off,
        any province code)."""
        verifier = self.trust.verifier
        return verifier is None or bool(verifier.keys.of(province))

    def _verify(self, rec: Record) -> Verified | None:
        """Check the record's signature before anything else reads it (None: checking is
        off). :class:`SignatureError` when it fails."""
        verifier = self.trust.verifier
        if verifier is None:
            return None
        try:
            return verifier.verify(rec.headers, rec.key, rec.value, now_ms())
        except SignatureError as exc:
            self.metrics.inc("xsettle_signature_failures_total", kind=exc.kind)
            raise

    def _accept(self, rec: Record, verified: Verified | None, message: Message) -> bool:
        """Inside the record's step: False for a replay (the same signed record accepted
        before at other coordinates); else log it as received, once."""
        if verified is None:
            return True
        where = self.store.audit.received_at(verified.signature)
        if where is None:
            entry = self._audit_entry(RECEIVED, _stored(rec), rec, message)
            if entry is not None:
                self.store.audit.append([entry])
            return True
        if where == (rec.topic, rec.partition, rec.offset):
            return True  # the same record delivered again (a crash before the commit)
        self.metrics.inc("xsettle_signature_failures_total", kind="replayed")
        return False

    async def _step(self, rec: Record, env: Envelope, message: Message) -> None:
        """The work of one decoded record, inside its step."""
        seen = self.store.processed(env.message_id)
        if seen is not None:
            self.metrics.inc("xsettle_duplicates_total", family=FAMILY_OF[type(message)])
            self._log.info(
                "duplicate_ignored",
                message_id=env.message_id,
                type=env.message_type,
                attempt=env.attempt,
                resent_answer=seen.answer is not None,
            )
            if seen.answer is not None:
                self._emit(resent(seen.answer))
            else:
                ob = self.store.get_obligation(env.message_id)
                if ob is not None and ob.state == OPEN:
                    self._emit(
                        self._ack_out(env, rec, message, ob.expected_by_ms, ob.ack_state, ob.note)
                    )
            return
        if isinstance(message, RequestAcknowledgement):
            await self._on_ack(rec, env, message)
        elif self._is_answer(env, message):
            await self._on_answer(rec, env, message)
        else:
            await self._handle(rec, env, message)

    def _is_answer(self, env: Envelope, message: Message) -> bool:
        if type(message) in REPLIES:
            return True
        # An ErrorReport answers our request when the province we asked sent it about it;
        # our own copies to ops, and reports from third provinces, are not answers.
        if not isinstance(message, ErrorReport) or env.correlation_id is None:
            return False
        if env.source == self.province:
            return False
        pending = self.store.get_pending(env.correlation_id)
        return pending is not None and pending.target == env.source

    def _mismatch(self, pending: PendingRequest, env: Envelope, message: Message) -> str | None:
        """Why ``message`` cannot be the answer to ``pending`` (None: it can)."""
        if env.source != pending.target:
            return (
                f"{env.message_type} from {env.source} answers {pending.message_type} "
                f"{pending.message_id}, which was sent to {pending.target}"
            )
        if isinstance(message, ErrorReport):
            if message.ref_message_id not in (None, pending.message_id):
                return f"the ErrorReport is about {message.ref_message_id}, not the request"
            return None
        if isinstance(message, RequestAcknowledgement):
            if message.request_type != pending.message_type:
                return (
                    f"the acknowledgement is of a {message.request_type}, the request "
                    f"{pending.message_id} is a {pending.message_type}"
                )
        else:
            expected = REPLY_OF_NAME.get(pending.message_type)
            if expected is None or not isinstance(message, expected):
                return (
                    f"{env.message_type} cannot answer {pending.message_type}; "
                    f"the contract pairs it with {expected.avro_name if expected else 'nothing'}"
                )
        name = SUBJECT_OF.get(type(message))
        if name is not None:
            request = self.codec.decode(pending.record.value)
            asked = getattr(request, SUBJECT_OF.get(type(request), name), None)
            told = getattr(message, name)
            if asked != told:
                return f"the {env.message_type} is about {told}, the request was about {asked}"
        return None

    async def _on_answer(self, rec: Record, env: Envelope, message: Message) -> None:
        assert env.correlation_id is not None
        bound = self._log.bind(
            message_id=env.message_id,
            correlation_id=env.correlation_id,
            type=env.message_type,
            source=env.source,
        )
        pending = self.store.get_pending(env.correlation_id)
        if pending is None:
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
            self.store.mark_processed(env.message_id, env.message_type, None, now_ms())
            self._emit(self._report_out(rep, env.source, rec.key, env.message_id))
            return
        why = self._mismatch(pending, env, message)
        if why is not None:
            bound.warning("answer_refused", reason=why, request_target=pending.target)
            self.metrics.inc("xsettle_answers_total", outcome="refused")
            rep = report(
                ErrorCode.INVALID_MESSAGE,
                why,
                detected_by=self.province,
                origin=env.source,
                responsible=env.source,
                ref=env,
                record=rec,
                details={"request_id": pending.message_id},
            )
            self.store.mark_processed(env.message_id, env.message_type, None, now_ms())
            for to in dict.fromkeys((env.source, self.province)):
                self._emit(self._report_out(rep, to, rec.key, env.message_id))
            return
        answer = _stored(rec)
        before, _ = self.store.record_answer(
            env.correlation_id,
            answer,
            now_ms(),
            answer_id=env.message_id,
            answer_type=env.message_type,
            delivered=True,
        )
        if before == PENDING:
            outcome = "error" if isinstance(message, ErrorReport) else "ok"
            self.metrics.inc("xsettle_answers_total", outcome=outcome)
            await self._deliver(pending, message)
        elif before == EXPIRED:
            bound.info("late_answer")
            self.metrics.inc("xsettle_answers_total", outcome="late")
            await self._deliver(pending, message, late=True)
        else:
            bound.info("duplicate_answer_ignored", state=before)
            self.metrics.inc("xsettle_answers_total", outcome="duplicate")

    async def _on_ack(self, rec: Record, env: Envelope, message: RequestAcknowledgement) -> None:
        """An acknowledgement of one of our requests: stored (the request is not re-sent any
        more and shows when its answer is expected), told to the callback. Checked like an
        answer: from the province asked, about the same request and subject."""
        assert env.correlation_id is not None
        pending = self.store.get_pending(env.correlation_id)
        self.store.mark_processed(env.message_id, env.message_type, None, now_ms())
        why = (
            f"{env.correlation_id} is no request of {self.province}"
            if pending is None
            else self._mismatch(pending, env, message)
        )
        if why is not None:
            self._log.warning("acknowledgement_refused", message_id=env.message_id, reason=why)
            self.metrics.inc("xsettle_acknowledgements_total", outcome="refused")
            code = ErrorCode.ORPHAN_REPLY if pending is None else ErrorCode.INVALID_MESSAGE
            rep = report(
                code, why, detected_by=self.province, origin=env.source,
                responsible=env.source, severity=Severity.WARNING, ref=env, record=rec,
            )  # fmt: skip
            for to in dict.fromkeys((env.source, self.province)):
                self._emit(self._report_out(rep, to, rec.key, env.message_id))
            return
        assert pending is not None
        expected = int(message.expected_by.timestamp() * 1000) if message.expected_by else None
        self.store.record_ack(
            pending.message_id, now_ms(), message.state.value, expected, message.note
        )
        self.metrics.inc("xsettle_acknowledgements_total", outcome="ok")
        self._log.info(
            "request_acknowledged", request_id=pending.message_id, by=env.source,
            state=message.state.value, expected_by_ms=expected, state_before=pending.state,
        )  # fmt: skip
        callback = self._ack_callbacks.get(pending.message_type)
        if callback is not None and pending.state == PENDING:
            await callback(
                Acknowledged(
                    request_id=pending.message_id,
                    request_type=pending.message_type,
                    target=pending.target,
                    state=message.state.value,
                    expected_by_ms=expected,
                    note=message.note,
                    first=pending.acknowledged_at_ms is None,
                )
            )

    def _ack_out(
        self,
        env: Envelope,
        rec: Record,
        request: Message,
        expected_by_ms: int | None,
        state: str | None,
        note: str,
    ) -> OutRecord:
        """The RequestAcknowledgement of the request ``env`` (to its reply topic)."""
        subject = SUBJECT_OF.get(type(request))
        ack = RequestAcknowledgement(
            request_type=env.message_type,
            subject_id=str(getattr(request, subject)) if subject else env.message_id,
            state=AckState(state) if state and state in AckState.__members__ else AckState.RECEIVED,
            expected_by=(
                dt.datetime.fromtimestamp(expected_by_ms / 1000, dt.UTC)
                if expected_by_ms is not None
                else None
            ),
            note=note[:ERROR_TEXT_MAX],
            acknowledged_at=now(),
        )
        ack_env = self._envelope(ack, env.source, correlation_id=env.message_id)
        self.metrics.inc("xsettle_acknowledgements_sent_total")
        return self._out(ack, ack_env, rec.key, topic(FAMILY_REPLY, env.source))

    async def _deliver(
        self, pending: PendingRequest, message: Message, *, late: bool = False
    ) -> None:
        """Hand an answer to its callback inside the running step; wake an :meth:`ask`
        waiter once the step committed."""
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
        callback = self._answer_callbacks.get(pending.message_type)
        if callback is not None:
            await callback(answer)
        waiter = self._waiters.get(pending.message_id)
        st = self.store.current()
        if waiter is not None and st is not None:

            def wake() -> None:
                if not waiter.done():
                    waiter.set_result(answer)

            st.on_commit.append(wake)

    async def _handle(self, rec: Record, env: Envelope, message: Message) -> None:
        ctx = Context(self, env, rec)
        is_request = type(message) in REQUESTS
        handler = self._handlers.get(type(message))
        answer: OutRecord | None = None
        try:
            async with self.store.step():  # a savepoint: a Rejection undoes the handler's writes
                if handler is None:
                    if is_request:
                        raise Rejection(
                            ErrorCode.INTERNAL_ERROR,
                            f"{self.province} has no handler for {env.message_type}",
                        )
                    self._log.debug("no_handler", type=env.message_type)
                    result = None
                else:
                    result = await handler(message, ctx)
                if is_request and isinstance(result, Deferred):
                    self._defer(env, rec, result)
                    self.store.mark_processed(env.message_id, env.message_type, None, now_ms())
                    self._emit(
                        self._ack_out(
                            env, rec, message, result.expected_by_ms, result.state, result.note
                        )
                    )
                    return
                if is_request:
                    expected = REPLY_OF[type(message)]
                    if not isinstance(result, expected):
                        raise Rejection(
                            ErrorCode.INTERNAL_ERROR,
                            f"the {env.message_type} handler answered {type(result).__name__}",
                        )
                    reply_env = self._envelope(result, env.source, correlation_id=env.message_id)
                    answer = self._out(result, reply_env, rec.key, topic(FAMILY_REPLY, env.source))
        except Rejection as rej:
            rep = self._rejected(rej, env.source, env.message_id, env.message_type, rec)
            answer = self._report_out(rep, env.source, rec.key, env.message_id)
        self.store.mark_processed(env.message_id, env.message_type, answer, now_ms())
        if answer is not None:
            self._emit(answer)

    def _rejected(
        self,
        rej: Rejection,
        origin: str,
        ref_id: str,
        ref_type: str,
        record: Record | None = None,
    ) -> ErrorReport:
        """The ErrorReport answering a request (``ref_id``) that a handler or a reviewer
        refused; ``responsible`` in the rejection's details names who must act."""
        return report(
            rej.reject_code,
            rej.text,
            detected_by=self.province,
            origin=origin,
            responsible=rej.details.pop("responsible", origin),
            retriable=rej.is_retriable,
            severity=Severity.ERROR,
            record=record,
            details=rej.details,
        ).model_copy(update={"ref_message_id": ref_id, "ref_message_type": ref_type})

    def _defer(self, env: Envelope, rec: Record, deferred: Deferred) -> None:
        """Record the obligation to answer ``env``'s request later (inside its step)."""
        self.store.add_obligation(
            Obligation(
                request_id=env.message_id,
                request_type=env.message_type,
                source=env.source,
                key=rec.key,
                deadline_ms=env.deadline_ms or now_ms(),
                accepted_at_ms=now_ms(),
                state=OPEN,
                expected_by_ms=deferred.expected_by_ms,
                ack_state=deferred.state,
                note=deferred.note,
            )
        )
        self.metrics.inc("xsettle_answers_deferred_total", family=family_of_topic(rec.topic))
        self._log.info(
            "answer_deferred", message_id=env.message_id, source=env.source, note=deferred.note
        )

    async def answer(self, request_id: str, reply: Message | Rejection) -> OutRecord:
        """Send the one terminal answer to a request whose handler deferred it: the reply, or
        an ErrorReport for a :class:`Rejection`. Called again (from this process or another
        sharing the store), it returns the stored answer and sends nothing new."""
        async with self.step():
            ob = self.store.get_obligation(request_id, lock=True)
            if ob is None:
                raise RoutingError(f"{self.province} owes no answer to {request_id}")
            if ob.answer is not None:
                self._log.info("answer_already_sent", request_id=request_id)
                return ob.answer
            if isinstance(reply, Rejection):
                rep = self._rejected(reply, ob.source, request_id, ob.request_type)
                record = self._report_out(rep, ob.source, ob.key, request_id)
            else:
                expected = REPLY_OF_NAME.get(ob.request_type)
                if expected is None or not isinstance(reply, expected):
                    raise RoutingError(
                        f"{type(reply).__name__} cannot answer {ob.request_type} {request_id}"
                    )
                env = self._envelope(reply, ob.source, correlation_id=request_id)
                record = self._out(reply, env, ob.key, topic(FAMILY_REPLY, ob.source))
            self.store.settle_obligation(request_id, record, now_ms())
            self._emit(record)
        self._log.info("deferred_answer_sent", request_id=request_id, to=ob.source)
        return record

    def owed(self, limit: int = 1_000) -> list[Obligation]:
        """What this node owes: open obligations, the earliest deadline first."""
        return self.store.obligations(OPEN, limit)

    async def _give_up(
        self, rec: Record, env: Envelope, message: Message, exc: BaseException | None
    ) -> None:
        """Every try failed: answer INTERNAL_ERROR (retriable) and tell our ops. An answer
        to our own request is stored undelivered and handed to its callback at next start."""
        self._log.error(
            "step_gave_up", message_id=env.message_id, type=env.message_type, error=repr(exc)
        )
        rep = report(
            ErrorCode.INTERNAL_ERROR,
            f"{self.province} failed to handle {env.message_type}: {exc!r}",
            detected_by=self.province,
            origin=env.source,
            responsible=self.province,
            retriable=True,
            severity=Severity.CRITICAL,
            ref=env,
            record=rec,
        )
        if self._is_answer(env, message):
            assert env.correlation_id is not None
            answer = _stored(rec)
            self.store.record_answer(
                env.correlation_id,
                answer,
                now_ms(),
                answer_id=env.message_id,
                answer_type=env.message_type,
                delivered=False,
            )
            self._emit(self._report_out(rep, self.province, rec.key, env.message_id))
            return
        out = self._report_out(rep, env.source, rec.key, env.message_id)
        self.store.mark_processed(env.message_id, env.message_type, out, now_ms())
        self._emit(out)
        if env.source != self.province:
            self._emit(self._report_out(rep, self.province, rec.key, env.message_id))

    async def _dead_letter(self, rec: Record, exc: DecodeError) -> None:
        """Copy the record to our DLQ (or its coordinates and digest when it cannot be
        copied); tell the sender when we know who it is."""
        self.metrics.inc("xsettle_dead_letters_total", kind=exc.kind)
        letter = dead_letter(
            rec, kind=exc.kind, error=str(exc), group=self.group, province=self.province
        )
        hdrs = text_headers(rec.headers)
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
        # Who hears of it: the claimed sender, and for a refused signature our own ops too.
        # A report about a report goes to our ops only: two provinces that cannot read each
        # other's reports must not answer each other for ever.
        # A sender that publishes no key is no province on the bus: its error topic may not
        # exist, and a report there would wait in the outbox for ever.
        to: list[str] = []
        if sender is not None and not self._on_bus(sender):
            sender = None
        if sender is not None and family_of_topic(rec.topic) != FAMILY_ERROR:
            to.append(sender)
        if isinstance(exc, SignatureError) or (sender is not None and not to):
            to.append(self.province)
        async with self.step():
            self._emit(letter)
            if to:
                ref = None
                with contextlib.suppress(DecodeError):
                    ref = Envelope.from_headers(rec.headers)
                rep = report(
                    exc.code,
                    f"{rec.topic}@{rec.partition}:{rec.offset} cannot be read: {exc}",
                    detected_by=self.province,
                    origin=sender or "unknown",
                    responsible=sender or self.province,
                    ref=ref,
                    record=rec,
                    details={"kind": exc.kind, "dlq_topic": letter.topic},
                )
                for dest in dict.fromkeys(to):
                    self._emit(self._report_out(rep, dest, rec.key, hdrs.get(H_MESSAGE_ID)))

    # --- deadlines ------------------------------------------------------------------------
    async def sweep(self) -> int:
        """Turn overdue requests into DEADLINE_EXCEEDED, each in its own step; returns how
        many. A step that fails leaves its request pending for the next sweep."""
        expired = 0
        for pending in self.store.due(now_ms(), SWEEP_BATCH):
            try:
                async with self.step():
                    if self.store.mark_expired(pending.message_id):
                        await self._expire(pending)
                        expired += 1
            except Exception as exc:
                self.metrics.inc("xsettle_deadline_failures_total")
                self._log.error(
                    "deadline_step_failed", message_id=pending.message_id, error=repr(exc)[:300]
                )
        return expired

    async def resend_unacknowledged(self) -> int:
        """Send again (same id, ``xs-attempt`` + 1) each request that has had neither answer
        nor acknowledgement for ``ack_window_s`` since its last send, up to
        ``unacknowledged_sends`` sends; returns how many. A lost record surfaces in minutes:
        the receiver answers a re-send with its stored answer or its acknowledgement."""
        now = now_ms()
        window = self.settings.ack_window_s * 1000
        again = self.store.unacknowledged(
            now - window, now, self.settings.unacknowledged_sends, SWEEP_BATCH
        )
        count = 0
        for pending in again:
            try:
                if await self.resend(pending.message_id, unless_sent_since_ms=now - window):
                    count += 1
                    self.metrics.inc("xsettle_unacknowledged_resends_total")
                    self._log.warning(
                        "request_unacknowledged", message_id=pending.message_id,
                        target=pending.target, attempt=pending.attempt + 1,
                    )  # fmt: skip
            except BusError as exc:
                self._log.error(
                    "resend_failed", message_id=pending.message_id, error=repr(exc)[:300]
                )
        return count

    async def _expire(self, pending: PendingRequest) -> None:
        """Report DEADLINE_EXCEEDED for one request and hand it to the caller (in a step)."""
        env = Envelope.from_headers(pending.record.headers)
        rep = self._deadline_report(pending)
        key = pending.record.key
        for to in (pending.target, self.province):
            self._emit(self._report_out(rep, to, key, env.message_id))
        await self._deliver(pending, rep)
        self.metrics.inc("xsettle_answers_total", outcome="deadline")

    def _deadline_report(self, pending: PendingRequest) -> ErrorReport:
        """The DEADLINE_EXCEEDED report of a request nobody answered in time."""
        env = Envelope.from_headers(pending.record.headers)
        return report(
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

    async def _sweep_loop(self) -> None:
        interval = self.settings.sweep_interval_ms / 1000
        last_prune = 0.0
        while self._running:
            try:
                while await self.sweep() == SWEEP_BATCH:
                    pass
                await self.resend_unacknowledged()
                if time.monotonic() - last_prune > 3600:
                    last_prune = time.monotonic()
                    async with self.step():
                        pruned = self.store.prune(now_ms() - self.settings.retention_s * 1000)
                        logged = self.store.audit.prune(
                            now_ms() - self.settings.audit_retention_days * 86_400_000
                        )
                    self._log.debug("store_pruned", rows=pruned, audit_entries=logged)
            except BusError as exc:
                self._log.warning("sweep_failed", error=str(exc))
            await asyncio.sleep(interval)


def _replayed(rec: Record) -> SignatureError:
    return SignatureError(
        "replayed",
        f"{rec.topic}@{rec.partition}:{rec.offset} repeats a signed record accepted before "
        "(same signature): a replay, not a re-send",
    )


def _stored(rec: Record) -> OutRecord:
    """A received answer as the store keeps it (byte for byte)."""
    return OutRecord(rec.topic, rec.key, rec.value or b"", rec.headers)


def _acknowledged(worker: _Worker) -> int | None:
    """Highest offset whose step committed and whose outbox records the broker has all
    acknowledged (the relay re-sends failed ones itself)."""
    ready: int | None = None
    while worker.done:
        offset, futures = worker.done[0]
        if not all(f.done() and not f.cancelled() for f in futures):
            return ready
        worker.done.popleft()
        ready = offset
    return ready


_OUTPUTS: contextvars.ContextVar[list[asyncio.Future[None]] | None] = contextvars.ContextVar(
    "xsettle_outputs", default=None
)
"""Acknowledgements of the records sent while one record is processed; its offset waits."""


FAMILY_OF_NAME: dict[str, str] = {m.avro_name: f for m, f in FAMILY_OF.items()}
"""Topic family by full Avro name."""

REPLY_OF_NAME: dict[str, type[Message]] = {m.avro_name: r for m, r in REPLY_OF.items()}
REPLIES: frozenset[type[Message]] = frozenset(REPLY_OF.values())
"""The terminal replies of the contract (each answers one request family)."""
"""The reply type paired with each request type, by the request's full Avro name."""
