"""Avro single-object encoding of the contract's messages, and the schema store.

Wire form (Avro specification, "Single object encoding"): ``C3 01``, the 8-byte little-endian
CRC-64-AVRO fingerprint of the writer schema's Parsing Canonical Form, then the Avro binary
encoding of the record. The ``.avsc`` files are the registry: a reader resolves the writer
schema by fingerprint and reads with its own (current) schema of the same name.

This is the only module that imports fastavro; its errors become :class:`DecodeError`,
:class:`EncodeError` or :class:`SchemaError` here.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fastavro
import fastavro.schema
from pydantic import ValidationError

from bus.constants import FINGERPRINT_LEN, HEADER_LEN, SINGLE_OBJECT_MARKER
from bus.errors import DecodeError, EncodeError, SchemaError
from bus.models import MODEL_BY_NAME, Message

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


# --- Codec -----------------------------------------------------------------------------------
M = TypeVar("M", bound=Message)


class Codec:
    """Encodes messages to single-object bytes and decodes them back to typed models."""

    def __init__(self, store: SchemaStore | None = None) -> None:
        self.store = store or SchemaStore.default()

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
        """Decode ``value`` to its typed model."""
        name, record = self.decode_dict(value)
        model = MODEL_BY_NAME.get(name)
        if model is None:
            raise DecodeError("unknown_fingerprint", f"{name} is not a message family")
        try:
            return model.model_validate(record)
        except ValidationError as exc:
            raise DecodeError("malformed", f"{name} fails validation: {exc}") from exc

    def decode_as(self, value: bytes, model: type[M]) -> M:
        """Decode ``value`` and check it is a ``model``."""
        message = self.decode(value)
        if not isinstance(message, model):
            raise DecodeError("wrong_type", f"expected {model.avro_name}, got {message.avro_name}")
        return message
