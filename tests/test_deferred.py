"""Deferred answers on the real embedded broker: a handler accepts a request now and the node
answers it later, once, from the obligation it stored."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bus import testing
from bus.codec import Codec
from bus.constants import H_CORRELATION_ID, H_MESSAGE_ID, topic
from bus.errors import Rejection, RoutingError
from bus.models import ClaimPackage, ErrorCode, ErrorReport, Message, RequestAcknowledgement
from bus.node import DEFER, Answer, Context, Deferred, Node
from simulators import samples
from tests.conftest import NodeFactory, ProvincePool
from tests.helpers import eventually, hdr, read_topic
from tests.test_crash_safety import drop_dispatch

ACK = RequestAcknowledgement.avro_name

pytestmark = pytest.mark.broker


def claim_to(host: str, home: str, claim_id: str) -> ClaimPackage:
    return samples.claim(
        home=home[:2] + "0100", host=host[:2] + "0100", claim_id=claim_id, person=samples.PERSON
    )


class Deferring:
    """A home handler that defers claims whose unique part starts with ``D`` and approves the
    rest."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, message: Message, ctx: Context) -> Message | Deferred | None:
        assert isinstance(message, ClaimPackage)
        self.calls.append(message.claim_id)
        if message.claim_id.split("-")[-1].startswith("D"):
            return DEFER
        return samples.review(message.claim_id)


async def home_node(make_node: NodeFactory, code: str, state: Path | None = None) -> Node:
    node = await make_node(code, start=False, **({"state": state} if state else {}))
    node.on(ClaimPackage)(Deferring())
    await node.start()
    await node.wait_ready()
    return node


class TestDeferredAnswers:
    async def test_answered_later_once_and_the_partition_is_free(
        self, make_node: NodeFactory, province_pool: ProvincePool
    ) -> None:
        """A deferred claim does not hold its partition (a later claim of the same person is
        answered first); answer() sends its one answer; a second call sends nothing."""
        host_code, home_code = province_pool.take(), province_pool.take()
        host = await make_node(host_code)
        home = await home_node(make_node, home_code)
        await host.wait_ready()
        got: list[Answer] = []

        @host.on_answer(ClaimPackage)
        async def collect(answer: Answer) -> None:
            got.append(answer)

        deferred_id = await host.request(
            claim_to(host_code, home_code, f"C-{host_code}-D1"), deadline_s=60
        )
        quick = await host.ask(claim_to(host_code, home_code, f"C-{host_code}-Q1"), deadline_s=10)
        assert quick.ok
        assert [o.request_id for o in home.owed()] == [deferred_id]
        first = await home.answer(deferred_id, samples.review(f"C-{host_code}-D1"))
        again = await home.answer(deferred_id, samples.review(f"C-{host_code}-D1"))
        assert again == first
        assert home.owed() == []
        await eventually(lambda: [a.request_id for a in got] == [quick.request_id, deferred_id])
        replies = await read_topic(
            host.bootstrap, host.settings, topic("reply", host_code), expect=3
        )
        answers = [r for r in replies if hdr(r, "xs-message-type") != ACK]
        assert sorted(hdr(r, H_CORRELATION_ID) or "" for r in answers) == sorted(
            [deferred_id, quick.request_id]
        )
        acks = [hdr(r, H_CORRELATION_ID) for r in replies if hdr(r, "xs-message-type") == ACK]
        assert acks == [deferred_id]  # the deferred claim was acknowledged, once

    async def test_obligation_survives_a_restart_and_a_resend_makes_no_second(
        self, make_node: NodeFactory, province_pool: ProvincePool, state_dir: Path
    ) -> None:
        """The obligation outlives the responder; a re-send while it is open makes no second
        one and no answer; after the answer a re-send gets the stored answer again."""
        host_code, home_code = province_pool.take(), province_pool.take()
        host = await make_node(host_code)
        home = await home_node(make_node, home_code, state_dir)
        await host.wait_ready()
        request_id = await host.request(
            claim_to(host_code, home_code, f"C-{host_code}-D2"), deadline_s=60
        )
        await eventually(lambda: len(home.owed()) == 1)
        assert await host.resend(request_id)
        await eventually(lambda: home.metrics.get("xsettle_duplicates_total", family="claim") == 1)
        assert len(home.owed()) == 1
        await home.stop()
        home.store.close()
        back = await home_node(make_node, home_code, state_dir)
        [owed] = back.owed()
        assert owed.request_id == request_id
        await back.answer(request_id, samples.review(f"C-{host_code}-D2"))
        await eventually(
            lambda: (p := host.store.get_pending(request_id)) is not None and p.state == "delivered"
        )
        assert await host.resend(request_id) is False  # answered: nothing to re-send

    async def test_a_kill_between_storing_the_answer_and_sending_it_sends_it_once(
        self, make_node: NodeFactory, province_pool: ProvincePool, state_dir: Path
    ) -> None:
        """The decision's step committed (answer stored, in the outbox) and the process died
        before the record left: the restarted home sends it, once; the host settles once."""
        host_code, home_code = province_pool.take(), province_pool.take()
        host = await make_node(host_code)
        home = await home_node(make_node, home_code, state_dir)
        await host.wait_ready()
        got: list[Answer] = []

        @host.on_answer(ClaimPackage)
        async def collect(answer: Answer) -> None:
            got.append(answer)

        claim_id = f"C-{host_code}-D5"
        request_id = await host.request(claim_to(host_code, home_code, claim_id), deadline_s=60)
        await eventually(lambda: len(home.owed()) == 1)
        drop_dispatch(home)
        await home.answer(request_id, samples.review(claim_id))
        assert home.store.outbox_size() == 1  # committed, never sent
        await testing.kill(home)
        home.store.close()
        back = await home_node(make_node, home_code, state_dir)
        assert back.owed() == []
        await eventually(lambda: len(got) == 1)
        await eventually(lambda: back.store.outbox_size() == 0)
        await asyncio.sleep(0.5)
        assert len(got) == 1
        replies = await read_topic(
            host.bootstrap, host.settings, topic("reply", host_code), expect=2
        )
        answers = [r for r in replies if hdr(r, "xs-message-type") != ACK]
        # One answer (one message id), however many copies: the outbox resumes it, and the
        # request, redelivered because the kill came before its offset was committed, gets
        # the stored answer again. The host takes it once.
        assert {hdr(r, H_CORRELATION_ID) for r in answers} == {request_id}
        assert len({hdr(r, H_MESSAGE_ID) for r in answers}) == 1
        assert {hdr(r, "xs-attempt") for r in answers} == {"2"}  # never the dropped first send

    async def test_rejection_is_answered_as_an_error_report(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """A deferred request can be refused later: an ErrorReport with the code and the
        request's id as correlation and reference."""
        host_code, home_code = province_pool.take(), province_pool.take()
        host = await make_node(host_code)
        home = await home_node(make_node, home_code)
        await host.wait_ready()
        waiting = asyncio.ensure_future(
            host.ask(claim_to(host_code, home_code, f"C-{host_code}-D3"), deadline_s=30)
        )
        await eventually(lambda: len(home.owed()) == 1)
        [owed] = home.owed()
        await home.answer(owed.request_id, Rejection(ErrorCode.AMOUNT_MISMATCH, "reviewer: no"))
        answer = await waiting
        assert answer.code is ErrorCode.AMOUNT_MISMATCH
        assert isinstance(answer.message, ErrorReport)
        assert answer.message.ref_message_id == owed.request_id

    async def test_answer_to_nothing_owed_or_of_the_wrong_family_is_refused(
        self, make_node: NodeFactory, province_pool: ProvincePool
    ) -> None:
        """answer() for an id nobody is owed, or with a reply the contract does not pair with
        the request, raises and sends nothing."""
        host_code, home_code = province_pool.take(), province_pool.take()
        host = await make_node(host_code)
        home = await home_node(make_node, home_code)
        await host.wait_ready()
        with pytest.raises(RoutingError):
            await home.answer("no-such-request", samples.review("X"))
        await host.request(claim_to(host_code, home_code, f"C-{host_code}-D4"), deadline_s=60)
        await eventually(lambda: len(home.owed()) == 1)
        # The acknowledgement the deferral sent leaves the outbox once the broker has it.
        await eventually(lambda: home.store.outbox_size() == 0)
        [owed] = home.owed()
        with pytest.raises(RoutingError):
            await home.answer(owed.request_id, samples.receipt())
        assert home.store.outbox_size() == 0
        assert [o.request_id for o in home.owed()] == [owed.request_id]
