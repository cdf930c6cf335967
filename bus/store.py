"""Durable state of a province node: requests waiting for an answer, and messages processed
with the answer that was sent for them.

The store is a small Protocol so that a shared database can replace the embedded default, a
local SQLite file (write-ahead log; a process crash loses no committed row). State is bounded:
finished entries are pruned after a retention period.

Pending states: ``pending`` (sent, waiting) → ``answered`` (answer stored, not yet handed to
the caller) → ``delivered``; or ``pending`` → ``expiring`` (deadline passed, caller not
yet told) → ``expired`` → ``late`` (an answer came after all). ``answered`` and
``expiring`` rows are handed to the caller again after a crash.
"""

from __future__ import annotations

import asyncio
import sqlite3
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bus.errors import StoreError
from bus.transport import Headers

PENDING = "pending"
ANSWERED = "answered"
DELIVERED = "delivered"
EXPIRING = "expiring"
EXPIRED = "expired"
LATE = "late"


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


@dataclass(frozen=True, slots=True)
class Processed:
    """A received message that was handled."""

    answer: OutRecord | None
    """The answer sent for it (to be sent again on redelivery), if any."""


class Store(Protocol):
    """Durable pending requests and processed messages of one province node."""

    def add_pending(self, request: PendingRequest) -> None:
        """Record a request before it is sent."""

    def get_pending(self, message_id: str) -> PendingRequest | None:
        """The request with this id, in any state."""

    def record_answer(
        self, message_id: str, answer: OutRecord, at_ms: int, *, answer_id: str, answer_type: str
    ) -> tuple[str | None, PendingRequest | None]:
        """Store an answer to request ``message_id`` and mark the answer record ``answer_id``
        processed, in one transaction; return (state before, the request) — (None, None)
        for an id nobody sent.

        ``pending`` → ``answered``; ``expiring``/``expired`` → ``late``; other states stay.
        """

    def mark_delivered(self, message_id: str) -> None:
        """The caller has been given the answer (``answered`` → ``delivered``) or the
        deadline report (``expiring`` → ``expired``)."""

    def undelivered(self) -> list[PendingRequest]:
        """Answers and deadline reports not yet handed to the caller (after a crash)."""

    def expire_due(self, now_ms: int, limit: int) -> list[PendingRequest]:
        """Move up to ``limit`` overdue pending requests to ``expiring`` and return them."""

    def bump_attempt(self, message_id: str, record: OutRecord) -> None:
        """Record a re-send: the new record as sent, attempt + 1."""

    def pending_requests(self, limit: int) -> list[PendingRequest]:
        """Requests still waiting, oldest deadline first."""

    def count(self, state: str = PENDING) -> int:
        """How many requests are in ``state``."""

    def processed(self, message_id: str) -> Processed | None:
        """How a received message was handled, or None if it never was."""

    def mark_processed(
        self, message_id: str, message_type: str, answer: OutRecord | None, at_ms: int
    ) -> None:
        """Record that a received message was handled, with the answer sent for it."""

    def prune(self, before_ms: int) -> int:
        """Delete finished entries older than ``before_ms``; return how many."""

    async def sync(self) -> None:
        """Make every operation so far durable (operations are atomic at once, durable
        after the next sync; concurrent callers may share one commit)."""

    def close(self) -> None:
        """Make everything durable and release the store."""


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
"""

_PENDING_COLUMNS = (
    "message_id, message_type, target, topic, key, value, headers, attempt, sent_at_ms, "
    "deadline_ms, state, answer_topic, answer_key, answer_value, answer_headers, answered_at_ms"
)


_LEN = struct.Struct(">HI")
"""Header blob framing: key length (2 bytes), value length (4 bytes), then both."""


def _dump_headers(headers: Headers) -> bytes:
    """Headers as one blob (cheaper than JSON and byte-exact)."""
    out = bytearray()
    for k, v in headers:
        kb = k.encode("utf-8")
        out += _LEN.pack(len(kb), len(v)) + kb + v
    return bytes(out)


def _load_headers(blob: bytes) -> Headers:
    pairs = []
    pos = 0
    while pos < len(blob):
        klen, vlen = _LEN.unpack_from(blob, pos)
        pos += _LEN.size
        key = blob[pos : pos + klen].decode("utf-8")
        pos += klen
        pairs.append((key, bytes(blob[pos : pos + vlen])))
        pos += vlen
    return tuple(pairs)


def _row_to_pending(row: tuple[Any, ...]) -> PendingRequest:
    (mid, mtype, target, topic, key, value, headers, attempt, sent, deadline, state,
     a_topic, a_key, a_value, a_headers, a_at) = row  # fmt: skip
    answer = None
    if a_topic is not None:
        answer = OutRecord(str(a_topic), _b(a_key), bytes(a_value), _load_headers(bytes(a_headers)))
    return PendingRequest(
        message_id=str(mid),
        message_type=str(mtype),
        target=str(target),
        record=OutRecord(str(topic), _b(key), bytes(value), _load_headers(bytes(headers))),
        attempt=int(attempt),
        sent_at_ms=int(sent),
        deadline_ms=int(deadline),
        state=str(state),
        answer=answer,
        answered_at_ms=int(a_at) if a_at is not None else None,
    )


def _b(value: Any) -> bytes | None:
    return bytes(value) if value is not None else None


class SqliteStore:
    """The embedded default :class:`Store`: one SQLite file per province node.

    Write-ahead logging with ``synchronous=NORMAL``: a committed row survives a process
    crash (the case the bus guards against); only a power loss can drop the newest commits.
    Operations are short and synchronous, each atomic (a savepoint); they become durable at
    :meth:`sync`, which commits once for everything written in the same event-loop turn.
    The node syncs before anything leaves that depends on the state: a request before it is
    sent, an answer before it is sent, and every Kafka offset commit.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
        self._lock = threading.RLock()
        self._pending_commit: asyncio.Future[None] | None = None
        self._closed = False

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        """One operation: a savepoint inside the shared open transaction (group commit).

        The operation is atomic; it becomes durable at the next :meth:`sync`.
        """
        with self._lock:
            cur = self._db.cursor()
            try:
                if not self._db.in_transaction:
                    cur.execute("BEGIN")  # one connection per node: no writer to race
                cur.execute("SAVEPOINT op")
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from exc
            try:
                yield cur
                cur.execute("RELEASE op")
            except BaseException as exc:
                cur.execute("ROLLBACK TO op")
                cur.execute("RELEASE op")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"store {self.path}: {exc}") from exc
                raise

    def commit(self) -> None:
        """Make every operation so far durable now."""
        with self._lock:
            if self._db.in_transaction:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.Error as exc:
                    raise StoreError(f"store {self.path}: commit failed: {exc}") from exc

    async def sync(self) -> None:
        """Make every operation so far durable. Callers in the same event-loop turn share
        one commit (group commit): that is what lets the bus commit once per batch
        instead of once per message."""
        if not self._db.in_transaction:
            return
        if self._pending_commit is None:
            loop = asyncio.get_running_loop()
            self._pending_commit = loop.create_future()
            loop.call_soon(self._commit_soon)
        await asyncio.shield(self._pending_commit)

    def _commit_soon(self) -> None:
        fut, self._pending_commit = self._pending_commit, None
        assert fut is not None
        try:
            self.commit()
        except StoreError as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(None)

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from exc

    def add_pending(self, request: PendingRequest) -> None:
        r = request.record
        with self._tx() as cur:
            cur.execute(
                f"INSERT OR IGNORE INTO pending ({_PENDING_COLUMNS}) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,NULL,NULL,NULL,NULL,NULL)",
                (request.message_id, request.message_type, request.target, r.topic, r.key,
                 r.value, _dump_headers(r.headers), request.attempt, request.sent_at_ms,
                 request.deadline_ms, request.state),
            )  # fmt: skip

    def get_pending(self, message_id: str) -> PendingRequest | None:
        rows = self._query(
            f"SELECT {_PENDING_COLUMNS} FROM pending WHERE message_id = ?", (message_id,)
        )
        return _row_to_pending(rows[0]) if rows else None

    def record_answer(
        self, message_id: str, answer: OutRecord, at_ms: int, *, answer_id: str, answer_type: str
    ) -> tuple[str | None, PendingRequest | None]:
        with self._tx() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO processed VALUES (?,?,NULL,NULL,NULL,NULL,?)",
                (answer_id, answer_type, at_ms),
            )
            row = cur.execute(
                f"SELECT {_PENDING_COLUMNS} FROM pending WHERE message_id = ?", (message_id,)
            ).fetchone()
            if row is None:
                return None, None
            request = _row_to_pending(row)
            new = {PENDING: ANSWERED, EXPIRING: LATE, EXPIRED: LATE}.get(request.state)
            if new is not None:
                cur.execute(
                    "UPDATE pending SET state = ?, answer_topic = ?, answer_key = ?, "
                    "answer_value = ?, answer_headers = ?, answered_at_ms = ? "
                    "WHERE message_id = ?",
                    (new, answer.topic, answer.key, answer.value,
                     _dump_headers(answer.headers), at_ms, message_id),
                )  # fmt: skip
            return request.state, request

    def mark_delivered(self, message_id: str) -> None:
        with self._tx() as cur:
            cur.execute(
                "UPDATE pending SET state = CASE state WHEN ? THEN ? ELSE ? END "
                "WHERE message_id = ? AND state IN (?, ?)",
                (ANSWERED, DELIVERED, EXPIRED, message_id, ANSWERED, EXPIRING),
            )

    def undelivered(self) -> list[PendingRequest]:
        rows = self._query(
            f"SELECT {_PENDING_COLUMNS} FROM pending WHERE state IN (?, ?) ORDER BY deadline_ms",
            (ANSWERED, EXPIRING),
        )
        return [_row_to_pending(r) for r in rows]

    def expire_due(self, now_ms: int, limit: int) -> list[PendingRequest]:
        with self._tx() as cur:
            rows = cur.execute(
                f"SELECT {_PENDING_COLUMNS} FROM pending WHERE state = ? AND deadline_ms <= ? "
                "ORDER BY deadline_ms LIMIT ?",
                (PENDING, now_ms, limit),
            ).fetchall()
            cur.executemany(
                "UPDATE pending SET state = ? WHERE message_id = ?",
                [(EXPIRING, r[0]) for r in rows],
            )
        return [_row_to_pending(r) for r in rows]

    def bump_attempt(self, message_id: str, record: OutRecord) -> None:
        with self._tx() as cur:
            cur.execute(
                "UPDATE pending SET attempt = attempt + 1, headers = ? WHERE message_id = ?",
                (_dump_headers(record.headers), message_id),
            )

    def pending_requests(self, limit: int) -> list[PendingRequest]:
        rows = self._query(
            f"SELECT {_PENDING_COLUMNS} FROM pending WHERE state = ? ORDER BY deadline_ms LIMIT ?",
            (PENDING, limit),
        )
        return [_row_to_pending(r) for r in rows]

    def count(self, state: str = PENDING) -> int:
        rows = self._query("SELECT count(*) FROM pending WHERE state = ?", (state,))
        return int(rows[0][0])

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
        return Processed(
            OutRecord(str(topic), _b(key), bytes(value), _load_headers(bytes(headers)))
        )

    def mark_processed(
        self, message_id: str, message_type: str, answer: OutRecord | None, at_ms: int
    ) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO processed VALUES (?,?,?,?,?,?,?)",
                (
                    message_id,
                    message_type,
                    answer.topic if answer else None,
                    answer.key if answer else None,
                    answer.value if answer else None,
                    _dump_headers(answer.headers) if answer else None,
                    at_ms,
                ),
            )

    def prune(self, before_ms: int) -> int:
        with self._tx() as cur:
            a = cur.execute(
                "DELETE FROM pending WHERE state IN (?, ?) AND COALESCE(answered_at_ms, "
                "deadline_ms) < ?",
                (DELIVERED, LATE, before_ms),
            ).rowcount
            b = cur.execute(
                "DELETE FROM processed WHERE processed_at_ms < ?", (before_ms,)
            ).rowcount
            c = cur.execute(
                "DELETE FROM pending WHERE state = ? AND deadline_ms < ?", (EXPIRED, before_ms)
            ).rowcount
        return int(a) + int(b) + int(c)

    def close(self) -> None:
        if self._closed:
            return
        self.commit()
        with self._lock:
            self._db.close()
            self._closed = True
