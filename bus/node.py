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

Where each part lives (:class:`Node` is the facade: lifecycle, handler registration and the
path of one received record, delegating to the parts):

* :mod:`bus.node_core` — the node's state, steps, and the records it sends (envelope,
  signing, message log, error reports, :meth:`~Node.publish`);
* :mod:`bus.consumer_loop` — fetching the inbox, a worker per partition, pause/resume,
  the commit ledger, revocation and drain, stalled partitions;
* :mod:`bus.requests` — requests sent, waiting for and matching their answers and
  acknowledgements, deadlines and re-sends;
* :mod:`bus.obligations` — deferred answers (:data:`DEFER`, :meth:`~Node.answer`);
* :mod:`bus.deadletter` — the dead-letter format, written and parsed;
* :mod:`bus.testing` — crashing a node and writing raw records (fault injection).

The node's parts that need most of its state (:mod:`bus.requests`, :mod:`bus.obligations`)
are mixins over :class:`~bus.node_core.NodeCore`; the consumer loop, which needs only a
callback, is a component.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from bus.audit import RECEIVED
from bus.codec import Codec
from bus.constants import (
    ERROR_TEXT_MAX,
    FAMILY_ERROR,
    FAMILY_REPLY,
    H_MESSAGE_ID,
    INBOX_FAMILIES,
    MAX_RECORD_BYTES,
    topic,
)
from bus.consumer_loop import ConsumerLoop
from bus.deadletter import dead_letter, record_size
from bus.envelope import (
    FAMILY_OF,
    REPLY_OF,
    REQUESTS,
    Envelope,
    check,
    now_ms,
    sender_of,
    text_headers,
)
from bus.errors import BusError, DecodeError, Rejection
from bus.models import ErrorCode, Message, RequestAcknowledgement, Severity
from bus.node_core import RECORD_OUTPUTS, as_stored, message_key, report
from bus.obligations import DEFER, Deferred, Obligations
from bus.outbox import family_of_topic, resent
from bus.requests import AckCallback, Acknowledged, Answer, AnswerCallback, Requests
from bus.settings import BusSettings
from bus.signing import SignatureError, Trust, Verified
from bus.store import OPEN, PENDING, OutRecord, Store
from bus.transport import Partition, Record

__all__ = [
    "DEFER",
    "AckCallback",
    "Acknowledged",
    "Answer",
    "AnswerCallback",
    "Context",
    "Deferred",
    "Handler",
    "Node",
    "message_key",
    "report",
]

M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler knows about the record it handles."""

    node: Node
    """The node, to publish or request from inside a handler (joins the handler's step)."""
    envelope: Envelope
    """The record's contract headers."""
    record: Record
    """Where the record came from (topic, partition, offset, key)."""


Handler = Callable[[Any, Context], Awaitable[Message | Deferred | None]]
"""A handler of inbox messages of one type (:meth:`Node.on`): the reply to a request,
:class:`Deferred`, or None."""
_Read = tuple[Verified | None, Envelope, Message] | DecodeError
"""A record as read before its step: (signature, envelope, message), or why it cannot be."""


def _replayed(rec: Record) -> SignatureError:
    """Why ``rec`` is dead-lettered when its signature was accepted before elsewhere."""
    return SignatureError(
        "replayed",
        f"{rec.topic}@{rec.partition}:{rec.offset} repeats a signed record accepted before "
        "(same signature): a replay, not a re-send",
    )


class Node(Requests, Obligations):
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
        super().__init__(
            province,
            settings,
            bootstrap=bootstrap,
            trust=trust,
            store=store,
            codec=codec,
            group=group,
        )
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
        self._answer_callbacks = {}
        self._ack_callbacks = {}
        self._waiters = {}
        self._partitions = ConsumerLoop(
            settings,
            bootstrap,
            group=self.group,
            name=f"{province}-in",
            process=self._process_batch,
            spawn=self._spawn,
            log=self._log,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_event = asyncio.Event()

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
            await self._partitions.start(self.inbox)
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
        if not self._partitions.consuming:
            return
        deadline = time.monotonic() + timeout_s
        expected = len(self.inbox) * self.settings.partitions
        while self._partitions.assigned() < expected:
            if self.failure is not None:
                raise BusError(f"{self.province}: a worker died: {self.failure!r}")
            if time.monotonic() > deadline:
                raise BusError(f"{self.province}: inbox not assigned within {timeout_s} s")
            await asyncio.sleep(0.05)

    def assigned_partitions(self) -> int:
        """How many inbox partitions the group assigned to this node now (0 when not
        consuming)."""
        return self._partitions.assigned()

    def stalled(self) -> list[Partition]:
        """Partitions whose record in hand has not finished for
        :data:`~bus.consumer_loop.STALL_AFTER_S`."""
        return self._partitions.stalled()

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
        self._partitions.halt()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self._partitions.finish()
        await self._relay.stop()
        await self._partitions.close()
        await self._producer.stop()
        for fut in self._waiters.values():
            fut.cancel()
        self._waiters.clear()
        self._log.info("node_stopped")

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def lag(self) -> dict[Partition, int]:
        """Records not yet read per assigned inbox partition."""
        return await self._partitions.lag()

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
        token = RECORD_OUTPUTS.set(outputs)
        try:
            read = [self._read(rec) for rec in records]
            at = 0
            while at < len(records):
                at, failure = await self._handle_batch(records, read, at)
                if at < len(records):
                    await self._process_record(records[at], read[at], failure)
                    at += 1
        finally:
            RECORD_OUTPUTS.reset(token)
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
            entry = self._audit_entry(RECEIVED, as_stored(rec), rec, message)
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
            answer = as_stored(rec)
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
