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

Where each part lives (:class:`Node` is the facade: lifecycle and handler registration,
delegating to the parts):

* :mod:`bus.node_core` — the node's state, steps, and the records it sends (envelope,
  signing, message log, error reports, :meth:`~Node.publish`);
* :mod:`bus.inbound` — the path of a received record: read, checked, handled in a batch's
  step, retried, given up or dead-lettered;
* :mod:`bus.consumer_loop` — fetching the inbox, a worker per partition, pause/resume,
  the commit ledger, revocation and drain, stalled partitions;
* :mod:`bus.requests` — requests sent, waiting for and matching their answers and
  acknowledgements, deadlines and re-sends;
* :mod:`bus.obligations` — deferred answers (:data:`DEFER`, :meth:`~Node.answer`);
* :mod:`bus.deadletter` — the dead-letter format, written and parsed;
* :mod:`bus.testing` — crashing a node and writing raw records (fault injection).

The node's parts that need most of its state (:mod:`bus.inbound`, :mod:`bus.requests`,
:mod:`bus.obligations`) are mixins over :class:`~bus.node_core.NodeCore`; the consumer loop,
which needs only a callback, is a component.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bus.codec import Codec
from bus.constants import (
    INBOX_FAMILIES,
    topic,
)
from bus.consumer_loop import ConsumerLoop
from bus.errors import BusError
from bus.inbound import Context, Handler, Inbound
from bus.models import Message
from bus.node_core import message_key, report
from bus.obligations import DEFER, Deferred
from bus.requests import AckCallback, Acknowledged, Answer, AnswerCallback
from bus.settings import BusSettings
from bus.signing import Trust
from bus.store import OPEN, PENDING, Store
from bus.transport import Partition

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


class Node(Inbound):
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
