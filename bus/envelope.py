"""The envelope: the contract's record headers as a frozen value, built and checked in one place.

Headers must agree with the payload: ``xs-message-type`` names the decoded record,
``xs-target`` is the province whose inbox the record is in, and a request's source and target
are the provinces of its payload's regions (:data:`ROUTES`). Requests carry ``xs-reply-to`` and
``xs-deadline``. A contradiction is a :class:`DecodeError`, which the runtime turns into a
dead letter and an ``INVALID_MESSAGE`` report.
"""

from __future__ import annotations

import contextlib
import functools
import time
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

from pydantic import BaseModel

from bus.constants import (
    FAMILY_CLAIM,
    FAMILY_ERROR,
    FAMILY_FILING,
    FAMILY_REPLY,
    FAMILY_SETTLEMENT,
    H_ATTEMPT,
    H_CORRELATION_ID,
    H_DEADLINE,
    H_MESSAGE_ID,
    H_MESSAGE_TYPE,
    H_REPLY_TO,
    H_SENT_AT,
    H_SOURCE,
    H_TARGET,
    H_TRACEPARENT,
    PROVINCE_RE,
    REGION_RE,
    TOPIC_RE,
    province_of,
)
from bus.constants import topic as topic_name
from bus.errors import DecodeError
from bus.models import (
    ClaimPackage,
    ClearingResponse,
    ClearingStatement,
    ErrorReport,
    FilingReceipt,
    FilingUpload,
    Message,
    ReconciliationResult,
    ReconciliationStatement,
    RequestAcknowledgement,
    ReversalRequest,
    ReversalResult,
    ReviewResult,
    SettlementNotice,
)
from bus.transport import Headers

FAMILY_OF: dict[type[Message], str] = {
    FilingUpload: FAMILY_FILING,
    ClaimPackage: FAMILY_CLAIM,
    SettlementNotice: FAMILY_SETTLEMENT,
    FilingReceipt: FAMILY_REPLY,
    ReviewResult: FAMILY_REPLY,
    ErrorReport: FAMILY_ERROR,
    RequestAcknowledgement: FAMILY_REPLY,
    ReversalRequest: FAMILY_CLAIM,
    ReversalResult: FAMILY_REPLY,
    ReconciliationStatement: FAMILY_SETTLEMENT,
    ReconciliationResult: FAMILY_REPLY,
    ClearingStatement: FAMILY_SETTLEMENT,
    ClearingResponse: FAMILY_REPLY,
}
"""The topic family each message type travels on (a reversal goes where its claim went, keyed
by the same person: it cannot overtake the claim; a day's statement goes where the day's
settlement notices went, and so does a month's clearing statement)."""

REQUESTS: frozenset[type[Message]] = frozenset(
    {FilingUpload, ClaimPackage, ReversalRequest, ReconciliationStatement, ClearingStatement}
)
"""Message types that are requests and get exactly one terminal answer."""

REPLY_OF: dict[type[Message], type[Message]] = {
    FilingUpload: FilingReceipt,
    ClaimPackage: ReviewResult,
    ReversalRequest: ReversalResult,
    ReconciliationStatement: ReconciliationResult,
    ClearingStatement: ClearingResponse,
}
"""The reply type that answers each request type (else an ErrorReport)."""

SUBJECT_OF: dict[type[Message], str] = {
    FilingUpload: "filing_id",
    FilingReceipt: "filing_id",
    ClaimPackage: "claim_id",
    ReviewResult: "claim_id",
    SettlementNotice: "claim_id",
    RequestAcknowledgement: "subject_id",
    ReversalRequest: "reversal_id",
    ReversalResult: "reversal_id",
    ReconciliationStatement: "statement_id",
    ReconciliationResult: "statement_id",
    ClearingStatement: "statement_id",
    ClearingResponse: "statement_id",
}
"""The payload field naming what a message is about: a reply must name the same one as its
request."""

ISSUED_ID: dict[type[Message], tuple[str, str]] = {
    FilingUpload: ("filing_id", "F"),
    ClaimPackage: ("claim_id", "C"),
    ReversalRequest: ("reversal_id", "V"),
    ReconciliationStatement: ("statement_id", "S"),
    ClearingStatement: ("statement_id", "S"),
}
"""Requests whose id names who issued it: ``<letter>-<code>-<rest>`` where ``<code>`` is the
sending province or one of its regions (``C-460000-H46010001-…``, ``F-130100-…``), so no
province can take another's claim or filing id."""

ROUTES: dict[type[Message], tuple[str, str]] = {
    FilingUpload: ("home_region", "host_region"),
    ClaimPackage: ("host_region", "home_region"),
    ReversalRequest: ("host_region", "home_region"),
    ReconciliationStatement: ("host", "home"),
    ClearingStatement: ("host", "home"),
}
"""Payload fields whose provinces must equal (``xs-source``, ``xs-target``) (a province code
is its own province)."""


def _statement_key(message: Message) -> str:
    assert isinstance(message, ReconciliationStatement)
    return f"{message.host}:{message.day.isoformat()}"


def _clearing_key(message: Message) -> str:
    assert isinstance(message, ClearingStatement)
    return f"{message.host}:{message.month}"


KEY_OF: dict[type[Message], Callable[[Message], str]] = {
    ReconciliationStatement: _statement_key,
    ClearingStatement: _clearing_key,
}
"""Families keyed otherwise than by person id (a day's or a month's statement of a province
pair)."""


def now_ms() -> int:
    """Epoch milliseconds now."""
    return time.time_ns() // 1_000_000


def new_id() -> str:
    """A fresh message id (UUID text)."""
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class Envelope:
    """The contract headers of one message."""

    message_id: str
    """``xs-message-id``: unique per message, kept by re-sends."""
    message_type: str
    """``xs-message-type``: full Avro name of the payload."""
    source: str
    """``xs-source``: sending province."""
    target: str
    """``xs-target``: receiving province."""
    sent_at_ms: int
    """``xs-sent-at``: epoch milliseconds of this send."""
    attempt: int = 1
    """``xs-attempt``: 1, then +1 per re-send."""
    reply_to: str | None = None
    """``xs-reply-to`` (requests): topic of the answer."""
    deadline_ms: int | None = None
    """``xs-deadline`` (requests): epoch milliseconds by which an answer is due."""
    correlation_id: str | None = None
    """``xs-correlation-id`` (replies, error reports): the message answered."""
    traceparent: str | None = None
    """W3C trace context, passed through."""

    def to_headers(self) -> Headers:
        """The envelope as Kafka headers, in the contract's order."""
        pairs = [
            (H_MESSAGE_ID, self.message_id.encode()),
            (H_MESSAGE_TYPE, self.message_type.encode()),
            (H_SOURCE, self.source.encode()),
            (H_TARGET, self.target.encode()),
            (H_SENT_AT, str(self.sent_at_ms).encode()),
        ]
        if self.reply_to is not None:
            pairs.append((H_REPLY_TO, self.reply_to.encode()))
        if self.deadline_ms is not None:
            pairs.append((H_DEADLINE, str(self.deadline_ms).encode()))
        if self.correlation_id is not None:
            pairs.append((H_CORRELATION_ID, self.correlation_id.encode()))
        pairs.append((H_ATTEMPT, str(self.attempt).encode()))
        if self.traceparent is not None:
            pairs.append((H_TRACEPARENT, self.traceparent.encode()))
        return tuple(pairs)

    def resent(self) -> Envelope:
        """The same message sent again: same id, attempt + 1, new sent-at."""
        return replace(self, attempt=self.attempt + 1, sent_at_ms=now_ms())

    @classmethod
    def from_headers(cls, headers: Headers) -> Envelope:
        """Parse headers; :class:`DecodeError` ``undecodable_header``, ``missing_header`` or
        ``header_mismatch``."""
        try:
            h = {k: v.decode() for k, v in headers}
        except UnicodeDecodeError:
            h = strict_headers(headers)  # raises, naming the header
        missing = [
            n for n in (H_MESSAGE_ID, H_MESSAGE_TYPE, H_SOURCE, H_TARGET, H_SENT_AT) if n not in h
        ]
        if missing:
            raise DecodeError("missing_header", f"missing {', '.join(missing)}")
        try:
            return cls(
                message_id=h[H_MESSAGE_ID],
                message_type=h[H_MESSAGE_TYPE],
                source=h[H_SOURCE],
                target=h[H_TARGET],
                sent_at_ms=int(h[H_SENT_AT]),
                attempt=int(h.get(H_ATTEMPT, "1")),
                reply_to=h.get(H_REPLY_TO),
                deadline_ms=int(h[H_DEADLINE]) if H_DEADLINE in h else None,
                correlation_id=h.get(H_CORRELATION_ID),
                traceparent=h.get(H_TRACEPARENT),
            )
        except ValueError as exc:
            raise DecodeError("header_mismatch", f"a numeric header is no number: {exc}") from exc


def header_dict(headers: Headers) -> dict[str, str]:
    """Headers as a dict of text for display (last one wins; undecodable bytes replaced)."""
    return {k: v.decode("utf-8", errors="replace") for k, v in headers}


def strict_headers(headers: Headers) -> dict[str, str]:
    """Headers as a dict of text; a value that is not UTF-8 is a :class:`DecodeError`
    (``undecodable_header``), never silently mangled into an id."""
    out: dict[str, str] = {}
    for k, v in headers:
        try:
            out[k] = v.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("undecodable_header", f"header {k!r} is not UTF-8") from exc
    return out


def text_headers(headers: Headers) -> dict[str, str]:
    """The headers whose values are UTF-8 text; others left out (for diagnostics)."""
    try:
        return {k: v.decode() for k, v in headers}
    except UnicodeDecodeError:
        pass  # rare: one by one, leaving out what does not decode
    out: dict[str, str] = {}
    for k, v in headers:
        with contextlib.suppress(UnicodeDecodeError):
            out[k] = v.decode("utf-8")
    return out


def sender_of(headers: Headers) -> str | None:
    """The ``xs-source`` province when it is a valid province code, else None."""
    source = None
    for k, v in reversed(headers):  # the last one that is text, as text_headers keeps it
        if k == H_SOURCE:
            with contextlib.suppress(UnicodeDecodeError):
                source = v.decode()
                break
    return source if source is not None and PROVINCE_RE.match(source) else None


def check(envelope: Envelope, message: Message, topic: str) -> None:
    """Check that headers, topic and payload agree (the contract's header rules)."""
    if envelope.message_type != message.avro_name:
        raise DecodeError(
            "header_mismatch",
            f"xs-message-type {envelope.message_type} but the payload is {message.avro_name}",
        )
    parsed = TOPIC_RE.match(topic)
    family = FAMILY_OF.get(type(message))
    if parsed is not None:
        if parsed.group(1) != family:
            raise DecodeError(
                "wrong_type", f"{message.avro_name} does not travel on {parsed.group(1)} topics"
            )
        if envelope.target != parsed.group(2):
            raise DecodeError(
                "header_mismatch",
                f"xs-target {envelope.target} but the record is in {topic}",
            )
    for name, value in (("xs-source", envelope.source), ("xs-target", envelope.target)):
        if not PROVINCE_RE.match(value):
            raise DecodeError("header_mismatch", f"{name} {value!r} is not a province code")
    if envelope.attempt < 1:
        raise DecodeError("header_mismatch", f"xs-attempt {envelope.attempt} is below 1")
    route = ROUTES.get(type(message))
    if route is not None:
        if envelope.reply_to is None or envelope.deadline_ms is None:
            raise DecodeError("missing_header", "a request needs xs-reply-to and xs-deadline")
        own = topic_name(FAMILY_REPLY, envelope.source)
        if envelope.reply_to != own:
            raise DecodeError(
                "header_mismatch",
                f"xs-reply-to {envelope.reply_to} is not {own}: answers go only to the "
                "sender's own reply topic",
            )
        field, letter = ISSUED_ID[type(message)]
        issued = str(getattr(message, field))
        parts = issued.split("-", 2)
        if not (
            len(parts) == 3
            and parts[0] == letter
            and REGION_RE.match(parts[1]) is not None
            and province_of(parts[1]) == envelope.source
            and parts[2]
        ):
            raise DecodeError(
                "header_mismatch",
                f"{field} {issued!r} is not one {envelope.source} may issue: it must be "
                f"{letter}-<{envelope.source} or one of its regions>-<unique part>",
            )
        src = province_of(str(getattr(message, route[0])))
        dst = province_of(str(getattr(message, route[1])))
        if (src, dst) != (envelope.source, envelope.target):
            raise DecodeError(
                "header_mismatch",
                f"headers say {envelope.source}->{envelope.target}, "
                f"the {message.avro_name} says {src}->{dst}",
            )
    elif (
        type(message)
        in (
            FilingReceipt,
            ReviewResult,
            RequestAcknowledgement,
            ReversalResult,
            ReconciliationResult,
            ClearingResponse,
        )
        and envelope.correlation_id is None
    ):
        raise DecodeError("missing_header", "a reply needs xs-correlation-id")
    unknown = unknown_symbols(message)
    if unknown:
        raise DecodeError(
            "unknown_symbol",
            f"{', '.join(unknown)}: a symbol this reader does not know (read as UNKNOWN, the "
            "enum's default): the sender writes a newer contract than this province reads",
        )


UNKNOWN_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {("ErrorReport", "code"), ("RequestAcknowledgement", "state")}
)
"""Enum fields where UNKNOWN is a value like the others (a code or a state added later is
still an error report, still an acknowledgement); everywhere else a record cannot be acted on
with a value its reader does not know."""


def _may_hold_symbols(annotation: object) -> bool:
    """Whether a field of this type can hold an enum symbol (itself, in a record or array)."""
    if isinstance(annotation, type) and issubclass(annotation, StrEnum | BaseModel):
        return True
    return any(_may_hold_symbols(arg) for arg in typing.get_args(annotation))


@functools.cache
def _symbol_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The fields of ``model`` that :func:`unknown_symbols` must look at (worked out once per
    model: most fields are strings and numbers)."""
    return tuple(
        name for name, info in model.model_fields.items() if _may_hold_symbols(info.annotation)
    )


def unknown_symbols(message: BaseModel, where: str = "") -> list[str]:
    """The fields of ``message`` (nested records and arrays included) that read UNKNOWN."""
    found: list[str] = []
    owner = type(message).__name__
    for name in _symbol_fields(type(message)):
        value = getattr(message, name)
        path = f"{where}{name}"
        values = value if isinstance(value, tuple | list) else (value,)
        for i, item in enumerate(values):
            at = f"{path}.{i}" if isinstance(value, tuple | list) else path
            if isinstance(item, StrEnum) and item.value == "UNKNOWN":
                if (owner, name) not in UNKNOWN_ALLOWED:
                    found.append(at)
            elif isinstance(item, BaseModel):
                found.extend(unknown_symbols(item, f"{at}."))
    return found
