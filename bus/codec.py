"""Avro single-object encoding of the contract's messages, and the schema store.

Wire form (Avro specification, "Single object encoding"): ``C3 01``, the 8-byte little-endian
CRC-64-AVRO fingerprint of the writer schema's Parsing Canonical Form, then the Avro binary
encoding of the record. The ``.avsc`` files are the registry: a reader resolves the writer
schema by fingerprint and reads with its own (current) schema of the same name.

This is the only module that imports fastavro; its errors become :class:`DecodeError`,
:class:`EncodeError` or :class:`SchemaError` here.

Decoding a record written with the current schema of its name goes through neither fastavro
nor pydantic validation: :class:`_ReaderCompiler` turns each such schema, once, into a Python
function that reads the Avro binary straight into the models (see there for what the Avro
types already guarantee, and what stays with fastavro and ``model_validate``).
"""

from __future__ import annotations

import datetime as dt
import enum
import io
import json
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fastavro
import fastavro.schema
from pydantic import BaseModel, Strict, ValidationError
from pydantic.fields import FieldInfo

from bus.constants import FINGERPRINT_LEN, HEADER_LEN, SINGLE_OBJECT_MARKER
from bus.errors import DecodeError, EncodeError, SchemaError
from bus.models import MODEL_BY_NAME, Message, Timestamp

# --- CRC-64-AVRO -------------------------------------------------------------------------------
_CRC64_EMPTY = 0xC15D213AA4D7A795
"""Avro specification: the fingerprint of the empty string, also the polynomial's seed."""


def _crc64_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return tuple(table)


_CRC64_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO of ``data`` as an unsigned 64-bit integer (Avro specification algorithm)."""
    fp = _CRC64_EMPTY
    table = _CRC64_TABLE
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def canonical_form(schema: Any) -> str:
    """Parsing Canonical Form of a schema (drops doc, default, logicalType, aliases...)."""
    try:
        return str(fastavro.schema.to_parsing_canonical_form(schema))
    except Exception as exc:
        raise SchemaError(f"cannot form the canonical form: {exc}") from exc


def fingerprint(schema: Any) -> bytes:
    """The 8 bytes written after ``C3 01``: CRC-64-AVRO of the canonical form, little-endian."""
    return crc64_avro(canonical_form(schema).encode("utf-8")).to_bytes(FINGERPRINT_LEN, "little")


# --- Schema store ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SchemaEntry:
    """One writer schema known to the store."""

    name: str
    """Full Avro name, e.g. ``xsettle.v1.ClaimPackage``."""
    fingerprint: bytes
    """8 bytes, little-endian CRC-64-AVRO of the canonical form."""
    parsed: Any
    """fastavro's parsed schema, ready for the reader and writer."""
    source: str
    """File the schema came from, for error messages."""


class SchemaStore:
    """Every known writer schema by fingerprint, and the current schema of each name."""

    def __init__(self) -> None:
        self._by_fingerprint: dict[bytes, SchemaEntry] = {}
        self._current: dict[str, SchemaEntry] = {}
        self.readers: dict[bytes, Reader] = {}
        """How :class:`Codec` reads a value, by its header (marker and fingerprint), made on
        first use and kept here so that every codec over the store shares them (a schema, once
        added, never changes)."""

    @classmethod
    def from_directories(cls, current: Path, *older: Path) -> SchemaStore:
        """Load ``current/*.avsc`` as the schemas to write and read with, and every
        ``.avsc`` under ``older`` as writer schemas that can still be read."""
        store = cls()
        for path in sorted(current.glob("*.avsc")):
            store.add(_load_json(path), source=str(path), current=True)
        for folder in older:
            if folder.is_dir():
                for path in sorted(folder.rglob("*.avsc")):
                    store.add(_load_json(path), source=str(path), current=False)
        return store

    @classmethod
    def default(cls) -> SchemaStore:
        """The store over the contract's ``schemas/`` folder (cached: schemas are immutable)."""
        global _DEFAULT_STORE
        if _DEFAULT_STORE is None:
            from schemas import HISTORY_DIR, SCHEMA_DIR

            _DEFAULT_STORE = cls.from_directories(SCHEMA_DIR, HISTORY_DIR)
        return _DEFAULT_STORE

    def add(
        self, schema: dict[str, Any], *, source: str = "<memory>", current: bool
    ) -> SchemaEntry:
        """Register one schema; ``current`` makes it the one to write and read with."""
        try:
            parsed: Any = fastavro.parse_schema(schema, _write_hint=True, named_schemas={})
        except Exception as exc:
            raise SchemaError(f"{source}: invalid Avro schema: {exc}") from exc
        name = str(parsed["name"])
        fp = fingerprint(schema)
        known = self._by_fingerprint.get(fp)
        if known is not None and known.name != name:
            raise SchemaError(f"{source}: fingerprint {fp.hex()} already names {known.name}")
        entry = SchemaEntry(name=name, fingerprint=fp, parsed=parsed, source=source)
        self._by_fingerprint.setdefault(fp, entry)
        if current:
            if name in self._current and self._current[name].fingerprint != fp:
                raise SchemaError(f"{source}: two current schemas for {name}")
            self._current[name] = entry
        return entry

    def by_fingerprint(self, fp: bytes) -> SchemaEntry | None:
        """The writer schema with this fingerprint, or None."""
        return self._by_fingerprint.get(fp)

    def current(self, name: str) -> SchemaEntry:
        """The schema written and read with for ``name``."""
        try:
            return self._current[name]
        except KeyError:
            raise SchemaError(f"no current schema for {name}") from None

    def names(self) -> Iterable[str]:
        """Full names that have a current schema."""
        return self._current.keys()


_DEFAULT_STORE: SchemaStore | None = None


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SchemaError(f"{path}: cannot read schema: {exc}") from exc
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: a message schema must be a record")
    return data


# --- Compiled readers --------------------------------------------------------------------------
Reader = Callable[[bytes], Message]
"""Decodes one whole single-object value, header included, to its model."""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
"""Origin of ``timestamp-millis``: the instant, and the ``tzinfo``, fastavro reads from."""
_DAYS_SHIFT = dt.date(1970, 1, 1).toordinal()
"""Ordinal of the origin of Avro ``date`` (days since 1970-01-01), as fastavro counts it."""
_GUARANTEED: dict[str, tuple[object, ...]] = {
    "long": (Strict(strict=True),),
    "timestamp-millis": typing.get_args(Timestamp)[1:],
}
"""Model constraints the Avro type already guarantees, by Avro type. An ``int`` or ``long``
reads as a plain int, what ``Fen``'s strict int asks. A ``timestamp-millis`` reads as an aware
UTC datetime at whole milliseconds (the wire has no finer unit), which ``Timestamp``'s
validator returns unchanged. Any other constraint keeps its model on ``model_validate``."""
_PLAIN_CONFIG = frozenset({"frozen", "extra"})
"""The only ``model_config`` keys a compiled model may set: others (``str_strip_whitespace``,
``use_enum_values``...) change what validation makes of a value, so they keep validation."""
_SLOTS = vars(BaseModel)
"""``BaseModel``'s slots, set directly (as ``model_construct`` does) on a compiled model."""
_INLINE_VARINT_BYTES = 6
"""Varint bytes the compiled readers read inline (42 bits: every amount, and instants up to the
year 2109); :func:`_varint` reads the rest, a call the common values never make."""
_SHIFTED = {
    7 * i: tuple((byte & 0x7F) << 7 * i for byte in range(256)) for i in range(_INLINE_VARINT_BYTES)
}
"""The 7 low bits of every byte, shifted to their place in a varint's ``i``-th byte (by bits
shifted): a table look-up costs less than masking and shifting, and makes no new int."""


class _Unsupported(Exception):
    """A schema or model the compiled readers do not handle: fastavro and pydantic read it."""


def _varint(data: bytes, pos: int, value: int, shift: int) -> tuple[int, int]:
    """The end of a varint whose bytes so far made ``value`` (``shift`` bits) and had the
    continuation bit: (unsigned value, position after it). Past 10 bytes or 64 bits it is no
    Avro ``long``: malformed."""
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> 64:
                raise ValueError("a varint above 64 bits")
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _unwrap(annotation: Any, metadata: tuple[object, ...]) -> tuple[Any, tuple[object, ...]]:
    """``annotation`` without ``Annotated``, and every constraint it and ``metadata`` carry."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata = (*metadata, *extra)
    flat: list[object] = []
    for item in metadata:
        flat.extend(item.metadata if isinstance(item, FieldInfo) else (item,))
    return annotation, tuple(flat)


def _plain(metadata: tuple[object, ...], guaranteed: tuple[object, ...] = ()) -> None:
    """Refuse constraints beyond what the Avro type guarantees."""
    if any(item not in guaranteed for item in metadata):
        raise _Unsupported(f"constraints {metadata} need validation")


def _check_model(model: type[BaseModel]) -> None:
    """Refuse a model whose validation does more than check types: validators, a
    ``model_post_init``, private attributes, extra fields kept, or value-changing config."""
    decorators = model.__pydantic_decorators__
    if (
        decorators.validators
        or decorators.field_validators
        or decorators.root_validators
        or decorators.model_validators
        or model.__pydantic_post_init__
        or model.__pydantic_root_model__
        or model.__private_attributes__
        or not _PLAIN_CONFIG.issuperset(model.model_config)
        or model.model_config.get("extra") == "allow"
    ):
        raise _Unsupported(f"{model.__name__} validates more than types")


class _ReaderCompiler:
    """Python source that reads one writer schema straight into its models, compiled once.

    A schema becomes one function over the whole value, every read inlined (nested records
    and arrays of them too), which is what makes it faster than fastavro (a method call per
    byte, a dispatch per value) followed by ``model_validate`` (a second walk over every value).
    It reads what fastavro reads with the same schema, value for value, and refuses as
    ``malformed`` the encodings the Avro specification does not allow where fastavro differs: an
    enum or union index out of range (fastavro counts a negative one from the end, and calls one
    past the end ``truncated``), a negative length (``truncated`` for fastavro), a varint past
    10 bytes or 64 bits (fastavro wraps it).

    The model is made the way ``model_construct`` makes it: ``__dict__`` in field order, every
    field in ``model_fields_set``. It is then equal to, dumps, hashes and copies like the
    validated one, provided validation would only have checked types the Avro schema already
    guarantees; anything more (see :func:`_check_model` and :data:`_GUARANTEED`), and any field
    whose Avro type does not match its annotation, raises :class:`_Unsupported`, and the codec
    validates that family with pydantic as before.
    """

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {
            "_varint": _varint,
            **{f"_SHIFTED{bits}": table for bits, table in _SHIFTED.items()},
            "_new": object.__new__,
            "_fields_set": _SLOTS["__pydantic_fields_set__"].__set__,
            "_extra": _SLOTS["__pydantic_extra__"].__set__,
            "_private": _SLOTS["__pydantic_private__"].__set__,
            "_EPOCH": _EPOCH,
            "_MILLISECOND": dt.timedelta(milliseconds=1),
            "_fromordinal": dt.date.fromordinal,
            "_DAYS_SHIFT": _DAYS_SHIFT,
        }
        self.count = 0

    def compile(self, entry: SchemaEntry, model: type[Message]) -> Reader:
        """The reader of values written with ``entry``, the current schema of ``model``: its
        errors are those of :meth:`Codec.decode_dict` (``truncated`` when the value ends
        early, ``malformed`` for any other fault or for bytes after the record)."""
        lines = ["def read(b):", f"    p = {HEADER_LEN}", "    n = len(b)", "    try:"]
        self.record(lines, "        ", entry.parsed, model, "m")
        lines += [
            "    except (EOFError, IndexError) as exc:",
            "        raise _DecodeError('truncated', f'{_NAME} body ends early: {exc!r}') from exc",
            "    except Exception as exc:",
            "        detail = f'{_NAME} body does not decode: {exc!r}'",
            "        raise _DecodeError('malformed', detail) from exc",
            "    if p != n:",
            "        raise _DecodeError('malformed', f'{n - p} bytes after the {_NAME} record')",
            "    return m",
        ]
        self.namespace.update(_DecodeError=DecodeError, _NAME=entry.name)
        code = compile("\n".join(lines), f"<reader of {entry.name}>", "exec")
        exec(code, self.namespace)  # noqa: S102 - source made above from the schema, not input
        read: Reader = self.namespace["read"]
        return read

    def name(self, prefix: str, value: object = None) -> str:
        """A fresh name in the generated source, bound to ``value`` when given."""
        self.count += 1
        name = f"{prefix}{self.count}"
        if value is not None:
            self.namespace[name] = value
        return name

    def record(
        self, lines: list[str], ind: str, schema: Any, model: type[BaseModel], target: str
    ) -> None:
        """Append the lines reading a ``schema`` record into a ``model`` in ``target``
        (inline, nested records too: a call per record costs more than its fields)."""
        _check_model(model)
        fields = model.model_fields
        names = [field["name"] for field in schema["fields"]]
        if not names or sorted(names) != sorted(fields):
            raise _Unsupported(f"{schema['name']} and {model.__name__} have other fields")
        values: dict[str, str] = {}
        for field in schema["fields"]:
            info = fields[field["name"]]
            if info.alias is not None or info.validation_alias is not None:
                raise _Unsupported(f"{model.__name__}.{field['name']} has an alias")
            values[field["name"]] = value = self.name("v")
            self.value(lines, ind, field["type"], info.annotation, tuple(info.metadata), value)
        members = ", ".join(f"{name!r}: {values[name]}" for name in fields)
        lines += [
            f"{ind}{target} = _new({self.name('_model', model)})",
            f"{ind}{target}.__dict__.update({{{members}}})",
            f"{ind}_fields_set({target}, {{{', '.join(map(repr, fields))}}})",
            f"{ind}_extra({target}, None)",
            f"{ind}_private({target}, None)",
        ]

    def value(
        self,
        lines: list[str],
        ind: str,
        avro: Any,
        annotation: Any,
        metadata: tuple[object, ...],
        target: str,
    ) -> None:
        """Append the lines reading an ``avro`` value into ``target``, as the model holds it."""
        annotation, metadata = _unwrap(annotation, metadata)
        if isinstance(avro, list):
            self.optional(lines, ind, avro, annotation, metadata, target)
            return
        kind, logical = (
            (avro, None) if isinstance(avro, str) else (avro["type"], avro.get("logicalType"))
        )
        if logical == "timestamp-millis" and kind == "long" and annotation is dt.datetime:
            _plain(metadata, _GUARANTEED["timestamp-millis"])
            self.long(lines, ind)
            lines.append(f"{ind}{target} = _EPOCH + _MILLISECOND * x")
        elif logical == "date" and kind == "int" and annotation is dt.date:
            _plain(metadata)
            self.long(lines, ind)
            lines.append(f"{ind}{target} = _fromordinal(x + _DAYS_SHIFT)")
        elif logical is not None:
            raise _Unsupported(f"logical type {logical} of {kind} as {annotation}")
        elif kind in ("int", "long") and annotation is int:
            _plain(metadata, _GUARANTEED["long"])
            self.long(lines, ind)
            lines.append(f"{ind}{target} = x")
        elif kind == "string" and annotation is str:
            _plain(metadata)
            self.string(lines, ind, target)
        elif kind == "boolean" and annotation is bool:
            _plain(metadata)
            lines += [f"{ind}{target} = b[p] != 0", f"{ind}p += 1"]
        elif kind == "enum" and isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            _plain(metadata)
            self.enum(lines, ind, avro["symbols"], annotation, target)
        elif kind == "array" and typing.get_origin(annotation) is tuple:
            _plain(metadata)
            item, *rest = typing.get_args(annotation)
            if rest != [Ellipsis]:
                raise _Unsupported(f"array as {annotation}")
            self.blocks(lines, ind, avro["items"], None, item, target)
        elif kind == "map" and typing.get_origin(annotation) is dict:
            _plain(metadata)
            key, item = typing.get_args(annotation)
            if key is not str:
                raise _Unsupported(f"map as {annotation}")
            self.blocks(lines, ind, avro["values"], "string", item, target)
        elif (
            kind == "record" and isinstance(annotation, type) and issubclass(annotation, BaseModel)
        ):
            _plain(metadata)
            self.record(lines, ind, avro, annotation, target)
        else:
            raise _Unsupported(f"Avro {kind} as {annotation}")

    @staticmethod
    def long(lines: list[str], ind: str, zigzag: bool = True) -> None:
        """Append the lines reading a varint into ``x``: the ``long`` it stands for, or with
        ``zigzag`` False the unsigned varint (a length is even: odd ones are negative)."""
        lines += [f"{ind}x = b[p]", f"{ind}p += 1"]
        step = ind
        for byte in range(1, _INLINE_VARINT_BYTES):
            lines += [f"{step}if x > 127:" if byte == 1 else f"{step}if y > 127:"]
            step += "    "
            lines += [f"{step}y = b[p]", f"{step}p += 1"]
            first = "x = _SHIFTED0[x] | " if byte == 1 else "x |= "
            lines += [f"{step}{first}_SHIFTED{7 * byte}[y]"]
        lines += [
            f"{step}if y > 127:",
            f"{step}    x, p = _varint(b, p, x, {7 * _INLINE_VARINT_BYTES})",
        ]
        if zigzag:
            lines.append(f"{ind}x = ~(x >> 1) if x & 1 else x >> 1")

    def string(self, lines: list[str], ind: str, target: str) -> None:
        """Append the lines reading a UTF-8 string into ``target``."""
        self.long(lines, ind, zigzag=False)
        lines += [
            f"{ind}if x & 1:",
            f"{ind}    raise ValueError(f'a string of length {{~(x >> 1)}}')",
            f"{ind}e = p + (x >> 1)",
            f"{ind}if e > n:",
            f"{ind}    raise EOFError(f'a string of {{x >> 1}} bytes, {{n - p}} left')",
            f"{ind}{target} = b[p:e].decode()",
            f"{ind}p = e",
        ]

    def enum(
        self, lines: list[str], ind: str, symbols: list[str], cls: type[enum.Enum], target: str
    ) -> None:
        """Append the lines reading an enum index into the member of ``cls`` it names. The
        first byte alone names it in the common case (an index below 64 in one byte), found in
        a table of every byte; any other byte reads the whole varint."""
        try:
            members = tuple(cls(symbol) for symbol in symbols)
        except ValueError:
            raise _Unsupported(f"{cls.__name__} lacks a symbol of {symbols}") from None
        by_byte = tuple(
            members[byte >> 1] if byte % 2 == 0 and byte >> 1 < len(members) else None
            for byte in range(256)
        )
        lines += [
            f"{ind}{target} = {self.name('_by_byte', by_byte)}[b[p]]",
            f"{ind}if {target} is None:",
        ]
        self.long(lines, ind + "    ")
        lines += [
            f"{ind}    if not 0 <= x < {len(members)}:",
            f"{ind}        raise ValueError(f'enum index {{x}} of {len(members)} symbols')",
            f"{ind}    {target} = {self.name('_symbols', members)}[x]",
            f"{ind}else:",
            f"{ind}    p += 1",
        ]

    def optional(
        self,
        lines: list[str],
        ind: str,
        branches: list[Any],
        annotation: Any,
        metadata: tuple[object, ...],
        target: str,
    ) -> None:
        """Append the lines reading a ``["null", T]`` union into ``target``: None or a T."""
        _plain(metadata)
        args = typing.get_args(annotation)
        if (
            typing.get_origin(annotation) not in (typing.Union, types.UnionType)
            or len(args) != 2
            or type(None) not in args
            or len(branches) != 2
            or "null" not in branches
        ):
            raise _Unsupported(f"union {branches} as {annotation}")
        null = branches.index("null")
        self.long(lines, ind)
        lines += [
            f"{ind}if x == {null}:",
            f"{ind}    {target} = None",
            f"{ind}elif x == {1 - null}:",
        ]
        inner = args[1] if args[0] is type(None) else args[0]
        self.value(lines, ind + "    ", branches[1 - null], inner, (), target)
        lines += [f"{ind}else:", f"{ind}    raise ValueError(f'union index {{x}} of 2')"]

    def blocks(
        self, lines: list[str], ind: str, avro: Any, key: str | None, annotation: Any, target: str
    ) -> None:
        """Append the lines reading an array (``key`` None) into a tuple, or a map (``key``
        "string") into a dict: blocks of ``count`` items, ended by an empty block; a negative
        count is followed by the block's size in bytes, which is not needed. Every item takes
        at least a byte, so a count too large for the bytes left ends at the end of the value
        (truncated), as in fastavro."""
        count, items, item = self.name("c"), self.name("a"), self.name("t")
        self.long(lines, ind)
        lines += [
            f"{ind}{count} = x",
            f"{ind}{items} = {{}}" if key else f"{ind}{items} = []",
            f"{ind}while {count}:",
            f"{ind}    if {count} < 0:",
            f"{ind}        {count} = -{count}",
        ]
        self.long(lines, ind + "        ")
        lines.append(f"{ind}    for _ in range({count}):")
        if key:
            name = self.name("k")
            self.string(lines, ind + "        ", name)
            self.value(lines, ind + "        ", avro, annotation, (), item)
            lines.append(f"{ind}        {items}[{name}] = {item}")
        else:
            self.value(lines, ind + "        ", avro, annotation, (), item)
            lines.append(f"{ind}        {items}.append({item})")
        self.long(lines, ind + "    ")
        lines += [
            f"{ind}    {count} = x",
            f"{ind}{target} = {items}" if key else f"{ind}{target} = tuple({items})",
        ]


# --- Codec -----------------------------------------------------------------------------------
M = TypeVar("M", bound=Message)


class Codec:
    """Encodes messages to single-object bytes and decodes them back to typed models."""

    def __init__(self, store: SchemaStore | None = None) -> None:
        self.store = store or SchemaStore.default()
        self._readers = self.store.readers

    def encode(self, message: Message) -> bytes:
        """Single-object encoding of ``message`` with its current schema."""
        entry = self.store.current(message.avro_name)
        buf = io.BytesIO()
        buf.write(SINGLE_OBJECT_MARKER)
        buf.write(entry.fingerprint)
        try:
            fastavro.schemaless_writer(buf, entry.parsed, message.model_dump())
        except Exception as exc:
            raise EncodeError(f"{entry.name} does not fit its schema: {exc}") from exc
        return buf.getvalue()

    def decode_dict(self, value: bytes) -> tuple[str, dict[str, Any]]:
        """Decode ``value`` to (full name, record as a dict), resolving to the current schema.

        Raises :class:`DecodeError` with ``kind`` one of ``truncated``, ``bad_marker``,
        ``unknown_fingerprint``, ``malformed``.
        """
        writer = self._writer_of(value)
        reader = self.store.current(writer.name)
        body = io.BytesIO(value)
        body.seek(HEADER_LEN)
        try:
            if reader is writer:
                record = fastavro.schemaless_reader(body, writer.parsed, None)
            else:
                record = fastavro.schemaless_reader(body, writer.parsed, reader.parsed)
        except (EOFError, StopIteration, IndexError) as exc:
            raise DecodeError("truncated", f"{writer.name} body ends early: {exc!r}") from exc
        except Exception as exc:
            raise DecodeError("malformed", f"{writer.name} body does not decode: {exc!r}") from exc
        if body.tell() != len(value):
            raise DecodeError(
                "malformed", f"{len(value) - body.tell()} bytes after the {writer.name} record"
            )
        if not isinstance(record, dict):
            raise DecodeError("malformed", f"{writer.name} did not decode to a record")
        return writer.name, record

    def decode(self, value: bytes) -> Message:
        """Decode ``value`` to its typed model.

        Raises :class:`DecodeError` with the kinds of :meth:`decode_dict`, or ``malformed``
        when the record fails its model's validation.
        """
        read = self._readers.get(value[:HEADER_LEN])
        if read is None:
            writer = self._writer_of(value)
            read = self._readers[value[:HEADER_LEN]] = self._reader(writer)
        return read(value)

    def decode_as(self, value: bytes, model: type[M]) -> M:
        """Decode ``value`` and check it is a ``model``."""
        message = self.decode(value)
        if not isinstance(message, model):
            raise DecodeError("wrong_type", f"expected {model.avro_name}, got {message.avro_name}")
        return message

    def _writer_of(self, value: bytes) -> SchemaEntry:
        """The writer schema named by ``value``'s header (kinds ``truncated``, ``bad_marker``,
        ``unknown_fingerprint``)."""
        if len(value) < len(SINGLE_OBJECT_MARKER) or value[:2] != SINGLE_OBJECT_MARKER:
            if SINGLE_OBJECT_MARKER.startswith(value):
                raise DecodeError("truncated", f"{len(value)} bytes, shorter than the marker")
            raise DecodeError("bad_marker", f"starts with {value[:2].hex()}, not c301")
        if len(value) < HEADER_LEN:
            raise DecodeError("truncated", f"{len(value)} bytes, the fingerprint is cut off")
        fp = value[2:HEADER_LEN]
        writer = self.store.by_fingerprint(fp)
        if writer is None:
            raise DecodeError("unknown_fingerprint", f"no schema has fingerprint {fp.hex()}")
        return writer

    def _reader(self, writer: SchemaEntry) -> Reader:
        """How to read values written with ``writer``: compiled when it is the current schema
        of a message family the compiler handles; otherwise fastavro, resolving an older
        writer schema to the current one, then the model's validation."""
        model = MODEL_BY_NAME.get(writer.name)
        if (
            model is not None
            and writer.name in self.store.names()
            and self.store.current(writer.name) is writer
        ):
            try:
                return _ReaderCompiler().compile(writer, model)
            except _Unsupported:
                pass
        return self._decode_validated

    def _decode_validated(self, value: bytes) -> Message:
        """Decode ``value`` with fastavro, then validate the record with its model."""
        name, record = self.decode_dict(value)
        model = MODEL_BY_NAME.get(name)
        if model is None:
            raise DecodeError("unknown_fingerprint", f"{name} is not a message family")
        try:
            return model.model_validate(record)
        except ValidationError as exc:
            raise DecodeError("malformed", f"{name} fails validation: {exc}") from exc
