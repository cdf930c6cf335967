"""``xsettle keys``: a province's signing keys.

``keys generate --province CODE --out FILE [--key-id ID] [--valid-from ISO]`` writes a new
Ed25519 private key (PKCS#8 PEM, mode 0600; it never leaves the province) and prints the
``[[keys]]`` block to publish in the directory. Rotation: publish the new block with a
``valid_from`` a little ahead, switch ``signing_key_file``/``signing_key_id`` once it is
valid, then give the old key a ``valid_until`` (never delete it: old evidence verifies with
it). ``keys show`` lists the keys a directory publishes, with their validity.

Exit codes: 0 done, 2 bad input (bad code, existing file, unreadable directory).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import re
import sys
from pathlib import Path
from typing import Any

from bus.signing import generate_pem

_PROVINCE = re.compile(r"\d{2}0000")
_KEY_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _fail(text: str) -> int:
    print(f"xsettle keys: {text}", file=sys.stderr)
    return 2


async def cmd_generate(args: argparse.Namespace) -> int:
    """``keys generate``."""
    if not _PROVINCE.fullmatch(args.province):
        return _fail(f"--province {args.province!r} is not a province code NN0000")
    key_id = args.key_id or f"{args.province}-{dt.datetime.now(dt.UTC):%Y%m%d}"
    if not _KEY_ID.fullmatch(key_id):
        return _fail(f"--key-id {key_id!r}: 1-64 of A-Z a-z 0-9 . _ : -")
    try:
        valid_from = dt.datetime.fromisoformat(args.valid_from) if args.valid_from else None
    except ValueError:
        return _fail(f"--valid-from {args.valid_from!r} is not an ISO time")
    if valid_from is None:
        valid_from = dt.datetime.now(dt.UTC).replace(microsecond=0)
    if valid_from.tzinfo is None:
        return _fail("--valid-from needs a time zone, e.g. 2027-01-01T00:00:00+08:00")
    out = Path(args.out)
    try:
        public = generate_pem(out)
    except FileExistsError:
        return _fail(f"{out} exists: a key is never overwritten")
    except OSError as exc:
        return _fail(f"cannot write {out}: {exc.strerror or exc}")
    print(f"# private key written to {out} (mode 0600): set signing_key_file and signing_key_id")
    print("# publish this in the directory:")
    print("[[keys]]")
    print(f'province = "{args.province}"')
    print(f'key_id = "{key_id}"')
    print('algorithm = "ed25519"')
    print(f'public_key = "{base64.b64encode(public).decode()}"')
    print(f"valid_from = {valid_from.isoformat()}")
    return 0


async def cmd_show(args: argparse.Namespace) -> int:
    """``keys show``."""
    from adapters.directory import Directory, DirectoryError

    try:
        directory = Directory.load(args.directory) if args.directory else Directory.default()
    except DirectoryError as exc:
        return _fail(str(exc).splitlines()[0])
    for key in directory.signing_keys():
        if args.province and key.province != args.province:
            continue
        until = key.valid_until.isoformat() if key.valid_until else "-"
        demo = "  DEMO (derivable by anyone)" if key.demo else ""
        print(
            f"{key.province}  {key.key_id:<24} {key.algorithm}  "
            f"{key.valid_from.isoformat()} .. {until}{demo}"
        )
    return 0


def register(subparsers: Any) -> None:
    """Add ``keys generate`` and ``keys show`` to the ``xsettle`` command line."""
    keys = subparsers.add_parser("keys", help="a province's signing keys: generate, show")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    p = sub.add_parser("generate", help="write a new private key, print its directory entry")
    p.add_argument("--province", required=True, help="the province the key signs for")
    p.add_argument("--out", required=True, help="file for the private key (must not exist)")
    p.add_argument("--key-id", default=None, help="key id (default: <province>-<yyyymmdd>)")
    p.add_argument("--valid-from", default=None, help="ISO time with zone (default: now)")
    p.set_defaults(run=cmd_generate)
    p = sub.add_parser("show", help="the keys a directory publishes, with validity")
    p.add_argument("--province", default=None, help="only this province")
    p.add_argument("--directory", default=None, help="directory TOML file (default: packaged)")
    p.set_defaults(run=cmd_show)
