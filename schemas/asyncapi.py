"""The wire contract as an AsyncAPI 3.0.0 document, generated from the code that implements it.

The document is built, never written by hand, from:

- the Avro schemas in this folder, embedded as message payloads (schema format
  :data:`AVRO_FORMAT`), each message with the fingerprint its records carry;
- the topic rules of :mod:`bus.constants` and :mod:`bus.envelope`: one channel per topic family
  with the province code as the parameter ``{province}`` (``xsettle.claim.{province}``), the
  families each message type travels on, which types are requests and which reply answers
  them;
- the record headers (:mod:`bus.constants`, :mod:`bus.signing`) as each message's headers
  schema, and the record key as its Kafka message binding;
- the contract version, :data:`schemas.CONTRACT_VERSION` (``1.3`` is ``1.3.0``).

Operations are described from one province's point of view: it *receives* on its own five
inboxes and *sends* to other provinces' inboxes, its own error topic and its dead-letter topic.
``docs/asyncapi.json`` is this document, committed; a test keeps the two in step, another
validates it against the official AsyncAPI 3.0.0 JSON Schema. ``xsettle schemas asyncapi``
prints it, and every gateway serves it at ``GET /asyncapi.json``. ``docs/contract.md`` stays
the contract that counts: this document describes it in a form tools read.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Final

from bus.codec import fingerprint
from bus.constants import (
    DLQ_CONTENT_COPY,
    DLQ_CONTENT_DIGEST,
    DLQ_CONTENT_UNREADABLE,
    FAMILY_CLAIM,
    FAMILY_DLQ,
    FAMILY_ERROR,
    FAMILY_FILING,
    FAMILY_REPLY,
    FAMILY_SETTLEMENT,
    H_ATTEMPT,
    H_CORRELATION_ID,
    H_DEADLINE,
    H_DLQ_CONTENT,
    H_DLQ_DETECTED_AT,
    H_DLQ_ERROR,
    H_DLQ_ERROR_KIND,
    H_DLQ_GROUP,
    H_DLQ_OFFSET,
    H_DLQ_ORIGINAL_SHA256,
    H_DLQ_ORIGINAL_SIZE,
    H_DLQ_PARTITION,
    H_DLQ_REPLAY_OF,
    H_DLQ_REPLAYED_AT,
    H_DLQ_TIMESTAMP,
    H_DLQ_TOPIC,
    H_KEY_ID,
    H_MESSAGE_ID,
    H_MESSAGE_TYPE,
    H_REPLY_TO,
    H_SENT_AT,
    H_SIGNATURE,
    H_SIGNATURE_ALG,
    H_SOURCE,
    H_TARGET,
    H_TRACEPARENT,
    INBOX_FAMILIES,
    PROVINCE_RE,
    TOPIC_FAMILIES,
    TOPIC_PREFIX,
)
from bus.envelope import FAMILY_OF, REPLY_OF, REQUESTS
from bus.models import (
    MESSAGE_TYPES,
    ClearingStatement,
    ErrorReport,
    Message,
    ReconciliationStatement,
    RequestAcknowledgement,
)
from bus.signing import ALGORITHMS, SIGNED_HEADERS
from schemas import CONTRACT_VERSION, SCHEMA_DIR

ASYNCAPI_VERSION: Final = "3.0.0"
"""The AsyncAPI specification version the document follows."""

AVRO_FORMAT: Final = "application/vnd.apache.avro+json;version=1.9.0"
"""Schema format of the payloads: the ``.avsc`` files as they are (Avro 1.9 and later)."""

CONTENT_TYPE: Final = "application/octet-stream"
"""A record value's content type: bytes in Avro single-object encoding (no registered media
type names that encoding; the Kafka binding and the descriptions say what the bytes are)."""

KAFKA_BINDING_VERSION: Final = "0.5.0"
"""The newest Kafka bindings version the AsyncAPI 3.0.0 schema knows."""

SINGLE_OBJECT_ENCODING: Final = (
    "avro-single-object: C3 01, then the 8-byte CRC-64-AVRO fingerprint of the writer schema's "
    "Parsing Canonical Form (little-endian), then the Avro binary body"
)
"""The Kafka binding's ``schemaIdPayloadEncoding``: where the schema id sits in the value."""

KEY_ID_PATTERN: Final = r"^[A-Za-z0-9._:-]{1,64}$"
"""An ``xs-key-id`` as the directory allows it (a test checks it is the directory's)."""

KEY_PATTERNS: Final[dict[type[Message], tuple[str, str]]] = {
    ReconciliationStatement: (
        r"^[0-9]{2}0000:[0-9]{4}-[0-9]{2}-[0-9]{2}$",
        "`<host>:<day>`: the host's province code, a colon, the day as YYYY-MM-DD",
    ),
    ClearingStatement: (
        r"^[0-9]{2}0000:[0-9]{4}-[0-9]{2}$",
        "`<host>:<month>`: the host's province code, a colon, the month as YYYY-MM",
    ),
}
"""Record keys of the families keyed otherwise than by person id (:data:`bus.envelope.KEY_OF`;
a test checks both name the same families)."""

DIGITS: Final = r"^[0-9]+$"
"""A decimal number header (epoch milliseconds, partition, offset)."""

UUID_TEXT: Final = {"type": "string", "format": "uuid"}
"""A message id: UUID text."""

HEADER_SCHEMAS: Final[dict[str, dict[str, Any]]] = {
    H_MESSAGE_ID: {
        **UUID_TEXT,
        "description": "Unique id of this message (UUID text); a re-send keeps it. Receivers "
        "deduplicate by it.",
    },
    H_MESSAGE_TYPE: {
        "type": "string",
        "pattern": r"^xsettle\.v1\.[A-Za-z]+$",
        "description": "Full Avro name of the payload, e.g. xsettle.v1.ClaimPackage.",
    },
    H_SOURCE: {
        "type": "string",
        "pattern": PROVINCE_RE.pattern,
        "description": "The sending province's code.",
    },
    H_TARGET: {
        "type": "string",
        "pattern": PROVINCE_RE.pattern,
        "description": "The receiving province's code: the province whose topic the record is in.",
    },
    H_SENT_AT: {
        "type": "string",
        "pattern": DIGITS,
        "description": "Epoch milliseconds of this send, stamped as the record leaves (a "
        "re-send gets a new one, and so a new signature).",
    },
    H_REPLY_TO: {
        "type": "string",
        "pattern": rf"^{TOPIC_PREFIX}\.{FAMILY_REPLY}\.[0-9]{{2}}0000$",
        "description": "Requests: the topic of the answer, exactly "
        f"{TOPIC_PREFIX}.{FAMILY_REPLY}.<xs-source>.",
    },
    H_DEADLINE: {
        "type": "string",
        "pattern": DIGITS,
        "description": "Requests: epoch milliseconds by which an answer is due.",
    },
    H_CORRELATION_ID: {
        **UUID_TEXT,
        "description": "Replies and error reports: the xs-message-id of the message answered.",
    },
    H_ATTEMPT: {
        "type": "string",
        "pattern": r"^[1-9][0-9]*$",
        "description": "1 for the first send, + 1 for each re-send of the same message; absent "
        "means 1.",
    },
    H_SIGNATURE_ALG: {
        "type": "string",
        "enum": sorted(ALGORITHMS),
        "description": "The signature algorithm.",
    },
    H_KEY_ID: {
        "type": "string",
        "pattern": KEY_ID_PATTERN,
        "description": "The id under which the directory publishes the sender's public key.",
    },
    H_SIGNATURE: {
        "type": "string",
        "contentEncoding": "base64",
        "pattern": r"^[A-Za-z0-9+/]{86}==$",
        "description": "Ed25519 signature (64 bytes, RFC 8032, no pre-hash) over the record's "
        "canonical form (contract section Signatures), base64 with padding. Not itself signed.",
    },
    H_TRACEPARENT: {
        "type": "string",
        "pattern": r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        "description": "Optional W3C trace context; not signed, for tracing only.",
    },
}
"""The contract's record headers: every value is UTF-8 text on the wire."""

ALWAYS: Final = (
    H_MESSAGE_ID,
    H_MESSAGE_TYPE,
    H_SOURCE,
    H_TARGET,
    H_SENT_AT,
    H_SIGNATURE_ALG,
    H_KEY_ID,
    H_SIGNATURE,
)
"""Headers every record carries: a record missing one is refused (``missing_header``, or
``unsigned`` and the other signature checks)."""

DLQ_HEADER_SCHEMAS: Final[dict[str, dict[str, Any]]] = {
    H_DLQ_TOPIC: {"type": "string", "description": "Topic the refused original was read from."},
    H_DLQ_PARTITION: {"type": "string", "pattern": DIGITS, "description": "Its partition."},
    H_DLQ_OFFSET: {"type": "string", "pattern": DIGITS, "description": "Its offset."},
    H_DLQ_TIMESTAMP: {
        "type": "string",
        "pattern": r"^-?[0-9]+$",
        "description": "Its Kafka timestamp (epoch milliseconds).",
    },
    H_DLQ_ERROR_KIND: {
        "type": "string",
        "description": "Why it was refused: a refusal kind of the contract's section Checking "
        "a received record.",
    },
    H_DLQ_ERROR: {"type": "string", "description": "Diagnostic text, at most 500 characters."},
    H_DLQ_GROUP: {
        "type": "string",
        "description": "The consumer group that refused it (xsettle-<P>).",
    },
    H_DLQ_DETECTED_AT: {
        "type": "string",
        "pattern": DIGITS,
        "description": "Epoch milliseconds of the refusal.",
    },
    H_DLQ_CONTENT: {
        "type": "string",
        "enum": [DLQ_CONTENT_COPY, DLQ_CONTENT_DIGEST, DLQ_CONTENT_UNREADABLE],
        "description": "copy: the original in full; digest: it was over 1 MiB, value left out; "
        "unreadable: the client could not parse it, coordinates only. Absent means copy.",
    },
    H_DLQ_ORIGINAL_SIZE: {
        "type": "string",
        "pattern": DIGITS,
        "description": "On a digest: the original's size in bytes.",
    },
    H_DLQ_ORIGINAL_SHA256: {
        "type": "string",
        "pattern": r"^[0-9a-f]{64}$",
        "description": "On a digest: the hex SHA-256 of the original's value.",
    },
}
"""Diagnostic headers a dead letter adds to the original's (which it keeps byte for byte)."""

REPLAY_HEADER_SCHEMAS: Final[dict[str, dict[str, Any]]] = {
    H_DLQ_REPLAY_OF: {
        "type": "string",
        "pattern": r"^.+:[0-9]+:[0-9]+$",
        "description": "topic:partition:offset of the dead letter whose original an operator "
        "wrote back to its topic.",
    },
    H_DLQ_REPLAYED_AT: {
        "type": "string",
        "pattern": DIGITS,
        "description": "Epoch milliseconds of the replay.",
    },
}
"""Headers of a replay marker (an empty record on the dead-letter topic)."""

FAMILY_TEXT: Final[dict[str, str]] = {
    FAMILY_FILING: "Filing requests to host province {province} (from the homes).",
    FAMILY_CLAIM: "Claim and reversal requests to home province {province} (from the hosts); "
    "a reversal travels under the same key as the claim it cancels, so it cannot overtake it.",
    FAMILY_SETTLEMENT: "Settlement notices and the daily and monthly statements to home province "
    "{province} (from the hosts).",
    FAMILY_REPLY: "Every reply to a request {province} sent, and the non-terminal "
    "acknowledgements (from whoever answers).",
    FAMILY_ERROR: "Error reports addressed to {province} (it sent a faulty message, or it must "
    "act), and its own copies for its ops. With xs-correlation-id an error report is the "
    "terminal answer to that request.",
    FAMILY_DLQ: "Records {province} refused, copied with their original key, value and headers "
    "byte for byte plus diagnostic headers; and replay markers. Written by {province}, read by "
    "{province} and ops.",
}
"""What each topic family carries (the contract's section Topics)."""


def contract_version() -> str:
    """The contract version as AsyncAPI wants it: :data:`schemas.CONTRACT_VERSION` ``1.3`` is
    ``1.3.0``."""
    return f"{CONTRACT_VERSION}.0"


def _name(model: type[Message]) -> str:
    return model.__name__


def _load_schema(model: type[Message]) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(
        (SCHEMA_DIR / f"{_name(model)}.avsc").read_text(encoding="utf-8")
    )
    return schema


def _kind(model: type[Message]) -> str:
    """request, reply, acknowledgement, error report or notice."""
    if model in REQUESTS:
        return "request"
    if model is RequestAcknowledgement:
        return "acknowledgement"
    if FAMILY_OF[model] == FAMILY_REPLY:
        return "reply"
    if model is ErrorReport:
        return "error report"
    return "notice"


def _headers(model: type[Message]) -> dict[str, Any]:
    """The headers schema of one message type: xs-message-type is its name."""
    kind = _kind(model)
    required = list(ALWAYS)
    if kind == "request":
        required += [H_REPLY_TO, H_DEADLINE]
    elif kind in ("reply", "acknowledgement"):
        required.append(H_CORRELATION_ID)
    properties = {name: dict(schema) for name, schema in HEADER_SCHEMAS.items()}
    properties[H_MESSAGE_TYPE] = {
        "type": "string",
        "const": model.avro_name,
        "description": HEADER_SCHEMAS[H_MESSAGE_TYPE]["description"],
    }
    for name, schema in properties.items():
        if name in SIGNED_HEADERS:
            schema["description"] = f"{schema['description']} Signed."
    return {
        "type": "object",
        "description": "Kafka record headers, UTF-8 text values; header names are "
        "case-sensitive. Other headers may be present: they are not signed and carry no "
        "meaning under the contract.",
        "properties": properties,
        "required": [n for n in HEADER_SCHEMAS if n in required],
        "additionalProperties": True,
    }


def _key(model: type[Message]) -> dict[str, Any]:
    """The record key of one message type (Kafka message binding ``key``)."""
    if model in KEY_PATTERNS:
        pattern, text = KEY_PATTERNS[model]
        return {"type": "string", "pattern": pattern, "description": f"UTF-8 text {text}."}
    if model is ErrorReport:
        return {
            "type": ["string", "null"],
            "description": "Keyed like the message the report is about (a person id, or a "
            "statement's key); no key when it is about no record that had one.",
        }
    if FAMILY_OF[model] == FAMILY_REPLY:
        return {
            "type": "string",
            "description": "The record key of the request answered, UTF-8 (a person id; for a "
            "statement's answer, the statement's key).",
        }
    return {
        "type": "string",
        "description": "The insured person's id (person_id), UTF-8: every record about one "
        "person lands in one partition and keeps its order.",
    }


def _message(model: type[Message]) -> dict[str, Any]:
    name = _name(model)
    schema = _load_schema(model)
    kind = _kind(model)
    doc = str(schema.get("doc", ""))
    summary = doc.split(". ", 1)[0].rstrip(".") + "."
    family = FAMILY_OF[model]
    lines = [doc, "", f"A {kind} on {TOPIC_PREFIX}.{family}.<P>."]
    if model in REPLY_OF:
        lines.append(
            f"Answered by one {_name(REPLY_OF[model])} on xs-reply-to, or by an ErrorReport "
            "with xs-correlation-id; possibly acknowledged first (RequestAcknowledgement)."
        )
    lines.append(
        f"Value: Avro single-object encoding with fingerprint {fingerprint(schema).hex()} "
        "(the 8 bytes after C3 01, as they appear on the wire)."
    )
    message: dict[str, Any] = {
        "name": name,
        "title": name,
        "summary": summary,
        "description": "\n".join(lines),
        "contentType": CONTENT_TYPE,
        "tags": [{"name": kind}],
        "headers": _headers(model),
        "payload": {"$ref": f"#/components/schemas/{name}"},
        "bindings": {
            "kafka": {
                "key": _key(model),
                "schemaIdLocation": "payload",
                "schemaIdPayloadEncoding": SINGLE_OBJECT_ENCODING,
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
        "x-avro-fingerprint": fingerprint(schema).hex(),
    }
    if kind == "request":
        message["correlationId"] = {"$ref": "#/components/correlationIds/request"}
    elif kind != "notice":
        message["correlationId"] = {"$ref": "#/components/correlationIds/answer"}
    return message


def _dead_letter_messages() -> dict[str, dict[str, Any]]:
    """The dead-letter topic's two messages: a refused record's copy, a replay marker."""
    original = dict(HEADER_SCHEMAS)
    return {
        "DeadLetter": {
            "name": "DeadLetter",
            "title": "DeadLetter",
            "summary": "A record this province refused, copied with diagnostic headers.",
            "description": "Key, value and headers of the refused original byte for byte "
            "(signature headers included, not signed again), plus the xs-dlq-* headers. The "
            "value is whatever the original held (any family, or bytes that did not decode); "
            "on a digest it is left out.",
            "contentType": CONTENT_TYPE,
            "tags": [{"name": "dead letter"}],
            "headers": {
                "type": "object",
                "properties": {**original, **DLQ_HEADER_SCHEMAS},
                "required": [H_DLQ_TOPIC, H_DLQ_PARTITION, H_DLQ_OFFSET, H_DLQ_ERROR_KIND],
                "additionalProperties": True,
            },
            "bindings": {
                "kafka": {
                    "key": {
                        "type": ["string", "null"],
                        "description": "The original's key, unchanged.",
                    },
                    "bindingVersion": KAFKA_BINDING_VERSION,
                }
            },
        },
        "DlqReplayMarker": {
            "name": "DlqReplayMarker",
            "title": "DlqReplayMarker",
            "summary": "An operator replayed a dead letter's original to its topic.",
            "description": "An empty record (no value) on the dead-letter topic. The replayed "
            "record keeps its original signature: it is accepted only while its xs-sent-at is "
            "within the receiver's maximum age, and never if that signed record was accepted "
            "before.",
            "tags": [{"name": "dead letter"}],
            "headers": {
                "type": "object",
                "properties": {
                    **REPLAY_HEADER_SCHEMAS,
                    H_DLQ_TOPIC: DLQ_HEADER_SCHEMAS[H_DLQ_TOPIC],
                },
                "required": [H_DLQ_REPLAY_OF, H_DLQ_REPLAYED_AT],
                "additionalProperties": True,
            },
        },
    }


def _family_messages() -> dict[str, list[str]]:
    """Message names by topic family, in contract order (dead letters apart)."""
    out: dict[str, list[str]] = {family: [] for family in TOPIC_FAMILIES}
    for model in MESSAGE_TYPES:
        out[FAMILY_OF[model]].append(_name(model))
    out[FAMILY_DLQ] = list(_dead_letter_messages())
    return out


def _channels() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    for family, names in _family_messages().items():
        channels[family] = {
            "address": f"{TOPIC_PREFIX}.{family}.{{province}}",
            "title": f"{TOPIC_PREFIX}.{family}.<P>",
            "description": FAMILY_TEXT[family].format(province="<P>"),
            "parameters": {"province": {"$ref": "#/components/parameters/province"}},
            "messages": {n: {"$ref": f"#/components/messages/{n}"} for n in names},
        }
    return channels


def _refs(family: str, names: list[str]) -> list[dict[str, str]]:
    return [{"$ref": f"#/channels/{family}/messages/{n}"} for n in names]


def _reply(family: str) -> dict[str, Any] | None:
    """The reply of an operation on ``family``: the answers of its requests, on xs-reply-to."""
    requests = [m for m in MESSAGE_TYPES if m in REQUESTS and FAMILY_OF[m] == family]
    if not requests:
        return None
    answers = [_name(REPLY_OF[m]) for m in requests] + [_name(RequestAcknowledgement)]
    return {
        "address": {
            "description": "The request's xs-reply-to: the requester's own reply topic. An "
            "ErrorReport with xs-correlation-id on the requester's error topic answers too.",
            "location": f"$message.header#/{H_REPLY_TO}",
        },
        "channel": {"$ref": f"#/channels/{FAMILY_REPLY}"},
        "messages": _refs(FAMILY_REPLY, answers),
    }


def _operations() -> dict[str, Any]:
    messages = _family_messages()
    group = {
        "kafka": {
            "groupId": {
                "type": "string",
                "pattern": r"^xsettle-[0-9]{2}0000",
                "description": "A consumer group whose name starts with xsettle-<P> (the ACLs "
                "grant P no other).",
            },
            "bindingVersion": KAFKA_BINDING_VERSION,
        }
    }
    ops: dict[str, Any] = {}
    for family in INBOX_FAMILIES:
        title = family.capitalize()
        own = family == FAMILY_ERROR
        send: dict[str, Any] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{family}"},
            "title": f"Send to {TOPIC_PREFIX}.{family}.<other>",
            "summary": f"Write to another province's {family} topic"
            + (" (and to one's own, for one's ops)." if own else "."),
            "description": "{province} is the receiving province (xs-target); a province never "
            "writes its own inbox"
            + (", except its own error topic (reports for its own ops)." if own else ".")
            + " Every record is signed as it leaves (xs-sent-at, then the signature).",
            "messages": _refs(family, messages[family]),
        }
        receive: dict[str, Any] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{family}"},
            "title": f"Receive on {TOPIC_PREFIX}.{family}.<self>",
            "summary": f"Read one's own {family} topic.",
            "description": "{province} is the province itself. Every record is checked before "
            "any handling (signature, then headers and payload); a refused one goes to the "
            "dead-letter topic with an error report.",
            "bindings": group,
            "messages": _refs(family, messages[family]),
        }
        reply = _reply(family)
        if reply is not None:
            send["reply"] = reply
            receive["reply"] = reply
        ops[f"send{title}"] = send
        ops[f"receive{title}"] = receive
    ops["sendDeadLetter"] = {
        "action": "send",
        "channel": {"$ref": f"#/channels/{FAMILY_DLQ}"},
        "title": f"Dead-letter to {TOPIC_PREFIX}.{FAMILY_DLQ}.<self>",
        "summary": "Copy a refused record to one's own dead-letter topic.",
        "description": "{province} is the province itself; only it writes there.",
        "messages": _refs(FAMILY_DLQ, messages[FAMILY_DLQ][:1]),
    }
    ops["receiveDeadLetter"] = {
        "action": "receive",
        "channel": {"$ref": f"#/channels/{FAMILY_DLQ}"},
        "title": f"Read {TOPIC_PREFIX}.{FAMILY_DLQ}.<self>",
        "summary": "Read one's own dead letters and replay markers (the province and ops).",
        "description": "{province} is the province itself; ops reads every province's.",
        "messages": _refs(FAMILY_DLQ, messages[FAMILY_DLQ]),
    }
    return ops


def _info() -> dict[str, Any]:
    return {
        "title": "xsettle wire contract",
        "version": contract_version(),
        "description": (
            "The Kafka bus for cross-province direct settlement of medical insurance "
            "(异地就医直接结算), as a province implementation sees it. Generated from the "
            "reference implementation (`xsettle schemas asyncapi`); `docs/contract.md` is the "
            "contract that counts, and its sections are the ones named here.\n\n"
            "Every province P has six topics: `xsettle.<family>.<P>` for the families filing, "
            "claim, settlement, reply, error and dlq. Record key: the insured person's id "
            "(UTF-8; a statement's `<host>:<day>` or `<host>:<month>`). Record value: Avro "
            "single-object encoding (`C3 01`, the 8-byte little-endian CRC-64-AVRO fingerprint "
            "of the writer schema's Parsing Canonical Form, the Avro binary body); the "
            "fingerprint names one `.avsc` of the repository's `schemas/` (or "
            "`schemas/history/`). Headers: UTF-8 text; every record is signed with Ed25519 "
            "over its canonical form (section Signatures), and a receiver checks every record "
            "before any handling (section Checking a received record)."
        ),
        "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
        "tags": [
            {"name": "request", "description": "Gets exactly one terminal answer."},
            {"name": "reply", "description": "The terminal answer to a request."},
            {"name": "acknowledgement", "description": "Non-terminal: the answer will come."},
            {"name": "notice", "description": "Expects no answer."},
            {"name": "error report", "description": "An error addressed to a province."},
            {"name": "dead letter", "description": "A refused record, or its replay marker."},
        ],
    }


def _servers() -> dict[str, Any]:
    return {
        "cluster": {
            "host": "{bootstrap}",
            "protocol": "kafka-secure",
            "title": "A real cluster",
            "description": "TLS, and SASL/SCRAM-SHA-512 with one principal per province "
            "(p<code>); the ACLs grant each province exactly what the contract's section Topics "
            "says.",
            "variables": {
                "bootstrap": {
                    "default": "kafka.example.invalid:9094",
                    "description": "The cluster's bootstrap servers, host:port.",
                }
            },
            "security": [{"$ref": "#/components/securitySchemes/scram"}],
        },
        "embedded": {
            "host": "127.0.0.1:{port}",
            "protocol": "kafka",
            "title": "The embedded broker of the simulations",
            "description": "No TLS, no ACLs: `xsettle broker` prints its bootstrap.",
            "variables": {"port": {"default": "9092", "description": "Its port."}},
        },
    }


def _components() -> dict[str, Any]:
    return {
        "schemas": {
            _name(m): {"schemaFormat": AVRO_FORMAT, "schema": _load_schema(m)}
            for m in MESSAGE_TYPES
        },
        "messages": {
            **{_name(m): _message(m) for m in MESSAGE_TYPES},
            **_dead_letter_messages(),
        },
        "parameters": {
            "province": {
                "description": "A province's 6-digit GB/T 2260 code ending in 0000 (two digits "
                "and 0000).",
                "examples": ["460000", "130000"],
            }
        },
        "correlationIds": {
            "request": {
                "description": "A request's own id: its answer names it in xs-correlation-id.",
                "location": f"$message.header#/{H_MESSAGE_ID}",
            },
            "answer": {
                "description": "The xs-message-id of the message answered.",
                "location": f"$message.header#/{H_CORRELATION_ID}",
            },
        },
        "securitySchemes": {
            "scram": {
                "type": "scramSha512",
                "description": "SASL/SCRAM-SHA-512 over TLS: each province logs in as its own "
                "principal.",
            }
        },
    }


@functools.cache
def _document_json() -> str:
    return json.dumps(_build(), ensure_ascii=False, indent=2) + "\n"


def _build() -> dict[str, Any]:
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:xsettle:wire-contract",
        "info": _info(),
        "servers": _servers(),
        "defaultContentType": CONTENT_TYPE,
        "channels": _channels(),
        "operations": _operations(),
        "components": _components(),
    }


def document() -> dict[str, Any]:
    """The AsyncAPI document (a fresh copy: callers may change it)."""
    doc: dict[str, Any] = json.loads(_document_json())
    return doc


def document_json() -> str:
    """The AsyncAPI document as the text ``docs/asyncapi.json`` holds: UTF-8 JSON, indented by
    two spaces, a newline at the end."""
    return _document_json()
