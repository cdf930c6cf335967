"""The signed message log: evidence of what a province sent and received, for disputes and
audits (the message log of X-Road's security servers).

Every record a province sends (once the broker acknowledged it, exactly as it was signed) and
every record it receives and accepts (signature verified, in the step that handles it) is
appended to one hash chain in the province's database:

    digest_i = SHA-256(canonical entry i)            (:func:`entry_digest`)
    hash_i   = SHA-256(hash_{i-1} || digest_i)       hash_0's predecessor is 32 zero bytes

Nothing is updated or deleted except by retention, which removes the oldest entries and keeps
the hash of the last one removed as the chain's *anchor*; and the subject (an index, outside
the chain) of an answer logged before the record it answers, set when that record is
logged. An export of one claim (:mod:`bus.audit_export`) carries its entries in full, the
digests of the entries in between (no content: they may be about other people), and the
chain head signed by the exporting province, so it can be checked offline with the
directory's public keys only.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from bus.db import Cursor, Database, dump_headers, load_headers
from bus.transport import Headers

SENT: Final = "sent"
RECEIVED: Final = "received"

ENTRY_TAG: Final = b"XSETTLE-AUDIT-V1\n"
"""First bytes of an entry's canonical form."""
GENESIS: Final = bytes(32)
"""The predecessor hash of the first entry ever written."""

_COUNT = struct.Struct(">I")
"""The number of headers in an entry's canonical form."""
_PRESENT = struct.Struct(">BI")
"""The first five bytes of a present field: 0x01, then its length."""
_ABSENT: Final = b"\x00"
"""An absent field."""
_TEXT_FIELDS: dict[str, bytes] = {}
"""Fields of the texts every entry repeats (header names, directions, topics), built once."""
_TEXT_FIELDS_MAX: Final = 1024
"""How many texts :data:`_TEXT_FIELDS` keeps: names come off the wire (and out of export
files), so it is bounded, in number and in length (:data:`_TEXT_FIELD_BYTES`)."""
_TEXT_FIELD_BYTES: Final = 128
"""The longest text :data:`_TEXT_FIELDS` keeps."""


def _text_field(text: str) -> bytes:
    """The field of a text (UTF-8), kept in :data:`_TEXT_FIELDS` while there is room."""
    data = text.encode()
    out = _PRESENT.pack(1, len(data)) + data
    if len(data) <= _TEXT_FIELD_BYTES and len(_TEXT_FIELDS) < _TEXT_FIELDS_MAX:
        _TEXT_FIELDS[text] = out
    return out


def _num_field(n: int | None) -> bytes:
    """The field of a number (decimal text), or :data:`_ABSENT`."""
    if n is None:
        return _ABSENT
    data = str(n).encode()
    return _PRESENT.pack(1, len(data)) + data


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One record sent or received, as it was on the wire."""

    direction: str
    """``sent`` or ``received``."""
    at_ms: int
    """When it was acknowledged by the broker (sent) or accepted (received)."""
    topic: str
    partition: int | None
    """Kafka coordinates (None for a sent record: the broker's offset is not kept)."""
    offset: int | None
    key: bytes | None
    value: bytes
    headers: Headers
    """Every header, the signature headers included."""
    message_id: str
    """``xs-message-id``."""
    correlation_id: str | None = None
    """``xs-correlation-id``."""
    subject: str | None = None
    """The claim or filing id the record is about (for exports by claim)."""
    signature: bytes | None = None
    """The record's decoded ``xs-signature`` (a replay carries the same bytes)."""
    seq: int = 0
    """Position in the chain (set when stored)."""


def entry_digest(e: AuditEntry) -> bytes:
    """SHA-256 of the entry's canonical form: :data:`ENTRY_TAG`, then the fields direction,
    at_ms, topic, partition, offset (decimal text; absent as a 0x00 byte), key, value, then
    the number of headers (4 bytes big-endian) and each header's name and value, in wire
    order. A field is 0x00 when absent, else 0x01, its length (4 bytes big-endian), its
    bytes."""
    # One join per part of the entry, no call per field: every record sent or received is
    # digested, and its header names, direction and topic are the same few texts each time.
    texts = _TEXT_FIELDS
    present = _PRESENT.pack
    key, value, at = e.key, e.value, str(e.at_ms).encode()
    digest = hashlib.sha256(
        b"".join(
            (
                ENTRY_TAG,
                texts.get(e.direction) or _text_field(e.direction),
                present(1, len(at)),
                at,
                texts.get(e.topic) or _text_field(e.topic),
                _num_field(e.partition),
                _num_field(e.offset),
                _ABSENT if key is None else present(1, len(key)),
                key or b"",
                present(1, len(value)),
                value,
                _COUNT.pack(len(e.headers)),
            )
        )
    )
    digest.update(
        b"".join(
            [
                (texts.get(name) or _text_field(name)) + present(1, len(raw)) + raw
                for name, raw in e.headers
            ]
        )
    )
    return digest.digest()


def chain(prev: bytes, digest: bytes) -> bytes:
    """The chain hash after an entry: SHA-256(prev || digest)."""
    return hashlib.sha256(prev + digest).digest()


class AuditLog(Protocol):
    """The append-only log of one province (in the store's database)."""

    def append(self, entries: Sequence[AuditEntry]) -> None:
        """Append entries (inside the running step); a ``subject`` left None is taken from
        the entry the record answers (``correlation_id``), if logged, else given when that
        entry is logged."""

    def received_at(self, signature: bytes) -> tuple[str, int | None, int | None] | None:
        """Where a received record with this signature was accepted, or None."""

    def of_subject(self, subject: str) -> list[AuditEntry]:
        """Entries about one claim or filing, in chain order."""

    def digests(self, first: int, last: int) -> list[tuple[int, bytes]]:
        """(seq, digest) of every entry from ``first`` to ``last``."""

    def hash_before(self, seq: int) -> bytes:
        """The chain hash of the entry before ``seq`` (the anchor, or genesis)."""

    def head(self) -> tuple[int, bytes]:
        """The last entry's (seq, hash); (0, genesis) for an empty log."""

    def prune(self, before_ms: int) -> int:
        """Drop entries older than ``before_ms`` from the chain's start; keep the anchor."""

    def count(self) -> int:
        """Entries in the log."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,
    direction TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER,
    "offset" INTEGER,
    key BLOB,
    value BLOB NOT NULL,
    headers BLOB NOT NULL,
    message_id TEXT NOT NULL,
    correlation_id TEXT,
    subject TEXT,
    signature BLOB,
    digest BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_subject ON audit_log (subject);
CREATE INDEX IF NOT EXISTS audit_message ON audit_log (message_id);
CREATE INDEX IF NOT EXISTS audit_signature ON audit_log (signature);
CREATE INDEX IF NOT EXISTS audit_unattached ON audit_log (correlation_id) WHERE subject IS NULL;
CREATE TABLE IF NOT EXISTS audit_anchor (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL
);
"""

_COLUMNS = (
    'seq, direction, at_ms, topic, partition, "offset", key, value, headers, message_id, '
    "correlation_id, subject, signature"
)


class SqlAuditLog:
    """The signed message log in the province's SQLite file."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("audit/1", _SCHEMA)

    def head(self) -> tuple[int, bytes]:
        rows = self.db.query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        if rows:
            return int(rows[0][0]), bytes(rows[0][1])
        anchor = self.db.query("SELECT seq, hash FROM audit_anchor")
        return (int(anchor[0][0]), bytes(anchor[0][1])) if anchor else (0, GENESIS)

    def append(self, entries: Sequence[AuditEntry]) -> None:
        if not entries:
            return
        with self.db.write() as cur:
            self.db.lock("audit-chain")  # one chain: instances sharing it append in turn
            seq, prev, unattached = self._tail(cur)
            for e in entries:
                subject = e.subject
                if subject is None and e.correlation_id is not None:
                    found = cur.execute(
                        "SELECT subject FROM audit_log WHERE message_id = ? AND subject IS NOT "
                        "NULL LIMIT 1",
                        (e.correlation_id,),
                    ).fetchone()
                    subject = found[0] if found else None
                seq += 1
                digest = entry_digest(e)
                prev = chain(prev, digest)
                cur.execute(
                    f"INSERT INTO audit_log ({_COLUMNS}, digest, hash) "  # noqa: S608
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        seq, e.direction, e.at_ms, e.topic, e.partition, e.offset, e.key,
                        e.value, dump_headers(e.headers), e.message_id, e.correlation_id,
                        subject, e.signature, digest, prev,
                    ),
                )  # fmt: skip
                if subject is None:
                    unattached = True
                elif unattached:
                    _attach(cur, subject, e.message_id)

    def _tail(self, cur: Cursor) -> tuple[int, bytes, bool]:
        """The chain head, and whether any entry waits for a subject (when none does, as is
        usual, an entry gives its subject to nobody: no statement to run). Read under the
        ``audit-chain`` lock: only :meth:`append`, holding it, writes entries without one."""
        row = cur.execute(
            "SELECT seq, hash, EXISTS (SELECT 1 FROM audit_log WHERE subject IS NULL) "
            "FROM audit_log ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is not None:
            return int(row[0]), bytes(row[1]), bool(row[2])
        seq, prev = self.head()  # an empty log: the anchor, or genesis
        return seq, prev, False

    def received_at(self, signature: bytes) -> tuple[str, int | None, int | None] | None:
        rows = self.db.query(
            'SELECT topic, partition, "offset" FROM audit_log WHERE signature = ? '
            "AND direction = ? LIMIT 1",
            (signature, RECEIVED),
        )
        if not rows:
            return None
        topic, partition, offset = rows[0]
        return str(topic), partition, offset

    def of_subject(self, subject: str) -> list[AuditEntry]:
        rows = self.db.query(
            f"SELECT {_COLUMNS} FROM audit_log WHERE subject = ? ORDER BY seq",  # noqa: S608
            (subject,),
        )
        return [_entry(r) for r in rows]

    def digests(self, first: int, last: int) -> list[tuple[int, bytes]]:
        rows = self.db.query(
            "SELECT seq, digest FROM audit_log WHERE seq BETWEEN ? AND ? ORDER BY seq",
            (first, last),
        )
        return [(int(s), bytes(d)) for s, d in rows]

    def hash_before(self, seq: int) -> bytes:
        rows = self.db.query(
            "SELECT hash FROM audit_log WHERE seq < ? ORDER BY seq DESC LIMIT 1", (seq,)
        )
        if rows:
            return bytes(rows[0][0])
        anchor = self.db.query("SELECT seq, hash FROM audit_anchor")
        return bytes(anchor[0][1]) if anchor else GENESIS

    def prune(self, before_ms: int) -> int:
        first_kept = self.db.query("SELECT MIN(seq) FROM audit_log WHERE at_ms >= ?", (before_ms,))
        if first_kept[0][0] is not None:
            last = int(first_kept[0][0]) - 1
        else:
            top = self.db.query("SELECT MAX(seq) FROM audit_log")[0][0]
            if top is None:
                return 0
            last = int(top)
        kept_hash = self.db.query("SELECT hash FROM audit_log WHERE seq = ?", (last,))
        if not kept_hash:
            return 0  # nothing older than the first entry kept
        with self.db.write() as cur:
            cur.execute(
                "INSERT INTO audit_anchor (one, seq, hash) VALUES (1, ?, ?) "
                "ON CONFLICT (one) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                (last, bytes(kept_hash[0][0])),
            )
            deleted = cur.execute("DELETE FROM audit_log WHERE seq <= ?", (last,)).rowcount
        return int(deleted)

    def count(self) -> int:
        return int(self.db.query("SELECT COUNT(*) FROM audit_log")[0][0])


def _attach(cur: Cursor, subject: str, message_id: str) -> None:
    """Give ``subject`` to the entries logged before it that answer ``message_id`` (and to
    their answers): a sent record is logged once the broker acknowledged it, so an answer to
    it (a fast ErrorReport) can be received and logged first. The subject is not part of the
    chain, so setting it later changes no digest and no hash."""
    # One statement per message: the rows it sets are the answers to follow (most records
    # have none waiting, and then the UPDATE finds nothing through the partial index).
    waiting = [message_id]
    while waiting:
        waiting = [
            str(r[0])
            for mid in waiting
            for r in cur.execute(
                "UPDATE audit_log SET subject = ? WHERE subject IS NULL AND correlation_id = ? "
                "RETURNING message_id",
                (subject, mid),
            ).fetchall()
        ]


def _entry(row: tuple[Any, ...]) -> AuditEntry:
    (seq, direction, at_ms, topic, partition, offset, key, value, headers, message_id,
     correlation_id, subject, signature) = row  # fmt: skip
    return AuditEntry(
        direction=str(direction),
        at_ms=int(at_ms),
        topic=str(topic),
        partition=partition,
        offset=offset,
        key=bytes(key) if key is not None else None,
        value=bytes(value),
        headers=load_headers(bytes(headers)),
        message_id=str(message_id),
        correlation_id=correlation_id,
        subject=subject,
        signature=bytes(signature) if signature is not None else None,
        seq=int(seq),
    )
