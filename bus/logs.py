"""Structured logging: structlog events with key-values, personal data masked.

Every log line goes through :func:`mask_pii`: the values of keys that carry personal data are
masked, and any 18-digit resident ID number inside any string is masked too, so a person's ID
or name never reaches a log unmasked, whatever the event.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterator, MutableMapping
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


class RepeatFilter(logging.Filter):
    """Lets through at most one record per logger and message template every ``every_s``
    seconds; the next one that passes says how many like it were held back. A Kafka client
    that lost its broker logs the same two lines many times a second (1,769 lines in 20 s
    measured): this keeps one per template and period. Memory is bounded by the number of
    templates, not of records."""

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        last, held = self._seen.get(key, (-1e18, 0))
        if now - last < self.every_s:
            self._seen[key] = (last, held + 1)
            return False
        self._seen[key] = (now, 0)
        if held:
            record.held_back = held
        return True


class _ToStructlog(logging.Handler):
    """Records of the standard library's logging (the Kafka client's, uvicorn's, asyncio's)
    as structlog lines: masked, timestamped and rendered like every other, so ``--log-json``
    makes them JSON too. ``event`` names the line; the record's logger is ``logger``."""

    def __init__(self, level: int, event: str) -> None:
        super().__init__(level)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        held = getattr(record, "held_back", None)
        structlog.get_logger(record.name).log(
            record.levelno,
            self.event,
            logger=record.name,
            message=message[:500],
            **({"similar_held_back": held} if held else {}),
            **({"exc_info": record.exc_info} if record.exc_info else {}),
        )


KAFKA_CLIENT_LOGGER = "aiokafka"
"""The Kafka client's logger: its lines are ``kafka_client`` events, one per template and
period (:class:`RepeatFilter`)."""
LIBRARY_EVENT = "library_log"
"""The event of a line any other library logged through the standard library (uvicorn's
errors, asyncio's "exception was never retrieved")."""


def _bridge(logger: logging.Logger, handler: _ToStructlog) -> None:
    """Put ``handler`` on ``logger`` instead of the one a previous :func:`configure` put."""
    for old in list(logger.handlers):
        if isinstance(old, _ToStructlog):
            logger.removeHandler(old)
    logger.addHandler(handler)


def renders_json() -> bool:
    """Whether log lines are JSON (:func:`configure` with ``json``): what else a command
    writes on stderr (progress) is then JSON too."""
    processors = structlog.get_config()["processors"]
    return bool(processors) and isinstance(processors[-1], structlog.processors.JSONRenderer)


CACHE_LOGGERS = True
"""Whether a logger keeps the configuration it first logged with (fast: a process configures
once). The test suite turns it off: its tests configure and capture logs in turn in one
process, and a cached logger would keep the first test's level and renderer."""


def configure(*, json: bool = False, level: str = "INFO") -> None:
    """Set up structlog for a process: masked, timestamped, console or JSON lines on stderr;
    the standard library's log records (WARNING and above) go through it too."""
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
        cache_logger_on_first_use=CACHE_LOGGERS,
    )
    client = logging.getLogger(KAFKA_CLIENT_LOGGER)
    handler = _ToStructlog(logging.WARNING, "kafka_client")
    handler.addFilter(RepeatFilter())
    _bridge(client, handler)
    client.propagate = False
    _bridge(logging.getLogger(), _ToStructlog(logging.WARNING, LIBRARY_EVENT))


_quieted: list[int] = []
"""The Kafka client logger's level before the first of the open :func:`quiet_kafka_client`
blocks, once per open block: the last to close restores it, whatever order they close in."""


@contextlib.contextmanager
def quiet_kafka_client() -> Iterator[None]:
    """Silence the Kafka client's per-connection error lines while the caller waits for a
    broker and says in its own words why it cannot reach one. Several waits in one process
    (gateways in tests and the demo) may overlap: the level comes back only when the last
    block closes (saving and restoring per block would leave the client silenced for good
    when two close out of order)."""
    logger = logging.getLogger(KAFKA_CLIENT_LOGGER)
    _quieted.append(_quieted[0] if _quieted else logger.level)
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        before = _quieted.pop()
        if not _quieted:
            logger.setLevel(before)
