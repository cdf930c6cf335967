"""A run of ``province``/``simulate`` across midnight China time states every day it settled
claims on, and the day is closed only when each of those days matched."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace
from typing import Any

from adapters.reconciliation import StatementRecord, day_bounds_ms
from simulators.peers import EndOfDay, Peer

TODAY = dt.date(2026, 11, 24)
YESTERDAY = TODAY - dt.timedelta(days=1)


def _record(day: dt.date, outcome: str) -> StatementRecord:
    return StatementRecord(
        statement_id=f"S-460000-{day:%d}{outcome[:2]}", home="130000", day=day,
        request_id="m", stated_at_ms=0, count=1, fund_fen=100, outcome=outcome,
        differences=(), error_code=None, answered_at_ms=1,
    )  # fmt: skip


def test_yesterday_differing_keeps_the_day_open_though_today_matched() -> None:
    end = EndOfDay(day=TODAY)
    end.stated += [("460000", 1, _record(YESTERDAY, "MISMATCHED")),
                   ("460000", 1, _record(TODAY, "MATCHED"))]  # fmt: skip
    assert not end.closed()
    end.stated.append(("460000", 2, _record(YESTERDAY, "MATCHED")))
    assert end.closed()


def test_days_with_settlements_before_today_are_stated_first() -> None:
    """Claims settled at 23:50 yesterday (China time) are stated on yesterday's statement,
    not lost because the statement was drawn up after midnight."""
    late_yesterday = day_bounds_ms(TODAY)[0] - 10 * 60_000
    asked: list[tuple[int, int, str | None]] = []

    def settled_claims(since: int, until: int, *, home: str | None = None) -> list[Any]:
        asked.append((since, until, home))
        return [SimpleNamespace(settled_at_ms=late_yesterday), SimpleNamespace(settled_at_ms=None)]

    peer: Any = SimpleNamespace(
        systems={
            "460000": SimpleNamespace(backoffice=SimpleNamespace(settled_claims=settled_claims))
        }
    )
    assert Peer._days_to_state(peer, "460000", "130000", TODAY) == [YESTERDAY, TODAY]
    assert asked == [(0, day_bounds_ms(TODAY)[0], "130000")]


def test_a_day_without_earlier_settlements_is_today_alone() -> None:
    peer: Any = SimpleNamespace(
        systems={"460000": SimpleNamespace(
            backoffice=SimpleNamespace(settled_claims=lambda *a, **k: []))}
    )  # fmt: skip
    assert Peer._days_to_state(peer, "460000", "130000", TODAY) == [TODAY]
