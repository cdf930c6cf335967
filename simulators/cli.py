"""The ``xsettle`` command: broker, demo, directory, province, simulate, bench, ops.

Every command that talks to Kafka takes ``--bootstrap`` (or ``XSETTLE_BOOTSTRAP``); without it
the commands that can start the embedded broker do so on a free loopback port. Every command
with a state folder takes ``--state-dir`` (or ``XSETTLE_STATE_DIR``). Every bus setting is read
from ``XSETTLE_<SETTING>`` (:mod:`bus.settings`); a flag overrides the variable, the variable
the default (:func:`settings_from`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from bus.broker import EmbeddedBroker, PortInUse, create_contract_topics
from bus.logs import configure
from bus.settings import BusSettings
from simulators.failures import UsageError, describe, known_province, tcp_port

SUBCOMMAND_MODULES = (
    "simulators.demo",
    "simulators.bench",
    "simulators.cli_ops",
    "simulators.chaos",
    "simulators.fuzz",
    "simulators.cli_audit",
    "simulators.cli_keys",
    "simulators.cli_gateway",
    "simulators.cli_schemas",
    "simulators.cli_conformance",
)
"""Modules that add their own subcommands with ``register(subparsers)`` when present."""


def add_bootstrap(parser: argparse.ArgumentParser) -> None:
    """The common ``--bootstrap`` option (default: ``XSETTLE_BOOTSTRAP``)."""
    parser.add_argument(
        "--bootstrap",
        default=os.environ.get("XSETTLE_BOOTSTRAP") or None,
        help="Kafka bootstrap servers host:port (default: $XSETTLE_BOOTSTRAP, "
        "else the embedded broker where the command can start one)",
    )


def add_state_dir(parser: argparse.ArgumentParser, help: str, *, required: bool = False) -> None:
    """The common ``--state-dir`` option, whose default is ``XSETTLE_STATE_DIR`` (the flag
    overrides the variable); ``required``: one of the two must be given. ``help`` says what
    the folder is and what is used without either."""
    default = os.environ.get("XSETTLE_STATE_DIR") or None
    parser.add_argument(
        "--state-dir", default=default, required=required and default is None, metavar="DIR",
        help=f"{help} (or $XSETTLE_STATE_DIR)",
    )  # fmt: skip


def settings_from(args: argparse.Namespace) -> BusSettings:
    """Bus settings: their defaults, then the ``XSETTLE_*`` variables, then the command's
    flags named after a setting (``--bootstrap``, ``--state-dir``) when given: a flag
    overrides the environment, the environment overrides the default."""
    flags = {name: getattr(args, name, None) for name in BusSettings.model_fields}
    return BusSettings.from_env(**flags)


async def cmd_broker(args: argparse.Namespace) -> int:
    """Run the embedded broker in the foreground until interrupted."""
    from adapters.directory import Directory

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    settings = settings_from(args)  # XSETTLE_PARTITIONS and the rest shape the topics
    broker = EmbeddedBroker(port=args.port)
    try:
        await broker.start()
    except PortInUse as exc:
        raise UsageError(
            f"{exc}: choose another with --port or stop the process using it"
        ) from None
    except PermissionError:
        raise UsageError(
            f"--port {args.port}: a port below 1024 needs privileges; choose one of 1024..65535"
        ) from None
    try:
        provinces = list(Directory.default().provinces()) if args.topics else []
        if provinces:
            effective = settings.with_bootstrap(broker.bootstrap, embedded=True)
            await create_contract_topics(effective, broker.bootstrap, provinces)
        print(f"bootstrap={broker.bootstrap}", flush=True)
        print(
            f"embedded Tansu broker pid {broker.pid}; topics for {len(provinces)} provinces; "
            f"export XSETTLE_BOOTSTRAP={broker.bootstrap}; Ctrl-C stops it",
            flush=True,
        )
        await stop.wait()
    finally:
        broker.stop()
    return 0


async def cmd_directory(args: argparse.Namespace) -> int:
    """Answer the public queries: designated hospitals, connected regions, allowed hospitals."""
    from adapters.directory import Directory

    directory = Directory.load(args.file) if args.file else Directory.default()
    if args.host is not None:
        known_province(args.host, directory, "--host")
    if args.json:
        print(json.dumps(directory.to_json_dict(), ensure_ascii=False, indent=2))
        return 0
    regions = {r.code: r.name for r in directory.regions()}
    host = args.host
    print("Connected regions (统筹区开通信息)")
    print(f"{'home region':<22}{'host':<16}{'mode':<16}hospitals allowed")
    for a in directory.agreements():
        if host and a.host != host:
            continue
        allowed = (
            "all" if a.hospitals == "all" else f"{len(a.hospitals)}: " + ", ".join(a.hospitals)
        )
        home = f"{a.home} {regions.get(a.home, '')}"
        host_name = f"{a.host} {directory.province_name(a.host)}"
        print(f"{home:<22}{host_name:<16}{a.mode.value:<16}{allowed}")
    print()
    print("Designated hospitals (跨省定点医疗机构)")
    for province in directory.provinces():
        if host and province != host:
            continue
        for h in directory.hospitals_of(province):
            where = f"{h.region} {regions.get(h.region, '')}"
            print(f"{h.code:<12}{'L' + str(h.level):<4}{where:<18}{h.name}")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """A parser whose usage errors are one line on stderr, naming the problem and where
    help is, with exit code 2 (argparse prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full command line (its subcommands' parsers are :class:`OneLineParser` too)."""
    parser = OneLineParser(
        prog="xsettle", description="Cross-province medical settlement bus (异地就医直接结算)"
    )
    parser.add_argument("--version", action="version", version=f"xsettle {version()}")
    parser.add_argument(
        "--log-json", action="store_true",
        help="log JSON lines on stderr (anywhere on the line; or XSETTLE_LOG_JSON=1)",
    )  # fmt: skip
    parser.add_argument(
        "--log-level", default=None,
        help="log level (default: ERROR for demo, else INFO; or XSETTLE_LOG_LEVEL)",
    )  # fmt: skip
    parser.add_argument(
        "--debug", action="store_true",
        help="a failure shows its traceback instead of one line (or XSETTLE_DEBUG=1)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run the embedded Kafka-compatible broker")
    p.add_argument("--port", type=tcp_port, default=None, help="port (default: a free one)")
    p.add_argument(
        "--no-topics", dest="topics", action="store_false", help="do not create contract topics"
    )
    p.set_defaults(run=cmd_broker)

    p = sub.add_parser("directory", help="designated hospitals, connected regions, agreements")
    p.add_argument("--file", help="directory TOML file (default: the packaged one)")
    p.add_argument("--host", help="only this host province")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_directory)

    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise  # the module exists but one of its own imports is missing
            continue
        module.register(sub)
    return parser


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""What ``--log-level`` takes (any case)."""


def version() -> str:
    """The installed distribution's version (the source tree's when not installed)."""
    try:
        return importlib.metadata.version("xsettle")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class GlobalOptions:
    """The options of every command, taken from anywhere on the line (:func:`global_options`)."""

    rest: list[str]
    """The command line without them."""
    log_json: bool = False
    """``--log-json`` / ``XSETTLE_LOG_JSON=1``."""
    log_level: str | None = None
    """``--log-level L`` / ``XSETTLE_LOG_LEVEL``."""
    debug: bool = False
    """``--debug`` / ``XSETTLE_DEBUG=1``: a failure shows its traceback, not one line."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def global_options(argv: Sequence[str]) -> GlobalOptions:
    """Take ``--log-json``, ``--log-level L`` (or ``--log-level=L``) and ``--debug`` from
    anywhere in the command line, before or after the subcommand (up to ``--``).
    ``XSETTLE_LOG_JSON=1``, ``XSETTLE_LOG_LEVEL`` and ``XSETTLE_DEBUG=1`` are the defaults."""
    rest: list[str] = []
    log_json, debug = _flag("XSETTLE_LOG_JSON"), _flag("XSETTLE_DEBUG")
    level = os.environ.get("XSETTLE_LOG_LEVEL") or None
    items = iter(argv)
    for arg in items:
        if arg == "--":
            rest.append(arg)
            rest.extend(items)
            break
        if arg == "--log-json":
            log_json = True
        elif arg == "--debug":
            debug = True
        elif arg == "--log-level":
            level = next(items, None)
            if level is None:
                rest.append(arg)  # argparse says what is missing
        elif arg.startswith("--log-level="):
            level = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return GlobalOptions(rest, log_json, level, debug)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xsettle`` console script."""
    options = global_options(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    level = options.log_level
    if level is not None and level.upper() not in LOG_LEVELS:
        parser.error(f"--log-level {level}: use one of {', '.join(LOG_LEVELS).lower()}")
    args = parser.parse_args(options.rest)
    args.log_json, args.log_level, args.debug = options.log_json, level, options.debug
    quiet = args.command in ("demo", "directory", "bench")
    configure(json=args.log_json, level=args.log_level or ("ERROR" if quiet else "INFO"))
    try:
        code: int = asyncio.run(args.run(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``xsettle ... | head``): no traceback, and nothing more to
        # flush into the closed pipe at exit (the Python documentation's recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        if args.debug:
            raise
        status, line = describe(exc)
        print(f"xsettle {args.command}: {line}", file=sys.stderr)
        return status
    return code


if __name__ == "__main__":
    sys.exit(main())
