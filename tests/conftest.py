"""Shared fixtures: one embedded broker per test session, unique names, nodes that clean up."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import structlog

import bus.logs
from bus.broker import EmbeddedBroker, create_contract_topics
from bus.codec import Codec
from bus.node import Node
from bus.pg import EmbeddedPostgres
from bus.settings import BusSettings
from bus.signing import Trust
from simulators.keys import demo_trust

bus.logs.CACHE_LOGGERS = False  # see its docstring: tests configure logging in turn


@pytest.fixture(autouse=True)
def logging_as_it_was() -> Iterator[None]:
    """A test that configures logging (a command's ``main``, ``--log-json``) leaves it as it
    found it: a later test in the same process captures info events at any level."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="module")
async def broker() -> AsyncIterator[str]:
    """Bootstrap address of the module's broker: ``XSETTLE_BOOTSTRAP`` or an embedded one
    (one per test module: it starts in ~0.2 s, and its 79 fresh province codes then suffice
    for any module; see :class:`ProvincePool`)."""
    external = os.environ.get("XSETTLE_BOOTSTRAP")
    if external:
        yield external
        return
    async with EmbeddedBroker() as embedded:
        yield embedded.bootstrap


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """The session's PostgreSQL: ``XSETTLE_TEST_POSTGRES_URL`` (a server whose ``postgres``
    database the tests may create databases from) or the embedded one, started once."""
    external = os.environ.get("XSETTLE_TEST_POSTGRES_URL")
    # Not under pytest's temp folder: run as root, the wheel opens every parent folder to the
    # server's own user, and a pytest starting meanwhile closes /tmp/pytest-of-<user> again
    # (0700), which takes the data folder from the running server.
    folder = Path(tempfile.mkdtemp(prefix="xsettle-test-postgres-"))
    server = EmbeddedPostgres(folder)
    try:
        if external:
            server.url = external
            yield server
            return
        with server:
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def every_province_on_postgres(request: pytest.FixtureRequest) -> Iterator[None]:
    """``XSETTLE_TEST_BACKEND=postgresql``: every province the tests build in this process
    (``ProvinceSystem``) keeps its state in PostgreSQL instead of its SQLite file, one
    database per state folder and province (a restart in a test finds its state again). Not
    in CI (the suite would take twice as long): run it after touching SQL."""
    if os.environ.get("XSETTLE_TEST_BACKEND") != "postgresql":
        yield
        return
    import hashlib

    import adapters.province
    from bus.db import Database
    from bus.pg import PostgresDatabase

    server: EmbeddedPostgres = request.getfixturevalue("postgres")
    original = adapters.province.province_database

    def on_postgres(province: str, settings: BusSettings, folder: Path) -> Database:
        if settings.database_url:
            return original(province, settings, folder)
        name = "p_" + hashlib.sha256(f"{folder.resolve()}/{province}".encode()).hexdigest()[:20]
        return PostgresDatabase(server.create_database(name), pool_max=4)

    adapters.province.province_database = on_postgres
    try:
        yield
    finally:
        adapters.province.province_database = original


@pytest.fixture
def postgres_url(postgres: EmbeddedPostgres) -> str:
    """A fresh, empty database of the session's PostgreSQL, for this test."""
    return postgres.create_database(f"t_{uuid.uuid4().hex[:16]}")


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> BusSettings:
    """Bus settings for tests: fast retries, fast sweeps, state in a temp folder."""
    return BusSettings(
        idempotence=False if not os.environ.get("XSETTLE_BOOTSTRAP") else None,
        state_dir=tmp_path_factory.mktemp("state"),
        retry_initial_ms=20,
        retry_max_ms=100,
        retry_attempts=3,
        sweep_interval_ms=50,
    )


@pytest.fixture(scope="session")
def codec() -> Codec:
    """The codec over the contract's schemas."""
    return Codec()


class ProvincePool:
    """Hands out province codes no other test on the same broker used, so topics never
    clash."""

    def __init__(self) -> None:
        from adapters.directory import Directory

        reserved = set(Directory.default().provinces())
        self._free = [c for c in (f"{n:02d}0000" for n in range(10, 100)) if c not in reserved]

    def take(self) -> str:
        """A fresh province code ``NN0000`` that the default directory does not use."""
        if not self._free:
            raise RuntimeError("the session ran out of fresh province codes")
        return self._free.pop(0)


_EXTERNAL_POOL: ProvincePool | None = None


@pytest.fixture(scope="module")
def province_pool() -> ProvincePool:
    """Unused province codes: per module on the module's embedded broker, per session on an
    external one (whose topics outlive a module)."""
    global _EXTERNAL_POOL
    if not os.environ.get("XSETTLE_BOOTSTRAP"):
        return ProvincePool()
    if _EXTERNAL_POOL is None:
        _EXTERNAL_POOL = ProvincePool()
    return _EXTERNAL_POOL


@pytest.fixture
def unique_topic() -> Callable[[str], str]:
    """Makes topic names unique to this test."""
    return lambda stem: f"test.{stem}.{uuid.uuid4().hex[:12]}"


NodeFactory = Callable[..., Awaitable[Node]]


@pytest.fixture
async def make_node(
    broker: str, settings: BusSettings, tmp_path: Path
) -> AsyncIterator[NodeFactory]:
    """Factory of started nodes on the session broker; every node is stopped afterwards."""
    made: list[Node] = []

    async def factory(
        province: str,
        *,
        start: bool = True,
        state: Path | None = None,
        trust: Trust | None = None,
        **kw: object,
    ) -> Node:
        await create_contract_topics(settings, broker, [province])
        node_settings = settings.model_copy(update={"state_dir": state or tmp_path, **kw})
        node = Node(
            province,
            node_settings,
            bootstrap=broker,
            trust=trust or demo_trust(province, node_settings),
        )
        made.append(node)
        if start:
            await node.start()
        return node

    yield factory
    for node in made:
        await node.stop()
        node.store.close()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A folder for durable state that outlives one node (restart tests)."""
    path = tmp_path / "durable"
    path.mkdir()
    return path
