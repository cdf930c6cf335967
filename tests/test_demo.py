"""The main job and the peer commands, on their own embedded brokers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import pytest

from bus.broker import EmbeddedBroker
from bus.settings import BusSettings
from simulators.demo import run_demo
from simulators.invariants import ClaimFact, Facts, check_invariants
from simulators.population import check_char, id_number, valid_id
from simulators.scenario import Faults, Scenario

pytestmark = pytest.mark.broker


def _settled(claim_id: str = "C-1") -> ClaimFact:
    return ClaimFact(
        claim_id=claim_id, host="460000", home="130000", mode="DELAYED", state="SETTLED",
        expected="SETTLED", error_code=None, total_fen=10_000, fund_fen=7_000,
        personal_fen=3_000, payments=[("ADVANCE", 2_500), ("TOP_UP", 500)],
        notices_at_home=1, reviews_at_home=1,
    )  # fmt: skip


class TestChecker:
    def test_a_sound_day_passes(self) -> None:
        """Facts of a correctly settled claim pass every invariant."""
        assert all(c.ok for c in check_invariants(Facts(claims=[_settled()])))

    def test_a_second_refund_fails_the_checks(self) -> None:
        """A claim settled twice (an extra refund) fails 'exactly one terminal state' and
        'money conserved'."""
        bad = _settled()
        bad.payments.append(("REFUND", 500))
        failed = {c.name for c in check_invariants(Facts(claims=[bad])) if not c.ok}
        assert "every claim reached exactly one terminal state" in failed
        assert "money is conserved per claim and in total" in failed

    def test_an_advance_above_the_cap_fails(self) -> None:
        """An advance above 25% of the total fails the advance invariant."""
        bad = _settled()
        bad.payments = [("ADVANCE", 2_600), ("TOP_UP", 400)]
        failed = {c.name for c in check_invariants(Facts(claims=[bad])) if not c.ok}
        assert failed == {"no advance above 25% of the total (or the host's lower cap)"}

    def test_a_fault_that_did_not_surface_fails(self) -> None:
        """An injected fault whose code did not show fails the fault invariant."""
        facts = Facts(claims=[_settled()], refusals=[("NOT_FILED", "FILING_EXPIRED")])
        failed = {c.name for c in check_invariants(facts) if not c.ok}
        assert failed == {"every injected fault surfaced as the expected error code"}


class TestPopulation:
    def test_id_numbers_have_a_correct_check_character(self) -> None:
        """Generated ID numbers validate; the GB 11643 example 11010519491231002X holds."""
        assert check_char("11010519491231002") == "X"
        import datetime as dt

        assert valid_id(id_number("130102", dt.date(1952, 3, 15), 123))


class TestDemo:
    async def test_small_demo_passes_its_invariants(self) -> None:
        """A 120-visit day with every fault and a silent home, its desks on the gateways'
        HTTP API over loopback sockets, passes its invariants; the reviewers decided every
        held claim over HTTP."""
        scenario = Scenario(claims=120, seed=11, faults=Faults(silence_s=2.0, undecodable=0.02))
        report = await run_demo(scenario, BusSettings(), progress=False, http="sockets")
        failed = [c for c in report["invariants"] if not c["ok"]]
        assert not failed, failed
        assert report["dead_letters"] == 2
        codes = {row["code"] for row in report["errors_by_code_and_responsible"]}
        assert {"NOT_FILED", "HOSPITAL_NOT_DESIGNATED", "INVALID_MESSAGE"} <= codes
        reviews = report["reviews"]
        decided = sum(reviews["decisions"].get(k, 0) for k in ("approve", "adjust", "reject"))
        assert decided == reviews["acknowledged"] > 0
        assert reviews["decisions"].get("failed", 0) == 0

    @pytest.mark.timeout(150)  # two demos; once under CI load a filing stalled ~60 s (see note)
    async def test_same_seed_same_claims_and_money(self) -> None:
        """Two runs with one seed produce the same claims and money totals, though the
        gateways draw new admission (and so claim) ids each run."""
        scenario = Scenario(claims=40, seed=5, faults=Faults(silent_home=None))
        first, second = [await run_demo(scenario, BusSettings(), progress=False) for _ in "ab"]
        for key in ("claims_by_mode", "money_fen", "admissions_refused"):
            assert first[key] == second[key], key
        kinds = ("approve", "adjust", "reject")  # not "closed": which reviewer comes first
        assert [first["reviews"]["decisions"].get(k) for k in kinds] == [
            second["reviews"]["decisions"].get(k) for k in kinds
        ]


class TestPeers:
    @pytest.mark.timeout(240)
    async def test_province_and_simulate_complete_cycles_both_ways(self, tmp_path: Path) -> None:
        """``xsettle province 460000`` and ``xsettle simulate --except 460000`` on one broker
        settle claims in both directions (Hainan as host and as home)."""
        async with EmbeddedBroker() as broker:
            common = ["--bootstrap", broker.bootstrap, "--wait", "30"]  # no --linger: the
            # two end when the day reconciles between them
            exe = [sys.executable, "-m", "simulators.cli"]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            prov = await asyncio.create_subprocess_exec(
                *exe, "province", "460000", *common, "--json", str(tmp_path / "p.json"), env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            sim = await asyncio.create_subprocess_exec(
                *exe, "simulate", "--except", "460000", *common,
                "--json", str(tmp_path / "s.json"), env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out_p, _ = await prov.communicate()
            out_s, _ = await sim.communicate()
        assert prov.returncode == 0, out_p.decode()[-2000:]
        gateway = re.search(r"gateway 460000 \S+: (http://127\.0\.0\.1:\d+)", out_p.decode())
        assert gateway, out_p.decode()[:2000]  # printed for a person to query while it runs
        assert "xsettle-test-token-hospital" in out_p.decode()
        assert sim.returncode == 0, out_s.decode()[-2000:]
        as_host = json.loads((tmp_path / "p.json").read_text())
        as_home_peer = json.loads((tmp_path / "s.json").read_text())
        settled_at_hainan = sum(v.get("SETTLED", 0) for v in as_host["claims_by_mode"].values())
        settled_elsewhere = sum(
            v.get("SETTLED", 0) for v in as_home_peer["claims_by_mode"].values()
        )
        assert settled_at_hainan > 0  # simulated homes' persons treated in Hainan
        assert settled_elsewhere > 0  # Hainan's persons treated in simulated hosts
        assert as_host["ok"]
        assert as_home_peer["ok"]
        # The end of the day: Hainan stated its day to each simulated home that filed with it,
        # and answered each simulated host's statement; the other side the same, both MATCHED.
        hainan = as_host["reconciliation"]
        homes = {r["home"] for r in hainan["statements"]}
        assert homes, hainan
        assert "460000" not in homes
        assert {r["outcome"] for r in hainan["statements"]} == {"MATCHED"}
        heard = {h["host"]: h["outcome"] for h in hainan["stated_to_us"]}
        assert heard, hainan
        assert set(heard.values()) == {"MATCHED"}
        others = as_home_peer["reconciliation"]
        to_hainan = [r for r in others["statements"] if r["home"] == "460000"]
        assert {r["host"] for r in to_hainan} == set(heard)  # each host Hainan heard stated
        assert {h["home"] for h in others["stated_to_us"]} == homes
        assert "stated to us, answered here" in out_p.decode()
