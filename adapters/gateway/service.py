"""The gateway as a service: one province's node, roles and review desk, and its HTTP API,
started with checks that refuse clearly and stopped by draining.

Start, in order (each refusal is a :class:`GatewayRefused`, one line, exit code 2):

1. the directory loads and lists the province;
2. the state folder exists or can be made, and a file can be written in it;
3. the HTTP port can be bound (the socket is kept and handed to uvicorn: no race);
4. the broker answers a metadata request, tried ``start_attempts`` times with one log line per
   failed try (the Kafka client's own connection errors are silenced meanwhile);
5. the province starts (outbox resent, inbox consumed), then HTTP is served.

Stop (SIGTERM, SIGINT, or :meth:`Gateway.stop`): ``/readyz`` turns 503 at once so a balancer
stops sending, uvicorn stops accepting and finishes the requests in flight (each runs its
steps to commit or rollback), then the node drains its partitions, commits its offsets and
disconnects, and the database closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
from collections.abc import Generator
from pathlib import Path
from typing import Final

import structlog
import uvicorn
from fastapi import FastAPI

from adapters.directory import Directory, DirectoryError
from adapters.gateway.admissions import AdmissionBook
from adapters.gateway.api_health import migrate_heartbeat
from adapters.gateway.app import GatewayContext, create_app
from adapters.gateway.config import ROLES, GatewayConfig
from adapters.province import ProvinceSystem
from adapters.review_desk import ReviewDeskSettings
from bus.logs import quiet_kafka_client
from bus.pg import masked_url, probe_database
from bus.transport import unreachable

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_S: Final = 5.0
"""How long one probe (a metadata request) may take."""


class GatewayRefused(Exception):
    """The gateway cannot start; the message is the one line to print (exit code 2)."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the gateway decides how to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or :class:`GatewayRefused` naming the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it a response written in two pieces waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise GatewayRefused(f"port {port} on {host} is taken (http.port)") from None
        raise GatewayRefused(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def check_state_dir(folder: Path) -> None:
    """The state folder exists (made if need be) and takes a file, or GatewayRefused."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise GatewayRefused(
            f"state folder {folder} is not writable: {exc.strerror or exc} (state_dir)"
        ) from None


def refuse_test_tokens_off_loopback(config: GatewayConfig) -> None:
    """The well-known test tokens (:data:`adapters.gateway.testing.TEST_TOKENS`) are accepted
    on a loopback address only: anyone can read them in this repository."""
    from adapters.gateway.testing import fixed_token_config

    known = fixed_token_config()
    host = config.http.host
    loopback = host == "localhost" or host.startswith("127.") or host == "::1"
    if loopback:
        return
    for role in ROLES:
        if set(config.tokens.of(role)) & set(known.of(role)):
            raise GatewayRefused(
                f"tokens.{role} holds the public test token, and http.host {host} is not a "
                "loopback address: make real tokens with `xsettle gateway --new-token ROLE`"
            )


def load_directory(config: GatewayConfig) -> Directory:
    """The configured directory (or the packaged one), or GatewayRefused."""
    try:
        directory = (
            Directory.load(config.directory)
            if config.directory is not None
            else Directory.default()
        )
    except DirectoryError as exc:
        first = exc.problems[0] if exc.problems else "unreadable"
        raise GatewayRefused(f"directory {exc.source}: {first}") from None
    if config.province not in directory.provinces():
        raise GatewayRefused(
            f"province {config.province} is not in the directory {directory.source} "
            f"(it lists {', '.join(directory.provinces())})"
        )
    return directory


async def probe_broker(config: GatewayConfig, bootstrap: str) -> str | None:
    """None if the broker answered a metadata request in time, else why not (one line)."""
    return await unreachable(config.bus_settings(), bootstrap, timeout_s=PROBE_TIMEOUT_S)


class Gateway:
    """One province gateway: start with checks, serve, drain on stop."""

    def __init__(self, config: GatewayConfig, *, directory: Directory | None = None) -> None:
        self.config = config
        self._directory = directory
        self.ctx: GatewayContext | None = None
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._app: FastAPI | None = None
        self._serving: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()

    @property
    def bootstrap(self) -> str:
        bootstrap = self.config.bus.bootstrap
        if not bootstrap:
            raise GatewayRefused(
                "no broker configured: set bus.bootstrap (XSETTLE_BOOTSTRAP or --bootstrap); "
                "`xsettle broker` runs an embedded one"
            )
        return bootstrap

    @property
    def port(self) -> int:
        """The bound HTTP port."""
        assert self._sock is not None, "start the gateway first"
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = self.config.http.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
        return f"http://{shown}:{self.port}"

    @property
    def app(self) -> FastAPI:
        """The web app this gateway serves (after start): for an in-process client
        (``httpx.ASGITransport``) that should reach the same routes without sockets."""
        assert self._app is not None, "start the gateway first"
        return self._app

    @property
    def system(self) -> ProvinceSystem:
        assert self.ctx is not None, "start the gateway first"
        return self.ctx.system

    async def start(self) -> Gateway:
        """Check, connect, start the province and serve HTTP; GatewayRefused if it cannot."""
        cfg = self.config
        bootstrap = self.bootstrap
        directory = self._directory or load_directory(cfg)
        if cfg.province not in directory.provinces():
            raise GatewayRefused(f"province {cfg.province} is not in the directory")
        refuse_test_tokens_off_loopback(cfg)
        check_state_dir(cfg.state_dir)
        self._sock = bind(cfg.http.host, cfg.http.port)
        try:
            await self._wait_for_broker(bootstrap)
            await self._wait_for_database()
            desk = cfg.review_desk
            system = ProvinceSystem(
                cfg.province,
                cfg.bus_settings(),
                bootstrap=bootstrap,
                directory=directory,
                state_dir=cfg.state_dir,
                instant_deadline_s=cfg.instant_deadline_s,
                delayed_deadline_s=cfg.delayed_deadline_s,
                review_desk=ReviewDeskSettings(
                    auto_approve_clean=desk.auto_approve_clean,
                    review_period_s=desk.review_period_s,
                )
                if desk.enabled
                else None,
            )
            # Tables made before the node runs: no step is open while a migration runs.
            admissions = AdmissionBook(system.db, cfg.province)
            migrate_heartbeat(system.db)
            await system.start()
        except BaseException:
            self._sock.close()
            self._sock = None
            raise
        self.ctx = GatewayContext(
            config=cfg, system=system, directory=directory, admissions=admissions
        )
        app = self._app = create_app(self.ctx)
        if self.ctx.console is not None:  # it watches the broker from now on for /readyz
            self.ctx.console.broker.set(None)  # which answered a moment ago
        server_config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(cfg.drain_timeout_s),
            server_header=False,
        )
        self._server = _Server(server_config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[self._sock]), name="http")
        while not self._server.started:
            if self._serving.done():
                self._serving.result()
            await asyncio.sleep(0.01)
        log.info("gateway_started", province=cfg.province, url=self.url, bootstrap=bootstrap)
        return self

    async def _wait_for_broker(self, bootstrap: str) -> None:
        attempts = self.config.start_attempts
        pause = self.config.start_backoff_s
        with quiet_kafka_client():
            for attempt in range(1, attempts + 1):
                why = await probe_broker(self.config, bootstrap)
                if why is None:
                    return
                log.warning(
                    "broker_unreachable",
                    bootstrap=bootstrap,
                    attempt=f"{attempt}/{attempts}",
                    error=why,
                    next_try_s=pause if attempt < attempts else None,
                )
                if attempt < attempts:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, self.config.start_backoff_s * 4)
        raise GatewayRefused(f"broker {bootstrap} unreachable after {attempts} tries")

    async def _wait_for_database(self) -> None:
        """With ``bus.database_url``: reach PostgreSQL as the broker is reached, a bounded
        number of tries with one line each (the database may start after the gateway)."""
        url = self.config.bus.database_url
        if not url:
            return
        attempts = self.config.start_attempts
        pause = self.config.start_backoff_s
        for attempt in range(1, attempts + 1):
            why = await asyncio.to_thread(
                probe_database, url.replace("{province}", self.config.province)
            )
            if why is None:
                return
            log.warning(
                "database_unreachable",
                database=masked_url(url),
                attempt=f"{attempt}/{attempts}",
                error=why,
                next_try_s=pause if attempt < attempts else None,
            )
            if attempt < attempts:
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.config.start_backoff_s * 4)
        raise GatewayRefused(
            f"database {masked_url(url)} unreachable after {attempts} tries (bus.database_url)"
        )

    async def stop(self) -> None:
        """Drain and stop: no new HTTP requests, those in flight finish, the node drains and
        commits, the database closes. Idempotent."""
        self.stopping.set()
        if self.ctx is not None:
            self.ctx.draining = True
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._serving
            self._server = None
            self._serving = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.ctx is not None:
            console = self.ctx.console
            if console is not None:
                await console.stop()
            await self.ctx.system.stop()
            self.ctx.system.close()
            self.ctx = None
        log.info("gateway_stopped", province=self.config.province)

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT or a dead worker, then drain. Returns the exit
        code: 0 after a signal, 1 when a worker died, 2 when the gateway could not start."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            await self.start()
        except GatewayRefused:
            raise
        assert self.ctx is not None
        failed = asyncio.ensure_future(self.ctx.system.node.failed.wait())
        stopping = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait([failed, stopping], return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        stopping.cancel()
        failure = self.ctx.system.node.failure
        log.info("gateway_draining", province=self.config.province)
        await self.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        return 1 if failure is not None else 0
