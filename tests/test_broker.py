"""The embedded broker: starts on a free loopback port, answers metadata, leaves nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from bus.broker import EmbeddedBroker, create_contract_topics
from bus.settings import BusSettings
from bus.transport import Admin

pytestmark = pytest.mark.broker


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purpose once reaped or defunct.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


class TestEmbeddedBroker:
    async def test_topics_are_created_for_provinces(self) -> None:
        """Six contract topics per province exist after creation; creating again adds none."""
        settings = BusSettings(idempotence=False)
        async with EmbeddedBroker() as broker:
            assert broker.bootstrap.startswith("127.0.0.1:")
            assert await create_contract_topics(settings, broker.bootstrap, ["460000"]) == 6
            assert await create_contract_topics(settings, broker.bootstrap, ["460000"]) == 0
            async with Admin(settings, broker.bootstrap) as admin:
                names = await admin.list_topics()
            assert {n for n in names if n.endswith(".460000")} == {
                f"xsettle.{f}.460000"
                for f in ("filing", "claim", "settlement", "reply", "error", "dlq")
            }

    async def test_stop_leaves_no_process(self) -> None:
        """After stop the broker process is gone, and stopping twice is harmless."""
        broker = await EmbeddedBroker().start()
        pid = broker.pid
        assert pid is not None
        assert _alive(pid)
        broker.stop()
        broker.stop()
        assert not _alive(pid)

    def test_broker_dies_with_a_killed_parent(self) -> None:
        """A parent killed with SIGKILL takes its broker with it (no orphan)."""
        code = (
            "import asyncio, sys\n"
            "from bus.broker import EmbeddedBroker\n"
            "async def main():\n"
            "    b = await EmbeddedBroker().start()\n"
            "    print('PID', b.pid, flush=True)\n"
            "    await asyncio.sleep(60)\n"
            "asyncio.run(main())\n"
        )
        parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert parent.stdout is not None
        line = parent.stdout.readline()
        while not line.startswith("PID"):
            line = parent.stdout.readline()
        child = int(line.split()[1])
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)

    async def test_xsettle_broker_prints_the_bootstrap_and_stops_on_sigint(self) -> None:
        """``xsettle broker`` prints bootstrap=host:port and exits cleanly on Ctrl-C."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simulators.cli", "broker", "--no-topics",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("bootstrap=127.0.0.1:")
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
