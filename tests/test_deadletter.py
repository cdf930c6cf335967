"""The dead-letter format: what a dead letter carries, and its parser, without a broker."""

from __future__ import annotations

import hashlib
from dataclasses import replace

from bus.constants import (
    DLQ_CONTENT_COPY,
    DLQ_CONTENT_DIGEST,
    DLQ_CONTENT_UNREADABLE,
    ERROR_TEXT_MAX,
    H_DLQ_ORIGINAL_SHA256,
    H_DLQ_ORIGINAL_SIZE,
    MAX_RECORD_BYTES,
    MAX_REQUEST_BYTES,
)
from bus.deadletter import (
    dead_letter,
    headers_size,
    original_headers,
    parse_dead_letter,
    record_size,
    replay_marker,
)
from bus.store import OutRecord
from bus.transport import RawRecord, Record, decode_batches, encode_batch

HEADERS = (
    ("xs-message-id", b"m-1"),
    ("xs-source", b"\xff\xfe-not-utf-8"),
    ("xs-message-id", b"m-2"),
)
"""Original headers with a value that is not UTF-8 and a repeated name."""


ORIGINAL = Record(
    topic="xsettle.claim.460000",
    partition=2,
    offset=41,
    timestamp_ms=1_700_000_000_000,
    key=b"130102195001011234",
    value=b"\xc3\x01payload",
    headers=HEADERS,
)
"""A record read from Hainan's claim inbox."""


def record(**changes: object) -> Record:
    """:data:`ORIGINAL` with some fields changed."""
    return replace(ORIGINAL, **changes)  # type: ignore[arg-type]


def letter_of(rec: Record, error: str = "bad marker") -> tuple[Record, OutRecord]:
    """The dead letter of ``rec`` as it would be read back from the DLQ topic."""
    out = dead_letter(
        rec, kind="bad_marker", error=error, group="xsettle-460000", province="460000",
        detected_at_ms=1_700_000_000_500,
    )  # fmt: skip
    back = Record(out.topic, 0, 7, 1, out.key, out.value, out.headers)
    return back, out


class TestCopy:
    def test_round_trip(self) -> None:
        """A record within the limit is copied byte for byte and every diagnostic field
        parses back."""
        rec = record()
        back, _ = letter_of(rec)
        assert back.topic == "xsettle.dlq.460000"
        assert (back.key, back.value) == (rec.key, rec.value)
        assert original_headers(back.headers) == rec.headers
        info = parse_dead_letter(back.headers)
        assert (info.original_topic, info.original_partition, info.original_offset) == (
            "xsettle.claim.460000",
            2,
            41,
        )
        assert info.original_timestamp_ms == 1_700_000_000_000
        assert (info.error_kind, info.error) == ("bad_marker", "bad marker")
        assert (info.consumer_group, info.detected_at_ms) == ("xsettle-460000", 1_700_000_000_500)
        assert info.content == DLQ_CONTENT_COPY
        assert (info.original_size, info.original_sha256) == (None, None)
        assert info.message_id == "m-2"  # the last of repeated headers
        assert info.replayable
        assert not info.is_replay_marker

    def test_non_utf8_header_values_are_copied_unchanged(self) -> None:
        """A header value that is not UTF-8 is copied as the same bytes."""
        back, _ = letter_of(record())
        assert ("xs-source", b"\xff\xfe-not-utf-8") in back.headers

    def test_error_text_is_cut(self) -> None:
        """Diagnostic text is cut to ERROR_TEXT_MAX characters."""
        back, _ = letter_of(record(), error="错" * 2000)
        assert parse_dead_letter(back.headers).error == "错" * ERROR_TEXT_MAX

    def test_record_at_the_limit_is_a_copy_that_fits_a_request(self) -> None:
        """A record of exactly MAX_RECORD_BYTES is still copied, and its dead letter with the
        longest error text fits in MAX_REQUEST_BYTES."""
        filler = MAX_RECORD_BYTES - record_size(record(value=b""))
        rec = record(value=b"v" * filler)
        assert record_size(rec) == MAX_RECORD_BYTES
        _, out = letter_of(rec, error="错" * 2000)
        assert out.value == rec.value
        assert len(out.value) + len(out.key or b"") + headers_size(out.headers) < MAX_REQUEST_BYTES


class TestDigest:
    def test_oversized_record_gives_size_and_digest(self) -> None:
        """A record over the limit leaves its value out; size and SHA-256 are given, small
        original headers kept, and the letter is not replayable."""
        value = b"x" * (2 * MAX_RECORD_BYTES)
        rec = record(value=value)
        back, _ = letter_of(rec)
        assert back.value == b""
        assert back.key == rec.key
        assert original_headers(back.headers) == rec.headers
        info = parse_dead_letter(back.headers)
        assert info.content == DLQ_CONTENT_DIGEST
        assert info.original_size == record_size(rec)
        assert info.original_sha256 == hashlib.sha256(value).hexdigest()
        assert not info.replayable

    def test_oversized_headers_are_left_out(self) -> None:
        """When the original headers alone are over the limit they are left out too."""
        rec = record(headers=(("junk", b"h" * (MAX_RECORD_BYTES + 1)),))
        back, _ = letter_of(rec)
        assert original_headers(back.headers) == ()
        assert parse_dead_letter(back.headers).original_size == record_size(rec)

    def test_unreadable_record_keeps_only_its_coordinates(self) -> None:
        """A record the client could not parse gives an empty letter with its coordinates,
        no size and no digest."""
        rec = Record("xsettle.filing.460000", 0, 5, -1, None, None, (), poison="header key")
        back, _ = letter_of(rec, error="header key b'\\xff' is not UTF-8")
        assert (back.key, back.value) == (None, b"")
        assert original_headers(back.headers) == ()
        names = {k for k, _ in back.headers}
        assert H_DLQ_ORIGINAL_SIZE not in names
        assert H_DLQ_ORIGINAL_SHA256 not in names
        info = parse_dead_letter(back.headers)
        assert info.content == DLQ_CONTENT_UNREADABLE
        assert (info.original_offset, info.original_timestamp_ms) == (5, -1)
        assert not info.replayable


class TestParser:
    def test_old_letter_without_content_header_is_a_copy(self) -> None:
        """A letter written before ``xs-dlq-content`` existed parses as a copy."""
        headers = (
            ("xs-dlq-original-topic", b"xsettle.reply.130000"),
            ("xs-dlq-original-offset", b"not-a-number"),
        )
        info = parse_dead_letter(headers)
        assert info.content == DLQ_CONTENT_COPY
        assert info.original_offset is None
        assert info.replayable

    def test_replay_marker_round_trip(self) -> None:
        """A replay marker parses as one, naming the letter and when it was replayed."""
        back, _ = letter_of(record())
        info = parse_dead_letter(back.headers)
        marker = replay_marker("xsettle.dlq.460000", 0, 7, info, at_ms=1_700_000_009_000)
        parsed = parse_dead_letter(marker.headers)
        assert parsed.is_replay_marker
        assert parsed.replay_of == "xsettle.dlq.460000:0:7"
        assert parsed.replayed_at_ms == 1_700_000_009_000
        assert parsed.message_id == "m-2"
        assert not parsed.replayable


class TestRawBatches:
    def test_decode_reads_what_encode_wrote(self) -> None:
        """Our batch reader returns the records our batch writer wrote, a header key that is
        not UTF-8 as poison, from the offset asked for."""
        batch = encode_batch(
            [
                RawRecord(b"k", b"v0", [(b"a", b"\xff")]),
                RawRecord(None, b"v1", [(b"\xff", b"x")]),
                RawRecord(b"k", None),
            ],
            timestamp_ms=1_700_000_000_000,
        )
        records, next_offset = decode_batches(batch, "t", 0, start=1, limit=10)
        assert next_offset == 3
        assert [r.offset for r in records] == [1, 2]
        assert records[0].poison is not None
        assert "not UTF-8" in records[0].poison
        assert (records[1].key, records[1].value, records[1].headers) == (b"k", None, ())
        assert records[1].timestamp_ms == 1_700_000_000_000

    def test_truncated_batch_is_not_read(self) -> None:
        """A batch cut short (the end of a fetch) gives no records and no progress."""
        batch = encode_batch([RawRecord(b"k", b"v")], timestamp_ms=1)
        assert decode_batches(batch[:-3], "t", 0, start=0, limit=10) == ([], 0)
