"""The hostile-record harness: its planning and classification, and a small run on the broker."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from adapters.directory import Directory
from bus.codec import Codec
from bus.constants import MAX_RECORD_BYTES
from bus.deadletter import dead_letter
from bus.settings import BusSettings
from bus.transport import Partition, Record
from simulators.cli import build_parser
from simulators.fuzz import (
    ANSWERED,
    DEAD_LETTERED,
    FAMILIES,
    HANDLED,
    REPORTED,
    SILENT,
    FuzzOptions,
    FuzzResult,
    Parties,
    Planner,
    Seen,
    Sent,
    classify,
    render,
    run_fuzz,
)
from tests.conftest import ProvincePool

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_RE = re.compile(
    r"^(\d+) records: (\d+) dead-lettered, (\d+) reported, (\d+) answered, (\d+) handled, "
    r"(\d+) silent$"
)
SENT = Sent("bit_flip", "claim", "xsettle.claim.460000", 1, 17, "m-1")
"""A sent record as the classifier sees it."""


def planner(seed: int = 7) -> Planner:
    """A planner for Hainan and its first partner."""
    return Planner(Parties.choose(Directory.default(), "460000"), Codec(), seed)


class TestClassify:
    def test_dead_letter_naming_the_coordinates_wins(self) -> None:
        """A record both dead-lettered and reported counts as dead-lettered."""
        seen = Seen(
            dead_lettered={("xsettle.claim.460000", 1, 17): "bad_marker"}, reported_ids={"m-1"}
        )
        assert classify(SENT, seen, lambda _: True) == DEAD_LETTERED

    def test_report_by_coordinates_or_correlation(self) -> None:
        """An ErrorReport names a record by its ref coordinates or by correlation id."""
        by_coords = Seen(reported_at={("xsettle.claim.460000", 1, 17)})
        by_id = Seen(reported_ids={"m-1"}, answered_ids={"m-1"})
        assert classify(SENT, by_coords, lambda _: False) == REPORTED
        assert classify(SENT, by_id, lambda _: False) == REPORTED

    def test_answered_then_handled_then_silent(self) -> None:
        """A reply names a record by correlation id; else the store's processed mark; else
        the record is silent."""
        assert classify(SENT, Seen(answered_ids={"m-1"}), lambda _: True) == ANSWERED
        assert classify(SENT, Seen(), lambda mid: mid == "m-1") == HANDLED
        assert classify(SENT, Seen(), lambda _: False) == SILENT
        anonymous = Sent("missing_header", "claim", "xsettle.claim.460000", 1, 18, None)
        assert classify(anonymous, Seen(answered_ids={"m-1"}), lambda _: True) == SILENT

    def test_seen_reads_dead_letters_by_their_original_coordinates(self) -> None:
        """A dead letter in the DLQ topic marks the record it copies."""
        original = Record("xsettle.claim.460000", 1, 17, 1, b"k", b"junk", ())
        letter = dead_letter(original, kind="bad_marker", error="e", group="g", province="460000")
        seen = Seen()
        seen.take(Record(letter.topic, 0, 0, 1, letter.key, letter.value, letter.headers), Codec())
        assert seen.dead_lettered == {("xsettle.claim.460000", 1, 17): "bad_marker"}


class TestPlanner:
    def test_same_seed_same_plan(self) -> None:
        """Two planners with one seed plan the same mutation kinds and values."""
        a, b = planner().plan(300, 2), planner().plan(300, 2)
        assert [(p.kind, p.topic, len(p.value)) for p in a] == [
            (p.kind, p.topic, len(p.value)) for p in b
        ]

    def test_plan_has_the_size_and_kinds_asked(self) -> None:
        """A plan has exactly the records asked, the oversized ones over the limit and
        written raw, like the ones with a header key that is not UTF-8."""
        plan = planner().plan(400, 3)
        assert len(plan) == 400
        oversized = [p for p in plan if p.kind == "oversized"]
        assert len(oversized) == 3
        assert all(len(p.value) > MAX_RECORD_BYTES and p.raw for p in oversized)
        assert all(p.raw for p in plan if p.kind == "non_utf8_header_key")
        assert not any(p.raw for p in plan if p.kind == "valid")
        assert tuple(p.family for p in plan[: len(FAMILIES)]) == FAMILIES  # controls first
        assert len({p.kind for p in plan}) >= 15

    def test_duplicates_share_their_message_id(self) -> None:
        """A duplicate is sent twice with one message id."""
        plan = planner().plan(400, 0)
        ids = [p.message_id for p in plan if p.kind == "duplicate"]
        assert ids
        assert all(ids.count(i) == 2 for i in ids)


class TestReport:
    def test_last_line_and_exit_verdict(self) -> None:
        """The report ends with the summary line; one silent record fails the run."""
        result = FuzzResult(
            outcomes=[(SENT, DEAD_LETTERED), (SENT, SILENT), (SENT, HANDLED)],
            probes={Partition("xsettle.filing.460000", 0): ANSWERED},
            rss_before_mb=50.0,
            rss_after_mb=52.0,
            dead_letter_kinds=Counter(["bad_marker"]),
            seconds=1.0,
        )
        lines = render(result)
        assert (
            lines[-1] == "3 records: 1 dead-lettered, 0 reported, 0 answered, 1 handled, 1 silent"
        )
        assert not result.ok

    def test_cli_has_the_fuzz_command(self) -> None:
        """``xsettle fuzz`` parses its options."""
        args = build_parser().parse_args(["fuzz", "--records", "5", "--seed", "3"])
        assert (args.records, args.seed, args.oversized, args.province) == (5, 3, 3, "460000")


def directory_with(province: str) -> Directory:
    """The default directory plus ``province``, a host that Guangzhou's insured may file with
    (a fresh code: no other test's group or records share its topics)."""
    extra = f"""
[[provinces]]
code = "{province}"
name = "测试省"
max_advance_permille = 250

[[regions]]
code = "{province[:2]}0100"
name = "测试市"

[[hospitals]]
code = "H{province[:2]}010001"
name = "测试医院"
level = 3
region = "{province[:2]}0100"

[[catalogues]]
host = "{province}"
[[catalogues.items]]
item_code = "D001"
item_name = "阿莫西林胶囊"
category = "DRUG"
catalogue_class = "A"
unit = "盒"
unit_price_fen = 1250

[[agreements]]
home = "440100"
host = "{province}"
mode = "INSTANT"
hospitals = "all"
"""
    text = (ROOT / "adapters" / "default_directory.toml").read_text(encoding="utf-8")
    return Directory.from_toml(text + extra)


@pytest.fixture(scope="module")
async def small_run(
    broker: str,
    settings: BusSettings,
    province_pool: ProvincePool,
    tmp_path_factory: pytest.TempPathFactory,
) -> FuzzResult:
    """One small fuzz (200 records, two oversized) against a fresh province on the session
    broker."""
    province = province_pool.take()
    options = FuzzOptions(province=province, records=200, seed=11, oversized=2, timeout_s=35)
    return await run_fuzz(
        options,
        settings.model_copy(update={"bootstrap": broker}),
        directory=directory_with(province),
        state_dir=Path(tmp_path_factory.mktemp("fuzz")),
    )


@pytest.mark.broker
class TestSmallRun:
    async def test_every_record_is_classified(self, small_run: FuzzResult) -> None:
        """Every record sent gets exactly one outcome and the summary line adds up."""
        assert len(small_run.outcomes) == 200
        match = SUMMARY_RE.match(render(small_run)[-1])
        assert match is not None
        n, *counts = (int(g) for g in match.groups())
        assert n == sum(counts) == 200
        assert len(small_run.probes) == 15

    async def test_garbage_is_dead_lettered_and_a_valid_filing_answered(
        self, small_run: FuzzResult
    ) -> None:
        """A record with a bad marker is classified dead-lettered; a valid FilingUpload is
        answered."""
        by_kind = {(s.kind, s.family, o) for s, o in small_run.outcomes}
        assert any(k == "bad_marker" and o == DEAD_LETTERED for k, _, o in by_kind)
        assert ("valid", "filing", ANSWERED) in by_kind

    async def test_nothing_is_silent(self, small_run: FuzzResult) -> None:
        """No record is silent and every inbox partition still answers."""
        assert small_run.count(SILENT) == 0
        assert small_run.dead_partitions == []


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_the_command_runs_the_province_in_its_own_process() -> None:
    """``xsettle fuzz`` on its own embedded broker, with the province as a child process
    (its RSS measured alone): every record has an outcome, none silent, exit 0."""
    cmd = [sys.executable, "-c", "from simulators.cli import main; raise SystemExit(main())"]
    done = subprocess.run(
        [*cmd, "fuzz", "--records", "150", "--oversized", "1", "--seed", "4", "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert lines[-1].startswith("150 records:")
    assert lines[-1].endswith(", 0 silent")
    assert any(line.startswith("RSS after warm-up") for line in lines)
