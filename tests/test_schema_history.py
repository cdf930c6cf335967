"""schemas/history keeps every published version of the wire, readable by today's schemas.

Checks: every current schema is, identical, in the newest version folder; every historical
schema can be read by the current schema of the same name (fastavro schema resolution, and the
codec's single-object decoding by fingerprint); schemas only ever gained fields that are
optional with defaults, and enums only appended symbols; the versions of ``schemas/history/``
(folders and ``CHANGES.md``) are the versions of the contract's Versions table; and, for the
v1.3 transition, a v1.2 reader reads v1.3 records and a v1.3 reader reads v1.2 records. (The
Avro compatibility gate itself, ``xsettle schemas check``, is tested in test_schema_check.)
"""

from __future__ import annotations

import io
import itertools
import json
import re
from pathlib import Path
from typing import Any

import fastavro
import pytest

from bus.codec import Codec, SchemaStore, fingerprint
from bus.constants import SINGLE_OBJECT_MARKER
from bus.models import (
    ClaimPackage,
    InsuranceType,
    Message,
    SettlementNotice,
)
from schemas import HISTORY_DIR, SCHEMA_DIR
from simulators import samples

DOC = Path(__file__).resolve().parents[1] / "docs" / "contract.md"
CHANGES = HISTORY_DIR / "CHANGES.md"
VERSION_RE = re.compile(r"^v(\d+)\.(\d+)$")


SAMPLES: tuple[Message, ...] = samples.ALL
"""A valid message of every family."""

SAMPLE_BY_NAME: dict[str, Message] = {m.avro_name: m for m in SAMPLES}


def version_key(name: str) -> tuple[int, int]:
    match = VERSION_RE.match(name)
    assert match is not None, f"{name} is not a version name vMAJOR.MINOR"
    return int(match.group(1)), int(match.group(2))


def version_folders() -> list[Path]:
    """The version folders of schemas/history, oldest first."""
    folders = [p for p in HISTORY_DIR.iterdir() if p.is_dir() and not p.name.startswith("_")]
    return sorted(folders, key=lambda p: version_key(p.name))


def load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def full_name(schema: dict[str, Any]) -> str:
    return f"{schema['namespace']}.{schema['name']}"


def current_schemas() -> dict[str, dict[str, Any]]:
    return {full_name(s): s for s in (load(p) for p in sorted(SCHEMA_DIR.glob("*.avsc")))}


def historical() -> list[tuple[str, Path]]:
    return [(f.name, p) for f in version_folders() for p in sorted(f.glob("*.avsc"))]


def parse(schema: dict[str, Any]) -> Any:
    return fastavro.parse_schema(schema, _write_hint=True, named_schemas={})


def changes_versions() -> dict[str, str]:
    """Version -> the heading text after it, from CHANGES.md (``## v1.1 — headers only``)."""
    found = re.findall(r"^## (v\d+\.\d+)\b(.*)$", CHANGES.read_text(encoding="utf-8"), re.M)
    return dict(found)


def doc_versions() -> list[str]:
    """The versions in the first column of the contract's Versions table."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("\n## Versions\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\|\s*(v\d+\.\d+)\s*\|", section, re.M)


def test_there_is_a_history() -> None:
    assert version_folders(), "schemas/history has no version folder"
    assert (HISTORY_DIR / "README.md").is_file()
    assert CHANGES.is_file()


def test_each_version_folder_is_complete() -> None:
    """A version folder holds every family of its version, each file under its record's
    name: families are only added, and the newest folder has every current one."""
    seen: set[str] = set()
    for folder in version_folders():
        schemas = {p.stem: load(p) for p in folder.glob("*.avsc")}
        assert all(s["name"] == stem for stem, s in schemas.items()), folder
        names = {full_name(s) for s in schemas.values()}
        assert names >= seen, f"{folder.name} drops {sorted(seen - names)}"
        seen = names
    assert seen >= set(current_schemas())


def test_every_family_has_a_sample() -> None:
    assert set(SAMPLE_BY_NAME) == set(current_schemas())


@pytest.mark.parametrize("name", sorted(current_schemas()))
def test_every_current_schema_is_in_the_newest_version(name: str) -> None:
    """Identical (docs included) to its copy in the newest version folder: a schema changed
    without a new version folder is an error (``xsettle schemas check`` says the same)."""
    current = current_schemas()[name]
    newest = version_folders()[-1]
    path = newest / f"{current['name']}.avsc"
    assert path.is_file(), f"{name} is not published in {newest.name}"
    assert load(path) == current, f"{name} changed without a new version folder"


@pytest.mark.parametrize(("version", "path"), historical(), ids=lambda x: str(x))
def test_every_historical_schema_is_read_by_the_current_one(version: str, path: Path) -> None:
    old = load(path)
    current = current_schemas().get(full_name(old))
    assert current is not None, f"{version}/{path.name}: no current schema of that name"
    _read_old_with_current(old, current)


def _read_old_with_current(old: dict[str, Any], current: dict[str, Any]) -> None:
    """Write a sample record with ``old`` and read it with ``current``, with fastavro's schema
    resolution and with the codec (single-object, resolved by the old fingerprint)."""
    name = full_name(old)
    sample = SAMPLE_BY_NAME[name]
    body = io.BytesIO()
    fastavro.schemaless_writer(body, parse(old), sample.model_dump())
    body.seek(0)
    record = fastavro.schemaless_reader(body, parse(old), parse(current))
    assert isinstance(record, dict)
    assert set(record) == {f["name"] for f in current["fields"]}
    wire = SINGLE_OBJECT_MARKER + fingerprint(old) + body.getvalue()
    assert SchemaStore.default().by_fingerprint(fingerprint(old)) is not None, (
        f"the codec does not know the fingerprint of {name} as published"
    )
    decoded = Codec().decode(wire)
    assert decoded.avro_name == name
    if fingerprint(old) == fingerprint(current):
        assert decoded == sample


def test_fields_are_only_added_as_optional_with_defaults() -> None:
    """From one version to the next (and to the current schemas), no field disappears or
    changes type (an enum may only append symbols), and every new field has a default."""
    chain: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for version, path in historical():
        old = load(path)
        chain.setdefault(full_name(old), []).append((version, old))
    for name, schema in current_schemas().items():
        chain.setdefault(name, []).append(("current", schema))
    for name, steps in chain.items():
        for (v_old, old), (v_new, new) in itertools.pairwise(steps):
            old_fields = {f["name"]: f for f in old["fields"]}
            new_fields = {f["name"]: f for f in new["fields"]}
            removed = set(old_fields) - set(new_fields)
            assert not removed, f"{name}: {v_new} removed {sorted(removed)} of {v_old}"
            for field_name, f in old_fields.items():
                new_type, old_type = new_fields[field_name]["type"], f["type"]
                for enum, (old_symbols, new_symbols) in _enum_symbols(old_type, new_type).items():
                    assert new_symbols[: len(old_symbols)] == old_symbols, (
                        f"{name}.{field_name}: {v_new} does not only append to {enum}"
                    )
                assert fingerprint(_alone(_no_symbols(new_type))) == fingerprint(
                    _alone(_no_symbols(old_type))
                ), f"{name}.{field_name} changed type from {v_old} to {v_new}"
            for field_name in set(new_fields) - set(old_fields):
                assert "default" in new_fields[field_name], (
                    f"{name}.{field_name}, added in {v_new}, has no default"
                )


def _alone(field_type: Any) -> dict[str, Any]:
    """A field's type as a one-field record, for comparing canonical forms."""
    return {"type": "record", "name": "F", "fields": [{"name": "f", "type": field_type}]}


def _enums(t: Any) -> dict[str, list[str]]:
    """Enum name -> symbols, for every enum defined in a type."""
    if isinstance(t, list):
        return {k: v for branch in t for k, v in _enums(branch).items()}
    if not isinstance(t, dict):
        return {}
    if t["type"] == "enum":
        return {t["name"]: list(t["symbols"])}
    nested = [t.get("items"), t.get("values"), *(f["type"] for f in t.get("fields", []))]
    return {k: v for n in nested if n is not None for k, v in _enums(n).items()}


def _enum_symbols(old: Any, new: Any) -> dict[str, tuple[list[str], list[str]]]:
    old_enums, new_enums = _enums(old), _enums(new)
    return {n: (old_enums[n], new_enums.get(n, [])) for n in old_enums}


def _no_symbols(t: Any) -> Any:
    """A type with its enums' symbols and defaults left out (compared separately)."""
    if isinstance(t, list):
        return [_no_symbols(x) for x in t]
    if not isinstance(t, dict):
        return t
    if t["type"] == "enum":
        return {k: v for k, v in t.items() if k not in ("symbols", "default")} | {"symbols": []}
    out = dict(t)
    for key in ("items", "values"):
        if key in out:
            out[key] = _no_symbols(out[key])
    if "fields" in out:
        out["fields"] = [dict(f, type=_no_symbols(f["type"])) for f in out["fields"]]
    return out


def test_versions_agree_between_history_changes_and_the_contract() -> None:
    changes = changes_versions()
    folders = [f.name for f in version_folders()]
    documented = doc_versions()
    assert documented, "docs/contract.md has no Versions table"
    assert sorted(documented, key=version_key) == sorted(changes, key=version_key)
    assert len(set(documented)) == len(documented)
    assert set(folders) <= set(changes), "a version folder is missing from CHANGES.md"
    for version, heading in changes.items():
        if version not in folders:
            assert "headers only" in heading, (
                f"{version} has no schema folder, so CHANGES.md must say 'headers only'"
            )
    newest_doc = max(documented, key=version_key)
    assert DOC.read_text(encoding="utf-8").startswith(f"# Wire contract {newest_doc} ")


class TestV12AndV13:
    """Contract v1.3 groundwork: v1.2 and v1.3 provinces read each other's records."""

    @staticmethod
    def schema(version: str, name: str) -> Any:
        return parse(load(HISTORY_DIR / version / f"{name}.avsc"))

    @staticmethod
    def body(message: Message) -> bytes:
        """The Avro body of a message encoded by today's codec (v1.3), framing removed."""
        wire = Codec().encode(message)
        assert wire[2:10] == fingerprint(
            load(HISTORY_DIR / "v1.3" / f"{type(message).__name__}.avsc")
        )
        return wire[10:]

    def read_with_v12(self, message: Message) -> dict[str, Any]:
        name = type(message).__name__
        record = fastavro.schemaless_reader(
            io.BytesIO(self.body(message)), self.schema("v1.3", name), self.schema("v1.2", name)
        )
        assert isinstance(record, dict)
        return record

    def written_by_v12(self, name: str, record: dict[str, Any]) -> bytes:
        """A single-object record as a v1.2 province writes it."""
        body = io.BytesIO()
        fastavro.schemaless_writer(body, self.schema("v1.2", name), record)
        return (
            SINGLE_OBJECT_MARKER
            + fingerprint(load(HISTORY_DIR / "v1.2" / f"{name}.avsc"))
            + body.getvalue()
        )

    def test_a_v12_reader_skips_the_settlement_notice_advance_and_balance(self) -> None:
        notice = samples.notice().model_copy(update={"advance_fen": 6250, "balance_fen": -50})
        record = self.read_with_v12(notice)
        assert "advance_fen" not in record
        assert "balance_fen" not in record
        assert record["personal_paid_fen"] == notice.personal_paid_fen == 6200
        assert record["fund_fen"] == 18800

    def test_a_v12_reader_skips_the_insurance_type_and_reads_every_enum(self) -> None:
        """Every enum of a v1.3 claim is one a v1.2 reader knows: UNKNOWN is never written."""
        claim = samples.claim().model_copy(update={"insurance_type": InsuranceType.RESIDENT})
        record = self.read_with_v12(claim)
        assert "insurance_type" not in record
        assert record["settlement_mode"] == "DELAYED"
        assert record["visit_type"] == "INPATIENT"
        assert [i["category"] for i in record["items"]] == ["DRUG", "FACILITY"]

    @pytest.mark.parametrize(
        "message",
        [m for m in samples.ALL if (HISTORY_DIR / "v1.2" / f"{type(m).__name__}.avsc").exists()],
        ids=lambda m: type(m).__name__,
    )
    def test_a_v12_reader_reads_every_v12_family_written_by_v13(self, message: Message) -> None:
        record = self.read_with_v12(message)
        v12_fields = {
            f["name"]
            for f in load(HISTORY_DIR / "v1.2" / f"{type(message).__name__}.avsc")["fields"]
        }
        assert set(record) == v12_fields

    def test_a_v13_reader_reads_a_v12_notice_without_advance(self) -> None:
        notice = samples.notice()
        wire = self.written_by_v12(
            "SettlementNotice", notice.model_dump(exclude={"advance_fen", "balance_fen"})
        )
        decoded = Codec().decode_as(wire, SettlementNotice)
        assert decoded.advance_fen is None
        assert decoded.balance_fen is None
        assert decoded == notice

    def test_a_v13_reader_reads_a_v12_claim_without_insurance_type(self) -> None:
        claim = samples.claim()
        wire = self.written_by_v12("ClaimPackage", claim.model_dump(exclude={"insurance_type"}))
        assert wire[2:10] != Codec().encode(claim)[2:10], "v1.2 and v1.3 must differ here"
        decoded = Codec().decode_as(wire, ClaimPackage)
        assert decoded.insurance_type is None
        assert decoded == claim
