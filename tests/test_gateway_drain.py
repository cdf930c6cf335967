"""A gateway stopped with SIGTERM in the middle of traffic, then started again, loses nothing:
every discharge the desk saw accepted is a claim that settles once, with one advance; the
discharges cut off are retried by the desk after the restart and settle once too.

The host gateway runs as its own process (``xsettle gateway --config``), the home in this one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from adapters.backoffice import ClaimState
from adapters.gateway.service import Gateway
from adapters.gateway.testing import (
    TEST_TOKENS,
    client,
    fixed_token_config,
    gateway_config,
    running_gateway,
)
from bus.broker import create_contract_topics, free_port
from bus.settings import BusSettings
from tests.test_gateway_hospital import DISCHARGE, bill, file_at_home

pytestmark = pytest.mark.broker

PATIENTS = 40
HOME_REGION = "130100"


def person(n: int) -> str:
    return f"1301021960{n:06d}1"[:17] + "X"


def host_config(path: Path, broker: str, state: Path, port: int) -> Path:
    tokens = fixed_token_config()
    path.write_text(
        f"""province = "460000"
state_dir = "{state}"
drain_timeout_s = 20

[http]
port = {port}

[review_desk]
enabled = false

[tokens]
hospital = ["{tokens.hospital[0]}"]
ops = ["{tokens.ops[0]}"]

[bus]
bootstrap = "{broker}"
idempotence = false
""",
        encoding="utf-8",
    )
    return path


def start_host(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XSETTLE_")}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "simulators.cli", "gateway", "--config", str(config)],
            stdout=out,
            stderr=out,
            env=env,
        )


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=2) as c:
        for _ in range(int(timeout_s * 10)):
            assert proc.poll() is None, "the host gateway exited"
            try:
                if (await c.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the host gateway never became ready")


@pytest.fixture(scope="module")
async def home(
    broker: str, settings: BusSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    await create_contract_topics(settings, broker, ["130000", "460000"])
    cfg = gateway_config(
        "130000", broker, tmp_path_factory.mktemp("home"), settings=settings, review_desk=False
    )
    async with running_gateway(cfg) as gw:
        yield gw


class Desk:
    """A hospital desk that retries what a stopped gateway did not answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.admissions: dict[str, str] = {}
        self.claims: dict[str, str] = {}
        self.cut_off = 0

    async def visit(self, person_id: str) -> None:
        headers = {"Authorization": f"Bearer {TEST_TOKENS['hospital']}"}
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30) as c:
            try:
                if person_id not in self.admissions:
                    r = await c.post(
                        "/v1/admissions",
                        json={"person_id": person_id, "home_region": HOME_REGION,
                              "hospital_code": "H46010001",
                              "admitted_at": "2026-05-08T09:30:00+08:00"},
                    )  # fmt: skip
                    assert r.status_code == 201, r.text
                    self.admissions[person_id] = r.json()["admission_id"]
                admission = self.admissions[person_id]
                r = await c.post(
                    f"/v1/admissions/{admission}/discharge", json={**DISCHARGE, "items": bill()}
                )
                assert r.status_code in (200, 201), r.text
                self.claims[person_id] = r.json()["claim_id"]
            except httpx.TransportError:
                self.cut_off += 1  # the gateway went away mid-request: the desk will retry


@pytest.mark.timeout(240)
async def test_sigterm_mid_traffic_then_restart_loses_nothing(
    home: Gateway, broker: str, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state = tmp_path / "host-state"
    config = host_config(tmp_path / "host.toml", broker, state, port)
    log = tmp_path / "host.log"
    proc = start_host(config, log)
    await wait_ready(url, proc)
    for n in range(PATIENTS):
        await file_at_home(home, person(n))
    await filed_at_host(state, PATIENTS)
    desk = Desk(url)
    queue = [person(n) for n in range(PATIENTS)]

    async def counter() -> None:  # one of four desks, one patient after another
        while queue:
            await desk.visit(queue.pop(0))

    traffic = [asyncio.create_task(counter()) for _ in range(4)]
    while len(desk.claims) < PATIENTS // 4:  # noqa: ASYNC110 (polling the desks' progress)
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    await asyncio.gather(*traffic)
    assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
    accepted_before = dict(desk.claims)
    assert PATIENTS // 4 <= len(accepted_before) < PATIENTS

    proc = start_host(config, log)
    try:
        await wait_ready(url, proc)
        for n in range(PATIENTS):  # the desk retries what was not answered
            if person(n) not in desk.claims:
                await desk.visit(person(n))
        assert len(desk.claims) == PATIENTS
        assert {p: desk.claims[p] for p in accepted_before} == accepted_before
        states: dict[str, str] = {}
        async with client(url, "hospital") as c:
            for _ in range(300):
                for claim_id in desk.claims.values():
                    states[claim_id] = (await c.get(f"/v1/claims/{claim_id}")).json()["state"]
                if all(s == ClaimState.SETTLED.name for s in states.values()):
                    break
                await asyncio.sleep(0.2)
        assert set(states.values()) == {"SETTLED"}, states
        async with client(url, "hospital") as c:
            one = (await c.get(f"/v1/claims/{next(iter(desk.claims.values()))}")).json()
        assert (one["advance_fen"], one["top_up_fen"]) == (625_000, 125_000)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    reviewed = [r.claim_id for r in home.system.backoffice.reviews()]
    assert sorted(reviewed) == sorted(desk.claims.values())  # each reviewed once
    print(  # noqa: T201 (the harness's count, for the closing note)
        f"\n{PATIENTS} patients, {len(accepted_before)} discharged before SIGTERM, "
        f"{desk.cut_off} requests failed while it was down (retried after), "
        f"all {len(desk.claims)} settled once"
    )


async def filed_at_host(state: Path, count: int) -> None:
    """Wait until the host's database (read from this process) has ``count`` filings."""
    path = state / "province-460000.sqlite3"
    for _ in range(300):
        with sqlite3.connect(path, timeout=5) as db:
            try:
                (have,) = db.execute("SELECT count(*) FROM host_filings").fetchone()
            except sqlite3.OperationalError:  # not created yet
                have = 0
        if have >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the host has {have} of {count} filings")
