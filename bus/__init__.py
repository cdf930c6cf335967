"""xsettle's bus: the wire contract in code, knowing nothing about medical rules.

A province integrator needs only the names below; everything else is implementation.
"""

# Clients
from bus.broker import EmbeddedBroker, create_contract_topics, running_broker

# Types
from bus.codec import Codec, SchemaStore
from bus.envelope import Envelope

# Errors
from bus.errors import (
    BusError,
    DeadlineExceeded,
    DecodeError,
    Rejection,
    TransientError,
    TransportError,
)
from bus.models import (
    ClaimItem,
    ClaimPackage,
    ErrorCode,
    ErrorReport,
    FilingReceipt,
    FilingUpload,
    ReviewResult,
    SettlementNotice,
)
from bus.node import DEFER, Answer, Context, Deferred, Node
from bus.settings import BusSettings
from bus.store import Obligation, SqlStore, Store

__all__ = [
    # Clients
    "EmbeddedBroker",
    "create_contract_topics",
    "running_broker",
    "Node",
    "Context",
    "Answer",
    "DEFER",
    "Deferred",
    # Errors
    "BusError",
    "DecodeError",
    "Rejection",
    "TransientError",
    "TransportError",
    "DeadlineExceeded",
    # Types
    "BusSettings",
    "Codec",
    "SchemaStore",
    "Envelope",
    "Store",
    "SqlStore",
    "Obligation",
    "ClaimItem",
    "ClaimPackage",
    "ErrorCode",
    "ErrorReport",
    "FilingReceipt",
    "FilingUpload",
    "ReviewResult",
    "SettlementNotice",
]
