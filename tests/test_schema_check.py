"""The schema evolution gate (``xsettle schemas check``, bus.schema_check).

It accepts the repository and the v1.3 transition (enums gaining the reserved default
UNKNOWN), and rejects the three incompatible changes of issue 16 (a removed field, a field
added without a default, a renamed enum symbol) plus those the ``avro`` checker lets through
(a removed symbol behind a default, a changed logical type, a default that does not fit). The
``avro`` behaviours the gate relies on or corrects are pinned in ``TestAvroChecker``, so an
upgrade of the package that changes them is noticed.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import avro.errors
import avro.schema
import pytest
from avro.compatibility import (
    ReaderWriterCompatibilityChecker,
    SchemaCompatibilityType,
    SchemaIncompatibilityType,
)

from bus.schema_check import GateReport, UsageError, run
from schemas import HISTORY_DIR, SCHEMA_DIR
from simulators.cli import main

Schema = dict[str, Any]


def record(*fields: dict[str, Any], name: str = "Thing") -> Schema:
    return {"type": "record", "name": name, "namespace": "xsettle.v1", "fields": list(fields)}


def enum(symbols: list[str], *, default: str | None = None, name: str = "Kind") -> Schema:
    out: Schema = {"type": "enum", "name": name, "symbols": symbols}
    if default is not None:
        out["default"] = default
    return out


ID = {"name": "id", "type": "string"}
AMOUNT = {"name": "amount_fen", "type": "long"}
AT = {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}
KIND = {"name": "kind", "type": enum(["A", "B"])}
OLD = record(ID, AMOUNT, AT, KIND)
"""A v1.0-like schema: no enum default."""


def gate(tmp_path: Path, old: Schema, new: Schema, *more: Schema) -> GateReport:
    """``new`` as the current schema, ``old`` published in v1.0 and ``new`` in v1.1 (the
    newest folder holds the current schemas, so only the v1.0 pair is at stake); ``more``
    are other current schemas, published in v1.1 only."""
    current, v10, v11 = (
        tmp_path / "schemas",
        tmp_path / "history" / "v1.0",
        tmp_path / "history" / "v1.1",
    )
    for folder in (current, v10, v11):
        folder.mkdir(parents=True)
    write(v10, old)
    for schema in (new, *more):
        write(current, schema)
        write(v11, schema)
    return run(current, tmp_path / "history")


def write(folder: Path, schema: Schema) -> None:
    (folder / f"{schema['name']}.avsc").write_text(json.dumps(schema, ensure_ascii=False))


def the_pair(report: GateReport, version: str = "v1.0") -> str:
    """The output line of the v1.0 pair."""
    (line,) = [p.line(8) for p in report.pairs if p.version == version]
    return line


def with_field(schema: Schema, name: str, **changes: Any) -> Schema:
    out = copy.deepcopy(schema)
    for f in out["fields"]:
        if f["name"] == name:
            f.update(changes)
    return out


class TestRepository:
    def test_the_repository_passes(self) -> None:
        report = run(SCHEMA_DIR, HISTORY_DIR)
        assert report.ok, "\n".join(report.lines())
        assert report.versions[-1] == "v1.3"
        assert {"v1.0", "v1.2", "v1.3"} <= set(report.versions)
        names = {p.name.rsplit(".", 1)[-1] for p in report.pairs}
        assert {"ClaimPackage", "SettlementNotice", "ReversalRequest", "ReversalResult"} <= names
        # every schema against every version that has it (v1.0: 6 families, v1.2: 7, v1.3: 9+)
        expected = sum(len(list((HISTORY_DIR / v).glob("*.avsc"))) for v in report.versions)
        assert len(report.pairs) == expected >= 6 + 7 + 9

    def test_the_v13_transition_uses_the_exception_and_says_so(self) -> None:
        report = run(SCHEMA_DIR, HISTORY_DIR)
        by_key = {(p.name.rsplit(".", 1)[-1], p.version): p for p in report.pairs}
        claim = by_key["ClaimPackage", "v1.0"]
        assert claim.ok
        assert "lack UNKNOWN" in claim.line(12)
        assert "VisitType" in claim.line(12)
        assert by_key["ClaimPackage", "v1.3"].identical
        assert by_key["SettlementNotice", "v1.2"].notes == ()  # no enum there
        assert "an older reader may lack the newer schema's enum default" in report.lines()[0]

    def test_the_command_prints_one_line_per_pair_and_a_summary(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["schemas", "check"]) == 0
        lines = capsys.readouterr().out.splitlines()
        report = run(SCHEMA_DIR, HISTORY_DIR)
        pair_lines = [line for line in lines if re.match(r"^\w+ +v\d+\.\d+ +\w", line)]
        assert pair_lines == report.pair_lines()
        assert all(line.split()[2] == "ok" for line in pair_lines)
        assert lines[0].startswith("rule: FULL_TRANSITIVE")
        assert lines[-1] == (
            f"summary: {len(report.schemas)} schemas, {len(report.versions)} versions, "
            f"{len(report.pairs)} checks, "
            f"{len(report.pairs)} ok, 0 incompatible, 0 errors: PASS"
        )

    def test_a_missing_folder_is_a_usage_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        missing = tmp_path / "nope"
        assert main(["schemas", "check", "--schemas", str(missing)]) == 2
        out = capsys.readouterr()
        assert out.out == ""
        assert out.err.splitlines() == [f"xsettle schemas: no such folder: {missing}"]
        with pytest.raises(UsageError):
            run(SCHEMA_DIR, missing)


class TestRejected:
    """The three changes issue 16 names, and the ones the avro checker alone lets through."""

    def test_a_removed_field(self, tmp_path: Path) -> None:
        new = record(ID, AT, KIND)
        report = gate(tmp_path, OLD, new)
        assert not report.ok
        line = the_pair(report)
        assert "INCOMPATIBLE" in line
        assert (
            "old reads new: field amount_fen: not written by the writer and has no default" in line
        )

    def test_a_field_added_without_a_default(self, tmp_path: Path) -> None:
        new = record(ID, AMOUNT, AT, KIND, {"name": "advance_fen", "type": "long"})
        line = the_pair(gate(tmp_path, OLD, new))
        assert (
            "new reads old: field advance_fen: not written by the writer and has no default" in line
        )
        assert "old reads new" not in line  # an old reader skips the extra field

    def test_a_renamed_enum_symbol(self, tmp_path: Path) -> None:
        new = with_field(OLD, "kind", type=enum(["A", "C"]))
        line = the_pair(gate(tmp_path, OLD, new))
        assert "new reads old: kind: the reader's enum lacks {'B'}" in line
        assert "old reads new: kind: the reader's enum lacks {'C'}" in line

    def test_a_renamed_enum_symbol_behind_defaults(self, tmp_path: Path) -> None:
        """Avro reads the lost B as the default; the contract would refuse such records."""
        old = with_field(OLD, "kind", type=enum(["A", "B", "UNKNOWN"], default="UNKNOWN"))
        new = with_field(OLD, "kind", type=enum(["A", "C", "UNKNOWN"], default="UNKNOWN"))
        line = the_pair(gate(tmp_path, old, new))
        assert "INCOMPATIBLE" in line
        assert "new reads old: enum Kind: the reader lacks B" in line

    def test_a_symbol_an_old_reader_lacks_that_is_not_the_default(self, tmp_path: Path) -> None:
        """The exception covers the reserved default only: C, appended with it, is not."""
        new = with_field(OLD, "kind", type=enum(["A", "B", "C", "UNKNOWN"], default="UNKNOWN"))
        line = the_pair(gate(tmp_path, OLD, new))
        assert "old reads new: kind: the reader's enum lacks {'C'}" in line
        assert "UNKNOWN'" not in line

    def test_a_nested_enum_field_added_without_a_default(self, tmp_path: Path) -> None:
        """The checker's slip (an enum default taken for a field default) reads right."""
        item = record({"name": "code", "type": "string"}, name="Item")
        old = record(ID, {"name": "items", "type": {"type": "array", "items": item}})
        new_item = record(
            {"name": "code", "type": "string"},
            {"name": "cls", "type": enum(["X", "UNKNOWN"], default="UNKNOWN", name="Cls")},
            name="Item",
        )
        new = record(ID, {"name": "items", "type": {"type": "array", "items": new_item}})
        line = the_pair(gate(tmp_path, old, new))
        assert "new reads old: items[].cls: not written by the writer and has no default" in line

    def test_a_changed_logical_type(self, tmp_path: Path) -> None:
        new = with_field(OLD, "at", type={"type": "long", "logicalType": "timestamp-micros"})
        line = the_pair(gate(tmp_path, OLD, new))
        assert "field at: logical type timestamp-millis (writer) read as timestamp-micros" in line

    def test_a_field_made_nullable(self, tmp_path: Path) -> None:
        """An old reader of a long cannot read the null a new writer may write."""
        new = with_field(OLD, "amount_fen", type=["null", "long"], default=None)
        line = the_pair(gate(tmp_path, OLD, new))
        assert (
            "old reads new: amount_fen: reader type: long not compatible with writer type: null"
            in line
        )
        assert "new reads old" not in line

    def test_a_default_that_does_not_fit(self, tmp_path: Path) -> None:
        """Avro does not check defaults; a union's default fits its first branch."""
        new = record(
            ID, AMOUNT, AT, KIND, {"name": "note", "type": ["null", "string"], "default": ""}
        )
        report = gate(tmp_path, OLD, new)
        assert not report.ok
        assert any('xsettle.v1.Thing.note: default "" does not fit' in e for e in report.errors)

    def test_a_schema_changed_without_a_new_version_folder(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        new = record(ID, AMOUNT, AT, KIND, {"name": "note", "type": "string", "default": ""})
        gate(tmp_path, OLD, OLD)
        write(tmp_path / "schemas", new)
        args = ["schemas", "check", "--schemas", str(tmp_path / "schemas")]
        assert main([*args, "--history", str(tmp_path / "history")]) == 1
        out = capsys.readouterr().out
        assert "a schema changed without a new history folder" in out
        assert "v1.1" in out.split("schema changed")[0]
        assert out.splitlines()[-1].endswith("1 errors: FAIL")

    def test_a_family_added_without_a_new_version_folder(self, tmp_path: Path) -> None:
        gate(tmp_path, OLD, OLD)
        write(tmp_path / "schemas", record(ID, name="Other"))
        report = run(tmp_path / "schemas", tmp_path / "history")
        assert report.unpublished
        assert "a schema added without a new history folder" in report.unpublished[0]

    def test_a_removed_family(self, tmp_path: Path) -> None:
        gate(tmp_path, OLD, OLD)
        (tmp_path / "schemas" / "Thing.avsc").unlink()
        report = run(tmp_path / "schemas", tmp_path / "history")
        assert any("a family is never removed" in e for e in report.errors)

    def test_a_named_type_that_differs_between_files(self, tmp_path: Path) -> None:
        other = record(ID, {"name": "kind", "type": enum(["A", "B", "Z"])}, name="Other")
        report = gate(tmp_path, OLD, OLD, other)
        assert any("xsettle.v1.Kind differs between" in e for e in report.errors)

    def test_a_file_naming_a_type_of_another_file(self, tmp_path: Path) -> None:
        """Each file is self-contained: a reference to another file's type does not parse."""
        other = record(ID, {"name": "kind", "type": "xsettle.v1.Kind"}, name="Other")
        report = gate(tmp_path, OLD, OLD, other)
        assert any("Other.avsc: not a valid Avro schema" in e for e in report.errors)


class TestAccepted:
    def test_the_unknown_default_transition(self, tmp_path: Path) -> None:
        """v1.0 readers lack UNKNOWN, the new default: allowed, it is never written."""
        new = with_field(OLD, "kind", type=enum(["A", "B", "UNKNOWN"], default="UNKNOWN"))
        report = gate(tmp_path, OLD, new)
        assert report.ok, "\n".join(report.lines())
        assert the_pair(report).endswith(
            "ok (v1.0 readers lack UNKNOWN, the new enum default of Kind: allowed, it is never "
            "written)"
        )

    def test_an_optional_field_with_a_default(self, tmp_path: Path) -> None:
        new = record(
            ID, AMOUNT, AT, KIND, {"name": "advance_fen", "type": ["null", "long"], "default": None}
        )
        report = gate(tmp_path, OLD, new)
        assert report.ok, "\n".join(report.lines())

    def test_a_symbol_appended_to_an_enum_with_a_default(self, tmp_path: Path) -> None:
        """Old readers read it as UNKNOWN (and refuse the record: contract v1.3)."""
        old = with_field(OLD, "kind", type=enum(["A", "B", "UNKNOWN"], default="UNKNOWN"))
        new = with_field(OLD, "kind", type=enum(["A", "B", "UNKNOWN", "C"], default="UNKNOWN"))
        report = gate(tmp_path, old, new)
        assert report.ok, "\n".join(report.lines())

    def test_an_optional_enum_field_with_a_default(self, tmp_path: Path) -> None:
        """Like ClaimPackage.insurance_type: a union of null and an enum, default null."""
        insurance = enum(["EMPLOYEE", "UNKNOWN"], default="UNKNOWN", name="InsuranceType")
        new = record(
            ID,
            AMOUNT,
            AT,
            KIND,
            {"name": "insurance_type", "type": ["null", insurance], "default": None},
        )
        report = gate(tmp_path, OLD, new)
        assert report.ok, "\n".join(report.lines())


def parse(schema: Schema) -> avro.schema.Schema:
    return avro.schema.parse(json.dumps(schema))


def compatibility(reader: Schema, writer: Schema) -> Any:
    checker = ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]
    return checker.get_compatibility(parse(reader), parse(writer))


class TestAvroChecker:
    """What ``avro.compatibility`` does on its own (the gate's module docstring)."""

    def test_a_reader_default_forgives_any_missing_symbol(self) -> None:
        old = with_field(OLD, "kind", type=enum(["A", "B", "UNKNOWN"], default="UNKNOWN"))
        renamed = with_field(OLD, "kind", type=enum(["A", "C", "UNKNOWN"], default="UNKNOWN"))
        assert compatibility(renamed, old).compatibility is SchemaCompatibilityType.compatible

    def test_a_reader_without_default_misses_the_new_unknown(self) -> None:
        new = with_field(OLD, "kind", type=enum(["A", "B", "UNKNOWN"], default="UNKNOWN"))
        result = compatibility(OLD, new)
        assert result.incompatibilities == [SchemaIncompatibilityType.missing_enum_symbols]

    def test_logical_types_are_ignored(self) -> None:
        micros = with_field(OLD, "at", type={"type": "long", "logicalType": "timestamp-micros"})
        assert compatibility(micros, OLD).compatibility is SchemaCompatibilityType.compatible
        assert compatibility(OLD, micros).compatibility is SchemaCompatibilityType.compatible

    def test_defaults_are_not_checked(self) -> None:
        bad = record(ID, AMOUNT, AT, KIND, {"name": "note", "type": "long", "default": None})
        assert compatibility(bad, OLD).compatibility is SchemaCompatibilityType.compatible

    def test_an_enum_default_is_taken_for_a_field_default(self) -> None:
        new = record(
            *OLD["fields"],
            {"name": "f", "type": enum(["X", "UNKNOWN"], default="UNKNOWN", name="F")},
        )
        result = compatibility(new, OLD)
        assert result.incompatibilities == [SchemaIncompatibilityType.type_mismatch]
        assert result.messages == {"reader type: enum not compatible with writer type: record"}

    def test_named_types_compare_by_short_name(self) -> None:
        moved = dict(OLD, namespace="xsettle.v2")
        assert compatibility(moved, OLD).compatibility is SchemaCompatibilityType.compatible

    def test_a_name_defined_twice_in_one_file_does_not_parse(self) -> None:
        twice = record(KIND, {"name": "other", "type": enum(["A", "B"])})
        with pytest.raises(avro.errors.SchemaParseException):
            parse(twice)

    def test_unions_with_null(self) -> None:
        nullable = with_field(OLD, "amount_fen", type=["null", "long"], default=None)
        assert compatibility(nullable, OLD).compatibility is SchemaCompatibilityType.compatible
        result = compatibility(OLD, nullable)
        assert result.incompatibilities == [SchemaIncompatibilityType.type_mismatch]
