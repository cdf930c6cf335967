"""The bus runtime on the real embedded broker: the contract's promises, one test each."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import structlog.testing

from bus import consumer_loop, testing
from bus.codec import Codec
from bus.constants import (
    H_ATTEMPT,
    H_CORRELATION_ID,
    H_DLQ_ERROR_KIND,
    H_DLQ_GROUP,
    H_DLQ_OFFSET,
    H_DLQ_PARTITION,
    H_DLQ_TOPIC,
    H_MESSAGE_ID,
    topic,
)
from bus.envelope import Envelope, new_id, now_ms
from bus.errors import Rejection, TransientError
from bus.models import (
    ClaimPackage,
    ErrorCode,
    ErrorReport,
    Message,
    ReviewResult,
    SettlementNotice,
)
from bus.node import Answer, Context, Node
from simulators import samples
from tests.conftest import NodeFactory, ProvincePool
from tests.helpers import eventually, hdr, produce_raw, read_topic

pytestmark = pytest.mark.broker


def region(province: str) -> str:
    """The first pooling region of a province."""
    return province[:2] + "0100"


def claim_between(
    host: str, home: str, claim_id: str | None = None, person: str = samples.PERSON
) -> ClaimPackage:
    """A claim sent by ``host`` to ``home``."""
    return samples.claim(
        home=region(home), host=region(host), claim_id=claim_id or f"C-{host}-1", person=person
    )


class Reviewer:
    """A home handler that approves every claim and counts how often it ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, message: Message, ctx: Context) -> Message | None:
        assert isinstance(message, ClaimPackage)
        self.calls.append(message.claim_id)
        return samples.review(message.claim_id)


async def pair(
    make_node: NodeFactory, pool: ProvincePool, **kw: object
) -> tuple[Node, Node, Reviewer]:
    """A host (requester) and a home (responder with a Reviewer), both ready."""
    host, home = pool.take(), pool.take()
    reviewer = Reviewer()
    host_node = await make_node(host, start=False, **kw)
    home_node = await make_node(home, start=False, **kw)
    home_node.on(ClaimPackage)(reviewer)
    await asyncio.gather(host_node.start(), home_node.start())
    await asyncio.gather(host_node.wait_ready(), home_node.wait_ready())
    return host_node, home_node, reviewer


class TestRequestAnswer:
    async def test_normal_flow_gives_one_terminal_answer(
        self, make_node: NodeFactory, province_pool: ProvincePool
    ) -> None:
        """A claim is answered by exactly one ReviewResult, matched by correlation id."""
        host, home, reviewer = await pair(make_node, province_pool)
        answer = await host.ask(claim_between(host.province, home.province), deadline_s=10)
        assert answer.ok
        assert not answer.late
        assert isinstance(answer.message, ReviewResult)
        assert answer.message.claim_id == f"C-{host.province}-1"
        assert reviewer.calls == [f"C-{host.province}-1"]
        replies = await read_topic(
            host.bootstrap, host.settings, topic("reply", host.province), expect=1
        )
        assert len(replies) == 1
        assert hdr(replies[0], H_CORRELATION_ID) == answer.request_id
        assert host.metrics.get("xsettle_answers_total", outcome="ok") == 1

    async def test_same_request_three_times_is_handled_once(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """A request sent three times (the first send and two re-sends: same id, attempt + 1)
        runs the handler once; the stored answer is re-sent and the requester counts one
        terminal answer."""
        host, home, reviewer = await pair(make_node, province_pool)
        request_id = await host.request(claim_between(host.province, home.province), deadline_s=30)
        pending = host.store.get_pending(request_id)
        assert pending is not None
        rec = pending.record
        env = Envelope.from_headers(rec.headers)
        for _ in range(2):
            env = env.resent()
            await produce_raw(
                host.bootstrap, host.settings, rec.topic, rec.value, env.to_headers(), rec.key
            )
        replies = await read_topic(
            host.bootstrap, host.settings, topic("reply", host.province), expect=3
        )
        assert len(replies) == 3
        assert {hdr(r, H_MESSAGE_ID) for r in replies} == {hdr(replies[0], H_MESSAGE_ID)}
        assert reviewer.calls == [f"C-{host.province}-1"]
        await eventually(lambda: host.metrics.get("xsettle_duplicates_total", family="reply") == 2)
        assert host.metrics.get("xsettle_answers_total", outcome="ok") == 1

    async def test_responder_crash_before_commit_does_not_handle_twice(
        self,
        make_node: NodeFactory,
        province_pool: ProvincePool,
        state_dir: Path,
    ) -> None:
        """A responder killed after answering but before committing re-sends its stored
        answer on restart instead of reviewing again."""
        host_code, home_code = province_pool.take(), province_pool.take()
        host = await make_node(host_code)
        reviewer = Reviewer()
        home = await make_node(home_code, start=False, state=state_dir)
        home.on(ClaimPackage)(reviewer)
        await home.start()
        await asyncio.gather(host.wait_ready(), home.wait_ready())
        # No commit for a long time: the kill lands after the answer, before any commit.
        consumer_loop.COMMIT_INTERVAL_S = 3600.0
        try:
            answer = await host.ask(claim_between(host_code, home_code), deadline_s=10)
            assert answer.ok
            await testing.kill(home)
        finally:
            consumer_loop.COMMIT_INTERVAL_S = 0.1
        home.store.close()
        again = await make_node(home_code, start=False, state=state_dir)
        again.on(ClaimPackage)(reviewer)
        await again.start()
        replies = await read_topic(
            host.bootstrap, host.settings, topic("reply", host_code), expect=2
        )
        # The original answer and its re-sends after the crash (from the outbox, if the kill
        # came before the acknowledged row was removed, and for the redelivered request):
        # one message id, one review.
        assert len(replies) >= 2
        assert len({hdr(r, H_MESSAGE_ID) for r in replies}) == 1
        assert reviewer.calls == [f"C-{host.province}-1"]
        dups = len(replies) - 1
        await eventually(
            lambda: host.metrics.get("xsettle_duplicates_total", family="reply") == dups
        )
        assert host.metrics.get("xsettle_answers_total", outcome="ok") == 1

    async def test_requester_restart_still_matches_answers(
        self,
        make_node: NodeFactory,
        province_pool: ProvincePool,
        state_dir: Path,
    ) -> None:
        """Answers that arrive while the requester is down are matched from its durable
        store when it comes back, and handed to its callback once."""
        host_code, home_code = province_pool.take(), province_pool.take()
        host = await make_node(host_code, state=state_dir)
        await host.wait_ready()
        request_id = await host.request(claim_between(host_code, home_code), deadline_s=60)
        await eventually(lambda: host.store.outbox_size() == 0)  # it left before the crash
        await testing.kill(host)
        host.store.close()
        home = await make_node(home_code, start=False)
        home.on(ClaimPackage)(Reviewer())
        await home.start()
        await read_topic(host.bootstrap, host.settings, topic("reply", host_code), expect=1)
        got: list[Answer] = []
        back = await make_node(host_code, start=False, state=state_dir)

        @back.on_answer(ClaimPackage)
        async def collect(answer: Answer) -> None:
            got.append(answer)

        await back.start()
        await eventually(lambda: len(got) == 1)
        assert got[0].request_id == request_id
        assert got[0].ok
        await asyncio.sleep(0.5)
        assert len(got) == 1


class TestFailurePaths:
    async def test_rejection_becomes_an_error_report_answer(
        self, make_node: NodeFactory, province_pool: ProvincePool
    ) -> None:
        """A handler's Rejection reaches the sender's error topic with its code and the
        request's correlation id, and is the request's terminal answer."""
        host, home, _ = await pair(make_node, province_pool)

        @home.on(ClaimPackage)
        async def refuse(message: Message, ctx: Context) -> Message | None:
            raise Rejection(ErrorCode.NOT_FILED, "no filing for this person")

        answer = await host.ask(claim_between(host.province, home.province), deadline_s=10)
        assert answer.code is ErrorCode.NOT_FILED
        errors = await read_topic(
            host.bootstrap, host.settings, topic("error", host.province), expect=1
        )
        assert [hdr(r, H_CORRELATION_ID) for r in errors] == [answer.request_id]
        decoded = Codec().decode(errors[0].value or b"")
        assert isinstance(decoded, ErrorReport)
        assert decoded.origin == host.province
        assert decoded.detected_by == home.province

    async def test_transient_failure_is_retried_then_answered(
        self, make_node: NodeFactory, province_pool: ProvincePool
    ) -> None:
        """A handler that fails twice then succeeds is retried with backoff and answers."""
        host, home, _ = await pair(make_node, province_pool)
        tries: list[float] = []

        @home.on(ClaimPackage)
        async def flaky(message: Message, ctx: Context) -> Message | None:
            tries.append(time.monotonic())
            if len(tries) < 3:
                raise TransientError("back office busy")
            assert isinstance(message, ClaimPackage)
            return samples.review(message.claim_id)

        answer = await host.ask(claim_between(host.province, home.province), deadline_s=10)
        assert answer.ok
        assert len(tries) == 3
        assert tries[2] - tries[1] >= tries[1] - tries[0]  # backoff grows

    async def test_exhausted_retries_become_internal_error(
        self, make_node: NodeFactory, province_pool: ProvincePool
    ) -> None:
        """After the last try the sender gets INTERNAL_ERROR (retriable) and ops a copy."""
        host, home, _ = await pair(make_node, province_pool)

        @home.on(ClaimPackage)
        async def broken(message: Message, ctx: Context) -> Message | None:
            raise RuntimeError("database down")

        answer = await host.ask(claim_between(host.province, home.province), deadline_s=10)
        assert answer.code is ErrorCode.INTERNAL_ERROR
        assert isinstance(answer.message, ErrorReport)
        assert answer.message.retriable
        ops = await read_topic(
            host.bootstrap, host.settings, topic("error", home.province), expect=1
        )
        assert [hdr(r, H_CORRELATION_ID) for r in ops] == [answer.request_id]

    async def test_undecodable_records_go_to_the_dlq_unchanged(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """Garbage and an unknown fingerprint land in the DLQ byte for byte with diagnostic
        headers, the sender gets INVALID_MESSAGE, and the consumer keeps going."""
        host, home, _reviewer = await pair(make_node, province_pool)
        claim_topic = topic("claim", home.province)
        good = codec.encode(claim_between(host.province, home.province))
        bad_values = [b"\x00garbage", good[:2] + b"\xff" * 8 + good[10:]]
        for i, value in enumerate(bad_values):
            env = Envelope(
                message_id=f"bad-{i}",
                message_type=ClaimPackage.avro_name,
                source=host.province,
                target=home.province,
                sent_at_ms=now_ms(),
                reply_to=topic("reply", host.province),
                deadline_ms=now_ms() + 60_000,
            )
            await produce_raw(
                host.bootstrap, host.settings, claim_topic, value, env.to_headers(), b"p1"
            )
        answer = await host.ask(claim_between(host.province, home.province), deadline_s=10)
        assert answer.ok  # the consumer kept going
        dead = await read_topic(
            host.bootstrap, host.settings, topic("dlq", home.province), expect=2
        )
        assert sorted(d.value or b"" for d in dead) == sorted(bad_values)
        kinds = sorted(hdr(d, H_DLQ_ERROR_KIND) or "" for d in dead)
        assert kinds == ["bad_marker", "unknown_fingerprint"]
        for d in dead:
            assert hdr(d, H_DLQ_TOPIC) == claim_topic
            assert hdr(d, H_DLQ_PARTITION) is not None
            assert hdr(d, H_DLQ_OFFSET) is not None
            assert hdr(d, H_DLQ_GROUP) == home.group
            assert d.key == b"p1"
        errors = await read_topic(
            host.bootstrap, host.settings, topic("error", host.province), expect=2
        )
        reports = [codec.decode(e.value or b"") for e in errors]
        assert {r.code for r in reports if isinstance(r, ErrorReport)} == {
            ErrorCode.INVALID_MESSAGE
        }
        assert sorted(hdr(e, H_CORRELATION_ID) or "" for e in errors) == ["bad-0", "bad-1"]

    async def test_header_contradicting_payload_is_invalid(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """A claim whose xs-source is not the province of its host region is dead-lettered
        and answered INVALID_MESSAGE."""
        host, home, reviewer = await pair(make_node, province_pool)
        other = province_pool.take()
        env = Envelope(
            message_id="liar",
            message_type=ClaimPackage.avro_name,
            source=host.province,
            target=home.province,
            sent_at_ms=now_ms(),
            reply_to=topic("reply", host.province),
            deadline_ms=now_ms() + 60_000,
        )
        value = codec.encode(claim_between(other, home.province))
        await produce_raw(
            host.bootstrap, host.settings, topic("claim", home.province), value, env.to_headers()
        )
        dead = await read_topic(
            host.bootstrap, host.settings, topic("dlq", home.province), expect=1
        )
        assert hdr(dead[0], H_DLQ_ERROR_KIND) == "header_mismatch"
        assert reviewer.calls == []


class TestDeadlines:
    async def test_deadline_exceeded_then_late_answer_not_double_counted(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """With no answer by the deadline the caller gets DEADLINE_EXCEEDED, reported to the
        target's and its own error topics; a late answer is delivered as late only."""
        host_code, home_code = province_pool.take(), province_pool.take()
        host = await make_node(host_code)
        await host.wait_ready()
        got: list[Answer] = []

        @host.on_answer(ClaimPackage)
        async def collect(answer: Answer) -> None:
            got.append(answer)

        answer = await host.ask(claim_between(host_code, home_code), deadline_s=0.5)
        assert answer.code is ErrorCode.DEADLINE_EXCEEDED
        for province in (home_code, host_code):
            reports = await read_topic(
                host.bootstrap, host.settings, topic("error", province), expect=1
            )
            assert [hdr(r, H_CORRELATION_ID) for r in reports] == [answer.request_id]
        late = Envelope(
            message_id=new_id(),
            message_type=ReviewResult.avro_name,
            source=home_code,
            target=host_code,
            sent_at_ms=now_ms(),
            correlation_id=answer.request_id,
        )
        await produce_raw(
            host.bootstrap,
            host.settings,
            topic("reply", host_code),
            codec.encode(samples.review(f"C-{host_code}-1")),
            late.to_headers(),
        )
        await eventually(lambda: len(got) == 2)
        assert [a.late for a in got] == [False, True]
        assert host.metrics.get("xsettle_answers_total", outcome="deadline") == 1
        assert host.metrics.get("xsettle_answers_total", outcome="late") == 1
        assert host.metrics.get("xsettle_answers_total", outcome="ok") == 0

    async def test_resend_keeps_the_id_and_counts_attempts(
        self, make_node: NodeFactory, province_pool: ProvincePool
    ) -> None:
        """Re-sending an unanswered request keeps xs-message-id and increments xs-attempt."""
        host_code, home_code = province_pool.take(), province_pool.take()
        host = await make_node(host_code)
        request_id = await host.request(claim_between(host_code, home_code), deadline_s=60)
        assert await host.resend(request_id)
        assert await host.resend(request_id)
        sent = await read_topic(host.bootstrap, host.settings, topic("claim", home_code), expect=3)
        assert {hdr(r, H_MESSAGE_ID) for r in sent} == {request_id}
        assert sorted(hdr(r, H_ATTEMPT) or "" for r in sent) == ["1", "2", "3"]


class TestAnswersMatchingNothing:
    async def test_orphan_and_duplicate_answers(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """An answer to a request nobody sent is reported ORPHAN_REPLY to its sender; a
        second, different answer to an answered request is ignored and logged."""
        host, home, _ = await pair(make_node, province_pool)
        answer = await host.ask(claim_between(host.province, home.province), deadline_s=10)
        assert answer.ok
        for correlation, wanted in (("nobody-sent-this", 1), (answer.request_id, 2)):
            env = Envelope(
                message_id=new_id(),
                message_type=ReviewResult.avro_name,
                source=home.province,
                target=host.province,
                sent_at_ms=now_ms(),
                correlation_id=correlation,
            )
            with structlog.testing.capture_logs() as logs:
                await produce_raw(
                    host.bootstrap,
                    host.settings,
                    topic("reply", host.province),
                    codec.encode(samples.review(f"C-{host.province}-1")),
                    env.to_headers(),
                )
                await eventually(
                    lambda n=wanted: (  # type: ignore[misc]
                        host.metrics.get("xsettle_answers_total", outcome="orphan")
                        + host.metrics.get("xsettle_answers_total", outcome="duplicate")
                        >= n
                    )
                )
            events = {entry["event"] for entry in logs}
            assert events & {"orphan_reply", "duplicate_answer_ignored"}
        errors = await read_topic(
            host.bootstrap, host.settings, topic("error", home.province), expect=1
        )
        report = codec.decode(errors[0].value or b"")
        assert isinstance(report, ErrorReport)
        assert report.code is ErrorCode.ORPHAN_REPLY
        assert host.metrics.get("xsettle_answers_total", outcome="ok") == 1


class TestOrdering:
    async def test_order_per_key_is_kept_under_concurrency(
        self, make_node: NodeFactory, province_pool: ProvincePool
    ) -> None:
        """Notices for many persons, handled concurrently across partitions, arrive in send
        order for each person."""
        host_code, home_code = province_pool.take(), province_pool.take()
        host = await make_node(host_code)
        home = await make_node(home_code, start=False)
        seen: dict[bytes, list[int]] = {}

        @home.on(SettlementNotice)
        async def record(message: Message, ctx: Context) -> Message | None:
            assert isinstance(message, SettlementNotice)
            await asyncio.sleep(0.001 * (hash(ctx.record.key) % 3))
            seen.setdefault(ctx.record.key or b"", []).append(message.personal_paid_fen)
            return None

        await home.start()
        await home.wait_ready()
        persons = [f"p{i}".encode() for i in range(12)]
        sends = []
        for seq in range(25):
            for person in persons:
                notice = samples.notice().model_copy(update={"personal_paid_fen": seq})
                sends.append(host.publish(notice, target=home_code, key=person))
        await asyncio.gather(*sends)
        await eventually(lambda: sum(len(v) for v in seen.values()) == 25 * 12, timeout_s=30)
        assert all(v == list(range(25)) for v in seen.values())
        assert len(seen) == 12


class TestCrashWindows:
    async def test_deadline_not_lost_when_the_callback_crashes(
        self, make_node: NodeFactory, province_pool: ProvincePool, state_dir: Path
    ) -> None:
        """A DEADLINE_EXCEEDED whose callback failed (a crash mid-step) leaves the request
        pending, so the node handles the deadline when it starts next time."""
        host_code, home_code = province_pool.take(), province_pool.take()
        first = await make_node(host_code, start=False, state=state_dir)

        @first.on_answer(ClaimPackage)
        async def crash(answer: Answer) -> None:
            raise RuntimeError("power cut")

        await first.start(consume=False)
        request_id = await first.request(claim_between(host_code, home_code), deadline_s=0.2)
        await eventually(lambda: first.metrics.get("xsettle_deadline_failures_total") >= 1)
        await first.stop()
        first.store.close()
        assert first.store is not None
        got: list[Answer] = []
        second = await make_node(host_code, start=False, state=state_dir)

        @second.on_answer(ClaimPackage)
        async def collect(answer: Answer) -> None:
            got.append(answer)

        await second.start(consume=False)
        await eventually(lambda: len(got) == 1)
        assert [(a.request_id, a.code) for a in got] == [(request_id, ErrorCode.DEADLINE_EXCEEDED)]
        pending = second.store.get_pending(request_id)
        assert pending is not None
        assert pending.state == "expired"


class TestBatches:
    async def test_a_failing_record_is_undone_alone_and_the_batch_goes_on(
        self, make_node: NodeFactory, province_pool: ProvincePool, codec: Codec
    ) -> None:
        """Twenty claims of one person wait in one partition and are handled in one step.
        The seventh fails once after its handler sent a notice: only its work is undone
        (the notice is never sent), the six before it commit, it is tried again on its own,
        and the rest follow in order; every claim answered once."""
        host_code, home_code = province_pool.take(), province_pool.take()
        host = await make_node(host_code)
        home = await make_node(home_code, start=False)
        calls: list[str] = []
        steps: list[int] = []
        failed: set[str] = set()
        ids = [f"C-{region(host_code)}-{i}" for i in range(1, 21)]

        @home.on(ClaimPackage)
        async def review(message: Message, ctx: Context) -> Message | None:
            assert isinstance(message, ClaimPackage)
            calls.append(message.claim_id)
            steps.append(id(ctx.node.store.current()))
            note = samples.notice().model_copy(update={"claim_id": message.claim_id})
            await ctx.node.publish(note, target=host_code, key=b"side")
            if message.claim_id == ids[6] and message.claim_id not in failed:
                failed.add(message.claim_id)
                raise RuntimeError("the back office hiccups once")
            return samples.review(message.claim_id)

        answers: list[Answer] = []

        @host.on_answer(ClaimPackage)
        async def answered(answer: Answer) -> None:
            answers.append(answer)

        for c in ids:
            await host.request(claim_between(host_code, home_code, c), deadline_s=30)
        await home.start()
        await eventually(lambda: len(answers) >= 20, timeout_s=30)
        assert all(a.ok for a in answers)
        assert calls == ids[:7] + ids[6:]  # in order; the seventh twice
        assert len(set(steps[:6])) == 1  # the six before it: one step (one transaction)
        notices = await read_topic(
            host.bootstrap, host.settings, topic("settlement", host_code), expect=20
        )
        noticed = [codec.decode_as(r.value or b"", SettlementNotice).claim_id for r in notices]
        assert sorted(noticed) == sorted(ids)  # the failed try's notice was never sent
        assert home.metrics.get("xsettle_handler_retries_total", type=ClaimPackage.avro_name) == 1
