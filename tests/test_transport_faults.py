"""The transport on the real broker when records are hostile: unparsable, large, oversized."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bus.constants import DLQ_CONTENT_COPY, MAX_RECORD_BYTES, MAX_REQUEST_BYTES
from bus.deadletter import dead_letter, parse_dead_letter, record_size
from bus.settings import BusSettings
from bus.transport import Admin, Consumer, Partition, Producer, RawRecord, Record, write_raw_records

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parent.parent

MEMBER = """
import asyncio, sys
from bus.settings import BusSettings
from bus.transport import Consumer

async def main() -> None:
    consumer = Consumer(BusSettings(idempotence=False), sys.argv[1], group=sys.argv[2])
    consumer.subscribe([sys.argv[3]])
    await consumer.start()
    await consumer.wait_assigned()
    print("assigned", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""
"""A group member in its own process, to be killed without leaving the group."""

POISON = RawRecord(b"k", b"poison", [(b"\xff\xfe", b"x"), (b"xs-ok", b"y")])
"""A record whose first header key is not UTF-8: aiokafka cannot parse it."""


async def new_topic(
    broker: str, settings: BusSettings, unique_topic: Callable[[str], str], partitions: int = 1
) -> str:
    """A fresh topic with ``partitions`` partitions."""
    name = unique_topic("faults")
    async with Admin(settings, broker) as admin:
        await admin.create_topics([name], partitions=partitions)
    return name


async def read_all(
    broker: str, settings: BusSettings, name: str, *, expect: int, timeout_s: float = 20.0
) -> list[Record]:
    """Every record of ``name`` through our Consumer, once ``expect`` came (or the time ran out)."""
    consumer = Consumer(settings, broker, group=None, name="faults-reader")
    await consumer.start()
    try:
        consumer.assign(await consumer.partitions_for(name))
        out: list[Record] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < expect and time.monotonic() < deadline:
            out.extend(await consumer.fetch(200))
        # A little longer: a record returned twice would show now.
        settle = time.monotonic() + 0.5
        while time.monotonic() < settle:
            out.extend(await consumer.fetch(100))
        return out
    finally:
        await consumer.stop()


class TestPoisonHeaderKey:
    async def test_poison_between_good_records_comes_in_order(
        self, broker: str, settings: BusSettings, unique_topic: Callable[[str], str]
    ) -> None:
        """A record with a non-UTF-8 header key between two good ones is returned as poison
        with its offset, after the first and before the second, each exactly once."""
        name = await new_topic(broker, settings, unique_topic)
        producer = Producer(settings, broker, name="faults")
        await producer.start()
        try:
            await producer.send_and_wait(name, b"k", b"good-1", (("h", b"\xff"),))
            [poison_offset] = await write_raw_records(broker, name, 0, [POISON])
            await producer.send_and_wait(name, b"k", b"good-2", ())
        finally:
            await producer.stop()
        got = await read_all(broker, settings, name, expect=3)
        assert [(r.offset, r.value, r.poison is not None) for r in got] == [
            (0, b"good-1", False),
            (poison_offset, None, True),
            (2, b"good-2", False),
        ]
        assert got[0].headers == (("h", b"\xff"),)  # a non-UTF-8 header value stays bytes
        poison = got[1]
        assert poison.poison is not None
        assert "header key b'\\xff\\xfe' is not UTF-8" in poison.poison
        assert (poison.key, poison.headers) == (None, ())
        assert poison.timestamp_ms > 0

    async def test_poison_inside_one_batch_keeps_its_neighbours(
        self, broker: str, settings: BusSettings, unique_topic: Callable[[str], str]
    ) -> None:
        """Good records written in the same batch as the poison one, before and after it,
        all come back in order; only the poison one is replaced."""
        name = await new_topic(broker, settings, unique_topic)
        batch = [RawRecord(b"k", f"v{i}".encode()) for i in range(5)]
        batch[2] = POISON
        offsets = await write_raw_records(broker, name, 0, batch)
        got = await read_all(broker, settings, name, expect=5)
        assert [r.offset for r in got] == offsets
        assert [r.value for r in got] == [b"v0", b"v1", None, b"v3", b"v4"]
        assert [r.poison is not None for r in got] == [False, False, True, False, False]

    async def test_other_partitions_lose_nothing(
        self, broker: str, settings: BusSettings, unique_topic: Callable[[str], str]
    ) -> None:
        """With poison records in some partitions of a group consumer's topic, every good
        record of every partition is returned exactly once."""
        name = await new_topic(broker, settings, unique_topic, partitions=3)
        expected: dict[Partition, list[bytes | None]] = {}
        for p in range(3):
            batch = [RawRecord(b"k", f"p{p}-{i}".encode()) for i in range(20)]
            if p != 0:
                batch[7 * p] = POISON
            await write_raw_records(broker, name, p, batch)
            expected[Partition(name, p)] = [r.value if r is not POISON else None for r in batch]
        consumer = Consumer(settings, broker, group=unique_topic("group"), name="faults-group")
        consumer.subscribe([name])
        await consumer.start()
        try:
            await consumer.wait_assigned()
            got: list[Record] = []
            deadline = time.monotonic() + 20
            while len(got) < 60 and time.monotonic() < deadline:
                got.extend(await consumer.fetch(200))
        finally:
            await consumer.stop()
        by_part: dict[Partition, list[bytes | None]] = {}
        for r in got:
            by_part.setdefault(r.where, []).append(r.value)
        assert by_part == expected
        assert sum(r.poison is not None for r in got) == 2


class TestLargeRecords:
    @pytest.mark.parametrize("size", [2_000_000, 5_000_000])
    async def test_record_over_the_limit_is_read(
        self, broker: str, settings: BusSettings, unique_topic: Callable[[str], str], size: int
    ) -> None:
        """A record of several MB that the broker holds is read by our Consumer, whole."""
        name = await new_topic(broker, settings, unique_topic)
        await write_raw_records(
            broker, name, 0, [RawRecord(b"k", b"a"), RawRecord(b"k", b"x" * size)]
        )
        got = await read_all(broker, settings, name, expect=2)
        assert [len(r.value or b"") for r in got] == [1, size]

    async def test_dead_letter_of_a_record_at_the_limit_is_sent(
        self, broker: str, settings: BusSettings, unique_topic: Callable[[str], str]
    ) -> None:
        """The dead letter of a record of exactly MAX_RECORD_BYTES (a copy plus the diagnostic
        headers) is accepted by the producer and the broker, and reads back as a copy."""
        headers = (("xs-message-id", b"m-1"),)
        value = b"v" * (MAX_RECORD_BYTES - 1 - len("xs-message-id") - 3)
        rec = Record("xsettle.claim.460000", 1, 42, 1, b"k", value, headers)
        assert record_size(rec) == MAX_RECORD_BYTES
        letter = dead_letter(rec, kind="bad_marker", error="e" * 900, group="g", province="460000")
        name = await new_topic(broker, settings, unique_topic)
        producer = Producer(settings, broker, name="faults-dlq")
        await producer.start()
        try:
            await producer.send_and_wait(name, letter.key, letter.value, letter.headers)
        finally:
            await producer.stop()
        [back] = await read_all(broker, settings, name, expect=1)
        assert back.value == value
        info = parse_dead_letter(back.headers)
        assert info.content == DLQ_CONTENT_COPY
        assert (info.original_topic, info.original_offset) == ("xsettle.claim.460000", 42)


class TestRejoin:
    async def test_restarted_member_gets_its_partitions_back_quickly(
        self, broker: str, settings: BusSettings, unique_topic: Callable[[str], str]
    ) -> None:
        """A member killed without leaving is replaced by a restarted one in about 11 s with
        the bus's session timeout (18 s with the client's default)."""
        name = await new_topic(broker, settings, unique_topic, partitions=3)
        group = unique_topic("rejoin")
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", MEMBER, broker, group, name,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert child.stdout is not None
            assert await asyncio.wait_for(child.stdout.readline(), 30) == b"assigned\n"
        finally:
            child.send_signal(signal.SIGKILL)
            await child.wait()
        consumer = Consumer(settings, broker, group=group, name="rejoin")
        consumer.subscribe([name])
        started = time.monotonic()
        await consumer.start()
        try:
            while len(consumer.assignment()) < 3:
                assert time.monotonic() - started < 15, "partitions not back within 15 s"
                await asyncio.sleep(0.05)
        finally:
            await consumer.stop()


def test_compose_broker_takes_max_request_bytes() -> None:
    """docker-compose.yml lets the Kafka broker take batches of MAX_REQUEST_BYTES."""
    text = (ROOT / "docker-compose.yml").read_text()
    for setting in ("KAFKA_MESSAGE_MAX_BYTES", "KAFKA_REPLICA_FETCH_MAX_BYTES"):
        found = re.search(rf'{setting}: "(\d+)"', text)
        assert found is not None, setting
        assert int(found.group(1)) == MAX_REQUEST_BYTES
