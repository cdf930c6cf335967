"""docs/joining-from-java-and-go.md cannot drift from the code.

The guide's worked record (a ``record-example`` block) is an ErrorReport that the host Hainan
(460000) sends the home Hebei (130000) when it refuses Lao Zhang's admission for want of a
filing. It is built here as the reference implementation builds it (:func:`bus.node_core.report`,
the codec, the envelope, the demo signer of :mod:`simulators.keys`) with fixed ids and clock, so
every byte is stable (Ed25519 is deterministic). :func:`render` writes the block, annotations
included; the tests check that the guide holds exactly that block, that its bytes (read back
from the hex alone) are the record's, that the field-by-field Avro bytes written here by hand
are the codec's, and that the record verifies. After a deliberate change, print the new block
with ``.venv/bin/python -m tests.test_joining_guide`` and paste it into the guide.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from adapters.fixtures import LAO_ZHANG_PERSON_ID
from bus.codec import Codec, fingerprint
from bus.constants import FAMILY_ERROR, SINGLE_OBJECT_MARKER, topic
from bus.envelope import Envelope
from bus.models import ErrorCode, ErrorReport, Severity
from bus.node_core import report
from bus.signing import SignatureError, Verifier, canonical, demo_key_id, demo_private_key
from bus.signing import public_bytes as raw_public_key
from bus.transport import Headers
from schemas import SCHEMA_DIR
from simulators.keys import demo_keyring, demo_signer

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "joining-from-java-and-go.md"
HOST, HOME = "460000", "130000"
MESSAGE_ID = "3f6c0a52-9e1d-4b7a-8c2f-71d4e5a9b031"
"""The example's ``xs-message-id``."""
ERROR_ID = "a1c4e7f0-2b5d-4e8a-9c3f-6d0b1e4a7c92"
"""The example's ``error_id``."""
SENT_AT_MS = 1_779_010_213_000
"""2026-05-17T09:30:13Z: the example's ``xs-sent-at``."""
OCCURRED_AT = dt.datetime(2026, 5, 17, 9, 30, 12, 345000, tzinfo=dt.UTC)
"""When the host refused the admission."""
COLUMN = 44
"""Where the annotations start in the block."""
WRAP = 32
"""Bytes of hex per line."""

Row = tuple[str, str]
"""One line of the block: content and annotation."""


def the_report() -> ErrorReport:
    """The host's report, as :meth:`adapters.host.HostSystem._refuse` makes it at admission,
    with a fixed id and time."""
    rep = report(
        ErrorCode.NOT_FILED,
        "no filing",
        detected_by=HOST,
        origin=HOST,
        responsible=HOME,
        severity=Severity.WARNING,
        details={"stage": "admission"},
    )
    return rep.model_copy(update={"error_id": ERROR_ID, "occurred_at": OCCURRED_AT})


def the_record() -> tuple[str, bytes, Headers, bytes]:
    """Topic, key, headers (signed, in wire order) and value of the example record."""
    rep = the_report()
    env = Envelope(
        message_id=MESSAGE_ID,
        message_type=rep.avro_name,
        source=HOST,
        target=HOME,
        sent_at_ms=SENT_AT_MS,
    )
    key = LAO_ZHANG_PERSON_ID.encode("utf-8")
    value = Codec().encode(rep)
    headers = demo_signer(HOST).sign(env.to_headers(), key, value)
    return topic(FAMILY_ERROR, HOME), key, headers, value


# --- Avro binary, by hand: the encoding rules the guide annotates --------------------------------
def zigzag(n: int) -> bytes:
    """Avro ``int``/``long``: zig-zag, then a little-endian base-128 varint."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        byte = z & 0x7F
        z >>= 7
        if z:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _hex_lines(data: bytes) -> list[str]:
    return [data[i : i + WRAP].hex() for i in range(0, len(data), WRAP)]


BodyRow = tuple[bytes, str, bytes]
"""Bytes of one annotated line of the value, its annotation, and the bytes that continue it on
the lines below (a long string's text)."""


def _string_rows(prefix: str, text: str) -> list[BodyRow]:
    """A string: its length (zig-zag varint), then its UTF-8 bytes."""
    data = text.encode("utf-8")
    length = zigzag(len(data))
    if len(data) <= 12:
        return [
            (length + data, f'{prefix}"{text}" (length {len(data)}: zig-zag {length.hex()})', b"")
        ]
    return [(length, f'{prefix}length {len(data)} (zig-zag {length.hex()}), then "{text}"', data)]


def _field_rows(name: str, schema: Any, value: Any) -> list[BodyRow]:
    """The bytes of one field of the example (the types it has)."""
    if isinstance(schema, list):  # a union: the branch index, then the branch's value
        assert schema[0] == "null"
        assert value is None, "the example's unions are all null"
        return [(zigzag(0), f"{name}: union branch 0 = null", b"")]
    if schema == "string":
        return _string_rows(f"{name}: ", value)
    if schema == "boolean":
        return [(b"\x01" if value else b"\x00", f"{name}: boolean {str(value).lower()}", b"")]
    kind = schema["type"]
    if kind == "enum":
        index = schema["symbols"].index(str(value))
        note = f"{name}: enum {schema['name']}, index {index} (zig-zag {zigzag(index).hex()})"
        return [(zigzag(index), f"{note} = {value}", b"")]
    if kind == "long" and schema.get("logicalType") == "timestamp-millis":
        ms = int(value.timestamp() * 1000)
        when = value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return [(zigzag(ms), f"{name}: timestamp-millis {ms} = {when}", b"")]
    if kind == "map" and schema["values"] == "string":
        rows = [(zigzag(len(value)), f"{name}: map, a block of {len(value)} entry", b"")]
        for k, v in value.items():
            rows += _string_rows("  key ", k) + _string_rows("  value ", v)
        return [*rows, (zigzag(0), f"{name}: end of the map (a block of 0)", b"")]
    raise AssertionError(f"the example has no {name} of type {schema!r}")


def body_rows(rep: ErrorReport) -> list[BodyRow]:
    """The Avro binary body of ``rep`` field by field, in schema order."""
    schema = json.loads((SCHEMA_DIR / "ErrorReport.avsc").read_text(encoding="utf-8"))
    dumped = rep.model_dump()
    return [
        r for f in schema["fields"] for r in _field_rows(f["name"], f["type"], dumped[f["name"]])
    ]


# --- The block --------------------------------------------------------------------------------
def _line(content: str, note: str) -> str:
    return f"{content}{' ' * max(COLUMN - 2 - len(content), 1)}# {note}"


def _header_lines(name: str, raw: bytes) -> list[str]:
    """A header: its name, its value's text (below its hex when long) and its value's hex."""
    size = f"{len(raw)} byte{'s' if len(raw) > 1 else ''}"
    text = raw.decode("utf-8")
    if len(text) <= 40:
        return [
            _line(f"header: {name}", f'"{text}" ({size})'),
            *[f"  {h}" for h in _hex_lines(raw)],
        ]
    return [
        _line(f"header: {name}", f"{size}:"),
        *[f"  {h}" for h in _hex_lines(raw)],
        f'  # "{text}"',
    ]


def render() -> str:
    """The ``record-example`` block, fences included."""
    topic_name, key, headers, value = the_record()
    fp = fingerprint(json.loads((SCHEMA_DIR / "ErrorReport.avsc").read_text(encoding="utf-8")))
    key_id = demo_key_id(HOST)
    lines = [
        "```record-example",
        _line(f"topic: {topic_name}", f"the home {HOME}'s error topic (xs-target)"),
        _line("key-hex:", f'"{key.decode()}": person_id, UTF-8, {len(key)} bytes'),
        *[f"  {h}" for h in _hex_lines(key)],
    ]
    for name, raw in headers:
        lines += _header_lines(name, raw)
    lines += [
        _line("value-hex:", f"{len(value)} bytes"),
        _line(f"  {SINGLE_OBJECT_MARKER.hex()}", "single-object marker C3 01"),
        _line(f"  {fp.hex()}", "fingerprint of ErrorReport v1.3 (CRC-64-AVRO, little-endian)"),
    ]
    for head, note, tail in body_rows(the_report()):
        lines.append(_line(f"  {head.hex()}", note))
        lines += [f"    {h}" for h in _hex_lines(tail)]
    data = canonical(headers, key, value)
    public = raw_public_key(demo_private_key(key_id))
    lines += [
        _line(f"canonical-sha256-hex: {hashlib.sha256(data).hexdigest()}", f"{len(data)} bytes"),
        _line(f"public-key-base64: {base64.b64encode(public).decode()}", key_id),
        "```",
    ]
    return "\n".join(lines) + "\n"


# --- Reading the block back -------------------------------------------------------------------
Entry = tuple[str, str, bytes]
"""A block entry: name, the text after it on its line, the hex of its continuation lines."""


def guide_text() -> str:
    return GUIDE.read_text(encoding="utf-8")


def guide_block() -> str:
    found = re.findall(r"^```record-example\n.*?^```\n", guide_text(), flags=re.S | re.M)
    assert len(found) == 1, "the guide has exactly one ```record-example block"
    return str(found[0])


def entries(block: str) -> list[Entry]:
    """The block's entries; ``#`` starts a comment, an indented line continues the entry."""
    out: list[tuple[str, str, list[str]]] = []
    for raw in block.splitlines()[1:-1]:
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if line[0].isspace():
            out[-1][2].append("".join(line.split()))
            continue
        name, sep, rest = line.partition(":")
        assert sep, f"not a 'name: value' line: {raw!r}"
        out.append((name, rest.strip(), []))
    return [(n, rest, bytes.fromhex("".join(h))) for n, rest, h in out]


def one(found: list[Entry], name: str) -> Entry:
    matching = [e for e in found if e[0] == name]
    assert len(matching) == 1, f"the block needs exactly one {name!r}"
    return matching[0]


class TestRecordExample:
    def test_the_guide_holds_the_block_the_code_renders(self) -> None:
        assert guide_block() == render()

    def test_the_bytes_of_the_block_are_the_record(self) -> None:
        """Read from the hex alone, ignoring every annotation."""
        topic_name, key, headers, value = the_record()
        found = entries(guide_block())
        assert one(found, "topic")[1] == topic_name
        assert one(found, "key-hex")[2] == key
        assert [(n, h) for name, n, h in found if name == "header"] == list(headers)
        assert one(found, "value-hex")[2] == value

    def test_the_hand_encoding_is_the_codecs(self) -> None:
        """The field-by-field bytes annotated in the guide are what the codec writes."""
        _, _, _, value = the_record()
        body = b"".join(head + tail for head, _, tail in body_rows(the_report()))
        assert value[10:] == body
        assert value[:2] == SINGLE_OBJECT_MARKER
        assert Codec().decode(value) == the_report()

    def test_the_record_verifies_with_the_demo_key(self) -> None:
        _, key, headers, value = the_record()
        verifier = Verifier(demo_keyring())
        assert verifier.verify(headers, key, value, SENT_AT_MS).key_id == demo_key_id(HOST)
        tampered = value[:-1] + bytes([value[-1] ^ 1])
        with pytest.raises(SignatureError) as caught:
            verifier.verify(headers, key, tampered, SENT_AT_MS)
        assert caught.value.kind == "bad_signature"

    def test_the_canonical_digest_and_key(self) -> None:
        _, key, headers, value = the_record()
        found = entries(guide_block())
        data = canonical(headers, key, value)
        assert one(found, "canonical-sha256-hex")[1] == hashlib.sha256(data).hexdigest()
        assert data.startswith(b"XSETTLE-SIG-V1\n")
        length = struct.unpack(">I", data[16:20])[0]
        assert data[20 : 20 + length] == MESSAGE_ID.encode()
        public = base64.b64decode(one(found, "public-key-base64")[1], validate=True)
        assert public == raw_public_key(demo_private_key(demo_key_id(HOST)))

    def test_zigzag(self) -> None:
        """Spot values of the Avro specification's table."""
        assert [zigzag(n).hex() for n in (0, -1, 1, -2, 2, -64, 64)] == [
            "00",
            "01",
            "02",
            "03",
            "04",
            "7f",
            "8001",
        ]


class TestGuide:
    def test_it_names_the_contract_sections_it_relies_on(self) -> None:
        """Every ``*Section*`` the guide names is a section of docs/contract.md."""
        contract = (GUIDE.parent / "contract.md").read_text(encoding="utf-8")
        titles = {m.strip() for m in re.findall(r"^#+ (.+)$", contract, flags=re.M)}
        named = set(re.findall(r"\[\*([^*]+)\*\]\(contract\.md", guide_text()))
        assert named, "the guide names contract sections"
        missing = sorted(n for n in named if not any(t.startswith(n) for t in titles))
        assert missing == []

    def test_its_links_into_the_contract_land_on_a_heading(self) -> None:
        """Anchors as GitHub makes them: lower case, punctuation dropped, spaces to hyphens."""
        contract = (GUIDE.parent / "contract.md").read_text(encoding="utf-8")
        slugs = {
            re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-")
            for t in re.findall(r"^#+ (.+)$", contract, flags=re.M)
        }
        anchors = re.findall(r"\]\(contract\.md#([^)]+)\)", guide_text())
        assert len(anchors) >= 10
        assert sorted(set(anchors) - slugs) == []

    def test_contract_links_to_the_guide_and_the_asyncapi_document(self) -> None:
        head = (GUIDE.parent / "contract.md").read_text(encoding="utf-8").split("\n## ", 1)[0]
        assert "(joining-from-java-and-go.md)" in head
        assert "(asyncapi.json)" in head


if __name__ == "__main__":
    sys.stdout.write(render())
