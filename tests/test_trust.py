"""Trust between provinces on the real broker: every forgery of issue 12 is refused with the
right code and changes no state (no handler run, nothing stored as processed, no answer).

A third party with access to the broker writes records by hand (``produce_raw(sign=False)``
writes them exactly as given); a province that signs properly but lies about ids signs with
its own demo key.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from bus.codec import Codec
from bus.constants import H_DEADLINE, H_DLQ_ERROR_KIND, H_MESSAGE_ID, topic
from bus.envelope import Envelope, new_id, now_ms
from bus.models import ClaimPackage, ErrorCode, ErrorReport
from bus.node import Node
from bus.signing import ED25519, KeyRing, PublicKey, Signer, Trust, Verifier, public_bytes
from bus.store import PENDING
from bus.transport import Headers, Record
from simulators import samples
from simulators.keys import demo_keyring, demo_signer
from tests.conftest import NodeFactory, ProvincePool
from tests.helpers import eventually, hdr, produce_raw, read_topic
from tests.test_node import Reviewer, claim_between, pair, region
from tests.test_ops import claim_envelope

pytestmark = pytest.mark.broker


def claim_record(
    host: str, home: str, codec: Codec, *, claim_id: str | None = None, **env: object
) -> tuple[bytes, Envelope, bytes]:
    """(value, envelope, key) of a claim request from ``host`` to ``home``."""
    message = claim_between(host, home, claim_id=claim_id)
    envelope = dataclasses.replace(claim_envelope(host, home), **env)  # type: ignore[arg-type]
    return codec.encode(message), envelope, message.person_id.encode()


async def write(node: Node, dest: str, value: bytes, headers: Headers, key: bytes) -> None:
    """Write a record exactly as given (a third party on the cluster)."""
    await produce_raw(node.bootstrap, node.settings, dest, value, headers, key, sign=False)


async def reports(node: Node, to: str, expect: int, codec: Codec) -> list[ErrorReport]:
    """ErrorReports written to ``xsettle.error.<to>``."""
    found = await read_topic(node.bootstrap, node.settings, topic("error", to), expect=expect)
    out = []
    for rec in found:
        message = codec.decode(rec.value or b"")
        assert isinstance(message, ErrorReport)
        out.append(message)
    return out


async def dead_letters(node: Node, expect: int) -> list[Record]:
    return await read_topic(
        node.bootstrap, node.settings, topic("dlq", node.province), expect=expect
    )


async def assert_refused(
    home: Node,
    host: str,
    reviewer: Reviewer,
    message_id: str,
    kind: str,
    codec: Codec,
    *,
    code: ErrorCode = ErrorCode.SIGNATURE_INVALID,
    ops: bool = True,
) -> None:
    """The record was dead-lettered with ``kind``, reported with ``code`` to the claimed
    sender (and to ``home``'s ops for signature failures), and changed nothing."""
    letters = await dead_letters(home, expect=1)
    assert [hdr(r, H_DLQ_ERROR_KIND) for r in letters] == [kind]
    sent = await reports(home, host, 1, codec)
    assert [(r.code, r.ref_message_id) for r in sent] == [(code, message_id)]
    if ops:
        own = await reports(home, home.province, 1, codec)
        assert [r.code for r in own] == [code]
    assert reviewer.calls == []
    assert home.store.processed(message_id) is None
    assert home.metrics.get("xsettle_dead_letters_total", kind=kind) == 1


class TestForgedSender:
    async def test_unsigned_record_posing_as_a_province_is_refused(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        host, home, reviewer = await pair(make_node, province_pool)
        value, env, key = claim_record(host.province, home.province, codec)
        await write(home, topic("claim", home.province), value, env.to_headers(), key)
        await assert_refused(home, host.province, reviewer, env.message_id, "unsigned", codec)

    async def test_record_signed_by_a_third_province_as_another_is_refused(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """A third province signs with its own (valid) key but claims to be the host."""
        host, home, reviewer = await pair(make_node, province_pool)
        third = province_pool.take()
        value, env, key = claim_record(host.province, home.province, codec)
        headers = demo_signer(third).sign(env.to_headers(), key, value)
        await write(home, topic("claim", home.province), value, headers, key)
        await assert_refused(home, host.province, reviewer, env.message_id, "key_not_owned", codec)

    async def test_tampered_value_is_refused(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        host, home, reviewer = await pair(make_node, province_pool)
        value, env, key = claim_record(host.province, home.province, codec)
        headers = demo_signer(host.province).sign(env.to_headers(), key, value)
        tampered = value[:-1] + bytes([value[-1] ^ 0x01])
        await write(home, topic("claim", home.province), tampered, headers, key)
        await assert_refused(home, host.province, reviewer, env.message_id, "bad_signature", codec)

    async def test_tampered_header_is_refused(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """A later deadline written over a signed request's xs-deadline."""
        host, home, reviewer = await pair(make_node, province_pool)
        value, env, key = claim_record(host.province, home.province, codec)
        signed = demo_signer(host.province).sign(env.to_headers(), key, value)
        later = str(now_ms() + 9_000_000).encode()
        headers = tuple((k, later if k == H_DEADLINE else v) for k, v in signed)
        await write(home, topic("claim", home.province), value, headers, key)
        await assert_refused(home, host.province, reviewer, env.message_id, "bad_signature", codec)

    async def test_a_record_from_the_future_or_too_old_is_refused(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        host, home, reviewer = await pair(make_node, province_pool)
        old = now_ms() - home.settings.max_record_age_s * 1000 - 60_000
        value, env, key = claim_record(host.province, home.province, codec, sent_at_ms=old)
        headers = demo_signer(host.province).sign(env.to_headers(), key, value)
        await write(home, topic("claim", home.province), value, headers, key)
        await assert_refused(home, host.province, reviewer, env.message_id, "stale", codec)


class TestReplay:
    async def test_a_replayed_record_is_refused_and_answered_once(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """The same signed record written again (not a re-send: same attempt, same
        signature) is a replay: dead-lettered, the answer is not sent a second time."""
        host, home, reviewer = await pair(make_node, province_pool)
        value, env, key = claim_record(host.province, home.province, codec)
        headers = demo_signer(host.province).sign(env.to_headers(), key, value)
        await write(home, topic("claim", home.province), value, headers, key)
        await eventually(lambda: len(reviewer.calls) == 1)
        await write(home, topic("claim", home.province), value, headers, key)
        letters = await dead_letters(home, expect=1)
        assert [hdr(r, H_DLQ_ERROR_KIND) for r in letters] == ["replayed"]
        replies = await read_topic(
            home.bootstrap, home.settings, topic("reply", host.province), expect=1
        )
        assert len(replies) == 1
        assert reviewer.calls == [f"C-{host.province}-1"]
        # The host reports the first answer ORPHAN_REPLY (it never sent this request).
        own = await reports(home, home.province, 2, codec)
        assert sorted(r.code.value for r in own) == ["ORPHAN_REPLY", "SIGNATURE_INVALID"]


class TestForgedAnswer:
    async def test_answers_from_a_third_province_do_not_count(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """The host asked the home; a third province answers, once under its own name
        (INVALID_MESSAGE: not the province asked) and once posing as the home
        (SIGNATURE_INVALID: its key is not the home's). The request stays open."""
        host_code, home_code, third = (province_pool.take() for _ in range(3))
        await make_node(home_code, start=False)  # its topics; nobody answers
        await make_node(third, start=False)  # topics exist before the host's producer starts
        host = await make_node(host_code)
        await host.wait_ready()
        request_id = await host.request(claim_between(host.province, home_code), deadline_s=600)
        claim_id = f"C-{host.province}-1"
        review = codec.encode(samples.review(claim_id))
        for source in (third, home_code):
            env = Envelope(
                message_id=new_id(),
                message_type=samples.review().avro_name,
                source=source,
                target=host.province,
                sent_at_ms=now_ms(),
                correlation_id=request_id,
            )
            headers = demo_signer(third).sign(env.to_headers(), b"k", review)
            await write(host, topic("reply", host.province), review, headers, b"k")
        letters = await dead_letters(host, expect=1)
        assert [hdr(r, H_DLQ_ERROR_KIND) for r in letters] == ["key_not_owned"]
        to_third = await reports(host, third, 1, codec)
        assert [r.code for r in to_third] == [ErrorCode.INVALID_MESSAGE]
        pending = host.store.get_pending(request_id)
        assert pending is not None
        assert pending.state == PENDING


class TestIds:
    async def test_a_province_cannot_take_another_province_s_claim_id(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """A third province, signing properly, sends a claim under the host's claim id: it
        is refused; the host's own claim with that id is then reviewed normally."""
        third = province_pool.take()
        await make_node(third, start=False)  # its error topic exists before anyone sends
        host, home, reviewer = await pair(make_node, province_pool)
        squatted = f"C-{host.province}-1"
        message = samples.claim(home=region(home.province), host=region(third), claim_id=squatted)
        value, key = codec.encode(message), message.person_id.encode()
        env = Envelope(
            message_id=new_id(),
            message_type=ClaimPackage.avro_name,
            source=third,
            target=home.province,
            sent_at_ms=now_ms(),
            reply_to=topic("reply", third),
            deadline_ms=now_ms() + 600_000,
        )
        await produce_raw(
            home.bootstrap, home.settings, topic("claim", home.province), value,
            env.to_headers(), key,
        )  # fmt: skip
        letters = await dead_letters(home, expect=1)
        assert [hdr(r, H_DLQ_ERROR_KIND) for r in letters] == ["header_mismatch"]
        sent = await reports(home, third, 1, codec)
        assert [r.code for r in sent] == [ErrorCode.INVALID_MESSAGE]
        assert "may issue" in sent[0].message
        assert reviewer.calls == []
        answer = await host.ask(claim_between(host.province, home.province), deadline_s=10)
        assert answer.ok
        assert reviewer.calls == [squatted]

    async def test_a_reply_to_pointing_elsewhere_is_refused(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """A signed request whose xs-reply-to is a third province's claim inbox: refused,
        and nothing is written there."""
        third = province_pool.take()
        await make_node(third, start=False)
        host, home, reviewer = await pair(make_node, province_pool)
        value, env, key = claim_record(
            host.province, home.province, codec, reply_to=topic("claim", third)
        )
        await produce_raw(
            home.bootstrap, home.settings, topic("claim", home.province), value,
            env.to_headers(), key,
        )  # fmt: skip
        await assert_refused(
            home, host.province, reviewer, env.message_id, "header_mismatch", codec,
            code=ErrorCode.INVALID_MESSAGE, ops=False,
        )  # fmt: skip
        inbox = await read_topic(
            home.bootstrap, home.settings, topic("claim", third), expect=1, timeout_s=1.0
        )
        assert inbox == []


def rotation_keys(host: str, home: str, *, old_until_ms: int, new_from_ms: int) -> KeyRing:
    """The demo keyring with the host's keys replaced by ``old`` and ``new``."""
    keys = [k for k in (demo_keyring().get(f"{c}-demo-1") for c in (home,)) if k is not None]
    keys.append(
        PublicKey(f"{host}-old", host, ED25519, public_bytes(Signer.demo(host, f"{host}-old").key),
                  0, old_until_ms)
    )  # fmt: skip
    keys.append(
        PublicKey(f"{host}-new", host, ED25519, public_bytes(Signer.demo(host, f"{host}-new").key),
                  new_from_ms, None)
    )  # fmt: skip
    return KeyRing(keys)


class TestKeys:
    async def _home_with(
        self, make_node: NodeFactory, home: str, keys: KeyRing
    ) -> tuple[Node, Reviewer]:
        reviewer = Reviewer()
        trust = Trust(demo_signer(home), Verifier(keys))
        node = await make_node(home, start=False, trust=trust)
        node.on(ClaimPackage)(reviewer)
        await node.start()
        await node.wait_ready()
        return node, reviewer

    async def _send(self, home: Node, host: str, key_id: str, codec: Codec, n: int) -> str:
        value, env, key = claim_record(host, home.province, codec, claim_id=f"C-{host}-{n}")
        headers = Signer.demo(host, key_id).sign(env.to_headers(), key, value)
        await write(home, topic("claim", home.province), value, headers, key)
        return env.message_id

    async def test_old_and_new_keys_both_count_inside_the_overlap(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        host, home_code = province_pool.take(), province_pool.take()
        await make_node(host, start=False)
        keys = rotation_keys(
            host, home_code, old_until_ms=now_ms() + 3_600_000, new_from_ms=now_ms() - 3_600_000
        )
        home, reviewer = await self._home_with(make_node, home_code, keys)
        await self._send(home, host, f"{host}-old", codec, 1)
        await self._send(home, host, f"{host}-new", codec, 2)
        await eventually(lambda: len(reviewer.calls) == 2)
        assert sorted(reviewer.calls) == [f"C-{host}-1", f"C-{host}-2"]

    async def test_an_expired_key_is_refused(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """After the overlap the old key's valid_until has passed: its records are refused,
        the new key's are handled."""
        host, home_code = province_pool.take(), province_pool.take()
        await make_node(host, start=False)
        keys = rotation_keys(
            host, home_code, old_until_ms=now_ms() - 60_000, new_from_ms=now_ms() - 3_600_000
        )
        home, reviewer = await self._home_with(make_node, home_code, keys)
        refused = await self._send(home, host, f"{host}-old", codec, 1)
        letters = await dead_letters(home, expect=1)
        assert [hdr(r, H_DLQ_ERROR_KIND) for r in letters] == ["key_not_valid"]
        assert letters[0] is not None
        assert hdr(letters[0], H_MESSAGE_ID) == refused
        await self._send(home, host, f"{host}-new", codec, 2)
        await eventually(lambda: reviewer.calls == [f"C-{host}-2"])
        assert home.store.processed(refused) is None


async def test_nodes_sign_what_they_send(
    make_node: NodeFactory, province_pool: ProvincePool
) -> None:
    """A request and its answer both carry a signature that the other side checked, and
    both sides logged both records in their message log."""
    host, home, _reviewer = await pair(make_node, province_pool)
    answer = await host.ask(claim_between(host.province, home.province), deadline_s=10)
    assert answer.ok
    await asyncio.sleep(0.2)  # the relay logs what was acknowledged every 50 ms
    for node in (host, home):
        entries = node.store.audit.of_subject(f"C-{host.province}-1")
        assert sorted(e.direction for e in entries) == ["received", "sent"]
        assert all(e.signature for e in entries)
