"""Fault injection on a running node: a crash, and a record written as given.

Not used by the node itself: tests crash nodes to prove what survives
(tests/test_crash_safety.py and others), and the demo plants an undecodable record that only
a raw write can produce (simulators/demo.py).
"""

from __future__ import annotations

from typing import Any

from bus.node import Node


async def kill(node: Node) -> None:
    """Simulate a crash of ``node``: drop everything without committing or draining."""
    node._running = False
    node._partitions.halt()
    for task in node._tasks:
        task.cancel()
    node._partitions.abandon()
    node._tasks.clear()
    node._relay.abandon()
    await node._partitions.close()
    await node._producer.stop()


async def send_raw(
    node: Node, topic_name: str, key: bytes | None, value: bytes, headers: Any
) -> None:
    """Write a record exactly as given with ``node``'s producer, bypassing the outbox."""
    await (await node._producer.send(topic_name, key, value, headers))
