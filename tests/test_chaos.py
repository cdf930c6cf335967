"""The crash harness: its load plan and kill schedule, its checker on planted facts, the state
it reads, and a small run with SIGKILLs on the embedded broker."""

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
from bus.store import OutRecord, SqlStore
from simulators.chaos import (
    Child,
    collect_facts,
    judge,
    kill_schedule,
    open_backoffice,
    outbox_size,
    plan_load,
    settle_allowance,
    summary_line,
)
from simulators.invariants import ClaimFact, Facts

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_RE = re.compile(r"^(\d+) kills: (\d+) claims, (\d+) lost, (\d+) doubled, (\d+) terminal$")
RUN_TIMEOUT_S = 140
"""Bound of the small run's process: its own --timeout 110 s, the broker, the checks. A
clean run takes about 65 s: a restarted province is deaf ~18 s, its peers linger ~30 s."""


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
