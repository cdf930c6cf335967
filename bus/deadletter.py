"""The dead-letter format, written and parsed in one place.

A record a province cannot read goes to its ``xsettle.dlq.<province>`` topic. The dead letter
is the original key, value and headers byte for byte plus diagnostic ``xs-dlq-*`` headers
(where it came from, why, who gave up on it, when), so that ops can read it and replay it
unchanged. Two kinds of record cannot be copied:

* a record over :data:`~bus.constants.MAX_RECORD_BYTES` (the broker may hold one, the
  producer cannot send its copy): the value is left out, its size and SHA-256 are given,
  and the original headers are kept only if they fit in the limit themselves;
* a record the Kafka client could not parse at all (``Record.poison``, a header key that is
  not UTF-8): only its coordinates and the error are known.

``xs-dlq-content`` says which of the three a dead letter is; only a copy can be replayed.
A replay marker (ops wrote that a dead letter was replayed) travels on the same topic.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from bus.constants import (
    DLQ_CONTENT_COPY,
    DLQ_CONTENT_DIGEST,
    DLQ_CONTENT_UNREADABLE,
    DLQ_HEADER_PREFIX,
    ERROR_TEXT_MAX,
    FAMILY_DLQ,
    H_DLQ_CONTENT,
    H_DLQ_DETECTED_AT,
    H_DLQ_ERROR,
    H_DLQ_ERROR_KIND,
    H_DLQ_GROUP,
    H_DLQ_OFFSET,
    H_DLQ_ORIGINAL_SHA256,
    H_DLQ_ORIGINAL_SIZE,
    H_DLQ_PARTITION,
    H_DLQ_REPLAY_OF,
    H_DLQ_REPLAYED_AT,
    H_DLQ_TIMESTAMP,
    H_DLQ_TOPIC,
    H_MESSAGE_ID,
    MAX_RECORD_BYTES,
    topic,
)
from bus.store import OutRecord
from bus.transport import Headers, Record


def headers_size(headers: Headers) -> int:
    """Bytes of header names (UTF-8) and values."""
    return sum(len(name.encode("utf-8", errors="replace")) + len(value) for name, value in headers)


def record_size(rec: Record) -> int:
    """Bytes of a record as :data:`~bus.constants.MAX_RECORD_BYTES` counts them:
    key + value + headers."""
    return len(rec.key or b"") + len(rec.value or b"") + headers_size(rec.headers)


def _text(value: str) -> bytes:
    return value.encode("utf-8", errors="replace")


def dead_letter(
    rec: Record,
    *,
    kind: str,
    error: str,
    group: str,
    province: str,
    detected_at_ms: int | None = None,
) -> OutRecord:
    """The dead letter of ``rec`` for ``xsettle.dlq.<province>``.

    ``kind`` is the error kind (a DecodeError kind, or ``undecodable_header``), ``error`` the
    diagnostic text (cut to ERROR_TEXT_MAX characters), ``group`` the consumer group that
    gave up on the record, ``detected_at_ms`` when (default: now).
    """
    at = detected_at_ms if detected_at_ms is not None else time.time_ns() // 1_000_000
    size = record_size(rec)
    key: bytes | None = rec.key
    value = b""
    kept: Headers = ()
    extra: list[tuple[str, str]] = []
    if rec.poison is not None:
        content = DLQ_CONTENT_UNREADABLE
    elif size <= MAX_RECORD_BYTES:
        content = DLQ_CONTENT_COPY
        value = rec.value or b""
        kept = rec.headers
    else:
        content = DLQ_CONTENT_DIGEST
        if len(key or b"") > MAX_RECORD_BYTES:
            key = None
        if len(key or b"") + headers_size(rec.headers) <= MAX_RECORD_BYTES:
            kept = rec.headers
        extra.append((H_DLQ_ORIGINAL_SIZE, str(size)))
        if rec.value is not None:
            extra.append((H_DLQ_ORIGINAL_SHA256, hashlib.sha256(rec.value).hexdigest()))
    diagnostic = [
        (H_DLQ_TOPIC, rec.topic),
        (H_DLQ_PARTITION, str(rec.partition)),
        (H_DLQ_OFFSET, str(rec.offset)),
        (H_DLQ_TIMESTAMP, str(rec.timestamp_ms)),
        (H_DLQ_ERROR_KIND, kind),
        (H_DLQ_ERROR, error[:ERROR_TEXT_MAX]),
        (H_DLQ_GROUP, group),
        (H_DLQ_DETECTED_AT, str(at)),
        (H_DLQ_CONTENT, content),
        *extra,
    ]
    headers = kept + tuple((name, _text(text)) for name, text in diagnostic)
    return OutRecord(topic(FAMILY_DLQ, province), key, value, headers)


def original_headers(headers: Headers) -> Headers:
    """The original record's headers: every ``xs-dlq-*`` header stripped, the rest as is."""
    return tuple((k, v) for k, v in headers if not k.startswith(DLQ_HEADER_PREFIX))


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    """The diagnostic headers of a dead letter (or of a replay marker), parsed."""

    original_topic: str | None
    """Topic the original record was read from."""
    original_partition: int | None
    """Its partition there."""
    original_offset: int | None
    """Its offset there."""
    original_timestamp_ms: int | None
    """Its timestamp there (-1 when it could not be read)."""
    error_kind: str | None
    """Why it was dead-lettered: a DecodeError kind, or ``undecodable_header``."""
    error: str | None
    """Diagnostic text."""
    consumer_group: str | None
    """Group of the consumer that gave up on it."""
    detected_at_ms: int | None
    """When it was dead-lettered."""
    content: str
    """``copy``, ``digest`` or ``unreadable`` (see :mod:`bus.constants`)."""
    original_size: int | None
    """Bytes of the original (key + value + headers) when the letter is not a copy of it."""
    original_sha256: str | None
    """Hex SHA-256 of the original value when the letter leaves the value out."""
    message_id: str | None
    """``xs-message-id`` of the original, when its headers were kept and had one."""
    replay_of: str | None = None
    """On a replay marker: ``topic:partition:offset`` of the dead letter replayed."""
    replayed_at_ms: int | None = None
    """On a replay marker: when."""

    @property
    def is_replay_marker(self) -> bool:
        """True for a record saying that a dead letter was replayed."""
        return self.replay_of is not None and self.replayed_at_ms is not None

    @property
    def replayable(self) -> bool:
        """True when the letter holds the original byte for byte and says where it came from."""
        return (
            not self.is_replay_marker
            and self.content == DLQ_CONTENT_COPY
            and self.original_topic is not None
        )


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def parse_dead_letter(headers: Headers) -> DeadLetterInfo:
    """The diagnostic fields of a DLQ record's headers; missing or malformed ones are None.

    Header values are read as UTF-8 with undecodable bytes replaced; the last of repeated
    headers wins. Letters written before ``xs-dlq-content`` existed are copies.
    """
    h = {k: v.decode("utf-8", errors="replace") for k, v in headers}
    return DeadLetterInfo(
        original_topic=h.get(H_DLQ_TOPIC) or None,
        original_partition=_int(h.get(H_DLQ_PARTITION)),
        original_offset=_int(h.get(H_DLQ_OFFSET)),
        original_timestamp_ms=_int(h.get(H_DLQ_TIMESTAMP)),
        error_kind=h.get(H_DLQ_ERROR_KIND),
        error=h.get(H_DLQ_ERROR),
        consumer_group=h.get(H_DLQ_GROUP),
        detected_at_ms=_int(h.get(H_DLQ_DETECTED_AT)),
        content=h.get(H_DLQ_CONTENT, DLQ_CONTENT_COPY),
        original_size=_int(h.get(H_DLQ_ORIGINAL_SIZE)),
        original_sha256=h.get(H_DLQ_ORIGINAL_SHA256),
        message_id=h.get(H_MESSAGE_ID),
        replay_of=h.get(H_DLQ_REPLAY_OF),
        replayed_at_ms=_int(h.get(H_DLQ_REPLAYED_AT)),
    )


def replay_marker(
    letter_topic: str, letter_partition: int, letter_offset: int, info: DeadLetterInfo, at_ms: int
) -> OutRecord:
    """The record saying that the dead letter at those coordinates was replayed at ``at_ms``
    (written to the dead letter's own topic, empty value)."""
    pairs = [
        (H_DLQ_REPLAY_OF, f"{letter_topic}:{letter_partition}:{letter_offset}"),
        (H_DLQ_REPLAYED_AT, str(at_ms)),
        (H_DLQ_TOPIC, info.original_topic or ""),
        (H_DLQ_PARTITION, str(info.original_partition)),
        (H_DLQ_OFFSET, str(info.original_offset)),
    ]
    if info.message_id is not None:
        pairs.append((H_MESSAGE_ID, info.message_id))
    return OutRecord(letter_topic, None, b"", tuple((k, _text(v)) for k, v in pairs))
