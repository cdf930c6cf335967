"""One SQLite database per province, and the step: the one transaction a unit of work runs in.

A province's business state (the back office) and the bus's own state (processed message
ids, stored answers, pending requests, the outbox) live in one file, so that one transaction
covers them all. Every unit of work — handling a record, an answer, a deadline, a desk action —
runs as a *step*: ``async with db.step() as step:`` opens the transaction, everything written
inside commits together or not at all, and records meant to leave are queued in the outbox
table by the same transaction and only sent after it committed (:mod:`bus.outbox`).

Steps of one database are serialised by an asyncio lock (SQLite has one writer anyway); a step
opened inside another step of the same task joins it. A write outside any step is its own
transaction (enrolling a person from a script, say); one attempted while another task holds a
step open is a programming error and raises :class:`StoreError`.

Write-ahead logging with ``synchronous=NORMAL``: a committed step survives a process crash
(what the bus guards against); only a power loss can drop the newest commits.
"""

from __future__ import annotations

import asyncio
import contextvars
import sqlite3
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bus.errors import StoreError
from bus.transport import Headers


@dataclass(eq=False)
class Step:
    """What one step wrote that must happen after it commits."""

    outbox: list[tuple[int, Any]] = field(default_factory=list)
    """Outbox rows (id, record) written by the step: sent once it committed."""
    on_commit: list[Callable[[], None]] = field(default_factory=list)
    """Callbacks run after the commit (waking a waiter, say); never before."""
    sent: list[Any] = field(default_factory=list)
    """After the commit: one future per outbox row, done when the broker acknowledged it."""


_CURRENT: contextvars.ContextVar[tuple[Database, Step] | None] = contextvars.ContextVar(
    "xsettle_step", default=None
)
"""The database and step the running task is inside, if any."""


class Database:
    """A province's SQLite file: one connection, steps serialised, writes atomic."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {self.path}: {exc}") from exc
        self._lock = threading.RLock()
        self._step_lock: asyncio.Lock | None = None
        self._own_depth = 0  # nesting of a write outside any step (synchronous, one task)
        self._closed = False

    def migrate(self, script: str) -> None:
        """Create tables and indexes (``CREATE ... IF NOT EXISTS`` statements)."""
        with self._lock:
            try:
                self._db.executescript(script)
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot create tables: {exc}") from exc

    def add_columns(self, table: str, columns: dict[str, str]) -> None:
        """Add the columns a table created by an older version lacks (name → SQL type)."""
        with self._lock:
            try:
                have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for name, sql_type in columns.items():
                    if name not in have:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot add columns to {table}: {exc}") from exc

    # --- steps ----------------------------------------------------------------------------
    def current(self) -> Step | None:
        """The step the running task is inside on this database, or None."""
        cur = _CURRENT.get()
        return cur[1] if cur is not None and cur[0] is self else None

    @asynccontextmanager
    async def step(self) -> AsyncIterator[Step]:
        """One transaction: everything written inside commits together, or nothing does.

        Nested inside a step of the same task, it joins that step (a savepoint, so an
        exception inside undoes only the inner part when the caller catches it).
        """
        outer = self.current()
        if outer is not None:
            with self.write():
                yield outer
            return
        if self._step_lock is None:
            self._step_lock = asyncio.Lock()
        async with self._step_lock:
            step = Step()
            token = _CURRENT.set((self, step))
            try:
                self._execute("BEGIN IMMEDIATE")
                try:
                    yield step
                except BaseException:
                    self._rollback()
                    raise
                self._execute("COMMIT")
            finally:
                _CURRENT.reset(token)
        for callback in step.on_commit:
            callback()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Cursor]:
        """An atomic write: a savepoint inside the running step, else its own transaction."""
        with self._lock:
            cur = self._db.cursor()
            if self.current() is not None or self._own_depth:
                self._run(cur, "SAVEPOINT w")
                try:
                    yield cur
                except BaseException as exc:
                    self._run(cur, "ROLLBACK TO w")
                    self._run(cur, "RELEASE w")
                    if isinstance(exc, sqlite3.Error):
                        raise StoreError(f"{self.path}: {exc}") from exc
                    raise
                self._run(cur, "RELEASE w")
                return
            if self._db.in_transaction:
                raise StoreError(
                    f"{self.path}: a write outside a step while another task's step is open"
                )
            self._run(cur, "BEGIN IMMEDIATE")
            self._own_depth += 1
            try:
                yield cur
            except BaseException as exc:
                self._run(cur, "ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"{self.path}: {exc}") from exc
                raise
            finally:
                self._own_depth -= 1
            self._run(cur, "COMMIT")

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read (sees the running step's own writes)."""
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    def _run(self, cur: sqlite3.Cursor, sql: str) -> None:
        try:
            cur.execute(sql)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {sql}: {exc}") from exc

    def _execute(self, sql: str) -> None:
        with self._lock:
            self._run(self._db.cursor(), sql)

    def _rollback(self) -> None:
        with self._lock:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")

    def close(self) -> None:
        """Release the file; harmless twice."""
        if self._closed:
            return
        with self._lock:
            self._rollback()
            self._db.close()
            self._closed = True


_LEN = struct.Struct(">HI")
"""Header blob framing: key length (2 bytes), value length (4 bytes), then both."""


def dump_headers(headers: Headers) -> bytes:
    """Headers as one blob (cheaper than JSON and byte-exact)."""
    out = bytearray()
    for k, v in headers:
        kb = k.encode("utf-8")
        out += _LEN.pack(len(kb), len(v)) + kb + v
    return bytes(out)


def load_headers(blob: bytes) -> Headers:
    """Headers from a :func:`dump_headers` blob."""
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
