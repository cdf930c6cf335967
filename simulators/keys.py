"""Demo keys for simulations and tests that run provinces outside any directory file.

Every province code ``NN0000`` gets its demo key ``<code>-demo-1`` (derivable by anyone; see
:func:`bus.signing.demo_private_key`), so synthetic provinces sign and check like real ones.
"""

from __future__ import annotations

import functools

from bus.settings import BusSettings
from bus.signing import (
    ED25519,
    KeyRing,
    PublicKey,
    Signer,
    Trust,
    Verifier,
    demo_key_id,
    demo_private_key,
    public_bytes,
)
from bus.transport import Headers

ALL_PROVINCES = tuple(f"{n:02d}0000" for n in range(10, 100))
"""Every code of the form NN0000."""


@functools.cache
def demo_keyring() -> KeyRing:
    """The demo key of every code NN0000, valid from the epoch on."""
    return KeyRing(
        PublicKey(
            key_id=demo_key_id(code),
            province=code,
            algorithm=ED25519,
            public=public_bytes(demo_private_key(demo_key_id(code))),
            valid_from_ms=0,
        )
        for code in ALL_PROVINCES
    )


def demo_signer(province: str) -> Signer:
    """The demo signer of ``province``."""
    return Signer.demo(province, demo_key_id(province))


def demo_trust(province: str, settings: BusSettings | None = None) -> Trust:
    """Signing with ``province``'s demo key, checking against :func:`demo_keyring`."""
    s = settings or BusSettings()
    verifier = Verifier(
        demo_keyring(), clock_skew_ms=s.clock_skew_s * 1000, max_age_ms=s.max_record_age_s * 1000
    )
    return Trust(demo_signer(province), verifier)


def sign_as(province: str, headers: Headers, key: bytes | None, value: bytes) -> Headers:
    """``headers`` signed with ``province``'s demo key (a simulated province writing a record
    by hand: fault injection, fuzzing)."""
    return demo_signer(province).sign(headers, key, value)


KEYS_MARKER = "# --- Signing keys"
"""Where the default directory's ``[[keys]]`` section starts (it is the file's last)."""


def without_keys(directory_text: str) -> str:
    """The default directory's text without its listed keys: with ``demo_keys = true`` every
    province then signs with ``<code>-demo-1``, the same keys, which stay right when a copy
    renames provinces (tests and benches give Hebei and Hainan fresh codes)."""
    at = directory_text.find(KEYS_MARKER)
    return directory_text if at < 0 else directory_text[:at]
