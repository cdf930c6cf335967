"""Names of topics, headers and limits of wire contract v1, in one place.

No topic or header string is written anywhere else; each number says why it is that number.
"""

from __future__ import annotations

import re
from typing import Final

# --- Topics: one inbox per family per province -------------------------------------------
TOPIC_PREFIX: Final = "xsettle"
FAMILY_FILING: Final = "filing"
FAMILY_CLAIM: Final = "claim"
FAMILY_SETTLEMENT: Final = "settlement"
FAMILY_REPLY: Final = "reply"
FAMILY_ERROR: Final = "error"
FAMILY_DLQ: Final = "dlq"

TOPIC_FAMILIES: Final = (
    FAMILY_FILING,
    FAMILY_CLAIM,
    FAMILY_SETTLEMENT,
    FAMILY_REPLY,
    FAMILY_ERROR,
    FAMILY_DLQ,
)
"""Every province has one topic of each family: 6 topics per province."""

INBOX_FAMILIES: Final = (FAMILY_FILING, FAMILY_CLAIM, FAMILY_SETTLEMENT, FAMILY_REPLY, FAMILY_ERROR)
"""What a province consumes itself; its dead-letter topic is read by ops only."""


def topic(family: str, province: str) -> str:
    """The contract's topic name ``xsettle.<family>.<province>``."""
    return f"{TOPIC_PREFIX}.{family}.{province}"


def topics_for(province: str) -> list[str]:
    """All six contract topics of one province."""
    return [topic(family, province) for family in TOPIC_FAMILIES]


TOPIC_RE: Final = re.compile(r"^xsettle\.(filing|claim|settlement|reply|error|dlq)\.([0-9]{6})$")
"""Parses a contract topic into (family, province)."""

ERROR_TOPIC_PATTERN: Final = r"^xsettle\.error\.\d{6}$"
DLQ_TOPIC_PATTERN: Final = r"^xsettle\.dlq\.\d{6}$"

# --- Headers (UTF-8 strings) ----------------------------------------------------------------
H_MESSAGE_ID: Final = "xs-message-id"
H_MESSAGE_TYPE: Final = "xs-message-type"
H_SOURCE: Final = "xs-source"
H_TARGET: Final = "xs-target"
H_SENT_AT: Final = "xs-sent-at"
H_REPLY_TO: Final = "xs-reply-to"
H_DEADLINE: Final = "xs-deadline"
H_CORRELATION_ID: Final = "xs-correlation-id"
H_ATTEMPT: Final = "xs-attempt"
H_TRACEPARENT: Final = "traceparent"

# Signature headers (contract v1.1, bus/signing.py).
H_SIGNATURE_ALG: Final = "xs-signature-alg"
"""The signature algorithm: ``ed25519`` (the default; ``sm2-sm3`` can be added)."""
H_KEY_ID: Final = "xs-key-id"
"""The id of the sender's key in the directory's key list."""
H_SIGNATURE: Final = "xs-signature"
"""The signature over the record's canonical form, base64 (RFC 4648, with padding)."""

# Diagnostic headers a dead letter carries besides its original headers.
H_DLQ_TOPIC: Final = "xs-dlq-original-topic"
H_DLQ_PARTITION: Final = "xs-dlq-original-partition"
H_DLQ_OFFSET: Final = "xs-dlq-original-offset"
H_DLQ_TIMESTAMP: Final = "xs-dlq-original-timestamp"
H_DLQ_ERROR_KIND: Final = "xs-dlq-error-kind"
H_DLQ_ERROR: Final = "xs-dlq-error"
H_DLQ_GROUP: Final = "xs-dlq-consumer-group"
H_DLQ_DETECTED_AT: Final = "xs-dlq-detected-at"
H_DLQ_REPLAYED_AT: Final = "xs-dlq-replayed-at"

# Headers of a dead letter that could not keep the original byte for byte (bus/deadletter.py).
H_DLQ_CONTENT: Final = "xs-dlq-content"
"""What the dead letter carries: DLQ_CONTENT_COPY, DLQ_CONTENT_DIGEST or DLQ_CONTENT_UNREADABLE
(absent on dead letters written before the header existed: a copy)."""
H_DLQ_ORIGINAL_SIZE: Final = "xs-dlq-original-size"
"""Bytes of the original record (key + value + headers, as MAX_RECORD_BYTES counts them)."""
H_DLQ_ORIGINAL_SHA256: Final = "xs-dlq-original-sha256"
"""Hex SHA-256 of the original value when the dead letter leaves the value out."""
H_DLQ_REPLAY_OF: Final = "xs-dlq-replay-of"
"""On a replay marker: ``topic:partition:offset`` of the dead letter that was replayed."""

DLQ_HEADER_PREFIX: Final = "xs-dlq-"
"""Every diagnostic header of a dead letter starts so; stripping them gives the original's."""
DLQ_CONTENT_COPY: Final = "copy"
"""The original key, value and headers, byte for byte: it can be replayed."""
DLQ_CONTENT_DIGEST: Final = "digest"
"""The original was over MAX_RECORD_BYTES: value left out (size and SHA-256 instead), headers
kept only when they fit."""
DLQ_CONTENT_UNREADABLE: Final = "unreadable"
"""The Kafka client could not parse the original (a header key that is not UTF-8): nothing of
it is known but its coordinates."""

# --- Codes ------------------------------------------------------------------------------------
PROVINCE_RE: Final = re.compile(r"^[0-9]{2}0000$")
REGION_RE: Final = re.compile(r"^[0-9]{6}$")


def province_of(region: str) -> str:
    """The province code of a region code: its first two digits followed by ``0000``."""
    return region[:2] + "0000"


# --- Avro single-object encoding -------------------------------------------------------------
SINGLE_OBJECT_MARKER: Final = b"\xc3\x01"
"""Avro specification: the two-byte marker that starts a single-object encoded value."""
FINGERPRINT_LEN: Final = 8
"""CRC-64-AVRO fingerprints are 8 bytes, little-endian on the wire."""
HEADER_LEN: Final = len(SINGLE_OBJECT_MARKER) + FINGERPRINT_LEN

# --- Limits -----------------------------------------------------------------------------------
DEFAULT_PARTITIONS: Final = 3
"""Partitions per topic on the embedded broker: enough to show per-key ordering under
concurrency on 2 cores; a real cluster sets its own."""

ERROR_TEXT_MAX: Final = 500
"""Diagnostic text is cut to this many characters so a header stays far below Kafka's
default 1 MiB record limit even for pathological exception text."""

MAX_RECORD_BYTES: Final = 1_048_576
"""The contract's limit for one record, key + value + headers: 1 MiB, the default
``message.max.bytes`` of Apache Kafka (and ``max.request.size`` of its producers), so a record
the contract allows is accepted by any cluster left at its defaults. A claim package is a few
KiB, so even thousands of items stay far below it."""

MAX_REQUEST_BYTES: Final = MAX_RECORD_BYTES + 64 * 1024
"""The producer's ``max_request_size`` and the broker's ``message.max.bytes``
(docker-compose.yml): one record at the contract's limit plus 64 KiB for what a dead letter
adds to it (nine ``xs-dlq-*`` headers with an error text of at most ERROR_TEXT_MAX characters,
under 3 KiB) and the record batch's own overhead (61 bytes of batch header, a few per record).
So the copy of any record the contract allows can always be dead-lettered."""
