"""The main job and the integration-test commands: ``xsettle demo``, ``province``, ``simulate``.

One engine, :class:`Simulation`, runs any set of provinces (their adapters and SQLite back
offices) on a broker: it enrols synthetic persons at the homes, files them to the hosts the
directory connects them to, then drives hospital visits at the hosts, with injected faults, and
collects :class:`~simulators.invariants.Facts` for the report and the invariants.
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
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from adapters.backoffice import ClaimState, Person
from adapters.directory import Agreement, Directory, province_of
from adapters.host import AdmissionRefused
from adapters.province import ProvinceSystem
from adapters.review_desk import ReviewDeskSettings
from bus.broker import running_broker
from bus.constants import topic
from bus.envelope import Envelope, new_id, now_ms
from bus.models import ClaimPackage, ErrorReport, FilingAction, now
from bus.settings import BusSettings
from bus.transport import Consumer
from simulators.invariants import ClaimFact, Facts, build_report, check_invariants, render
from simulators.population import make_bill, make_filing, make_person, make_visit
from simulators.reviewers import SimulatedReviewer
from simulators.scenario import Scenario

log = structlog.get_logger(__name__)

T = TypeVar("T")

DAY = dt.datetime(2026, 5, 8, 8, 0, tzinfo=dt.UTC)
"""The simulated day; filings are valid before it."""


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
    def claim_id(self) -> str:
        return f"C-{self.agreement.host}-{self.index:06d}"


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


class Simulation:
    """Synthetic provinces on one broker, and the facts of what happened."""

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
    ) -> None:
        self.directory = directory
        self.scenario = scenario
        self.bootstrap = bootstrap
        self.settings = settings
        self.provinces = provinces
        self.rng = random.Random(scenario.seed)
        self.progress = progress
        reviews = scenario.reviews
        desk = (
            ReviewDeskSettings(
                auto_approve_clean=reviews.auto_approve_clean,
                review_period_s=reviews.review_period_s,
            )
            if reviews.desk
            else None
        )
        self.systems = {
            p: ProvinceSystem(
                p,
                settings,
                bootstrap=bootstrap,
                directory=directory,
                state_dir=state_dir,
                instant_deadline_s=scenario.instant_deadline_s,
                review_desk=desk,
            )
            for p in provinces
        }
        self.reviewers: dict[str, list[SimulatedReviewer]] = {
            p: [
                SimulatedReviewer(
                    s.home.desk,
                    pace_per_s=reviews.pace_per_s,
                    adjust_share=reviews.adjust_share,
                    reject_share=reviews.reject_share,
                    rng=random.Random(f"{scenario.seed}-{p}-{n}"),
                    name=f"{p}-reviewer-{n + 1}",
                    seed=str(scenario.seed),
                )
                for n in range(reviews.reviewers_per_home)
            ]
            for p, s in self.systems.items()
            if s.home.desk is not None
        }
        self.max_backlog = 0
        self.expected: dict[str, str] = {}
        self.refusals: list[tuple[str, str]] = []
        self.dead_letters_expected = 0
        self._silent_back = asyncio.Event()
        self._silent_back.set()

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
        """Start every province's node, wait for its inbox assignment, start the reviewers."""
        await asyncio.gather(*(s.start() for s in self.systems.values()))
        await asyncio.gather(*(s.node.wait_ready(60) for s in self.systems.values()))
        for team in self.reviewers.values():
            for reviewer in team:
                reviewer.start()

    async def stop(self) -> None:
        """Stop the reviewers and every province. Idempotent."""
        for team in self.reviewers.values():
            for reviewer in team:
                await reviewer.stop()
        await asyncio.gather(*(s.stop() for s in self.systems.values()))
        for s in self.systems.values():
            s.close()

    # --- population -----------------------------------------------------------------------
    def agreements(self) -> list[Agreement]:
        """Agreements whose home and host provinces both run here."""
        return [
            a
            for a in self.directory.agreements()
            if province_of(a.home) in self.systems and a.host in self.systems
        ]

    async def populate(self, per_agreement: int) -> dict[Agreement, list[Person]]:
        """Enrol and file ``per_agreement`` persons for every agreement; wait for receipts."""
        filed: dict[Agreement, list[Person]] = {}
        sequence = 0
        uploads = []
        for a in self.agreements():
            home = self.systems[province_of(a.home)]
            people = []
            for _ in range(per_agreement):
                sequence += 1
                person = make_person(self.rng, a.home, sequence)
                filing = make_filing(self.rng, person, a.host, filed_at=DAY - dt.timedelta(days=3))
                people.append(person)
                if home.backoffice.filings_of(person.person_id):
                    continue  # filed before a restart: resume, don't replay
                home.backoffice.add_person(person)
                uploads.append((home, filing))
            filed[a] = people
        await asyncio.gather(*(home.home.file(f) for home, f in uploads))
        await self._wait_registered([(self.systems[f.host_region[:2] + "0000"], f.person_id)
                                     for _, f in uploads])  # fmt: skip
        return filed

    async def _wait_registered(self, pairs: list[tuple[ProvinceSystem, str]]) -> None:
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
        """Enrol the unfiled persons; file then revoke the revoked ones."""
        revokes = []
        for v in visits:
            if v.fault not in ("unfiled", "revoked"):
                continue
            home = self.systems[province_of(v.agreement.home)]
            home.backoffice.add_person(v.person)
            if v.fault == "revoked":
                filing = make_filing(
                    self.rng, v.person, v.host, filed_at=DAY - dt.timedelta(days=30)
                )
                revokes.append((home, filing))
        await asyncio.gather(*(home.home.file(f) for home, f in revokes))
        for home, f in revokes:
            await home.home.file(
                f.model_copy(update={"action": FilingAction.REVOKE, "filed_at": now()})
            )
        deadline = time.monotonic() + 60
        for _, f in revokes:
            host = self.systems[f.host_region[:2] + "0000"]
            while time.monotonic() < deadline:
                got = host.backoffice.filing_for(f.person_id)
                if got is not None and got.action is FilingAction.REVOKE:
                    break
                await asyncio.sleep(0.05)

    # --- visits ---------------------------------------------------------------------------
    async def visit(self, v: Visit, slots: asyncio.Semaphore) -> None:
        """Admit, bill, package and submit one visit (or record its refusal)."""
        async with slots:
            if v.host == self.scenario.faults.silent_home:
                await self._silent_back.wait()
            host = self.systems[v.host]
            if host.backoffice.claim(v.claim_id) is not None:
                return  # submitted before a restart: resume, don't replay
            admitted = DAY + dt.timedelta(minutes=v.index)
            try:
                admission = await host.host.admit(
                    v.person.person_id, v.agreement.home, v.hospital, admitted
                )
            except AdmissionRefused as refused:
                self.refusals.append((EXPECTED.get(v.fault or "", "SETTLED"), refused.code.value))
                return
            visit_type, days, diagnoses = make_visit(random.Random(self.scenario.seed + v.index))
            items = make_bill(
                random.Random(self.scenario.seed * 7 + v.index),
                self.directory.catalogue(v.host),
                visit_type,
                days,
            )
            claim = host.host.package(
                admission,
                items,
                visit_type=visit_type,
                diagnoses=diagnoses,
                discharged_at=admitted + dt.timedelta(days=days),
                claim_id=v.claim_id,
            )
            if v.fault == "bad_amount":
                claim = claim.model_copy(update={"total_fen": claim.total_fen + 100})
            self.expected[claim.claim_id] = EXPECTED.get(v.fault or "", "SETTLED")
            request_id = await host.host.submit(claim)
            if v.fault == "duplicate_resend":
                await host.node.resend(request_id)

    async def inject_undecodable(self, visits: list[Visit]) -> None:
        """Garbage on homes' claim topics, sent with a host's honest headers."""
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
            await node.send_raw(topic("claim", home), key, value, signed)

    async def silence(self) -> None:
        """Stop the silent home for a while (instant claims to it fall back), then restart."""
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
        """The whole day: population, faults, visits, wait for every claim, facts."""
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
        deadline = time.monotonic() + self.scenario.settle_timeout_s
        while True:
            finished = sum(t.done() for t in tasks)
            done = finished - self.open_claims() if finished == total else finished
            self._progress(max(0, done), total)
            self.backlog()
            if finished == total and self.open_claims() == 0 and silencer.done():
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        await silencer
        await asyncio.sleep(0.5)  # let settlement notices and reports arrive
        if self.progress:
            print(file=sys.stderr)
        facts = await self.facts()
        facts.duration_s = time.monotonic() - began
        return facts

    def _progress(self, done: int, total: int) -> None:
        if not self.progress:
            return
        width = 40
        filled = width * done // max(1, total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} visits closed")
        sys.stderr.flush()

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
    """Every ErrorReport on the provinces' error topics, from the beginning to now."""
    from bus.codec import Codec
    from bus.envelope import header_dict

    codec = Codec()
    consumer = Consumer(settings, bootstrap, group=None, name="demo-report")
    await consumer.start()
    out: list[dict[str, str]] = []
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
                if isinstance(rep, ErrorReport):
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


def _meta(scenario: Scenario, broker: str) -> dict[str, object]:
    return {"claims": scenario.claims, "seed": scenario.seed, "broker": broker}


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
) -> dict[str, Any]:
    """Run the demo and return its report (checked invariants included).

    With ``console_port`` the ops console (errors, dead letters, pending, statistics,
    ``/metrics``) is served while it runs, and ``hold_s`` keeps it up after the report.
    """
    directory = directory or Directory.default()
    provinces = provinces or list(directory.provinces())
    async with running_broker(settings, provinces) as (bootstrap, effective):
        with tempfile.TemporaryDirectory(prefix="xsettle-demo-") as state:
            sim = Simulation(
                directory, scenario, effective, bootstrap, provinces, Path(state),
                progress=progress,
            )  # fmt: skip
            await sim.start()
            console = None
            if console_port is not None:
                console = await start_console(sim, effective, bootstrap, console_port)
            try:
                facts = await sim.guarded(sim.run())
                checks = check_invariants(facts)
                report = build_report(facts, checks, _meta(scenario, bootstrap))
                if console is not None and hold_s > 0:
                    print(render(report))
                    print(f"\nconsole stays up {hold_s:.0f} s: {console.url}", file=sys.stderr)
                    await asyncio.sleep(hold_s)
            finally:
                if console is not None:
                    await console.stop()
                await sim.stop()
    return report


async def start_console(sim: Simulation, settings: BusSettings, bootstrap: str, port: int) -> Any:
    from bus.console import Console

    def stats() -> list[dict[str, object]]:
        return [row for p, s in sim.systems.items() for row in s.backoffice.settlement_stats(p)]

    console = Console(
        settings, bootstrap, nodes=[s.node for s in sim.systems.values()], stats=stats, port=port
    )
    await console.start()
    print(
        f"ops console: {console.url}  (metrics: {console.url}metrics; "
        f"CLI: xsettle ops errors --bootstrap {bootstrap})",
        file=sys.stderr,
        flush=True,
    )
    return console


async def cmd_demo(args: argparse.Namespace) -> int:
    """``xsettle demo``: a day of settlement on the embedded broker (or --bootstrap)."""
    from simulators.cli import settings_from

    scenario = Scenario.load(args.scenario, claims=args.claims, seed=args.seed)
    if not args.quiet:
        print(
            f"xsettle demo: {scenario.claims} visits, seed {scenario.seed}, "
            f"{'broker ' + args.bootstrap if args.bootstrap else 'embedded broker'}",
            file=sys.stderr,
        )
    try:
        report = await run_demo(
            scenario,
            settings_from(args),
            progress=not args.quiet,
            console_port=args.console,
            hold_s=args.hold,
        )
    except ProvinceFailed as exc:
        print(f"xsettle demo: {exc}", file=sys.stderr)
        return 1
    if not (args.console is not None and args.hold > 0):
        print(render(report))
    write_report(report, Path(args.json))
    print(f"\nJSON report: {args.json}")
    return 0 if report["ok"] else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo``, ``province`` and ``simulate``."""
    from simulators.cli import add_bootstrap

    p = sub.add_parser("demo", help="a day of cross-province settlement (the main job)")
    p.add_argument("--claims", type=int, default=None, help="visits to simulate (default 5000)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--scenario", type=Path, default=None, help="scenario TOML file")
    p.add_argument("--json", default="reports/demo-report.json", help="JSON report path")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--console", type=int, default=None, metavar="PORT",
        help="serve the ops web console on this port while the demo runs (0: a free port)",
    )  # fmt: skip
    p.add_argument(
        "--hold", type=float, default=0.0, metavar="SECONDS",
        help="with --console: keep serving this long after the report",
    )  # fmt: skip
    add_bootstrap(p)
    p.set_defaults(run=cmd_demo)
    from simulators.peers import register as register_peers  # peers imports this module

    register_peers(sub)


__all__ = ["Simulation", "register", "run_demo"]
