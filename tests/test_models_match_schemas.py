"""The pydantic models and the .avsc files describe the same records (no drift)."""

from __future__ import annotations

import json
import types
import typing
from enum import StrEnum
from typing import Any

import pytest
from pydantic import BaseModel

from bus import models
from schemas import SCHEMA_DIR

PRIMITIVE = {"string": str, "long": int, "int": int, "boolean": bool}


def _avro_kind(t: Any) -> tuple[str, Any]:
    if isinstance(t, list):
        non_null = [x for x in t if x != "null"]
        assert len(non_null) == 1
        return ("optional", _avro_kind(non_null[0]))
    if isinstance(t, str):
        return ("prim", t)
    kind = t["type"]
    if kind == "enum":
        return ("enum", tuple(t["symbols"]))
    if kind == "array":
        return ("array", _avro_kind(t["items"]))
    if kind == "map":
        return ("map", _avro_kind(t["values"]))
    if kind == "record":
        return ("record", t["name"])
    return ("prim", t.get("logicalType", kind))


def _py_kind(annotation: Any) -> tuple[str, Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _py_kind(typing.get_args(annotation)[0])
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return ("optional", _py_kind(args[0]))
    if origin is tuple:
        return ("array", _py_kind(typing.get_args(annotation)[0]))
    if origin is dict:
        return ("map", _py_kind(typing.get_args(annotation)[1]))
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        return ("enum", tuple(m.value for m in annotation))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ("record", annotation.__name__)
    names = {str: "string", int: "long", bool: "boolean"}
    import datetime as dt

    if annotation is dt.datetime:
        return ("prim", "timestamp-millis")
    if annotation is dt.date:
        return ("prim", "date")
    return ("prim", names[annotation])


def _normalise(kind: tuple[str, Any]) -> tuple[str, Any]:
    if kind == ("prim", "int"):
        return ("prim", "long")  # Python int stands for both Avro int and long
    if kind[0] in ("optional", "array", "map"):
        return (kind[0], _normalise(kind[1]))
    return kind


def _records(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {schema["name"]: schema}
    for field in schema["fields"]:
        t = field["type"]
        items = t.get("items") if isinstance(t, dict) else None
        if isinstance(items, dict) and items.get("type") == "record":
            out.update(_records(items))
    return out


SCHEMAS = {p.stem: json.loads(p.read_text()) for p in sorted(SCHEMA_DIR.glob("*.avsc"))}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_model_fields_match_schema(name: str) -> None:
    """Every record in the .avsc has a model with the same fields, order and types."""
    for record_name, record in _records(SCHEMAS[name]).items():
        model: type[BaseModel] = getattr(models, record_name)
        avro_fields = [(f["name"], _normalise(_avro_kind(f["type"]))) for f in record["fields"]]
        hints = typing.get_type_hints(model, include_extras=True)
        py_fields = [(n, _normalise(_py_kind(hints[n]))) for n in model.model_fields]
        assert py_fields == avro_fields, record_name


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_field_is_documented(name: str) -> None:
    """Every field of every record carries a doc, namespace is xsettle.v1."""
    assert SCHEMAS[name]["namespace"] == "xsettle.v1"
    for record in _records(SCHEMAS[name]).values():
        for field in record["fields"]:
            assert field.get("doc"), f"{record['name']}.{field['name']}"


def test_error_code_has_the_contract_default() -> None:
    """ErrorCode's enum default is UNKNOWN, so codes added later still decode."""
    field = next(f for f in SCHEMAS["ErrorReport"]["fields"] if f["name"] == "code")
    assert field["type"]["default"] == "UNKNOWN"


def _enums(t: Any) -> list[dict[str, Any]]:
    if isinstance(t, list):
        return [e for branch in t for e in _enums(branch)]
    if not isinstance(t, dict):
        return []
    if t["type"] == "enum":
        return [t]
    return _enums(t.get("items")) + [e for f in t.get("fields", []) for e in _enums(f["type"])]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_enum_has_the_default_unknown(name: str) -> None:
    """Contract v1.3: every enum has the symbol UNKNOWN as its default (symbols appended later
    come after it), and its model has the member UNKNOWN."""
    enums = [e for f in SCHEMAS[name]["fields"] for e in _enums(f["type"])]
    for enum in enums:
        assert "UNKNOWN" in enum["symbols"], enum["name"]
        assert enum.get("default") == "UNKNOWN", enum["name"]
        assert getattr(models, enum["name"]).UNKNOWN.value == "UNKNOWN", enum["name"]


def test_money_fields_are_long_fen() -> None:
    """Every *_fen field is an Avro long, or an optional long (null: not given by an older
    writer) with default null."""
    for schema in SCHEMAS.values():
        for record in _records(schema).values():
            for field in record["fields"]:
                if field["name"].endswith("_fen"):
                    if isinstance(field["type"], list):
                        assert field["type"] == ["null", "long"], field["name"]
                        assert field["default"] is None, field["name"]
                    else:
                        assert field["type"] == "long", field["name"]
