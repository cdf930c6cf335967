"""The AsyncAPI document: valid against the official AsyncAPI 3.0.0 JSON Schema, in step with
the committed ``docs/asyncapi.json``, faithful to the code's topics, headers, keys and schemas,
printed by ``xsettle schemas asyncapi`` and served by the gateway at ``GET /asyncapi.json``.

The official schema is vendored (``tests/data/asyncapi-3.0.0.schema.json``, the bundled
``3.0.0-without-$id.json`` of the npm package ``@asyncapi/specs``: every ``$ref`` is local), so
validation needs no network.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from adapters.directory import SigningKeyEntry
from adapters.gateway.testing import client, gateway_config, running_gateway
from bus import constants
from bus.broker import create_contract_topics
from bus.codec import SchemaStore
from bus.constants import DLQ_HEADER_PREFIX, FAMILY_REPLY, TOPIC_FAMILIES, topic
from bus.envelope import FAMILY_OF, KEY_OF, REPLY_OF, REQUESTS, Envelope
from bus.models import (
    MESSAGE_TYPES,
    ClearingStatement,
    FilingAction,
    FilingChannel,
    FilingReason,
    FilingUpload,
    InsuranceType,
    ReconciliationStatement,
)
from bus.settings import BusSettings
from schemas import SCHEMA_DIR
from schemas.asyncapi import (
    AVRO_FORMAT,
    KEY_ID_PATTERN,
    KEY_PATTERNS,
    contract_version,
    document,
    document_json,
)
from simulators.cli import main
from simulators.keys import demo_signer
from tests.test_joining_guide import the_record

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "asyncapi.json"
OFFICIAL = Path(__file__).resolve().parent / "data" / "asyncapi-3.0.0.schema.json"
OFFICIAL_SHA256 = "abe96881dbfaad495ccbb6bd8d3fb43ca18a13b9d7564849ccb66f39d5e5b20f"
"""The vendored file as ``@asyncapi/specs`` 6.11.1 ships it (tests/data/README.md)."""


@pytest.fixture(scope="module")
def official() -> jsonschema_rs.Validator:
    """The official AsyncAPI 3.0.0 schema (draft-07), resolving nothing over the network."""
    schema = json.loads(OFFICIAL.read_text(encoding="utf-8"))
    return jsonschema_rs.Draft7Validator(schema, offline=True)


def refs(schema: Any) -> list[str]:
    """Every ``$ref`` of a JSON Schema, leaving out its ``examples`` (which are data)."""
    if isinstance(schema, list):
        return [r for item in schema for r in refs(item)]
    if not isinstance(schema, dict):
        return []
    own = [schema["$ref"]] if isinstance(schema.get("$ref"), str) else []
    return own + [r for k, v in schema.items() if k != "examples" for r in refs(v)]


def errors(validator: jsonschema_rs.Validator, instance: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.instance_path))}: {e.message}"
        for e in validator.iter_errors(instance)
    ]


class TestOfficialSchema:
    def test_the_vendored_schema_is_the_published_file(self) -> None:
        data = OFFICIAL.read_bytes()
        assert hashlib.sha256(data).hexdigest() == OFFICIAL_SHA256
        schema = json.loads(data)
        assert schema["$schema"] == "http://json-schema.org/draft-07/schema"
        assert schema["properties"]["asyncapi"]["const"] == "3.0.0"
        assert [r for r in refs(schema) if not r.startswith("#")] == []

    def test_the_document_is_valid(self, official: jsonschema_rs.Validator) -> None:
        assert errors(official, document()) == []

    @pytest.mark.parametrize(
        ("what", "path", "mutate"),
        [
            ("no info", "info", None),
            ("no version", "info.version", None),
            ("an action AsyncAPI 3 lacks", "operations.sendClaim.action", "publish"),
            ("no such Avro type", "components.schemas.FilingUpload.schema.type", "recordz"),
            (
                "no such Kafka binding version",
                "components.messages.ClaimPackage.bindings.kafka.bindingVersion",
                "9.9.9",
            ),
            (
                "a parameter with a schema (AsyncAPI 2)",
                "channels.claim.parameters.province",
                {"schema": {"type": "string"}},
            ),
        ],
    )
    def test_validation_fails_on_a_broken_document(
        self, official: jsonschema_rs.Validator, what: str, path: str, mutate: Any
    ) -> None:
        """The validation is real: each of these breaks the document."""
        doc = document()
        *way, last = path.split(".")
        parent = doc
        for part in way:
            parent = parent[part]
        if mutate is None:
            del parent[last]
        else:
            parent[last] = mutate
        assert not official.is_valid(doc), what
        assert errors(official, doc), what


class TestInStep:
    def test_the_committed_file_is_the_generated_one(self) -> None:
        """After a change to the schemas or topic rules: ``xsettle schemas asyncapi --out
        docs/asyncapi.json``."""
        assert COMMITTED.read_text(encoding="utf-8") == document_json()

    def test_the_version_is_the_contracts(self) -> None:
        title = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8").splitlines()[0]
        found = re.match(r"# Wire contract v(\d+)\.(\d+) ", title)
        assert found is not None
        assert contract_version() == f"{found.group(1)}.{found.group(2)}.0"
        assert document()["info"]["version"] == contract_version()


class TestFaithful:
    """The document says what the code does."""

    def test_one_channel_per_topic_family_with_the_province_parameter(self) -> None:
        channels = document()["channels"]
        assert list(channels) == list(TOPIC_FAMILIES)
        for family, channel in channels.items():
            assert channel["address"] == topic(family, "{province}")
            assert set(channel["parameters"]) == {"province"}

    def test_every_message_type_is_on_its_familys_channel(self) -> None:
        doc = document()
        for model in MESSAGE_TYPES:
            family = FAMILY_OF[model]
            assert model.__name__ in doc["channels"][family]["messages"], model
            on_others = [
                f for f in TOPIC_FAMILIES if model.__name__ in doc["channels"][f]["messages"]
            ]
            assert on_others == [family]

    def test_payloads_are_the_avsc_files_with_their_fingerprints(self) -> None:
        doc = document()
        store = SchemaStore.default()
        for model in MESSAGE_TYPES:
            name = model.__name__
            payload = doc["components"]["schemas"][name]
            assert payload["schemaFormat"] == AVRO_FORMAT
            avsc = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text(encoding="utf-8"))
            assert payload["schema"] == avsc
            message = doc["components"]["messages"][name]
            assert message["x-avro-fingerprint"] == store.current(model.avro_name).fingerprint.hex()
            assert message["x-avro-fingerprint"] in message["description"]

    def test_every_contract_header_is_described(self) -> None:
        names = {
            v
            for k, v in vars(constants).items()
            if k.startswith("H_") and isinstance(v, str) and not v.startswith(DLQ_HEADER_PREFIX)
        }
        messages = document()["components"]["messages"]
        for model in MESSAGE_TYPES:
            assert set(messages[model.__name__]["headers"]["properties"]) == names
        dlq = {
            v
            for k, v in vars(constants).items()
            if k.startswith("H_DLQ_") and v.startswith(DLQ_HEADER_PREFIX)
        }
        described = set(messages["DeadLetter"]["headers"]["properties"]) | set(
            messages["DlqReplayMarker"]["headers"]["properties"]
        )
        assert dlq <= described

    def test_requests_have_their_replies(self) -> None:
        ops = document()["operations"]
        for model in REQUESTS:
            family = FAMILY_OF[model]
            for action in ("send", "receive"):
                reply = ops[f"{action}{family.capitalize()}"]["reply"]
                assert reply["channel"] == {"$ref": f"#/channels/{FAMILY_REPLY}"}
                answer = f"#/channels/{FAMILY_REPLY}/messages/{REPLY_OF[model].__name__}"
                assert {"$ref": answer} in reply["messages"]

    def test_key_id_pattern_is_the_directorys(self) -> None:
        pattern = SigningKeyEntry.model_json_schema()["properties"]["key_id"]["pattern"]
        assert pattern == KEY_ID_PATTERN

    def test_statement_keys_match_their_patterns(self) -> None:
        assert set(KEY_PATTERNS) == set(KEY_OF)
        some_day: dict[str, Any] = {"host": "460000", "day": dt.date(2026, 5, 17)}
        some_month: dict[str, Any] = {"host": "460000", "month": "2026-05"}
        day = ReconciliationStatement.model_construct(**some_day)
        month = ClearingStatement.model_construct(**some_month)
        for message in (day, month):
            pattern = KEY_PATTERNS[type(message)][0]
            assert re.match(pattern, KEY_OF[type(message)](message))
        keys = document()["components"]["messages"]
        assert (
            keys["ReconciliationStatement"]["bindings"]["kafka"]["key"]["pattern"]
            == (KEY_PATTERNS[ReconciliationStatement][0])
        )


def _as_object(headers: Any) -> dict[str, str]:
    return {name: value.decode("utf-8") for name, value in headers}


class TestRealHeaders:
    """Headers the code writes fit the headers schema of their message; missing ones do not."""

    @staticmethod
    def validator(name: str) -> jsonschema_rs.Validator:
        schema = document()["components"]["messages"][name]["headers"]
        return jsonschema_rs.Draft7Validator(schema, offline=True)

    def test_a_signed_report(self) -> None:
        _, _, headers, _ = the_record()
        assert errors(self.validator("ErrorReport"), _as_object(headers)) == []
        assert not self.validator("FilingReceipt").is_valid(_as_object(headers))

    def test_a_signed_request(self) -> None:
        upload = FilingUpload(
            filing_id="F-130100-1",
            action=FilingAction.CREATE,
            person_id="130102195001011234",
            person_name="张三",
            insurance_type=InsuranceType.EMPLOYEE,
            home_region="130100",
            host_region="460100",
            reason=FilingReason.RELOCATED_RETIREE,
            channel=FilingChannel.COUNTER,
            valid_from=dt.date(2026, 1, 1),
            filed_at=dt.datetime(2026, 5, 17, tzinfo=dt.UTC),
        )
        env = Envelope(
            message_id="6f9d2a4e-3b1c-4e8f-9a7d-2c5b8e1f4a63",
            message_type=upload.avro_name,
            source="130000",
            target="460000",
            sent_at_ms=1_779_010_213_000,
            reply_to=topic(FAMILY_REPLY, "130000"),
            deadline_ms=1_779_010_273_000,
        )
        headers = _as_object(demo_signer("130000").sign(env.to_headers(), b"k", b"v"))
        check = self.validator("FilingUpload")
        assert errors(check, headers) == []
        for name in ("xs-reply-to", "xs-deadline", "xs-signature"):
            assert not check.is_valid({k: v for k, v in headers.items() if k != name}), name
        assert not check.is_valid({**headers, "xs-reply-to": "xsettle.reply.460000x"})


class TestCommandLine:
    def test_prints_the_document(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["schemas", "asyncapi"]) == 0
        assert capsys.readouterr().out == document_json()

    def test_writes_it_to_a_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        out = tmp_path / "asyncapi.json"
        assert main(["schemas", "asyncapi", "--out", str(out)]) == 0
        assert out.read_text(encoding="utf-8") == document_json()
        assert capsys.readouterr().err.startswith(f"wrote {out} (")

    def test_a_missing_folder_is_a_usage_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        out = tmp_path / "nowhere" / "asyncapi.json"
        assert main(["schemas", "asyncapi", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "does not exist; create it" in err


@pytest.mark.broker
async def test_the_gateway_serves_it_publicly(
    broker: str, settings: BusSettings, tmp_path: Path
) -> None:
    """No token needed; a wrong token is refused like on every public query."""
    await create_contract_topics(settings, broker, ["460000"])
    config = gateway_config("460000", broker, tmp_path / "gw", settings=settings)
    async with running_gateway(config) as gw, client(gw) as http:
        got = await http.get("/asyncapi.json")
        assert got.status_code == 200
        assert got.headers["content-type"].startswith("application/json")
        assert got.json() == document()
        refused = await http.get("/asyncapi.json", headers={"Authorization": "Bearer not-a-token"})
        assert refused.status_code == 401
        async with client(gw, "ops") as ops:
            assert (await ops.get("/asyncapi.json")).status_code == 200
