"""Logging of the Kafka client: through structlog, and one line per message template and
period instead of a line per retry."""

from __future__ import annotations

import logging

from bus.logs import RepeatFilter


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
