"""Ops monitoring: what is failing, who must act, what is overdue.

Reads the contract's ``xsettle.error.*`` and ``xsettle.dlq.*`` topics without a consumer group
(manual assignment: ops readers read, never commit), replays dead letters, and reports the
requests a node is still waiting for. It knows the contract, not medical rules.

Personal data never leaves this module unmasked: every ``to_json`` masks record keys (the person
id) with :func:`bus.logs.mask_id`, names with :func:`bus.logs.mask_name`, and ID numbers inside
free text with :func:`bus.logs.mask_text`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Final, Literal

import structlog

from bus.codec import Codec
from bus.constants import (
    DLQ_TOPIC_PATTERN,
    ERROR_TOPIC_PATTERN,
    FAMILY_DLQ,
    FAMILY_ERROR,
    H_CORRELATION_ID,
    H_SOURCE,
    TOPIC_RE,
    topic,
)
from bus.deadletter import original_headers, parse_dead_letter, replay_marker
from bus.envelope import Envelope, header_dict, now_ms
from bus.errors import DecodeError
from bus.logs import ID_KEYS, NAME_KEYS, mask_id, mask_name, mask_text
from bus.models import ErrorReport
from bus.settings import BusSettings
from bus.store import OPEN, Obligation, PendingRequest, Store
from bus.transport import Admin, Consumer, Headers, Partition, Producer, Record

log = structlog.get_logger(__name__)

Since = Literal["now", "beginning"] | int
"""Where a reader starts: new records only, everything, or records at/after epoch ms."""

FETCH_MS: Final = 200
"""Longest one fetch of an ops reader blocks, so stop conditions are checked often."""
REDISCOVER_S: Final = 5.0
"""How often a reader over all provinces looks for new error/DLQ topics."""
CATCH_UP_TIMEOUT_S: Final = 30.0
"""Longest a one-shot read (list the DLQ) waits to reach the end offsets it saw at start."""
PREVIEW_BYTES: Final = 64
"""Bytes of an undecodable value shown in hex."""
NEAR_FRACTION: Final = 0.10
"""A pending request is *near* its deadline within this fraction of its window ..."""
NEAR_MIN_S: Final = 60.0
"""... or within this many seconds, whichever is larger."""


# --- masking ---------------------------------------------------------------------------------
def mask_key(key: bytes | None) -> str | None:
    """A record key (the person id) masked for display."""
    return None if key is None else mask_id(key.decode("utf-8", errors="replace"))


def mask_value(value: Any, key: str = "") -> Any:
    """Mask personal data in plain (JSON-like) data: ids and names by key, ID numbers in text."""
    if isinstance(value, str):
        if key in NAME_KEYS:
            return mask_name(value)
        if key in ID_KEYS:
            return mask_id(value)
        return mask_text(value)
    if isinstance(value, dict):
        return {str(k): mask_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_value(v, key) for v in value]
    return value


def coords(topic_name: str, partition: int, offset: int) -> str:
    """``topic:partition:offset``, how an operator names one record."""
    return f"{topic_name}:{partition}:{offset}"


def parse_coords(text: str) -> tuple[str, int, int]:
    """Parse ``topic:partition:offset`` (ValueError when malformed)."""
    name, sep, rest = text.rpartition(":")
    name2, sep2, part = name.rpartition(":")
    if not sep or not sep2 or not name2:
        raise ValueError(f"{text!r} is not TOPIC:PARTITION:OFFSET")
    return name2, int(part), int(rest)


def province_of_topic(topic_name: str) -> str | None:
    """The province of a contract topic, or None."""
    m = TOPIC_RE.match(topic_name)
    return m.group(2) if m else None


# --- reading ---------------------------------------------------------------------------------
async def matching_topics(settings: BusSettings, bootstrap: str, pattern: str) -> list[str]:
    """Topics of the cluster whose name matches ``pattern``."""
    rx = re.compile(pattern)
    async with Admin(settings, bootstrap) as admin:
        return [name for name in await admin.list_topics() if rx.match(name)]


async def follow_records(
    settings: BusSettings,
    bootstrap: str,
    *,
    topics: Sequence[str] | None = None,
    pattern: str | None = None,
    since: Since = "now",
    stop_after_s: float | None = None,
    until_caught_up: bool = False,
    name: str = "ops-reader",
) -> AsyncGenerator[Record, None]:
    """Records of ``topics`` (or of every topic matching ``pattern``, found again every few
    seconds) by manual assignment, without a group and without committing.

    ``since`` ``"now"`` skips what was there when the reader started, ``"beginning"`` reads
    everything, an int skips records older than that epoch ms. Stops after ``stop_after_s``
    seconds, or (``until_caught_up``) once it has read up to the end offsets of the start.
    """
    if (topics is None) == (pattern is None):
        raise ValueError("give exactly one of topics and pattern")
    started = time.monotonic()
    started_ms = now_ms()
    consumer = Consumer(settings, bootstrap, group=None, name=name, from_beginning=True)
    await consumer.start()
    try:

        async def discover() -> list[Partition]:
            names = (
                list(topics)
                if topics is not None
                else await matching_topics(settings, bootstrap, pattern or "")
            )
            parts: set[Partition] = set()
            for n in names:
                parts.update(await consumer.partitions_for(n))
            return sorted(parts, key=lambda p: (p.topic, p.partition))

        parts = await discover()
        initial = set(parts)
        # Next offset to hand out per partition: a re-assignment (new topics found) restarts
        # every partition at its beginning, and this filter drops what was already read.
        next_offset: dict[Partition, int] = {}
        goal: dict[Partition, int] = {}
        if parts:
            consumer.assign(parts)
            if until_caught_up or since == "now":
                goal = await consumer.end_offsets(parts)
            if since == "now":
                next_offset.update(goal)
                await consumer.seek_to_end()
        min_ts = since if isinstance(since, int) else None
        last_discovery = time.monotonic()
        while True:
            if stop_after_s is not None and time.monotonic() - started >= stop_after_s:
                return
            if until_caught_up and all(next_offset.get(p, 0) >= e for p, e in goal.items()):
                return
            if until_caught_up and time.monotonic() - started > CATCH_UP_TIMEOUT_S:
                log.warning("ops_catch_up_timeout", topics=len({p.topic for p in parts}))
                return
            if pattern is not None and time.monotonic() - last_discovery >= REDISCOVER_S:
                last_discovery = time.monotonic()
                found = await discover()
                if set(found) != set(parts):
                    parts = found
                    consumer.assign(parts)
            if not parts:
                await _nap(stop_after_s, started)
                continue
            for rec in await consumer.fetch(FETCH_MS):
                where = rec.where
                if rec.offset < next_offset.get(where, 0):
                    continue
                next_offset[where] = rec.offset + 1
                if min_ts is not None and rec.timestamp_ms < min_ts:
                    continue
                if since == "now" and where not in initial and rec.timestamp_ms < started_ms:
                    continue
                yield rec
    finally:
        await consumer.stop()


async def _nap(stop_after_s: float | None, started: float) -> None:
    wait = 0.5
    if stop_after_s is not None:
        wait = max(0.0, min(wait, stop_after_s - (time.monotonic() - started)))
    await asyncio.sleep(wait)


# --- error reports ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """One record of an ``xsettle.error.<P>`` topic: a decoded ErrorReport, or why not."""

    topic: str
    """Error topic it was read from."""
    partition: int
    """Its partition."""
    offset: int
    """Its offset."""
    timestamp_ms: int
    """Record timestamp, epoch ms."""
    correlation_id: str | None
    """``xs-correlation-id``: the message the report is about."""
    source: str | None
    """``xs-source``: the province that detected and reported it."""
    report: ErrorReport | None
    """The decoded report (None when undecodable)."""
    decode_error: str | None
    """Why the record could not be decoded, else None."""
    key: bytes | None = None
    """Record key (the person id): shown masked only."""

    @property
    def addressee(self) -> str | None:
        """The province whose error topic holds the record."""
        return province_of_topic(self.topic)

    @property
    def code(self) -> str:
        """The error code (``UNDECODABLE`` for a record that is no ErrorReport)."""
        return self.report.code.value if self.report is not None else "UNDECODABLE"

    @property
    def error_id(self) -> str:
        """The report's id, or the record's coordinates when undecodable."""
        if self.report is not None:
            return self.report.error_id
        return coords(self.topic, self.partition, self.offset)

    def to_json(self) -> dict[str, Any]:
        """Plain data for JSON, personal data masked."""
        out: dict[str, Any] = {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
            "addressee": self.addressee,
            "correlation_id": self.correlation_id,
            "source": self.source,
            "key": mask_key(self.key),
            "code": self.code,
            "decode_error": mask_text(self.decode_error) if self.decode_error else None,
        }
        rep = self.report
        if rep is not None:
            out.update(
                error_id=rep.error_id,
                message=mask_text(rep.message),
                origin=rep.origin,
                responsible=rep.responsible,
                detected_by=rep.detected_by,
                retriable=rep.retriable,
                severity=rep.severity.value,
                occurred_at=rep.occurred_at.isoformat(),
                ref_message_id=rep.ref_message_id,
                ref_message_type=rep.ref_message_type,
                ref=(
                    coords(rep.ref_topic, rep.ref_partition or 0, rep.ref_offset)
                    if rep.ref_topic is not None and rep.ref_offset is not None
                    else rep.ref_topic
                ),
                details=mask_value(dict(rep.details)),
            )
        return out


def error_event(rec: Record, codec: Codec) -> ErrorEvent:
    """Decode one error-topic record."""
    hdrs = header_dict(rec.headers)
    report: ErrorReport | None = None
    problem: str | None = None
    try:
        report = codec.decode_as(rec.value or b"", ErrorReport)
    except DecodeError as exc:
        problem = str(exc)
    return ErrorEvent(
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        timestamp_ms=rec.timestamp_ms,
        correlation_id=hdrs.get(H_CORRELATION_ID),
        source=hdrs.get(H_SOURCE),
        report=report,
        decode_error=problem,
        key=rec.key,
    )


async def follow_errors(
    settings: BusSettings,
    bootstrap: str,
    *,
    province: str | None,
    since: Since = "now",
    stop_after_s: float | None = None,
    until_caught_up: bool = False,
    codec: Codec | None = None,
) -> AsyncGenerator[ErrorEvent, None]:
    """Error reports addressed to ``province`` (every province when None), as they come.

    Use ``contextlib.aclosing`` when leaving the loop early so the reader disconnects.
    """
    codec = codec or Codec()
    source = follow_records(
        settings,
        bootstrap,
        topics=[topic(FAMILY_ERROR, province)] if province else None,
        pattern=None if province else ERROR_TOPIC_PATTERN,
        since=since,
        stop_after_s=stop_after_s,
        until_caught_up=until_caught_up,
        name="ops-errors",
    )
    async with contextlib.aclosing(source) as records:
        async for rec in records:
            yield error_event(rec, codec)


def _event_time_ms(event: ErrorEvent) -> int:
    """When a report happened: its ``occurred_at``, else the record's timestamp."""
    if event.report is not None:
        return int(event.report.occurred_at.timestamp() * 1000)
    return event.timestamp_ms


@dataclass
class ErrorAggregate:
    """Error reports counted by code, origin and responsible province, plus the newest.

    A report sent to two topics (to the sender and to the detector's own ops) has one
    ``error_id`` and is counted once.
    """

    newest_n: int = 50
    """How many of the newest events are kept."""
    total: int = 0
    """Distinct reports seen."""
    by_code: Counter[str] = field(default_factory=Counter)
    """Reports per error code."""
    by_origin: Counter[str] = field(default_factory=Counter)
    """Reports per province that sent the faulty message."""
    by_responsible: Counter[str] = field(default_factory=Counter)
    """Reports per province that must act."""
    by_code_responsible: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Reports per (code, responsible province)."""
    newest: deque[ErrorEvent] = field(default_factory=deque)
    """Newest events, newest last."""
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict, init=False, repr=False)

    SEEN_MAX: ClassVar[int] = 100_000
    """Error ids remembered for de-duplication (memory bound)."""

    def add(self, event: ErrorEvent) -> bool:
        """Count one event; False when its report was already counted."""
        eid = event.error_id
        if eid in self._seen:
            return False
        self._seen[eid] = None
        if len(self._seen) > self.SEEN_MAX:
            self._seen.popitem(last=False)
        self.total += 1
        rep = event.report
        origin = rep.origin if rep is not None else (event.source or "?")
        responsible = rep.responsible if rep is not None else (event.addressee or "?")
        self.by_code[event.code] += 1
        self.by_origin[origin] += 1
        self.by_responsible[responsible] += 1
        self.by_code_responsible[(event.code, responsible)] += 1
        # Newest by the time of the report, across topics (records of several error topics
        # arrive interleaved): kept sorted, the oldest dropped first.
        at = _event_time_ms(event)
        if self.newest and at < _event_time_ms(self.newest[-1]):
            ordered = sorted([*self.newest, event], key=_event_time_ms)
            self.newest = deque(ordered)
        else:
            self.newest.append(event)
        while len(self.newest) > self.newest_n:
            self.newest.popleft()
        return True

    def to_json(self, newest: int | None = None) -> dict[str, Any]:
        """Counts and the newest events (newest first), masked."""
        events = list(self.newest)[::-1][: newest if newest is not None else self.newest_n]
        return {
            "total": self.total,
            "by_code": dict(self.by_code.most_common()),
            "by_origin": dict(self.by_origin.most_common()),
            "by_responsible": dict(self.by_responsible.most_common()),
            "by_code_responsible": [
                {"code": c, "responsible": r, "count": n}
                for (c, r), n in self.by_code_responsible.most_common()
            ],
            "newest": [e.to_json() for e in events],
        }


# --- dead letters ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of an ``xsettle.dlq.<P>`` topic: a record P could not decode."""

    topic: str
    """The DLQ topic."""
    partition: int
    """Partition of the dead letter."""
    offset: int
    """Offset of the dead letter."""
    timestamp_ms: int
    """When the dead letter was written."""
    original_topic: str | None
    """Topic the record was first read from."""
    original_partition: int | None
    """Its partition there."""
    original_offset: int | None
    """Its offset there."""
    original_timestamp_ms: int | None
    """Its timestamp there."""
    error_kind: str | None
    """DecodeError kind (bad_marker, unknown_fingerprint, ...)."""
    error: str | None
    """Diagnostic text."""
    consumer_group: str | None
    """Group of the consumer that gave up on it."""
    detected_at_ms: int | None
    """When it was dead-lettered."""
    message_id: str | None
    """``xs-message-id`` of the original, if it had one."""
    key: bytes | None
    """Original key (the person id): shown masked only."""
    value: bytes
    """Original value, byte for byte."""
    headers: Headers
    """Original headers plus the diagnostic ones."""
    replayed_at_ms: int | None = None
    """When it was last replayed (from a replay marker), else None."""
    replayable: bool = True
    """False when the letter holds only a digest or the coordinates of the original."""

    @property
    def coordinates(self) -> str:
        """``topic:partition:offset`` of the dead letter."""
        return coords(self.topic, self.partition, self.offset)

    @property
    def original_coordinates(self) -> str | None:
        """``topic:partition:offset`` of the original record."""
        if self.original_topic is None:
            return None
        return coords(self.original_topic, self.original_partition or 0, self.original_offset or 0)

    @property
    def province(self) -> str | None:
        """Province that dead-lettered it."""
        return province_of_topic(self.topic)

    def original_headers(self) -> Headers:
        """The original headers: diagnostic ``xs-dlq-*`` headers stripped, the rest kept."""
        return original_headers(self.headers)

    def decoded_preview(self, codec: Codec | None = None) -> dict[str, Any]:
        """Decode as far as possible, masked: headers as envelope fields, the value as its
        message, else the decode error and the first bytes in hex."""
        codec = codec or Codec()
        original = self.original_headers()
        out: dict[str, Any] = {"headers": mask_value(header_dict(original))}
        try:
            env = Envelope.from_headers(original)
            out["envelope"] = {
                "message_id": env.message_id,
                "message_type": env.message_type,
                "source": env.source,
                "target": env.target,
                "sent_at_ms": env.sent_at_ms,
                "attempt": env.attempt,
                "reply_to": env.reply_to,
                "deadline_ms": env.deadline_ms,
                "correlation_id": env.correlation_id,
            }
        except DecodeError as exc:
            out["envelope_error"] = str(exc)
        try:
            message = codec.decode(self.value)
        except DecodeError as exc:
            out["decode_error"] = str(exc)
            out["value_len"] = len(self.value)
            out["value_hex"] = self.value[:PREVIEW_BYTES].hex(" ")
        else:
            out["message_type"] = message.avro_name
            out["payload"] = mask_value(message.model_dump(mode="json"))
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain data for JSON, personal data masked."""
        return {
            "coordinates": self.coordinates,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
            "province": self.province,
            "original": self.original_coordinates,
            "original_timestamp_ms": self.original_timestamp_ms,
            "error_kind": self.error_kind,
            "error": mask_text(self.error) if self.error else None,
            "consumer_group": self.consumer_group,
            "detected_at_ms": self.detected_at_ms,
            "message_id": self.message_id,
            "key": mask_key(self.key),
            "value_len": len(self.value),
            "replayed_at_ms": self.replayed_at_ms,
        }


@dataclass(frozen=True, slots=True)
class ReplayMarker:
    """A record in a DLQ topic saying that one of its dead letters was replayed."""

    letter: str
    """``topic:partition:offset`` of the dead letter replayed."""
    replayed_at_ms: int
    """When."""


def parse_dlq_record(rec: Record) -> DeadLetter | ReplayMarker:
    """A DLQ record as a dead letter, or as a replay marker (format: :mod:`bus.deadletter`)."""
    info = parse_dead_letter(rec.headers)
    if info.is_replay_marker:
        assert info.replay_of is not None
        return ReplayMarker(info.replay_of, info.replayed_at_ms or rec.timestamp_ms)
    return DeadLetter(
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        timestamp_ms=rec.timestamp_ms,
        original_topic=info.original_topic,
        original_partition=info.original_partition,
        original_offset=info.original_offset,
        original_timestamp_ms=info.original_timestamp_ms,
        error_kind=info.error_kind,
        error=info.error,
        consumer_group=info.consumer_group,
        detected_at_ms=info.detected_at_ms,
        message_id=info.message_id,
        key=rec.key,
        value=rec.value or b"",
        headers=rec.headers,
        replayable=info.replayable,
    )


class DeadLetterBook:
    """Dead letters by coordinates with their replay state, fed record by record."""

    def __init__(self) -> None:
        self._letters: dict[str, DeadLetter] = {}
        self._replayed: dict[str, int] = {}

    def add(self, rec: Record) -> None:
        """Take one DLQ record (a dead letter or a replay marker)."""
        item = parse_dlq_record(rec)
        if isinstance(item, ReplayMarker):
            self.mark_replayed(item.letter, item.replayed_at_ms)
        else:
            self._letters[item.coordinates] = item

    def mark_replayed(self, letter: str, at_ms: int) -> None:
        """Remember that ``letter`` was replayed at ``at_ms`` (the latest replay wins)."""
        self._replayed[letter] = max(at_ms, self._replayed.get(letter, 0))

    def get(self, letter: str) -> DeadLetter | None:
        """One dead letter by coordinates, with its replay state."""
        found = self._letters.get(letter)
        if found is None:
            return None
        at = self._replayed.get(letter)
        return found if at is None else _with_replay(found, at)

    def letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first, with its replay state."""
        out = [self.get(c) for c in self._letters]
        return sorted(
            (d for d in out if d is not None), key=lambda d: (d.timestamp_ms, d.coordinates)
        )


def _with_replay(letter: DeadLetter, at_ms: int) -> DeadLetter:
    return replace(letter, replayed_at_ms=at_ms)


async def list_dead_letters(
    settings: BusSettings, bootstrap: str, province: str | None
) -> list[DeadLetter]:
    """Every dead letter of ``province``'s DLQ (of all provinces when None), oldest first,
    marked replayed where a replay marker exists."""
    names = (
        [topic(FAMILY_DLQ, province)]
        if province
        else await matching_topics(settings, bootstrap, DLQ_TOPIC_PATTERN)
    )
    book = DeadLetterBook()
    if not names:
        return []
    source = follow_records(
        settings,
        bootstrap,
        topics=names,
        since="beginning",
        until_caught_up=True,
        name="ops-dlq",
    )
    async with contextlib.aclosing(source) as records:
        async for rec in records:
            book.add(rec)
    return book.letters()


def replay_marker_headers(letter: DeadLetter, at_ms: int) -> Headers:
    """Headers of the marker saying ``letter`` was replayed at ``at_ms``."""
    info = parse_dead_letter(letter.headers)
    return replay_marker(letter.topic, letter.partition, letter.offset, info, at_ms).headers


async def replay(settings: BusSettings, bootstrap: str, letters: Iterable[DeadLetter]) -> int:
    """Re-produce each dead letter's original key, value and headers (``xs-dlq-*`` stripped,
    ``xs-message-id`` kept so idempotent receivers stay correct) to its original topic, then
    write a replay marker to its DLQ topic. Returns how many were replayed."""
    producer = Producer(settings, bootstrap, name="ops-replay")
    await producer.start()
    count = 0
    try:
        for letter in letters:
            if letter.original_topic is None or not letter.replayable:
                # No origin, or a letter that holds only a digest or coordinates (an oversized
                # or unparsable record): there is nothing to send again.
                log.warning("replay_skipped_not_a_copy", letter=letter.coordinates)
                continue
            await producer.send_and_wait(
                letter.original_topic, letter.key, letter.value, letter.original_headers()
            )
            at = now_ms()
            await producer.send_and_wait(
                letter.topic, letter.key, b"", replay_marker_headers(letter, at)
            )
            count += 1
            log.info(
                "dead_letter_replayed",
                letter=letter.coordinates,
                to=letter.original_topic,
                message_id=letter.message_id,
                key=mask_key(letter.key),
            )
    finally:
        await producer.stop()
    return count


# --- pending requests ------------------------------------------------------------------------
AWAITED: Final = "awaited"
OWED: Final = "owed"
OVERDUE: Final = "overdue"
NEAR: Final = "near"
WAITING: Final = "waiting"
_STATUS_ORDER: Final = {OVERDUE: 0, NEAR: 1, WAITING: 2}

AGE_BUCKETS: Final = ((60.0, "<1m"), (600.0, "1-10m"), (3600.0, "10m-1h"), (86400.0, "1h-1d"))
"""Upper bound in seconds and label of each age bucket (older: ``>1d``)."""


def age_bucket(age_s: float) -> str:
    """Label of the age bucket of ``age_s``."""
    for bound, label in AGE_BUCKETS:
        if age_s < bound:
            return label
    return ">1d"


@dataclass(frozen=True, slots=True)
class PendingRow:
    """A request waiting for its answer, seen by the operator."""

    message_id: str
    """``xs-message-id`` of the request."""
    message_type: str
    """Full Avro name."""
    source: str | None
    """Province that sent it (the node whose store it is in)."""
    target: str
    """Province that owes the answer."""
    key: str | None
    """Record key, masked."""
    attempt: int
    """Sends so far."""
    sent_at_ms: int
    """First send."""
    deadline_ms: int
    """Answer due."""
    age_s: float
    """Seconds since the first send."""
    remaining_s: float
    """Seconds to the deadline (negative: overdue)."""
    status: str
    """``overdue``, ``near`` (within 10 % of its window or 60 s) or ``waiting``."""
    age_bucket: str
    """Age bucket label."""
    direction: str = AWAITED
    """``awaited`` (we wait for ``target``'s answer) or ``owed`` (we, ``target``, owe
    ``source`` a deferred answer)."""
    acknowledged_at_ms: int | None = None
    """Awaited: when ``target`` acknowledged it (None: not acknowledged); owed: when we
    accepted it (and acknowledged it)."""
    expected_by_ms: int | None = None
    """When the answer is expected, as the acknowledgement said."""
    ack_state: str | None = None
    """The acknowledgement's state (``ACCEPTED_FOR_REVIEW``...)."""

    def to_json(self) -> dict[str, Any]:
        """Plain data for JSON (the key is already masked)."""
        return {
            "direction": self.direction,
            "message_id": self.message_id,
            "message_type": self.message_type,
            "source": self.source,
            "target": self.target,
            "key": self.key,
            "attempt": self.attempt,
            "sent_at_ms": self.sent_at_ms,
            "deadline_ms": self.deadline_ms,
            "age_s": round(self.age_s, 3),
            "remaining_s": round(self.remaining_s, 3),
            "status": self.status,
            "age_bucket": self.age_bucket,
            "acknowledged": self.acknowledged_at_ms is not None,
            "acknowledged_at_ms": self.acknowledged_at_ms,
            "expected_by_ms": self.expected_by_ms,
            "ack_state": self.ack_state,
        }


def _status(start_ms: int, deadline_ms: int, now_ms_: int) -> tuple[float, float, str]:
    """(age s, remaining s, status) of something due at ``deadline_ms`` since ``start_ms``."""
    window_s = max(0.0, (deadline_ms - start_ms) / 1000)
    remaining = (deadline_ms - now_ms_) / 1000
    age = max(0.0, (now_ms_ - start_ms) / 1000)
    if remaining <= 0:
        status = OVERDUE
    elif remaining <= max(NEAR_FRACTION * window_s, NEAR_MIN_S):
        status = NEAR
    else:
        status = WAITING
    return age, remaining, status


def pending_row(request: PendingRequest, now_ms_: int) -> PendingRow:
    """One pending request classified at ``now_ms_``."""
    age, remaining, status = _status(request.sent_at_ms, request.deadline_ms, now_ms_)
    source = header_dict(request.record.headers).get(H_SOURCE)
    return PendingRow(
        message_id=request.message_id,
        message_type=request.message_type,
        source=source,
        target=request.target,
        key=mask_key(request.record.key),
        attempt=request.attempt,
        sent_at_ms=request.sent_at_ms,
        deadline_ms=request.deadline_ms,
        age_s=age,
        remaining_s=remaining,
        status=status,
        age_bucket=age_bucket(age),
        acknowledged_at_ms=request.acknowledged_at_ms,
        expected_by_ms=request.expected_by_ms,
        ack_state=request.ack_state,
    )


def owed_row(obligation: Obligation, province: str, now_ms_: int) -> PendingRow:
    """One deferred answer ``province`` owes, classified at ``now_ms_``."""
    age, remaining, status = _status(obligation.accepted_at_ms, obligation.deadline_ms, now_ms_)
    return PendingRow(
        message_id=obligation.request_id,
        message_type=obligation.request_type,
        source=obligation.source,
        target=province,
        key=mask_key(obligation.key),
        attempt=1,
        sent_at_ms=obligation.accepted_at_ms,
        deadline_ms=obligation.deadline_ms,
        age_s=age,
        remaining_s=remaining,
        status=status,
        age_bucket=age_bucket(age),
        direction=OWED,
        acknowledged_at_ms=obligation.accepted_at_ms,
        expected_by_ms=obligation.expected_by_ms,
        ack_state=obligation.ack_state,
    )


def owed_report(
    store: Store, province: str, now_ms: int, *, limit: int = 10_000
) -> list[PendingRow]:
    """Deferred answers ``province`` owes, overdue first, then by deadline."""
    rows = [owed_row(o, province, now_ms) for o in store.obligations(OPEN, limit)]
    return sorted(rows, key=lambda r: (_STATUS_ORDER[r.status], r.deadline_ms, r.source or ""))


def pending_report(store: Store, now_ms: int, *, limit: int = 10_000) -> list[PendingRow]:
    """Requests waiting for an answer: overdue first (most overdue first), then those near
    their deadline, then the rest, each by deadline."""
    rows = [pending_row(r, now_ms) for r in store.pending_requests(limit)]
    return sorted(rows, key=lambda r: (_STATUS_ORDER[r.status], r.deadline_ms, r.target))


def pending_summary(rows: Iterable[PendingRow]) -> list[dict[str, Any]]:
    """Pending requests per target province: counts by status and by age bucket, the oldest
    age; targets with overdue requests first."""
    by_target: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = by_target.setdefault(
            row.target,
            {
                "target": row.target,
                "total": 0,
                OVERDUE: 0,
                NEAR: 0,
                WAITING: 0,
                "unacknowledged": 0,
                "oldest_age_s": 0.0,
                "by_age": {},
            },
        )
        entry["total"] += 1
        entry[row.status] += 1
        entry["unacknowledged"] += row.acknowledged_at_ms is None
        entry["oldest_age_s"] = max(entry["oldest_age_s"], round(row.age_s, 3))
        entry["by_age"][row.age_bucket] = entry["by_age"].get(row.age_bucket, 0) + 1
    return sorted(by_target.values(), key=lambda e: (-e[OVERDUE], -e[NEAR], e["target"]))
