"""Signing without a broker: the canonical form, every refusal of the verifier, keys in the
directory, a province's trust from its settings, and ``xsettle keys``."""

from __future__ import annotations

import base64
import dataclasses
import re
from pathlib import Path

import pytest

from adapters.directory import Directory, DirectoryError
from adapters.province import trust_for
from bus.constants import (
    H_ATTEMPT,
    H_DEADLINE,
    H_KEY_ID,
    H_SIGNATURE,
    H_SIGNATURE_ALG,
    H_SOURCE,
    H_TRACEPARENT,
)
from bus.envelope import Envelope, now_ms
from bus.settings import BusSettings
from bus.signing import (
    CANONICAL_TAG,
    ED25519,
    KeyRing,
    PublicKey,
    SignatureError,
    Signer,
    Trust,
    Verifier,
    canonical,
    public_bytes,
)
from bus.transport import Headers
from simulators.cli import main
from simulators.keys import demo_keyring, demo_signer

HOST, HOME = "460000", "130000"


def headers(**kw: object) -> Headers:
    env = Envelope(
        message_id="m-1",
        message_type="xsettle.v1.ClaimPackage",
        source=HOST,
        target=HOME,
        sent_at_ms=now_ms(),
        reply_to=f"xsettle.reply.{HOST}",
        deadline_ms=now_ms() + 60_000,
    )
    return dataclasses.replace(env, **kw).to_headers()  # type: ignore[arg-type]


def verifier(keys: KeyRing | None = None) -> Verifier:
    return Verifier(keys or demo_keyring(), clock_skew_ms=300_000, max_age_ms=3_600_000)


def refused(hs: Headers, value: bytes = b"v", key: bytes | None = b"k") -> str:
    with pytest.raises(SignatureError) as caught:
        verifier().verify(hs, key, value, now_ms())
    return caught.value.kind


class TestCanonical:
    def test_fields_are_length_prefixed_in_the_contract_order(self) -> None:
        data = canonical(((H_ATTEMPT, b"1"), (H_SOURCE, b"460000")), b"k", b"val")
        assert data.startswith(CANONICAL_TAG)
        body = data[len(CANONICAL_TAG) :]
        # message-id, type absent; source present; target..correlation absent; attempt present
        assert body[:2] == b"\x00\x00"
        assert body[2:13] == b"\x01\x00\x00\x00\x06460000"
        assert body.endswith(b"\x01\x00\x00\x00\x01k\x01\x00\x00\x00\x03val")

    def test_absent_and_empty_differ(self) -> None:
        assert canonical((), None, b"") != canonical((), b"", b"")

    def test_traceparent_is_not_covered(self) -> None:
        hs = headers()
        assert canonical(hs, b"k", b"v") == canonical((*hs, (H_TRACEPARENT, b"00-x")), b"k", b"v")

    def test_a_signed_header_twice_is_refused(self) -> None:
        hs = demo_signer(HOST).sign(headers(), b"k", b"v")
        assert refused((*hs, (H_SOURCE, b"530000"))) == "duplicate_header"


class TestVerifier:
    def test_a_good_record_verifies(self) -> None:
        hs = demo_signer(HOST).sign(headers(), b"k", b"v")
        assert verifier().verify(hs, b"k", b"v", now_ms()).key_id == f"{HOST}-demo-1"

    def test_resigning_replaces_the_old_signature(self) -> None:
        once = demo_signer(HOST).sign(headers(), b"k", b"v")
        twice = demo_signer(HOST).sign(once, b"k", b"v")
        assert [k for k, _ in twice].count(H_SIGNATURE) == 1
        verifier().verify(twice, b"k", b"v", now_ms())

    @pytest.mark.parametrize(
        ("change", "kind"),
        [
            (lambda hs: tuple(p for p in hs if p[0] != H_SIGNATURE), "unsigned"),
            (lambda hs: _set(hs, H_SIGNATURE_ALG, b"sm2-sm3"), "unknown_algorithm"),
            (lambda hs: _set(hs, H_KEY_ID, b"nobody-1"), "unknown_key"),
            (lambda hs: _set(hs, H_KEY_ID, b"530000-demo-1"), "key_not_owned"),
            (lambda hs: _set(hs, H_SIGNATURE, b"not base64!"), "malformed_signature"),
            (lambda hs: _set(hs, H_DEADLINE, b"1"), "bad_signature"),
            (lambda hs: _set(hs, H_ATTEMPT, b"2"), "bad_signature"),
        ],
    )
    def test_each_refusal(self, change: object, kind: str) -> None:
        hs = demo_signer(HOST).sign(headers(), b"k", b"v")
        assert refused(change(hs)) == kind  # type: ignore[operator]

    def test_value_and_key_are_covered(self) -> None:
        hs = demo_signer(HOST).sign(headers(), b"k", b"v")
        assert refused(hs, value=b"w") == "bad_signature"
        assert refused(hs, key=b"other") == "bad_signature"
        assert refused(hs, key=None) == "bad_signature"

    def test_sent_at_window(self) -> None:
        future = demo_signer(HOST).sign(headers(sent_at_ms=now_ms() + 600_000), b"k", b"v")
        assert refused(future) == "future"
        old = demo_signer(HOST).sign(headers(sent_at_ms=now_ms() - 7_200_000), b"k", b"v")
        assert refused(old) == "stale"

    def test_key_validity_at_sent_at(self) -> None:
        """A key is used only inside its validity; two keys of one province overlap."""
        now = now_ms()
        old, new = Signer.demo(HOST, "old"), Signer.demo(HOST, "new")
        ring = KeyRing(
            [
                PublicKey("old", HOST, ED25519, old.public, 0, now - 1000),
                PublicKey("new", HOST, ED25519, new.public, now - 60_000),
            ]
        )
        v = verifier(ring)
        fresh = headers(sent_at_ms=now)
        v.verify(new.sign(fresh, b"k", b"v"), b"k", b"v", now)
        with pytest.raises(SignatureError, match="not valid"):
            v.verify(old.sign(fresh, b"k", b"v"), b"k", b"v", now)
        earlier = headers(sent_at_ms=now - 30_000)  # inside the overlap: both count
        v.verify(old.sign(earlier, b"k", b"v"), b"k", b"v", now)
        v.verify(new.sign(earlier, b"k", b"v"), b"k", b"v", now)
        assert ring.current(HOST, now).key_id == "new"  # type: ignore[union-attr]

    def test_seal_stamps_sent_at_then_signs(self) -> None:
        trust = Trust(demo_signer(HOST), verifier())
        sealed = trust.seal(headers(sent_at_ms=1), b"k", b"v", now_ms())
        trust.verifier.verify(sealed, b"k", b"v", now_ms())  # type: ignore[union-attr]
        deadline = now_ms() + 60_000  # one clock reading: two would differ by a millisecond
        unsigned = Trust.off().seal(headers(sent_at_ms=1, deadline_ms=deadline), b"k", b"v", 5)
        assert unsigned == headers(sent_at_ms=5, deadline_ms=deadline)


def _set(hs: Headers, name: str, value: bytes) -> Headers:
    return tuple((k, value if k == name else v) for k, v in hs)


class TestDirectoryKeys:
    def test_the_default_directory_publishes_a_demo_key_per_province(self) -> None:
        d = Directory.default()
        ring = d.keyring()
        for code in d.provinces():
            key = ring.current(code, now_ms())
            assert key is not None
            assert key.public == public_bytes(demo_signer(code).key)

    def test_a_wrong_demo_key_and_a_bad_key_are_named_with_their_line(self) -> None:
        text = Directory.default().source
        raw = Path(text).read_text(encoding="utf-8")
        bad = raw.replace(
            'public_key = "' + _demo_b64(f"{HOST}-demo-1") + '"',
            'public_key = "' + _demo_b64(f"{HOME}-demo-1") + '"',
        )
        with pytest.raises(DirectoryError, match=r"keys\[\d+\]\.public_key.*not the demo key"):
            Directory.from_toml(bad)
        short = raw.replace(_demo_b64(f"{HOST}-demo-1"), "AAAA")
        with pytest.raises(DirectoryError, match="32 bytes"):
            Directory.from_toml(short)


def _demo_b64(key_id: str) -> str:
    return base64.b64encode(public_bytes(Signer.demo("x", key_id).key)).decode()


class TestTrustFor:
    def test_demo_key_by_default(self) -> None:
        trust = trust_for(HOST, BusSettings(), Directory.default())
        assert trust.signer is not None
        assert trust.signer.key_id == f"{HOST}-demo-1"

    def test_a_generated_key_published_in_the_directory(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``keys generate`` writes the key and prints the block; with the block published
        the province signs with it and its records verify; a key not published is refused."""
        pem = tmp_path / "hainan.pem"
        assert main(["keys", "generate", "--province", HOST, "--out", str(pem),
                     "--key-id", "460000-2027a", "--valid-from",
                     "2026-01-01T00:00:00+08:00"]) == 0  # fmt: skip
        block = capsys.readouterr().out
        assert pem.stat().st_mode & 0o777 == 0o600
        assert main(["keys", "generate", "--province", HOST, "--out", str(pem)]) == 2
        raw = Path(Directory.default().source).read_text(encoding="utf-8")
        directory = Directory.from_toml(raw + "\n" + block)
        settings = BusSettings(signing_key_file=pem, signing_key_id="460000-2027a")
        trust = trust_for(HOST, settings, directory)
        signed = trust.seal(headers(), b"k", b"v", now_ms())
        assert trust.verifier is not None
        assert trust.verifier.verify(signed, b"k", b"v", now_ms()).key_id == "460000-2027a"
        with pytest.raises(ValueError, match="not a key of 460000"):
            trust_for(HOST, settings, Directory.default())
        with pytest.raises(ValueError, match="does not match"):
            trust_for(
                HOST,
                BusSettings(signing_key_file=pem, signing_key_id=f"{HOST}-demo-1"),
                directory,
            )

    def test_a_real_key_without_its_file_is_refused(self, tmp_path: Path) -> None:
        pem = tmp_path / "k.pem"
        main(["keys", "generate", "--province", HOST, "--out", str(pem), "--key-id", "real-1"])
        raw = Path(Directory.default().source).read_text(encoding="utf-8")
        block = re.sub(r"^#.*\n", "", _block(pem, "real-1"), flags=re.M)
        directory = Directory.from_toml(raw + "\n" + block)
        with pytest.raises(ValueError, match="signing_key_file"):
            trust_for(HOST, BusSettings(signing_key_id="real-1"), directory)

    def test_keys_show_marks_demo_keys(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["keys", "show", "--province", HOST]) == 0
        out = capsys.readouterr().out
        assert f"{HOST}-demo-1" in out
        assert "DEMO" in out


def _block(pem: Path, key_id: str) -> str:
    signer = Signer.from_pem(pem, HOST, key_id)
    return (
        f'[[keys]]\nprovince = "{HOST}"\nkey_id = "{key_id}"\nalgorithm = "ed25519"\n'
        f'public_key = "{base64.b64encode(signer.public).decode()}"\n'
        "valid_from = 2026-01-01T00:00:00+08:00\n"
    )
