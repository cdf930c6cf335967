"""``xsettle ops``: what is failing, who must act, what is overdue.

``ops errors`` follows the error topics, ``ops dlq`` lists, shows and replays dead letters,
``ops pending`` reads a node's store for requests waiting for an answer, ``ops claims`` lists a
host's claims by state (overdue first) and shows one claim's timeline, ``ops console`` serves
the web console. Personal data is always shown masked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from adapters.backoffice import TERMINAL_STATES, ClaimState, HostClaim, SqlBackOffice
from bus.console import Console
from bus.envelope import now_ms
from bus.logs import mask_text
from bus.models import yuan
from bus.ops import (
    ErrorAggregate,
    ErrorEvent,
    PendingRow,
    Since,
    coords,
    follow_errors,
    list_dead_letters,
    owed_report,
    parse_coords,
    pending_report,
    pending_summary,
    replay,
)
from bus.pg import masked_url
from bus.settings import BusSettings
from bus.store import SqlStore, Store
from simulators.cli import add_bootstrap, add_state_dir, settings_from
from simulators.failures import listen_port, province_code

REDRAW_S = 1.0
"""How often the live error view is redrawn."""
NEWEST = 10
"""Newest reports shown in the live view."""


def parse_since(text: str) -> Since:
    """``now``, ``beginning``, epoch milliseconds, or an ISO time (local time if no zone)."""
    if text in ("now", "beginning"):
        return text  # type: ignore[return-value]
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected now, beginning, epoch ms or an ISO time"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()
    return int(when.timestamp() * 1000)


def _need_bootstrap(args: argparse.Namespace) -> str | None:
    if not args.bootstrap:
        print(
            f"xsettle ops {args.ops_command}: --bootstrap (or XSETTLE_BOOTSTRAP) is required: "
            "ops reads the topics of a running cluster",
            file=sys.stderr,
        )
        return None
    return str(args.bootstrap)


def _ts(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _table(title: str, counts: dict[str, int], width: int = 22) -> list[str]:
    lines = [f"{title:<{width}}{'count':>7}"]
    lines += [f"{k:<{width}}{v:>7}" for k, v in counts.items()] or ["  (none)"]
    return lines


def render_errors(agg: ErrorAggregate, newest: int = NEWEST) -> str:
    """The live view: counts by code, origin, responsible, and the newest reports."""
    cols = [
        _table("code", dict(agg.by_code.most_common())),
        _table("origin", dict(agg.by_origin.most_common()), 12),
        _table("responsible", dict(agg.by_responsible.most_common()), 14),
    ]
    height = max(len(c) for c in cols)
    widths = [max(len(line) for line in c) + 4 for c in cols]
    lines = [f"error reports: {agg.total}   ({_ts(now_ms())})", ""]
    for i in range(height):
        lines.append(
            "".join(
                (c[i] if i < len(c) else "").ljust(w) for c, w in zip(cols, widths, strict=True)
            ).rstrip()
        )
    lines += ["", f"newest {newest}:"]
    lines.append(f"{'time':<20}{'code':<26}{'origin':<8}{'resp.':<8}{'correlation id':<38}message")
    for event in list(agg.newest)[::-1][:newest]:
        j = event.to_json()
        lines.append(
            f"{_ts(event.timestamp_ms):<20}{event.code:<26}{j.get('origin') or '-':<8}"
            f"{j.get('responsible') or '-':<8}{event.correlation_id or '-':<38}"
            f"{(j.get('message') or j.get('decode_error') or '')[:80]}"
        )
    return "\n".join(lines)


async def cmd_errors(args: argparse.Namespace) -> int:
    """``ops errors``."""
    province_code(args.province, "--province")
    bootstrap = _need_bootstrap(args)
    if bootstrap is None:
        return 2
    since: Since = args.since if args.since is not None else (
        "now" if args.follow else "beginning"
    )  # fmt: skip
    agg = ErrorAggregate(newest_n=max(NEWEST, 50))
    live = args.follow and not args.json and sys.stdout.isatty()
    last_draw = 0.0
    stop = _stop_event()

    def draw() -> None:
        if live:
            sys.stdout.write("\x1b[H\x1b[2J" + render_errors(agg) + "\n")
            sys.stdout.flush()

    source = follow_errors(
        settings_from(args),
        bootstrap,
        province=args.province,
        since=since,
        stop_after_s=args.seconds,
        until_caught_up=not args.follow,
    )
    async with contextlib.aclosing(source) as events:
        iterator = aiter(events)
        while not stop.is_set():
            try:
                event: ErrorEvent = await asyncio.wait_for(anext(iterator), REDRAW_S)
            except TimeoutError:
                draw()
                continue
            except StopAsyncIteration:
                break
            if agg.add(event) and args.json:
                print(json.dumps(event.to_json(), ensure_ascii=False), flush=True)
            if time.monotonic() - last_draw >= REDRAW_S:
                last_draw = time.monotonic()
                draw()
    if not args.json:
        if live:
            draw()
        else:
            print(render_errors(agg))
    return 0


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def cmd_dlq(args: argparse.Namespace) -> int:
    """``ops dlq``."""
    province_code(args.province, "--province")
    bootstrap = _need_bootstrap(args)
    if bootstrap is None:
        return 2
    settings = settings_from(args)
    letters = await list_dead_letters(settings, bootstrap, args.province)
    by_coords = {d.coordinates: d for d in letters}
    if args.show:
        try:
            name = coords(*parse_coords(args.show))
        except ValueError as exc:
            print(f"xsettle ops dlq: {exc}", file=sys.stderr)
            return 2
        letter = by_coords.get(name)
        if letter is None:
            print(f"xsettle ops dlq: no dead letter at {name}", file=sys.stderr)
            return 1
        shown = {**letter.to_json(), "preview": letter.decoded_preview()}
        print(json.dumps(shown, ensure_ascii=False, indent=2))
        return 0
    if args.replay or args.replay_all:
        chosen = []
        if args.replay_all:
            chosen = [d for d in letters if d.replayed_at_ms is None]
        for text in args.replay or []:
            try:
                name = coords(*parse_coords(text))
            except ValueError as exc:
                print(f"xsettle ops dlq: {exc}", file=sys.stderr)
                return 2
            if name not in by_coords:
                print(f"xsettle ops dlq: no dead letter at {name}", file=sys.stderr)
                return 1
            chosen.append(by_coords[name])
        count = await replay(settings, bootstrap, chosen)
        print(f"replayed {count} dead letter(s)")
        for d in chosen:
            print(f"  {d.coordinates} -> {d.original_coordinates} ({d.message_id or '-'})")
        return 0
    if args.json:
        for d in letters:
            print(json.dumps(d.to_json(), ensure_ascii=False))
        return 0
    if not letters:
        print("no dead letters")
        return 0
    print(
        f"{'dead letter':<30}{'original':<30}{'kind':<22}{'detected':<21}{'key':<20}"
        f"{'state':<10}error"
    )
    for d in letters:
        j = d.to_json()
        state = "replayed" if d.replayed_at_ms else "dead"
        print(
            f"{d.coordinates:<30}{d.original_coordinates or '-':<30}{d.error_kind or '-':<22}"
            f"{_ts(d.detected_at_ms):<21}{j['key'] or '-':<20}{state:<10}"
            f"{(j['error'] or '')[:80]}"
        )
    return 0


def _database_url(province: str | None, command: str) -> str | None:
    """``XSETTLE_DATABASE_URL`` for ``province`` (None: unset); exits with one line when it
    names one database per province and no ``--province`` was given."""
    url = BusSettings.from_env().database_url
    if url is None:
        return None
    if "{province}" in url:
        if province is None:
            print(
                f"xsettle ops {command}: XSETTLE_DATABASE_URL has one database per province: "
                "give --province",
                file=sys.stderr,
            )
            raise SystemExit(2)
        url = url.replace("{province}", province)
    return url


def _stores(state_dir: Path, province: str | None) -> dict[str, Store] | None:
    """The stores in a state folder: a province's database (``province-P.sqlite3``), or a
    bare node's (``bus-P.sqlite3``); with ``XSETTLE_DATABASE_URL``, the province's PostgreSQL
    database."""
    url = _database_url(province, "pending")
    if url is not None:
        return {province or masked_url(url): SqlStore(url)}
    pattern = f"*-{province}.sqlite3" if province else "*-*.sqlite3"
    files = {
        f.stem.split("-", 1)[1]: f
        for f in sorted(state_dir.glob(pattern))
        if f.stem.split("-", 1)[0] in ("province", "bus")
    }
    if not files:
        print(f"xsettle ops pending: no node store at {state_dir / pattern}", file=sys.stderr)
        return None
    return {p: SqlStore(f) for p, f in files.items()}


async def cmd_pending(args: argparse.Namespace) -> int:
    """``ops pending``."""
    stores = _stores(Path(args.state_dir), args.province)
    if stores is None:
        return 1
    try:
        now = now_ms()
        rows = [row for store in stores.values() for row in pending_report(store, now)]
        owed = [row for p, store in stores.items() for row in owed_report(store, p, now)]
    finally:
        for store in stores.values():
            store.close()
    rows.sort(key=lambda r: ({"overdue": 0, "near": 1}.get(r.status, 2), r.deadline_ms))
    if args.json:
        for r in rows + owed:
            print(json.dumps(r.to_json(), ensure_ascii=False))
        return 0
    if owed:
        print(f"we owe {len(owed)} answer(s): ", end="")
        print(", ".join(f"{n} to {s}" for s, n in Counter(r.source for r in owed).most_common()))
        for r in owed:
            print(
                f"  {r.status:<9}{r.target}->{r.source or '-':<8}"
                f"{r.message_type.removeprefix('xsettle.v1.'):<16}{r.message_id:<38}"
                f"{r.age_s:>9.0f}s{r.remaining_s:>9.0f}s"
            )
        print()
    if not rows:
        print("nothing pending")
        return 0
    print(f"{'target':<8}{'total':>7}{'overdue':>9}{'near':>7}{'waiting':>9}{'unacked':>9}  oldest")
    for t in pending_summary(rows):
        print(
            f"{t['target']:<8}{t['total']:>7}{t['overdue']:>9}{t['near']:>7}{t['waiting']:>9}"
            f"{t['unacknowledged']:>9}  {t['oldest_age_s']:.0f} s"
        )
    print()
    print(
        f"{'status':<9}{'from':<8}{'to':<8}{'type':<16}{'message id':<38}{'age':>10}{'due in':>10}"
        "  acknowledged"
    )
    for r in rows:
        print(
            f"{r.status:<9}{r.source or '-':<8}{r.target:<8}"
            f"{r.message_type.removeprefix('xsettle.v1.'):<16}{r.message_id:<38}"
            f"{r.age_s:>9.0f}s{r.remaining_s:>9.0f}s  {_acknowledged(r, now)}"
        )
    return 0


def _acknowledged(row: PendingRow, now: int) -> str:
    """ "acknowledged 12 s ago, expected in 3.5 d" or "not acknowledged"."""
    if row.acknowledged_at_ms is None:
        return "not acknowledged"
    text = f"{row.ack_state or 'acknowledged'} {(now - row.acknowledged_at_ms) / 1000:.0f} s ago"
    if row.expected_by_ms is not None:
        text += f", expected in {(row.expected_by_ms - now) / 86_400_000:.1f} d"
    return text


_CLAIM_ORDER = {
    ClaimState.OVERDUE: 0,
    ClaimState.FALLBACK: 1,
    ClaimState.ACKNOWLEDGED: 2,
    ClaimState.SUBMITTED: 3,
}
"""Open claims first, the ones someone must act on first; closed claims after."""


def _province_db(state_dir: Path, province: str) -> Path | str | None:
    """The province's database: ``XSETTLE_DATABASE_URL`` when set, else its file in
    ``state_dir`` (or in ``state_dir/<province>``)."""
    url = _database_url(province, "claims")
    if url is not None:
        return url
    for path in (
        state_dir / f"province-{province}.sqlite3",
        state_dir / province / f"province-{province}.sqlite3",
    ):
        if path.is_file():
            return path
    return None


def _claim_state(text: str) -> ClaimState:
    """A state by name (``SUBMITTED``) or stored value (``AWAITING_REVIEW``)."""
    name = text.upper()
    if name in ClaimState.__members__:
        return ClaimState[name]
    try:
        return ClaimState(name)
    except ValueError:
        names = ", ".join(s.name for s in ClaimState)
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {names}") from None


def _claim_row(c: HostClaim, now: int) -> dict[str, Any]:
    submitted = c.submitted_at_ms or int(c.claim.submitted_at.timestamp() * 1000)
    return {
        "claim_id": c.claim.claim_id,
        "state": c.state.name,
        "mode": c.claim.settlement_mode.value,
        "home": c.claim.home_region[:2] + "0000",
        "age_s": round((now - submitted) / 1000, 1),
        "submitted_at_ms": submitted,
        "deadline_ms": c.deadline_ms,
        "acknowledged_at_ms": c.acknowledged_at_ms,
        "expected_by_ms": c.expected_by_ms,
        "overdue_since_ms": c.overdue_since_ms,
        "total_fen": c.claim.total_fen,
        "advance_fen": c.advance_collected_fen,
        "balance_fen": c.balance_fen,
        "requests": list(c.requests),
        "close_decision": c.close_decision.value if c.close_decision else None,
        "closed_by": c.closed_by,
    }


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} d"


def _waiting(row: dict[str, Any]) -> str:
    """What the desk waits for: "overdue since T", "expected by T", "due by T"."""
    if row["state"] == ClaimState.OVERDUE.name:
        return f"overdue since {_ts(row['overdue_since_ms'])}"
    if row["expected_by_ms"]:
        return f"expected by {_ts(row['expected_by_ms'])}"
    if row["deadline_ms"]:
        return f"due by {_ts(row['deadline_ms'])}"
    return "-"


async def cmd_claims(args: argparse.Namespace) -> int:
    """``ops claims``: a host's claims by state, or one claim's timeline (reads only)."""
    path = _province_db(Path(args.state_dir), args.province)
    if path is None:
        print(
            f"xsettle ops claims: no province-{args.province}.sqlite3 in {args.state_dir}",
            file=sys.stderr,
        )
        return 1
    office = SqlBackOffice(path)
    try:
        now = now_ms()
        if args.claim:
            return _show_claim(office, args.claim, now, as_json=args.json)
        if args.state:
            claims = office.claims(state=args.state)
        else:
            claims = office.claims(open_only=args.open)
    finally:
        office.close()
    rows = [_claim_row(c, now) for c in claims]
    order = {s.name: n for s, n in _CLAIM_ORDER.items()}
    rows.sort(key=lambda r: (order.get(r["state"], len(order)), r["submitted_at_ms"]))
    if args.json:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
        return 0
    if not rows:
        which = f" in state {args.state.name}" if args.state else " open" if args.open else ""
        print(f"no claims{which}")
        return 0
    counts = Counter(r["state"] for r in rows)
    print("  ".join(f"{state} {n}" for state, n in sorted(counts.items())))
    print()
    print(
        f"{'claim id':<26}{'state':<20}{'mode':<16}{'home':<8}{'age':>9}{'total':>14}"
        f"{'advance':>12}  waiting"
    )
    for r in rows:
        print(
            f"{r['claim_id']:<26}{r['state']:<20}{r['mode']:<16}{r['home']:<8}"
            f"{_age(r['age_s']):>9}{yuan(r['total_fen']):>14}{yuan(r['advance_fen']):>12}  "
            f"{_waiting(r) if r['state'] not in {s.name for s in TERMINAL_STATES} else '-'}"
        )
    return 0


def _show_claim(office: SqlBackOffice, claim_id: str, now: int, *, as_json: bool) -> int:
    """One claim: where it stands, its money and its timeline."""
    claim = office.claim(claim_id)
    if claim is None:
        print(f"xsettle ops claims: no claim {claim_id}", file=sys.stderr)
        return 1
    row = _claim_row(claim, now)
    events = office.timeline(claim_id)
    payments = [(kind, fen) for _, kind, fen in office.payments(claim_id)]
    if as_json:
        row["payments"] = [{"kind": k, "fen": f} for k, f in payments]
        row["timeline"] = [
            {"seq": e.seq, "at_ms": e.at_ms, "kind": e.kind.value, "state": e.state.name,
             "detail": mask_text(e.detail)}
            for e in events
        ]  # fmt: skip
        print(json.dumps(row, ensure_ascii=False))
        return 0
    print(f"claim {claim_id}: {row['state']} ({row['mode']}, home {row['home']})")
    print(f"  sent {_ts(row['submitted_at_ms'])}, {_age(row['age_s'])} ago; {_waiting(row)}")
    print(f"  total {yuan(row['total_fen'])} yuan; payments: ", end="")
    print(", ".join(f"{k} {yuan(f)}" for k, f in payments) or "none")
    if claim.close_decision is not None:
        print(f"  closed by {claim.closed_by}: {claim.close_decision.value}")
    print(f"  requests: {', '.join(row['requests']) or '-'}")
    print()
    for e in events:
        print(f"  {_ts(e.at_ms):<20}{e.kind.value:<20}{e.state.name:<20}{mask_text(e.detail)}")
    if not events:
        print("  (no timeline: the claim predates it)")
    return 0


async def cmd_console(args: argparse.Namespace) -> int:
    """``ops console``: the ops router, page and ``/metrics`` on uvicorn, cluster-wide (or one
    province's topics with ``--province``). Sign-in: the ``XSETTLE_TOKENS_OPS`` hashes when
    set (as for a gateway), else a fresh ops token printed once at start."""
    from pydantic import ValidationError

    from adapters.directory import Directory, DirectoryError
    from adapters.gateway.api_ops import ConsoleServer, create_ops_app
    from adapters.gateway.config import TokenConfig, hash_token, new_token
    from adapters.gateway.panels import PanelSource, overdue_claims_panel, settlement_stats_panel
    from adapters.gateway.service import GatewayRefused

    bootstrap = _need_bootstrap(args)
    if bootstrap is None:
        return 2
    try:
        directory = Directory.load(args.directory) if args.directory else Directory.default()
    except DirectoryError as exc:
        first = exc.problems[0] if exc.problems else "unreadable"
        print(f"xsettle ops console: directory {exc.source}: {first}", file=sys.stderr)
        return 2
    fresh: str | None = None
    hashes = os.environ.get("XSETTLE_TOKENS_OPS", "").strip()
    try:
        if hashes:
            tokens = TokenConfig.model_validate({"ops": hashes})
        else:
            fresh = new_token()
            tokens = TokenConfig(ops=(hash_token(fresh),))
    except ValidationError as exc:
        why = exc.errors()[0]["msg"] if exc.errors() else "invalid"
        print(f"xsettle ops console: XSETTLE_TOKENS_OPS: {why}", file=sys.stderr)
        return 2
    stores: dict[str, Store] = {}
    offices: dict[str, SqlBackOffice] = {}
    if args.state_dir:
        stores = _stores(Path(args.state_dir), args.province) or {}
        for province in stores:
            path = _province_db(Path(args.state_dir), province)
            if path is not None:
                offices[province] = SqlBackOffice(path)
    panels: list[PanelSource] = []
    if offices:
        panels = [
            overdue_claims_panel(offices, directory),
            settlement_stats_panel(offices, directory),
        ]
    console = Console(settings_from(args), bootstrap, stores=stores, province=args.province)
    app = create_ops_app(console, directory, tokens=tokens, panels=panels, scope=args.province)
    server = ConsoleServer(app, console, args.host, args.port)
    stop = _stop_event()
    try:
        await server.start()
    except GatewayRefused as exc:
        print(f"xsettle ops console: {exc}", file=sys.stderr)
        _close(stores, offices)
        return 2
    print(f"xsettle ops console on {server.url} (Ctrl-C stops it)", flush=True)
    print(f"  metrics: {server.base_url}/metrics (no token)", flush=True)
    if fresh is not None:
        print(f"  ops token (this run only): {fresh}", flush=True)
    else:
        print("  sign in with an ops token whose hash is in XSETTLE_TOKENS_OPS", flush=True)
    try:
        if args.seconds is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.seconds)
        else:
            await stop.wait()
    finally:
        await server.stop()
        _close(stores, offices)
    return 0


def _close(stores: dict[str, Store], offices: dict[str, SqlBackOffice]) -> None:
    for store in stores.values():
        store.close()
    for office in offices.values():
        office.close()


def register(subparsers: Any) -> None:
    """Add ``ops`` and its subcommands to the ``xsettle`` command line."""
    ops = subparsers.add_parser("ops", help="ops monitoring: errors, dead letters, pending")
    sub = ops.add_subparsers(dest="ops_command", required=True)

    p = sub.add_parser("errors", help="follow error reports (aggregates and newest)")
    add_bootstrap(p)
    p.add_argument("--province", help="only reports addressed to this province")
    p.add_argument(
        "--from",
        dest="since",
        type=parse_since,
        default=None,
        help="now | beginning | epoch ms | ISO time (default: now when following, else beginning)",
    )
    p.add_argument("--json", action="store_true", help="print JSON lines, one per report")
    p.add_argument(
        "--follow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep following (default); --no-follow reads up to the current end and stops",
    )
    p.add_argument("--seconds", type=float, default=None, help="stop after N seconds")
    p.set_defaults(run=cmd_errors)

    p = sub.add_parser("dlq", help="list, show and replay dead letters")
    add_bootstrap(p)
    p.add_argument("--province", help="only this province's DLQ")
    p.add_argument("--show", metavar="TOPIC:PARTITION:OFFSET", help="decode one dead letter")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--replay", nargs="+", metavar="TOPIC:PARTITION:OFFSET", help="replay these")
    group.add_argument(
        "--replay-all", action="store_true", help="replay every letter not yet replayed"
    )
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.set_defaults(run=cmd_dlq)

    p = sub.add_parser("pending", help="requests waiting for an answer (from a node's store)")
    add_state_dir(p, "the node's state folder", required=True)
    p.add_argument("--province", help="only this province's store bus-<P>.sqlite3")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.set_defaults(run=cmd_pending)

    p = sub.add_parser("claims", help="a host's claims by state, or one claim's timeline")
    add_state_dir(p, "the province's state folder", required=True)
    p.add_argument("--province", required=True, help="the host province (its database)")
    p.add_argument(
        "--state", type=_claim_state, default=None, help="only claims in this state (OVERDUE, ...)"
    )
    p.add_argument("--open", action="store_true", help="only claims not closed yet")
    p.add_argument("--claim", metavar="ID", help="one claim: its money and timeline")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.set_defaults(run=cmd_claims)

    p = sub.add_parser(
        "console",
        help="serve the ops web console (/console, /v1/ops/*, /metrics); sign in with the "
        "XSETTLE_TOKENS_OPS hashes' tokens, else a fresh ops token printed at start",
    )
    add_bootstrap(p)
    p.add_argument(
        "--port", type=listen_port, default=8080, help="HTTP port (default 8080; 0: free)"
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
    p.add_argument("--province", help="only this province's error and DLQ topics")
    add_state_dir(
        p,
        "show pending and owed requests, overdue claims and settlement statistics of the "
        "province databases in this folder",
    )
    p.add_argument("--directory", help="directory TOML for province names (default: packaged)")
    p.add_argument("--seconds", type=float, default=None, help="stop after N seconds")
    p.set_defaults(run=cmd_console)
