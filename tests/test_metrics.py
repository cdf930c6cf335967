"""The metrics an operator reads by province: labels, labelled gauges, the outbox's age, and
what a node serves about the provinces it asks (on the real embedded broker)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

import bus.node_core
from bus.exporter import registry_for, render
from bus.metrics import OTHER, Metrics, _labels, province_label
from bus.models import ClaimPackage, ErrorCode
from bus.outbox import Relay, route_of_topic
from bus.store import OutRecord, SqlStore
from bus.transport import Producer
from simulators import samples
from tests.conftest import NodeFactory, ProvincePool
from tests.helpers import eventually


class TestLabels:
    def test_a_key_does_not_depend_on_the_order_of_the_labels(self) -> None:
        """One, two or three labels in any order make the same key, sorted by name."""
        assert _labels({"b": "1", "a": "2"}) == _labels({"a": "2", "b": "1"})
        assert _labels({"b": "1", "a": "2"}) == (("a", "2"), ("b", "1"))
        assert _labels({"c": "1", "a": "2", "b": "3"}) == (("a", "2"), ("b", "3"), ("c", "1"))
        assert _labels({"a": "1"}) == (("a", "1"),)
        assert _labels({}) == ()

    def test_get_sums_the_series_that_have_the_labels_asked(self) -> None:
        """A counter asked by some of its labels is the sum of its series having them; the
        order the labels were given in does not matter."""
        metrics = Metrics()
        metrics.inc("x_total", outcome="ok", counterparty="130000")
        metrics.inc("x_total", counterparty="130000", outcome="ok")
        metrics.inc("x_total", outcome="ok", counterparty="460000")
        metrics.inc("x_total", outcome="deadline", counterparty="460000")
        assert metrics.get("x_total", outcome="ok", counterparty="130000") == 2
        assert metrics.get("x_total", outcome="ok") == 3
        assert metrics.get("x_total", counterparty="460000") == 2
        assert metrics.get("x_total") == 4
        assert metrics.get("x_total", outcome="refused") == 0
        assert metrics.get("y_total") == 0

    def test_only_province_codes_become_label_values(self) -> None:
        """A province code is its own label value; anything else a sender wrote is OTHER."""
        assert province_label("130000") == "130000"
        for written in ("13000", "130001", "C-130000-1", "", None, "unknown"):
            assert province_label(written) == OTHER

    def test_a_labelled_gauge_is_served_one_series_a_value(self) -> None:
        """gauge_by: a series per value of its label, the node's province beside it; in the
        snapshot too."""

        class Node:
            province = "460000"
            metrics = Metrics()

        node = Node()
        node.metrics.gauge_by(
            "xsettle_overdue_requests", "counterparty", lambda: {"130000": 2.0, "140000": 0.0}
        )
        text = render(registry_for([node])[0]).decode("utf-8")
        assert 'xsettle_overdue_requests{counterparty="130000",province="460000"} 2.0' in text
        assert 'xsettle_overdue_requests{counterparty="140000",province="460000"} 0.0' in text
        assert node.metrics.snapshot()["gauges_by"] == {
            "xsettle_overdue_requests": {
                "label": "counterparty",
                "values": {"130000": 2.0, "140000": 0.0},
            }
        }

    def test_a_failing_gauge_does_not_break_the_scrape(self) -> None:
        """A labelled gauge that raises is left out; the rest is served."""

        class Node:
            province = "460000"
            metrics = Metrics()

        def broken() -> dict[str, float]:
            raise RuntimeError("database gone")

        node = Node()
        node.metrics.gauge_by("xsettle_overdue_requests", "counterparty", broken)
        node.metrics.gauge("xsettle_pending_requests", lambda: 1.0)
        text = render(registry_for([node])[0]).decode("utf-8")
        assert 'xsettle_pending_requests{province="460000"} 1.0' in text
        assert "xsettle_overdue_requests{" not in text

    def test_the_process_and_the_build_are_served(self) -> None:
        """Every registry serves the process's memory, CPU and start time, and the build."""

        class Node:
            province = "460000"
            metrics = Metrics()

        text = render(registry_for([Node()])[0]).decode("utf-8")
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {
            "process_resident_memory_bytes",
            "process_cpu_seconds",
            "process_start_time_seconds",
            "process_open_fds",
            "xsettle_build_info",
        } <= names
        assert 'xsettle_build_info{contract="1.3",province="460000",python=' in text

    def test_route_of_topic(self) -> None:
        """(family, province) of a contract topic; ``?`` outside the contract."""
        assert route_of_topic("xsettle.claim.130000") == ("claim", "130000")
        assert route_of_topic("xsettle.dlq.460000") == ("dlq", "460000")
        assert route_of_topic("other.topic") == ("?", "?")


class _HeldProducer:
    """A producer whose broker acknowledges a record only when the test says so."""

    def __init__(self) -> None:
        self.acks: list[asyncio.Future[object]] = []

    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: object
    ) -> asyncio.Future[object]:
        ack: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        return ack


class TestOutboxAge:
    async def test_the_oldest_record_waiting_for_the_broker_has_an_age(
        self, tmp_path: Path
    ) -> None:
        """The age of the oldest record not yet acknowledged grows while the broker holds
        it, falls to 0 once it takes it; the record then counts as out to its province."""
        store = SqlStore(tmp_path / "bus.sqlite3")
        producer = _HeldProducer()
        metrics = Metrics()
        relay = Relay(store, cast("Producer", producer), metrics, "460000")
        await relay.start()
        try:
            assert relay.oldest_age_s() == 0.0
            record = OutRecord("xsettle.claim.130000", b"k", b"v", ())
            async with store.step():
                row = store.add_outbox(record)
            [done] = relay.dispatch([(row, record)])
            await eventually(lambda: len(producer.acks) == 1)
            await asyncio.sleep(0.2)
            assert relay.oldest_age_s() >= 0.2
            producer.acks[0].set_result(None)
            await done
            assert relay.oldest_age_s() == 0.0
            got = metrics.get("xsettle_messages_out_total", family="claim", counterparty="130000")
            assert got == 1
        finally:
            await relay.stop()
            store.close()


@pytest.mark.broker
class TestCounterpartyGauges:
    async def test_a_request_past_its_deadline_shows_by_its_counterparty(
        self,
        make_node: NodeFactory,
        province_pool: ProvincePool,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A request to a province that does not answer, once past its deadline and before
        the sweep expires it, is overdue for that province, with its age; the sweep turns
        it into DEADLINE_EXCEEDED, counted for that province, and the gauges fall back."""
        monkeypatch.setattr(bus.node_core, "PENDING_STATS_TTL_S", 0.0)
        host_code, silent, other = (province_pool.take() for _ in range(3))
        node = await make_node(host_code, sweep_interval_ms=600_000)
        await node.wait_ready()

        def claim(to: str, n: int) -> ClaimPackage:
            return samples.claim(
                home=to[:2] + "0100", host=host_code[:2] + "0100", claim_id=f"C-{host_code}-{n}"
            )

        await node.request(claim(silent, 1), deadline_s=0.2)
        await node.request(claim(other, 2), deadline_s=600)
        await asyncio.sleep(0.4)
        snap = node.metrics.snapshot()["gauges_by"]
        assert isinstance(snap, dict)
        assert snap["xsettle_overdue_requests"]["values"] == {silent: 1, other: 0}
        assert snap["xsettle_pending_requests_by_counterparty"]["values"] == {silent: 1, other: 1}
        ages = snap["xsettle_oldest_pending_request_age_seconds"]["values"]
        assert ages[silent] >= 0.4
        assert ages[silent] > ages[other] >= 0
        text = render(registry_for([node])[0]).decode("utf-8")
        mine = f'counterparty="{silent}",province="{host_code}"'
        assert f"xsettle_overdue_requests{{{mine}}} 1.0" in text
        sent = f'xsettle_requests_sent_total{{counterparty="{silent}",family="claim",'
        assert f'{sent}province="{host_code}"}} 1.0' in text

        assert await node.sweep() == 1
        snap = node.metrics.snapshot()["gauges_by"]
        assert isinstance(snap, dict)
        assert snap["xsettle_overdue_requests"]["values"] == {other: 0}
        assert node.metrics.get("xsettle_answers_total", outcome="deadline", counterparty=silent)
        code = ErrorCode.DEADLINE_EXCEEDED.value
        assert node.metrics.get("xsettle_errors_total", code=code, responsible=silent) == 2


@pytest.mark.broker
async def test_a_stalled_run_names_the_provinces_owing_answers(
    make_node: NodeFactory, province_pool: ProvincePool
) -> None:
    """The progress display's "waiting for" (``Simulation.waiting_for``): the provinces that
    owe the provinces run here answers, most first, from the same grouped read as the
    gauges."""
    from types import SimpleNamespace

    from adapters.directory import Directory
    from simulators.demo import Simulation

    host_code, busy, quiet = (province_pool.take() for _ in range(3))
    node = await make_node(host_code, sweep_interval_ms=600_000)
    await node.wait_ready()
    for n, to in enumerate((busy, busy, quiet)):
        claim = samples.claim(
            home=to[:2] + "0100", host=host_code[:2] + "0100", claim_id=f"C-{host_code}-{n}"
        )
        await node.request(claim, deadline_s=600)
    directory = Directory.default()
    sim: Any = SimpleNamespace(
        directory=directory,
        scenario=SimpleNamespace(faults=SimpleNamespace(silent_home=None)),
        systems={host_code: SimpleNamespace(node=node)},
    )
    waits = Simulation.waiting_for(sim)
    assert [w.split()[0] for w in waits] == [busy, quiet]
    assert waits[0].endswith("(2 unanswered)")
    assert waits[1].endswith("(1 unanswered)")
