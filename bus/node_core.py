"""The core a node's parts stand on: who the node is, its steps, and the records it sends.

:class:`NodeCore` holds the state every part of a :class:`~bus.node.Node` reads (province,
settings, trust, codec, store, metrics, the producer and the outbox relay), the *step* (one
transaction over the province's state and the bus's; the records it queued leave after the
commit, :mod:`bus.outbox`), and how an outgoing record is built: envelope, encoding, signing
as it leaves, its message-log entry, error reports, plain publishing. The parts
(:mod:`bus.requests`, :mod:`bus.obligations`) are mixins over this class: each needs most of
it, so it is shared by inheritance rather than handed around piece by piece.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog

from bus.audit import SENT, AuditEntry
from bus.codec import Codec
from bus.constants import (
    ERROR_TEXT_MAX,
    FAMILY_ERROR,
    H_CORRELATION_ID,
    H_MESSAGE_ID,
    PROVINCE_RE,
    topic,
)
from bus.db import Step
from bus.envelope import (
    FAMILY_OF,
    KEY_OF,
    REQUESTS,
    SUBJECT_OF,
    Envelope,
    new_id,
    now_ms,
    text_headers,
)
from bus.errors import DecodeError, RoutingError, StoreError
from bus.metrics import Metrics, province_label
from bus.models import ErrorCode, ErrorReport, Message, Severity, now
from bus.outbox import Relay
from bus.settings import BusSettings
from bus.signing import Trust, signature_of
from bus.store import OutRecord, SqlStore, Store
from bus.transport import Producer, Record

log = structlog.get_logger(__name__)

SUBJECTS_NOTED = 10_000
"""Subjects of records encoded here kept until the record is logged as sent (the message
log then need not decode it again); the oldest are forgotten first."""

RECORD_OUTPUTS: contextvars.ContextVar[list[asyncio.Future[None]] | None] = contextvars.ContextVar(
    "xsettle_outputs", default=None
)
"""Acknowledgements of the records sent while one record is processed; its offset waits."""

PENDING_STATS_TTL_S = 1.0
"""How long one read of the pending requests by counterparty serves the three gauges made of
it (one query per scrape, not three)."""


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


def as_stored(rec: Record) -> OutRecord:
    """A received record as the store keeps it (byte for byte)."""
    return OutRecord(rec.topic, rec.key, rec.value or b"", rec.headers)


class NodeCore:
    """A node's identity, state, steps and outgoing records (see the module docstring)."""

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
        self._producer = Producer(settings, bootstrap, name=f"{province}-out")
        self._relay = Relay(
            self.store,
            self._producer,
            self.metrics,
            province,
            seal=self._seal,
            describe=self._describe_sent,
        )
        self._running = False
        self._log = log.bind(province=province)
        self._pending_stats: tuple[float, dict[str, tuple[int, int, int]]] = (-1e9, {})
        self._pending_stats_lock = threading.Lock()
        self.metrics.gauge("xsettle_outbox_oldest_age_seconds", self._relay.oldest_age_s)
        self.metrics.gauge_by(
            "xsettle_pending_requests_by_counterparty",
            "counterparty",
            lambda: {to: n for to, (n, _, _) in self._pending_by_counterparty().items()},
        )
        self.metrics.gauge_by(
            "xsettle_overdue_requests",
            "counterparty",
            lambda: {to: late for to, (_, late, _) in self._pending_by_counterparty().items()},
        )
        self.metrics.gauge_by(
            "xsettle_oldest_pending_request_age_seconds",
            "counterparty",
            lambda: {
                to: max(0.0, (now_ms() - first) / 1000)
                for to, (_, _, first) in self._pending_by_counterparty().items()
            },
        )

    def _pending_by_counterparty(self) -> dict[str, tuple[int, int, int]]:
        """Requests waiting, by the province asked: (how many, past their deadline, first
        send of the oldest in ms); read from the store at most every
        :data:`PENDING_STATS_TTL_S` (the gauges are read from the exporter's thread)."""
        with self._pending_stats_lock:
            at, stats = self._pending_stats
            if time.monotonic() - at > PENDING_STATS_TTL_S:
                stats = self.store.pending_by_target(now_ms())
                self._pending_stats = (time.monotonic(), stats)
            return stats

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
        outputs = RECORD_OUTPUTS.get()
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

    async def delivered(self, step: Step) -> None:
        """Wait until the broker acknowledged every record ``step`` sent (after its commit).
        Desk actions use it for back-pressure; durability never depends on it."""
        if step.sent:
            await asyncio.gather(*step.sent)

    async def send_report(
        self, rep: ErrorReport, *, to: str, key: bytes | None, correlation_id: str | None
    ) -> None:
        """Send an ErrorReport to ``xsettle.error.<to>`` (through the outbox)."""
        async with self.step():
            self._emit(self._report_out(rep, to, key, correlation_id))

    def _report_out(
        self, rep: ErrorReport, to: str, key: bytes | None, correlation_id: str | None
    ) -> OutRecord:
        env = self._envelope(rep, to, correlation_id=correlation_id)
        responsible = province_label(rep.responsible)
        self.metrics.inc("xsettle_errors_total", code=rep.code.value, responsible=responsible)
        self._log.info(
            "error_reported",
            code=rep.code.value,
            to=to,
            correlation_id=correlation_id,
            responsible=rep.responsible,
        )
        return self._out(rep, env, key, topic(FAMILY_ERROR, to))
