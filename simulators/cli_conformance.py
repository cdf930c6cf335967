"""``xsettle conformance``: the conformance kit against a province implementation written by
anyone (:mod:`simulators.conformance`).

``xsettle conformance --province P --bootstrap B [--keys DIR] [--directory FILE] [--json FILE]
[--seed N] [--check-timeout S] [--only PREFIX ...]`` plays P's counterpart provinces on broker
B and prints one line per check (``PASS|FAIL|SKIP <id> — <what>; <why>``), then
``N checks: P passed, F failed, S skipped``. Exit codes: 0 nothing failed, 1 a check failed,
2 a usage error (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from adapters.directory import Directory
from bus.logs import configure
from simulators.conformance import CHECK_TIMEOUT_S, CHECKS, KitOptions, run_conformance, write_json
from simulators.failures import UsageError, known_province


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def check_paths(args: argparse.Namespace) -> None:
    """:class:`UsageError` when ``--keys`` is not a folder or ``--json``'s folder is missing."""
    if args.keys is not None and not Path(args.keys).is_dir():
        raise UsageError(f"--keys {args.keys}: not a folder (it holds <province code>.pem files)")
    if args.json is not None and not Path(args.json).parent.is_dir():
        raise UsageError(f"--json {args.json}: the folder {Path(args.json).parent} does not exist")


async def cmd_conformance(args: argparse.Namespace) -> int:
    """``xsettle conformance``."""
    if args.log_level is None:
        configure(json=args.log_json, level="CRITICAL")  # P's refusals are the point
    from simulators.cli import settings_from

    if not args.bootstrap:
        raise UsageError(
            "--bootstrap: give the broker the province under test is connected to "
            "(or set XSETTLE_BOOTSTRAP)"
        )
    directory = Directory.load(args.directory) if args.directory else Directory.default()
    known_province(args.province, directory, "--province")
    check_paths(args)
    if args.check_timeout <= 0:
        raise UsageError(f"--check-timeout {args.check_timeout}: give a positive number of seconds")
    ids = [c.id for c in CHECKS]
    unknown = [o for o in args.only if not any(i.startswith(o) for i in ids)]
    if unknown:
        raise UsageError(f"--only {unknown[0]}: no check id starts with it (ids: {', '.join(ids)})")
    seed = args.seed if args.seed is not None else time.time_ns() // 1_000_000 % 1_000_000_000
    options = KitOptions(
        province=args.province,
        bootstrap=args.bootstrap,
        seed=seed,
        check_timeout_s=args.check_timeout,
        only=tuple(args.only),
    )
    keys = Path(args.keys) if args.keys else None
    try:
        report = await run_conformance(
            options, settings_from(args), directory=directory, keys_dir=keys
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    persons = ", ".join(f"{n} with {h}" for h, n in sorted(report.persons.items())) or "none"
    _say(
        f"conformance of {report.province} on {report.bootstrap}, seed {seed}: the kit plays "
        f"{report.counterparts}; persons {report.province} filed: {persons}"
    )
    for line in report.lines():
        _say(line)
    if args.json is not None:
        write_json(report, Path(args.json))
    return 0 if report.ok else 1


def register(sub: Any) -> None:
    """Add ``conformance`` to the ``xsettle`` command line."""
    p = sub.add_parser(
        "conformance",
        help="test a province implementation against the wire contract, check by check",
    )
    p.add_argument("--province", required=True, help="the province under test (P)")
    p.add_argument(
        "--bootstrap",
        default=os.environ.get("XSETTLE_BOOTSTRAP") or None,
        help="the broker P is connected to (default: $XSETTLE_BOOTSTRAP)",
    )
    p.add_argument(
        "--keys",
        default=None,
        help="folder of the counterparts' private keys, <province code>.pem (PKCS#8, as "
        "`xsettle keys generate` writes); default: the demo keys the directory gives",
    )
    p.add_argument(
        "--directory", default=None, help="the directory P uses (default: the packaged one)"
    )
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the fresh ids (default: from the clock)"
    )
    p.add_argument(
        "--check-timeout",
        type=float,
        default=CHECK_TIMEOUT_S,
        help=f"how long a check waits for P (default {CHECK_TIMEOUT_S:.0f} s)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="PREFIX",
        help="run only the checks whose id starts with one of these (e.g. error. reversal.)",
    )
    p.set_defaults(run=cmd_conformance)
