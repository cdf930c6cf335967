"""The path of a received record through a node: read (signature, envelope, decoding, the
contract's checks), then handled in a step: a batch of a partition's records in one step,
each in a savepoint; a duplicate answered from the store, an answer or acknowledgement matched
to its request (:mod:`bus.requests`), a request or notice given to its handler, a handler's
failure tried again with backoff and given up as INTERNAL_ERROR, an unreadable record
dead-lettered (:mod:`bus.deadletter`).

:class:`Inbound` is a mixin of :class:`~bus.node.Node` over the parts it calls (requests,
obligations, :class:`~bus.node_core.NodeCore`): it needs most of the node's state. The
consumer loop (:mod:`bus.consumer_loop`) calls :meth:`Inbound._process_batch`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from bus.audit import RECEIVED
from bus.constants import (
    ERROR_TEXT_MAX,
    FAMILY_ERROR,
    FAMILY_REPLY,
    H_MESSAGE_ID,
    MAX_RECORD_BYTES,
    topic,
)
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
from bus.metrics import province_label
from bus.models import ErrorCode, ErrorReport, Message, RequestAcknowledgement, Severity
from bus.node_core import RECORD_OUTPUTS, as_stored, report
from bus.obligations import Deferred, Obligations
from bus.outbox import family_of_topic, resent
from bus.requests import Requests
from bus.signing import SignatureError, Verified
from bus.store import OPEN, OutRecord
from bus.transport import Record

if TYPE_CHECKING:
    from bus.node import Node


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


class Inbound(Requests, Obligations):
    """The path of a received record (see the module); state it reads that the node sets up."""

    _handlers: dict[type[Message], Handler]
    """The handler of each inbox message type (:meth:`Node.on`)."""
    _stop_event: asyncio.Event
    """Set when the node stops: a retry's backoff ends at once."""

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
        family = FAMILY_OF[type(message)]
        self.metrics.inc("xsettle_messages_in_total", family=family, counterparty=env.source)
        if isinstance(message, ErrorReport):  # by its code and the province that must act
            responsible = province_label(message.responsible)
            code = message.code.value
            self.metrics.inc("xsettle_error_reports_total", code=code, responsible=responsible)
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
        ctx = Context(cast("Node", self), env, rec)
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
        responsible = sender or self.province
        self.metrics.inc("xsettle_dead_letters_total", kind=exc.kind, responsible=responsible)
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
                    responsible=responsible,
                    ref=ref,
                    record=rec,
                    details={"kind": exc.kind, "dlq_topic": letter.topic},
                )
                for dest in dict.fromkeys(to):
                    self._emit(self._report_out(rep, dest, rec.key, hdrs.get(H_MESSAGE_ID)))
