"""The progress display: never backwards, plain lines off a terminal, and a stalled run
names the provinces it waits for."""

from __future__ import annotations

import io
import json
import re

from simulators.progress import LINE_EVERY_S, STALL_S, Progress, Waiting


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def plain(total: int = 5000, waiting: Waiting | None = None) -> tuple[Progress, io.StringIO, Clock]:
    """A display off a terminal, writing to a string, on a clock the test moves."""
    clock, out = Clock(), io.StringIO()
    bar = Progress(
        total, "visits closed", waiting=waiting, stream=out, tty=False, json_lines=False,
        clock=clock,
    )  # fmt: skip
    return bar, out, clock


def test_a_lower_count_never_shows() -> None:
    """The count the demo once computed fell from 4983 to 4949: the display keeps 4983."""
    bar, out, clock = plain()
    for count in (4000, 4983, 4949, 4950):
        clock.now += 1
        bar.update(count)
    assert bar.shown == 4983
    assert bar.line().startswith("visits closed 4983/5000 (99%)")
    bar.close()
    counts = [int(m) for m in re.findall(r"visits closed (\d+)/", out.getvalue())]
    assert counts == sorted(counts)
    assert counts[-1] == 4983


def test_never_above_the_total_nor_a_total_below_the_count() -> None:
    bar, _, _ = plain(total=10)
    bar.update(12)
    assert bar.shown == 10
    bar.update(10, total=8)
    assert bar.total == 10


def test_off_a_terminal_a_plain_line_every_few_seconds() -> None:
    """No carriage returns nor escapes: one line per LINE_EVERY_S with count, share, rate
    and time left, and a last line at close."""
    bar, out, clock = plain()
    for second in range(1, 13):
        clock.now += 1
        bar.update(second * 100)  # 100 a second
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert "\x1b" not in out.getvalue()
    assert len(lines) == 12 // int(LINE_EVERY_S) + 1
    assert lines[0] == "visits closed 500/5000 (10%), 100/s, eta 45 s"
    assert lines[-1] == "visits closed 1200/5000 (24%), 100/s, eta 38 s"


def test_a_stalled_run_names_the_provinces_it_waits_for() -> None:
    asked = []

    def waiting() -> list[str]:
        asked.append(1)
        owed = [("460000 海南省", 12), ("130000 河北省", 3), ("110000 北京市", 2), ("x", 1)]
        return [f"{who} ({n} unanswered)" for who, n in owed]

    bar, _, clock = plain(waiting=waiting)
    clock.now += 2
    bar.update(300)
    clock.now += STALL_S - 1
    assert "no progress" not in bar.line()
    assert not asked  # the stores are read only for a stalled run
    clock.now += 2
    line = bar.line()
    assert line.startswith(
        "visits closed 300/5000 (6%); no progress for 6 s, "
        "waiting for 460000 海南省 (12 unanswered), 130000"
    )
    assert line.endswith("110000 北京市 (2 unanswered) and 1 more")
    clock.now += 0.1
    bar.line()
    assert len(asked) == 1  # at most once a second
    bar.update(301)
    assert "no progress" not in bar.line()


def test_a_stall_with_nothing_owed_says_so() -> None:
    bar, _, clock = plain(waiting=list)
    clock.now += STALL_S + 1
    assert bar.line().endswith("no progress for 6 s, no answer owed on the bus")


def test_on_a_terminal_the_bar_is_redrawn_in_place() -> None:
    clock, out = Clock(), io.StringIO()
    bar = Progress(10, "claims closed", stream=out, tty=True, json_lines=False, clock=clock)
    for n in range(1, 11):
        clock.now += 1
        bar.update(n)
    bar.close()
    frames = out.getvalue().split("\r")[1:]
    assert len(frames) == 11  # every update (a second apart) and the close
    assert frames[-1].startswith("[" + "#" * 30 + "] claims closed 10/10 (100%)")
    assert out.getvalue().endswith("\n")


def test_under_log_json_every_line_is_json_even_on_a_terminal() -> None:
    """With ``--log-json`` stderr stays JSON lines: progress is an event like the logs."""
    clock, out = Clock(), io.StringIO()
    bar = Progress(100, "claims closed", stream=out, tty=True, json_lines=True, clock=clock)
    clock.now += LINE_EVERY_S
    bar.update(50)
    bar.close()
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["count"], e["total"]) for e in entries] == [
        ("progress", 50, 100),
        ("progress", 50, 100),
    ]
    assert entries[0]["message"] == "claims closed 50/100 (50%), 10/s, eta 5 s"
