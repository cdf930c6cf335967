"""Requests a node sends and their answers: waiting, matching, deadlines, re-sends.

:class:`Requests` is a mixin over :class:`~bus.node_core.NodeCore` (it needs the step, the
outgoing records, the store, the codec and the metrics: most of the core, so inheritance
rather than a component handed a dozen callables). It holds:

* sending: :meth:`~Requests.request` (the answer goes to a callback), :meth:`~Requests.ask`
  (wait for it), :meth:`~Requests.resend`;
* answers: whether a record answers a request of ours, why it cannot (:meth:`_mismatch`),
  storing it and handing it to its callback or waiter once (:meth:`_deliver`), and
  acknowledgements of our requests (:meth:`_on_ack`);
* deadlines: the sweep that turns overdue requests into DEADLINE_EXCEEDED, the re-send of
  requests neither answered nor acknowledged, and the store's pruning.

The callbacks it calls are registered on the node (:meth:`bus.node.Node.on_answer`,
:meth:`bus.node.Node.on_acknowledged`), which also sets up the state declared here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bus.constants import FAMILY_REPLY, province_of, topic
from bus.envelope import FAMILY_OF, REPLY_OF, ROUTES, SUBJECT_OF, Envelope, now_ms
from bus.errors import BusError, RoutingError
from bus.models import ErrorCode, ErrorReport, Message, RequestAcknowledgement, Severity
from bus.node_core import NodeCore, as_stored, message_key, report
from bus.store import EXPIRED, PENDING, OutRecord, PendingRequest
from bus.transport import Record

SWEEP_BATCH = 1_000
"""Overdue requests handled per sweep round."""
ASK_POLL_S = 0.25
"""How often :meth:`Requests.ask` looks in the store for an answer another instance
received."""

FAMILY_OF_NAME: dict[str, str] = {m.avro_name: f for m, f in FAMILY_OF.items()}
"""Topic family by full Avro name."""
REPLY_OF_NAME: dict[str, type[Message]] = {m.avro_name: r for m, r in REPLY_OF.items()}
"""The reply type paired with each request type, by the request's full Avro name."""
REPLIES: frozenset[type[Message]] = frozenset(REPLY_OF.values())
"""The terminal replies of the contract (each answers one request family)."""


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


AnswerCallback = Callable[[Answer], Awaitable[None]]
"""Receives the answers to requests of one type (:meth:`bus.node.Node.on_answer`)."""
AckCallback = Callable[[Acknowledged], Awaitable[None]]
"""Told of acknowledgements of requests of one type (:meth:`bus.node.Node.on_acknowledged`)."""


class Requests(NodeCore):
    """Requests this node sent, their answers and deadlines (see the module docstring)."""

    _answer_callbacks: dict[str, AnswerCallback]
    """Answer callbacks by request type (:meth:`bus.node.Node.on_answer`)."""
    _ack_callbacks: dict[str, AckCallback]
    """Acknowledgement callbacks by request type (:meth:`bus.node.Node.on_acknowledged`)."""
    _waiters: dict[str, asyncio.Future[Answer]]
    """:meth:`ask` calls of this instance waiting for their answer, by request id."""

    # --- sending ----------------------------------------------------------------------------
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
            st.on_commit.append(lambda: self._count_sent(pending))
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
            async with self.step() as st:
                self.store.add_pending(pending)
                self._emit(pending.record)
                st.on_commit.append(lambda: self._count_sent(pending))
            return await self._await_answer(pending, waiter, deadline_s + 30.0)
        finally:
            self._waiters.pop(pending.message_id, None)

    def _count_sent(self, pending: PendingRequest) -> None:
        """Count a request sent, once the step that wrote it committed."""
        family = FAMILY_OF_NAME.get(pending.message_type, "?")
        self.metrics.inc("xsettle_requests_sent_total", family=family, counterparty=pending.target)

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
        self.metrics.inc("xsettle_resends_total", counterparty=pending.target)
        self._log.info("request_resent", message_id=request_id, attempt=env.attempt)
        return True

    # --- answers ----------------------------------------------------------------------------
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
            self.metrics.inc("xsettle_answers_total", outcome="orphan", counterparty=env.source)
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
            self.metrics.inc("xsettle_answers_total", outcome="refused", counterparty=env.source)
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
        answer = as_stored(rec)
        before, _ = self.store.record_answer(
            env.correlation_id,
            answer,
            now_ms(),
            answer_id=env.message_id,
            answer_type=env.message_type,
            delivered=True,
        )
        to = pending.target
        if before == PENDING:
            outcome = "error" if isinstance(message, ErrorReport) else "ok"
            self.metrics.inc("xsettle_answers_total", outcome=outcome, counterparty=to)
            await self._deliver(pending, message)
        elif before == EXPIRED:
            bound.info("late_answer")
            self.metrics.inc("xsettle_answers_total", outcome="late", counterparty=to)
            await self._deliver(pending, message, late=True)
        else:
            bound.info("duplicate_answer_ignored", state=before)
            self.metrics.inc("xsettle_answers_total", outcome="duplicate", counterparty=to)

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
            self.metrics.inc(
                "xsettle_acknowledgements_total", outcome="refused", counterparty=env.source
            )
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
        self.metrics.inc("xsettle_acknowledgements_total", outcome="ok", counterparty=env.source)
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
            self.metrics.observe(
                "xsettle_answer_latency_seconds", latency, family=family, counterparty=answer.target
            )
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

    # --- deadlines --------------------------------------------------------------------------
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
                self.metrics.inc("xsettle_deadline_failures_total", counterparty=pending.target)
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
                    self.metrics.inc(
                        "xsettle_unacknowledged_resends_total", counterparty=pending.target
                    )
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
        self.metrics.inc("xsettle_answers_total", outcome="deadline", counterparty=pending.target)

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
