"""The codec: Avro single-object encoding per the specification, and typed decode errors."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from typing import Any

import fastavro
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus.codec import Codec, SchemaStore, canonical_form, crc64_avro, fingerprint
from bus.constants import SINGLE_OBJECT_MARKER
from bus.envelope import Envelope, check, new_id, now_ms
from bus.errors import DecodeError
from bus.models import (
    MESSAGE_TYPES,
    CatalogueClass,
    ClaimPackage,
    ErrorCode,
    Message,
    VisitType,
)
from bus.settings import BusSettings
from bus.transport import Admin
from schemas import SCHEMA_DIR
from simulators import samples
from tests.helpers import produce_raw, read_topic
from tests.test_schema_history import SAMPLES


class TestFingerprint:
    def test_null_schema_matches_the_avro_specification(self) -> None:
        """CRC-64-AVRO of ``"null"`` is 0x63DD24E7CC258F8A, written 8A 8F 25 CC E7 24 DD 63."""
        assert crc64_avro(b'"null"') == 0x63DD24E7CC258F8A
        assert fingerprint("null") == bytes.fromhex("8a8f25cce724dd63")

    def test_logical_type_and_doc_are_not_part_of_the_canonical_form(self) -> None:
        """A record with timestamp-millis and docs fingerprints like its bare canonical form."""
        rich = {
            "type": "record",
            "name": "T",
            "namespace": "xsettle.v1",
            "doc": "a doc",
            "fields": [
                {
                    "name": "at",
                    "doc": "x",
                    "type": {"type": "long", "logicalType": "timestamp-millis"},
                }
            ],
        }
        bare = '{"name":"xsettle.v1.T","type":"record","fields":[{"name":"at","type":"long"}]}'
        assert canonical_form(rich) == bare
        assert fingerprint(rich) == crc64_avro(bare.encode()).to_bytes(8, "little")

    def test_every_schema_file_has_a_distinct_fingerprint(self) -> None:
        """Every contract schema resolves to its own fingerprint."""
        store = SchemaStore.default()
        fps = {store.current(name).fingerprint for name in store.names()}
        assert len(fps) == len(list(store.names())) == len(MESSAGE_TYPES)


class TestRoundTrip:
    @pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
    def test_every_family_round_trips(self, codec: Codec, message: Message) -> None:
        """Encoding then decoding gives the same typed message, framed as single-object."""
        data = codec.encode(message)
        assert data[:2] == b"\xc3\x01"
        assert data[2:10] == SchemaStore.default().current(message.avro_name).fingerprint
        assert codec.decode(data) == message

    def test_reading_with_a_newer_reader_schema_resolves(self, codec: Codec) -> None:
        """A record written with today's ClaimPackage decodes under a newer reader schema."""
        current = json.loads((SCHEMA_DIR / "ClaimPackage.avsc").read_text())
        newer = dict(
            current,
            fields=[
                *current["fields"],
                {"name": "note", "type": ["null", "string"], "default": None, "doc": "added"},
            ],
        )
        reader_store = SchemaStore()
        reader_store.add(newer, current=True)
        reader_store.add(current, current=False)
        name, decoded = Codec(reader_store).decode_dict(codec.encode(samples.claim()))
        assert name == "xsettle.v1.ClaimPackage"
        assert decoded["note"] is None
        assert decoded["claim_id"] == "C-460100-1"
        assert decoded["diagnoses"] == ["K35.8"]


class TestEnumDefaults:
    """Contract v1.3: a symbol added by a later version reads as UNKNOWN, and is refused."""

    @staticmethod
    def later_claim_wire() -> tuple[bytes, dict[str, Any]]:
        """A ClaimPackage written by a later version whose VisitType appends DAY_SURGERY."""
        current = json.loads((SCHEMA_DIR / "ClaimPackage.avsc").read_text())
        later = json.loads(json.dumps(current))
        visit = next(f for f in later["fields"] if f["name"] == "visit_type")
        visit["type"]["symbols"].append("DAY_SURGERY")
        record = samples.claim().model_dump(mode="python")
        record["visit_type"] = "DAY_SURGERY"
        body = io.BytesIO()
        parsed = fastavro.parse_schema(later, _write_hint=True, named_schemas={})
        fastavro.schemaless_writer(body, parsed, record)
        return SINGLE_OBJECT_MARKER + fingerprint(later) + body.getvalue(), later

    def test_a_later_symbol_decodes_as_unknown(self) -> None:
        wire, later = self.later_claim_wire()
        store = SchemaStore()
        store.add(json.loads((SCHEMA_DIR / "ClaimPackage.avsc").read_text()), current=True)
        store.add(later, current=False)
        decoded = Codec(store).decode_as(wire, ClaimPackage)
        assert decoded.visit_type is VisitType.UNKNOWN
        assert decoded.claim_id == samples.claim().claim_id

    @staticmethod
    def claim_envelope() -> Envelope:
        return Envelope(
            message_id=new_id(),
            message_type=ClaimPackage.avro_name,
            source="460000",
            target="130000",
            sent_at_ms=now_ms(),
            reply_to="xsettle.reply.460000",
            deadline_ms=now_ms() + 60_000,
        )

    def test_a_claim_whose_enum_reads_unknown_is_refused(self) -> None:
        env = self.claim_envelope()
        check(env, samples.claim(), "xsettle.claim.130000")  # the known symbol passes
        unknown = samples.claim().model_copy(update={"visit_type": VisitType.UNKNOWN})
        with pytest.raises(DecodeError) as info:
            check(env, unknown, "xsettle.claim.130000")
        assert info.value.kind == "unknown_symbol"
        assert "visit_type" in info.value.detail

    def test_a_nested_enum_reading_unknown_is_refused(self) -> None:
        claim = samples.claim()
        item = claim.items[1].model_copy(update={"catalogue_class": CatalogueClass.UNKNOWN})
        unknown = claim.model_copy(update={"items": (claim.items[0], item)})
        with pytest.raises(DecodeError) as info:
            check(self.claim_envelope(), unknown, "xsettle.claim.130000")
        assert info.value.kind == "unknown_symbol"
        assert "items.1.catalogue_class" in info.value.detail

    def test_an_error_code_added_later_is_still_a_report(self) -> None:
        report = samples.error_report().model_copy(update={"code": ErrorCode.UNKNOWN})
        env = Envelope(
            message_id=new_id(),
            message_type=report.avro_name,
            source="460000",
            target="130000",
            sent_at_ms=now_ms(),
        )
        check(env, report, "xsettle.error.130000")


class TestDecodeErrors:
    def test_garbage_is_a_bad_marker(self, codec: Codec) -> None:
        """Bytes that do not start with C3 01 raise DecodeError kind bad_marker."""
        with pytest.raises(DecodeError) as info:
            codec.decode(b"hello, world")
        assert info.value.kind == "bad_marker"

    @pytest.mark.parametrize("cut", [1, 5, 10, 30])
    def test_truncated_record(self, codec: Codec, cut: int) -> None:
        """A value cut short raises DecodeError kind truncated."""
        data = codec.encode(samples.claim())
        with pytest.raises(DecodeError) as info:
            codec.decode(data[:cut])
        assert info.value.kind == "truncated"

    def test_unknown_fingerprint(self, codec: Codec) -> None:
        """A fingerprint no schema has raises DecodeError kind unknown_fingerprint."""
        data = codec.encode(samples.claim())
        with pytest.raises(DecodeError) as info:
            codec.decode(data[:2] + b"\x00" * 8 + data[10:])
        assert info.value.kind == "unknown_fingerprint"

    def test_trailing_bytes_are_malformed(self, codec: Codec) -> None:
        """Extra bytes after the record raise DecodeError kind malformed."""
        with pytest.raises(DecodeError) as info:
            codec.decode(codec.encode(samples.notice()) + b"\x00\x01")
        assert info.value.kind == "malformed"

    def test_wrong_type(self, codec: Codec) -> None:
        """decode_as refuses a record of another family."""
        with pytest.raises(DecodeError) as info:
            codec.decode_as(codec.encode(samples.notice()), ClaimPackage)
        assert info.value.kind == "wrong_type"

    @given(st.binary(max_size=200))
    def test_any_bytes_raise_only_decode_error(self, data: bytes) -> None:
        """Random bytes never escape as a bare fastavro exception."""
        codec = Codec()
        framed = (
            b"\xc3\x01"
            + SchemaStore.default().current("xsettle.v1.ClaimPackage").fingerprint
            + data
        )
        for value in (data, framed):
            with contextlib.suppress(DecodeError):
                codec.decode(value)


@pytest.mark.broker
async def test_every_family_round_trips_through_a_real_topic(
    broker: str, settings: BusSettings, codec: Codec, unique_topic: Callable[[str], str]
) -> None:
    """Each family written to a topic with contract headers reads back equal, headers too."""
    name = unique_topic("families")
    async with Admin(settings, broker) as admin:
        await admin.create_topics([name], partitions=1)
    sent = []
    for message in SAMPLES:
        env = Envelope(
            message_id=new_id(),
            message_type=message.avro_name,
            source="130000",
            target="460000",
            sent_at_ms=now_ms(),
        )
        sent.append((message, env))
        await produce_raw(broker, settings, name, codec.encode(message), env.to_headers())
    records = await read_topic(broker, settings, name, expect=len(sent))
    assert [codec.decode(r.value or b"") for r in records] == [m for m, _ in sent]
    assert [Envelope.from_headers(r.headers) for r in records] == [e for _, e in sent]
