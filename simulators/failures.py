"""How a command fails: one line on stderr naming the problem and the fix, exit code 2 for
usage and configuration errors (found before any work), 1 for failures while working.

:func:`describe` turns any exception that reaches the command line into that line;
``--debug`` (or ``XSETTLE_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import tomllib
from collections.abc import Iterable

from pydantic import ValidationError

from adapters.directory import Directory, DirectoryError
from bus.constants import PROVINCE_RE
from bus.errors import BrokerError, RoutingError, StoreError, TransportError
from bus.settings import ENV_PREFIX, BusSettings
from simulators.scenario import ScenarioError

USAGE = 2
"""Exit code of a usage or configuration error (argparse's own)."""
FAILED = 1
"""Exit code of a failure while working."""


class UsageError(Exception):
    """Input or configuration that cannot work, found before doing anything: exit code 2."""


def known_province(code: str, directory: Directory, option: str) -> str:
    """``code`` when it is a province of ``directory``; else :class:`UsageError` naming the
    option and the provinces there are."""
    provinces = list(directory.provinces())
    if code not in provinces:
        raise UsageError(
            f"{option} {code}: not a province of the directory (it has {', '.join(provinces)})"
        )
    return code


def province_code(code: str | None, option: str) -> str | None:
    """``code`` when it has the form of a province code (two digits and ``0000``), or None;
    else :class:`UsageError`. For commands that read a cluster whose directory they do not
    know (ops): a code of the right form may name a province with no traffic yet."""
    if code is not None and not PROVINCE_RE.match(code):
        raise UsageError(f"{option} {code}: not a province code (two digits and 0000: 460000)")
    return code


def known_provinces(codes: Iterable[str], directory: Directory, option: str) -> list[str]:
    """:func:`known_province` for each of ``codes``."""
    return [known_province(c, directory, option) for c in codes]


def _validation_line(exc: ValidationError) -> str:
    """The first problem of a pydantic validation, with the variable it came from for the
    bus settings (``XSETTLE_*``)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or exc.title
    if exc.title == BusSettings.__name__ and first["loc"]:
        where = f"{where} ({ENV_PREFIX}{str(first['loc'][0]).upper()})"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']} (got {first.get('input')!r}){more}"


def describe(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line for a failure that reached the command line."""
    if isinstance(exc, UsageError | RoutingError):
        return USAGE, str(exc)
    if isinstance(exc, DirectoryError | ScenarioError):
        return USAGE, str(exc)  # its first line, then one line per problem of the file
    if isinstance(exc, ValidationError):
        return USAGE, _validation_line(exc)
    if isinstance(exc, tomllib.TOMLDecodeError):
        return USAGE, f"not valid TOML: {exc}"
    if isinstance(exc, TransportError | BrokerError):
        return FAILED, f"{exc} (is a broker running there? check --bootstrap / XSETTLE_BOOTSTRAP)"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return USAGE, f"{exc.strerror or exc}: another process holds the port; choose another"
    if isinstance(exc, FileNotFoundError):
        return USAGE, f"no such file: {exc.filename}"
    if isinstance(exc, StoreError):
        return FAILED, str(exc)
    return FAILED, (
        f"unexpected {type(exc).__name__}: {exc} (--debug or XSETTLE_DEBUG=1 shows the traceback)"
    )


def tcp_port(text: str) -> int:
    """A TCP port to listen on: 1..65535 (argparse names the option when it is not)."""
    return _port(text, low=1)


def listen_port(text: str) -> int:
    """A TCP port to listen on, or 0 for a free one the system picks."""
    return _port(text, low=0)


def _port(text: str, *, low: int) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not low <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port ({low}..65535)")
    return port
