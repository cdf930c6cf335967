"""Obligations: requests this node accepted and answers later (deferred answers).

A request's handler that returns :class:`Deferred` (:data:`DEFER`) accepts the request
without answering it: the obligation is stored in the record's step, the partition freed and
a RequestAcknowledgement sent at once; :meth:`Obligations.answer` later sends the one terminal
answer (a reply, or an ErrorReport for a :class:`~bus.errors.Rejection`), from this process
or another sharing the store.

:class:`Obligations` is a mixin over :class:`~bus.node_core.NodeCore` (it needs the step, the
outgoing records and the store), like :mod:`bus.requests`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from bus.constants import ERROR_TEXT_MAX, FAMILY_REPLY, topic
from bus.envelope import SUBJECT_OF, Envelope, now_ms
from bus.errors import Rejection, RoutingError
from bus.models import AckState, ErrorReport, Message, RequestAcknowledgement, Severity, now
from bus.node_core import NodeCore, report
from bus.outbox import family_of_topic
from bus.requests import REPLY_OF_NAME
from bus.store import OPEN, Obligation, OutRecord
from bus.transport import Record


@dataclass(frozen=True, slots=True)
class Deferred:
    """What a request's handler returns to accept the request and answer it later with
    :meth:`Obligations.answer` (a review that takes days): the obligation is stored in the
    record's step, the offset committed and the partition freed at once."""

    note: str = ""
    """Why the answer waits: logged, and sent to the requester in the acknowledgement."""
    expected_by_ms: int | None = None
    """When the answer is expected (epoch milliseconds), told to the requester; None: by the
    request's deadline."""
    state: str = "ACCEPTED_FOR_REVIEW"
    """The acknowledgement's state: ``RECEIVED`` or ``ACCEPTED_FOR_REVIEW``."""


DEFER = Deferred()
"""The plain :class:`Deferred`."""


class Obligations(NodeCore):
    """Answers this node owes (see the module docstring)."""

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
        family = family_of_topic(rec.topic)
        self.metrics.inc("xsettle_answers_deferred_total", family=family, counterparty=env.source)
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
        self.metrics.inc("xsettle_acknowledgements_sent_total", counterparty=env.source)
        return self._out(ack, ack_env, rec.key, topic(FAMILY_REPLY, env.source))

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
