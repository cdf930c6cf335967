"""Layered acknowledgement (contract v1.2) on the real broker: a deferred request is
acknowledged at once, a re-send while open is acknowledged again, an unacknowledged request is
re-sent after its window (a bounded number of times), and an older province that never
acknowledges still settles."""

from __future__ import annotations

import asyncio

import pytest

from bus.codec import Codec
from bus.constants import H_ATTEMPT, H_CORRELATION_ID, H_MESSAGE_ID, topic
from bus.envelope import Envelope, new_id, now_ms
from bus.models import ClaimPackage, RequestAcknowledgement, ReviewResult
from bus.node import DEFER, Acknowledged, Answer, Deferred, Node
from bus.store import DELIVERED
from simulators import samples
from tests.conftest import NodeFactory, ProvincePool
from tests.helpers import eventually, hdr, produce_raw, read_topic
from tests.test_crash_safety import claim_to
from tests.test_deferred import Deferring, home_node

pytestmark = pytest.mark.broker


async def acks(node: Node, codec: Codec, expect: int) -> list[RequestAcknowledgement]:
    """Acknowledgements on ``node``'s reply topic."""
    records = await read_topic(
        node.bootstrap, node.settings, topic("reply", node.province), expect=expect,
        where=lambda r: hdr(r, "xs-message-type") == RequestAcknowledgement.avro_name,
    )  # fmt: skip
    out = []
    for rec in records:
        message = codec.decode(rec.value or b"")
        assert isinstance(message, RequestAcknowledgement)
        out.append(message)
    return out


class TestAcknowledged:
    async def test_a_deferred_request_is_acknowledged_at_once(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """The host learns within a second that its claim was accepted for review and when
        to expect the answer; the request stays open and is not re-sent."""
        host_code, home_code = province_pool.take(), province_pool.take()
        host = await make_node(host_code, ack_window_s=1)
        expected = now_ms() + 14 * 86_400_000

        class Later(Deferring):
            async def __call__(self, message: object, ctx: object) -> Deferred:
                return Deferred(note="delayed review", expected_by_ms=expected)

        home = await make_node(home_code, start=False)
        home.on(ClaimPackage)(Later())
        await home.start()
        await asyncio.gather(host.wait_ready(), home.wait_ready())
        told: list[Acknowledged] = []

        @host.on_acknowledged(ClaimPackage)
        async def acknowledged(ack: Acknowledged) -> None:
            told.append(ack)

        began = now_ms()
        request_id = await host.request(claim_to(host_code, home_code), deadline_s=600)
        await eventually(lambda: len(told) == 1, 5)
        pending = host.store.get_pending(request_id)
        assert pending is not None
        assert pending.state == "pending"
        assert pending.acknowledged_at_ms is not None
        assert pending.acknowledged_at_ms - began < 5_000
        assert pending.ack_state == "ACCEPTED_FOR_REVIEW"
        assert pending.expected_by_ms == expected
        assert told[0].first
        assert told[0].target == home_code
        await asyncio.sleep(2.5)  # over two ack windows: an acknowledged request is not re-sent
        sent = await read_topic(host.bootstrap, host.settings, topic("claim", home_code), expect=1)
        assert [hdr(r, H_ATTEMPT) for r in sent] == ["1"]
        assert host.store.get_pending(request_id).attempt == 1  # type: ignore[union-attr]

    async def test_a_resend_while_open_is_acknowledged_again_one_obligation(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        host_code, home_code = province_pool.take(), province_pool.take()
        host = await make_node(host_code)
        home = await home_node(make_node, home_code)
        await host.wait_ready()
        request_id = await host.request(
            claim_to(host_code, home_code, f"C-{host_code}-D1"), deadline_s=600
        )
        await eventually(lambda: len(home.owed()) == 1)
        assert await host.resend(request_id)
        found = await acks(host, codec, expect=2)
        assert len(found) == 2
        assert {a.subject_id for a in found} == {f"C-{host_code}-D1"}
        assert [o.request_id for o in home.owed()] == [request_id]
        assert home.store.count_obligations() == 1


class TestUnacknowledged:
    async def test_an_unacknowledged_request_is_resent_after_its_window_a_bounded_number_of_times(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """An older home that never acknowledges: the host re-sends after each window, at
        most ``unacknowledged_sends`` sends in all; the home's late answer still settles."""
        host_code, home_code = province_pool.take(), province_pool.take()
        await make_node(home_code, start=False)  # topics only: the home answers by hand
        host = await make_node(host_code, ack_window_s=1, unacknowledged_sends=3)
        await host.wait_ready()
        got: list[Answer] = []

        @host.on_answer(ClaimPackage)
        async def collect(answer: Answer) -> None:
            got.append(answer)

        request_id = await host.request(claim_to(host_code, home_code), deadline_s=600)
        sent = await read_topic(
            host.bootstrap, host.settings, topic("claim", home_code), expect=3, timeout_s=20
        )
        await asyncio.sleep(2.5)  # no fourth send
        sent = await read_topic(host.bootstrap, host.settings, topic("claim", home_code), expect=3)
        assert sorted(hdr(r, H_ATTEMPT) or "" for r in sent) == ["1", "2", "3"]
        assert {hdr(r, H_MESSAGE_ID) for r in sent} == {request_id}
        assert host.metrics.get("xsettle_unacknowledged_resends_total") == 2
        # The older home answers (no acknowledgement ever): the request closes once.
        review = samples.review(f"C-{host_code}-1")
        env = Envelope(
            message_id=new_id(), message_type=ReviewResult.avro_name, source=home_code,
            target=host_code, sent_at_ms=now_ms(), correlation_id=request_id,
        )  # fmt: skip
        await produce_raw(
            host.bootstrap, host.settings, topic("reply", host_code), codec.encode(review),
            env.to_headers(),
        )  # fmt: skip
        await eventually(lambda: len(got) == 1)
        assert got[0].ok
        assert host.store.get_pending(request_id).state == DELIVERED  # type: ignore[union-attr]

    async def test_an_answer_at_once_needs_no_acknowledgement(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """A request answered at once is neither acknowledged nor re-sent."""
        host_code, home_code = province_pool.take(), province_pool.take()
        host = await make_node(host_code, ack_window_s=1)
        await home_node(make_node, home_code)
        await host.wait_ready()
        answer = await host.ask(claim_to(host_code, home_code), deadline_s=10)
        assert answer.ok
        await asyncio.sleep(1.5)
        replies = await read_topic(
            host.bootstrap, host.settings, topic("reply", host_code), expect=1
        )
        assert [hdr(r, "xs-message-type") for r in replies] == [ReviewResult.avro_name]
        assert host.metrics.get("xsettle_unacknowledged_resends_total") == 0


async def test_waiting_reviews_do_not_delay_an_instant_claim_in_the_same_partition(
    make_node: NodeFactory, province_pool: ProvincePool
) -> None:
    """200 DELAYED claims of one person (one partition) wait for review; an INSTANT claim of
    the same person sent after them is answered within its instant deadline."""
    host_code, home_code = province_pool.take(), province_pool.take()
    host = await make_node(host_code)
    home = await home_node(make_node, home_code)
    await host.wait_ready()
    for n in range(200):
        await host.request(claim_to(host_code, home_code, f"C-{host_code}-D{n}"), deadline_s=600)
    answer = await host.ask(claim_to(host_code, home_code, f"C-{host_code}-Q1"), deadline_s=5)
    assert answer.ok
    await eventually(lambda: home.store.count_obligations() == 200)
    assert isinstance(DEFER, Deferred)
    correlations = await read_topic(
        host.bootstrap,
        host.settings,
        topic("reply", host_code),
        expect=201,
    )
    assert answer.request_id in {hdr(r, H_CORRELATION_ID) for r in correlations}
