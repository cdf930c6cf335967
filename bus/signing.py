"""Signed records (contract v1.1): every record is signed by the province that sends it and
verified by the one that receives it, before any handling.

The signature covers the record's key, its value and the contract headers that carry
meaning, in a canonical byte form a Java or Go province can build from the contract document
alone (:func:`canonical`). The algorithm and the key id travel in headers that are signed
too; the directory publishes each province's public keys with validity periods
(:class:`KeyRing`), so keys rotate without downtime: a record is checked with the key it
names, which must belong to ``xs-source`` and be valid at ``xs-sent-at``.

Ed25519 is the default. Another algorithm (SM2 with SM3, as the national platform uses) is a
new name in :data:`ALGORITHMS` and keys of that algorithm in the directory: no contract break.

A record that fails is a :class:`SignatureError` (code ``SIGNATURE_INVALID``): dead-lettered,
reported to the claimed sender and to the receiver's ops, never handled.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bus.constants import (
    H_ATTEMPT,
    H_CORRELATION_ID,
    H_DEADLINE,
    H_KEY_ID,
    H_MESSAGE_ID,
    H_MESSAGE_TYPE,
    H_REPLY_TO,
    H_SENT_AT,
    H_SIGNATURE,
    H_SIGNATURE_ALG,
    H_SOURCE,
    H_TARGET,
)
from bus.errors import DecodeError
from bus.models import ErrorCode
from bus.transport import Headers

ED25519: Final = "ed25519"
"""The default algorithm: Ed25519 (RFC 8032), 32-byte public keys, 64-byte signatures."""
ALGORITHMS: Final = frozenset({ED25519})
"""Algorithms this implementation can verify."""

CANONICAL_TAG: Final = b"XSETTLE-SIG-V1\n"
"""First bytes of the canonical form (domain separation: nothing else signs these bytes)."""

SIGNED_HEADERS: Final = (
    H_MESSAGE_ID,
    H_MESSAGE_TYPE,
    H_SOURCE,
    H_TARGET,
    H_SENT_AT,
    H_REPLY_TO,
    H_DEADLINE,
    H_CORRELATION_ID,
    H_ATTEMPT,
    H_SIGNATURE_ALG,
    H_KEY_ID,
)
"""The headers the signature covers, in the order the canonical form lists them."""

SIGNATURE_HEADERS: Final = (H_SIGNATURE_ALG, H_KEY_ID, H_SIGNATURE)
"""Headers the signer writes (it replaces any it finds)."""
_SIGNATURE_NAMES: Final = frozenset(SIGNATURE_HEADERS)
""":data:`SIGNATURE_HEADERS` as a set."""
_SIGNED_OR_SIGNATURE: Final = frozenset(SIGNED_HEADERS) | _SIGNATURE_NAMES
"""The headers :func:`canonical` looks at."""

_PRESENT = struct.Struct(">BI")
"""The first five bytes of a present field of the canonical form: 0x01, then its length."""
_ABSENT: Final = b"\x00"
"""An absent field of the canonical form."""
DEMO_SEED: Final = b"xsettle demo signing key/"
"""Prefix of the seed a demo key is derived from: anyone can derive it (simulations only)."""


class SignatureError(DecodeError):
    """A record whose signature cannot be accepted. ``kind`` says why: ``unsigned``,
    ``duplicate_header``, ``unknown_algorithm``, ``malformed_signature``, ``unknown_key``,
    ``key_not_owned``, ``key_not_valid``, ``bad_signature``, ``stale``, ``future``,
    ``replayed``."""

    code = ErrorCode.SIGNATURE_INVALID


def _by_name(headers: Headers) -> dict[str, bytes]:
    """A record's headers by name, to read its signed and signature headers from; a signed
    header present twice is a :class:`SignatureError` (``duplicate_header``), a name that
    carries no meaning may repeat."""
    found = dict(headers)
    if len(found) < len(headers):  # some name repeats (rare): is it one that counts?
        seen: set[str] = set()
        for name, _ in headers:
            if name in _SIGNED_OR_SIGNATURE:
                if name in seen:
                    raise SignatureError("duplicate_header", f"header {name} appears twice")
                seen.add(name)
    return found


def _field(data: bytes | None) -> bytes:
    """One field of the canonical form: 0x00 when absent, else 0x01, 4-byte big-endian
    length, the bytes."""
    return _ABSENT if data is None else _PRESENT.pack(1, len(data)) + data


def _canonical(found: dict[str, bytes], key: bytes | None, value: bytes | None) -> bytes:
    """The canonical form of a record whose headers by name are ``found``: one join (it is
    built for every record sent and every record received)."""
    present = _PRESENT.pack
    get = found.get
    signed = [
        _ABSENT if (raw := get(name)) is None else present(1, len(raw)) + raw
        for name in SIGNED_HEADERS
    ]
    return b"".join((CANONICAL_TAG, *signed, _field(key), _field(value)))


def canonical(headers: Headers, key: bytes | None, value: bytes | None) -> bytes:
    """The bytes a signature covers: :data:`CANONICAL_TAG`, then each of
    :data:`SIGNED_HEADERS` in order as a field of its raw header value, then the key, then the
    value (see :func:`_field`). A signed header present twice is a :class:`SignatureError`
    (``duplicate_header``): a reader taking the other copy must never see different meaning
    under the same signature."""
    return _canonical(_by_name(headers), key, value)


@dataclass(frozen=True, slots=True)
class PublicKey:
    """One province key as the directory publishes it."""

    key_id: str
    """``xs-key-id``: unique across the directory."""
    province: str
    """The province that owns the key; only its records may name it."""
    algorithm: str
    """``ed25519``."""
    public: bytes
    """The raw public key (32 bytes for Ed25519)."""
    valid_from_ms: int
    """Records sent (``xs-sent-at``) before this are refused with this key."""
    valid_until_ms: int | None = None
    """Records sent at or after this are refused with this key (None: no end yet)."""

    def valid_at(self, at_ms: int) -> bool:
        """Whether a record sent at ``at_ms`` may be signed with this key."""
        return self.valid_from_ms <= at_ms and (
            self.valid_until_ms is None or at_ms < self.valid_until_ms
        )

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` is this key's signature of ``data``."""
        if self.algorithm != ED25519:
            return False
        try:
            _ed25519_key(self.public).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True


@functools.lru_cache(maxsize=1024)
def _ed25519_key(public: bytes) -> Ed25519PublicKey:
    """The Ed25519 key object of raw public key bytes, built once per key rather than once
    per record verified (the directory has a few keys per province). ``ValueError`` for
    bytes that are no Ed25519 public key (not cached)."""
    return Ed25519PublicKey.from_public_bytes(public)


class KeyRing:
    """The public keys of every province (from the directory), by key id."""

    def __init__(self, keys: Iterable[PublicKey]) -> None:
        self._keys: dict[str, PublicKey] = {}
        for k in keys:
            if k.key_id in self._keys:
                raise ValueError(f"key id {k.key_id} is published twice")
            self._keys[k.key_id] = k

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, key_id: str) -> PublicKey | None:
        """The key with this id, or None."""
        return self._keys.get(key_id)

    def of(self, province: str) -> list[PublicKey]:
        """A province's keys, the newest first."""
        mine = [k for k in self._keys.values() if k.province == province]
        return sorted(mine, key=lambda k: k.valid_from_ms, reverse=True)

    def current(self, province: str, at_ms: int) -> PublicKey | None:
        """The province's newest key valid at ``at_ms`` (the one to sign with), or None."""
        return next((k for k in self.of(province) if k.valid_at(at_ms)), None)


def demo_private_key(key_id: str) -> Ed25519PrivateKey:
    """The demo key ``key_id``: derived from public text (the key id), so anyone can sign
    with it. Directories publish these for simulations only (``demo = true``), never for a
    real province."""
    return Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(DEMO_SEED + key_id.encode()).digest()
    )


def demo_key_id(province: str) -> str:
    """The key id of a province's demo key when the directory lists none for it."""
    return f"{province}-demo-1"


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of a private key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Signer:
    """A province's private key and the id the directory publishes it under."""

    province: str
    key_id: str
    key: Ed25519PrivateKey = field(repr=False)
    algorithm: str = ED25519

    @classmethod
    def demo(cls, province: str, key_id: str) -> Signer:
        """The signer of a demo key (see :func:`demo_private_key`)."""
        return cls(province, key_id, demo_private_key(key_id))

    @classmethod
    def from_pem(cls, path: Path, province: str, key_id: str) -> Signer:
        """A signer from a PKCS#8 PEM file (unencrypted; protect it by file permissions)."""
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a readable private key: {exc}") from exc
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return cls(province, key_id, loaded)

    @property
    def public(self) -> bytes:
        """The raw public key (what the directory must publish for :attr:`key_id`)."""
        return public_bytes(self.key)

    def sign(self, headers: Headers, key: bytes | None, value: bytes) -> Headers:
        """``headers`` with the signature headers appended (any old ones replaced)."""
        labelled = (
            *[h for h in headers if h[0] not in _SIGNATURE_NAMES],
            (H_SIGNATURE_ALG, self.algorithm.encode()),
            (H_KEY_ID, self.key_id.encode("utf-8")),
        )
        signature = self.key.sign(canonical(labelled, key, value))
        return (*labelled, (H_SIGNATURE, base64.b64encode(signature)))


def generate_pem(path: Path) -> bytes:
    """Write a new Ed25519 private key to ``path`` (PKCS#8 PEM, mode 0600); return the raw
    public key to publish in the directory."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=False)
    path.write_bytes(pem)
    return public_bytes(key)


@dataclass(frozen=True, slots=True)
class Verified:
    """What a good signature established."""

    key_id: str
    """The key that signed."""
    signature: bytes
    """The signature bytes (a replay carries the same ones)."""


def _one(headers: Headers, name: str) -> bytes | None:
    """The first value of header ``name``, or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


@dataclass(frozen=True)
class Verifier:
    """Checks signatures against the directory's keys and ``xs-sent-at`` against a window."""

    keys: KeyRing
    clock_skew_ms: int = 300_000
    """How far in the future ``xs-sent-at`` may be."""
    max_age_ms: int = 2 * 86_400_000
    """How far in the past ``xs-sent-at`` may be."""

    def verify(
        self, headers: Headers, key: bytes | None, value: bytes | None, now_ms: int
    ) -> Verified:
        """Check one record; :class:`SignatureError` says why it is refused."""
        found = _by_name(headers)  # raises on a duplicated signed header
        data = _canonical(found, key, value)
        raw_sig = found.get(H_SIGNATURE)
        if raw_sig is None:
            raise SignatureError("unsigned", "the record carries no xs-signature")
        alg = (found.get(H_SIGNATURE_ALG) or b"").decode("utf-8", "replace")
        if alg not in ALGORITHMS:
            raise SignatureError("unknown_algorithm", f"xs-signature-alg {alg!r} is not known")
        key_id = (found.get(H_KEY_ID) or b"").decode("utf-8", "replace")
        pub = self.keys.get(key_id)
        if pub is None:
            raise SignatureError("unknown_key", f"xs-key-id {key_id!r} is not in the directory")
        source = (found.get(H_SOURCE) or b"").decode("utf-8", "replace")
        if pub.province != source:
            raise SignatureError(
                "key_not_owned", f"key {key_id} belongs to {pub.province}, not to {source!r}"
            )
        if pub.algorithm != alg:
            raise SignatureError("unknown_algorithm", f"key {key_id} is {pub.algorithm}, not {alg}")
        try:
            signature = base64.b64decode(raw_sig, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SignatureError("malformed_signature", "xs-signature is not base64") from exc
        try:
            sent = int(found.get(H_SENT_AT) or b"")
        except ValueError as exc:
            raise SignatureError("stale", "xs-sent-at is not a number") from exc
        if not pub.verify(signature, data):
            raise SignatureError("bad_signature", f"the signature does not verify with {key_id}")
        if not pub.valid_at(sent):
            raise SignatureError("key_not_valid", f"key {key_id} is not valid at xs-sent-at {sent}")
        if sent > now_ms + self.clock_skew_ms:
            raise SignatureError(
                "future", f"xs-sent-at is {(sent - now_ms) // 1000} s in the future"
            )
        if sent < now_ms - self.max_age_ms:
            raise SignatureError(
                "stale",
                f"xs-sent-at is {(now_ms - sent) // 1000} s old, over the "
                f"{self.max_age_ms // 1000} s a record may be",
            )
        return Verified(key_id, signature)


def signature_of(headers: Headers) -> bytes | None:
    """The decoded signature of a record (None if absent or not base64)."""
    raw = _one(headers, H_SIGNATURE)
    if raw is None:
        return None
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True)
class Trust:
    """How a node signs what it sends and checks what it receives."""

    signer: Signer | None
    """Signs every record the node sends (None: records leave unsigned)."""
    verifier: Verifier | None
    """Checks every record the node receives (None: nothing is checked)."""

    @classmethod
    def off(cls) -> Trust:
        """No signing and no checking: for measuring what signing costs, never for money."""
        return cls(None, None)

    def seal(self, headers: Headers, key: bytes | None, value: bytes, now_ms: int) -> Headers:
        """The headers as the record leaves now: ``xs-sent-at`` set to ``now_ms`` (the
        moment of sending, which the receiver's window checks) and the signature added."""
        sent = str(now_ms).encode()
        stamped = tuple([(k, sent if k == H_SENT_AT else v) for k, v in headers])
        if self.signer is None:
            return stamped
        return self.signer.sign(stamped, key, value)
