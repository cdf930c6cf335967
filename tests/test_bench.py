"""Smoke test of ``xsettle bench``: every figure is produced, positive, and in the JSON, on
SQLite and on PostgreSQL (the embedded server the bench starts itself).

No timing is asserted: the numbers depend on the machine.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from bus.settings import BusSettings
from simulators.bench import TINY, WINDOW, Plan, make_plan, run_bench, table, write_report
from simulators.bench_faststream import NOT_INSTALLED, FastStreamEcho
from tests.conftest import ProvincePool

pytestmark = pytest.mark.broker


def _positive(figure: dict[str, Any]) -> None:
    assert figure["median"] > 0
    assert figure["min"] > 0
    assert figure["max"] >= figure["median"] >= figure["min"]


def _store_figures(store: dict[str, Any], size: int) -> None:
    """The query and sweep figures of one store size, and what they found."""
    assert store["pending"] == size
    assert store["insert_s"] > 0
    assert store["add_pending_one_ms"] > 0
    for key in ("query_due_ms", "get_pending_ms", "count_ms", "unacknowledged_ms",
                "expire_due_ms"):  # fmt: skip
        _positive(store[key])
        assert store[key]["unit"] == "ms"
    assert store["swept"] == TINY.sweep
    assert store["lookups"] == TINY.lookups
    assert store["runs"] >= 1
    # each run's sweep expired a whole batch: the rest (and the one add_pending) still pending
    assert store["pending_after"] == size + 1 - store["runs"] * TINY.sweep
    # the re-send scan found a full batch of never-acknowledged requests ahead of the sweep
    assert store["unacknowledged_found"] == TINY.sweep


@pytest.mark.timeout(240)
async def test_quick_bench_writes_every_figure(
    broker: str, settings: BusSettings, province_pool: ProvincePool, tmp_path: Path
) -> None:
    codes = [province_pool.take() for _ in range(12)]
    plan = Plan(
        sizes=TINY,
        repeat=1,
        bus_pair=(codes[0], codes[1]),
        e2e_pair=(codes[2], codes[3]),
        province_codes={2: codes[4:6]},
        unsigned_pair=(codes[6], codes[7]),
        pg_bus_pair=(codes[8], codes[9]),
        pg_e2e_pair=(codes[10], codes[11]),
    )
    assert plan.postgres
    # The bench's state (and its embedded PostgreSQL's data) outside pytest's temp root: run as
    # root, the server is another user who must traverse to its data, and a pytest starting
    # meanwhile makes /tmp/pytest-of-root private again (0700), which crashes the server.
    with tempfile.TemporaryDirectory(prefix="xsettle-bench-test-") as state:
        doc = await run_bench(settings, broker, plan, Path(state))
    path = write_report(tmp_path / "reports" / "bench.json", doc)
    loaded = json.loads(path.read_text(encoding="utf-8"))

    assert set(loaded) >= {"machine", "config", "results", "seconds"}
    assert loaded["machine"]["cores"] >= 1
    assert {"python", "packages"} <= set(loaded["machine"])
    assert {"aiokafka", "fastavro", "pydantic"} <= set(loaded["machine"]["packages"])
    results = loaded["results"]
    assert set(results) == {
        "raw", "bus", "bus_unsigned", "latency", "latency_unsigned", "e2e", "codec", "store",
        "provinces", "signing", "bus_postgresql", "latency_postgresql", "e2e_postgresql",
        "store_postgresql", "postgresql", "faststream",
    }  # fmt: skip
    assert loaded["config"]["postgresql"] == "embedded"

    _positive(results["raw"]["round_trips_per_s"])
    _positive(results["bus"]["round_trips_per_s"])
    assert results["bus"]["ratio_to_raw"] > 0
    _positive(results["e2e"]["claims_per_s"])
    assert results["e2e"]["ratio_to_raw"] > 0
    assert results["latency"]["offered_per_s"] > 0
    for key in ("p50_ms", "p99_ms", "p999_ms"):
        _positive(results["latency"][key])

    # Signing on and off, both measured, each really what it says.
    signed, unsigned = results["bus"], results["bus_unsigned"]
    assert signed["signed"] is True
    assert unsigned["signed"] is False
    _positive(unsigned["round_trips_per_s"])
    assert unsigned["ratio_to_raw"] > 0
    assert unsigned["signed_to_unsigned"] > 0
    assert signed["handled"] > 0
    assert signed["handled_signed"] == signed["handled"]
    assert unsigned["handled"] > 0
    assert unsigned["handled_signed"] == 0
    bare_latency = results["latency_unsigned"]
    assert bare_latency["offered_per_s"] == results["latency"]["offered_per_s"]
    for key in ("p50_ms", "p99_ms", "p999_ms"):
        _positive(bare_latency[key])
    assert bare_latency["p50_signed_to_unsigned"] > 0
    assert bare_latency["p99_signed_to_unsigned"] > 0

    # The same bus and claims on PostgreSQL: really there (the engine the stores ran on, the
    # answers read back from its database), beside SQLite's.
    assert signed["database"] == "sqlite"
    assert results["e2e"]["database"] == "sqlite"
    pg_bus = results["bus_postgresql"]
    assert pg_bus["database"] == "postgresql"
    assert pg_bus["signed"] is True
    _positive(pg_bus["round_trips_per_s"])
    assert pg_bus["ratio_to_raw"] > 0
    assert pg_bus["to_sqlite"] > 0
    assert pg_bus["handled"] > 0
    assert pg_bus["handled_signed"] == pg_bus["handled"]
    for figure in (signed, unsigned, pg_bus):
        assert figure["delivered"] >= TINY.bus * plan.repeat
    pg_latency = results["latency_postgresql"]
    # Each bus at half its own signed throughput.
    assert pg_latency["offered_per_s"] == pytest.approx(pg_bus["round_trips_per_s"]["median"] / 2)
    assert results["latency"]["offered_per_s"] == pytest.approx(
        signed["round_trips_per_s"]["median"] / 2
    )
    for key in ("p50_ms", "p99_ms", "p999_ms"):
        _positive(pg_latency[key])
    pg_e2e = results["e2e_postgresql"]
    assert pg_e2e["database"] == "postgresql"
    _positive(pg_e2e["claims_per_s"])
    assert pg_e2e["ratio_to_raw"] > 0
    assert pg_e2e["to_sqlite"] > 0
    for figure in (results["e2e"], pg_e2e):
        assert figure["delivered"] >= TINY.e2e * plan.repeat
    server = results["postgresql"]
    assert server["embedded"] is True
    assert server["server_version"][0].isdigit()
    assert server["start_s"] > 0
    assert {"fsync", "synchronous_commit", "shared_buffers"} <= set(server)

    signing = results["signing"]
    assert signing["iterations"] == TINY.signing
    assert signing["items"] == 10
    assert signing["value_bytes"] > 0
    assert signing["canonical_bytes"] > signing["value_bytes"]
    for key in ("sign", "verify", "canonical", "receive_verify", "receive_accept", "receive_total"):
        _positive(signing[key]["p50_us"])
        _positive(signing[key]["p99_us"])
        assert signing[key]["p99_us"]["median"] >= signing[key]["p50_us"]["median"]
        assert signing[key]["p50_us"]["unit"] == "µs"
    # every record of the receive loop was verified, accepted and logged once
    assert signing["audit_entries"] == TINY.signing * plan.repeat

    families = {"filing", "claim", "receipt", "review", "settlement", "error"}
    assert set(results["codec"]) == families
    for figures in results["codec"].values():
        for key in ("encode_per_s", "decode_per_s", "fastavro_write_per_s", "fastavro_read_per_s"):
            _positive(figures[key])
        assert figures["encode_ratio"] > 0
        assert figures["decode_ratio"] > 0

    size = TINY.store[0]
    store = results["store"][str(size)]
    assert store["file_mb"] > 0
    _store_figures(store, size)
    assert set(results["store_postgresql"]) == {str(size)}
    pg_store = results["store_postgresql"][str(size)]
    _store_figures(pg_store, size)
    assert pg_store["vacuum_checkpoint_s"] > 0
    assert pg_store["heap_mb"] > 0
    assert pg_store["indexes_mb"] > 0
    assert pg_store["table_mb"] >= pg_store["heap_mb"] + pg_store["indexes_mb"]

    # The peer row: FastStream's recipe at its default and its best max_workers, or why not.
    peer = results["faststream"]
    if peer["installed"]:
        _positive(peer["default"])
        _positive(peer["best"])
        assert peer["best"]["median"] == max(peer["sweep"].values())
        assert str(peer["best_max_workers"]) in peer["sweep"]
        assert peer["window"] == WINDOW
        assert peer["bus_to_best"] > 0
    else:
        assert peer["note"] == NOT_INSTALLED

    provinces = results["provinces"]["2"]
    assert provinces["topics_created"] == 12
    _positive(provinces["startup_to_assigned_s"])

    text = table(loaded)
    for row in (
        "bus round trip ",
        "bus round trip, unsigned",
        "latency p99, unsigned",
        "sign p50",
        "verify p50",
        "canonical p50",
        "receive trust work p50",
        "bus round trip, PostgreSQL",
        "end to end, PostgreSQL",
        "latency p99, PostgreSQL",
        f"PG store {size:,} get_pending",
        f"PG store {size:,} expire {TINY.sweep}",
        f"store {size:,} unacknowledged",
        "PostgreSQL " + server["server_version"],
        "FastStream",
    ):
        assert row in text, row

    # A report without PostgreSQL (``--postgres none``, or from before it) still prints.
    for key in ("bus_postgresql", "latency_postgresql", "e2e_postgresql", "store_postgresql",
                "postgresql"):  # fmt: skip
        del loaded["results"][key]
    text = table(loaded)
    assert "bus round trip " in text
    assert "PostgreSQL" not in text
    assert "PG store" not in text

    # Without faststream the peer row says so; a report from before the row still prints.
    loaded["results"]["faststream"] = {"installed": False, "note": NOT_INSTALLED}
    rows = table(loaded).splitlines()
    assert any(r.startswith("FastStream RPC ") and r.endswith(NOT_INSTALLED) for r in rows)
    del loaded["results"]["faststream"]
    assert "FastStream" not in table(loaded)


@pytest.mark.timeout(60)
async def test_faststream_recipe_answers_every_request(broker: str, settings: BusSettings) -> None:
    """The peer row's FastStream echo, for real on the embedded broker: every request is
    answered with its own claim's review, at the default concurrency and with max_workers."""
    pytest.importorskip(
        "faststream", reason="faststream (the bench's peer row) is not installed: a dev extra"
    )
    for max_workers in (None, 8):
        echo = FastStreamEcho(settings, broker, max_workers)
        await echo.start()
        try:
            rate = await echo.run(60)
        finally:
            await echo.stop()
        assert rate > 0
        assert echo.handled == 60
        assert echo.answered == 60


def test_plan_gives_every_part_its_own_provinces() -> None:
    """With PostgreSQL, its bus and end-to-end pairs are provinces of their own; without,
    no PostgreSQL part is planned."""
    plan = make_plan(TINY, 1)
    assert plan.postgres
    assert plan.pg_bus_pair is not None
    assert plan.pg_e2e_pair is not None
    parts = [plan.bus_pair, plan.unsigned_pair, plan.pg_bus_pair, plan.pg_e2e_pair,
             plan.e2e_pair, *plan.province_codes.values()]  # fmt: skip
    codes = [c for part in parts for c in part]
    assert len(codes) == len(set(codes))
    assert plan.postgres_url is None

    bare = make_plan(TINY, 1, postgres=False, postgres_url="postgresql://x@db/postgres")
    assert not bare.postgres
    assert bare.pg_bus_pair is None
    assert bare.pg_e2e_pair is None
    assert bare.postgres_url is None
