"""``xsettle gateway``: one province's long-running service (node, roles, review desk, HTTP).

    xsettle gateway --config deploy/gateway/460000.toml
    xsettle gateway --config gw.toml --print-config     # effective settings, secrets hidden
    xsettle gateway --new-token hospital                # a token, and the hash to configure

Exit codes: 0 after SIGTERM/SIGINT and a clean drain; 1 when a worker died; 2 when the
gateway refuses to start (invalid configuration, province not in the directory, state folder
not writable, port taken, broker unreachable after its tries), with one line on stderr.
"""

from __future__ import annotations

import argparse
import sys

from adapters.gateway.config import ROLES, ConfigError, hash_token, load_config, new_token

FLAGS = {
    "province": ("province",),
    "state_dir": ("state_dir",),
    "directory": ("directory",),
    "host": ("http", "host"),
    "port": ("http", "port"),
    "bootstrap": ("bus", "bootstrap"),
    "database_url": ("bus", "database_url"),
}
"""Command-line flags (argparse dest) → the setting they override."""


def _fail(line: str) -> int:
    print(f"xsettle gateway: {line}", file=sys.stderr, flush=True)
    return 2


async def cmd_gateway(args: argparse.Namespace) -> int:
    """Run (or describe) one province gateway."""
    if args.new_token:
        token = new_token()
        print(f"token for role {args.new_token} (give it to the {args.new_token} system):")
        print(f"  {token}")
        print("hash for the gateway configuration ([tokens]):")
        print(f'  {args.new_token} = ["{hash_token(token)}"]')
        return 0
    flags = {
        path: (f"--{dest.replace('_', '-')}", getattr(args, dest)) for dest, path in FLAGS.items()
    }
    try:
        loaded = load_config(args.config, flags=flags)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.print_config:
        print(loaded.render(), end="")
        return 0
    from adapters.gateway.service import Gateway, GatewayRefused

    gateway = Gateway(loaded.config)
    try:
        return await gateway.run()
    except GatewayRefused as exc:
        return _fail(str(exc))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``gateway``."""
    p = sub.add_parser(
        "gateway",
        help="run one province's gateway: its node, roles, review desk and HTTP API",
        description="Settings: --config FILE (TOML), then XSETTLE_* variables, then flags.",
    )
    p.add_argument("--config", metavar="FILE", help="gateway configuration (TOML)")
    p.add_argument("--province", help="province code (province)")
    p.add_argument("--state-dir", dest="state_dir", help="state folder (state_dir)")
    p.add_argument("--directory", help="directory TOML (directory)")
    p.add_argument("--host", help="HTTP address (http.host)")
    p.add_argument("--port", help="HTTP port (http.port)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (bus.bootstrap)")
    p.add_argument(
        "--database-url", dest="database_url",
        help="PostgreSQL database of the province's state, shared by its instances "
        "(bus.database_url; default: a SQLite file in the state folder)",
    )  # fmt: skip
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration (secrets hidden) and exit",
    )
    p.add_argument(
        "--new-token", choices=ROLES, metavar="ROLE", help="print a new token of ROLE and its hash"
    )
    p.set_defaults(run=cmd_gateway)
