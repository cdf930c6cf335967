"""The codec: Avro single-object encoding per the specification, and typed decode errors."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import re
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

import fastavro
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError, field_validator

from bus.codec import Codec, SchemaStore, canonical_form, crc64_avro, fingerprint
from bus.constants import HEADER_LEN, SINGLE_OBJECT_MARKER
from bus.envelope import Envelope, check, new_id, now_ms
from bus.errors import DecodeError
from bus.models import (
    MESSAGE_TYPES,
    MODEL_BY_NAME,
    CatalogueClass,
    ClaimPackage,
    ErrorCode,
    Message,
    Timestamp,
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


# --- Compiled decoding ---------------------------------------------------------------------------
def reference(codec: Codec, value: bytes) -> Message:
    """What ``decode`` means: fastavro's record, validated by its model."""
    name, record = codec.decode_dict(value)
    try:
        return MODEL_BY_NAME[name].model_validate(record)
    except ValidationError as exc:
        raise DecodeError("malformed", str(exc)) from exc


def outcome(read: Callable[[bytes], Message], value: bytes) -> Message | DecodeError:
    """The message ``read`` decodes ``value`` to, or its DecodeError."""
    try:
        return read(value)
    except DecodeError as exc:
        return exc


STRICTER = re.compile(r"(enum|union) index|string of length -|varint")
"""What the compiled reader refuses as malformed where fastavro reads on (a negative enum or
union index, which it counts from the end; a varint past 64 bits, which it wraps) or calls the
value truncated (an index past the symbols or branches, a negative length)."""


def assert_same(fast: BaseModel, slow: BaseModel) -> None:
    """``fast`` is indistinguishable from the validated ``slow``, nested records too."""
    assert type(fast) is type(slow)
    assert fast == slow
    assert repr(fast) == repr(slow)  # the leaves' types too: enum members, tuples, UTC
    assert fast.model_dump() == slow.model_dump()
    assert fast.model_dump_json() == slow.model_dump_json()
    assert fast.__getstate__() == slow.__getstate__()  # fields set, extra, private
    assert type(fast.model_fields_set) is set
    assert list(fast.__dict__) == list(slow.__dict__)
    try:
        expected = hash(slow)
    except TypeError:
        with pytest.raises(TypeError):
            hash(fast)
    else:
        assert hash(fast) == expected
    for name in type(slow).model_fields:
        a, b = getattr(fast, name), getattr(slow, name)
        for x, y in zip(a, b, strict=True) if isinstance(b, tuple) else ((a, b),):
            if isinstance(y, BaseModel):
                assert_same(x, y)


TIMESTAMP_MS = st.integers(-62_135_596_800_000, 253_402_300_799_999)
"""Every instant a datetime holds (years 1 to 9999), in ms since the epoch."""


def avro_values(schema: Any) -> st.SearchStrategy[Any]:
    """Any value of a (parsed) Avro schema, as fastavro's writer takes it."""
    if isinstance(schema, list):
        return st.one_of([avro_values(branch) for branch in schema])
    kind = schema if isinstance(schema, str) else schema["type"]
    logical = None if isinstance(schema, str) else schema.get("logicalType")
    if logical == "timestamp-millis":
        return TIMESTAMP_MS
    if logical == "date":
        return st.dates()
    if kind == "record":
        return st.fixed_dictionaries({f["name"]: avro_values(f["type"]) for f in schema["fields"]})
    strategies: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
        "null": st.none,
        "boolean": st.booleans,
        "string": st.text,
        "int": lambda: st.integers(-(2**31), 2**31 - 1),
        "long": lambda: st.integers(-(2**63), 2**63 - 1),
        "enum": lambda: st.sampled_from(schema["symbols"]),
        "array": lambda: st.lists(avro_values(schema["items"]), max_size=4),
        "map": lambda: st.dictionaries(st.text(), avro_values(schema["values"]), max_size=3),
    }
    return strategies[kind]()


def single_object(name: str, record: dict[str, Any]) -> bytes:
    """``record`` framed as the codec frames a message of ``name``."""
    entry = SchemaStore.default().current(name)
    body = io.BytesIO()
    fastavro.schemaless_writer(body, entry.parsed, record)
    return SINGLE_OBJECT_MARKER + entry.fingerprint + body.getvalue()


class TestCompiledDecode:
    """Decoding a current-schema record reads the Avro binary straight into the model, without
    fastavro or a second validation; the result must be what fastavro plus ``model_validate``
    give, and it must refuse what they refuse, with the same kind (save what STRICTER names)."""

    @pytest.mark.parametrize("model", MESSAGE_TYPES, ids=lambda m: m.__name__)
    def test_every_family_is_read_without_validation(
        self, model: type[Message], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """No family falls back to model_validate (its validation is all in the types)."""

        def refuse(*args: object, **kwargs: object) -> Message:
            raise AssertionError(f"{model.__name__} was validated")

        sample = next(m for m in SAMPLES if type(m) is model)
        monkeypatch.setattr(model, "model_validate", refuse)
        assert Codec().decode(Codec().encode(sample)) == sample

    @pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
    def test_samples_decode_as_validated(self, codec: Codec, message: Message) -> None:
        """Equal, same dumps, same fields set, same hash, nested records too."""
        value = codec.encode(message)
        assert_same(codec.decode(value), reference(codec, value))
        assert codec.decode(value) == message

    @pytest.mark.parametrize("model", MESSAGE_TYPES, ids=lambda m: m.__name__)
    @given(data=st.data())
    def test_any_record_decodes_as_validated(
        self, model: type[Message], data: st.DataObject
    ) -> None:
        """Random records of every family (every symbol, extreme longs and instants, any
        text, empty and longer arrays, nulls) decode as fastavro and validation decode them."""
        codec = Codec()
        record = data.draw(avro_values(codec.store.current(model.avro_name).parsed))
        value = single_object(model.avro_name, record)
        assert_same(codec.decode(value), reference(codec, value))

    @pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
    def test_every_cut_is_truncated_as_before(self, codec: Codec, message: Message) -> None:
        """A value cut anywhere in its body is truncated, as fastavro finds it."""
        value = codec.encode(message)
        for cut in range(HEADER_LEN, len(value)):
            fast = outcome(codec.decode, value[:cut])
            slow = outcome(lambda v: reference(codec, v), value[:cut])
            assert isinstance(fast, DecodeError)
            assert isinstance(slow, DecodeError)
            assert (fast.kind, slow.kind) == ("truncated", "truncated"), cut

    @pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
    @given(data=st.data())
    def test_damaged_values_decode_as_fastavro_or_are_refused(
        self, message: Message, data: st.DataObject
    ) -> None:
        """Flipped bytes decode to what fastavro and validation make of them, or both refuse
        them with the same kind; the compiled reader differs only on encodings the Avro
        specification does not allow (see STRICTER): malformed, whatever fastavro makes of
        them."""
        codec = Codec()
        value = bytearray(codec.encode(message))
        for _ in range(data.draw(st.integers(1, 3))):
            value[data.draw(st.integers(HEADER_LEN, len(value) - 1))] = data.draw(
                st.integers(0, 255)
            )
        damaged = bytes(value)
        fast = outcome(codec.decode, damaged)
        slow = outcome(lambda v: reference(codec, v), damaged)
        if isinstance(fast, DecodeError) and (
            not isinstance(slow, DecodeError) or fast.kind != slow.kind
        ):
            assert fast.kind == "malformed"
            assert STRICTER.search(fast.detail), fast.detail
        elif isinstance(fast, DecodeError) or isinstance(slow, DecodeError):
            assert isinstance(fast, DecodeError)
            assert isinstance(slow, DecodeError)
        else:
            assert_same(fast, slow)

    @pytest.mark.parametrize(
        ("body", "detail"),
        [
            (b"\x01", "enum index -1"),  # decision of a ReviewResult
            (b"\x80" * 10 + b"\x01", "longer than 10 bytes"),
            (b"\xff" * 9 + b"\x7f", "above 64 bits"),
            (b"\x03", "string of length -2"),
        ],
    )
    def test_what_the_specification_forbids_is_malformed(
        self, codec: Codec, body: bytes, detail: str
    ) -> None:
        """A ReviewResult whose claim_id (or, after a valid one, decision) is no Avro value."""
        review = next(m for m in SAMPLES if m.avro_name == "xsettle.v1.ReviewResult")
        header = codec.encode(review)[:HEADER_LEN]
        prefix = b"\x06C-1" if detail.startswith("enum") else b""
        with pytest.raises(DecodeError, match=detail) as info:
            codec.decode(header + prefix + body + b"\x00" * 40)
        assert info.value.kind == "malformed"


class Blocks(Message):
    """A test family with what the contract's writers never send but Avro allows."""

    avro_name: ClassVar[str] = "xsettle.test.Blocks"
    numbers: tuple[int, ...]
    labels: dict[str, str]
    at: Timestamp


class Checked(Message):
    """A test family whose model checks more than the Avro types."""

    avro_name: ClassVar[str] = "xsettle.test.Checked"
    count: Annotated[int, Field(ge=0)]
    code: str

    @field_validator("code")
    @classmethod
    def _upper(cls, value: str) -> str:
        if value != value.upper():
            raise ValueError("codes are upper case")
        return value


def family_store(*schemas: dict[str, Any]) -> SchemaStore:
    """A schema store of the test families."""
    store = SchemaStore()
    for schema in schemas:
        store.add(schema, current=True)
    return store


BLOCKS_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Blocks",
    "namespace": "xsettle.test",
    "fields": [
        {"name": "numbers", "type": {"type": "array", "items": "long"}},
        {"name": "labels", "type": {"type": "map", "values": "string"}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    ],
}
CHECKED_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Checked",
    "namespace": "xsettle.test",
    "fields": [{"name": "count", "type": "long"}, {"name": "code", "type": "string"}],
}


class TestOtherFamilies:
    @pytest.fixture(autouse=True)
    def families(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for model in (Blocks, Checked):
            monkeypatch.setitem(MODEL_BY_NAME, model.avro_name, model)

    def test_blocks_and_long_varints_read_as_fastavro_reads_them(self) -> None:
        """Arrays and maps in several blocks, negative counts with their byte size, and a
        varint written longer than it needs: valid Avro, read as fastavro reads them."""
        store = family_store(BLOCKS_SCHEMA)
        body = (
            b"\x03\x02\x02\x01"  # a block of -2 numbers (2 bytes): 1, -1
            + b"\x02\x8a\x80\x00"  # a block of 1 number: 5, in 3 bytes
            + b"\x00"
            + b"\x01\x04\x02k\x02v"  # a block of -1 label (4 bytes): k -> v
            + b"\x00"
            + b"\xf6\xa1\xab\xfe\xf9\x62"  # 2023-11-14T22:13:20.123Z
        )
        value = SINGLE_OBJECT_MARKER + store.current(Blocks.avro_name).fingerprint + body
        codec = Codec(store)
        decoded = codec.decode_as(value, Blocks)
        assert decoded.numbers == (1, -1, 5)
        assert decoded.labels == {"k": "v"}
        assert decoded.at == dt.datetime(2023, 11, 14, 22, 13, 20, 123_000, tzinfo=dt.UTC)
        assert_same(decoded, reference(codec, value))

    def test_a_model_that_checks_more_than_types_is_still_validated(self) -> None:
        """A constraint or a validator on a model keeps model_validate on decode."""
        store = family_store(CHECKED_SCHEMA)
        codec = Codec(store)
        header = SINGLE_OBJECT_MARKER + store.current(Checked.avro_name).fingerprint
        assert codec.decode(header + b"\x02\x04AB") == Checked(count=1, code="AB")
        for body in (b"\x01\x04AB", b"\x02\x04ab"):  # count -1; code in lower case
            with pytest.raises(DecodeError, match="fails validation") as info:
                codec.decode(header + body)
            assert info.value.kind == "malformed"


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
