"""Panels the adapters add to the ops console: a title, columns and rows of plain strings and
integers, so the console (which knows the bus, not medicine or money) shows them as they come.

A panel source is a function called at each ``GET /v1/ops/panels`` (in the event loop: it
must be quick); its money is already in yuan strings (``bus.models.yuan``), its person data
never there. Two come with the adapters:

- :func:`settlement_stats_panel`: settlements by province pair and month, in yuan, from
  ``SqlBackOffice.settlement_stats`` of each host;
- :func:`overdue_claims_panel`: the host's claims that passed their deadline with no answer
  (OVERDUE), oldest first, with the home province and how long.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import structlog

from adapters.backoffice import ClaimState, HostClaim
from adapters.directory import Directory, province_of
from bus.envelope import now_ms
from bus.logs import mask_text
from bus.models import yuan

log = structlog.get_logger(__name__)

Cell = str | int
"""A panel cell: display text or a count."""
MAX_ROWS: Final = 200
"""Rows a panel shows at most (its note says how many more)."""


@dataclass(frozen=True, slots=True)
class Panel:
    """A table for the console: plain strings and integers, money already in yuan."""

    title: str
    """Heading."""
    columns: tuple[str, ...]
    """Column headings."""
    rows: tuple[tuple[Cell, ...], ...]
    """Rows, each as long as ``columns``."""
    numeric: tuple[str, ...] = ()
    """Columns aligned right (counts, yuan)."""
    note: str = ""
    """One line under the table (what the figures are, what was left out)."""
    empty: str = "nothing yet"
    """Shown when there are no rows."""


PanelSource = Callable[[], Panel]
"""Builds a panel now (called at each request, in the event loop)."""


class SettlementStats(Protocol):
    """What the statistics panel needs of a host back office (``SqlBackOffice``)."""

    def settlement_stats(self, host: str) -> list[dict[str, object]]:
        """Rows ``{home, host, month, settlements, total_fen, fund_fen}``."""
        ...


class OpenClaims(Protocol):
    """What the overdue-claims panel needs of a host back office."""

    def claims(self, *, open_only: bool = False) -> list[HostClaim]:
        """All claims, or only those not in a terminal state."""
        ...


def province_label(directory: Directory, code: str) -> str:
    """``河北省 130000``: the province's name and code (the code alone if it has no name)."""
    name = directory.province_name(code)
    return code if name == code else f"{name} {code}"


def age_text(seconds: float) -> str:
    """A duration for people: ``45 s``, ``12.5 min``, ``3.0 h``, ``2.1 d``."""
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float | str) and value != "" else 0


def settlement_stats_panel(
    offices: Mapping[str, SettlementStats], directory: Directory
) -> PanelSource:
    """Settled claims by month, home and host province (names from the directory), with
    their total costs and fund payments in yuan; ``offices``: host province → back office."""

    def build() -> Panel:
        rows: list[tuple[str, str, str, int, int, int]] = []
        for host, office in offices.items():
            for r in office.settlement_stats(host):
                rows.append(
                    (
                        str(r.get("month") or "?"),
                        str(r.get("home") or "?"),
                        str(r.get("host") or host),
                        _int(r.get("settlements")),
                        _int(r.get("total_fen")),
                        _int(r.get("fund_fen")),
                    )
                )
        rows.sort()
        shown = rows[:MAX_ROWS]
        total_fen = sum(r[4] for r in rows)
        fund_fen = sum(r[5] for r in rows)
        note = (
            f"{sum(r[3] for r in rows)} settlements, {yuan(total_fen)} yuan in all, "
            f"{yuan(fund_fen)} yuan paid by the home funds"
            if rows
            else ""
        )
        if len(rows) > len(shown):
            note += f"; {len(rows) - len(shown)} more rows not shown"
        return Panel(
            title="Settlements by province pair and month",
            columns=("month", "home", "host", "settlements", "total (元)", "fund (元)"),
            rows=tuple(
                (
                    month,
                    province_label(directory, home),
                    province_label(directory, host),
                    n,
                    yuan(total),
                    yuan(fund),
                )
                for month, home, host, n, total, fund in shown
            ),
            numeric=("settlements", "total (元)", "fund (元)"),
            note=note,
            empty="no settled claims yet",
        )

    return build


def overdue_claims_panel(
    offices: Mapping[str, OpenClaims],
    directory: Directory,
    *,
    clock: Callable[[], int] = now_ms,
) -> PanelSource:
    """The hosts' OVERDUE claims (deadline passed, no answer): claim id, home province, mode,
    how long overdue, the advance held, re-sends; oldest first. ``offices``: host → back
    office."""

    def build() -> Panel:
        now = clock()
        found: list[tuple[str, HostClaim]] = []
        for host, office in offices.items():
            found += [(host, c) for c in office.claims(open_only=True)]
        overdue = [(h, c) for h, c in found if c.state is ClaimState.OVERDUE]
        overdue.sort(key=lambda hc: (hc[1].overdue_since_ms or now, hc[1].claim.claim_id))
        rows: list[Sequence[Cell]] = [
            (
                c.claim.claim_id,
                province_label(directory, province_of(c.claim.home_region)),
                province_label(directory, host),
                c.claim.settlement_mode.value,
                age_text((now - c.overdue_since_ms) / 1000) if c.overdue_since_ms else "?",
                yuan(c.advance_collected_fen),
                len(c.resent_as),
            )
            for host, c in overdue[:MAX_ROWS]
        ]
        more = len(overdue) - len(rows)
        return Panel(
            title="Overdue claims",
            columns=("claim", "home", "host", "mode", "overdue for", "advance (元)", "re-sent"),
            rows=tuple(tuple(r) for r in rows),
            numeric=("overdue for", "advance (元)", "re-sent"),
            note=(
                "deadline passed with no answer: re-send or close them "
                "(POST /v1/claims/{id}/resend or /close)"
                + (f"; {more} more not shown" if more > 0 else "")
            )
            if overdue
            else "",
            empty="no overdue claims",
        )

    return build


def panel_json(panel: Panel) -> dict[str, object]:
    """Plain data for JSON."""
    return {
        "title": panel.title,
        "columns": list(panel.columns),
        "rows": [list(r) for r in panel.rows],
        "numeric": list(panel.numeric),
        "note": panel.note,
        "empty": panel.empty,
    }


def build_panels(sources: Iterable[PanelSource]) -> list[Panel]:
    """Every panel now; a source that fails gives a panel saying so (never a failed page)."""
    out: list[Panel] = []
    for source in sources:
        try:
            out.append(source())
        except Exception as exc:  # one broken panel must not hide the others
            name = getattr(source, "__qualname__", "panel").split(".<locals>")[0]
            log.error("panel_failed", panel=name, error=mask_text(repr(exc))[:300], exc_info=exc)
            out.append(
                Panel(
                    title=f"{name}: unavailable",
                    columns=(),
                    rows=(),
                    note=mask_text(f"{type(exc).__name__}: {exc}")[:200],
                    empty="this panel failed (logged)",
                )
            )
    return out
