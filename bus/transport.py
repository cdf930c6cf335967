"""The Kafka transport: the only module that imports aiokafka.

Everything else sees :class:`Record`, :class:`Partition` and the bus's own errors;
aiokafka's exceptions are translated here and raised ``from`` the original.

A record the client cannot parse (a header key that is not UTF-8: aiokafka decodes header
keys while it iterates a fetched batch, inside ``getmany``) does not stop the consumer:
:meth:`Consumer.fetch` isolates it, returns the records before it, and hands it over as a
:class:`Record` whose ``poison`` says why, with the position moved past it.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError, KafkaError, for_code
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.util import calc_crc32c

from bus.constants import ERROR_TEXT_MAX, MAX_REQUEST_BYTES
from bus.errors import TransportError, TransportFatalError
from bus.logs import quiet_kafka_client
from bus.settings import BusSettings

log = structlog.get_logger(__name__)

Headers = tuple[tuple[str, bytes], ...]
"""Kafka record headers as (name, UTF-8 bytes) pairs, in order."""

TOPIC_EXISTS = 36
"""Kafka error code TOPIC_ALREADY_EXISTS: creating a topic twice is not an error for us."""

ISOLATE_WAIT_MS = 1_000
"""While a record that cannot be parsed is isolated, longest wait for one partition's records
to be fetched again (they are in the broker; a fetch round trip takes milliseconds)."""

UNPARSABLE = (UnicodeError, ValueError)
"""What aiokafka raises from ``getmany`` for a record it cannot parse (UnicodeDecodeError for a
header key that is not UTF-8). Corrupt batches raise CorruptRecordException, a KafkaError."""

NO_TIMESTAMP = -1
"""Kafka's "no timestamp"; the timestamp of a record that could not be parsed."""


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
    poison: str | None = None
    """Why the client could not parse this record (a header key that is not UTF-8), else None.
    Only its coordinates and timestamp (-1 if unknown) are given then: key and value are None,
    headers empty; the consumer's position has already moved past it."""

    @property
    def where(self) -> Partition:
        """The partition this record came from."""
        return Partition(self.topic, self.partition)


def _translate(exc: BaseException, doing: str) -> TransportError:
    if isinstance(exc, KafkaError) and not getattr(exc, "retriable", True):
        return TransportFatalError(f"{doing}: {exc!r}")
    if isinstance(exc, KafkaConnectionError) and "bootstrap" in str(exc):
        return TransportError(f"{doing}: no broker answered at the bootstrap address")
    return TransportError(f"{doing}: {exc!r}")


def _tp(p: Partition) -> TopicPartition:
    return TopicPartition(p.topic, p.partition)


def _poison(topic: str, partition: int, offset: int, timestamp_ms: int, why: str) -> Record:
    return Record(topic, partition, offset, timestamp_ms, None, None, (), poison=why)


def _record(r: Any) -> Record:
    return Record(
        topic=r.topic,
        partition=r.partition,
        offset=r.offset,
        timestamp_ms=r.timestamp,
        key=r.key,
        value=r.value,
        headers=tuple((k, bytes(v) if v is not None else b"") for k, v in r.headers),
    )


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
            # Room for a dead letter of a record at the contract's limit (the client's default
            # of 1 MiB is the limit itself, so that dead letter failed).
            max_request_size=MAX_REQUEST_BYTES,
            **settings.kafka_security(),
        )

    async def start(self) -> None:
        """Connect (a fresh client each time: aiokafka clients cannot restart); harmless
        when already started."""
        if self._started:
            return
        wanted = self._settings.producer_idempotence
        self._producer = self._new(wanted)
        try:
            with quiet_kafka_client():  # the failure below says why, once
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
                with quiet_kafka_client():  # the failure below says why, once
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
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Headers,
        *,
        partition: int | None = None,
    ) -> asyncio.Future[Any]:
        """Queue a record and return its delivery future (awaiting it waits for the ack).
        ``partition`` overrides the key's partition."""
        try:
            fut: asyncio.Future[Any] = await self._producer.send(
                topic, value=value, key=key, headers=list(headers), partition=partition
            )
        except KafkaError as exc:
            raise _translate(exc, f"sending to {topic}") from exc
        return fut

    async def send_and_wait(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Headers,
        *,
        partition: int | None = None,
    ) -> tuple[int, int]:
        """Send one record and wait for the broker's acknowledgement; returns the partition
        and offset it was written at."""
        fut = await self.send(topic, key, value, headers, partition=partition)
        try:
            metadata = await fut
        except KafkaError as exc:
            raise _translate(exc, f"sending to {topic}") from exc
        return int(metadata.partition), int(metadata.offset)


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
        instance = (
            f"{settings.group_instance_id}-{name}"
            if settings.group_instance_id is not None and group is not None
            else None
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id=f"{settings.client_id}-{name}",
            group_id=group,
            group_instance_id=instance,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if from_beginning else "latest",
            max_poll_records=settings.fetch_max_records,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            # One record of the largest size a broker configured as docker-compose.yml accepts
            # fits in a partition's share of a fetch; a larger one (the embedded broker takes
            # any size) still comes whole as the first batch of a fetch (Kafka KIP-74, and
            # Tansu: 2, 5 and 12 MB records read with these limits). fetch_max_bytes keeps
            # the client's 50 MiB.
            max_partition_fetch_bytes=MAX_REQUEST_BYTES,
            request_timeout_ms=max(settings.request_timeout_ms, 40_000),
            metadata_max_age_ms=5_000,
            **settings.kafka_security(),
        )
        self._max_records = settings.fetch_max_records
        self._from_beginning = from_beginning
        self._started = False

    async def start(self) -> None:
        """Connect; harmless when already started."""
        if self._started:
            return
        try:
            with quiet_kafka_client():  # the failure below says why, once
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
        """One batch of records across assigned, unpaused partitions, in offset order per
        partition. A record the client cannot parse comes as a :class:`Record` with
        ``poison`` set, after the records before it, and is never returned again."""
        before = self._positions()
        try:
            batch = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as exc:
            raise _translate(exc, "fetching") from exc
        except UNPARSABLE as exc:
            return await self._isolate(before, exc, max_records or self._max_records)
        return [_record(r) for records in batch.values() for r in records]

    def _positions(self) -> dict[TopicPartition, int]:
        """Next offset to read per assigned partition that has one, without awaiting.

        aiokafka's ``position()`` is a coroutine that may wait for an offset reset, too slow
        before every fetch; this reads the subscription state its ``highwater()`` reads.
        """
        subscription = self._consumer._subscription.subscription
        assignment = subscription.assignment if subscription is not None else None
        if assignment is None:
            return {}
        out: dict[TopicPartition, int] = {}
        for tp in assignment.tps:
            state = assignment.state_value(tp)
            if state.has_valid_position:
                out[tp] = state.position
        return out

    async def _isolate(
        self, before: dict[TopicPartition, int], exc: BaseException, limit: int
    ) -> list[Record]:
        """Recover from a ``getmany`` that raised while parsing a record.

        What aiokafka 0.14 does then (seen on the embedded broker): the partition whose batch
        held the record keeps its position, the records parsed before it are dropped from
        the call, and every later fetch of that partition raises again, also after a seek
        past the record, because a fetch returns whole batches and the client parses the
        records before the position to skip them. Partitions drained earlier in the same
        call have moved their position, but their records are lost with the exception.

        So: every partition goes back to where it was before the call; each partition with
        records to read is fetched alone; the one that raises is read by :func:`decode_batches`
        from its position to the end of the batch holding the bad record, and its position
        moved past that batch.
        """
        log.warning("fetch_unparsable_record", error=repr(exc)[:ERROR_TEXT_MAX])
        consumer = self._consumer
        now = self._positions()
        for tp in consumer.assignment():
            if tp in before:
                if now.get(tp) != before[tp]:
                    consumer.seek(tp, before[tp])
            elif tp in now:
                # Positioned during the call (a fresh assignment): back to where it started.
                await self._rewind(tp)
        out: list[Record] = []
        paused = consumer.paused()
        for tp in sorted(consumer.assignment()):
            budget = limit - len(out)
            if budget <= 0:
                break
            if tp in paused or not self._has_more(tp):
                continue
            try:
                got = await consumer.getmany(tp, timeout_ms=ISOLATE_WAIT_MS, max_records=budget)
            except KafkaError as err:  # a rebalance, a lost broker: fetch again later
                log.warning("fetch_isolation_interrupted", error=repr(err))
                break
            except UNPARSABLE as err:
                try:
                    out.extend(await self._read_raw(tp, budget, err))
                except KafkaError as again:
                    log.warning("fetch_isolation_interrupted", error=repr(again))
                    break
                continue
            out.extend(_record(r) for r in got.get(tp, []))
        return out

    async def _rewind(self, tp: TopicPartition) -> None:
        committed = None
        if self.group is not None:
            try:
                committed = await self._consumer.committed(tp)
            except KafkaError:
                committed = None
        if committed is not None:
            self._consumer.seek(tp, committed)
        elif self._from_beginning:
            await self._consumer.seek_to_beginning(tp)
        else:
            log.warning("fetch_rewind_unknown", topic=tp.topic, partition=tp.partition)

    def _has_more(self, tp: TopicPartition) -> bool:
        """True unless the last fetch showed ``tp`` read up to its high-water mark."""
        position = self._positions().get(tp)
        highwater = self._consumer.highwater(tp)
        return position is None or highwater is None or position < highwater

    async def _read_raw(self, tp: TopicPartition, budget: int, exc: BaseException) -> list[Record]:
        """Read ``tp`` from its position with our own parser and move the position past what
        was read; a record that cannot be parsed comes with ``poison`` set."""
        position = await self._consumer.position(tp)
        records, next_offset = await _fetch_raw(self._consumer._client, tp, position, budget)
        if not records:
            # Our parser found nothing either (a format it does not know): give up on this
            # one record, so that the partition goes on.
            text = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_MAX]
            records = [_poison(tp.topic, tp.partition, position, NO_TIMESTAMP, text)]
            next_offset = position + 1
        self._consumer.seek(tp, next_offset)
        for rec in records:
            if rec.poison is not None:
                log.warning(
                    "poison_record_skipped",
                    topic=rec.topic,
                    partition=rec.partition,
                    offset=rec.offset,
                    error=rec.poison,
                )
        return records

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
            **self._settings.kafka_security(),
        )
        try:
            with quiet_kafka_client():  # the failure below says why, once
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


async def unreachable(settings: BusSettings, bootstrap: str, *, timeout_s: float) -> str | None:
    """None when the cluster at ``bootstrap`` answers a metadata request within
    ``timeout_s``, else why not, in one line (the probe of the gateway and the console)."""
    try:
        async with asyncio.timeout(timeout_s):
            async with Admin(settings, bootstrap) as admin:
                await admin.list_topics()
    except TimeoutError:
        return f"no answer within {timeout_s:.0f} s"
    except (TransportError, KafkaError, OSError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return text[:200]
    return None


async def wait_for_metadata(
    settings: BusSettings, bootstrap: str, *, timeout_s: float = 30.0
) -> list[str]:
    """Wait until the cluster at ``bootstrap`` answers a metadata request; return its topics.
    The Kafka client's own line per failed connection is held back meanwhile: the
    :class:`TransportError` at the end says why in one line."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    with quiet_kafka_client():
        while time.monotonic() < deadline:
            try:
                async with Admin(settings, bootstrap) as admin:
                    return await admin.list_topics()
            except (TransportError, KafkaConnectionError, OSError) as exc:
                last = exc
                await asyncio.sleep(0.1)
    why = (str(last).splitlines() or [type(last).__name__])[0][:200] if last else "no answer"
    raise TransportError(f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f} s: {why}")


# --- Raw record batches: read what the client cannot parse, write what it would not send ----
RawHeader = tuple[bytes, bytes | None]
"""A header as raw bytes: the key need not be UTF-8, which no Kafka client lets you send."""


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A record written exactly as given, for fault injection."""

    key: bytes | None
    """Record key."""
    value: bytes | None
    """Record value (None writes a null value)."""
    headers: Sequence[RawHeader] = ()
    """Headers, keys as raw bytes."""


def _varint(value: int, out: bytearray) -> None:
    value = (value << 1) ^ (value >> 63)  # zigzag, as the record format wants
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)


def _nullable(data: bytes | None, out: bytearray) -> None:
    if data is None:
        _varint(-1, out)
    else:
        _varint(len(data), out)
        out += data


def encode_batch(records: Sequence[RawRecord], timestamp_ms: int) -> bytes:
    """One uncompressed record batch (Kafka message format v2) holding ``records``."""
    body = bytearray()
    for delta, rec in enumerate(records):
        one = bytearray(b"\x00")  # record attributes
        _varint(0, one)  # timestamp delta
        _varint(delta, one)  # offset delta
        _nullable(rec.key, one)
        _nullable(rec.value, one)
        _varint(len(rec.headers), one)
        for name, value in rec.headers:
            _varint(len(name), one)
            one += name
            _nullable(value, one)
        _varint(len(one), body)
        body += one
    n = len(records)
    # attributes, last offset delta, first and max timestamp, producer id, epoch, sequence
    # (none: not idempotent), record count; the CRC-32C covers all of it and the records.
    checked = struct.pack(">hiqqqhii", 0, n - 1, timestamp_ms, timestamp_ms, -1, -1, -1, n) + body
    after_length = struct.pack(">ibI", 0, 2, calc_crc32c(checked)) + checked
    return struct.pack(">qi", 0, len(after_length)) + after_length


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7


def _read_nullable(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    size, pos = _read_varint(buf, pos)
    if size < 0:
        return None, pos
    return bytes(buf[pos : pos + size]), pos + size


def _decompress(codec: int, data: bytes) -> bytes:
    from aiokafka import codec as codecs

    decoders: dict[int, Callable[[bytes], bytes]] = {
        1: codecs.gzip_decode,
        2: codecs.snappy_decode,
        3: codecs.lz4_decode,
        4: codecs.zstd_decode,
    }
    decode = decoders.get(codec)
    if decode is None:
        raise ValueError(f"unknown compression codec {codec}")
    return decode(data)


BATCH_HEADER_LEN = 61
"""Bytes of a v2 record batch before its records."""


def _decode_batch(data: bytes, pos: int, end: int, topic: str, partition: int) -> list[Record]:
    crc, attributes, _, first_ts, max_ts = struct.unpack_from(">Ihiqq", data, pos + 17)
    base = struct.unpack_from(">q", data, pos)[0]
    count = struct.unpack_from(">i", data, pos + 57)[0]
    if calc_crc32c(data[pos + 21 : end]) != crc:
        raise ValueError(f"{topic}[{partition}] batch at {base}: CRC mismatch")
    if attributes & 0x20:  # a control batch (transaction marker): no records for us
        return []
    body = data[pos + BATCH_HEADER_LEN : end]
    if attributes & 0x07:
        body = _decompress(attributes & 0x07, body)
    log_append_time = bool(attributes & 0x08)
    out: list[Record] = []
    p = 0
    for _ in range(count):
        length, p = _read_varint(body, p)
        record_end = p + length
        p += 1  # record attributes, unused
        ts_delta, p = _read_varint(body, p)
        offset_delta, p = _read_varint(body, p)
        key, p = _read_nullable(body, p)
        value, p = _read_nullable(body, p)
        n_headers, p = _read_varint(body, p)
        headers: list[tuple[str, bytes]] = []
        poison: str | None = None
        for _ in range(n_headers):
            raw_name, p = _read_nullable(body, p)
            header_value, p = _read_nullable(body, p)
            try:
                headers.append(((raw_name or b"").decode("utf-8"), header_value or b""))
            except UnicodeDecodeError as exc:
                poison = poison or f"header key {raw_name!r} is not UTF-8: {exc}"[:ERROR_TEXT_MAX]
        p = record_end
        timestamp = max_ts if log_append_time else first_ts + ts_delta
        offset = base + offset_delta
        if poison is not None:
            out.append(_poison(topic, partition, offset, timestamp, poison))
        else:
            out.append(Record(topic, partition, offset, timestamp, key, value, tuple(headers)))
    return out


def decode_batches(
    data: bytes, topic: str, partition: int, start: int, limit: int
) -> tuple[list[Record], int]:
    """Records at or after offset ``start`` in ``data`` (record batches of Kafka message format
    v2 as a fetch returns them), whole batches until ``limit`` records are reached, and the
    offset to read next. A record whose header key is not UTF-8 comes with ``poison`` set;
    a truncated last batch, an older format or a malformed batch ends the reading."""
    out: list[Record] = []
    next_offset = start
    pos = 0
    while pos + BATCH_HEADER_LEN <= len(data) and len(out) < limit:
        base, length = struct.unpack_from(">qi", data, pos)
        end = pos + 12 + length
        if end > len(data) or data[pos + 16] != 2:
            break
        last_delta = struct.unpack_from(">i", data, pos + 23)[0]
        try:
            records = _decode_batch(data, pos, end, topic, partition)
        except (IndexError, ValueError, struct.error) as exc:
            log.warning("raw_batch_unreadable", topic=topic, partition=partition, error=repr(exc))
            break
        out.extend(r for r in records if r.offset >= start)
        next_offset = max(next_offset, base + last_delta + 1)
        pos = end
    return out, next_offset


async def _fetch_raw(
    client: Any, tp: TopicPartition, offset: int, limit: int
) -> tuple[list[Record], int]:
    """Fetch ``tp`` from ``offset`` with a plain FetchRequest and decode it ourselves."""
    leader = client.cluster.leader_for_partition(tp)
    if leader is None or leader < 0:
        raise TransportError(f"{tp.topic}[{tp.partition}] has no leader")
    request = FetchRequest(
        # Returns as soon as there is a byte; not 0: Tansu answers a fetch that may not wait
        # with no data at all.
        max_wait_time=ISOLATE_WAIT_MS,
        min_bytes=1,
        max_bytes=MAX_REQUEST_BYTES,
        isolation_level=0,  # read uncommitted, as the consumer does
        topics=[(tp.topic, [(tp.partition, offset, MAX_REQUEST_BYTES)])],
    )
    response = await client.send(leader, request)
    for _, partitions in response.topics:
        for _partition, code, _highwater, *data in partitions:
            if code != 0:
                raise for_code(code)()
            return decode_batches(bytes(data[-1] or b""), tp.topic, tp.partition, offset, limit)
    return [], offset


async def write_raw_records(
    bootstrap: str, topic: str, partition: int, records: Sequence[RawRecord]
) -> list[int]:
    """Write ``records`` as one batch to one partition, bypassing every client-side check
    (header keys, size limits); returns their offsets. For fault injection only: tests and
    ``xsettle fuzz`` plant records a province must survive."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, client_id="xsettle-raw-writer")
    try:
        await client.bootstrap()
        await client._wait_on_metadata(topic)
        leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        if leader is None or leader < 0:
            raise TransportError(f"{topic}[{partition}] has no leader")
        batch = encode_batch(records, time.time_ns() // 1_000_000)
        request = ProduceRequest(
            transactional_id=None,
            required_acks=-1,
            timeout=30_000,
            topics=[(topic, [(partition, batch)])],
        )
        response = await client.send(leader, request)
    except KafkaError as exc:
        raise _translate(exc, f"writing raw records to {topic}") from exc
    finally:
        await client.close()
    for _, partitions in response.topics:
        for info in partitions:
            code, base = info[1], info[2]
            if code != 0:
                raise _translate(for_code(code)(), f"writing raw records to {topic}")
            return list(range(base, base + len(records)))
    raise TransportError(f"writing raw records to {topic}: no answer for the partition")
