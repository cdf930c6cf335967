"""Crash harness: ``xsettle chaos`` kills province processes with SIGKILL and checks that a
restarted province resumes instead of losing or repeating work.

Each province runs as its own ``xsettle province`` process with its own state folder. At
random moments (seeded) a running one is killed with SIGKILL and started again at once with
the same command line and the same folder. When every process has finished, the state folders
are read back and judged: every claim terminal exactly once, at most one advance and one
closing payment per claim, every settlement notice at the home, money conserved, nothing left
in an outbox. The last line printed is ``K kills: N claims, L lost, D doubled, T terminal``.

The judging is a pure function of :class:`~simulators.invariants.Facts` (:func:`judge`), so a
test can plant a double advance or a missing notice and see it counted.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from adapters.backoffice import TERMINAL_STATES, ClaimState, SqlBackOffice
from adapters.directory import Directory, province_of
from adapters.rules import MAX_ADVANCE_PERMILLE
from bus.broker import EmbeddedBroker, create_contract_topics
from bus.settings import BusSettings
from bus.transport import wait_for_metadata
from simulators.invariants import Check, ClaimFact, Facts, check_invariants

log = structlog.get_logger(__name__)

DEFAULT_PROVINCES = ("460000", "130000", "440000", "530000")
"""Hainan, Hebei, Guangdong, Yunnan: among them the default directory's six agreements cover
INSTANT and DELAYED in both directions (Hainan as host and as home) and POINT_TO_POINT
(Hainan's persons treated in Guangdong)."""
POLL_S = 0.1
"""How often the children are polled; a child that exits is noticed within this."""
LOG_TAIL_LINES = 25
"""Lines of a failed child's log shown on the terminal: enough for a traceback."""
SHOWN_CLAIMS = 10
"""Lost or doubled claims listed by id on the terminal (all of them go to the JSON)."""
CLOSING_KINDS = ("TOP_UP", "REFUND", "FULL")
"""Payments that close a claim with the patient: at most one per claim."""
MONEY_CHECK = "money is conserved"
"""Start of the name of the per-claim money invariant in ``simulators.invariants``."""
REJOIN_S = 20.0
"""Seconds a restarted province is deaf: its consumer gets the inbox back only once the killed
one's group session expired (aiokafka's 10 s) and the group rebalanced; 18 s measured on the
embedded broker. Its peers must still be up when it comes back."""
SLACK_S = 5.0
"""Added to REJOIN_S for the restarted province to redo or resume its work."""
STARTUP_S = 10.0
"""Allowance for a province's first start: it joins its group in ~5 s on the embedded broker.
Kill moments count from when every province is ready, at most this long after the start."""
READY_MARKER = b"listening: "
"""What ``xsettle province`` prints once its node has its inbox (``simulators/peers.py``):
the harness prefers to kill provinces that are up and working, not ones still joining."""
ACTIVE_S = 1.0
"""A province whose log grew this recently is working (filing, admitting, reviewing,
settling): the harness prefers to kill one of those, since a crash mid-work is the test."""
MAX_POSTPONE_S = 5.0
"""Kill moments run on a busy clock (seconds during which some province is working), so
kills land mid-work; when nobody works (all waiting for a restarted peer, or done) a kill
still happens at most this long after its moment in wall-clock time."""
MIN_WAIT_S = 30.0
"""Least default ``--wait``: filings of a province still joining arrive after it joins."""
MIN_ANSWER_S = 60.0
"""Least default answer timeout of a province: the ``xsettle province`` default."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Signals that stop the harness cleanly (exit 128 + signal number)."""
_PR_SET_PDEATHSIG = 1
"""prctl option: signal delivered to a child when its parent dies, so no province outlives
a harness that was itself killed with SIGKILL."""


# --- load -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Load:
    """What one province process is asked to do."""

    province: str
    """Province code."""
    filings: int
    """Persons filed per agreement as home (``--filings``)."""
    visits: int
    """Visits of persons filed to it by the others (``--visits``): the claims it submits."""


def plan_load(directory: Directory, provinces: Sequence[str], claims: int) -> dict[str, Load]:
    """Filings and visits per province so that about ``claims`` claims are submitted.

    Every agreement between two of ``provinces`` gets the same number F of filed persons,
    F = ceil(claims / agreements); each host visits exactly the persons filed to it, F times
    its incoming agreements, so no host waits for filings that never come.
    """
    chosen = set(provinces)
    incoming: Counter[str] = Counter()
    for a in directory.agreements():
        home = province_of(a.home)
        if home in chosen and a.host in chosen and home != a.host:
            incoming[a.host] += 1
    agreements = sum(incoming.values())
    if agreements == 0:
        raise ValueError(f"no agreements among provinces {', '.join(provinces)}")
    per_agreement = max(1, math.ceil(claims / agreements))
    return {p: Load(p, per_agreement, per_agreement * incoming[p]) for p in provinces}


# --- state ----------------------------------------------------------------------------------
def province_db(state_dir: Path, province: str) -> Path:
    """The province's one database file in its state folder (see adapters/province.py)."""
    return state_dir / f"province-{province}.sqlite3"


def open_backoffice(state_dir: Path, province: str) -> SqlBackOffice | None:
    """The province's back office in its state folder, or None if it never wrote one."""
    path = province_db(state_dir, province)
    return SqlBackOffice(path) if path.is_file() else None


def outbox_size(state_dir: Path, province: str) -> int:
    """Records the province's outbox still holds (sent ones are deleted once acknowledged)."""
    path = province_db(state_dir, province)
    if not path.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])


def collect_facts(root: Path, provinces: Sequence[str], directory: Directory) -> Facts:
    """Every claim the hosts recorded, with its payments and what its home recorded."""
    offices = {p: open_backoffice(root / p, p) for p in provinces}
    try:
        notices: dict[str, Counter[str]] = {}
        reviews: dict[str, Counter[str]] = {}
        for p, office in offices.items():
            notices[p] = Counter(n.claim_id for n in office.settlements()) if office else Counter()
            reviews[p] = Counter(r.claim_id for r in office.reviews()) if office else Counter()
        facts = Facts()
        for p, office in offices.items():
            if office is None:
                continue
            cap = min(MAX_ADVANCE_PERMILLE, directory.max_advance_permille(p))
            for c in office.claims():
                claim_id = c.claim.claim_id
                home = province_of(c.claim.home_region)
                r = c.review
                facts.claims.append(
                    ClaimFact(
                        claim_id=claim_id,
                        host=p,
                        home=home,
                        mode=c.claim.settlement_mode.value,
                        state=c.state.value,
                        expected=c.error_code or c.state.value,  # no fault is injected
                        error_code=c.error_code,
                        total_fen=c.claim.total_fen,
                        fund_fen=r.fund_fen if r else 0,
                        critical_illness_fen=r.critical_illness_fen if r else 0,
                        assistance_fen=r.assistance_fen if r else 0,
                        personal_fen=r.personal_fen if r else 0,
                        payments=[(k, f) for _, k, f in office.payments(claim_id)],
                        notices_at_home=notices.get(home, Counter())[claim_id],
                        reviews_at_home=reviews.get(home, Counter())[claim_id],
                        advance_cap_permille=cap,
                    )
                )
        return facts
    finally:
        for office in offices.values():
            if office is not None:
                office.close()


# --- judging --------------------------------------------------------------------------------
@dataclass
class Verdict:
    """Claims lost or doubled, with the reason for each, and the invariants."""

    claims: int = 0
    terminal: int = 0
    lost: dict[str, list[str]] = field(default_factory=dict)
    """Claim id → why it counts as lost (not terminal, no notice at home, money)."""
    doubled: dict[str, list[str]] = field(default_factory=dict)
    """Claim id → what happened twice (advance, closing payment, notice, review)."""
    checks: list[Check] = field(default_factory=list)
    """The invariants of ``simulators.invariants`` that apply to a crash run."""


def _money_conserved(fact: ClaimFact) -> bool:
    """The per-claim money rule of ``check_invariants``, applied to one claim."""
    checks = check_invariants(Facts(claims=[fact]))
    return next(c for c in checks if c.name.startswith(MONEY_CHECK)).ok


def judge(facts: Facts) -> Verdict:
    """Count lost, doubled and terminal claims. A claim can be both lost and doubled (a
    second advance also breaks its money)."""
    verdict = Verdict(claims=len(facts.claims))
    for c in facts.claims:
        lost: list[str] = []
        doubled: list[str] = []
        terminal = c.state in {s.value for s in TERMINAL_STATES}
        if terminal:
            verdict.terminal += 1
        else:
            lost.append(f"not terminal ({c.state})")
        if c.state == ClaimState.SETTLED.value and c.notices_at_home == 0:
            lost.append(f"no settlement notice at home {c.home}")
        if terminal and not _money_conserved(c):
            paid = ", ".join(f"{kind} {fen}" for kind, fen in c.payments) or "no payment"
            lost.append(f"money not conserved ({paid}; personal {c.personal_fen})")
        advances = sum(1 for kind, _ in c.payments if kind == "ADVANCE")
        closings = sum(1 for kind, _ in c.payments if kind in CLOSING_KINDS)
        if advances > 1:
            doubled.append(f"{advances} advances")
        if closings > 1:
            doubled.append(f"{closings} closing payments")
        if c.notices_at_home > 1:
            doubled.append(f"{c.notices_at_home} notices at home")
        if c.reviews_at_home > 1:
            doubled.append(f"{c.reviews_at_home} reviews at home")
        if lost:
            verdict.lost[c.claim_id] = lost
        if doubled:
            verdict.doubled[c.claim_id] = doubled
    applicable = ("every claim", MONEY_CHECK, "no advance")  # the fault check needs a plan
    verdict.checks = [
        c for c in check_invariants(facts) if c.name.startswith(applicable) and facts.claims
    ]
    return verdict


# --- children -------------------------------------------------------------------------------
def xsettle_argv() -> list[str]:
    """How to run ``xsettle`` from the running interpreter's environment."""
    script = Path(sys.executable).parent / "xsettle"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from simulators.cli import main; raise SystemExit(main())"]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    """One province process and its restarts."""

    province: str
    argv: list[str]
    """The same command line for every start."""
    env: dict[str, str]
    log_dir: Path
    """Where ``<P>-<start>.log`` files go, one per start."""
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    starts: int = 0
    kills: int = 0
    """Starts ended by our SIGKILL."""
    outcome: str = "running"
    """running, killed (by us, until started again), finished (exit 0), failed (exit ≠ 0
    by itself), or timed out."""
    returncode: int | None = None
    logs: list[Path] = field(default_factory=list)
    ready: bool = False
    """The current start printed READY_MARKER (its node has its inbox)."""
    log_size: int = 0
    grew_at: float = 0.0
    """When the current start's log last grew (monotonic seconds)."""

    def start(self) -> None:
        """Start (or start again) with the same command line and state folder."""
        self.starts += 1
        path = self.log_dir / f"{self.province}-{self.starts}.log"
        self.logs.append(path)
        with path.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # our Ctrl-C is ours to handle, not the children's
                preexec_fn=_die_with_parent,  # only calls prctl; no locks taken
            )
        self.started_at = time.monotonic()
        self.outcome = "running"
        self.ready = False
        self.log_size = 0
        log.debug(
            "chaos_child_started", province=self.province, pid=self.proc.pid, start=self.starts
        )

    @property
    def pid(self) -> int:
        """Process id of the current start."""
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> bool:
        """SIGKILL the process group of the current start and reap it. False if the process
        had exited by itself first (then ``outcome`` says how)."""
        if self.proc is None or self.poll() or self.outcome != "running":
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait()
        if code == -signal.SIGKILL:
            self.outcome = "killed"
            return True
        self._exited_with(code)  # by itself, just before the signal
        return False

    def poll(self) -> bool:
        """Whether the process exited by itself (sets ``outcome``); notes ``ready``."""
        if self.outcome != "running" or self.proc is None:
            return False
        with contextlib.suppress(OSError):
            size = self.logs[-1].stat().st_size
            if size != self.log_size:
                self.log_size, self.grew_at = size, time.monotonic()
                self.ready = self.ready or READY_MARKER in self.logs[-1].read_bytes()
        code = self.proc.poll()
        if code is None:
            return False
        self._exited_with(code)
        return True

    def _exited_with(self, code: int) -> None:
        self.returncode = code
        self.outcome = "finished" if code == 0 else "failed"

    @property
    def active(self) -> bool:
        """Up and working: ready, and its log grew within ACTIVE_S."""
        return self.ready and time.monotonic() - self.grew_at < ACTIVE_S

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the current start's log."""
        if not self.logs or not self.logs[-1].is_file():
            return ""
        text = self.logs[-1].read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


# --- the run --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ChaosOptions:
    """What ``xsettle chaos`` was asked for."""

    provinces: tuple[str, ...]
    """Province codes, one process each."""
    claims: int
    """About this many claims in all."""
    kill_at_s: tuple[float, ...]
    """Moments at which one running province is killed, in seconds on the busy clock from
    when every province is ready (see :func:`kill_schedule` and MAX_POSTPONE_S)."""
    seed: int
    """Seed of the schedule, the victims and the provinces' simulated persons."""
    wait_s: float
    """Each province's ``--wait``: how long it waits for the filings it serves."""
    answer_timeout_s: float
    """Each province's ``--timeout``: how long it waits for its claims to close."""
    linger_s: float
    """Each province's ``--linger``: how long it keeps answering after that."""
    timeout_s: float
    """Overall bound; provinces still running then are killed and count as failed."""
    folder: Path
    """State folders ``<P>/`` and logs ``<P>-<start>.log``."""
    bootstrap: str | None = None
    """A broker to use; None starts the embedded one on 127.0.0.1."""
    directory_file: str | None = None
    """Directory TOML given to every province; None: the packaged one."""
    json_path: Path | None = None
    """JSON summary; None: ``<folder>/chaos-report.json``."""


def kill_schedule(seed: int, kills: int, min_gap_s: float, max_gap_s: float) -> list[float]:
    """Kill moments in seconds from the start: gaps drawn uniformly in [min, max] from the
    seed, so a run is repeated with the same seed (the victims depend on who is still up)."""
    rng = random.Random(seed)
    moments: list[float] = []
    at = 0.0
    for _ in range(kills):
        at += rng.uniform(min_gap_s, max_gap_s)
        moments.append(round(at, 2))
    return moments


def settle_allowance(kill_at_s: Sequence[float]) -> float:
    """How long after the provinces are ready the last kill can still hold up a peer: it
    happens (postponed at most MAX_POSTPONE_S), then the victim is deaf for REJOIN_S and
    redoes its work. Peers must linger (and wait) at least this long."""
    if not kill_at_s:
        return REJOIN_S + SLACK_S
    return kill_at_s[-1] + MAX_POSTPONE_S + REJOIN_S + SLACK_S


def _say(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - the harness reports on the terminal by design


class Chaos:
    """Children, their kills and restarts, until every one has finished or time is up."""

    def __init__(self, options: ChaosOptions, load: dict[str, Load], bootstrap: str) -> None:
        self.options = options
        self.load = load
        self.bootstrap = bootstrap
        self.rng = random.Random(options.seed + 1)  # the victims; the schedule used the seed
        self.kill_log: list[dict[str, Any]] = []
        self.children = [self._child(p) for p in options.provinces]
        self.began = 0.0

    def _child(self, province: str) -> Child:
        o = self.options
        load = self.load[province]
        state = o.folder / province
        state.mkdir(parents=True, exist_ok=True)
        argv = [
            *xsettle_argv(), "province", province, "--bootstrap", self.bootstrap,
            "--state-dir", str(state), "--filings", str(load.filings),
            "--visits", str(load.visits), "--wait", str(o.wait_s),
            "--timeout", str(o.answer_timeout_s), "--linger", str(o.linger_s),
            "--seed", str(o.seed), "--json", str(state / "report.json"),
        ]  # fmt: skip
        if o.directory_file:
            argv += ["--directory", o.directory_file]
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # a killed child's log keeps its last lines
        if o.bootstrap is None:
            env.setdefault("XSETTLE_IDEMPOTENCE", "false")  # the embedded broker cannot do it
        return Child(province, argv, env, o.folder)

    def elapsed(self) -> float:
        """Seconds since the children were first started."""
        return time.monotonic() - self.began

    def running(self) -> list[Child]:
        """Children whose process is up."""
        return [c for c in self.children if c.outcome == "running"]

    def stop_all(self) -> None:
        """SIGKILL every child still running. Harmless twice."""
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()

    async def run(self) -> None:
        """Start every child; kill and restart one at seeded random moments; return when all
        have finished or the overall timeout passed (the rest are then killed).

        The moments count from when every province is ready, on a busy clock that runs
        while one is working (see MAX_POSTPONE_S)."""
        o = self.options
        self.began = time.monotonic()
        for c in self.children:
            c.start()
        deadline = self.began + o.timeout_s
        pending = list(o.kill_at_s)
        clock: float | None = None  # wall time when every province was first ready
        busy = 0.0  # seconds since then during which some province was working
        tick = self.began
        while self.running():
            for c in self.children:
                if c.poll():
                    self._exited(c)
            now = time.monotonic()
            if clock is not None and any(c.active for c in self.running()):
                busy += now - tick
            tick = now
            if clock is None and (
                all(c.ready or c.outcome != "running" for c in self.children)
                or now >= self.began + STARTUP_S
            ):
                clock = now
                _say(f"{self.elapsed():7.1f} s  provinces ready: kill clock starts")
            if now >= deadline:
                for c in self.running():
                    if not c.kill():
                        self._exited(c)
                        continue
                    c.outcome = "timed out"  # not restarted: counts as not finished
                    _say(f"{self.elapsed():7.1f} s  {c.province} still running at the "
                         f"{o.timeout_s:.0f} s timeout: killed")  # fmt: skip
                break
            due = (
                clock is not None
                and bool(pending)
                and (busy >= pending[0] or now >= clock + pending[0] + MAX_POSTPONE_S)
            )
            if due and self.running() and self._kill_one():
                pending.pop(0)
            await asyncio.sleep(POLL_S)
        if pending:
            _say(
                f"only {len(self.kill_log)} of {len(o.kill_at_s)} kills: every province had "
                "finished before the rest"
            )

    def _kill_one(self) -> bool:
        """Kill a running province and start it again at once: one that is working if any,
        else one that is up (idle or lingering), else one still joining its group. False if
        the victim exited by itself in the meantime (it is not restarted)."""
        running = self.running()
        active = [c for c in running if c.active]
        ready = [c for c in running if c.ready]
        victim = self.rng.choice(active or ready or running)
        state = "working" if active else "idle" if ready else "joining"
        uptime = time.monotonic() - victim.started_at
        pid = victim.pid
        if not victim.kill():
            self._exited(victim)
            return False
        victim.kills += 1
        victim.start()
        self.kill_log.append(
            {"t_s": round(self.elapsed(), 2), "province": victim.province, "pid": pid,
             "uptime_s": round(uptime, 2), "state": state,
             "restarted_pid": victim.pid}
        )  # fmt: skip
        _say(
            f"{self.elapsed():7.1f} s  kill -9 {victim.province} pid {pid} after {uptime:.1f} s "
            f"up ({state}); restarted as pid {victim.pid} "
            f"(start {victim.starts})"
        )
        return True

    def _exited(self, c: Child) -> None:
        if c.outcome == "finished":
            _say(f"{self.elapsed():7.1f} s  {c.province} finished (exit 0, {c.starts} starts)")
            return
        _say(f"{self.elapsed():7.1f} s  {c.province} FAILED with exit {c.returncode} "
             f"(start {c.starts}); log {c.logs[-1]}:")  # fmt: skip
        for line in c.log_tail().splitlines():
            _say(f"    | {line}")


# --- report ---------------------------------------------------------------------------------
def summary_line(kills: int, verdict: Verdict) -> str:
    """The last line of the run."""
    return (
        f"{kills} kills: {verdict.claims} claims, {len(verdict.lost)} lost, "
        f"{len(verdict.doubled)} doubled, {verdict.terminal} terminal"
    )


def build_summary(
    chaos: Chaos, facts: Facts, verdict: Verdict, outboxes: dict[str, int], duration_s: float
) -> dict[str, Any]:
    """The machine-readable summary."""
    o = chaos.options
    planned = sum(load.visits for load in chaos.load.values())
    failed = [c.province for c in chaos.children if c.outcome != "finished"]
    ok = (
        not verdict.lost
        and not verdict.doubled
        and not failed
        and not any(outboxes.values())
        and all(c.ok for c in verdict.checks)
    )
    by_host = Counter(f.host for f in facts.claims)
    return {
        "meta": {
            "provinces": list(o.provinces), "seed": o.seed, "claims_requested": o.claims,
            "claims_planned": planned, "kill_at_s": list(o.kill_at_s),
            "broker": chaos.bootstrap, "folder": str(o.folder), "wait_s": o.wait_s,
            "answer_timeout_s": o.answer_timeout_s, "linger_s": o.linger_s,
            "timeout_s": o.timeout_s,
        },
        "load": {p: {"filings": x.filings, "visits": x.visits} for p, x in chaos.load.items()},
        "kills": chaos.kill_log,
        "children": [
            {"province": c.province, "starts": c.starts, "kills": c.kills,
             "outcome": c.outcome, "returncode": c.returncode,
             "claims_as_host": by_host[c.province], "outbox": outboxes.get(c.province, 0),
             "logs": [str(p) for p in c.logs]}
            for c in chaos.children
        ],
        "claims": verdict.claims, "terminal": verdict.terminal,
        "missing": max(0, planned - verdict.claims),
        "lost": verdict.lost, "doubled": verdict.doubled,
        "invariants": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in verdict.checks],
        "failed_children": failed,
        "duration_s": round(duration_s, 2),
        "ok": ok,
        "summary": summary_line(len(chaos.kill_log), verdict),
    }  # fmt: skip


def render_summary(summary: dict[str, Any]) -> Iterator[str]:
    """The summary a person reads; its last line is :func:`summary_line`."""
    meta = summary["meta"]
    yield ""
    yield (
        f"== xsettle chaos: {len(summary['kills'])} kills over {len(meta['provinces'])} "
        f"provinces in {summary['duration_s']:.0f} s, seed {meta['seed']} =="
    )
    yield f"{'province':<10}{'starts':>7}{'kills':>7}  {'outcome':<11}{'claims':>7}{'outbox':>8}"
    for c in summary["children"]:
        yield (
            f"{c['province']:<10}{c['starts']:>7}{c['kills']:>7}  {c['outcome']:<11}"
            f"{c['claims_as_host']:>7}{c['outbox']:>8}"
        )
    yield f"claims planned {meta['claims_planned']}, found {summary['claims']}" + (
        f" ({summary['missing']} never submitted)" if summary["missing"] else ""
    )
    for check in summary["invariants"]:
        yield f"  [{'ok' if check['ok'] else 'FAIL'}] {check['name']}: {check['detail']}"
    for title, claims in (("lost", summary["lost"]), ("doubled", summary["doubled"])):
        if claims:
            yield f"{title} ({len(claims)}, first {min(len(claims), SHOWN_CLAIMS)}):"
            for claim_id, why in list(claims.items())[:SHOWN_CLAIMS]:
                yield f"  {claim_id}: {'; '.join(why)}"
    if summary["failed_children"]:
        yield f"children that did not finish: {', '.join(summary['failed_children'])}"
    left = [f"{c['province']} {c['outbox']}" for c in summary["children"] if c["outbox"]]
    if left:
        yield f"records left in an outbox: {', '.join(left)}"
    yield f"state and logs in {meta['folder']}"
    yield summary["summary"]


# --- command --------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _broker(options: ChaosOptions, provinces: Sequence[str]) -> AsyncIterator[str]:
    """The bootstrap to use, with the contract topics: ``--bootstrap`` or an embedded broker
    on 127.0.0.1 (stopped on exit)."""
    settings = BusSettings.from_env(bootstrap=options.bootstrap)
    if settings.bootstrap is not None:
        await wait_for_metadata(settings, settings.bootstrap)
        await create_contract_topics(settings, settings.bootstrap, list(provinces))
        yield settings.bootstrap
        return
    async with EmbeddedBroker() as broker:  # 127.0.0.1, a free port
        effective = settings.with_bootstrap(broker.bootstrap, embedded=True)
        await create_contract_topics(effective, broker.bootstrap, list(provinces))
        yield broker.bootstrap


async def run_chaos(options: ChaosOptions) -> dict[str, Any]:
    """Run the harness and return its summary (written to ``json_path`` if given)."""
    directory = (
        Directory.load(options.directory_file) if options.directory_file else Directory.default()
    )
    unknown = [p for p in options.provinces if p not in directory.provinces()]
    if unknown:
        raise ValueError(f"not in the directory: {', '.join(unknown)}")
    used = [p for p in options.provinces if any((options.folder / p).glob("*.sqlite3"))]
    if used:
        raise ValueError(f"{options.folder} already holds state of {', '.join(used)}")
    load = plan_load(directory, options.provinces, options.claims)
    began = time.monotonic()
    async with _broker(options, directory.provinces()) as bootstrap:
        chaos = Chaos(options, load, bootstrap)
        atexit.register(chaos.stop_all)  # an exit that skips the finally below
        plan = ", ".join(f"{x.province} {x.filings}/{x.visits}" for x in chaos.load.values())
        _say(
            f"xsettle chaos: {len(options.provinces)} provinces (filings/visits: {plan}), "
            f"broker {bootstrap}, seed {options.seed}; state in {options.folder}"
        )
        _say(
            f"{len(options.kill_at_s)} kills at {', '.join(f'{t:.1f}' for t in options.kill_at_s)}"
            f" s; provinces wait {options.wait_s:.0f} s for filings, "
            f"{options.answer_timeout_s:.0f} s for answers, linger {options.linger_s:.0f} s; "
            f"overall timeout {options.timeout_s:.0f} s"
        )
        try:
            await chaos.run()
        finally:
            chaos.stop_all()
            atexit.unregister(chaos.stop_all)
    facts = collect_facts(options.folder, options.provinces, directory)
    verdict = judge(facts)
    outboxes = {p: outbox_size(options.folder / p, p) for p in options.provinces}
    summary = build_summary(chaos, facts, verdict, outboxes, time.monotonic() - began)
    json_path = options.json_path or options.folder / "chaos-report.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    return summary


async def cmd_chaos(args: argparse.Namespace) -> int:
    """``xsettle chaos``."""
    if not 0 < args.min_gap <= args.max_gap:
        _say("xsettle chaos: need 0 < --min-gap <= --max-gap")
        return 2
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="xsettle-chaos-"))
    kill_at = kill_schedule(args.seed, max(0, args.kills), args.min_gap, args.max_gap)
    settle = settle_allowance(kill_at)
    wait = args.wait if args.wait is not None else max(MIN_WAIT_S, STARTUP_S + settle)
    answers = args.answer_timeout if args.answer_timeout is not None else max(MIN_ANSWER_S, settle)
    linger = args.linger if args.linger is not None else settle
    worst = STARTUP_S + settle + wait + answers + linger  # a restart at the last kill redoes all
    options = ChaosOptions(
        provinces=tuple(dict.fromkeys(args.provinces.split(","))) if args.provinces
        else DEFAULT_PROVINCES,
        claims=max(1, args.claims), kill_at_s=tuple(kill_at), seed=args.seed, wait_s=wait,
        answer_timeout_s=answers, linger_s=linger,
        timeout_s=args.timeout if args.timeout is not None else worst,
        folder=folder.resolve(), bootstrap=args.bootstrap, directory_file=args.directory,
        json_path=Path(args.json) if args.json else None,
    )  # fmt: skip
    run = asyncio.create_task(run_chaos(options))
    stopped_by: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        stopped_by.append(sig)
        run.cancel()  # the children are killed and the broker stopped on the way out

    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:  # SIGINT too: a shell starts background jobs ignoring it
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop, sig)
    try:
        summary = await run
    except ValueError as exc:
        _say(f"xsettle chaos: {exc}")
        return 2
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        _say(f"xsettle chaos: stopped by {stopped_by[0].name}; provinces killed, broker stopped")
        return 128 + stopped_by[0].value
    finally:
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    for line in render_summary(summary):
        _say(line)
    return 0 if summary["ok"] else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``chaos``."""
    from simulators.cli import add_bootstrap

    p = sub.add_parser(
        "chaos", help="kill -9 province processes at random and check nothing was lost or doubled"
    )
    add_bootstrap(p)
    p.add_argument(
        "--provinces",
        default=None,
        help=f"comma-separated province codes (default {','.join(DEFAULT_PROVINCES)})",
    )
    p.add_argument(
        "--claims", type=int, default=1000,
        help="about this many claims in all (1000 keep four provinces busy ~6 s)",
    )  # fmt: skip
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs in all")
    p.add_argument("--seed", type=int, default=20170523, help="seed of kill moments and victims")
    p.add_argument(
        "--min-gap", type=float, default=0.5,
        help="least seconds between two kills (the first counts from when all are ready)",
    )  # fmt: skip
    p.add_argument("--max-gap", type=float, default=3.0, help="most seconds between two kills")
    derived = "default: last kill + 30 s (rejoin and redo), so a peer outlives a restart"
    p.add_argument(
        "--wait", type=float, default=None,
        help=f"each province: seconds to wait for the filings it serves ({derived}, >= 30)",
    )  # fmt: skip
    p.add_argument(
        "--answer-timeout", type=float, default=None,
        help=f"each province: seconds to wait for its claims to close ({derived}, >= 60)",
    )  # fmt: skip
    p.add_argument(
        "--linger", type=float, default=None,
        help=f"each province: seconds to keep answering after its claims closed ({derived})",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=float, default=None,
        help="overall seconds; provinces still running then are killed and count as failed "
        "(default: wait + answer timeout + linger + the allowance above)",
    )  # fmt: skip
    p.add_argument("--dir", default=None, help="state folders and logs (default: a new temp one)")
    p.add_argument("--directory", default=None, help="directory TOML file (default: packaged)")
    p.add_argument("--json", default=None, help="JSON summary (default: DIR/chaos-report.json)")
    p.set_defaults(run=cmd_chaos)
