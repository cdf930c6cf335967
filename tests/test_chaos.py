"""The crash harness: its load plan and kill schedule, its checker on planted facts, the state
it reads, its failover figure on planted notes, and two small runs with SIGKILLs on the
embedded broker: one process a province on SQLite, two a province on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from adapters.backoffice import ClaimState, HostClaim, SqlBackOffice
from adapters.directory import Directory
from adapters.fixtures import lao_zhang_claim
from bus.models import ReviewDecision, ReviewResult, SettlementMode, SettlementNotice
from bus.pg import EmbeddedPostgres
from bus.store import OutRecord, SqlStore
from simulators.chaos import (
    HANDLED_TABLE,
    ChaosOptions,
    Child,
    Failover,
    Handled,
    LogEvent,
    chaos_databases,
    collect_facts,
    failover_summary,
    judge,
    kill_schedule,
    measure_failover,
    nearest_rank,
    open_backoffice,
    outbox_size,
    plan_load,
    read_events,
    read_handled,
    settle_allowance,
    summary_line,
)
from simulators.invariants import ClaimFact, Facts
from simulators.peers import Share

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_RE = re.compile(r"^(\d+) kills: (\d+) claims, (\d+) lost, (\d+) doubled, (\d+) terminal$")
RUN_TIMEOUT_S = 140
"""Bound of the small run's process: its own --timeout 110 s, the broker, the checks. A
clean run takes about 65 s: a restarted province is deaf ~18 s, its peers linger ~30 s."""
PG_RUN_TIMEOUT_S = 120
"""Bound of the two-instance run's process (its own --timeout 90 s); it takes about 60 s."""


def _settled(claim_id: str = "C-460000-X00001", **changes: Any) -> ClaimFact:
    """Lao Zhang's DELAYED claim, settled: advance 6,250 then top-up 1,250 yuan."""
    fact = ClaimFact(
        claim_id=claim_id, host="460000", home="130000", mode="DELAYED", state="SETTLED",
        expected="SETTLED", error_code=None, total_fen=2_500_000, fund_fen=1_750_000,
        personal_fen=750_000, payments=[("ADVANCE", 625_000), ("TOP_UP", 125_000)],
        notices_at_home=1, reviews_at_home=1,
    )  # fmt: skip
    return replace(fact, **changes)


class TestPlan:
    def test_default_provinces_get_about_the_claims_asked(self) -> None:
        """Among the four default provinces six agreements: 60 claims are 10 persons filed per
        agreement, and Hainan, host of three, visits 30."""
        load = plan_load(Directory.default(), ("460000", "130000", "440000", "530000"), 60)
        assert {p: (x.filings, x.visits) for p, x in load.items()} == {
            "460000": (10, 30),
            "130000": (10, 10),
            "440000": (10, 10),
            "530000": (10, 10),
        }

    def test_claims_are_rounded_up_to_whole_filings(self) -> None:
        """61 claims over six agreements: 11 per agreement, 66 in all."""
        load = plan_load(Directory.default(), ("460000", "130000", "440000", "530000"), 61)
        assert sum(x.visits for x in load.values()) == 66

    def test_provinces_without_an_agreement_are_refused(self) -> None:
        """Guangdong and Yunnan have no agreement with each other: nothing to run."""
        with pytest.raises(ValueError, match="no agreements"):
            plan_load(Directory.default(), ("440000", "530000"), 60)

    def test_the_kill_schedule_is_seeded_and_within_the_gaps(self) -> None:
        """Same seed, same moments; every gap within [min, max]; peers linger past the last."""
        moments = kill_schedule(7, 5, 0.5, 3.0)
        assert moments == kill_schedule(7, 5, 0.5, 3.0)
        assert moments != kill_schedule(8, 5, 0.5, 3.0)
        gaps = [b - a for a, b in zip([0.0, *moments], moments, strict=False)]
        assert all(0.49 <= g <= 3.01 for g in gaps)
        assert settle_allowance(moments) > moments[-1]
        assert kill_schedule(7, 0, 0.5, 3.0) == []


class TestJudge:
    def test_a_sound_claim_is_terminal_and_neither_lost_nor_doubled(self) -> None:
        """A settled claim with one advance, one top-up and its notice at home passes."""
        verdict = judge(Facts(claims=[_settled()]))
        assert (verdict.claims, verdict.terminal, verdict.lost, verdict.doubled) == (1, 1, {}, {})
        assert verdict.checks
        assert all(c.ok for c in verdict.checks)

    def test_a_second_advance_counts_as_doubled(self) -> None:
        """An advance charged twice is a double (and breaks the claim's money, so lost too)."""
        twice = _settled(payments=[("ADVANCE", 625_000), ("ADVANCE", 625_000), ("TOP_UP", 125_000)])
        verdict = judge(Facts(claims=[twice, _settled("C-2")]))
        assert list(verdict.doubled) == [twice.claim_id]
        assert "2 advances" in verdict.doubled[twice.claim_id]
        assert list(verdict.lost) == [twice.claim_id]
        assert summary_line(3, verdict) == "3 kills: 2 claims, 1 lost, 1 doubled, 2 terminal"

    def test_a_second_closing_payment_counts_as_doubled(self) -> None:
        """A refund after the top-up is a second closing payment."""
        bad = _settled(payments=[("ADVANCE", 625_000), ("TOP_UP", 125_000), ("REFUND", 125_000)])
        assert list(judge(Facts(claims=[bad])).doubled) == [bad.claim_id]

    def test_a_settled_claim_without_notice_at_home_counts_as_lost(self) -> None:
        """The host settled, the home never recorded the notice: lost, not doubled."""
        verdict = judge(Facts(claims=[_settled(notices_at_home=0)]))
        assert verdict.lost == {"C-460000-X00001": ["no settlement notice at home 130000"]}
        assert verdict.doubled == {}
        assert verdict.terminal == 1

    def test_an_open_claim_counts_as_lost_and_not_terminal(self) -> None:
        """A claim still waiting for its review at the end is lost."""
        open_claim = _settled(state="AWAITING_REVIEW", payments=[("ADVANCE", 625_000)])
        verdict = judge(Facts(claims=[open_claim]))
        assert verdict.terminal == 0
        assert verdict.lost == {open_claim.claim_id: ["not terminal (AWAITING_REVIEW)"]}
        assert not all(c.ok for c in verdict.checks)

    def test_a_refused_claim_paid_in_full_is_sound(self) -> None:
        """Refused: the advance and the rest paid in full make the total; no notice needed."""
        refused = _settled(
            state="REFUSED", error_code="NOT_FILED", expected="NOT_FILED", fund_fen=0,
            personal_fen=0, payments=[("ADVANCE", 625_000), ("FULL", 1_875_000)],
            notices_at_home=0, reviews_at_home=0,
        )  # fmt: skip
        verdict = judge(Facts(claims=[refused]))
        assert (verdict.terminal, verdict.lost, verdict.doubled) == (1, {}, {})

    def test_a_notice_recorded_twice_counts_as_doubled(self) -> None:
        """Two notices (or reviews) of one claim at its home are doubles."""
        verdict = judge(Facts(claims=[_settled(notices_at_home=2, reviews_at_home=2)]))
        assert verdict.doubled == {"C-460000-X00001": ["2 notices at home", "2 reviews at home"]}


def _review(claim_id: str) -> ReviewResult:
    return ReviewResult(
        claim_id=claim_id, decision=ReviewDecision.PARTIAL, total_fen=2_500_000,
        eligible_fen=2_307_500, deductible_fen=120_000, fund_fen=1_750_000,
        critical_illness_fen=0, assistance_fen=0, personal_fen=750_000, advance_fen=625_000,
        balance_fen=125_000, adjustments=(), reviewer="130100",
        reviewed_at=dt.datetime(2017, 5, 24, tzinfo=dt.UTC),
    )  # fmt: skip


class TestState:
    def test_the_province_file_holds_the_back_office(self, tmp_path: Path) -> None:
        """``province-<P>.sqlite3`` is the province's state; a folder without it has none."""
        assert open_backoffice(tmp_path, "460000") is None
        office = SqlBackOffice(tmp_path / "province-460000.sqlite3")
        office.save_claim(HostClaim(lao_zhang_claim(claim_id="C-1"), "r", ClaimState.SETTLED))
        office.close()
        found = open_backoffice(tmp_path, "460000")
        assert found is not None
        assert [c.claim.claim_id for c in found.claims()] == ["C-1"]
        found.close()

    def test_outbox_size_counts_rows_left(self, tmp_path: Path) -> None:
        """No database: 0; otherwise the rows its outbox still holds."""
        assert outbox_size(tmp_path, "460000") == 0
        store = SqlStore(tmp_path / "province-460000.sqlite3")
        with store.db.write():
            for t in ("a", "b"):
                store.add_outbox(OutRecord(t, None, b"v", ()))
        store.close()
        assert outbox_size(tmp_path, "460000") == 2

    def test_facts_join_host_claims_with_what_their_home_recorded(self, tmp_path: Path) -> None:
        """A claim settled at Hainan, with its payments, and its notice at Hebei's folder."""
        claim = lao_zhang_claim(SettlementMode.DELAYED, claim_id="C-460000-X00000")
        host = SqlBackOffice(tmp_path / "460000" / "province-460000.sqlite3")
        host.save_claim(
            HostClaim(claim, "r1", ClaimState.SETTLED, 625_000, _review(claim.claim_id), 125_000),
            payments=[("ADVANCE", 625_000), ("TOP_UP", 125_000)],
        )
        host.close()
        home = SqlBackOffice(tmp_path / "130000" / "province-130000.sqlite3")
        home.record_settlement(
            SettlementNotice(
                claim_id=claim.claim_id, personal_paid_fen=750_000, fund_fen=1_750_000,
                critical_illness_fen=0, assistance_fen=0,
                settled_at=dt.datetime(2017, 5, 24, tzinfo=dt.UTC),
            )
        )  # fmt: skip
        home.close()
        facts = collect_facts(tmp_path, ("460000", "130000"), Directory.default())
        [fact] = facts.claims
        assert (fact.host, fact.home, fact.state, fact.notices_at_home) == (
            "460000", "130000", "SETTLED", 1,
        )  # fmt: skip
        assert fact.payments == [("ADVANCE", 625_000), ("TOP_UP", 125_000)]
        verdict = judge(facts)
        assert (verdict.terminal, verdict.lost, verdict.doubled) == (1, {}, {})


KILL_AT = 1000.0
"""A kill moment (epoch seconds) in the planted failovers."""
VICTIM, SIBLING, RESTART = 10, 20, 30
"""Process ids in the planted failovers."""


def _failover(
    handled: list[Handled],
    *,
    sibling: list[LogEvent] | None = None,
    restart: list[LogEvent] | None = None,
    victim: list[LogEvent] | None = None,
    ready: bool = True,
) -> Failover:
    """The victim was assigned at 990 s and handled claim:0 and reply:1 before the kill at
    1000 s; the sibling (own partition claim:2) is assigned again at 1006 s."""
    before = [
        Handled(995.0, "claim:0", VICTIM),
        Handled(998.0, "reply:1", VICTIM),
        Handled(999.0, "claim:2", SIBLING),
    ]
    return measure_failover(
        0, "460000", "a", at_s=KILL_AT, victim_pid=VICTIM,
        victim_events=victim if victim is not None else [LogEvent(990.0, "partitions_assigned")],
        handled=sorted(before + handled, key=lambda h: h.at_s),
        siblings={SIBLING: sibling if sibling is not None
                  else [LogEvent(1006.0, "partitions_assigned")]},
        sibling_ready=ready,
        restart=(RESTART, restart) if restart is not None else None,
    )  # fmt: skip


class TestFailover:
    def test_the_survivor_answering_on_the_killed_ones_partitions_is_the_failover(self) -> None:
        """Kill at 1000 s; the sibling's first record on a partition the victim worked on
        (reply:1) at 1006.5 s: 6.5 s. Its own partition (claim:2) at 1006.1 s does not count."""
        f = _failover([Handled(1006.1, "claim:2", SIBLING), Handled(1006.5, "reply:1", SIBLING)])
        assert (f.failover_s, f.by, f.sibling_first_s, f.partitions) == (6.5, "sibling", 6.5, 2)
        assert f.sibling_assigned_s == 6.0
        assert f.measured
        assert f.reason == ""

    def test_records_on_the_survivors_own_partitions_are_not_a_failover(self) -> None:
        """Only claim:2 (the sibling's all along) handled after the kill: nothing measured."""
        f = _failover([Handled(1006.1, "claim:2", SIBLING), Handled(1007.0, "claim:2", SIBLING)])
        assert not f.measured
        assert f.reason == "nothing handled on its partitions in the takeover"

    def test_the_restart_may_answer_first(self) -> None:
        """The group gave claim:0 to the victim's restart (6.2 s) and reply:1 to the sibling
        (7.0 s): the failover is the first, by the restart; the survivor's is 7.0 s."""
        f = _failover(
            [Handled(1006.2, "claim:0", RESTART), Handled(1007.0, "reply:1", SIBLING)],
            restart=[LogEvent(1006.0, "partitions_assigned")],
        )
        assert (f.failover_s, f.by, f.sibling_first_s, f.restart_first_s) == (
            6.2, "restart", 7.0, 6.2,
        )  # fmt: skip

    def test_a_later_assignment_is_not_this_kills_failover(self) -> None:
        """The sibling got the victim's partitions only in a later rebalance (after it was
        revoked at 1010 s): not this kill's failover."""
        sibling = [
            LogEvent(1006.0, "partitions_assigned"),
            LogEvent(1010.0, "partitions_revoked"),
            LogEvent(1020.0, "partitions_assigned"),
        ]
        f = _failover([Handled(1021.0, "claim:0", SIBLING)], sibling=sibling)
        assert not f.measured

    def test_without_a_sibling_up_nothing_is_measured(self) -> None:
        """Both instances down (or the sibling still joining): no failover to measure."""
        f = _failover([Handled(1006.5, "reply:1", SIBLING)], ready=False)
        assert (f.measured, f.reason) == (False, "no sibling up")

    def test_a_victim_killed_mid_rebalance_held_nothing(self) -> None:
        """Revoked after its last assignment and killed before the next: no work of its own."""
        victim = [LogEvent(990.0, "partitions_assigned"), LogEvent(997.0, "partitions_revoked")]
        f = _failover([Handled(1006.5, "reply:1", SIBLING)], victim=victim)
        assert f.reason == "the victim held no partitions (rebalancing)"

    def test_the_summary_tells_survivor_from_restart(self) -> None:
        """Two by the survivor, one by the restart alone, one without a sibling: the survivor's
        figures count two, any process's three, and the others say why."""
        fs = [
            Failover(0, "460000", "a", failover_s=6.0, by="sibling", sibling_first_s=6.0),
            Failover(1, "460000", "b", failover_s=8.0, by="sibling", sibling_first_s=8.0),
            Failover(2, "130000", "a", failover_s=7.0, by="restart", restart_first_s=7.0),
            Failover(3, "130000", "b", reason="no sibling up"),
        ]
        summary = failover_summary(fs)
        assert summary["survivor"] == {"measured": 2, "p50_s": 6.0, "p99_s": 8.0, "max_s": 8.0}
        assert summary["any"]["measured"] == 3
        assert summary["any"]["first_by"] == {"sibling": 2, "restart": 1}
        assert summary["with_sibling_up"] == 3
        assert summary["unmeasured"] == {
            "no sibling up": 1, "the sibling got none of its partitions (its restart did)": 1,
        }  # fmt: skip

    def test_quantiles_are_by_nearest_rank(self) -> None:
        """p50 of 1..10 is 5; p99 of 40 values is the largest; nothing measured: None."""
        assert nearest_rank([float(x) for x in range(10, 0, -1)], 0.5) == 5.0
        assert nearest_rank([float(x) for x in range(40)], 0.99) == 39.0
        assert nearest_rank([], 0.5) is None

    def test_the_log_events_come_from_json_lines(self, tmp_path: Path) -> None:
        """Assignments and revocations with their times; other lines, a line that is not JSON
        and a line cut short by the kill are skipped."""
        path = tmp_path / "460000a-1.log"
        lines = [
            '{"province": "460000", "partitions": 8, "event": "partitions_assigned", '
            '"timestamp": "2026-11-24T15:21:12.500000Z"}',
            '{"event": "claim_settled", "timestamp": "2026-11-24T15:21:13Z"}',
            "listening: 460000 on 127.0.0.1:9092",
            '{"partitions": 8, "event": "partitions_revoked", "timestamp": "2026-11-24T15:21:18Z"}',
            '{"partitions": 7, "event": "partitions_assig',
        ]
        path.write_text("\n".join(lines), encoding="utf-8")
        base = dt.datetime(2026, 11, 24, 15, 21, 12, 500000, tzinfo=dt.UTC).timestamp()
        assert read_events(path) == [
            LogEvent(base, "partitions_assigned"),
            LogEvent(base + 5.5, "partitions_revoked"),
        ]
        assert read_events(tmp_path / "missing.log") == []


class TestShare:
    def test_every_person_is_in_exactly_one_share(self) -> None:
        """Two instances: each person filed and treated by one of them; about half each."""
        people = [f"46010219{n:010d}" for n in range(400)]
        shares = [Share(1, 2), Share(2, 2)]
        assert all(sum(s.mine(p) for s in shares) == 1 for p in people)
        assert 150 < sum(shares[0].mine(p) for p in people) < 250
        assert all(Share().mine(p) for p in people)

    def test_a_share_is_k_of_n(self) -> None:
        """``2/2`` is the second of two; 0/2, 3/2 and words are refused."""
        assert Share.parse("2/2") == Share(2, 2)
        for bad in ("0/2", "3/2", "half", "1-2"):
            with pytest.raises(ValueError, match="share"):
                Share.parse(bad)


class TestDatabases:
    def test_a_url_gets_its_databases_made_and_observed(
        self, postgres: EmbeddedPostgres, tmp_path: Path
    ) -> None:
        """``--database URL``: a missing database is created, its tables made and the
        trigger notes a received record with the process that logged it; a database that
        holds tables already is refused."""
        from bus.audit import RECEIVED, AuditEntry
        from bus.db import open_database
        from bus.store import SqlStore

        template = postgres.database_url(f"chaos_{os.getpid()}_{int(time.time())}_{{province}}")
        options = ChaosOptions(
            provinces=("460000",), claims=1, kill_at_s=(), seed=1, wait_s=1,
            answer_timeout_s=1, linger_s=1, timeout_s=1, folder=tmp_path, database=template,
            instances=2,
        )  # fmt: skip
        with chaos_databases(options) as urls:
            url = urls["460000"]
            store = SqlStore(open_database(url))
            try:
                with store.db.write():
                    store.audit.append([AuditEntry(
                        RECEIVED, 1_700_000_000_123, "xsettle.claim.460000", 2, 41, b"k",
                        b"v", (), "m-1",
                    )])  # fmt: skip
            finally:
                store.close()
            assert read_handled(url) == [
                Handled(1_700_000_000.123, "xsettle.claim.460000:2", os.getpid())
            ]
        with pytest.raises(ValueError, match="already holds"), chaos_databases(options):
            pass
        assert HANDLED_TABLE == "chaos_handled"


def _wait_exit(child: Child, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not child.poll() and time.monotonic() < deadline:
        time.sleep(0.05)


class TestChild:
    def test_a_child_that_exits_non_zero_by_itself_has_failed(self, tmp_path: Path) -> None:
        """Exit 3 without our signal: failed, and the log's tail says why."""
        child = Child("460000", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
                      dict(os.environ), tmp_path)  # fmt: skip
        child.start()
        _wait_exit(child)
        assert (child.outcome, child.returncode) == ("failed", 3)
        assert "boom" in child.log_tail()

    def test_a_killed_child_starts_again_with_a_log_per_start(self, tmp_path: Path) -> None:
        """SIGKILL ends the start (not a failure); the next start writes its own log."""
        child = Child("460000", [sys.executable, "-c", "import time; time.sleep(60)"],
                      dict(os.environ), tmp_path)  # fmt: skip
        child.start()
        first = child.pid
        assert child.kill()
        assert child.outcome == "killed"
        child.start()
        assert child.pid != first
        assert [p.name for p in child.logs] == ["460000-1.log", "460000-2.log"]
        assert child.kill()
        assert not child.kill()  # harmless once it is gone
        assert child.outcome == "killed"


@pytest.fixture(scope="module")
def chaos_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[str], dict[str, Any]]:
    """One small run: three provinces (INSTANT, DELAYED and POINT_TO_POINT agreements), ~300
    claims, three kills early enough to land while they work, on its own embedded broker."""
    folder = tmp_path_factory.mktemp("chaos")
    env = {k: v for k, v in os.environ.items() if k != "XSETTLE_BOOTSTRAP"}
    proc = subprocess.run(
        [sys.executable, "-m", "simulators.cli", "chaos",
         "--provinces", "460000,130000,440000", "--claims", "300", "--kills", "3",
         "--min-gap", "0.3", "--max-gap", "1.5", "--answer-timeout", "35", "--timeout", "110",
         "--dir", str(folder / "run"), "--json", str(folder / "chaos.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    summary = json.loads((folder / "chaos.json").read_text(encoding="utf-8"))
    return proc.returncode, lines, summary


@pytest.mark.broker
class TestRun:
    @pytest.mark.timeout(150)
    def test_three_kills_restart_and_the_state_is_judged(
        self, chaos_run: tuple[int, list[str], dict[str, Any]]
    ) -> None:
        """Three provinces each killed with SIGKILL and restarted; every claim found is
        judged and the last line sums it up."""
        code, lines, summary = chaos_run
        assert code in (0, 1), "\n".join(lines[-40:])
        match = SUMMARY_RE.match(lines[-1])
        assert match, lines[-1]
        kills, claims, lost, doubled, terminal = map(int, match.groups())
        assert kills == 3 == len(summary["kills"])
        assert sum(c["kills"] for c in summary["children"]) == 3
        assert all(c["starts"] == c["kills"] + 1 for c in summary["children"])
        assert sum(1 for line in lines if "kill -9" in line) == 3
        assert claims > 0
        assert (claims, lost, doubled, terminal) == (
            summary["claims"], len(summary["lost"]), len(summary["doubled"]), summary["terminal"],
        )  # fmt: skip
        assert summary["summary"] == lines[-1]

    @pytest.mark.timeout(150)
    def test_nothing_is_lost_or_doubled(
        self, chaos_run: tuple[int, list[str], dict[str, Any]]
    ) -> None:
        """After the kills every claim is terminal once, its money conserved, its notice at
        home, and every province finished by itself."""
        code, lines, summary = chaos_run
        assert summary["lost"] == {}
        assert summary["doubled"] == {}
        assert summary["failed_children"] == []
        assert summary["missing"] == 0
        assert code == 0, "\n".join(lines[-40:])


@pytest.fixture(scope="module")
def pg_chaos_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[str], dict[str, Any]]:
    """Two instances of each of three provinces on the embedded PostgreSQL, ~300 claims,
    three kills; a victim restarts 15 s later, so its sibling alone takes its partitions over
    (the group notices the death after the 6 s session timeout, and the embedded broker holds
    every rebalance ~3 s) and holds them a few seconds before the restart rejoins."""
    folder = tmp_path_factory.mktemp("chaos-pg")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XSETTLE_BOOTSTRAP", "XSETTLE_DATABASE_URL")
    }
    proc = subprocess.run(
        [sys.executable, "-m", "simulators.cli", "chaos",
         "--provinces", "460000,130000,440000", "--claims", "300", "--kills", "3",
         "--min-gap", "0.3", "--max-gap", "1.5", "--instances", "2",
         "--database", "embedded-postgres", "--restart-after", "15", "--answer-timeout", "35",
         "--linger", "20", "--timeout", "90",
         "--dir", str(folder / "run"), "--json", str(folder / "chaos.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=PG_RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    summary = json.loads((folder / "chaos.json").read_text(encoding="utf-8"))
    return proc.returncode, lines, summary


@pytest.mark.broker
class TestTwoInstancesOnPostgres:
    @pytest.mark.timeout(150)
    def test_nothing_is_lost_or_doubled(
        self, pg_chaos_run: tuple[int, list[str], dict[str, Any]]
    ) -> None:
        """Two processes a province on one database; three SIGKILLs; every claim terminal
        once, its money conserved, every process finished by itself, the outboxes empty."""
        code, lines, summary = pg_chaos_run
        match = SUMMARY_RE.match(lines[-1])
        assert match, "\n".join(lines[-40:])
        kills, claims, lost, doubled, terminal = map(int, match.groups())
        assert (kills, lost, doubled) == (3, 0, 0)
        assert claims == terminal == summary["claims"] > 0
        assert summary["missing"] == 0
        assert summary["failed_children"] == []
        assert [(c["province"], c["instance"]) for c in summary["children"]] == [
            (p, i) for p in ("460000", "130000", "440000") for i in "ab"
        ]
        assert all(c["outbox"] == 0 for c in summary["children"])
        assert summary["meta"]["database"] == "embedded-postgres"
        assert code == 0, "\n".join(lines[-40:])

    @pytest.mark.timeout(150)
    def test_the_survivor_takes_over_and_the_failover_is_measured(
        self, pg_chaos_run: tuple[int, list[str], dict[str, Any]]
    ) -> None:
        """Each kill's failover is measured or says why not; with a sibling up, the sibling
        handled the victim's work within seconds (the 6 s session timeout, the rebalance)."""
        _, lines, summary = pg_chaos_run
        failover = summary["failover"]
        assert failover["kills"] == len(failover["per_kill"]) == 3
        survivor = failover["survivor"]
        assert survivor["measured"] >= 1, json.dumps(failover, indent=1)
        assert 0 < survivor["p50_s"] <= survivor["p99_s"] < 30
        for f in failover["per_kill"]:
            assert (f["failover_s"] is None) == bool(f["reason"])
        assert any(line.startswith("  by the surviving sibling:") for line in lines)
