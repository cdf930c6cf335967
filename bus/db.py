"""A province's database, and the step: the one transaction a unit of work runs in.

A province's business state (the back office) and the bus's own state (processed message
ids, stored answers, pending requests, the outbox) live in one database, so that one
transaction covers them all. Every unit of work — handling a record, an answer, a deadline, a
desk action — runs as a *step*: ``async with db.step() as step:`` opens the transaction,
everything written inside commits together or not at all, and records meant to leave are
queued in the outbox table by the same transaction and only sent after it committed
(:mod:`bus.outbox`).

Two implementations share one interface, :class:`Database`:

- :class:`SqliteDatabase`, the embedded default: one file per province, one instance.
- :class:`bus.pg.PostgresDatabase`: a shared PostgreSQL database, for two or more instances
  of one province (``database_url``). Rows a step must not lose to another instance are
  locked (``FOR UPDATE``, :meth:`Database.lock`); see :mod:`bus.pg`.

Steps of one process are serialised by an asyncio lock (SQLite has one writer anyway); a step
opened inside another step of the same task joins it (a savepoint). A write outside any step
is its own transaction (enrolling a person from a script, say).

SQL is written once, in the subset both engines speak (``?`` placeholders, ``ON CONFLICT``,
``RETURNING``); table definitions are SQLite's and translated for PostgreSQL
(:func:`bus.pg.pg_ddl`). Schema changes are named migrations (:meth:`Database.migrate`),
applied at open, once, in code order.
"""

from __future__ import annotations

import asyncio
import contextvars
import sqlite3
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
    connection: Any = None
    """The connection the step's transaction runs on (PostgreSQL; None for SQLite)."""


_CURRENT: contextvars.ContextVar[tuple[Database, Step] | None] = contextvars.ContextVar(
    "xsettle_step", default=None
)
"""The database and step the running task is inside, if any."""


class Cursor(Protocol):
    """What a write sees: the DB-API cursor subset both engines give."""

    @property
    def rowcount(self) -> int:
        """Rows the last statement changed."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any:
        """Run one statement (``?`` placeholders); returns the cursor."""

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> Any:
        """Run one statement per parameter row."""

    def fetchone(self) -> Any:
        """The next row, or None."""

    def fetchall(self) -> list[Any]:
        """The remaining rows."""


MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS xsettle_migrations (
    name TEXT PRIMARY KEY,
    applied_at_ms INTEGER NOT NULL
);
"""
"""Which named migrations a database has had (see :meth:`Database.migrate`)."""


class Database(ABC):
    """A province's database: steps (transactions), writes, reads and migrations."""

    dialect: str
    """``sqlite`` or ``postgresql``."""
    path: str
    """Where it is, for messages (a file path, or a URL without its password)."""
    instance_id: str
    """This process's name among the instances sharing the database (see :meth:`alive`)."""
    for_update: str = ""
    """Suffix of a SELECT that locks the rows it reads until the step ends (PostgreSQL:
    ``FOR UPDATE``; SQLite needs none, its writer is alone)."""

    def current(self) -> Step | None:
        """The step the running task is inside on this database, or None."""
        cur = _CURRENT.get()
        return cur[1] if cur is not None and cur[0] is self else None

    @abstractmethod
    def step(self) -> AbstractAsyncContextManager[Step]:
        """One transaction: ``async with db.step() as step``. Everything written inside
        commits together, or nothing does; nested in a step of the same task, it joins it
        (a savepoint, so an exception inside undoes only the inner part when caught)."""

    @abstractmethod
    def write(self) -> AbstractContextManager[Cursor]:
        """An atomic write: inside the running step, else its own transaction."""

    @abstractmethod
    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read (inside a step: sees the step's own writes)."""

    @abstractmethod
    def migrate(self, name: str, script: str) -> None:
        """Apply the migration ``name`` (table and index definitions in SQLite's words) once,
        in code order; safe when several instances start at once."""

    @abstractmethod
    def add_columns(self, table: str, columns: dict[str, str]) -> None:
        """Add the columns a table created by an older version lacks (name → SQL type)."""

    def lock(self, key: str) -> None:
        """Hold ``key`` until the running step ends: steps of other instances that lock the
        same key wait (PostgreSQL advisory lock). Outside a step, and on SQLite (one writer),
        there is nothing to hold."""
        return

    def json_text(self, column: str, *path: str) -> str:
        """SQL for the text at ``path`` in the JSON document of ``column``."""
        return f"json_extract({column}, '$.{'.'.join(path)}')"

    def json_int(self, column: str, *path: str) -> str:
        """SQL for the integer at ``path`` in the JSON document of ``column``."""
        return self.json_text(column, *path)

    def alive(self, instance_id: str) -> bool:
        """Whether another instance sharing this database is running. SQLite: one instance,
        so any other name is a former life of this one."""
        return instance_id == self.instance_id

    @abstractmethod
    def close(self) -> None:
        """Release it; harmless twice."""


class SqliteDatabase(Database):
    """A province's SQLite file: one connection, steps serialised, writes atomic.

    Write-ahead logging with ``synchronous=NORMAL``: a committed step survives a process crash
    (what the bus guards against); only a power loss can drop the newest commits.
    """

    dialect = "sqlite"
    instance_id = "local"

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
        self._script(MIGRATIONS_TABLE)

    def _script(self, script: str) -> None:
        with self._lock:
            try:
                self._db.executescript(script)
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot create tables: {exc}") from exc

    def migrate(self, name: str, script: str) -> None:
        # Files older than the migrations table have the tables but no record of them: the
        # scripts say ``IF NOT EXISTS``. Applied once, it is not run again (a script runs
        # outside any step: a second call while a step is open must not touch it).
        if self.query("SELECT 1 FROM xsettle_migrations WHERE name = ?", (name,)):
            return
        quoted = name.replace("'", "''")
        self._script(
            f"{script};\nINSERT INTO xsettle_migrations (name, applied_at_ms) VALUES "
            f"('{quoted}', {int(time.time() * 1000)}) ON CONFLICT (name) DO NOTHING;"
        )

    def add_columns(self, table: str, columns: dict[str, str]) -> None:
        with self._lock:
            try:
                have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for name, sql_type in columns.items():
                    if name not in have:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot add columns to {table}: {exc}") from exc

    # --- steps ----------------------------------------------------------------------------
    @asynccontextmanager
    async def step(self) -> AsyncIterator[Step]:
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
        """An atomic write: a savepoint inside the running step, else its own transaction.
        A write outside any step while another task's step is open is a programming error
        (one connection): :class:`StoreError`."""
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

    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
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
    pack = _LEN.pack
    return b"".join([pack(len(kb), len(v)) + kb + v for k, v in headers for kb in (k.encode(),)])


def load_headers(blob: bytes) -> Headers:
    """Headers from a :func:`dump_headers` blob."""
    blob = bytes(blob)  # no copy of bytes; values must come out as bytes
    unpack = _LEN.unpack_from
    size = _LEN.size
    pairs = []
    pos, end = 0, len(blob)
    while pos < end:
        klen, vlen = unpack(blob, pos)
        key_end = pos + size + klen
        value_end = key_end + vlen
        pairs.append((blob[pos + size : key_end].decode(), blob[key_end:value_end]))
        pos = value_end
    return tuple(pairs)


def open_database(
    where: str | Path, *, pool_max: int = 8, application: str = "xsettle"
) -> Database:
    """The database at ``where``: a ``postgresql://`` URL (:class:`bus.pg.PostgresDatabase`),
    else a SQLite file path."""
    text = str(where)
    from bus.pg import PostgresDatabase, is_postgres_url

    if is_postgres_url(text):
        return PostgresDatabase(text, pool_max=pool_max, application=application)
    return SqliteDatabase(text)
