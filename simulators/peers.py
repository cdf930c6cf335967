"""Meeting a province under test: ``xsettle province <code>`` and ``xsettle simulate --except``.

``province`` runs one province's gateway (its adapters, simulated back office and HTTP API)
against a broker it did not start: as home its agency counter files its simulated persons to
the hosts the directory connects it to; as host its hospital desks admit persons filed to it by
any home (simulated or not) and discharge them. ``simulate --except`` runs every other province
the same way. Run both on one broker and a full filing → claim → review → settlement cycle
happens in both directions. Each gateway's URL is printed: it takes the test tokens
(:data:`adapters.gateway.testing.TEST_TOKENS`), so a person can query it while it runs.

Several instances of one province (``XSETTLE_DATABASE_URL`` naming one PostgreSQL database,
one consumer group) split the simulated persons with ``--share K/N``: instance K of N files
and treats the persons whose ID hashes to its share (:class:`Share`), so nothing is done
twice, and each instance keeps its own desk journal in its own ``--state-dir``, so a
restarted instance resumes its share. Its reviewers work the shared review desk alongside
the other instances' (a review another reviewer decided first is skipped). Its report judges
the claims it submitted (the others' may still be in flight when it is done).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import structlog

from adapters.backoffice import Person
from adapters.directory import Directory, province_of
from adapters.gateway.service import Gateway
from adapters.gateway.testing import TEST_TOKENS
from adapters.host import ClaimActionRefused
from adapters.reconciliation import StatementRecord, china_day, day_bounds_ms
from bus.broker import create_contract_topics
from bus.errors import BusError
from bus.models import DifferenceKind, FilingAction, FilingUpload, ItemAdjustment
from bus.node import Node
from bus.transport import wait_for_metadata
from simulators.demo import (
    DAY,
    Bill,
    ProvinceFailed,
    Simulation,
    start_console,
    write_report,
)
from simulators.desks import GatewayDesks, OpenReview, ProposedItem, Refused, ReviewerClient
from simulators.failures import UsageError, known_province, known_provinces, listen_port
from simulators.invariants import Facts, build_report, check_invariants, render
from simulators.population import keyed_token, make_bill, make_filing, make_person, make_visit
from simulators.scenario import Faults, Scenario

log = structlog.get_logger(__name__)

END_OF_DAY_ROUNDS = 3
"""Statements of one pair at most per run: the first, and again after a difference. A
settlement notice that the statement overtook on another partition is the likely one: the
host re-sends the notices the home missed before stating again."""

RESTATE_PAUSE_S = 1.0
"""Pause before stating a differing day again (what was in flight arrives meanwhile)."""

NOT_STATED = "NOT STATED"
"""A host's day this home expected and never had stated to it."""


def _minute_of(person_id: str) -> int:
    """A minute of the simulated morning that is always the same for a person."""
    return int(hashlib.sha256(person_id.encode()).hexdigest()[:8], 16) % 600


def foreign_visit(person_id: str, seed: int) -> str:
    """The visit of a foreign-filed person in the host desk's journal: stable across
    restarts and instances given the seed (one visit per person), and nothing of the ID
    number in it, nor a plain hash of it (:func:`keyed_token`)."""
    return f"foreign-{keyed_token(f'xsettle-visit-{seed}', person_id)}"


@dataclass(frozen=True, slots=True)
class Share:
    """Which simulated persons this instance of a province files and treats: share
    ``index`` (1-based) of ``count``, by a hash of the person's ID number, so instances
    given the same seed and different shares never do the same person."""

    index: int = 1
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ValueError(f"share {self.index}/{self.count}: need 1 <= K <= N")

    @classmethod
    def parse(cls, text: str) -> Share:
        """``K/N`` (``1/2``: the first of two instances)."""
        k, sep, n = text.partition("/")
        if not sep or not k.strip().isdigit() or not n.strip().isdigit():
            raise ValueError(f"--share {text!r}: expected K/N, e.g. 1/2")
        return cls(int(k), int(n))

    def mine(self, person_id: str) -> bool:
        """Whether the person is this instance's to file or treat."""
        if self.count == 1:
            return True
        digest = int(hashlib.sha256(f"share-{person_id}".encode()).hexdigest()[:8], 16)
        return digest % self.count == self.index - 1


WHOLE = Share()
"""One instance: every person."""
DESK_ATTEMPTS = 3
"""Tries of a desk call whose connection to the gateway dropped before the answer."""
T = TypeVar("T")


async def _again_if_dropped(call: Callable[[], Awaitable[T]], what: str, ref: str) -> T:
    """``call()``, made again (loudly, at most DESK_ATTEMPTS times) when the HTTP connection
    to the province's own gateway dropped before the answer. Seen in chaos runs on
    PostgreSQL: under a starved event loop, httpx's pool can close an expired keep-alive
    connection that another request was just given (the gateway logs a 400 for the cut
    request, the desk gets ``ReadError``)."""
    attempt = 1
    while True:
        try:
            return await call()
        except httpx.TransportError as exc:
            if attempt >= DESK_ATTEMPTS:
                raise
            log.warning(
                "desk_call_dropped", call=what, ref=ref, attempt=attempt, error=repr(exc)[:200]
            )
            await asyncio.sleep(0.1 * attempt)
            attempt += 1


async def _wait_for_a_share(node: Node, timeout_s: float = 30.0) -> None:
    """:meth:`Node.wait_ready` for an instance sharing its province's inbox with others: the
    group gives it a share of the partitions, never all of them, so it waits for its first."""
    deadline = time.monotonic() + timeout_s
    while node.assigned_partitions() == 0:
        if node.failure is not None:
            raise BusError(f"{node.province}: a worker died: {node.failure!r}")
        if time.monotonic() > deadline:
            raise BusError(f"{node.province}: no inbox partition assigned within {timeout_s} s")
        await asyncio.sleep(0.05)


class _PatientReviewer(ReviewerClient):
    """A reviewer's desk client whose calls are made again when the connection dropped
    (:func:`_again_if_dropped`): a list or a review is read again; a decision that did
    reach the desk is refused the second time (ReviewClosed), which the reviewer counts as
    decided by another."""

    async def open_reviews(self, limit: int) -> list[OpenReview]:
        return await _again_if_dropped(
            lambda: super(_PatientReviewer, self).open_reviews(limit), "reviews", str(limit)
        )

    async def count_open(self) -> int:
        return await _again_if_dropped(super().count_open, "reviews", "count")

    async def proposed_items(self, claim_id: str) -> list[ProposedItem]:
        return await _again_if_dropped(
            lambda: super(_PatientReviewer, self).proposed_items(claim_id), "review", claim_id
        )

    async def approve(self, claim_id: str, reviewer: str) -> None:
        await _again_if_dropped(
            lambda: super(_PatientReviewer, self).approve(claim_id, reviewer), "decision", claim_id
        )

    async def adjust(
        self, claim_id: str, adjustments: Sequence[ItemAdjustment], reviewer: str
    ) -> None:
        await _again_if_dropped(
            lambda: super(_PatientReviewer, self).adjust(claim_id, adjustments, reviewer),
            "decision",
            claim_id,
        )

    async def reject(self, claim_id: str, reason: str, reviewer: str) -> None:
        await _again_if_dropped(
            lambda: super(_PatientReviewer, self).reject(claim_id, reason, reviewer),
            "decision",
            claim_id,
        )


@dataclass
class EndOfDay:
    """The day closed between this process and the provinces it does not run: what each of our
    hosts stated to the homes that filed with it, and what each host that took our filings
    stated to our homes."""

    day: dt.date
    stated: list[tuple[str, int, StatementRecord]] = field(default_factory=list)
    """(host, round, statement with its answer); round 0: answered MATCHED before a restart."""
    unanswered: list[tuple[str, str]] = field(default_factory=list)
    """(host, home) whose statement had no answer in time."""
    heard: dict[tuple[str, str], str] = field(default_factory=dict)
    """(host, home) -> the outcome of the latest statement our home answered (NOT_STATED)."""

    def closed(self) -> bool:
        """Every statement answered, the latest of each pair and day MATCHED, every host
        heard."""
        latest = {(host, r.home, r.day): r.outcome for host, _, r in self.stated}
        return (
            not self.unanswered
            and all(o == "MATCHED" for o in latest.values())
            and all(o == "MATCHED" for o in self.heard.values())
        )


class Peer(Simulation):
    """A simulation that also serves persons filed by provinces it does not run."""

    def __init__(self, *args: Any, share: Share = WHOLE, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.share = share

    async def ready(self, node: Node) -> None:
        """:meth:`Simulation.ready`; an instance with a share of its province (``--share``)
        is ready once it holds some of the inbox (its siblings hold the rest)."""
        if self.share.count == 1:
            await super().ready(node)
        else:
            await _wait_for_a_share(node)

    def open_desks(self, gateway: Gateway) -> GatewayDesks:
        """:meth:`Simulation.open_desks`, the reviewers' client making a call again when
        the connection dropped (:class:`_PatientReviewer`)."""
        desks = super().open_desks(gateway)
        desks.reviewer = _PatientReviewer(desks.reviewer.client)
        return desks

    async def file(self, person: Person, filing: FilingUpload) -> bool:
        """:meth:`Simulation.file`, tried again when the connection to the gateway drops
        before the answer (:func:`_again_if_dropped`): the filing id makes a second try
        harmless (the counter answers with the filing as first filed)."""
        return await _again_if_dropped(
            lambda: super(Peer, self).file(person, filing), "filing", filing.filing_id
        )

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
        """:meth:`Simulation.treat`, tried again when the connection drops before an answer
        (:func:`_again_if_dropped`): the desk journal resumes the visit as after a restart (a
        discharge sent again returns the same claim; an admission whose answer was lost is
        left unused, as a kill between admitting and journaling leaves it)."""
        return await _again_if_dropped(
            lambda: super(Peer, self).treat(
                host, key, person_id, home_region, hospital, admitted, bill, fault=fault
            ),
            "visit",
            key,
        )

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
                    # Its id drawn from the seed (make_filing): the same after a restart.
                    filing = make_filing(
                        self.rng, person, a.host, filed_at=DAY - dt.timedelta(days=3)
                    )
                    # Made whether ours or not: every instance draws the same persons.
                    if self.share.mine(person.person_id):
                        uploads.append((person, filing))
        sent = await asyncio.gather(*(self.file(person, f) for person, f in uploads))
        return sum(sent)

    async def serve_foreign(self, visits: int, wait_s: float, in_flight: int = 1) -> int:
        """As host: admit persons that provinces we do not run filed to us, discharge them at
        the hospital desks, ``in_flight`` patients at a time. Returns how many claims were
        sent. With a share of the province (``--share``), once the filings are in, the
        persons of this instance's share."""
        deadline = time.monotonic() + wait_s
        seen: list[tuple[str, str, str]] = []
        while time.monotonic() < deadline:
            seen = self._foreign_filings()
            if len(seen) >= visits:
                break
            await asyncio.sleep(0.5)
        served = {
            visit
            for p in self.provinces
            for visit in self.journals[p].claims
            if visit.startswith("foreign-")
        }

        def key(person_id: str) -> str:
            return foreign_visit(person_id, self.scenario.seed)

        if self.share.count == 1:
            todo = [f for f in seen if key(f[1]) not in served]
            todo = todo[: max(0, visits - len(served))]
        else:  # the journal holds this instance's visits only: no cap on the others' count
            todo = [f for f in seen if self.share.mine(f[1]) and key(f[1]) not in served]
        slots = asyncio.Semaphore(max(1, in_flight))

        async def visit(host: str, person_id: str, home_region: str) -> bool:
            allowed = self.directory.allowed_hospitals(home_region, host)
            if not allowed:
                return False
            # Everything about the visit is drawn from the person (never from the order of
            # visits): the same whichever patients are in flight, or whether it is resumed.
            rng = random.Random(f"{self.scenario.seed}-{person_id}")
            hospital = rng.choice(allowed).code
            # The time is the person's, not the visit's place in the list: after a restart the
            # list is shorter, and an admission made before it is discharged with these times.
            admitted = DAY + dt.timedelta(hours=1, minutes=_minute_of(person_id))
            visit_type, days, diagnoses = make_visit(rng)
            items = make_bill(rng, self.directory.catalogue(host), visit_type, days)
            async with slots:
                outcome = await self.treat(
                    host, key(person_id), person_id, home_region, hospital, admitted,
                    Bill(visit_type, days, diagnoses, items),
                )  # fmt: skip
            if isinstance(outcome, Refused):
                log.warning("foreign_admission_refused", code=outcome.code)
                return False
            return outcome is not None

        return sum(await asyncio.gather(*(visit(*f) for f in todo)))

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
        """Until every claim our hosts sent is settled or refused (shown as "claims closed"
        of all our hosts' claims, naming whom it waits for when stalled)."""
        deadline = time.monotonic() + timeout_s
        open_claims = self.open_claims()
        total = self.closed_claims() + open_claims
        bar = self.open_progress(total, "claims closed") if open_claims else None
        while open_claims and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            open_claims = self.open_claims()
            if bar is not None:
                closed = self.closed_claims()
                bar.update(closed, total=closed + open_claims)
        if bar is not None:
            bar.close()

    # --- the end of the day with the provinces run elsewhere -----------------------------------
    async def close_day(self, timeout_s: float) -> EndOfDay:
        """The end-of-day signal between processes (daily reconciliation, contract v1.3).

        Once our claims are closed, each of our hosts states today (China time) to every home
        not run here that filed persons with it, an empty day too (count 0), after any earlier
        day with settlements not yet matched (a run across midnight), and waits for the
        answers; a differing day is stated again after the notices the home missed are re-sent
        (:data:`END_OF_DAY_ROUNDS`). Meanwhile each of our homes waits until every host not run
        here that receipted its filings has stated its day and the home answered MATCHED. The
        day is closed when both hold; gives up after ``timeout_s`` (the report names who)."""
        deadline = time.monotonic() + timeout_s
        end = EndOfDay(day=china_day(dt.datetime.now(dt.UTC)))
        while any(s.node.store.outbox_size() for s in self.systems.values()):
            if time.monotonic() > deadline:
                break  # stated anyway: the statements then show what did not arrive
            await asyncio.sleep(0.1)  # the notices leave before the statement of their day
        await asyncio.gather(
            *(self._state_days(host, home, end, deadline) for host, home in self._homes_to_state()),
            self._hear_hosts(end, deadline),
        )
        log.info(
            "day_closed_with_peers", day=end.day.isoformat(), closed=end.closed(),
            stated=len(end.stated), unanswered=len(end.unanswered), heard=len(end.heard),
        )  # fmt: skip
        return end

    def _homes_to_state(self) -> list[tuple[str, str]]:
        """(our host, home not run here) for every home that filed persons with our hosts."""
        pairs = {
            (p, province_of(f.home_region))
            for p in self.provinces
            for f in self.systems[p].backoffice.host_filings()
        }
        return sorted((h, m) for h, m in pairs if m not in self.gateways)

    def _hosts_to_hear(self) -> list[tuple[str, str]]:
        """(host not run here, our home) for every host that receipted our home's filings."""
        pairs = {
            (province_of(region), p)
            for p in self.provinces
            for region in self.systems[p].backoffice.receipted_hosts()
        }
        return sorted((h, m) for h, m in pairs if h not in self.gateways)

    def _days_to_state(self, host: str, home: str, today: dt.date) -> list[dt.date]:
        """The days ``host`` states to ``home``, oldest first: every earlier day on which it
        settled claims of that home (a run, or a state folder, that crossed midnight China
        time) and today, settled on or not."""
        system = self.systems[host]
        before_today = system.backoffice.settled_claims(0, day_bounds_ms(today)[0], home=home)
        days = {china_day(dt.datetime.fromtimestamp(c.settled_at_ms / 1000, dt.UTC))
                for c in before_today if c.settled_at_ms is not None}  # fmt: skip
        return sorted(days | {today})

    async def _state_days(self, host: str, home: str, end: EndOfDay, deadline: float) -> None:
        for day in self._days_to_state(host, home, end.day):
            await self._state_day(host, home, day, end, deadline)

    async def _state_day(
        self, host: str, home: str, day: dt.date, end: EndOfDay, deadline: float
    ) -> None:
        system = self.systems[host]
        before = system.reconciler.statements(day=day, home=home)
        if before and before[-1].outcome == "MATCHED":  # closed before (a restart, a past day)
            end.stated.append((host, 0, before[-1]))
            return
        for round_ in range(1, END_OF_DAY_ROUNDS + 1):
            statement_id = await system.reconciler.reconcile_day(home, day)
            left = max(0.1, deadline - time.monotonic())
            try:
                (record,) = await system.reconciler.wait_reconciled([statement_id], left)
            except TimeoutError:
                end.unanswered.append((host, home))
                return
            end.stated.append((host, round_, record))
            if record.outcome == "MATCHED" or round_ == END_OF_DAY_ROUNDS:
                return
            for d in record.differences:
                if d.kind is DifferenceKind.MISSING_AT_HOME and d.responsible == host:
                    with contextlib.suppress(ClaimActionRefused):
                        await system.host.resend_notice(d.claim_id, operator="simulator")
            await asyncio.sleep(RESTATE_PAUSE_S)

    async def _hear_hosts(self, end: EndOfDay, deadline: float) -> None:
        while True:
            days = {end.day, china_day(dt.datetime.now(dt.UTC))}  # the day may turn meanwhile
            answered = {p: self.systems[p].reconciler.answered_hosts(days) for p in self.provinces}
            end.heard = {
                (host, home): answered[home].get(host, NOT_STATED)
                for host, home in self._hosts_to_hear()
            }
            if all(o == "MATCHED" for o in end.heard.values()) or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.25)

    def end_of_day_facts(self, end: EndOfDay, facts: Facts) -> None:
        """Add the day's statements (round ``peer N``) and what our homes heard to ``facts``:
        the reconciliation invariant then judges them with the rest."""
        for host, round_, r in end.stated:
            facts.reconciliations.append(
                {
                    "host": host, "home": r.home, "day": r.day.isoformat(),
                    "round": f"peer {round_}",
                    "outcome": r.outcome, "count": r.count, "fund_fen": r.fund_fen,
                    "differences": [
                        {"claim_id": d.claim_id, "kind": d.kind.value,
                         "responsible": d.responsible}
                        for d in r.differences
                    ],
                }
            )  # fmt: skip
        for host, home in end.unanswered:
            facts.reconciliations.append(
                {"host": host, "home": home, "round": "peer", "outcome": "UNANSWERED",
                 "count": 0, "fund_fen": 0, "differences": []}
            )  # fmt: skip
        facts.day_heard = [
            {"host": host, "home": home, "outcome": outcome}
            for (host, home), outcome in sorted(end.heard.items())
        ]


async def run_peer(
    args: argparse.Namespace, provinces: list[str], *, own_day: bool
) -> dict[str, object]:
    """Run ``provinces`` against an external broker: their own day (simulate) and the
    exchange with provinces not run here."""
    from simulators.cli import settings_from

    settings = settings_from(args)
    if settings.bootstrap is None:
        raise UsageError("this command needs --bootstrap (or XSETTLE_BOOTSTRAP)")
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
    # --state-dir, else XSETTLE_STATE_DIR (settings_from), else a new folder.
    explicit = "state_dir" in settings.model_fields_set
    state = settings.state_dir if explicit else Path(tempfile.mkdtemp(prefix="xsettle-"))
    state.mkdir(parents=True, exist_ok=True)
    share: Share = getattr(args, "share", WHOLE)
    # A restart finds its SQLite file, or (PostgreSQL) its desk journal in its own folder.
    resumed = [
        p
        for p in provinces
        if (state / f"province-{p}.sqlite3").exists()
        or (state / f"hospital-desk-{p}.jsonl").exists()
    ]
    peer = Peer(
        directory, scenario, settings, settings.bootstrap, provinces, state, share=share,
    )  # fmt: skip
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

    async def day() -> tuple[int, int, EndOfDay]:
        filed = await peer.file_own(args.filings)
        if own_day and len(peer.agreements()) > 0:
            await peer.run()
        served = await peer.serve_foreign(args.visits, args.wait, args.in_flight)
        await peer.wait_closed(args.timeout)
        end = await peer.close_day(args.timeout)
        if args.linger > 0:
            await asyncio.sleep(args.linger)  # keep answering what the other side still sends
        return filed, served, end

    try:
        filed, served, end = await peer.guarded(day())
        facts = await peer.facts()
        peer.end_of_day_facts(end, facts)
        facts.duration_s = time.monotonic() - began
        if share.count > 1:
            # The shared database also holds the other instances' claims, which may still be
            # in flight when this one is done (a restarted sibling resuming its share): this
            # instance answers for its own (``xsettle chaos`` judges the whole province).
            own = {c for journal in peer.journals.values() for c in journal.claims.values()}
            facts.claims = [c for c in facts.claims if c.claim_id in own]
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
    from simulators.cli import add_bootstrap, add_state_dir

    add_bootstrap(p)
    p.add_argument("--directory", help="directory TOML file (default: the packaged one)")
    p.add_argument(
        "--console", type=listen_port, default=None, metavar="PORT",
        help="serve the ops console and Prometheus /metrics on this port (0: a free one)",
    )  # fmt: skip
    p.add_argument("--filings", type=int, default=5, help="persons filed per agreement as home")
    p.add_argument("--visits", type=int, default=5, help="visits of foreign-filed persons")
    p.add_argument(
        "--in-flight", type=int, default=1, metavar="N",
        help="foreign-filed patients at the hospital desks at once (default 1: one by one)",
    )  # fmt: skip
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for their filings")
    p.add_argument(
        "--timeout", type=float, default=60.0,
        help="seconds to wait for answers, and again for the day to reconcile",
    )  # fmt: skip
    p.add_argument(
        "--linger", type=float, default=0.0,
        help="seconds to keep answering after the day reconciled (default 0: end then)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=20170523)
    add_state_dir(p, "durable state folder (default: a new temporary folder)")
    p.add_argument("--json", default=None, help="write the JSON report here")


async def cmd_province(args: argparse.Namespace) -> int:
    """``xsettle province <code>``."""
    args.claims = 1
    directory = Directory.load(args.directory) if args.directory else Directory.default()
    known_province(args.code, directory, "province")
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
    known_provinces(args.excluded, directory, "--except")
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
    p.add_argument(
        "--share", type=Share.parse, default=WHOLE, metavar="K/N",
        help="instance K of N sharing the province's database and group: file and treat "
        "only the persons of share K (default 1/1: all)",
    )  # fmt: skip
    p.set_defaults(run=cmd_province)
    p = sub.add_parser("simulate", help="simulate every province but the one under test")
    p.add_argument("--except", dest="excluded", action="append", required=True,
                   help="province under test (repeatable)")  # fmt: skip
    p.add_argument("--claims", type=int, default=0, help="visits among simulated provinces")
    _common(p)
    p.set_defaults(run=cmd_simulate)
