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


TOPIC_RE: Final = re.compile(r"^xsettle\.(filing|claim|settlement|reply|error|dlq)\.(\d{6})$")
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

# --- Codes ------------------------------------------------------------------------------------
PROVINCE_RE: Final = re.compile(r"^\d{2}0000$")
REGION_RE: Final = re.compile(r"^\d{6}$")


def province_of(region: str) -> str:
    """The province code of a region code: its first two digits followed by ``0000``."""
    return region[:2] + "0000"


# --- Avro single-object encoding -------------------------------------------------------------
SINGLE_OBJECT_MARKER: Final = b"\xc3\x01"
"""Avro specification: the two-byte marker that starts a single-object encoded value."""
FINGERPRINT_LEN: Final = 8
"""CRC-64-AVRO fingerprints are 8 bytes, little-endian on the wire."""
HEADER_LEN: Final = len(SINGLE_OBJECT_MARKER) + FINGERPRINT_LEN

NAMESPACE: Final = "xsettle.v1"

# --- Limits -----------------------------------------------------------------------------------
DEFAULT_PARTITIONS: Final = 3
"""Partitions per topic on the embedded broker: enough to show per-key ordering under
concurrency on 2 cores; a real cluster sets its own."""

ERROR_TEXT_MAX: Final = 500
"""Diagnostic text is cut to this many characters so a header stays far below Kafka's
default 1 MiB record limit even for pathological exception text."""
