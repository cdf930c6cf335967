"""Durable state of a province node: the outbox, requests waiting for an answer, and
messages processed with the answer that was sent for them.

The store is a small Protocol so that a shared database (PostgreSQL) can replace the embedded
default, the province's SQLite file (:mod:`bus.db`). Every write happens inside a *step*, the
one transaction in which the back office's state changes too; records that must leave are
rows of the outbox written by that same step and sent by :mod:`bus.outbox` after it commits.
State is bounded: finished entries are pruned after a retention period.

Pending states: ``pending`` (sent, waiting) → ``delivered`` (the answer and the caller's
handling of it committed in one step); ``pending`` → ``answered`` (answer stored, the
caller failed on it: handed to it again at the next start) → ``delivered``; ``pending`` →
``expired`` (deadline passed, reported and handled in one step) → ``late`` (an answer came
after all).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bus.audit import AuditLog, SqlAuditLog
from bus.db import Cursor, Database, Step, dump_headers, load_headers, open_database
from bus.errors import StoreError
from bus.transport import Headers

PENDING = "pending"
ANSWERED = "answered"
DELIVERED = "delivered"
EXPIRED = "expired"
LATE = "late"

OPEN = "open"
"""An obligation: a request accepted, its one terminal answer not yet sent."""
ANSWERED_OBLIGATION = "answered"
"""An obligation whose answer was sent (stored, re-sent on redelivery)."""


@dataclass(frozen=True, slots=True)
class OutRecord:
    """A record exactly as produced, kept so it can be sent again byte for byte."""

    topic: str
    """Destination topic."""
    key: bytes | None
    """Record key."""
    value: bytes
    """Encoded value."""
    headers: Headers
    """Headers as sent."""


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """A request this node sent and its state."""

    message_id: str
    """``xs-message-id`` of the request."""
    message_type: str
    """Full Avro name of the request."""
    target: str
    """Province that owes the answer."""
    record: OutRecord
    """The request as sent (for re-sends)."""
    attempt: int
    """Attempts sent so far."""
    sent_at_ms: int
    """First send, epoch milliseconds."""
    deadline_ms: int
    """Answer due by, epoch milliseconds."""
    state: str
    """One of pending, answered, delivered, expired, late."""
    answer: OutRecord | None = None
    """The answer, once one came."""
    answered_at_ms: int | None = None
    """When the answer came."""
    acknowledged_at_ms: int | None = None
    """When the target's first RequestAcknowledgement came (None: not acknowledged)."""
    ack_state: str | None = None
    """The latest acknowledgement's state (``RECEIVED``, ``ACCEPTED_FOR_REVIEW``)."""
    expected_by_ms: int | None = None
    """When the answer is expected, by the latest acknowledgement."""
    ack_note: str | None = None
    """The latest acknowledgement's note."""
    last_sent_ms: int | None = None
    """When the request was last sent (the first send or the latest re-send)."""


@dataclass(frozen=True, slots=True)
class Obligation:
    """A request this node accepted and owes one terminal answer to (a deferred answer)."""

    request_id: str
    """``xs-message-id`` of the request."""
    request_type: str
    """Full Avro name of the request."""
    source: str
    """Province that asked and is owed the answer."""
    key: bytes | None
    """Record key of the request (the answer keeps it)."""
    deadline_ms: int
    """The request's ``xs-deadline``."""
    accepted_at_ms: int
    """When it was accepted."""
    state: str
    """``open`` or ``answered``."""
    answer: OutRecord | None = None
    """The answer sent, once answered."""
    answered_at_ms: int | None = None
    """When it was answered."""
    expected_by_ms: int | None = None
    """When we told the requester to expect the answer (None: by the deadline)."""
    ack_state: str | None = None
    """The state we acknowledged the request with."""
    note: str = ""
    """Why the answer waits (sent in the acknowledgement)."""


@dataclass(frozen=True, slots=True)
class Processed:
    """A received message that was handled."""

    answer: OutRecord | None
    """The answer sent for it (to be sent again on redelivery), if any."""


class Store(Protocol):
    """Durable state of one province node: steps (transactions), the outbox, pending
    requests and processed messages. Every method must be called inside a step of
    :meth:`step` when it writes (the node does so); reads work anywhere."""

    audit: AuditLog
    """The signed message log, in the same database (appended inside steps)."""

    def step(self) -> AbstractAsyncContextManager[Step]:
        """One transaction over the bus's and the back office's state (see :mod:`bus.db`)."""

    def current(self) -> Step | None:
        """The step the running task is inside, or None."""

    def add_outbox(self, record: OutRecord) -> int:
        """Queue a record to be sent once the running step commits; returns its row id."""

    def outbox(self, limit: int, after_id: int = 0) -> list[tuple[int, OutRecord]]:
        """This instance's queued records not yet acknowledged by the broker, oldest first,
        from row ``after_id`` on."""

    def outbox_owners(self) -> list[str]:
        """The other instances that have rows in the outbox (see :meth:`adopt_outbox`)."""

    def adopt_outbox(self, owner: str) -> list[tuple[int, OutRecord]]:
        """Make the rows of ``owner`` (an instance that is no longer alive) this instance's,
        and return them, oldest first: they are sent again by this instance's relay."""

    def alive(self, instance: str) -> bool:
        """Whether the instance ``instance`` sharing this store is running."""

    def outbox_sent(self, ids: Sequence[int]) -> None:
        """The broker acknowledged these rows: remove them."""

    def outbox_size(self) -> int:
        """How many records wait in the outbox."""

    def outbox_replace(self, row_id: int, record: OutRecord) -> None:
        """Store the record as it is sent again (its new ``xs-attempt``)."""

    def add_pending(self, request: PendingRequest) -> None:
        """Record a request (in the step that queues it)."""

    def get_pending(self, message_id: str, *, lock: bool = False) -> PendingRequest | None:
        """The request with this id, in any state; ``lock``: its row is held until the step
        ends (another instance acting on it waits)."""

    def record_answer(
        self,
        message_id: str,
        answer: OutRecord,
        at_ms: int,
        *,
        answer_id: str,
        answer_type: str,
        delivered: bool,
    ) -> tuple[str | None, PendingRequest | None]:
        """Store an answer to request ``message_id`` and mark the answer record ``answer_id``
        processed; return (state before, the request) — (None, None) for an id nobody sent.

        ``pending`` → ``delivered`` (or ``answered`` when the caller could not be given it
        yet: ``delivered=False``); ``expired`` → ``late``; other states stay.
        """

    def mark_delivered(self, message_id: str) -> bool:
        """The caller has been given a stored answer (``answered`` → ``delivered``); False
        when another instance delivered it first."""

    def mark_expired(self, message_id: str) -> bool:
        """``pending`` → ``expired``; False if the request was no longer pending."""

    def undelivered(self) -> list[PendingRequest]:
        """Answers stored but not yet handed to the caller (after a crash)."""

    def due(self, now_ms: int, limit: int) -> list[PendingRequest]:
        """Up to ``limit`` pending requests whose deadline has passed, oldest first."""

    def bump_attempt(self, message_id: str, record: OutRecord, at_ms: int = 0) -> None:
        """Record a re-send: the new record as sent, attempt + 1, sent at ``at_ms``."""

    def record_ack(
        self, message_id: str, at_ms: int, state: str, expected_by_ms: int | None, note: str
    ) -> bool:
        """Store an acknowledgement of request ``message_id`` (the first one's time is kept);
        False when the request is unknown."""

    def unacknowledged(
        self, sent_before_ms: int, now_ms: int, max_attempts: int, limit: int
    ) -> list[PendingRequest]:
        """Pending requests neither answered nor acknowledged, last sent before
        ``sent_before_ms``, deadline still ahead, sent fewer than ``max_attempts`` times."""

    def pending_requests(self, limit: int) -> list[PendingRequest]:
        """Requests still waiting, oldest deadline first."""

    def count(self, state: str = PENDING) -> int:
        """How many requests are in ``state``."""

    def pending_by_target(self, now_ms: int) -> dict[str, tuple[int, int, int]]:
        """Requests still waiting, by the province asked: (how many, how many past their
        deadline at ``now_ms``, first send of the oldest in ms). One query, for the metrics."""

    def processed(self, message_id: str) -> Processed | None:
        """How a received message was handled, or None if it never was."""

    def mark_processed(
        self, message_id: str, message_type: str, answer: OutRecord | None, at_ms: int
    ) -> None:
        """Record that a received message was handled, with the answer sent for it.
        :class:`StoreError` (retriable) when it was marked meanwhile (by another instance,
        during a rebalance): the step rolls back and the retry finds it processed."""

    def add_obligation(self, obligation: Obligation) -> None:
        """Record an accepted request whose answer is deferred."""

    def get_obligation(self, request_id: str, *, lock: bool = False) -> Obligation | None:
        """The obligation for this request, open or answered (``lock``: held until the step
        ends)."""

    def settle_obligation(self, request_id: str, answer: OutRecord, at_ms: int) -> None:
        """Store the terminal answer of an open obligation (``open`` → ``answered``) and make
        it the request's stored answer, re-sent if the request comes again."""

    def obligations(self, state: str, limit: int) -> list[Obligation]:
        """Obligations in ``state``, the earliest deadline first."""

    def count_obligations(self, state: str = OPEN) -> int:
        """How many obligations are in ``state``."""

    def prune(self, before_ms: int) -> int:
        """Delete finished entries older than ``before_ms``; return how many."""

    def close(self) -> None:
        """Release the store."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    message_id TEXT PRIMARY KEY,
    message_type TEXT NOT NULL,
    target TEXT NOT NULL,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    headers BLOB NOT NULL,
    attempt INTEGER NOT NULL,
    sent_at_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    answer_topic TEXT,
    answer_key BLOB,
    answer_value BLOB,
    answer_headers BLOB,
    answered_at_ms INTEGER
);
CREATE INDEX IF NOT EXISTS pending_due ON pending (state, deadline_ms);
CREATE TABLE IF NOT EXISTS processed (
    message_id TEXT PRIMARY KEY,
    message_type TEXT NOT NULL,
    answer_topic TEXT,
    answer_key BLOB,
    answer_value BLOB,
    answer_headers BLOB,
    processed_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS processed_age ON processed (processed_at_ms);
CREATE TABLE IF NOT EXISTS obligations (
    request_id TEXT PRIMARY KEY,
    request_type TEXT NOT NULL,
    source TEXT NOT NULL,
    key BLOB,
    deadline_ms INTEGER NOT NULL,
    accepted_at_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    answer_topic TEXT,
    answer_key BLOB,
    answer_value BLOB,
    answer_headers BLOB,
    answered_at_ms INTEGER
);
CREATE INDEX IF NOT EXISTS obligations_due ON obligations (state, deadline_ms);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    headers BLOB NOT NULL
);
"""

_OUTBOX_OWNER_INDEX = "CREATE INDEX IF NOT EXISTS outbox_owner ON outbox (owner, id);"
"""The instance each outbox row waits for (its relay sends it; if the instance dies, another
adopts the row)."""

_PENDING_COLUMNS = (
    "message_id, message_type, target, topic, key, value, headers, attempt, sent_at_ms, "
    "deadline_ms, state, answer_topic, answer_key, answer_value, answer_headers, answered_at_ms, "
    "acked_at_ms, ack_state, expected_by_ms, ack_note, last_sent_ms"
)

_ADDED_COLUMNS: dict[str, dict[str, str]] = {
    "pending": {
        "acked_at_ms": "INTEGER",
        "ack_state": "TEXT",
        "expected_by_ms": "INTEGER",
        "ack_note": "TEXT",
        "last_sent_ms": "INTEGER",
    },
    "obligations": {"expected_by_ms": "INTEGER", "ack_state": "TEXT", "note": "TEXT"},
    "outbox": {"owner": "TEXT"},
}
"""Columns added after a table was first created (contract v1.2): added to an older file at
open, so a province's state folder keeps working across versions."""


def _row_to_pending(row: tuple[Any, ...]) -> PendingRequest:
    (mid, mtype, target, topic, key, value, headers, attempt, sent, deadline, state,
     a_topic, a_key, a_value, a_headers, a_at, acked_at, ack_state, expected_by, ack_note,
     last_sent) = row  # fmt: skip
    answer = None
    if a_topic is not None:
        answer = OutRecord(str(a_topic), _b(a_key), bytes(a_value), load_headers(bytes(a_headers)))
    return PendingRequest(
        message_id=str(mid),
        message_type=str(mtype),
        target=str(target),
        record=OutRecord(str(topic), _b(key), bytes(value), load_headers(bytes(headers))),
        attempt=int(attempt),
        sent_at_ms=int(sent),
        deadline_ms=int(deadline),
        state=str(state),
        answer=answer,
        answered_at_ms=int(a_at) if a_at is not None else None,
        acknowledged_at_ms=int(acked_at) if acked_at is not None else None,
        ack_state=ack_state,
        expected_by_ms=int(expected_by) if expected_by is not None else None,
        ack_note=ack_note,
        last_sent_ms=int(last_sent) if last_sent is not None else int(sent),
    )


_OBLIGATION_COLUMNS = (
    "request_id, request_type, source, key, deadline_ms, accepted_at_ms, state, answer_topic, "
    "answer_key, answer_value, answer_headers, answered_at_ms, expected_by_ms, ack_state, note"
)


def _row_to_obligation(row: tuple[Any, ...]) -> Obligation:
    (rid, rtype, source, key, deadline, accepted, state,
     a_topic, a_key, a_value, a_headers, a_at, expected_by, ack_state, note) = row  # fmt: skip
    answer = None
    if a_topic is not None:
        answer = OutRecord(str(a_topic), _b(a_key), bytes(a_value), load_headers(bytes(a_headers)))
    return Obligation(
        request_id=str(rid),
        request_type=str(rtype),
        source=str(source),
        key=_b(key),
        deadline_ms=int(deadline),
        accepted_at_ms=int(accepted),
        state=str(state),
        answer=answer,
        answered_at_ms=int(a_at) if a_at is not None else None,
        expected_by_ms=int(expected_by) if expected_by is not None else None,
        ack_state=ack_state,
        note=note or "",
    )


def _b(value: Any) -> bytes | None:
    return bytes(value) if value is not None else None


def _out(topic: Any, key: Any, value: Any, headers: Any) -> OutRecord:
    return OutRecord(str(topic), _b(key), bytes(value), load_headers(bytes(headers)))


def _insert_processed(
    cur: Cursor, message_id: str, message_type: str, answer: OutRecord | None, at_ms: int
) -> None:
    """Mark a message processed, once: a mark already there means another instance handled
    it meanwhile (two owners of one partition during a rebalance), and the step must not
    commit a second handling."""
    cur.execute(
        "INSERT INTO processed VALUES (?,?,?,?,?,?,?) ON CONFLICT (message_id) DO NOTHING",
        (
            message_id,
            message_type,
            answer.topic if answer else None,
            answer.key if answer else None,
            answer.value if answer else None,
            dump_headers(answer.headers) if answer else None,
            at_ms,
        ),
    )
    if cur.rowcount == 0:
        raise StoreError(f"message {message_id} was processed meanwhile (by another instance)")


class SqlStore:
    """The :class:`Store`: the bus's tables in the province's database (:class:`Database`:
    the SQLite file, or PostgreSQL shared by the province's instances), which the back office
    shares so one step covers both."""

    def __init__(self, db: Database | Path | str) -> None:
        self.db = db if isinstance(db, Database) else open_database(db)
        self.path = self.db.path
        self.db.migrate("store/1", _SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            self.db.add_columns(table, columns)
        self.db.migrate("store/2-outbox-owner", _OUTBOX_OWNER_INDEX)
        self.audit: AuditLog = SqlAuditLog(self.db)

    def step(self) -> AbstractAsyncContextManager[Step]:
        return self.db.step()

    def current(self) -> Step | None:
        return self.db.current()

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        return self.db.query(sql, args)

    # --- outbox ---------------------------------------------------------------------------
    def add_outbox(self, record: OutRecord) -> int:
        with self.db.write() as cur:
            row = cur.execute(
                "INSERT INTO outbox (topic, key, value, headers, owner) VALUES (?,?,?,?,?) "
                "RETURNING id",
                (record.topic, record.key, record.value, dump_headers(record.headers),
                 self.db.instance_id),
            ).fetchone()  # fmt: skip
        return int(row[0])

    def outbox(self, limit: int, after_id: int = 0) -> list[tuple[int, OutRecord]]:
        # Rows without an owner were written before instances had names: this one's.
        rows = self._query(
            "SELECT id, topic, key, value, headers FROM outbox WHERE id > ? "
            "AND (owner = ? OR owner IS NULL) ORDER BY id LIMIT ?",
            (after_id, self.db.instance_id, limit),
        )
        return [(int(i), _out(t, k, v, h)) for i, t, k, v, h in rows]

    def outbox_owners(self) -> list[str]:
        rows = self._query(
            "SELECT DISTINCT owner FROM outbox WHERE owner IS NOT NULL AND owner <> ?",
            (self.db.instance_id,),
        )
        return sorted(str(r[0]) for r in rows)

    def adopt_outbox(self, owner: str) -> list[tuple[int, OutRecord]]:
        # One UPDATE: of two instances adopting at once, each row goes to one of them.
        with self.db.write() as cur:
            rows = cur.execute(
                "UPDATE outbox SET owner = ? WHERE owner = ? "
                "RETURNING id, topic, key, value, headers",
                (self.db.instance_id, owner),
            ).fetchall()
        return sorted((int(i), _out(t, k, v, h)) for i, t, k, v, h in rows)

    def alive(self, instance: str) -> bool:
        return self.db.alive(instance)

    def outbox_sent(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self.db.write() as cur:
            cur.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def outbox_size(self) -> int:
        return int(self._query("SELECT count(*) FROM outbox")[0][0])

    def outbox_replace(self, row_id: int, record: OutRecord) -> None:
        with self.db.write() as cur:
            cur.execute(
                "UPDATE outbox SET headers = ? WHERE id = ?",
                (dump_headers(record.headers), row_id),
            )

    # --- pending requests -----------------------------------------------------------------
    def add_pending(self, request: PendingRequest) -> None:
        r = request.record
        with self.db.write() as cur:
            cur.execute(
                f"INSERT INTO pending ({_PENDING_COLUMNS}) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,?) "
                "ON CONFLICT (message_id) DO NOTHING",
                (request.message_id, request.message_type, request.target, r.topic, r.key,
                 r.value, dump_headers(r.headers), request.attempt, request.sent_at_ms,
                 request.deadline_ms, request.state, request.sent_at_ms),
            )  # fmt: skip

    def get_pending(self, message_id: str, *, lock: bool = False) -> PendingRequest | None:
        rows = self._query(
            f"SELECT {_PENDING_COLUMNS} FROM pending WHERE message_id = ?"
            + (self.db.for_update if lock else ""),
            (message_id,),
        )
        return _row_to_pending(rows[0]) if rows else None

    def record_answer(
        self,
        message_id: str,
        answer: OutRecord,
        at_ms: int,
        *,
        answer_id: str,
        answer_type: str,
        delivered: bool,
    ) -> tuple[str | None, PendingRequest | None]:
        with self.db.write() as cur:
            _insert_processed(cur, answer_id, answer_type, None, at_ms)
            row = cur.execute(
                f"SELECT {_PENDING_COLUMNS} FROM pending WHERE message_id = ?" + self.db.for_update,
                (message_id,),
            ).fetchone()
            if row is None:
                return None, None
            request = _row_to_pending(row)
            new = {PENDING: DELIVERED if delivered else ANSWERED, EXPIRED: LATE}.get(request.state)
            if new is not None:
                cur.execute(
                    "UPDATE pending SET state = ?, answer_topic = ?, answer_key = ?, "
                    "answer_value = ?, answer_headers = ?, answered_at_ms = ? "
                    "WHERE message_id = ?",
                    (new, answer.topic, answer.key, answer.value,
                     dump_headers(answer.headers), at_ms, message_id),
                )  # fmt: skip
            return request.state, request

    def mark_delivered(self, message_id: str) -> bool:
        with self.db.write() as cur:
            changed = cur.execute(
                "UPDATE pending SET state = ? WHERE message_id = ? AND state = ?",
                (DELIVERED, message_id, ANSWERED),
            ).rowcount
        return bool(changed)

    def mark_expired(self, message_id: str) -> bool:
        with self.db.write() as cur:
            changed = cur.execute(
                "UPDATE pending SET state = ? WHERE message_id = ? AND state = ?",
                (EXPIRED, message_id, PENDING),
            ).rowcount
        return bool(changed)

    def undelivered(self) -> list[PendingRequest]:
        rows = self._query(
            f"SELECT {_PENDING_COLUMNS} FROM pending WHERE state = ? ORDER BY deadline_ms",
            (ANSWERED,),
        )
        return [_row_to_pending(r) for r in rows]

    def due(self, now_ms: int, limit: int) -> list[PendingRequest]:
        rows = self._query(
            f"SELECT {_PENDING_COLUMNS} FROM pending WHERE state = ? AND deadline_ms <= ? "
            "ORDER BY deadline_ms LIMIT ?",
            (PENDING, now_ms, limit),
        )
        return [_row_to_pending(r) for r in rows]

    def bump_attempt(self, message_id: str, record: OutRecord, at_ms: int = 0) -> None:
        with self.db.write() as cur:
            cur.execute(
                "UPDATE pending SET attempt = attempt + 1, headers = ?, "
                "last_sent_ms = COALESCE(NULLIF(?, 0), last_sent_ms) WHERE message_id = ?",
                (dump_headers(record.headers), at_ms, message_id),
            )

    def record_ack(
        self, message_id: str, at_ms: int, state: str, expected_by_ms: int | None, note: str
    ) -> bool:
        with self.db.write() as cur:
            done = cur.execute(
                "UPDATE pending SET acked_at_ms = COALESCE(acked_at_ms, ?), ack_state = ?, "
                "expected_by_ms = ?, ack_note = ? WHERE message_id = ?",
                (at_ms, state, expected_by_ms, note, message_id),
            ).rowcount
        return bool(done)

    def unacknowledged(
        self, sent_before_ms: int, now_ms: int, max_attempts: int, limit: int
    ) -> list[PendingRequest]:
        rows = self._query(
            f"SELECT {_PENDING_COLUMNS} FROM pending WHERE state = ? AND acked_at_ms IS NULL "
            "AND COALESCE(last_sent_ms, sent_at_ms) < ? AND deadline_ms > ? AND attempt < ? "
            "ORDER BY deadline_ms LIMIT ?",
            (PENDING, sent_before_ms, now_ms, max_attempts, limit),
        )
        return [_row_to_pending(r) for r in rows]

    def pending_requests(self, limit: int) -> list[PendingRequest]:
        rows = self._query(
            f"SELECT {_PENDING_COLUMNS} FROM pending WHERE state = ? ORDER BY deadline_ms LIMIT ?",
            (PENDING, limit),
        )
        return [_row_to_pending(r) for r in rows]

    def count(self, state: str = PENDING) -> int:
        rows = self._query("SELECT count(*) FROM pending WHERE state = ?", (state,))
        return int(rows[0][0])

    def pending_by_target(self, now_ms: int) -> dict[str, tuple[int, int, int]]:
        rows = self._query(
            "SELECT target, count(*), sum(CASE WHEN deadline_ms <= ? THEN 1 ELSE 0 END), "
            "min(sent_at_ms) FROM pending WHERE state = ? GROUP BY target",
            (now_ms, PENDING),
        )
        return {str(t): (int(n), int(late), int(oldest)) for t, n, late, oldest in rows}

    # --- processed messages -----------------------------------------------------------------
    def processed(self, message_id: str) -> Processed | None:
        rows = self._query(
            "SELECT answer_topic, answer_key, answer_value, answer_headers FROM processed "
            "WHERE message_id = ?",
            (message_id,),
        )
        if not rows:
            return None
        topic, key, value, headers = rows[0]
        if topic is None:
            return Processed(None)
        return Processed(OutRecord(str(topic), _b(key), bytes(value), load_headers(bytes(headers))))

    def mark_processed(
        self, message_id: str, message_type: str, answer: OutRecord | None, at_ms: int
    ) -> None:
        with self.db.write() as cur:
            _insert_processed(cur, message_id, message_type, answer, at_ms)

    # --- obligations (deferred answers) ------------------------------------------------------
    def add_obligation(self, obligation: Obligation) -> None:
        o = obligation
        with self.db.write() as cur:
            cur.execute(
                "INSERT INTO obligations (request_id, request_type, source, key, "
                "deadline_ms, accepted_at_ms, state, expected_by_ms, ack_state, note) "
                "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (request_id) DO NOTHING",
                (o.request_id, o.request_type, o.source, o.key, o.deadline_ms,
                 o.accepted_at_ms, o.state, o.expected_by_ms, o.ack_state, o.note),
            )  # fmt: skip

    def get_obligation(self, request_id: str, *, lock: bool = False) -> Obligation | None:
        rows = self._query(
            f"SELECT {_OBLIGATION_COLUMNS} FROM obligations WHERE request_id = ?"
            + (self.db.for_update if lock else ""),
            (request_id,),
        )
        return _row_to_obligation(rows[0]) if rows else None

    def settle_obligation(self, request_id: str, answer: OutRecord, at_ms: int) -> None:
        headers = dump_headers(answer.headers)
        with self.db.write() as cur:
            cur.execute(
                "UPDATE obligations SET state = ?, answer_topic = ?, answer_key = ?, "
                "answer_value = ?, answer_headers = ?, answered_at_ms = ? "
                "WHERE request_id = ? AND state = ?",
                (ANSWERED_OBLIGATION, answer.topic, answer.key, answer.value, headers, at_ms,
                 request_id, OPEN),
            )  # fmt: skip
            cur.execute(
                "UPDATE processed SET answer_topic = ?, answer_key = ?, answer_value = ?, "
                "answer_headers = ? WHERE message_id = ?",
                (answer.topic, answer.key, answer.value, headers, request_id),
            )

    def obligations(self, state: str, limit: int) -> list[Obligation]:
        rows = self._query(
            f"SELECT {_OBLIGATION_COLUMNS} FROM obligations WHERE state = ? "
            "ORDER BY deadline_ms LIMIT ?",
            (state, limit),
        )
        return [_row_to_obligation(r) for r in rows]

    def count_obligations(self, state: str = OPEN) -> int:
        return int(self._query("SELECT count(*) FROM obligations WHERE state = ?", (state,))[0][0])

    def prune(self, before_ms: int) -> int:
        with self.db.write() as cur:
            a = cur.execute(
                "DELETE FROM pending WHERE state IN (?, ?, ?) AND COALESCE(answered_at_ms, "
                "deadline_ms) < ?",
                (DELIVERED, LATE, EXPIRED, before_ms),
            ).rowcount
            b = cur.execute(
                "DELETE FROM processed WHERE processed_at_ms < ?", (before_ms,)
            ).rowcount
            c = cur.execute(
                "DELETE FROM obligations WHERE state = ? AND answered_at_ms < ?",
                (ANSWERED_OBLIGATION, before_ms),
            ).rowcount
        return int(a) + int(b) + int(c)

    def close(self) -> None:
        self.db.close()
