"""A node's consumer loop: fetching its inbox, one worker per partition, committing offsets.

:class:`ConsumerLoop` owns the group consumer of a node's inbox. One fetch loop reads records
and queues them per partition; a worker per partition hands them, in order and in batches of
at most :data:`BATCH_MAX`, to the node's ``process`` callback (reading, steps, retries and
dead letters are the node's: :meth:`bus.node.Node._process_batch`). Work runs concurrently
across partitions; a partition with a long queue is paused and resumed once it drained.

The commit ledger: an offset is committed only once its records' steps committed and the
broker acknowledged every record those steps sent (:func:`acknowledged`); at most every
:data:`COMMIT_INTERVAL_S`, and at once on revocation and stop.

A component rather than a mixin: the seam is clean (a process callback, a way to spawn
supervised tasks, the node's logger), and it keeps no state of the node's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bus.errors import BusError
from bus.settings import BusSettings
from bus.transport import Consumer, Partition, Record

QUEUE_HIGH = 1_000
"""Records queued for one partition before fetching from it pauses (memory bound)."""
QUEUE_LOW = 200
"""Queue length at which a paused partition is resumed."""
COMMIT_INTERVAL_S = 0.1
"""Done offsets are committed at most this often (and on revoke and stop)."""
BATCH_MAX = 256
"""Records of one partition handled in one step (one transaction) at most: what one fetch
returned, up to this many. A bigger batch holds the province's step longer (SQLite has one
writer) for little gain."""
DRAIN_TIMEOUT_S = 10.0
"""Longest a graceful stop waits for in-flight work."""
FETCH_TIMEOUT_MS = 100
"""Longest one fetch blocks, so a stop is noticed quickly."""
STALL_AFTER_S = 60.0
"""A partition whose record has been in hand this long (retries included: five tries with
backoff capped at 5 s take ~20 s) counts as stalled in :meth:`ConsumerLoop.stalled` and the
metrics."""

Process = Callable[[list[Record]], Awaitable[list[asyncio.Future[None]]]]
"""Handles a partition's records in order to their end; returns the acknowledgements the
last one's offset waits for."""
Spawn = Callable[[Awaitable[None], str], "asyncio.Task[None]"]
"""Starts a named task whose unexpected death is fatal to the node."""


@dataclass
class PartitionWorker:
    """Sequential processing of one partition."""

    part: Partition
    queue: deque[Record] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    done: deque[tuple[int, list[asyncio.Future[None]]]] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    paused: bool = False
    stopping: bool = False
    busy_since: float | None = None


def acknowledged(worker: PartitionWorker) -> int | None:
    """Highest offset whose step committed and whose outbox records the broker has all
    acknowledged (the relay re-sends failed ones itself)."""
    ready: int | None = None
    while worker.done:
        offset, futures = worker.done[0]
        if not all(f.done() and not f.cancelled() for f in futures):
            return ready
        worker.done.popleft()
        ready = offset
    return ready


class ConsumerLoop:
    """The consumer of one node's inbox and its partition workers (see the module
    docstring)."""

    def __init__(
        self,
        settings: BusSettings,
        bootstrap: str,
        *,
        group: str,
        name: str,
        process: Process,
        spawn: Spawn,
        log: Any,
    ) -> None:
        self._settings = settings
        self._bootstrap = bootstrap
        self._group = group
        self._name = name
        self._process = process
        self._spawn = spawn
        self._log = log
        self._consumer: Consumer | None = None
        self._workers: dict[Partition, PartitionWorker] = {}
        self._running = False
        self._last_commit = 0.0

    @property
    def consuming(self) -> bool:
        """True between :meth:`start` and :meth:`close`."""
        return self._consumer is not None

    async def start(self, topics: list[str]) -> None:
        """Join the group on ``topics`` and start fetching."""
        self._consumer = Consumer(
            self._settings, self._bootstrap, group=self._group, name=self._name
        )
        self._consumer.subscribe(topics, on_revoked=self._on_revoked, on_assigned=self._on_assigned)
        await self._consumer.start()
        self._running = True
        self._spawn(self._fetch_loop(), "fetch")

    def halt(self) -> None:
        """Fetch no more (the node is stopping; its tasks are cancelled next)."""
        self._running = False

    async def finish(self) -> None:
        """Drain in-flight work (at most :data:`DRAIN_TIMEOUT_S`), commit what is done, and
        drop the workers."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain(list(self._workers)), DRAIN_TIMEOUT_S)
        await self._commit(force=True)
        self.abandon()

    def abandon(self) -> None:
        """Drop the workers without draining or committing."""
        for worker in self._workers.values():
            if worker.task is not None:
                worker.task.cancel()
        self._workers.clear()

    async def close(self) -> None:
        """Leave the group and disconnect."""
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    def assigned(self) -> int:
        """How many partitions the group assigned to this consumer now (0 when not
        consuming)."""
        return len(self._consumer.assignment()) if self._consumer is not None else 0

    def stalled(self) -> list[Partition]:
        """Partitions whose record in hand has not finished for :data:`STALL_AFTER_S`."""
        limit = time.monotonic() - STALL_AFTER_S
        return [
            part
            for part, w in self._workers.items()
            if w.busy_since is not None and w.busy_since < limit
        ]

    async def lag(self) -> dict[Partition, int]:
        """Records not yet read per assigned partition."""
        return await self._consumer.lag() if self._consumer is not None else {}

    async def _on_assigned(self, parts: list[Partition]) -> None:
        self._log.info("partitions_assigned", partitions=len(parts))

    async def _on_revoked(self, parts: list[Partition]) -> None:
        """Finish the record in hand for revoked partitions, drop the rest, commit."""
        mine = [p for p in parts if p in self._workers]
        for part in mine:
            worker = self._workers[part]
            worker.stopping = True
            worker.queue.clear()
            worker.wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain(mine), DRAIN_TIMEOUT_S)
        await self._commit(force=True, only=mine)
        for part in mine:
            worker = self._workers.pop(part)
            if worker.task is not None:
                worker.task.cancel()
        self._log.info("partitions_revoked", partitions=len(parts))

    async def _drain(self, parts: list[Partition]) -> None:
        for part in parts:
            worker = self._workers.get(part)
            if worker is None:
                continue
            worker.stopping = True
            worker.wake.set()
            if worker.task is not None:
                # A worker that died was reported by the node (its spawn) already.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await worker.task
            for _, futures in worker.done:
                for fut in futures:
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await fut

    async def _fetch_loop(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while self._running:
            try:
                records = await consumer.fetch(FETCH_TIMEOUT_MS, self._settings.fetch_max_records)
            except BusError as exc:
                if not exc.retriable:
                    raise
                self._log.warning("fetch_failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            for rec in records:
                part = rec.where
                worker = self._workers.get(part)
                if worker is None:
                    worker = self._workers[part] = PartitionWorker(part)
                    worker.task = self._spawn(
                        self._work(worker), f"work:{part.topic}:{part.partition}"
                    )
                worker.queue.append(rec)
                worker.wake.set()
                if not worker.paused and len(worker.queue) >= QUEUE_HIGH:
                    consumer.pause(part)
                    worker.paused = True
            await self._commit()

    async def _work(self, worker: PartitionWorker) -> None:
        while True:
            if not worker.queue:
                if worker.stopping:
                    return
                worker.wake.clear()
                await worker.wake.wait()
                continue
            batch = [worker.queue.popleft() for _ in range(min(len(worker.queue), BATCH_MAX))]
            worker.busy_since = time.monotonic()
            futures = await self._process(batch)
            worker.busy_since = None
            worker.done.append((batch[-1].offset, futures))
            if worker.paused and len(worker.queue) <= QUEUE_LOW and self._consumer is not None:
                self._consumer.resume(worker.part)
                worker.paused = False

    async def _commit(self, *, force: bool = False, only: list[Partition] | None = None) -> None:
        if self._consumer is None:
            return
        if not force and time.monotonic() - self._last_commit < COMMIT_INTERVAL_S:
            return
        self._last_commit = time.monotonic()
        offsets: dict[Partition, int] = {}
        for part, worker in list(self._workers.items()):
            if only is not None and part not in only:
                continue
            ready = acknowledged(worker)
            if ready is not None:
                offsets[part] = ready + 1
        if offsets:
            try:
                await self._consumer.commit(offsets)
            except BusError as exc:
                self._log.warning("commit_failed", error=str(exc))
