"""The schema evolution gate: every schema of ``schemas/`` against every published version of it.

Rule: FULL_TRANSITIVE. For each current schema and each version folder of
``schemas/history/`` that holds a schema of the same full name, both directions must resolve:
the current schema reads what the old version wrote (*new reads old*: records on topics, in
dead-letter queues and in signed logs) and the old version reads what the current schema
writes (*old reads new*: provinces that have not upgraded). Avro resolution itself is judged
by the Apache ``avro`` package's ``avro.compatibility.ReaderWriterCompatibilityChecker``.

What that checker does, and what this gate adds (each verified in
``tests/test_schema_check.py``):

- **Enum defaults.** The checker accepts a writer symbol the reader lacks when the reader's
  enum has a default (Avro maps it to the default). One exception this gate adds in the
  *old reads new* direction, contract v1.3: the newer schema's enum default (``UNKNOWN``) is
  reserved and never written, so an older reader that lacks it (every v1.0 and v1.2 enum but
  ``ErrorCode`` and ``AckState``) still reads everything written; the symbol is taken out of
  the writer's enum before checking, and the line says so. Any other symbol an old reader
  without a default lacks is incompatible (the checker says so). An old reader with the
  default (v1.3 on) reads a symbol appended later as ``UNKNOWN``, and refuses the record where
  the contract says so: allowed, that is what the default is for.
- **Removed or renamed symbols.** The checker accepts them when the new reader's enum has a
  default (the old symbol would read as the default). The contract refuses a record whose
  enum reads ``UNKNOWN`` (dead letter ``unknown_symbol``), so this gate rejects them: enum
  symbols are only ever appended.
- **A field added without a default** whose type is an enum with a default: the checker
  mistakes the enum's default for a field default and reports a type mismatch of the enum
  against the whole record; this gate checks missing fields itself (a field default is the
  field's ``"default"``, nothing else) and reports "no default".
- **Logical types** are ignored by the checker (``timestamp-millis`` to ``timestamp-micros``
  resolves as ``long`` to ``long``); this gate rejects any change of a field's logical type.
- **Defaults** are not validated by ``avro``; fastavro validates them but lets a union's
  default match any branch. This gate checks that each field's default fits its type, for a
  union its first branch (what the specification asks, and what Java and other readers use).
- **Names.** Named types are compared by short name by the checker; this gate compares full
  names of the top records (files are paired by full name). Each ``.avsc`` is parsed on its
  own (``avro`` refuses a name defined twice in one parse, and a file naming a type defined
  only in another file does not parse: each file is self-contained), so a named type used by
  several families (``InsuranceType``) is defined in each of them: the definitions must agree.
- **Unions with null** resolve as the specification says: ``["null", T]`` with default null
  may be added; an existing field widened from ``T`` to ``["null", T]`` is read by old
  readers only until a null is written, so it is incompatible (old reads new).

Besides the pairs: every current schema must be, identical, in the newest version folder (a
schema changed without a new version folder is an error), and no family of the history may
disappear from ``schemas/``. Transport level only: nothing here knows what a claim is.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import avro.errors
import avro.schema
from avro.compatibility import (
    ReaderWriterCompatibilityChecker,
    SchemaCompatibilityType,
    SchemaIncompatibilityType,
)

VERSION_RE = re.compile(r"^v(\d+)\.(\d+)$")
"""A version folder's name: ``vMAJOR.MINOR``."""

NEW_READS_OLD = "new reads old"
OLD_READS_NEW = "old reads new"

RULE = (
    "FULL_TRANSITIVE: each schema in {schemas} reads every version of it in {history} and is "
    "read by it (avro.compatibility); exception: an older reader may lack the newer schema's "
    "enum default (UNKNOWN, reserved, never written: contract v1.3); contract rules on top: "
    "enum symbols are never removed or renamed, logical types never change, defaults fit "
    "their types"
)
"""The rule, as the command prints it first."""

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
NAMED = frozenset({"record", "error", "enum", "fixed"})


class UsageError(Exception):
    """The gate cannot run: a folder that does not exist (exit 2, not a verdict)."""


@dataclass(frozen=True)
class SchemaFile:
    """One ``.avsc`` file, read as JSON."""

    path: Path
    data: dict[str, Any]

    @property
    def full_name(self) -> str:
        """``namespace.name`` of the file's top record."""
        return _full(str(self.data["name"]), self.data.get("namespace"))

    @property
    def short_name(self) -> str:
        """The record's name without namespace (the file's stem)."""
        return self.full_name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class PairCheck:
    """One current schema against one published version of it, both directions."""

    name: str
    version: str
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    identical: bool = False

    @property
    def ok(self) -> bool:
        """Compatible both ways under the gate's rules."""
        return not self.problems

    def line(self, width: int) -> str:
        """The output line: ``ok`` (with its notes) or what is incompatible and where."""
        short = self.name.rsplit(".", 1)[-1]
        head = f"{short:<{width}}  {self.version:<5}"
        if self.problems:
            return f"{head}  INCOMPATIBLE  {'; '.join(self.problems)}"
        extra = ["identical"] if self.identical else []
        extra += list(self.notes)
        return f"{head}  ok" + (f" ({'; '.join(extra)})" if extra else "")


@dataclass(frozen=True)
class GateReport:
    """Everything ``xsettle schemas check`` found."""

    schema_dir: Path
    history_dir: Path
    versions: tuple[str, ...]
    schemas: tuple[str, ...]
    pairs: tuple[PairCheck, ...]
    errors: tuple[str, ...] = field(default=())
    unpublished: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """Every pair compatible, every schema published, no error."""
        return not self.errors and not self.unpublished and all(p.ok for p in self.pairs)

    def pair_lines(self) -> list[str]:
        """One line per schema × version, names aligned."""
        width = max((len(p.name.rsplit(".", 1)[-1]) for p in self.pairs), default=12)
        return [p.line(width) for p in self.pairs]

    def lines(self) -> list[str]:
        """The command's output: the rule, one line per schema × version, errors, summary."""
        out = [
            "rule: " + RULE.format(schemas=_rel(self.schema_dir), history=_rel(self.history_dir)),
            f"versions: {', '.join(self.versions) or 'none'}",
        ]
        out += self.pair_lines()
        out += [f"error: {e}" for e in (*self.unpublished, *self.errors)]
        if self.versions and not self.unpublished:
            out.append(
                f"published: every schema of {_rel(self.schema_dir)} is, identical, in "
                f"{_rel(self.history_dir / self.versions[-1])}"
            )
        bad = sum(not p.ok for p in self.pairs)
        errors = len(self.errors) + len(self.unpublished)
        out.append(
            f"summary: {len(self.schemas)} schemas, {len(self.versions)} versions, "
            f"{len(self.pairs)} checks, {len(self.pairs) - bad} ok, {bad} incompatible, "
            f"{errors} errors: {'PASS' if self.ok else 'FAIL'}"
        )
        return out


def run(schema_dir: Path, history_dir: Path) -> GateReport:
    """Check every schema of ``schema_dir`` against every version folder of ``history_dir``."""
    for folder in (schema_dir, history_dir):
        if not folder.is_dir():
            raise UsageError(f"no such folder: {folder}")
    errors: list[str] = []
    current = _load_folder(schema_dir, errors)
    versions = version_folders(history_dir)
    if not versions:
        errors.append(f"{history_dir} has no version folder vMAJOR.MINOR")
    history = {name: _load_folder(path, errors) for name, path in versions}
    errors += _named_types_agree(current)
    for files in (current, *history.values()):
        for schema in files.values():
            errors += [f"{_rel(schema.path)}: {e}" for e in bad_defaults(schema.data)]
    pairs: list[PairCheck] = []
    for name in sorted(current, key=lambda n: current[n].short_name):
        for version, files in history.items():
            if name in files:
                pairs.append(check_pair(current[name], files[name], version))
    unpublished = _published(current, *versions[-1]) if versions else []
    for version, files in history.items():
        for name in sorted(set(files) - set(current)):
            errors.append(
                f"{name} of {version} is no longer in {schema_dir}: a family is never removed"
            )
    return GateReport(
        schema_dir=schema_dir,
        history_dir=history_dir,
        versions=tuple(v for v, _ in versions),
        schemas=tuple(sorted(current)),
        pairs=tuple(pairs),
        errors=tuple(errors),
        unpublished=tuple(unpublished),
    )


def version_folders(history_dir: Path) -> list[tuple[str, Path]]:
    """The ``vMAJOR.MINOR`` folders of ``history_dir``, oldest first."""
    found = []
    for path in history_dir.iterdir():
        match = VERSION_RE.match(path.name)
        if path.is_dir() and match:
            found.append(((int(match.group(1)), int(match.group(2))), path.name, path))
    return [(name, path) for _, name, path in sorted(found)]


def check_pair(new: SchemaFile, old: SchemaFile, version: str) -> PairCheck:
    """``new`` (a current schema) against ``old`` (its copy in ``version``), both ways."""
    problems: list[str] = []
    notes: list[str] = []
    if new.full_name != old.full_name:
        problems.append(f"full name {old.full_name} became {new.full_name}")
    for direction, reader, writer in (
        (NEW_READS_OLD, new.data, old.data),
        (OLD_READS_NEW, old.data, new.data),
    ):
        found, allowed = compatibility(reader, writer, writer_is_newer=direction == OLD_READS_NEW)
        problems += [f"{direction}: {p}" for p in found]
        if allowed:
            notes.append(
                f"{version} readers lack UNKNOWN, the new enum default of {', '.join(allowed)}: "
                "allowed, it is never written"
            )
    return PairCheck(
        name=new.full_name,
        version=version,
        problems=tuple(problems),
        notes=tuple(notes),
        identical=_json_key(new.data) == _json_key(old.data),
    )


def compatibility(
    reader: dict[str, Any], writer: dict[str, Any], *, writer_is_newer: bool
) -> tuple[list[str], list[str]]:
    """Whether ``reader`` reads every record ``writer`` may write: (problems, allowed), where
    ``allowed`` names the enums whose reserved default an older reader lacks (the exception).
    """
    allowed: list[str] = []
    if writer_is_newer:
        writer, allowed = _without_reserved_defaults(writer, reader)
    problems: list[str] = []
    try:
        reader_schema = _parse(reader)
        writer_schema = _parse(writer)
    except ValueError as exc:
        return [str(exc)], []
    checker = _checker()
    writer_fields = {f.name: f for f in _fields(writer_schema)}
    reader_json = {f["name"]: f for f in reader["fields"]}
    for reader_field in _fields(reader_schema):
        writer_field = writer_fields.get(reader_field.name)
        for alias in reader_json[reader_field.name].get("aliases", ()):
            writer_field = writer_field or writer_fields.get(alias)
        if writer_field is None:
            # Checked here, not by the checker: it takes an enum type's default for a field
            # default (and then reports a type mismatch against the whole record).
            if not reader_field.has_default:
                problems.append(
                    f"field {reader_field.name}: not written by the writer and has no default"
                )
            continue
        result = checker.get_compatibility(reader_field.type, writer_field.type)
        if result.compatibility is SchemaCompatibilityType.incompatible:
            problems.append(
                _explain(reader_field.name, reader_json[reader_field.name]["type"], result)
            )
    whole = _checker().get_compatibility(reader_schema, writer_schema)
    if whole.compatibility is SchemaCompatibilityType.incompatible and not problems:
        # Defensive: the field-by-field walk above must explain every verdict of the checker.
        problems.append("; ".join(sorted(whole.messages)) or "incompatible")
    if not writer_is_newer:
        # New reads old: a symbol the old version wrote must still be known. (Old reads new:
        # a symbol appended since is read as the old reader's default, UNKNOWN, by design.)
        problems += _removed_symbols(reader, writer)
    problems += _logical_type_changes(reader, writer)
    return problems, allowed


def bad_defaults(schema: dict[str, Any]) -> list[str]:
    """Fields (nested records included) whose default does not fit their type."""
    named = _named_types(schema)
    out = []
    for record_name, record in named.items():
        if record.get("type") not in ("record", "error"):
            continue
        for f in record["fields"]:
            if "default" in f and not _fits(f["default"], f["type"], named):
                out.append(
                    f"{record_name}.{f['name']}: default {json.dumps(f['default'])} does not "
                    "fit its type (a union's default fits its first branch)"
                )
    return out


# --- loading ----------------------------------------------------------------------------------
def _load_folder(folder: Path, errors: list[str]) -> dict[str, SchemaFile]:
    out: dict[str, SchemaFile] = {}
    for path in sorted(folder.glob("*.avsc")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            errors.append(f"{_rel(path)}: not readable JSON: {exc}")
            continue
        if not isinstance(data, dict) or data.get("type") != "record":
            errors.append(f"{_rel(path)}: not a record schema")
            continue
        try:
            _parse(data)
        except ValueError as exc:
            errors.append(f"{_rel(path)}: {exc}")
            continue
        schema = SchemaFile(path, data)
        if path.stem != schema.short_name:
            errors.append(
                f"{_rel(path)}: holds {schema.full_name}: a file is named after its record"
            )
        if schema.full_name in out:
            errors.append(
                f"{_rel(path)}: {schema.full_name} is also in {_rel(out[schema.full_name].path)}"
            )
            continue
        out[schema.full_name] = schema
    return out


def _parse(data: dict[str, Any]) -> avro.schema.RecordSchema:
    """Parse one file on its own; a logical type ``avro`` would ignore is an error here (some
    implementations would then read a plain number where others read a time)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parsed = avro.schema.parse(json.dumps(data))
        except (avro.errors.AvroException, TypeError, ValueError) as exc:
            raise ValueError(f"not a valid Avro schema: {exc}") from exc
    ignored = [
        str(w.message) for w in caught if issubclass(w.category, avro.errors.IgnoredLogicalType)
    ]
    if ignored:
        raise ValueError(f"logical type ignored by Avro: {'; '.join(ignored)}")
    if not isinstance(parsed, avro.schema.RecordSchema):
        raise ValueError("not a record schema")
    return parsed


def _checker() -> ReaderWriterCompatibilityChecker:
    """A fresh checker (it memoises by schema object identity: one per comparison)."""
    return ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]


def _fields(schema: avro.schema.RecordSchema) -> list[avro.schema.Field]:
    return list(schema.fields)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _json_key(data: Any) -> str:
    return json.dumps(data, sort_keys=True, ensure_ascii=False)


# --- the checks the avro checker does not make --------------------------------------------------
def _published(current: Mapping[str, SchemaFile], version: str, folder: Path) -> list[str]:
    """Every current schema is in the newest version folder, identical (docs included)."""
    newest = _load_folder(folder, [])
    out = []
    for name, schema in sorted(current.items()):
        copy_ = newest.get(name)
        if copy_ is None:
            out.append(
                f"{_rel(schema.path)} is not in the newest version {version}: a schema added "
                "without a new history folder (copy every schema into schemas/history/vX.Y/, "
                "see schemas/history/README.md)"
            )
        elif _json_key(copy_.data) != _json_key(schema.data):
            out.append(
                f"{_rel(schema.path)} differs from {_rel(copy_.path)}, the newest version: a "
                "schema changed without a new history folder (copy every schema into "
                "schemas/history/vX.Y/, see schemas/history/README.md)"
            )
    return out


def _named_types_agree(current: Mapping[str, SchemaFile]) -> list[str]:
    """A named type defined in several files is the same type in each (docs aside)."""
    seen: dict[str, tuple[str, str]] = {}
    out = []
    for schema in current.values():
        for name, definition in _named_types(schema.data).items():
            key = _json_key(_without_docs(definition))
            where = _rel(schema.path)
            if name in seen and seen[name][1] != key:
                out.append(f"{name} differs between {seen[name][0]} and {where}")
            seen.setdefault(name, (where, key))
    return out


def _removed_symbols(reader: dict[str, Any], writer: dict[str, Any]) -> list[str]:
    """Symbols of a writer enum missing from the reader's enum of the same name when the
    reader has a default (the checker accepts that: the symbol would read as the default).
    Without a default the checker itself reports them."""
    readers = _named_types(reader)
    out = []
    for name, w in _named_types(writer).items():
        r = readers.get(name)
        if w.get("type") != "enum" or r is None or r.get("type") != "enum" or "default" not in r:
            continue
        lost = [s for s in w["symbols"] if s not in r["symbols"]]
        if lost:
            out.append(
                f"enum {name.rsplit('.', 1)[-1]}: the reader lacks {', '.join(lost)} (a symbol "
                "is never removed or renamed: it would read as the default and be refused)"
            )
    return out


def _logical_type_changes(reader: dict[str, Any], writer: dict[str, Any]) -> list[str]:
    writers = _named_types(writer)
    out = []
    for name, r in _named_types(reader).items():
        w = writers.get(name)
        if r.get("type") not in ("record", "error") or w is None or "fields" not in w:
            continue
        w_fields = {f["name"]: f for f in w["fields"]}
        for f in r["fields"]:
            if f["name"] not in w_fields:
                continue
            r_logical = _logicals(f["type"])
            w_logical = _logicals(w_fields[f["name"]]["type"])
            for base in sorted(set(r_logical) & set(w_logical)):
                if r_logical[base] != w_logical[base]:
                    out.append(
                        f"field {_field_path(name, f['name'], reader)}: logical type "
                        f"{w_logical[base] or 'none'} (writer) read as "
                        f"{r_logical[base] or 'none'} (a logical type never changes)"
                    )
    return out


def _field_path(record: str, field_name: str, top: dict[str, Any]) -> str:
    top_name = _full(str(top["name"]), top.get("namespace"))
    return field_name if record == top_name else f"{record.rsplit('.', 1)[-1]}.{field_name}"


def _logicals(t: Any, prefix: str = "") -> dict[str, str | None]:
    """Base type (by position: ``[]`` items, ``{}`` values) -> its logical type."""
    if isinstance(t, str):
        return {prefix + t: None} if t in PRIMITIVES else {}
    if isinstance(t, list):
        out: dict[str, str | None] = {}
        for branch in t:
            out.update(_logicals(branch, prefix))
        return out
    kind = t.get("type")
    if kind == "array":
        return _logicals(t["items"], prefix + "[]")
    if kind == "map":
        return _logicals(t["values"], prefix + "{}")
    if kind in PRIMITIVES or kind == "fixed":
        return {prefix + str(kind): t.get("logicalType")}
    return {}


def _without_reserved_defaults(
    writer: dict[str, Any], reader: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """``writer`` with each enum's default symbol taken out (never written: contract v1.3),
    and the enums whose default the reader's enum of that name lacks (the exception used)."""
    readers = _named_types(reader)
    used: list[str] = []
    stripped = copy.deepcopy(writer)
    for name, enum in _named_types(stripped).items():
        default = enum.get("default")
        if enum.get("type") != "enum" or default is None:
            continue
        enum["symbols"] = [s for s in enum["symbols"] if s != default]
        del enum["default"]
        r = readers.get(name)
        if r is not None and r.get("type") == "enum" and default not in r["symbols"]:
            used.append(name.rsplit(".", 1)[-1])
    return stripped, sorted(used)


def _named_types(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every named type defined in ``schema`` (the top record included) by full name; the
    dicts are ``schema``'s own (not copies)."""
    out: dict[str, dict[str, Any]] = {}

    def walk(t: Any, namespace: str | None) -> None:
        if isinstance(t, list):
            for branch in t:
                walk(branch, namespace)
            return
        if not isinstance(t, dict):
            return
        kind = t.get("type")
        if kind in NAMED:
            name = _full(str(t["name"]), t.get("namespace", namespace))
            out[name] = t
            namespace = name.rpartition(".")[0] or None
            for f in t.get("fields", ()):
                walk(f["type"], namespace)
        elif kind == "array":
            walk(t["items"], namespace)
        elif kind == "map":
            walk(t["values"], namespace)
        elif isinstance(kind, dict | list):
            walk(kind, namespace)

    walk(schema, None)
    return out


def _full(name: str, namespace: str | None) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _without_docs(t: Any) -> Any:
    if isinstance(t, dict):
        return {k: _without_docs(v) for k, v in t.items() if k != "doc"}
    if isinstance(t, list):
        return [_without_docs(v) for v in t]
    return t


def _fits(value: Any, t: Any, named: Mapping[str, dict[str, Any]]) -> bool:
    """Whether ``value`` (JSON) is a valid default for type ``t`` (Avro specification)."""
    if isinstance(t, list):
        return bool(t) and _fits(value, t[0], named)
    if isinstance(t, str):
        if t in PRIMITIVES:
            return _fits_primitive(value, t)
        target = named.get(t) or next(
            (d for n, d in named.items() if n.rsplit(".", 1)[-1] == t), None
        )
        return target is not None and _fits(value, target, named)
    kind = t.get("type")
    if kind in PRIMITIVES:
        return _fits_primitive(value, str(kind))
    if kind == "enum":
        return isinstance(value, str) and value in t["symbols"]
    if kind == "fixed":
        return isinstance(value, str) and len(value) == t["size"]
    if kind == "array":
        return isinstance(value, list) and all(_fits(v, t["items"], named) for v in value)
    if kind == "map":
        return isinstance(value, dict) and all(_fits(v, t["values"], named) for v in value.values())
    if kind in ("record", "error"):
        return isinstance(value, dict) and all(
            _fits(value[f["name"]], f["type"], named) if f["name"] in value else "default" in f
            for f in t["fields"]
        )
    return isinstance(kind, dict | list) and _fits(value, kind, named)


def _fits_primitive(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind in ("int", "long"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in ("float", "double"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)  # string, bytes (a JSON string of code points 0-255)


# --- explaining the checker's verdicts --------------------------------------------------------
_KIND_TEXT = {
    SchemaIncompatibilityType.missing_enum_symbols: "the reader's enum lacks {message}",
    SchemaIncompatibilityType.reader_field_missing_default_value: (
        "field {message} is not written by the writer and has no default"
    ),
    SchemaIncompatibilityType.type_mismatch: "{message}",
    SchemaIncompatibilityType.missing_union_branch: "{message}",
    SchemaIncompatibilityType.name_mismatch: "named type name differs ({message})",
    SchemaIncompatibilityType.fixed_size_mismatch: "fixed size differs ({message})",
}


def _explain(field_name: str, reader_type: Any, result: Any) -> str:
    """One field's incompatibility, with the checker's locations turned into field paths
    (``items[].category``). The checker keeps messages and locations as two sets, so they are
    paired only when there is one of each."""
    wheres = sorted({_where(field_name, reader_type, loc) for loc in result.locations})
    kinds = list(result.incompatibilities)
    messages = sorted(str(m) for m in result.messages)
    if len(kinds) == 1 and len(messages) == 1:
        if messages[0] == "reader type: enum not compatible with writer type: record":
            # The checker's slip (module docstring): a nested field added without a default.
            return f"{wheres[0]}: not written by the writer and has no default"
        text = _KIND_TEXT.get(kinds[0], "{message}").format(message=messages[0])
        return f"{wheres[0]}: {text}"
    return f"{', '.join(wheres)}: {'; '.join(messages)}"


def _where(field_name: str, reader_type: Any, location: str) -> str:
    """``/items/fields/0/type/symbols`` under field ``items`` -> ``items[].category``."""
    path = field_name
    t: Any = reader_type
    steps = iter([part for part in location.split("/") if part])
    for step in steps:
        if step == "fields" and isinstance(t, dict):
            index = next(steps, "")
            fields = t.get("fields", [])
            if not index.isdigit() or int(index) >= len(fields):
                break
            t = fields[int(index)]
            path += f".{t['name']}"
        elif step == "type" and isinstance(t, dict):
            t = t["type"]
        elif step == "items" and isinstance(t, dict):
            t, path = t["items"], path + "[]"
        elif step == "values" and isinstance(t, dict):
            t, path = t["values"], path + "{}"
        elif step.isdigit():
            path += f" (writer union branch {step})"
            break
        else:
            break
    return path
