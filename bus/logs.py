"""Structured logging: structlog events with key-values, personal data masked.

Every log line goes through :func:`mask_pii`: the values of keys that carry personal data are
masked, and any 18-digit resident ID number inside any string is masked too, so a person's ID
or name never reaches a log unmasked, whatever the event.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

ID_NUMBER_RE = re.compile(r"(?<!\d)(\d{6})(\d{8})(\d{3}[\dXx])(?!\d)")
"""An 18-digit resident ID number (GB 11643): region, birth date, sequence and check digit."""

NAME_KEYS = frozenset({"person_name", "name_of_person", "patient_name"})
"""Keys whose values are names of persons."""
ID_KEYS = frozenset({"person_id", "id_number", "key"})
"""Keys whose values are ID numbers (the record key is the person id)."""


def mask_id(value: str) -> str:
    """Keep the region prefix and the last two characters: ``130102**********34``."""
    if len(value) <= 8:
        return "*" * len(value)
    return value[:6] + "*" * (len(value) - 8) + value[-2:]


def mask_name(value: str) -> str:
    """Keep the family name only: ``张*`` / ``Z***``."""
    return value[:1] + "*" * max(1, len(value) - 1) if value else value


def mask_text(text: str) -> str:
    """Mask every ID number inside free text."""
    return ID_NUMBER_RE.sub(lambda m: m.group(1) + "*" * 10 + m.group(3)[-2:], text)


def _mask_value(key: str, value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        if key in NAME_KEYS:
            return mask_name(value)
        if key in ID_KEYS:
            return mask_id(value)
        return mask_text(value)
    if isinstance(value, dict):
        return {k: _mask_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_value(key, v) for v in value]
    return value


def mask_pii(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask personal data in every value."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _mask_value(key, value)
    return event_dict


class _StderrLogger:
    """Writes each line to ``sys.stderr`` as it is when the line is written (not as it was
    when logging was configured: a test's captured stream may be closed by then)."""

    def msg(self, message: str) -> None:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _stderr_logger(*_args: Any) -> _StderrLogger:
    return _StderrLogger()


def configure(*, json: bool = False, level: str = "INFO") -> None:
    """Set up structlog for a process: masked, timestamped, console or JSON lines on stderr."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            mask_pii,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=True,
    )
