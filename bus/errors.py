"""One base error for the bus, classified by attributes, and its mapping to ErrorReport codes.

Retry code asks ``err.retriable``; it never keeps lists of classes. Third-party errors are
translated at their boundary (codec for fastavro, transport for aiokafka) and raised ``from``
the original.
"""

from __future__ import annotations

from typing import ClassVar

from bus.models import ErrorCode


class BusError(Exception):
    """Base of every error the bus raises."""

    retriable: ClassVar[bool] = False
    """True when doing the same thing again may succeed."""
    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR
    """The ErrorReport code this error becomes when it crosses the bus."""


class DecodeError(BusError):
    """A record value or its headers cannot be turned into a message.

    ``kind`` says which: ``bad_marker``, ``unknown_fingerprint``, ``truncated``,
    ``malformed``, ``missing_header``, ``header_mismatch``, ``wrong_type``,
    ``unknown_symbol`` (an enum read as UNKNOWN where the contract needs a known value).
    """

    code = ErrorCode.INVALID_MESSAGE

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class SchemaError(BusError):
    """A schema file is invalid, or two files claim the same fingerprint or name."""


class EncodeError(BusError):
    """A message does not fit its schema (a bug in the sender, never sent)."""


class TransportError(BusError):
    """The Kafka client failed in a way that may pass (broker unreachable, leader moving)."""

    retriable = True


class TransportFatalError(TransportError):
    """The Kafka client failed in a way that will not pass by retrying (bad configuration)."""

    retriable = False


class BrokerError(BusError):
    """The embedded broker could not be started or did not answer."""


class RoutingError(BusError):
    """A message cannot be addressed: bad province code, or no handler for its type."""


class Rejection(BusError):
    """A handler's business refusal of a request: answered with an ErrorReport of ``code``.

    Not retriable unless the handler says so (a filing may arrive later, say).
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retriable: bool = False,
        details: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code.value}: {message}")
        self.reject_code = code
        self.text = message
        self.is_retriable = retriable
        self.details = details or {}


class TransientError(BusError):
    """A handler failed in a way that may pass (a back-office timeout): retried with backoff."""

    retriable = True


class DeadlineExceeded(BusError):
    """No answer arrived before the request's ``xs-deadline``."""

    code = ErrorCode.DEADLINE_EXCEEDED
    retriable = True


class StoreError(BusError):
    """The durable store failed."""

    retriable = True
