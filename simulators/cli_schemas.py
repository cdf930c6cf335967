"""``xsettle schemas check``: the schema evolution gate (contract v1.3); ``xsettle schemas
asyncapi``: the contract as an AsyncAPI 3.0.0 document.

Checks every schema of ``schemas/`` against every version of it kept in ``schemas/history/``
under FULL_TRANSITIVE rules (new reads old and old reads new, with the Apache ``avro``
package's compatibility checker; the rules are in :mod:`bus.schema_check`), and that the
newest version folder holds every current schema unchanged. A province checks its own copy of
the schemas the same way: ``xsettle schemas check --schemas DIR --history DIR``.

Output: the rule, one line per schema × version (``ok``, or what is incompatible and where),
errors, a summary line. Exit codes: 0 all compatible, 1 something incompatible or an error,
2 a usage error (a folder that does not exist).

``schemas asyncapi`` prints the document :mod:`schemas.asyncapi` generates from the schemas,
topic rules and headers (the one committed as ``docs/asyncapi.json``), or writes it to
``--out FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from bus.schema_check import UsageError, run
from schemas import SCHEMA_DIR
from schemas.asyncapi import document_json


async def cmd_check(args: argparse.Namespace) -> int:
    """``schemas check``."""
    try:
        schemas = Path(args.schemas)
        report = run(schemas, Path(args.history) if args.history else schemas / "history")
    except UsageError as exc:
        print(f"xsettle schemas: {exc}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


async def cmd_asyncapi(args: argparse.Namespace) -> int:
    """``schemas asyncapi``: the AsyncAPI document on stdout, or in ``--out``."""
    text = document_json()
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if not out.parent.is_dir():
        print(
            f"xsettle schemas: --out {out}: the folder {out.parent} does not exist; "
            "create it or choose another",
            file=sys.stderr,
        )
        return 2
    await asyncio.to_thread(out.write_text, text, encoding="utf-8")
    print(f"wrote {out} ({len(text.encode('utf-8')):,} bytes)", file=sys.stderr)
    return 0


def register(subparsers: Any) -> None:
    """Add ``schemas check`` and ``schemas asyncapi`` to the ``xsettle`` command line."""
    schemas = subparsers.add_parser(
        "schemas", help="the wire schemas: check their evolution, the AsyncAPI document"
    )
    sub = schemas.add_subparsers(dest="schemas_command", required=True)
    p = sub.add_parser(
        "check",
        help="every schema against all its published versions (FULL_TRANSITIVE); exit 1 if not",
    )
    p.add_argument(
        "--schemas", default=str(SCHEMA_DIR), help="folder of current .avsc (default: packaged)"
    )
    p.add_argument(
        "--history",
        default=None,
        help="folder of version folders vX.Y (default: <schemas>/history)",
    )
    p.set_defaults(run=cmd_check)
    a = sub.add_parser(
        "asyncapi",
        help="the contract as an AsyncAPI 3.0.0 document (JSON; docs/asyncapi.json)",
    )
    a.add_argument("--out", default=None, help="write it to this file (default: stdout)")
    a.set_defaults(run=cmd_asyncapi)
