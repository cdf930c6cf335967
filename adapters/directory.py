"""The directory: regions, designated hospitals, agreements, home policies, host catalogues,
and the agencies (经办机构) the public may contact.

Loaded from a human-editable TOML file (``default_directory.toml`` beside this module is the
network of seed 003: Hainan and its partners), validated by pydantic and cross-checked. A bad
file raises :class:`DirectoryError` naming the file, the line and the field path of every
problem. Queries are pure lookups; nothing here does I/O after loading.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adapters.rules import MAX_ADVANCE_PERMILLE, HospitalLevel, Money, Policy
from bus.models import CatalogueClass, ItemCategory, SettlementMode
from bus.signing import (
    ED25519,
    KeyRing,
    PublicKey,
    demo_key_id,
    demo_private_key,
    public_bytes,
)


def demo_public_key(key_id: str) -> str:
    """The base64 public key of a demo key id (what the default directory publishes)."""
    return base64.b64encode(public_bytes(demo_private_key(key_id))).decode()


DEFAULT_PATH: Final = Path(__file__).parent / "default_directory.toml"
"""The packaged default directory."""

ALL_HOSPITALS: Final = "all"
"""An agreement's ``hospitals`` value allowing every designated hospital of the host."""

RegionCode = Annotated[str, Field(pattern=r"^\d{6}$")]
"""A 6-digit pooling-region code (GB/T 2260)."""

ProvinceCode = Annotated[str, Field(pattern=r"^\d{2}0000$")]
"""A 6-digit province code ending in 0000."""

HospitalCode = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]
"""A designated hospital's code, e.g. ``H46010001``."""


def province_of(code: str) -> str:
    """The province of a region (or province) code: its first two digits + ``0000``."""
    return code[:2] + "0000"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Province(_Frozen):
    """A province platform (bus participant) and its host-side settings."""

    code: ProvinceCode
    name: str
    max_advance_permille: Annotated[int, Field(strict=True, ge=0, le=MAX_ADVANCE_PERMILLE)] = (
        MAX_ADVANCE_PERMILLE
    )


class Region(_Frozen):
    """A pooling region (统筹区)."""

    code: RegionCode
    name: str

    @property
    def province(self) -> str:
        """The region's province code."""
        return province_of(self.code)


class Hospital(_Frozen):
    """A cross-province designated hospital (跨省定点医疗机构)."""

    code: HospitalCode
    name: str
    level: HospitalLevel
    region: RegionCode

    @property
    def province(self) -> str:
        """The hospital's province code."""
        return province_of(self.region)


class Agreement(_Frozen):
    """A cooperation agreement (合作协议): home region → host province, mode, allowed hospitals."""

    home: RegionCode
    host: ProvinceCode
    mode: SettlementMode
    hospitals: Literal["all"] | tuple[HospitalCode, ...]


class Agency(_Frozen):
    """A medical insurance agency (经办机构) that takes filings and answers the public: what
    the national query site lists under 异地就医经办机构查询."""

    code: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    name: str = Field(min_length=1)
    region: RegionCode
    """Where the agency sits (a pooling region of the directory)."""
    phone: str = Field(pattern=r"^[0-9][0-9 ()+-]{4,31}$")
    address: str = Field(min_length=1)
    hours: str | None = None
    """Opening hours, as the agency words them."""

    @property
    def province(self) -> str:
        """The agency's province code."""
        return province_of(self.region)


class CatalogueItem(_Frozen):
    """One host catalogue entry; ``unit_price_fen`` is the reference price simulators use."""

    item_code: str = Field(min_length=1)
    item_name: str
    category: ItemCategory
    catalogue_class: CatalogueClass
    unit: str = ""
    unit_price_fen: Money


class Catalogue(_Frozen):
    """A host province's catalogue (就医地目录)."""

    host: ProvinceCode
    items: tuple[CatalogueItem, ...]


class SigningKeyEntry(_Frozen):
    """A province's public signing key (global configuration): records whose ``xs-key-id``
    names it are checked with it while ``xs-sent-at`` is inside its validity. A retired key
    stays listed with its ``valid_until``, so old evidence (the message log) still verifies."""

    province: ProvinceCode
    key_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,64}$")
    algorithm: Literal["ed25519"] = ED25519
    public_key: str
    """The raw public key, base64 (32 bytes for Ed25519)."""
    valid_from: datetime
    valid_until: datetime | None = None
    demo: bool = False
    """A key derived from public text (:func:`bus.signing.demo_private_key`) that anyone can
    sign with: for the simulators and the demo, never in a real directory."""

    @field_validator("valid_from", "valid_until")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("needs a time zone, e.g. 2026-01-01T00:00:00+08:00")
        return value

    @field_validator("public_key")
    @classmethod
    def _raw_key(cls, value: str) -> str:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not base64") from None
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, this is {len(raw)}")
        return value

    def public(self) -> PublicKey:
        """The key as :mod:`bus.signing` checks with it."""
        return PublicKey(
            key_id=self.key_id,
            province=self.province,
            algorithm=self.algorithm,
            public=base64.b64decode(self.public_key),
            valid_from_ms=int(self.valid_from.timestamp() * 1000),
            valid_until_ms=(
                int(self.valid_until.timestamp() * 1000) if self.valid_until is not None else None
            ),
        )


class DirectoryData(_Frozen):
    """The validated content of a directory file, before cross-checks."""

    provinces: tuple[Province, ...] = ()
    regions: tuple[Region, ...] = ()
    hospitals: tuple[Hospital, ...] = ()
    agreements: tuple[Agreement, ...] = ()
    policies: tuple[Policy, ...] = ()
    catalogues: tuple[Catalogue, ...] = ()
    keys: tuple[SigningKeyEntry, ...] = ()
    agencies: tuple[Agency, ...] = ()
    """Optional: the agencies (经办机构) the public queries list."""
    demo_keys: bool = False
    """Simulations only: a province with no key listed signs with its demo key
    (``<code>-demo-1``, derivable by anyone). Never in a real directory."""


Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class DirectoryProblem:
    """One problem: field path, the line of the field (or entry) and where its entry starts."""

    path: str
    line: int | None
    entry_line: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        start = (
            f" (entry starts at line {self.entry_line})"
            if self.entry_line is not None and self.entry_line != self.line
            else ""
        )
        return f"{where}{self.path}: {self.message}{start}"


class DirectoryError(ValueError):
    """A directory file is unreadable, invalid or inconsistent; lists every problem."""

    def __init__(self, source: str, problems: Sequence[DirectoryProblem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        count = len(self.problems)
        lines = "\n".join(f"  {source}, {p}" for p in self.problems)
        super().__init__(f"{source}: {count} problem{'s' if count != 1 else ''}\n{lines}")


# --- Line numbers ---------------------------------------------------------------------------
_HEADER_RE: Final = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")


class _Locator:
    """Finds the TOML line of a field path by scanning the text (1-based line numbers)."""

    def __init__(self, text: str | None) -> None:
        self._lines = text.splitlines() if text is not None else []
        self._headers: list[tuple[int, str, bool]] = []
        for number, line in enumerate(self._lines, start=1):
            match = _HEADER_RE.match(line)
            if match:
                name = match.group(2).replace(" ", "")
                self._headers.append((number, name, match.group(1) == "[["))

    def locate(self, loc: Loc) -> tuple[int | None, int | None]:
        """(line of the field, line where its top-level entry starts) for a path."""
        if not self._lines or not loc or not isinstance(loc[0], str):
            return None, None
        section = loc[0]
        if len(loc) >= 2 and isinstance(loc[1], int):
            starts = [n for n, name, is_array in self._headers if is_array and name == section]
            if loc[1] >= len(starts):
                return None, None
            start = starts[loc[1]]
            end = self._span_end(start, section)
            return self._refine(start, end, section, loc[2:]), start
        for number, name, _ in self._headers:
            if name == section or name.startswith(section + "."):
                return number, number
        key = re.compile(rf"^\s*{re.escape(section)}\s*=")
        for number, line in enumerate(self._lines, start=1):
            if key.match(line):
                return number, number
        return None, None

    def _span_end(self, start: int, section: str) -> int:
        """The first header after ``start`` that is not inside ``section``."""
        for number, name, _ in self._headers:
            if number > start and not name.startswith(section + "."):
                return number
        return len(self._lines) + 1

    def _refine(self, start: int, end: int, table: str, rest: Loc) -> int:
        """The line of ``rest`` inside the table whose header is at ``start`` (else ``start``)."""
        if not rest or not isinstance(rest[0], str):
            return start
        name = f"{table}.{rest[0]}"
        own_end = next((n for n, _, _ in self._headers if start < n < end), end)
        key = re.compile(rf"^\s*{re.escape(rest[0])}\s*=")
        line = next((n for n in range(start + 1, own_end) if key.match(self._lines[n - 1])), None)
        if line is None:  # written as a sub-table: [table.key] or [[table.key]]
            index = rest[1] if len(rest) >= 2 and isinstance(rest[1], int) else None
            subs = [
                n
                for n, header, is_array in self._headers
                if start < n < end and header == name and is_array == (index is not None)
            ]
            pick = 0 if index is None else index
            if pick >= len(subs):
                return start
            sub = subs[pick]
            sub_end = min(self._span_end(sub, name), end)
            return self._refine(sub, sub_end, name, rest[1 if index is None else 2 :])
        value = self._lines[line - 1].split("=", 1)[1]
        if len(rest) < 2 or not isinstance(rest[1], int) or "]" in value:
            return line
        rows = 0  # a multi-line array of inline tables, one per line
        for number in range(line + 1, own_end):
            stripped = self._lines[number - 1].strip()
            if stripped.startswith("]"):
                break
            if stripped.startswith("{"):
                if rows == rest[1]:
                    return number
                rows += 1
        return line


TomlLocator = _Locator
"""Line numbers of settings in any TOML text (the gateway's configuration uses it too)."""


def _path(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "<file>"


def _clean(loc: Iterable[str | int]) -> Loc:
    """Drop pydantic's union-member tags (``literal['all']``, ``tuple[str, ...]``)."""
    return tuple(p for p in loc if isinstance(p, int) or re.fullmatch(r"\w+", p))


def _problems(locator: _Locator, found: Iterable[tuple[Loc, str]]) -> list[DirectoryProblem]:
    merged: dict[Loc, list[str]] = {}
    for loc, message in found:
        merged.setdefault(loc, []).append(message)
    problems = []
    for loc, messages in merged.items():
        line, entry = locator.locate(loc)
        problems.append(DirectoryProblem(_path(loc), line, entry, "; or ".join(messages)))
    return problems


# --- Cross-checks ---------------------------------------------------------------------------
def _duplicates(section: str, codes: Sequence[object], what: str) -> list[tuple[Loc, str]]:
    first: dict[object, int] = {}
    found: list[tuple[Loc, str]] = []
    for index, code in enumerate(codes):
        if code in first:
            found.append(
                ((section, index), f"duplicate {what} {code} (first at index {first[code]})")
            )
        else:
            first[code] = index
    return found


def _cross_check(data: DirectoryData) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    found += _duplicates("provinces", [p.code for p in data.provinces], "province code")
    found += _duplicates("regions", [r.code for r in data.regions], "region code")
    found += _duplicates("hospitals", [h.code for h in data.hospitals], "hospital code")
    found += _duplicates("policies", [p.home_region for p in data.policies], "policy for region")
    found += _duplicates("catalogues", [c.host for c in data.catalogues], "catalogue for host")
    found += _duplicates(
        "agreements", [(a.home, a.host) for a in data.agreements], "agreement (home, host)"
    )
    found += _duplicates("keys", [k.key_id for k in data.keys], "key id")
    province_codes = {p.code for p in data.provinces}
    for i, key in enumerate(data.keys):
        if key.province not in province_codes:
            found.append((("keys", i, "province"), f"unknown province {key.province}"))
        if key.valid_until is not None and key.valid_until <= key.valid_from:
            found.append((("keys", i, "valid_until"), "ends before it starts"))
        if key.demo and key.public_key != demo_public_key(key.key_id):
            found.append((("keys", i, "public_key"), "not the demo key of this key id"))
    regions = {r.code for r in data.regions}
    hospitals = {h.code: h for h in data.hospitals}
    host_provinces = {h.province for h in data.hospitals}
    policies = {p.home_region for p in data.policies}
    catalogues = {c.host for c in data.catalogues}

    for i, hospital in enumerate(data.hospitals):
        if hospital.region not in regions:
            found.append((("hospitals", i, "region"), f"unknown region {hospital.region}"))
    found += _duplicates("agencies", [a.code for a in data.agencies], "agency code")
    for i, agency in enumerate(data.agencies):
        if agency.region not in regions:
            found.append((("agencies", i, "region"), f"unknown region {agency.region}"))
    for i, policy in enumerate(data.policies):
        if policy.home_region not in regions:
            found.append((("policies", i, "home_region"), f"unknown region {policy.home_region}"))
    for i, catalogue in enumerate(data.catalogues):
        if catalogue.host not in host_provinces:
            found.append((("catalogues", i, "host"), f"province {catalogue.host} has no hospitals"))
        seen: set[str] = set()
        for j, item in enumerate(catalogue.items):
            if item.item_code in seen:
                found.append(
                    (("catalogues", i, "items", j), f"duplicate item_code {item.item_code}")
                )
            seen.add(item.item_code)
    for i, agreement in enumerate(data.agreements):
        if agreement.home not in regions:
            found.append((("agreements", i, "home"), f"unknown region {agreement.home}"))
        elif agreement.home not in policies:
            found.append((("agreements", i, "home"), f"region {agreement.home} has no policy"))
        if province_of(agreement.home) == agreement.host:
            found.append(
                (("agreements", i, "host"), f"{agreement.host} is the home's own province")
            )
        if agreement.host not in host_provinces:
            found.append((("agreements", i, "host"), f"province {agreement.host} has no hospitals"))
        elif agreement.host not in catalogues:
            found.append((("agreements", i, "host"), f"province {agreement.host} has no catalogue"))
        if agreement.hospitals == ALL_HOSPITALS:
            continue
        if not agreement.hospitals:
            found.append((("agreements", i, "hospitals"), 'empty list: use "all" or codes'))
        listed: set[str] = set()
        for j, code in enumerate(agreement.hospitals):
            loc: Loc = ("agreements", i, "hospitals", j)
            target = hospitals.get(code)
            if code in listed:
                found.append((loc, f"hospital {code} listed twice"))
            elif target is None:
                found.append((loc, f"unknown hospital {code}"))
            elif target.province != agreement.host:
                found.append((loc, f"hospital {code} is not in host province {agreement.host}"))
            listed.add(code)
    return found


# --- The directory --------------------------------------------------------------------------
class Directory:
    """Read-only queries over a validated, cross-checked directory."""

    def __init__(
        self, data: DirectoryData, *, source: str = "<memory>", text: str | None = None
    ) -> None:
        """Cross-check ``data``; ``text`` (the TOML it came from) lets errors name lines."""
        problems = _cross_check(data)
        if problems:
            raise DirectoryError(source, _problems(_Locator(text), problems))
        self.data: Final = data
        self.source: Final = source
        self._provinces = {p.code: p for p in data.provinces}
        self._regions = {r.code: r for r in data.regions}
        self._hospitals = {h.code: h for h in data.hospitals}
        self._agreements = {(a.home, a.host): a for a in data.agreements}
        self._policies = {p.home_region: p for p in data.policies}
        self._catalogues: dict[str, Mapping[str, CatalogueItem]] = {
            c.host: MappingProxyType({i.item_code: i for i in c.items}) for c in data.catalogues
        }

    # construction
    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, Any], *, source: str = "<memory>", text: str | None = None
    ) -> Directory:
        """Validate a parsed TOML document (a mapping) into a directory."""
        try:
            data = DirectoryData.model_validate(raw)
        except ValidationError as exc:
            found = [(_clean(e["loc"]), e["msg"]) for e in exc.errors()]
            raise DirectoryError(source, _problems(_Locator(text), found)) from None
        return cls(data, source=source, text=text)

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<string>") -> Directory:
        """Parse and validate TOML text."""
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            match = re.search(r"at line (\d+)", str(exc))
            line = int(match.group(1)) if match else None
            problem = DirectoryProblem("<toml>", line, line, f"invalid TOML: {exc}")
            raise DirectoryError(source, [problem]) from None
        return cls.from_mapping(raw, source=source, text=text)

    @classmethod
    def load(cls, path: str | Path) -> Directory:
        """Load and validate a directory file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DirectoryError(
                str(path), [DirectoryProblem("<file>", None, None, str(exc))]
            ) from None
        return cls.from_toml(text, source=str(path))

    @classmethod
    def default(cls) -> Directory:
        """The packaged default directory (loaded once, cached)."""
        return default()

    # lookups
    def region(self, code: str) -> Region | None:
        """The pooling region with this code, if any."""
        return self._regions.get(code)

    def regions(self) -> tuple[Region, ...]:
        """Every pooling region, in file order."""
        return self.data.regions

    def hospital(self, code: str) -> Hospital | None:
        """The designated hospital with this code, if any."""
        return self._hospitals.get(code)

    def hospitals_of(self, host_province: str) -> tuple[Hospital, ...]:
        """The designated hospitals of a province (a region code is taken as its province)."""
        province = province_of(host_province)
        return tuple(h for h in self.data.hospitals if h.province == province)

    def agreement(self, home_region: str, host_province: str) -> Agreement | None:
        """The agreement of a home region with a host province (region codes normalised)."""
        return self._agreements.get((home_region, province_of(host_province)))

    def agreements(self) -> tuple[Agreement, ...]:
        """Every agreement, in file order."""
        return self.data.agreements

    def allows(self, agreement: Agreement, hospital_code: str) -> bool:
        """Whether the agreement lets its home's insured settle at this hospital."""
        if agreement.hospitals == ALL_HOSPITALS:
            found = self._hospitals.get(hospital_code)
            return found is not None and found.province == agreement.host
        return hospital_code in agreement.hospitals

    def allowed_hospitals(self, home_region: str, host_province: str) -> tuple[Hospital, ...]:
        """Hospitals of the host that the home region's agreement allows (none without one)."""
        agreement = self.agreement(home_region, host_province)
        if agreement is None:
            return ()
        return tuple(h for h in self.hospitals_of(agreement.host) if self.allows(agreement, h.code))

    def agencies(self, province: str | None = None) -> tuple[Agency, ...]:
        """The agencies (经办机构), in file order; only those of ``province`` when given (a
        region code is taken as its province)."""
        if province is None:
            return self.data.agencies
        code = province_of(province)
        return tuple(a for a in self.data.agencies if a.province == code)

    def policy(self, home_region: str) -> Policy | None:
        """The benefit policy of a home region, if any."""
        return self._policies.get(home_region)

    def catalogue(self, host_province: str) -> Mapping[str, CatalogueItem]:
        """The host's catalogue by item code (empty for a province without one)."""
        return self._catalogues.get(province_of(host_province), MappingProxyType({}))

    def catalogue_classes(self, host_province: str) -> dict[str, CatalogueClass]:
        """Item code → host catalogue class, as :func:`adapters.rules.review` takes it."""
        return {code: i.catalogue_class for code, i in self.catalogue(host_province).items()}

    def keyring(self) -> KeyRing:
        """Every published public key, for checking signatures (with ``demo_keys``, the
        demo key of each province that lists none)."""
        return KeyRing(k.public() for k in self.signing_keys())

    def signing_keys(self) -> tuple[SigningKeyEntry, ...]:
        """The published keys, plus (``demo_keys``) a demo key for each province that lists
        none."""
        listed = {k.province for k in self.data.keys}
        extra = tuple(
            SigningKeyEntry(
                province=code,
                key_id=demo_key_id(code),
                public_key=demo_public_key(demo_key_id(code)),
                valid_from=datetime(2000, 1, 1, tzinfo=UTC),
                demo=True,
            )
            for code in (p.code for p in self.data.provinces)
            if self.data.demo_keys and code not in listed
        )
        return self.data.keys + extra

    def keys_of(self, province: str) -> tuple[SigningKeyEntry, ...]:
        """A province's keys (see :meth:`signing_keys`), in file order."""
        return tuple(k for k in self.signing_keys() if k.province == province)

    def provinces(self) -> tuple[str, ...]:
        """Sorted codes of every province that appears anywhere in the directory."""
        codes = {p.code for p in self.data.provinces}
        codes |= {r.province for r in self.data.regions}
        codes |= {a.host for a in self.data.agreements}
        codes |= {c.host for c in self.data.catalogues}
        return tuple(sorted(codes))

    def province_name(self, code: str) -> str:
        """The province's name, or its code when the file gives none."""
        province = self._provinces.get(province_of(code))
        return province.name if province is not None else province_of(code)

    def home_regions_of(self, province: str) -> tuple[str, ...]:
        """Sorted regions of the province that have a home policy."""
        return tuple(sorted(r for r in self._policies if province_of(r) == province))

    def agreements_as_home(self, province: str) -> tuple[Agreement, ...]:
        """Agreements whose home region lies in the province."""
        return tuple(a for a in self.data.agreements if province_of(a.home) == province)

    def agreements_as_host(self, province: str) -> tuple[Agreement, ...]:
        """Agreements in which the province is the host."""
        return tuple(a for a in self.data.agreements if a.host == province)

    def max_advance_permille(self, host_province: str) -> int:
        """The host's cap on the DELAYED advance, in ‰ (default 250)."""
        province = self._provinces.get(province_of(host_province))
        return province.max_advance_permille if province is not None else MAX_ADVANCE_PERMILLE

    def to_json_dict(self) -> dict[str, Any]:
        """The directory as JSON-ready dicts (for the dashboard and reports)."""
        return {
            "provinces": [
                {
                    "code": code,
                    "name": self.province_name(code),
                    "max_advance_permille": self.max_advance_permille(code),
                }
                for code in self.provinces()
            ],
            "regions": [
                {"code": r.code, "name": r.name, "province": r.province} for r in self.data.regions
            ],
            "hospitals": [
                {
                    "code": h.code,
                    "name": h.name,
                    "level": h.level,
                    "region": h.region,
                    "province": h.province,
                }
                for h in self.data.hospitals
            ],
            "agreements": [
                {
                    "home": a.home,
                    "host": a.host,
                    "mode": a.mode.value,
                    "hospitals": a.hospitals if a.hospitals == ALL_HOSPITALS else list(a.hospitals),
                }
                for a in self.data.agreements
            ],
            "policies": [p.model_dump(mode="json") for p in self.data.policies],
            "catalogues": [
                {"host": c.host, "items": [i.model_dump(mode="json") for i in c.items]}
                for c in self.data.catalogues
            ],
            "agencies": [
                {**a.model_dump(mode="json"), "province": a.province} for a in self.data.agencies
            ],
        }


def load(path: str | Path) -> Directory:
    """Load and validate a directory file."""
    return Directory.load(path)


@functools.cache
def default() -> Directory:
    """The packaged default directory (``default_directory.toml``), loaded once."""
    return Directory.load(DEFAULT_PATH)
