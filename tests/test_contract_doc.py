"""docs/contract.md cannot drift from the code.

The contract's ``test-vector`` block is recomputed with the reference implementation (a fixed
FilingReceipt signed with the demo key ``460000-demo-1``: Ed25519 is deterministic, so every
byte is stable), and the names the document lists (signed headers, refusal kinds, error codes,
headers, defaults, every field and enum symbol of every schema, the v1.3 reversal and
enum-default rules) are checked against the code's.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from adapters import directory
from adapters.rules import REVERSAL_WINDOW_DAYS, ReversalRefusal
from bus import constants
from bus.audit import ENTRY_TAG
from bus.codec import Codec
from bus.constants import H_SIGNATURE, H_TRACEPARENT, MAX_RECORD_BYTES
from bus.envelope import FAMILY_OF, ISSUED_ID, UNKNOWN_ALLOWED, Envelope
from bus.errors import DecodeError
from bus.models import (
    MESSAGE_TYPES,
    ErrorCode,
    FilingReceipt,
    FilingStatus,
    ReversalRequest,
    ReversalResult,
)
from bus.settings import BusSettings
from bus.signing import (
    CANONICAL_TAG,
    DEMO_SEED,
    ED25519,
    SIGNED_HEADERS,
    KeyRing,
    PublicKey,
    SignatureError,
    Signer,
    Verifier,
    canonical,
    demo_private_key,
    public_bytes,
)
from bus.transport import Headers
from schemas import SCHEMA_DIR

DOC = Path(__file__).resolve().parents[1] / "docs" / "contract.md"
KEY_ID = "460000-demo-1"
SENT_AT_MS = 1_779_010_213_000
"""2026-05-17T09:30:13Z: the vector's ``xs-sent-at``."""

VectorEntries = dict[str, list[str]]


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def parse_vector(block: str) -> VectorEntries:
    """Entries of a ``test-vector`` block: ``name: value`` lines, indented continuation lines,
    ``#`` comments. A name may repeat (``header``): every value is kept, in order."""
    entries: list[tuple[str, list[str]]] = []
    for raw in block.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if line[0].isspace():
            assert entries, f"continuation line before any entry: {raw!r}"
            entries[-1][1].append(line.strip())
            continue
        name, sep, value = line.partition(":")
        assert sep, f"not a 'name: value' line: {raw!r}"
        entries.append((name.strip(), [value.strip()] if value.strip() else []))
    out: VectorEntries = {}
    for name, parts in entries:
        out.setdefault(name, []).append(" ".join(parts))
    return out


def vectors() -> list[VectorEntries]:
    blocks = re.findall(r"^```test-vector\n(.*?)^```", doc_text(), flags=re.S | re.M)
    return [parse_vector(b) for b in blocks]


def one(v: VectorEntries, name: str) -> str:
    values = v.get(name)
    assert values is not None, f"the vector has no {name!r}"
    assert len(values) == 1, f"the vector needs exactly one {name!r}"
    return values[0]


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def doc_headers(v: VectorEntries) -> Headers:
    pairs = []
    for item in v.get("header", []):
        name, sep, value = item.partition("=")
        assert sep, f"a header entry is name=value: {item!r}"
        pairs.append((name, value.encode("utf-8")))
    return tuple(pairs)


def the_record() -> tuple[Headers, bytes, bytes]:
    """The vector's record as the reference implementation builds and signs it."""
    receipt = FilingReceipt(
        filing_id="F-130100-1",
        person_id="130102195001011234",
        host_region="460100",
        status=FilingStatus.REGISTERED,
        received_at=dt.datetime(2026, 5, 17, 9, 30, 12, 345000, tzinfo=dt.UTC),
    )
    env = Envelope(
        message_id="6f9d2a4e-3b1c-4e8f-9a7d-2c5b8e1f4a63",
        message_type=receipt.avro_name,
        source="460000",
        target="130000",
        sent_at_ms=SENT_AT_MS,
        attempt=1,
        correlation_id="0c3e8b52-7d14-4a9b-b6f1-5e2d9a8c7b40",
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    key = receipt.person_id.encode("utf-8")
    value = Codec().encode(receipt)
    headers = Signer.demo("460000", KEY_ID).sign(env.to_headers(), key, value)
    return headers, key, value


def canonical_by_the_doc(headers: Headers, key: bytes | None, value: bytes | None) -> bytes:
    """The canonical form written from the document's words alone (not bus.signing)."""

    def field(data: bytes | None) -> bytes:
        return b"\x00" if data is None else b"\x01" + struct.pack(">I", len(data)) + data

    order = (
        "xs-message-id",
        "xs-message-type",
        "xs-source",
        "xs-target",
        "xs-sent-at",
        "xs-reply-to",
        "xs-deadline",
        "xs-correlation-id",
        "xs-attempt",
        "xs-signature-alg",
        "xs-key-id",
    )
    raw = dict(headers)
    out = b"XSETTLE-SIG-V1\n" + b"".join(field(raw.get(n)) for n in order)
    return out + field(key) + field(value)


@pytest.fixture(scope="module")
def vector() -> VectorEntries:
    found = vectors()
    assert len(found) == 1, "docs/contract.md has exactly one ```test-vector block"
    return found[0]


class TestVector:
    def test_the_signed_header_order_is_the_codes(self, vector: VectorEntries) -> None:
        assert one(vector, "signed-headers").split() == list(SIGNED_HEADERS)

    def test_the_demo_seed_and_public_key_are_the_codes(self, vector: VectorEntries) -> None:
        """The seed is SHA-256 of the demo prefix and key id; the public key is the one the
        default directory publishes for 460000-demo-1."""
        seed = unhex(one(vector, "demo-seed-hex"))
        private = demo_private_key(KEY_ID)
        raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        assert seed == raw == hashlib.sha256(DEMO_SEED + KEY_ID.encode()).digest()
        public = base64.b64decode(one(vector, "public-key-base64"), validate=True)
        assert public == public_bytes(private)
        published = directory.default().keyring().get(KEY_ID)
        assert published is not None
        assert published.public == public
        assert published.province == "460000"

    def test_the_record_is_the_one_the_code_builds(self, vector: VectorEntries) -> None:
        headers, key, value = the_record()
        assert doc_headers(vector) == headers
        assert one(vector, "record-key-utf8").encode("utf-8") == key
        assert unhex(one(vector, "record-value-hex")) == value

    def test_canonical_form_digest_and_signature(self, vector: VectorEntries) -> None:
        headers, key, value = the_record()
        data = canonical(headers, key, value)
        assert unhex(one(vector, "canonical-hex")) == data
        assert canonical_by_the_doc(headers, key, value) == data
        assert unhex(one(vector, "canonical-sha256-hex")) == hashlib.sha256(data).digest()
        signature = one(vector, "signature-base64")
        assert signature.encode() == dict(headers)[H_SIGNATURE]
        raw = base64.b64decode(signature, validate=True)
        assert len(raw) == 64
        public = base64.b64decode(one(vector, "public-key-base64"))
        Ed25519PublicKey.from_public_bytes(public).verify(raw, data)  # raises if wrong

    def test_the_vector_verifies_and_traceparent_is_not_signed(self, vector: VectorEntries) -> None:
        """A receiver accepts the documented record; changing a signed header breaks it,
        changing traceparent does not."""
        public = base64.b64decode(one(vector, "public-key-base64"))
        ring = KeyRing([PublicKey(KEY_ID, "460000", ED25519, public, valid_from_ms=0)])
        verifier = Verifier(ring)
        headers = doc_headers(vector)
        key = one(vector, "record-key-utf8").encode()
        value = unhex(one(vector, "record-value-hex"))
        assert verifier.verify(headers, key, value, SENT_AT_MS).key_id == KEY_ID
        traced = tuple(
            (k, b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01" if k == H_TRACEPARENT else v)
            for k, v in headers
        )
        verifier.verify(traced, key, value, SENT_AT_MS)
        bumped = tuple((k, b"2" if k == "xs-attempt" else v) for k, v in headers)
        with pytest.raises(SignatureError) as caught:
            verifier.verify(bumped, key, value, SENT_AT_MS)
        assert caught.value.kind == "bad_signature"


def _docstring_kinds(cls: type) -> list[str]:
    return re.findall(r"``(\w+)``", cls.__doc__ or "")


class TestNames:
    def test_every_refusal_kind_is_documented(self) -> None:
        text = doc_text()
        kinds = [
            *_docstring_kinds(SignatureError),
            *_docstring_kinds(DecodeError),
            "undecodable_header",
            "oversized",
            "unknown_symbol",
        ]
        assert len(kinds) > 15
        missing = [k for k in kinds if f"`{k}`" not in text]
        assert missing == []

    def test_every_error_code_is_in_the_table(self) -> None:
        text = doc_text()
        missing = [c.value for c in ErrorCode if f"| `{c.value}` |" not in text]
        assert missing == []
        assert "reserved" not in text.split("| `SIGNATURE_INVALID` |", 1)[1].split("\n", 1)[0]

    def test_every_header_of_the_code_is_documented(self) -> None:
        text = doc_text()
        names = [
            value
            for name, value in vars(constants).items()
            if name.startswith("H_") and isinstance(value, str)
        ]
        assert len(names) > 20
        missing = [n for n in names if f"`{n}`" not in text]
        assert missing == []

    def test_tags_limits_and_defaults(self) -> None:
        text = doc_text()
        assert len(CANONICAL_TAG) == 15
        assert "`XSETTLE-SIG-V1\\n`: 15 ASCII bytes" in text
        assert f"`{ENTRY_TAG.decode().strip()}\\n`" in text
        assert f"`{DEMO_SEED.decode()}`" in text
        assert f"{MAX_RECORD_BYTES:,} bytes" in text
        settings = BusSettings()
        assert f"default {settings.clock_skew_s} s; setting `clock_skew_s`" in text
        assert f"{settings.max_record_age_s} s; setting `max_record_age_s`" in text
        assert f"({settings.retention_s // 86_400} days by default)" in text


class TestFamilies:
    """The *Message families* section names every field and enum symbol of every schema, and
    the v1.3 rules are stated with the code's names and numbers."""

    @staticmethod
    def section(title: str) -> str:
        text = doc_text()
        assert f"\n## {title}" in text, f"no section {title!r}"
        return text.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]

    @staticmethod
    def records() -> dict[str, dict[str, Any]]:
        """Every record of every current schema (nested ones included), by name."""
        out: dict[str, dict[str, Any]] = {}

        def walk(t: Any) -> None:
            if isinstance(t, list):
                for branch in t:
                    walk(branch)
            elif isinstance(t, dict):
                if t["type"] == "record":
                    out[t["name"]] = t
                    for f in t["fields"]:
                        walk(f["type"])
                elif t["type"] == "array":
                    walk(t["items"])

        for path in sorted(SCHEMA_DIR.glob("*.avsc")):
            walk(json.loads(path.read_text(encoding="utf-8")))
        return out

    def test_every_family_and_field_is_described(self) -> None:
        families = self.section("Message families")
        for name in MESSAGE_TYPES:
            assert f"**{name.__name__}**" in families, name.__name__
        missing = [
            f"{record}.{f['name']}"
            for record, schema in self.records().items()
            for f in schema["fields"]
            if f"`{f['name']}`" not in families
        ]
        assert missing == []

    def test_every_enum_symbol_is_described(self) -> None:
        """Every symbol but the reserved default (said once for all enums) is listed; the
        error codes have their own table (TestNames)."""
        families = self.section("Message families")
        assert "symbol `UNKNOWN`, its default, never written" in families
        enums: dict[str, list[str]] = {}

        def walk(t: Any) -> None:
            if isinstance(t, list):
                for branch in t:
                    walk(branch)
            elif isinstance(t, dict) and t["type"] == "enum":
                enums[t["name"]] = t["symbols"]

        for schema in self.records().values():
            for f in schema["fields"]:
                walk(f["type"])
        assert {"InsuranceType", "ReversalReason", "ReversalDecision", "AckState"} <= set(enums)
        missing = [
            f"{name}.{symbol}"
            for name, symbols in enums.items()
            if name != "ErrorCode"
            for symbol in symbols
            if symbol != "UNKNOWN" and not re.search(rf"\b{symbol}\b", families)
        ]
        assert missing == []

    def test_the_enum_default_rule(self) -> None:
        text = doc_text()
        assert "`unknown_symbol`" in text
        assert "**writers never send it**" in " ".join(text.split())
        exempt = sorted(f"{owner}.{field}" for owner, field in UNKNOWN_ALLOWED)
        assert exempt == ["ErrorReport.code", "RequestAcknowledgement.state"]
        for name in exempt:
            assert f"`{name}`" in self.section("Record value")

    def test_the_reversal_rules(self) -> None:
        reversal = self.section("Reversal (v1.3)")
        assert f"**{REVERSAL_WINDOW_DAYS} days**" in reversal
        missing = [c.value for c in ReversalRefusal if f"`{c.value}`" not in reversal]
        assert missing == []
        assert "`V-<code>-<unique>`" in reversal
        assert ISSUED_ID[ReversalRequest] == ("reversal_id", "V")
        assert FAMILY_OF[ReversalRequest] == constants.FAMILY_CLAIM
        assert FAMILY_OF[ReversalResult] == constants.FAMILY_REPLY
        topics = self.section("Topics")
        claim_row = next(r for r in topics.splitlines() if r.startswith("| `xsettle.claim.<P>`"))
        reply_row = next(r for r in topics.splitlines() if r.startswith("| `xsettle.reply.<P>`"))
        assert "`ReversalRequest`" in claim_row
        assert "`ReversalResult`" in reply_row

    def test_the_schema_gate_is_documented(self) -> None:
        gate = self.section("Schema evolution and the gate (v1.3)")
        assert "xsettle schemas check --schemas DIR --history DIR" in gate
        assert "FULL_TRANSITIVE" in gate
        assert "`avro.compatibility`" in gate
