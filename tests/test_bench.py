"""Smoke test of ``xsettle bench``: every figure is produced, positive, and in the JSON.

No timing is asserted: the numbers depend on the machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bus.settings import BusSettings
from simulators.bench import TINY, Plan, run_bench, table, write_report
from tests.conftest import ProvincePool

pytestmark = pytest.mark.broker


def _positive(figure: dict[str, Any]) -> None:
    assert figure["median"] > 0
    assert figure["min"] > 0
    assert figure["max"] >= figure["median"] >= figure["min"]


@pytest.mark.timeout(180)
async def test_quick_bench_writes_every_figure(
    broker: str, settings: BusSettings, province_pool: ProvincePool, tmp_path: Path
) -> None:
    codes = [province_pool.take() for _ in range(8)]
    plan = Plan(
        sizes=TINY,
        repeat=1,
        bus_pair=(codes[0], codes[1]),
        e2e_pair=(codes[2], codes[3]),
        province_codes={2: codes[4:6]},
        unsigned_pair=(codes[6], codes[7]),
    )
    doc = await run_bench(settings, broker, plan, tmp_path)
    path = write_report(tmp_path / "reports" / "bench.json", doc)
    loaded = json.loads(path.read_text(encoding="utf-8"))

    assert set(loaded) >= {"machine", "config", "results", "seconds"}
    assert loaded["machine"]["cores"] >= 1
    assert {"python", "packages"} <= set(loaded["machine"])
    assert {"aiokafka", "fastavro", "pydantic"} <= set(loaded["machine"]["packages"])
    results = loaded["results"]
    assert set(results) == {
        "raw", "bus", "bus_unsigned", "latency", "latency_unsigned", "e2e", "codec", "store",
        "provinces", "signing",
    }  # fmt: skip

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

    store = results["store"][str(TINY.store[0])]
    assert store["file_mb"] > 0
    assert store["insert_s"] > 0
    _positive(store["query_due_ms"])
    _positive(store["expire_due_ms"])

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
    ):
        assert row in text, row
