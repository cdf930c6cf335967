"""Meeting a province under test: ``xsettle province <code>`` and ``xsettle simulate --except``.

``province`` runs one province's gateway (its adapters, simulated back office and HTTP API)
against a broker it did not start: as home its agency counter files its simulated persons to
the hosts the directory connects it to; as host its hospital desks admit persons filed to it by
any home (simulated or not) and discharge them. ``simulate --except`` runs every other province
the same way. Run both on one broker and a full filing → claim → review → settlement cycle
happens in both directions. Each gateway's URL is printed: it takes the test tokens
(:data:`adapters.gateway.testing.TEST_TOKENS`), so a person can query it while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import random
import sys
import tempfile
import time
from pathlib import Path

import structlog

from adapters.directory import Directory, province_of
from adapters.gateway.testing import TEST_TOKENS
from bus.broker import create_contract_topics
from bus.models import FilingAction
from bus.transport import wait_for_metadata
from simulators.demo import (
    DAY,
    Bill,
    ProvinceFailed,
    Simulation,
    start_console,
    write_report,
)
from simulators.desks import Refused
from simulators.invariants import build_report, check_invariants, render
from simulators.population import make_bill, make_filing, make_person, make_visit
from simulators.scenario import Faults, Scenario

log = structlog.get_logger(__name__)


def _minute_of(person_id: str) -> int:
    """A minute of the simulated morning that is always the same for a person."""
    return int(hashlib.sha256(person_id.encode()).hexdigest()[:8], 16) % 600


def foreign_visit(person_id: str) -> str:
    """The visit of a foreign-filed person in the host desk's journal: stable across
    restarts (one visit per person), and no digit of the ID number in it."""
    return f"foreign-{hashlib.sha256(person_id.encode()).hexdigest()[:12]}"


class Peer(Simulation):
    """A simulation that also serves persons filed by provinces it does not run."""

    async def file_own(self, per_agreement: int) -> int:
        """As home: file simulated persons at the agency counter to every host we have an
        agreement with, including hosts we do not run. Returns how many filings were sent
        (a filing sent before a restart is not sent again)."""
        uploads = []
        sequence = 0
        for p in self.provinces:
            for a in self.directory.agreements_as_home(p):
                if a.host in self.gateways:
                    continue  # served by our own simulation
                for _ in range(per_agreement):
                    sequence += 1
                    person = make_person(self.rng, a.home, 500_000 + sequence)
                    filing = make_filing(
                        self.rng, person, a.host, filed_at=DAY - dt.timedelta(days=3)
                    )
                    uploads.append((person, filing))
        sent = await asyncio.gather(*(self.file(person, f) for person, f in uploads))
        return sum(sent)

    async def serve_foreign(self, visits: int, wait_s: float) -> int:
        """As host: admit persons that provinces we do not run filed to us, discharge them at
        the hospital desks. Returns how many claims were sent."""
        deadline = time.monotonic() + wait_s
        seen: list[tuple[str, str, str]] = []
        while time.monotonic() < deadline:
            seen = self._foreign_filings()
            if len(seen) >= visits:
                break
            await asyncio.sleep(0.5)
        served = {
            key
            for p in self.provinces
            for key in self.journals[p].claims
            if key.startswith("foreign-")
        }
        todo = [f for f in seen if foreign_visit(f[1]) not in served]
        todo = todo[: max(0, visits - len(served))]
        submitted = 0
        for host, person_id, home_region in todo:
            allowed = self.directory.allowed_hospitals(home_region, host)
            if not allowed:
                continue
            rng = random.Random(f"{self.scenario.seed}-{person_id}")
            hospital = rng.choice(allowed).code
            # The time is the person's, not the visit's place in the list: after a restart the
            # list is shorter, and an admission made before it is discharged with these times.
            admitted = DAY + dt.timedelta(hours=1, minutes=_minute_of(person_id))
            visit_type, days, diagnoses = make_visit(rng)
            items = make_bill(rng, self.directory.catalogue(host), visit_type, days)
            outcome = await self.treat(
                host, foreign_visit(person_id), person_id, home_region, hospital, admitted,
                Bill(visit_type, days, diagnoses, items),
            )  # fmt: skip
            if isinstance(outcome, Refused):
                log.warning("foreign_admission_refused", code=outcome.code)
            elif outcome is not None:
                submitted += 1
        return submitted

    def _foreign_filings(self) -> list[tuple[str, str, str]]:
        """Who walks in: persons foreign homes filed to our hosts (read in the hosts'
        databases: the simulation picks its patients, no desk lists the filed)."""
        out = []
        for p in self.provinces:
            for filing in self.systems[p].backoffice.host_filings():
                foreign = province_of(filing.home_region) not in self.gateways
                if foreign and filing.action is not FilingAction.REVOKE:
                    out.append((p, filing.person_id, filing.home_region))
        return out

    async def wait_closed(self, timeout_s: float) -> None:
        """Until every claim our hosts sent is settled or refused."""
        deadline = time.monotonic() + timeout_s
        while self.open_claims() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls the DB
            await asyncio.sleep(0.25)


async def run_peer(
    args: argparse.Namespace, provinces: list[str], *, own_day: bool
) -> dict[str, object]:
    """Run ``provinces`` against an external broker: their own day (simulate) and the
    exchange with provinces not run here."""
    from simulators.cli import settings_from

    settings = settings_from(args)
    if settings.bootstrap is None:
        raise SystemExit("this command needs --bootstrap (or XSETTLE_BOOTSTRAP)")
    directory = Directory.load(args.directory) if args.directory else Directory.default()
    await wait_for_metadata(settings, settings.bootstrap)
    await create_contract_topics(settings, settings.bootstrap, list(directory.provinces()))
    scenario = Scenario(
        claims=max(1, args.claims),
        seed=args.seed,
        faults=Faults(
            unfiled=0, revoked=0, not_designated=0, not_allowed=0, bad_amount=0, undecodable=0,
            duplicate_resend=0, silent_home=None,
        ),
    )  # fmt: skip
    state = Path(args.state_dir) if args.state_dir else Path(tempfile.mkdtemp(prefix="xsettle-"))
    resumed = [p for p in provinces if (state / f"province-{p}.sqlite3").exists()]
    peer = Peer(directory, scenario, settings, settings.bootstrap, provinces, state, progress=False)
    await peer.start()
    print(
        f"listening: {', '.join(n.node.inbox[0].rsplit('.', 1)[1] for n in peer.systems.values())}"
        f" on {settings.bootstrap}; state in {state}"
        + (f" (resuming {', '.join(resumed)})" if resumed else ""),
        flush=True,
    )
    for province, url in peer.urls().items():
        print(f"gateway {province} {directory.province_name(province)}: {url}", flush=True)
    tokens = ", ".join(f"{role} {token}" for role, token in TEST_TOKENS.items())
    print(f"gateways take the public test tokens (TEST_TOKENS): {tokens}", flush=True)
    first = next(iter(peer.urls().values()))
    print(
        f"  e.g. curl -H 'Authorization: Bearer {TEST_TOKENS['reviewer']}' {first}/v1/reviews",
        flush=True,
    )
    console = None
    if args.console is not None:
        console = await start_console(peer, settings, settings.bootstrap, args.console)
    began = time.monotonic()

    async def day() -> tuple[int, int]:
        filed = await peer.file_own(args.filings)
        if own_day and len(peer.agreements()) > 0:
            await peer.run()
        served = await peer.serve_foreign(args.visits, args.wait)
        await peer.wait_closed(args.timeout)
        await asyncio.sleep(args.linger)  # answer what the other side still sends us
        return filed, served

    try:
        filed, served = await peer.guarded(day())
        facts = await peer.facts()
        facts.duration_s = time.monotonic() - began
    finally:
        if console is not None:
            await console.stop()
        await peer.stop()
    checks = check_invariants(facts)
    return build_report(
        facts,
        checks,
        {"provinces": provinces, "broker": settings.bootstrap, "filed": filed, "served": served,
         "claims": len(facts.claims), "seed": args.seed},
    )  # fmt: skip


def _common(p: argparse.ArgumentParser) -> None:
    from simulators.cli import add_bootstrap

    add_bootstrap(p)
    p.add_argument("--directory", help="directory TOML file (default: the packaged one)")
    p.add_argument(
        "--console", type=int, default=None, metavar="PORT",
        help="serve the ops console and Prometheus /metrics on this port (0: a free one)",
    )  # fmt: skip
    p.add_argument("--filings", type=int, default=5, help="persons filed per agreement as home")
    p.add_argument("--visits", type=int, default=5, help="visits of foreign-filed persons")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for their filings")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for answers")
    p.add_argument("--linger", type=float, default=10.0, help="seconds to keep answering after")
    p.add_argument("--seed", type=int, default=20170523)
    p.add_argument("--state-dir", default=None, help="durable state folder (default: temp)")
    p.add_argument("--json", default=None, help="write the JSON report here")


async def cmd_province(args: argparse.Namespace) -> int:
    """``xsettle province <code>``."""
    args.claims = 1
    try:
        report = await run_peer(args, [args.code], own_day=False)
    except ProvinceFailed as exc:
        print(f"xsettle province: {exc}", file=sys.stderr)
        return 1
    print(render(report))
    if args.json:
        write_report(report, Path(args.json))
    return 0 if report["ok"] else 1


async def cmd_simulate(args: argparse.Namespace) -> int:
    """``xsettle simulate --except <code>``."""
    directory = Directory.load(args.directory) if args.directory else Directory.default()
    provinces = [p for p in directory.provinces() if p not in args.excluded]
    try:
        report = await run_peer(args, provinces, own_day=args.claims > 0)
    except ProvinceFailed as exc:
        print(f"xsettle simulate: {exc}", file=sys.stderr)
        return 1
    print(render(report))
    if args.json:
        write_report(report, Path(args.json))
    return 0 if report["ok"] else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``province`` and ``simulate``."""
    p = sub.add_parser("province", help="run one province against an external broker")
    p.add_argument("code", help="province code, e.g. 460000")
    _common(p)
    p.set_defaults(run=cmd_province)
    p = sub.add_parser("simulate", help="simulate every province but the one under test")
    p.add_argument("--except", dest="excluded", action="append", required=True,
                   help="province under test (repeatable)")  # fmt: skip
    p.add_argument("--claims", type=int, default=0, help="visits among simulated provinces")
    _common(p)
    p.set_defaults(run=cmd_simulate)
