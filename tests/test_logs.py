"""Logging of the Kafka client: through structlog, and one line per message template and
period instead of a line per retry; any library's standard-library lines through structlog."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from bus.logs import (
    KAFKA_CLIENT_LOGGER,
    LIBRARY_EVENT,
    RepeatFilter,
    configure,
    quiet_kafka_client,
    renders_json,
)


def record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1, msg, args, None)


class TestRepeatFilter:
    def test_one_record_per_template_and_period(self) -> None:
        f = RepeatFilter(every_s=60.0)
        passed = [f.filter(record("Unable connect to node with id %s", n)) for n in range(1000)]
        assert passed.count(True) == 1
        assert f.filter(record("Unable to update metadata from %s", [1]))  # another template

    def test_the_next_record_after_the_period_says_how_many_were_held_back(self) -> None:
        f = RepeatFilter(every_s=0.0)
        f.every_s = 60.0
        assert f.filter(record("lost %s", 1))
        for n in range(5):
            assert not f.filter(record("lost %s", n))
        f.every_s = 0.0
        later = record("lost %s", 9)
        assert f.filter(later)
        assert later.held_back == 5  # type: ignore[attr-defined]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put structlog's configuration and the bridged loggers' handlers back after a test
    that calls :func:`bus.logs.configure`."""
    saved = structlog.get_config()
    loggers = [logging.getLogger(), logging.getLogger(KAFKA_CLIENT_LOGGER)]
    handlers = [list(lg.handlers) for lg in loggers]
    propagate = [lg.propagate for lg in loggers]
    yield
    structlog.configure(**saved)
    for lg, hs, prop in zip(loggers, handlers, propagate, strict=True):
        lg.handlers[:] = hs
        lg.propagate = prop


@pytest.mark.usefixtures("restore_logging")
class TestStandardLibraryBridge:
    def test_a_kafka_client_line_is_json_under_log_json(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``--log-json``: aiokafka's own lines come out as JSON, masked like every other."""
        configure(json=True, level="INFO")
        assert renders_json()  # and so progress lines are JSON too (simulators.progress)
        capsys.readouterr()
        logging.getLogger("aiokafka.conn").error(
            "Unable connect to node with id %s for %s", 1, "130102195001011234"
        )
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1, lines
        line = json.loads(lines[0])
        assert line["event"] == "kafka_client"
        assert line["logger"] == "aiokafka.conn"
        assert line["level"] == "error"
        assert line["message"] == "Unable connect to node with id 1 for 130102**********34"

    def test_any_library_line_and_its_traceback_is_json(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        configure(json=True, level="INFO")
        capsys.readouterr()
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
        (only,) = capsys.readouterr().err.splitlines()
        line = json.loads(only)
        assert line["event"] == LIBRARY_EVENT
        assert line["logger"] == "uvicorn.error"
        assert "RuntimeError: boom" in line["exception"]


def test_overlapping_quiet_blocks_give_the_kafka_client_its_level_back() -> None:
    """Two gateways in one process start and stop out of order: the Kafka client's level is
    back once both are closed (it stayed CRITICAL for good, and hid later lines)."""
    client = logging.getLogger(KAFKA_CLIENT_LOGGER)
    client.setLevel(logging.NOTSET)
    first, second = quiet_kafka_client(), quiet_kafka_client()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert client.level == logging.CRITICAL  # the second gateway is still starting
    second.__exit__(None, None, None)
    assert client.level == logging.NOTSET
