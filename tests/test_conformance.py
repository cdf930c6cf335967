"""The conformance kit against the project's own gateway: it passes every check, and a gateway
broken in one behaviour fails exactly the checks about that behaviour.

Each run gets a broker of its own: the kit takes the persons P filed with its hosts from those
hosts' filing topics, so a gateway of an earlier run must not leave filings behind.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import adapters.directory
import adapters.province
import adapters.reconciliation
import adapters.rules
import bus.deadletter
from adapters.backoffice import SqlBackOffice
from adapters.directory import Directory
from adapters.gateway.service import Gateway
from adapters.gateway.testing import client, gateway_config, running_gateway
from bus.broker import EmbeddedBroker, create_contract_topics
from bus.codec import Codec
from bus.constants import FAMILY_FILING, FAMILY_REPLY, H_SIGNATURE, topic
from bus.envelope import Envelope, new_id, now_ms
from bus.models import ReconciliationDifference, ReversalResult, ReviewResult
from bus.settings import BusSettings
from bus.signing import Trust, generate_pem
from bus.store import OutRecord
from bus.transport import Record
from simulators import samples
from simulators.cli import main
from simulators.conformance import (
    CHECKS,
    FAIL,
    SKIP,
    Counterparts,
    Keys,
    Kit,
    KitOptions,
    Report,
    _request_problems,
    run_conformance,
)

pytestmark = pytest.mark.broker

P = "460000"
"""Hainan: host of many homes' filings, home of Haikou (460100) with agreements as home."""
INSTANT_HOST, DELAYED_HOST = "530000", "130000"
"""Hosts of Haikou's INSTANT and DELAYED agreements: the kit plays them."""
PERSONS_INSTANT = 14
"""Persons filed with the instant host: one per check that needs a filed person."""
TIMEOUT_S = 10.0
"""Check timeout of the test runs (everything answers in well under a second)."""
_serial = itertools.count(1)


async def file_persons(gw: Gateway, host: str, count: int) -> None:
    """File ``count`` Haikou persons with ``host`` through the gateway's agency API, as an
    integrator prepares their province before running the kit."""
    valid_from = (dt.datetime.now(dt.UTC) - dt.timedelta(days=30)).date().isoformat()
    async with client(gw, "agency") as http:
        for _ in range(count):
            body = {
                "person_id": f"46010219700101{next(_serial):04d}",
                "person_name": "王海",
                "insurance_type": "EMPLOYEE",
                "home_region": "460100",
                "host_region": host,
                "reason": "RELOCATED_RETIREE",
                "valid_from": valid_from,
            }
            response = await http.post("/v1/filings", json=body)
            assert response.status_code == 202, response.text


@asynccontextmanager
async def province_under_test(settings: BusSettings, folder: Path) -> AsyncIterator[str]:
    """A fresh broker with the contract topics, and Hainan's gateway on it with persons filed
    with the kit's hosts; yields the bootstrap."""
    async with EmbeddedBroker() as broker:
        await create_contract_topics(
            settings, broker.bootstrap, list(Directory.default().provinces())
        )
        config = gateway_config(P, broker.bootstrap, folder, settings=settings)
        async with running_gateway(config) as gw:
            await gw.system.node.wait_ready()
            await file_persons(gw, INSTANT_HOST, PERSONS_INSTANT)
            await file_persons(gw, DELAYED_HOST, 1)
            yield broker.bootstrap


async def conformance(bootstrap: str, settings: BusSettings, seed: int) -> Report:
    """A kit run against P."""
    options = KitOptions(province=P, bootstrap=bootstrap, seed=seed, check_timeout_s=TIMEOUT_S)
    return await run_conformance(options, settings)


@pytest.fixture(scope="module")
async def good(
    settings: BusSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """The bootstrap of a broker with the unmodified gateway of P."""
    async with province_under_test(settings, tmp_path_factory.mktemp("good")) as bootstrap:
        yield bootstrap


async def test_the_gateway_passes_every_check(good: str, settings: BusSettings) -> None:
    report = await conformance(good, settings, seed=1)
    assert [r.check.id for r in report.results] == [c.id for c in CHECKS]
    assert report.failed() == [], report.lines()
    # Hainan's gateway answers nothing at once that it could defer: no skip is legitimate here.
    assert report.count(SKIP) == 0, report.lines()
    assert report.persons == {INSTANT_HOST: PERSONS_INSTANT, DELAYED_HOST: 1}
    assert report.seconds < 60


async def test_cli_prints_one_line_per_check_and_writes_json(
    good: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    args = ["conformance", "--province", P, "--bootstrap", good, "--seed", "2", "--json", str(out)]
    code = await _main_in_thread([*args, "--only", "receipt.", "error.NOT_FILED"])
    # The gateway runs in this process and logs on stdout too: keep the kit's lines.
    kit = ("conformance of ", "PASS ", "FAIL ", "SKIP ", "2 checks")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(kit)]
    assert code == 0, lines
    assert lines[0].startswith(f"conformance of {P} on {good}, seed 2: the kit plays home ")
    assert lines[1].startswith("PASS receipt.filing — ")
    assert lines[2].startswith("PASS error.NOT_FILED — ")
    assert lines[-1] == "2 checks: 2 passed, 0 failed, 0 skipped"
    assert '"passed": 2' in out.read_text()


async def _main_in_thread(argv: list[str]) -> int:
    """``xsettle`` in a thread (it runs its own event loop)."""
    import asyncio

    return await asyncio.to_thread(main, argv)


def test_usage_errors_are_one_line_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--province", "990000", "--bootstrap", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "990000" in err[0]
    assert "not a province of the directory" in err[0]


async def test_a_review_whose_shares_do_not_add_up_fails_money_identities(
    settings: BusSettings, tmp_path: Path
) -> None:
    original = adapters.rules.review_result

    def off_by_one(*args: Any, **kwargs: Any) -> ReviewResult:
        result = original(*args, **kwargs)
        return result.model_copy(update={"fund_fen": result.fund_fen + 1})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("adapters.home.review_result", off_by_one)
        async with province_under_test(settings, tmp_path) as bootstrap:
            report = await conformance(bootstrap, settings, seed=3)
    assert report.failed() == ["review.money_identities"], report.lines()
    why = next(r.why for r in report.results if r.check.id == "review.money_identities")
    assert "≠ total" in why


async def test_a_province_that_checks_no_signature_fails_the_signature_checks(
    settings: BusSettings, tmp_path: Path
) -> None:
    original = adapters.province.trust_for

    def signs_but_never_checks(*args: Any, **kwargs: Any) -> Trust:
        return Trust(original(*args, **kwargs).signer, None)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapters.province, "trust_for", signs_but_never_checks)
        async with province_under_test(settings, tmp_path) as bootstrap:
            report = await conformance(bootstrap, settings, seed=4)
    assert report.failed() == [
        "error.SIGNATURE_INVALID",
        "signature.bad_signature",
        "signature.key_not_owned",
        "signature.duplicate_header",
        "signature.stale",
        "signature.replayed",
    ], report.lines()
    assert all(r.status != FAIL or "FilingReceipt" in r.why for r in report.results), report.lines()


async def test_dead_letters_without_the_original_signature_fail_deadletter_bytes(
    settings: BusSettings, tmp_path: Path
) -> None:
    original = bus.deadletter.dead_letter

    def unsigned_copy(*args: Any, **kwargs: Any) -> OutRecord:
        letter = original(*args, **kwargs)
        return replace(letter, headers=tuple(h for h in letter.headers if h[0] != H_SIGNATURE))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("bus.inbound.dead_letter", unsigned_copy)
        async with province_under_test(settings, tmp_path) as bootstrap:
            report = await conformance(bootstrap, settings, seed=5)
    assert report.failed() == ["deadletter.bytes"], report.lines()
    why = next(r.why for r in report.results if r.check.id == "deadletter.bytes")
    assert "byte for byte" in why


async def test_a_home_that_matches_statements_without_comparing_fails_reconciliation_mismatch(
    settings: BusSettings, tmp_path: Path
) -> None:
    def no_differences(*args: Any, **kwargs: Any) -> list[ReconciliationDifference]:
        return []

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapters.reconciliation, "compare", no_differences)
        async with province_under_test(settings, tmp_path) as bootstrap:
            report = await conformance(bootstrap, settings, seed=6)
    assert report.failed() == ["reconciliation.mismatch"], report.lines()
    why = next(r.why for r in report.results if r.check.id == "reconciliation.mismatch")
    assert why.startswith("MATCHED, though the statement's fund share"), why


async def test_a_home_that_confirms_a_reversal_twice_fails_already_reversed(
    settings: BusSettings, tmp_path: Path
) -> None:
    def never_reversed(self: SqlBackOffice, claim_id: str) -> ReversalResult | None:
        return None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SqlBackOffice, "confirmed_reversal_of", never_reversed)
        async with province_under_test(settings, tmp_path) as bootstrap:
            report = await conformance(bootstrap, settings, seed=7)
    assert report.failed() == ["reversal.already_reversed"], report.lines()
    why = next(r.why for r in report.results if r.check.id == "reversal.already_reversed")
    assert "got CONFIRMED, expected REFUSED ALREADY_REVERSED" in why


async def test_headers_requests_names_what_is_wrong_with_a_filing_of_p(
    settings: BusSettings,
) -> None:
    """P's own FilingUploads: a right one passes; one answered elsewhere, with another
    province's filing id, unsigned, is named for each."""
    directory = Directory.default()
    keys = Keys(directory)
    cp = Counterparts.choose(directory, P, keys.provinces())
    kit = Kit(KitOptions(P, "127.0.0.1:1", seed=1), settings, directory, keys, cp)
    filing = samples.filing(home="460100", host=INSTANT_HOST, person="460102197001010001")
    key, where = filing.person_id.encode(), topic(FAMILY_FILING, INSTANT_HOST)

    def sent(filing_id: str, reply_to: str, signed: bool = True) -> Record:
        value = Codec().encode(filing.model_copy(update={"filing_id": filing_id}))
        at = now_ms()
        env = Envelope(
            message_id=new_id(), message_type=filing.avro_name, source=P, target=INSTANT_HOST,
            sent_at_ms=at, reply_to=reply_to, deadline_ms=at + 60_000,
        )  # fmt: skip
        headers = env.to_headers()
        if signed:
            headers = keys.signer(P).sign(headers, key, value)
        return Record(where, 0, 0, at, key, value, headers)

    own = topic(FAMILY_REPLY, P)
    assert _request_problems(kit, sent("F-460100-1", own)) == []
    problems = _request_problems(kit, sent("F-130100-1", topic(FAMILY_REPLY, "130000"), False))
    assert [p.split(" ")[0] for p in problems] == ["xs-reply-to", "filing_id", "unsigned"]


def test_keys_from_a_folder_sign_under_the_key_id_the_directory_publishes(tmp_path: Path) -> None:
    public = generate_pem(tmp_path / "440000.pem")
    text = (Path(adapters.directory.__file__).parent / "default_directory.toml").read_text()
    block = (
        '\n[[keys]]\nprovince = "440000"\nkey_id = "440000-test-1"\nalgorithm = "ed25519"\n'
        f'public_key = "{base64.b64encode(public).decode()}"\n'
        "valid_from = 2026-01-01T00:00:00+08:00\n"
    )
    directory = Directory.from_toml(text + block)
    keys = Keys(directory, tmp_path)
    assert keys.signer("440000").key_id == "440000-test-1"
    assert keys.signer("130000").key_id == "130000-demo-1"  # no PEM: the demo key
    generate_pem(tmp_path / "530000.pem")  # a key the directory does not publish
    with pytest.raises(ValueError, match="publishes no key of 530000 valid now"):
        Keys(directory, tmp_path)
