"""Two instances of one province on one PostgreSQL database and one consumer group, on the
real embedded broker and the embedded PostgreSQL: what issue 15 promises of them.

- an answer is matched whichever instance receives it (the pending requests are shared);
- the deadline sweep runs on both and expires each request once;
- the outbox relay of each sends only its own rows, and a dead instance's rows are adopted
  and sent by the survivor, once.

Killing real processes with SIGKILL while claims flow is the crash harness's job
(``xsettle chaos --instances 2 --database embedded-postgres``, tests/test_chaos.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from adapters.gateway.service import Gateway
from adapters.gateway.testing import client, gateway_config, running_gateway
from bus import testing
from bus.broker import create_contract_topics
from bus.constants import H_CORRELATION_ID, H_MESSAGE_ID, topic
from bus.models import ClaimPackage, ErrorCode
from bus.node import Answer, Node
from bus.pg import PostgresDatabase
from bus.settings import BusSettings
from bus.store import SqlStore
from simulators.keys import demo_trust
from tests.conftest import NodeFactory, ProvincePool
from tests.helpers import eventually, hdr, read_topic
from tests.test_node import Reviewer, claim_between

pytestmark = pytest.mark.broker

Pair = tuple[Node, Node]


@pytest.fixture
async def instances(
    broker: str, settings: BusSettings, tmp_path: Path, postgres_url: str
) -> AsyncIterator[Callable[[str], Awaitable[Pair]]]:
    """Makes two started instances of a province sharing ``postgres_url``; stops them."""
    made: list[Node] = []

    async def make(province: str) -> Pair:
        await create_contract_topics(settings, broker, [province])
        local = settings.model_copy(update={"state_dir": tmp_path})
        pair = tuple(
            Node(
                province,
                local,
                bootstrap=broker,
                trust=demo_trust(province, local),
                store=SqlStore(PostgresDatabase(postgres_url)),
            )
            for _ in range(2)
        )
        made.extend(pair)
        return pair[0], pair[1]

    yield make
    for node in made:
        await node.stop()
        node.store.close()


async def split(a: Node, b: Node, *, started: bool = False) -> None:
    """Start both (unless ``started``) and wait until the group shared the inbox's
    partitions between them."""
    if not started:
        await asyncio.gather(a.start(), b.start())
    total = len(a.inbox) * a.settings.partitions
    await eventually(
        lambda: (
            a.assigned_partitions() + b.assigned_partitions() == total
            and min(a.assigned_partitions(), b.assigned_partitions()) > 0
        ),
        timeout_s=30,
    )


def collect(*nodes: Node) -> dict[str, list[Answer]]:
    """The answers each instance's callback was given, by instance (``a``, ``b``)."""
    got: dict[str, list[Answer]] = {}
    for name, node in zip("ab", nodes, strict=False):
        seen: list[Answer] = []
        got[name] = seen

        @node.on_answer(ClaimPackage)
        async def on_answer(answer: Answer, seen: list[Answer] = seen) -> None:
            seen.append(answer)

    return got


def claims(host: str, home: str, n: int) -> list[ClaimPackage]:
    # Different persons: different keys, so the answers spread over the reply partitions.
    return [
        claim_between(host, home, f"C-{host}-{i}", person=f"46010019800101{i:04d}")
        for i in range(n)
    ]


class TestTwoInstances:
    async def test_an_answer_is_matched_by_whichever_instance_receives_it(
        self,
        instances: Callable[[str], Awaitable[Pair]],
        make_node: NodeFactory,
        province_pool: ProvincePool,
    ) -> None:
        host, home = province_pool.take(), province_pool.take()
        a, b = await instances(host)
        got = collect(a, b)
        reviewer = Reviewer()
        responder = await make_node(home, start=False)
        responder.on(ClaimPackage)(reviewer)
        await responder.start()
        await split(a, b)
        sent = [await a.request(c, deadline_s=60) for c in claims(host, home, 30)]
        await eventually(lambda: len(got["a"]) + len(got["b"]) >= len(sent), timeout_s=30)
        await asyncio.sleep(0.5)  # a second delivery would show now
        delivered = Counter(x.request_id for x in got["a"] + got["b"])
        assert delivered == Counter(sent)  # each once, on one instance
        assert got["b"], "the instance that sent nothing matched some of the answers"
        # ask() on A returns even when B received the answer (it looks in the store).
        asked = await asyncio.gather(
            *(a.ask(c, deadline_s=30) for c in claims(host, home, 40)[30:])
        )
        assert all(x.ok for x in asked)
        assert len(reviewer.calls) == 40

    async def test_the_deadline_sweep_expires_each_request_once(
        self, instances: Callable[[str], Awaitable[Pair]], province_pool: ProvincePool
    ) -> None:
        host, silent = province_pool.take(), province_pool.take()
        a, b = await instances(host)
        got = collect(a, b)
        await create_contract_topics(a.settings, a.bootstrap, [silent])
        await split(a, b)
        sent = [await a.request(c, deadline_s=1) for c in claims(host, silent, 20)]
        await eventually(lambda: len(got["a"]) + len(got["b"]) >= len(sent), timeout_s=30)
        await asyncio.sleep(1.0)  # both sweeps ran several times since
        answers = got["a"] + got["b"]
        assert Counter(x.request_id for x in answers) == Counter(sent)
        assert {x.code for x in answers} == {ErrorCode.DEADLINE_EXCEEDED}
        reports = await read_topic(
            a.bootstrap, a.settings, topic("error", silent), expect=len(sent), settle_s=1.0
        )
        assert Counter(hdr(r, H_CORRELATION_ID) for r in reports) == Counter(sent)

    async def test_a_dead_instances_outbox_is_sent_by_the_survivor_once(
        self,
        instances: Callable[[str], Awaitable[Pair]],
        make_node: NodeFactory,
        province_pool: ProvincePool,
    ) -> None:
        """A's step committed requests to its outbox and A died before sending them: B adopts
        the rows (A's session lock is gone with it), sends them, and matches the answers."""
        host, home = province_pool.take(), province_pool.take()
        a, b = await instances(host)
        got = collect(a, b)
        responder = await make_node(home, start=False)
        responder.on(ClaimPackage)(Reviewer())
        await responder.start()
        await split(a, b)
        await testing.kill(a)
        ids = []
        async with a.step():  # committed, never dispatched: what a crash after COMMIT leaves
            for c in claims(host, home, 5):
                pending = a._request_record(c, 60)
                a.store.add_pending(pending)
                a.store.add_outbox(pending.record)
                ids.append(pending.message_id)
        a.store.close()  # the process is gone: its session, and its lock, with it
        await eventually(lambda: len(got["b"]) >= len(ids), timeout_s=30)
        assert Counter(x.request_id for x in got["b"]) == Counter(ids)
        sent = await read_topic(
            b.bootstrap, b.settings, topic("claim", home), expect=len(ids), settle_s=1.0
        )
        assert Counter(hdr(r, H_MESSAGE_ID) for r in sent) == Counter(ids)
        assert b.metrics.get("xsettle_outbox_adopted_total") == len(ids)
        assert b.store.outbox_size() == 0


async def test_two_gateways_of_one_province_are_both_ready(
    broker: str, settings: BusSettings, tmp_path: Path, postgres_url: str
) -> None:
    """Two gateways of Hainan on one PostgreSQL database: each holds a share of the inbox,
    and each answers /readyz 200 (a share is enough on a shared database)."""
    await create_contract_topics(settings, broker, ["460000"])
    shared = settings.model_copy(update={"database_url": postgres_url})
    cfg_a = gateway_config("460000", broker, tmp_path / "a", settings=shared)
    cfg_b = gateway_config("460000", broker, tmp_path / "b", settings=shared)
    async with running_gateway(cfg_a) as a, running_gateway(cfg_b) as b:
        await split(a.system.node, b.system.node, started=True)

        async def ready(gw: Gateway) -> dict[str, Any]:
            async with client(gw) as c:
                r = await c.get("/readyz")
            body: dict[str, Any] = r.json()
            body["status"] = r.status_code
            return body

        shown = [await ready(a), await ready(b)]
        assert [s["status"] for s in shown] == [200, 200], shown
        assert all(
            "other instances hold the rest" in c["detail"]
            for s in shown
            for c in s["checks"]
            if c["name"] == "partitions"
        )
