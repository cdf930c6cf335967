"""The Kafka transport: the only module that imports aiokafka.

Everything else sees :class:`Record`, :class:`Partition` and the bus's own errors;
aiokafka's exceptions are translated here and raised ``from`` the original.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError

from bus.errors import TransportError, TransportFatalError
from bus.settings import BusSettings

log = structlog.get_logger(__name__)

Headers = tuple[tuple[str, bytes], ...]
"""Kafka record headers as (name, UTF-8 bytes) pairs, in order."""

TOPIC_EXISTS = 36
"""Kafka error code TOPIC_ALREADY_EXISTS: creating a topic twice is not an error for us."""


@dataclass(frozen=True, slots=True)
class Partition:
    """A topic partition."""

    topic: str
    """Topic name."""
    partition: int
    """Partition number."""


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka record, independent of the client library."""

    topic: str
    """Topic it was read from."""
    partition: int
    """Partition it was read from."""
    offset: int
    """Its offset in that partition."""
    timestamp_ms: int
    """Broker or producer timestamp, epoch milliseconds."""
    key: bytes | None
    """Record key (the person id, UTF-8)."""
    value: bytes | None
    """Record value (single-object encoded Avro), untouched."""
    headers: Headers
    """Record headers, untouched."""

    @property
    def where(self) -> Partition:
        """The partition this record came from."""
        return Partition(self.topic, self.partition)


def _translate(exc: BaseException, doing: str) -> TransportError:
    if isinstance(exc, KafkaError) and not getattr(exc, "retriable", True):
        return TransportFatalError(f"{doing}: {exc!r}")
    return TransportError(f"{doing}: {exc!r}")


def _tp(p: Partition) -> TopicPartition:
    return TopicPartition(p.topic, p.partition)


class Delivery(Protocol):
    """A pending produce: done when the broker acknowledged the record (or failed)."""

    def done(self) -> bool: ...
    def exception(self) -> BaseException | None: ...
    def __await__(self) -> Any: ...


class Producer:
    """Produces records; settings tuned for the bus (acks=all, small linger, batching)."""

    def __init__(self, settings: BusSettings, bootstrap: str, *, name: str = "producer") -> None:
        self._settings = settings
        self._bootstrap = bootstrap
        self._name = name
        self._producer: Any = None
        self._started = False

    def _new(self, idempotence: bool) -> Any:
        settings = self._settings
        return AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=f"{settings.client_id}-{self._name}",
            acks=settings.acks,
            linger_ms=settings.linger_ms,
            max_batch_size=settings.max_batch_size,
            compression_type=settings.compression,
            enable_idempotence=idempotence,
            request_timeout_ms=settings.request_timeout_ms,
        )

    async def start(self) -> None:
        """Connect (a fresh client each time: aiokafka clients cannot restart); harmless
        when already started."""
        if self._started:
            return
        wanted = self._settings.producer_idempotence
        self._producer = self._new(wanted)
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            if not (wanted and self._settings.idempotence is None):
                raise _translate(exc, "starting the producer") from exc
            # Idempotence was only our default for external clusters; a broker that cannot
            # do it (InitProducerId fails, as on Tansu) gets at-least-once delivery instead,
            # which the idempotent receivers are built for.
            log.warning(
                "idempotent_producer_unavailable", bootstrap=self._bootstrap, error=repr(exc)
            )
            self._producer = self._new(False)
            try:
                await self._producer.start()
            except KafkaError as again:
                await self._producer.stop()
                raise _translate(again, "starting the producer") from again
        self._started = True

    async def stop(self) -> None:
        """Flush and disconnect; harmless twice."""
        if not self._started:
            return
        self._started = False
        await self._producer.stop()

    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers
    ) -> asyncio.Future[Any]:
        """Queue a record and return its delivery future (awaiting it waits for the ack)."""
        try:
            fut: asyncio.Future[Any] = await self._producer.send(
                topic, value=value, key=key, headers=list(headers)
            )
        except KafkaError as exc:
            raise _translate(exc, f"sending to {topic}") from exc
        return fut

    async def send_and_wait(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers
    ) -> None:
        """Send one record and wait for the broker's acknowledgement."""
        fut = await self.send(topic, key, value, headers)
        try:
            await fut
        except KafkaError as exc:
            raise _translate(exc, f"sending to {topic}") from exc

    async def flush(self) -> None:
        """Wait until every queued record is acknowledged."""
        await self._producer.flush()


Revoked = Callable[[list[Partition]], Awaitable[None]]
Assigned = Callable[[list[Partition]], Awaitable[None]]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_revoked: Revoked | None, on_assigned: Assigned | None) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        if self._on_revoked is not None:
            await self._on_revoked([Partition(tp.topic, tp.partition) for tp in revoked])

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        if self._on_assigned is not None:
            await self._on_assigned([Partition(tp.topic, tp.partition) for tp in assigned])


class Consumer:
    """A group consumer with manual commits only, batch fetches and pause/resume."""

    def __init__(
        self,
        settings: BusSettings,
        bootstrap: str,
        *,
        group: str | None,
        name: str = "consumer",
        from_beginning: bool = True,
    ) -> None:
        self.group = group
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id=f"{settings.client_id}-{name}",
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if from_beginning else "latest",
            max_poll_records=settings.fetch_max_records,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            request_timeout_ms=max(settings.request_timeout_ms, 40_000),
            metadata_max_age_ms=5_000,
        )
        self._started = False

    async def start(self) -> None:
        """Connect; harmless when already started."""
        if self._started:
            return
        try:
            await self._consumer.start()
        except KafkaError as exc:
            await self._consumer.stop()
            raise _translate(exc, "starting the consumer") from exc
        self._started = True

    async def stop(self) -> None:
        """Leave the group and disconnect (commits nothing by itself); harmless twice."""
        if not self._started:
            return
        self._started = False
        await self._consumer.stop()

    def subscribe(
        self,
        topics: Sequence[str] = (),
        *,
        pattern: str | None = None,
        on_revoked: Revoked | None = None,
        on_assigned: Assigned | None = None,
    ) -> None:
        """Subscribe to topics (or a regex) with rebalance callbacks."""
        listener = _Listener(on_revoked, on_assigned)
        if pattern is not None:
            self._consumer.subscribe(pattern=pattern, listener=listener)
        else:
            self._consumer.subscribe(topics=list(topics), listener=listener)

    def assign(self, partitions: Sequence[Partition]) -> None:
        """Read these partitions without a group."""
        self._consumer.assign([_tp(p) for p in partitions])

    def assignment(self) -> set[Partition]:
        """Partitions currently assigned to this consumer."""
        return {Partition(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    async def wait_assigned(self, timeout_s: float = 30.0) -> set[Partition]:
        """Wait until the group gave this consumer at least one partition."""
        deadline = time.monotonic() + timeout_s
        while not self._consumer.assignment():
            if time.monotonic() > deadline:
                raise TransportError(f"no partition assigned within {timeout_s} s")
            await asyncio.sleep(0.05)
        return self.assignment()

    async def fetch(self, timeout_ms: int, max_records: int | None = None) -> list[Record]:
        """One batch of records across assigned, unpaused partitions."""
        try:
            batch = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as exc:
            raise _translate(exc, "fetching") from exc
        out: list[Record] = []
        for records in batch.values():
            out.extend(
                Record(
                    topic=r.topic,
                    partition=r.partition,
                    offset=r.offset,
                    timestamp_ms=r.timestamp,
                    key=r.key,
                    value=r.value,
                    headers=tuple((k, bytes(v) if v is not None else b"") for k, v in r.headers),
                )
                for r in records
            )
        return out

    def pause(self, partition: Partition) -> None:
        """Stop fetching from ``partition`` until resumed (back-pressure)."""
        self._consumer.pause(_tp(partition))

    def resume(self, partition: Partition) -> None:
        """Fetch from ``partition`` again."""
        self._consumer.resume(_tp(partition))

    async def commit(self, offsets: Mapping[Partition, int]) -> None:
        """Commit ``next offset to read`` per partition."""
        if not offsets:
            return
        try:
            await self._consumer.commit({_tp(p): o for p, o in offsets.items()})
        except KafkaError as exc:
            raise _translate(exc, "committing") from exc

    async def committed(self, partition: Partition) -> int | None:
        """The group's committed offset of ``partition``."""
        result: int | None = await self._consumer.committed(_tp(partition))
        return result

    async def seek_to_time(self, when_ms: int) -> None:
        """Move every assigned partition to the first record at or after ``when_ms``."""
        tps = list(self._consumer.assignment())
        found = await self._consumer.offsets_for_times(dict.fromkeys(tps, when_ms))
        ends = await self._consumer.end_offsets(tps)
        for tp in tps:
            hit = found.get(tp)
            self._consumer.seek(tp, hit.offset if hit is not None else ends[tp])

    async def seek_to_end(self) -> None:
        """Move every assigned partition to its end."""
        await self._consumer.seek_to_end()

    async def lag(self) -> dict[Partition, int]:
        """Records not yet read per assigned partition (high-water mark − position)."""
        tps = list(self._consumer.assignment())
        if not tps:
            return {}
        ends = await self._consumer.end_offsets(tps)
        out: dict[Partition, int] = {}
        for tp in tps:
            try:
                position = await self._consumer.position(tp)
            except KafkaError:
                continue
            out[Partition(tp.topic, tp.partition)] = max(0, ends[tp] - position)
        return out

    async def end_offsets(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        """The next offset to be written per partition."""
        ends = await self._consumer.end_offsets([_tp(p) for p in partitions])
        return {Partition(tp.topic, tp.partition): o for tp, o in ends.items()}

    async def partitions_for(self, topic: str) -> list[Partition]:
        """Partitions of ``topic`` from the cluster metadata."""
        parts = self._consumer.partitions_for_topic(topic)
        if parts is None:
            await self._consumer._client.force_metadata_update()
            parts = self._consumer.partitions_for_topic(topic) or set()
        return [Partition(topic, p) for p in sorted(parts)]


class Admin:
    """Topic administration and metadata checks."""

    def __init__(self, settings: BusSettings, bootstrap: str) -> None:
        self._settings = settings
        self._bootstrap = bootstrap
        self._admin: AIOKafkaAdminClient | None = None

    async def __aenter__(self) -> Admin:
        self._admin = AIOKafkaAdminClient(
            bootstrap_servers=self._bootstrap,
            client_id=f"{self._settings.client_id}-admin",
            request_timeout_ms=self._settings.request_timeout_ms,
        )
        try:
            await self._admin.start()
        except KafkaError as exc:
            await self._admin.close()
            raise _translate(exc, f"connecting to {self._bootstrap}") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._admin is not None:
            await self._admin.close()
            self._admin = None

    async def list_topics(self) -> list[str]:
        """Every topic name in the cluster."""
        assert self._admin is not None
        try:
            return sorted(await self._admin.list_topics())
        except KafkaError as exc:
            raise _translate(exc, "listing topics") from exc

    async def create_topics(self, names: Iterable[str], *, partitions: int | None = None) -> int:
        """Create ``names`` that do not exist yet; returns how many were created."""
        assert self._admin is not None
        wanted = sorted(set(names))
        existing = set(await self.list_topics())
        missing = [n for n in wanted if n not in existing]
        if not missing:
            return 0
        new = [
            NewTopic(
                name=n,
                num_partitions=partitions or self._settings.partitions,
                replication_factor=self._settings.replication_factor,
            )
            for n in missing
        ]
        created = 0
        for start in range(0, len(new), 100):  # keep one CreateTopics request small
            try:
                response = await self._admin.create_topics(new[start : start + 100])
            except KafkaError as exc:
                raise _translate(exc, "creating topics") from exc
            for item in response.topic_errors:
                name, code = item[0], item[1]
                if code == 0:
                    created += 1
                elif code != TOPIC_EXISTS:
                    raise TransportFatalError(f"creating topic {name}: Kafka error code {code}")
        return created


async def wait_for_metadata(
    settings: BusSettings, bootstrap: str, *, timeout_s: float = 30.0
) -> list[str]:
    """Wait until the cluster at ``bootstrap`` answers a metadata request; return its topics."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            async with Admin(settings, bootstrap) as admin:
                return await admin.list_topics()
        except (TransportError, KafkaConnectionError, OSError) as exc:
            last = exc
            await asyncio.sleep(0.1)
    raise TransportError(f"no Kafka metadata from {bootstrap} within {timeout_s} s: {last!r}")
