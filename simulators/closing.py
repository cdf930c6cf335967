"""The end of the simulated day: planted reversals, then daily reconciliation of every province
pair with one planted missing notice, found, attributed and put right (contract v1.3).

A province platform's day does not end when its last patient is discharged: the host states
the day to every home it settled with (:mod:`adapters.reconciliation`), and a difference is
a task for the province that must act. The demo plays that out:

1. :func:`plant_reversals`: a few settled claims are cancelled by their hosts (a duplicate
   bill); the homes confirm, the patients get their money back.
2. :func:`close_day`: one settlement notice is lost on its way (deleted at the home: the
   planted mismatch); every host states the day to every home; the home finds the lost notice
   (``MISSING_AT_HOME``, the host responsible, an ``ErrorReport``); the host re-sends the
   notice and states the pair's day again, which matches.

3. :func:`close_month`: month-end clearing (清算, :mod:`adapters.clearing`): every host states
   what each home's funds owe it for the month, net of the reversals; the homes confirm.

What happened is kept in :class:`DayClose` for the report and the invariants.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from adapters.backoffice import ClaimState
from adapters.clearing import ClearingView, china_month
from adapters.directory import province_of
from adapters.province import ProvinceSystem
from adapters.reconciliation import StatementRecord, china_day
from bus.models import DifferenceKind, ReversalReason

log = structlog.get_logger(__name__)

NOTICES_WAIT_S = 30.0
"""Longest wait for the day's settlement notices to reach their homes before stating."""
ANSWER_WAIT_S = 60.0
"""Longest wait for the homes' answers to the statements."""


@dataclass
class DayClose:
    """The end of the day as the demo played it."""

    day: dt.date | None = None
    reversed: list[tuple[str, str]] = field(default_factory=list)
    """(host, claim id) of the reversals planted and confirmed."""
    planted: tuple[str, str, str] | None = None
    """(host, home, claim id) of the notice lost on its way."""
    first: list[tuple[str, StatementRecord]] = field(default_factory=list)
    """(host, record) of every statement of the day's first round."""
    restated: list[tuple[str, StatementRecord]] = field(default_factory=list)
    """(host, record) of the statements sent again after the host acted."""
    month: str | None = None
    """The month cleared (China Standard Time)."""
    clearing: list[ClearingView] = field(default_factory=list)
    """The month's clearing as each host stated it and its home answered."""

    def final(self) -> dict[tuple[str, str], StatementRecord]:
        """The latest statement of every (host, home) pair."""
        out = {(h, r.home): r for h, r in self.first}
        out.update({(h, r.home): r for h, r in self.restated})
        return out


async def plant_reversals(
    systems: Mapping[str, ProvinceSystem], count: int, rng: random.Random
) -> list[tuple[str, str]]:
    """Cancel ``count`` settled claims (a duplicate bill each), wait for the homes' answers;
    returns (host, claim id) of those confirmed."""
    # Ordered by what a seed fixes (host, person, admission), not by claim id (drawn anew
    # each run): one seed, the same claims reversed.
    settled = sorted(
        ((p, c.claim.person_id, c.claim.admitted_at.isoformat()), c.claim.claim_id)
        for p, s in systems.items()
        for c in s.backoffice.claims()
        if c.state is ClaimState.SETTLED and province_of(c.claim.home_region) in systems
    )
    chosen = [(key[0], claim_id) for key, claim_id in rng.sample(settled, min(count, len(settled)))]
    for host, claim_id in chosen:
        await systems[host].host.reverse_claim(
            claim_id, ReversalReason.DUPLICATE_BILL, "billed twice (demo)", "demo-billing"
        )

    def answered() -> bool:
        states = [systems[h].backoffice.claim(c) for h, c in chosen]
        return all(s is not None and s.reversal_state != "REQUESTED" for s in states)

    await _until(answered, ANSWER_WAIT_S)
    done = []
    for host, claim_id in chosen:
        claim = systems[host].backoffice.claim(claim_id)
        if claim is not None and claim.state is ClaimState.REVERSED:
            done.append((host, claim_id))
    return done


async def close_day(
    systems: Mapping[str, ProvinceSystem], rng: random.Random, *, plant: bool = True
) -> DayClose:
    """Reconcile today (China time) between every pair that settled claims, with one notice
    lost on its way when ``plant``; the host acts on what the home found, and states again."""
    close = DayClose(day=china_day(dt.datetime.now(dt.UTC)))
    day = close.day
    assert day is not None
    await _until(lambda: _notices_arrived(systems), NOTICES_WAIT_S)
    if plant:
        close.planted = _lose_one_notice(systems, rng)
    for host, system in systems.items():
        ids = await system.reconciler.reconcile_all(day)
        for record in await system.reconciler.wait_reconciled(ids, ANSWER_WAIT_S):
            close.first.append((host, record))
    for host, record in close.first:
        missing = [d for d in record.differences if d.kind is DifferenceKind.MISSING_AT_HOME]
        if not missing or any(d.responsible != host for d in missing):
            continue
        system = systems[host]
        for d in missing:  # the host's task: send the notice again
            await system.host.resend_notice(d.claim_id, operator="demo-ops")
        await _until(
            functools.partial(_noticed, systems[record.home], {d.claim_id for d in missing}),
            NOTICES_WAIT_S,
        )
        again = await system.reconciler.reconcile_day(record.home, day)
        for fresh in await system.reconciler.wait_reconciled([again], ANSWER_WAIT_S):
            close.restated.append((host, fresh))
    log.info(
        "day_closed", day=day.isoformat(), pairs=len(close.final()),
        matched=sum(r.outcome == "MATCHED" for r in close.final().values()),
    )  # fmt: skip
    return close


async def close_month(systems: Mapping[str, ProvinceSystem], close: DayClose) -> DayClose:
    """Month-end clearing of this month (China time): every host states what each home owes
    it, the homes answer; ``close.clearing`` gets each pair's latest statement (host side)."""
    month = china_month(dt.datetime.now(dt.UTC))
    close.month = month
    for system in systems.values():
        ids = await system.clearing.state_all(month)
        await system.clearing.wait_answered(ids, ANSWER_WAIT_S)
    for system in systems.values():
        close.clearing.extend(v for v in system.clearing.overview(month) if v.side == "host")
    log.info(
        "month_cleared", month=month, pairs=len(close.clearing),
        confirmed=sum(v.outcome == "CONFIRMED" for v in close.clearing),
    )  # fmt: skip
    return close


def _noticed(home: ProvinceSystem, claim_ids: set[str]) -> bool:
    return claim_ids <= {n.claim_id for n in home.backoffice.settlements()}


def _notices_arrived(systems: Mapping[str, ProvinceSystem]) -> bool:
    """Every settled claim's notice is at its home (when the home is simulated here)."""
    noticed = {n.claim_id for s in systems.values() for n in s.backoffice.settlements()}
    return all(
        c.claim.claim_id in noticed
        for s in systems.values()
        for c in s.backoffice.claims()
        if c.state in (ClaimState.SETTLED, ClaimState.REVERSED)
        and province_of(c.claim.home_region) in systems
    )


def _lose_one_notice(
    systems: Mapping[str, ProvinceSystem], rng: random.Random
) -> tuple[str, str, str] | None:
    """Delete one settled claim's notice at its home: a notice lost on its way."""
    candidates = sorted(
        (p, c.claim.person_id, c.claim.admitted_at.isoformat(),
         province_of(c.claim.home_region), c.claim.claim_id)
        for p, s in systems.items()
        for c in s.backoffice.claims()
        if c.state is ClaimState.SETTLED and province_of(c.claim.home_region) in systems
    )  # fmt: skip
    if not candidates:
        return None
    host, _, _, home, claim_id = rng.choice(candidates)
    with systems[home].backoffice.db.write() as cur:
        cur.execute("DELETE FROM settlements WHERE claim_id = ?", (claim_id,))
    log.info("notice_lost_on_purpose", host=host, home=home, claim_id=claim_id)
    return host, home, claim_id


async def _until(check: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``check()`` every 0.1 s for up to ``timeout_s``; whether it came true."""
    loop = asyncio.get_running_loop()
    limit = loop.time() + timeout_s
    while loop.time() < limit:
        if check():
            return True
        await asyncio.sleep(0.1)
    return bool(check())
