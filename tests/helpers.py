"""Test helpers that talk to the real broker directly, beside the bus."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from bus.constants import H_SIGNATURE, H_SOURCE, PROVINCE_RE
from bus.envelope import header_dict
from bus.settings import BusSettings
from bus.transport import Consumer, Headers, Producer, Record
from simulators.keys import sign_as


async def read_topic(
    bootstrap: str,
    settings: BusSettings,
    topic: str,
    *,
    expect: int,
    timeout_s: float = 15.0,
    settle_s: float = 0.3,
    where: Callable[[Record], bool] = lambda r: True,
) -> list[Record]:
    """Every record of ``topic`` from the beginning, once ``expect`` arrived (and a short
    settle time passed so extra, unwanted records would show too)."""
    consumer = Consumer(settings, bootstrap, group=None, name="test-reader")
    await consumer.start()
    try:
        consumer.assign(await consumer.partitions_for(topic))
        out: list[Record] = []
        deadline = time.monotonic() + timeout_s
        settled_at: float | None = None
        while time.monotonic() < deadline:
            out.extend(r for r in await consumer.fetch(100) if where(r))
            if len(out) >= expect:
                settled_at = settled_at or time.monotonic()
                if time.monotonic() - settled_at >= settle_s:
                    break
        return out
    finally:
        await consumer.stop()


async def produce_raw(
    bootstrap: str,
    settings: BusSettings,
    topic: str,
    value: bytes,
    headers: Headers,
    key: bytes | None = b"k",
    times: int = 1,
    *,
    sign: bool = True,
) -> None:
    """Write a record (bypassing the bus), ``times`` times. With ``sign`` (the default), a
    record whose ``xs-source`` is a province code and that carries no signature is signed
    with that province's demo key, as a real province would send it; ``sign=False`` writes
    it exactly as given (forgeries)."""
    source = header_dict(headers).get(H_SOURCE, "")
    if sign and PROVINCE_RE.match(source) and all(k != H_SIGNATURE for k, _ in headers):
        headers = sign_as(source, headers, key, value)
    producer = Producer(settings, bootstrap, name="test-raw")
    await producer.start()
    try:
        for _ in range(times):
            await producer.send_and_wait(topic, key, value, headers)
    finally:
        await producer.stop()


def hdr(record: Record, name: str) -> str | None:
    """One header of a record as text."""
    return header_dict(record.headers).get(name)


async def eventually(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Wait until ``check()`` is true (fails the test after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
