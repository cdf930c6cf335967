"""``xsettle audit``: evidence for disputes and audits from the signed message log.

``audit export --claim ID --province CODE`` writes every signed record one province sent and
received about a claim, with the hash-chain proof and the province's signature over its log's
head, to one JSON file; ``audit verify FILE`` checks such a file offline with the directory's
public keys only (format and checks: :mod:`bus.audit_export`).

Exit codes: 0 done / verified, 1 the export does not verify, 2 bad input (no database, no
entry about the claim, a file that is not an export, a bad directory).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from bus.audit import SqlAuditLog
from bus.audit_export import ExportError, export_subject, read_export, verify_export, write_export
from bus.db import SqliteDatabase
from bus.envelope import now_ms
from bus.errors import StoreError
from bus.settings import BusSettings

if TYPE_CHECKING:
    from adapters.directory import Directory

_PROVINCE = re.compile(r"\d{2}0000")


def _fail(command: str, text: str) -> int:
    print(f"xsettle audit {command}: {text}", file=sys.stderr)
    return 2


def _directory(path: str | None) -> Directory:
    from adapters.directory import Directory

    return Directory.load(path) if path else Directory.default()


def default_out(claim: str) -> Path:
    """``audit-<claim>.json`` in the working folder (characters unfit for a file name as _)."""
    return Path(f"audit-{re.sub(r'[^A-Za-z0-9._-]', '_', claim)}.json")


async def cmd_export(args: argparse.Namespace) -> int:
    """``audit export``."""
    from adapters.province import trust_for

    province = args.province
    if not _PROVINCE.fullmatch(province):
        return _fail("export", f"--province {province!r} is not a province code NN0000")
    try:
        settings = BusSettings.from_env(state_dir=args.state)
        directory = _directory(args.directory)
        signer = trust_for(province, settings, directory).signer
    except (ValueError, ValidationError) as exc:  # DirectoryError is a ValueError
        return _fail("export", str(exc))
    if signer is None:  # pragma: no cover - trust_for always signs
        return _fail("export", f"{province} has no signing key")
    folder = Path(settings.state_dir)
    candidates = [folder / f"province-{province}.sqlite3", folder / f"bus-{province}.sqlite3"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return _fail("export", f"no database of {province} at {candidates[0]}")
    db = SqliteDatabase(path)
    try:
        doc = export_subject(SqlAuditLog(db), args.claim, signer, now_ms())
    except (ExportError, StoreError) as exc:
        return _fail("export", f"{path}: {exc}")
    finally:
        db.close()
    out = Path(args.out) if args.out else default_out(args.claim)
    try:
        write_export(out, doc)
    except OSError as exc:
        return _fail("export", f"cannot write {out}: {exc}")
    links = doc["chain"]
    entries = sum(1 for link in links if "entry" in link)
    print(
        f"exported {entries} signed record(s) about {args.claim} from {province}'s log, "
        f"chain of {len(links)} link(s) up to seq {doc['head']['seq']}, head signed by "
        f"{signer.key_id}: {out}"
    )
    return 0


async def cmd_verify(args: argparse.Namespace) -> int:
    """``audit verify``."""
    try:
        doc = read_export(args.file)
        directory = _directory(args.directory)
    except ValueError as exc:  # ExportError, DirectoryError
        return _fail("verify", str(exc))
    report = verify_export(doc, directory.keyring())
    if report.ok:
        print(
            f"OK {args.file}: {report.entries} signed record(s) about {report.subject} from "
            f"{report.province}'s log, {report.signatures} signature(s) checked, chain of "
            f"{report.chain_length} link(s) up to seq {report.head_seq} signed by "
            f"{report.key_id}"
        )
        return 0
    for problem in report.problems:
        print(problem)
    print(
        f"FAILED {args.file}: {len(report.problems)} problem(s); this export is not evidence",
        file=sys.stderr,
    )
    return 1


def register(subparsers: Any) -> None:
    """Add ``audit export`` and ``audit verify`` to the ``xsettle`` command line."""
    audit = subparsers.add_parser(
        "audit", help="signed message log: export one claim's evidence, verify an export"
    )
    sub = audit.add_subparsers(dest="audit_command", required=True)

    p = sub.add_parser(
        "export", help="write every signed record of one claim with the chain proof to a file"
    )
    p.add_argument("--claim", required=True, help="the claim id (or a filing id)")
    p.add_argument("--province", required=True, help="the province whose log to export")
    p.add_argument(
        "--state",
        default=None,
        help="state folder of the province (default: $XSETTLE_STATE_DIR, else var)",
    )
    p.add_argument("--out", default=None, help="output file (default: audit-<claim>.json)")
    p.add_argument("--directory", default=None, help="directory TOML file (default: packaged)")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("verify", help="check an export offline with the directory's public keys")
    p.add_argument("file", help="an export written by xsettle audit export")
    p.add_argument("--directory", default=None, help="directory TOML file (default: packaged)")
    p.set_defaults(run=cmd_verify)
